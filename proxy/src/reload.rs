//! Background work: policy updates, expired budget reservations, idle rate-limit keys.
//!
//! Policy updates come from a file (polled for changes: it is usually a Kubernetes ConfigMap,
//! whose symlink swaps inotify handles badly) or an HTTP URL (polled with `If-None-Match`). A new
//! document is parsed and compiled completely before it is stored; if anything is wrong the
//! reason is logged, `tollgate_policy_reload_failures_total` counts it, and the last good
//! snapshot keeps serving.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;

use tollgate_core::policy::Snapshot;

use crate::app::Shared;
use crate::config::PolicySource;
use crate::pipeline::now;

/// Why a policy update was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no policy_source is configured")]
    NoSource,
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("fetching {url}: {error}")]
    Fetch { url: String, error: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("the new policy is invalid, keeping version {kept}: {errors}")]
    Invalid { kept: String, errors: tollgate_core::doc::DocErrors },
}

/// What was last seen at the policy source, to skip unchanged documents.
#[derive(Default)]
pub struct SourceState {
    last_text: Option<Bytes>,
    etag: Option<String>,
}

/// Runs the periodic tasks until `stop` turns true.
pub async fn background(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let poll = match &shared.config.policy_source {
        Some(PolicySource::File { poll, .. } | PolicySource::Url { poll, .. }) => Some(*poll),
        None => None,
    };
    let mut policy_tick = tokio::time::interval(poll.unwrap_or(Duration::from_secs(3600)));
    let mut expire_tick = tokio::time::interval(Duration::from_secs(1));
    let mut prune_tick = tokio::time::interval(Duration::from_secs(60));
    for t in [&mut policy_tick, &mut expire_tick, &mut prune_tick] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = policy_tick.tick(), if poll.is_some() => {
                match check_source(&shared).await {
                    Ok(Some(version)) => tracing::info!(%version, "policy updated"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "policy update rejected"),
                }
            }
            _ = expire_tick.tick() => {
                match shared.budgets.expire(now()) {
                    Ok(released) if !released.is_empty() => {
                        tracing::warn!(count = released.len(), "released expired budget reservations");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "expiring budget reservations"),
                }
            }
            _ = prune_tick.tick() => shared.rate_limits.prune(),
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
}

/// Reloads from the source now (admin API), even if it looks unchanged.
pub async fn reload_now(shared: &Shared) -> Result<String, ReloadError> {
    {
        let mut st = shared.policy_source_state.lock().await;
        st.last_text = None;
        st.etag = None;
    }
    check_source(shared).await?;
    Ok(shared.policy.load().version().to_string())
}

/// Fetches the source; applies it if it changed. `Ok(Some(version))` when a new snapshot was
/// stored.
async fn check_source(shared: &Shared) -> Result<Option<String>, ReloadError> {
    let Some(source) = &shared.config.policy_source else { return Err(ReloadError::NoSource) };
    let mut st = shared.policy_source_state.lock().await;
    let text = match source {
        PolicySource::File { path, .. } => {
            let bytes = tokio::fs::read(path).await.map_err(|error| {
                fail(shared, ReloadError::Read { path: path.display().to_string(), error })
            })?;
            Bytes::from(bytes)
        }
        PolicySource::Url { url, .. } => {
            let mut req = http::Request::get(url.clone());
            if let Some(etag) = &st.etag {
                req = req.header(http::header::IF_NONE_MATCH, etag.as_str());
            }
            let req = req.body(crate::deny::full(Bytes::new())).map_err(|e| {
                fail(shared, ReloadError::Fetch { url: url.to_string(), error: e.to_string() })
            })?;
            let response =
                tokio::time::timeout(Duration::from_secs(10), shared.client.request(req))
                    .await
                    .map_err(|_| {
                        fail(
                            shared,
                            ReloadError::Fetch { url: url.to_string(), error: "timed out".into() },
                        )
                    })?
                    .map_err(|e| {
                        fail(
                            shared,
                            ReloadError::Fetch { url: url.to_string(), error: e.to_string() },
                        )
                    })?;
            let status = response.status();
            if status == http::StatusCode::NOT_MODIFIED {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(fail(
                    shared,
                    ReloadError::Status { url: url.to_string(), status: status.as_u16() },
                ));
            }
            let etag = response
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| {
                    fail(shared, ReloadError::Fetch { url: url.to_string(), error: e.to_string() })
                })?
                .to_bytes();
            st.etag = etag;
            body
        }
    };
    if st.last_text.as_ref() == Some(&text) {
        return Ok(None);
    }
    let parsed = std::str::from_utf8(&text)
        .map_err(|_| {
            tollgate_core::doc::DocErrors(vec![tollgate_core::doc::DocError {
                path: String::new(),
                line: 1,
                col: 1,
                message: "the policy is not UTF-8 text".into(),
            }])
        })
        .and_then(Snapshot::from_yaml_str);
    // Remember the text either way: a bad document is reported once, not every poll.
    st.last_text = Some(text);
    match parsed {
        Ok(snapshot) => {
            let version = snapshot.version().to_string();
            shared.metrics.set_policy_version(&version);
            shared.policy.store(Arc::new(snapshot));
            Ok(Some(version))
        }
        Err(errors) => {
            let kept = shared.policy.load().version().to_string();
            Err(fail(shared, ReloadError::Invalid { kept, errors }))
        }
    }
}

fn fail(shared: &Shared, e: ReloadError) -> ReloadError {
    shared.metrics.policy_reload_failures.inc();
    e
}
