//! The forward proxy's state: the CA that mints certificates for intercepted hosts, how the
//! decrypted connections are served, and their drain at shutdown.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};

use crate::ca::Ca;
use crate::server::ConnLimits;

/// The forward proxy's state: the CA, how inner connections are served, and their drain.
pub struct Forward {
    pub ca: Ca,
    pub(super) builder: auto::Builder<TokioExecutor>,
    pub(super) limits: ConnLimits,
    /// Intercepted connections outlive the `CONNECT` request the listener's drain waits for,
    /// so they are drained here; `None` once shutdown began.
    graceful: Mutex<Option<GracefulShutdown>>,
}

impl Forward {
    pub fn new(ca: Ca, limits: ConnLimits) -> Forward {
        Forward {
            ca,
            builder: crate::server::builder(&limits),
            limits,
            graceful: Mutex::new(Some(GracefulShutdown::new())),
        }
    }

    pub(super) fn watcher(&self) -> Option<Watcher> {
        self.graceful.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|g| g.watcher())
    }

    /// Lets in-flight requests on intercepted connections finish (for at most `limit`), and
    /// closes those connections; new ones are refused from now on.
    pub async fn drain(&self, limit: Duration) {
        let graceful = self.graceful.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(graceful) = graceful {
            if tokio::time::timeout(limit, graceful.shutdown()).await.is_err() {
                tracing::warn!(drain = ?limit, "intercepted connections did not finish in time");
            }
        }
    }
}
