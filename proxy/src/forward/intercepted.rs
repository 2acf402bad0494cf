//! The forward proxy's state: the CA that mints certificates for intercepted hosts, how the
//! decrypted connections are served, and their drain at shutdown.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::ca::Ca;
use crate::server::{Builders, ConnLimits};

/// The forward proxy's state: the CA, how inner connections are served, and their drain.
pub struct Forward {
    pub ca: Ca,
    /// The listener's builders ([`Builders::serve`]), so an intercepted connection is served
    /// exactly as a direct one.
    pub(super) builders: Builders,
    pub(super) limits: ConnLimits,
    /// Intercepted connections outlive the `CONNECT` request the listener's drain waits for,
    /// so they are drained here: each holds a receiver, told to stop at shutdown; the drain
    /// ends when the last is dropped.
    stop: watch::Sender<bool>,
    /// What a new connection watches; `None` once shutdown began.
    stopping: Mutex<Option<watch::Receiver<bool>>>,
}

impl Forward {
    pub fn new(ca: Ca, limits: ConnLimits) -> Forward {
        let (stop, stopping) = watch::channel(false);
        Forward {
            ca,
            builders: Builders::new(&limits),
            limits,
            stop,
            stopping: Mutex::new(Some(stopping)),
        }
    }

    /// What a new intercepted connection watches for shutdown; `None` once it began.
    pub(super) fn watcher(&self) -> Option<watch::Receiver<bool>> {
        self.stopping.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Lets in-flight requests on intercepted connections finish (for at most `limit`), and
    /// closes those connections; new ones are refused from now on.
    pub async fn drain(&self, limit: Duration) {
        let stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner).take();
        if stopping.is_none() {
            return;
        }
        drop(stopping);
        let _ = self.stop.send(true);
        if tokio::time::timeout(limit, self.stop.closed()).await.is_err() {
            tracing::warn!(drain = ?limit, "intercepted connections did not finish in time");
        }
    }
}
