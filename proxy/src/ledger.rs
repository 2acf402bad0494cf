//! The usage ledger: one JSON line per metered request, appended by a single writer task.
//!
//! Requests hand their record to a bounded queue and never wait on the disk. The writer batches
//! whatever is queued into one `write` and flushes it, so a burst costs one syscall, not one per
//! record. `flush()` waits until everything queued before it is on disk (graceful shutdown uses
//! it). A failed write is counted and logged, and the ledger reports itself unhealthy for
//! `/readyz`. Crash safety (checksums, fsync windows, torn-tail repair) is the chargeback issue's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use tollgate_core::money::Money;
use tollgate_core::usage::Usage;

/// One metered request.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub ts: String,
    pub request_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_unit: Option<String>,
    pub route: String,
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    pub tokens: Usage,
    /// Total cost as an exact decimal string in USD.
    pub cost_usd: Money,
    pub cost_nano_usd: i64,
    pub decision: &'static str,
    pub reason: String,
    pub status: u16,
    pub latency_ms: u64,
    pub usage_source: &'static str,
    /// How the response ended: `complete`, `client_gone`, `upstream_error`, `idle_timeout`.
    pub end: &'static str,
}

enum Msg {
    Record(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// A handle to the ledger writer; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    healthy: Arc<AtomicBool>,
    path: Arc<PathBuf>,
}

impl Ledger {
    /// Opens (creating) the ledger file for appending and starts the writer task.
    pub async fn open(path: &Path, on_error: impl Fn() + Send + 'static) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
        let (tx, rx) = mpsc::channel(64 * 1024);
        let healthy = Arc::new(AtomicBool::new(true));
        tokio::spawn(write_loop(file, rx, healthy.clone(), on_error));
        Ok(Ledger { tx, healthy, path: Arc::new(path.to_path_buf()) })
    }

    /// Queues a record. Never blocks; if the queue is full the record is written by a detached
    /// task rather than dropped.
    pub fn append(&self, record: &Record) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "serializing a ledger record");
                return;
            }
        };
        line.push(b'\n');
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.tx.try_send(Msg::Record(line)) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Waits until every record queued before this call has been written and flushed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

async fn write_loop(
    mut file: tokio::fs::File,
    mut rx: mpsc::Receiver<Msg>,
    healthy: Arc<AtomicBool>,
    on_error: impl Fn(),
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut waiters = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Take everything already queued: one write for the whole burst.
        while let Some(msg) = next {
            match msg {
                Msg::Record(line) => batch.extend_from_slice(&line),
                Msg::Flush(done) => waiters.push(done),
            }
            next = if batch.len() < 1 << 20 { rx.try_recv().ok() } else { None };
        }
        if !batch.is_empty() {
            let result = async {
                file.write_all(&batch).await?;
                file.flush().await
            }
            .await;
            match result {
                Ok(()) => healthy.store(true, Ordering::Relaxed),
                Err(e) => {
                    healthy.store(false, Ordering::Relaxed);
                    on_error();
                    tracing::error!(error = %e, "writing the usage ledger");
                }
            }
            batch.clear();
        }
        for done in waiters.drain(..) {
            let _ = done.send(());
        }
    }
}
