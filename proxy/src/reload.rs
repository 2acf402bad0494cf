//! Background work: config and policy updates, expired budget reservations, idle rate-limit
//! keys.
//!
//! The config file the proxy was started with is polled every [`CONFIG_POLL`] (by content, so
//! a Kubernetes ConfigMap's symlink swap is seen). A changed file is parsed and compiled
//! completely before anything is replaced; if anything is wrong the errors (each naming its
//! field and line) are logged, `tollgate_config_reload_failures_total` counts it, and the
//! running config keeps serving. What applies only at start (listeners, data directory,
//! ledger, export, forward proxy, oversight, connection limits, ...) is kept as it was and the
//! log names what needs a restart; everything else (routes, attribution, prices, the inline
//! policy, autonomy, guardrails, body limits, upstream timeouts) applies to the next request.
//! A request in flight finishes under the config it started with.
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

use crate::clock::now;
use crate::config::{Config, PolicySource};
use crate::state::{Current, Shared};

/// How often the config file is read for changes.
pub const CONFIG_POLL: Duration = Duration::from_secs(5);

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
    #[error("{path} is invalid, keeping the running config: {error}")]
    InvalidConfig { path: String, error: String },
}

/// Runs the periodic tasks until `stop` turns true.
pub async fn background(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let current = shared.current();
    let poll = match &current.config.policy_source {
        Some(PolicySource::File { poll, .. } | PolicySource::Url { poll, .. }) => Some(*poll),
        None => None,
    };
    let config_file = current.config.source.clone();
    drop(current);
    if let Some(path) = &config_file {
        // What the proxy started with: the first poll reloads only if it changed since.
        shared.reload_state.lock().await.config_text =
            tokio::fs::read(path).await.ok().map(Bytes::from);
    }
    let mut config_tick = tokio::time::interval(CONFIG_POLL);
    let mut policy_tick = tokio::time::interval(poll.unwrap_or(Duration::from_secs(3600)));
    let mut expire_tick = tokio::time::interval(Duration::from_secs(1));
    let mut prune_tick = tokio::time::interval(Duration::from_secs(60));
    for t in [&mut config_tick, &mut policy_tick, &mut expire_tick, &mut prune_tick] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = config_tick.tick(), if config_file.is_some() => {
                match check_config(&shared).await {
                    Ok(Some(restart)) if restart.is_empty() => tracing::info!("config reloaded"),
                    Ok(Some(restart)) => tracing::warn!(
                        needs_restart = ?restart,
                        "config reloaded; these settings changed but apply only at start, and \
                         keep their running values until a restart"
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "config update rejected"),
                }
            }
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

/// Reloads the config file and the policy source now (admin API), even if they look
/// unchanged. Returns the policy version in force.
pub async fn reload_now(shared: &Shared) -> Result<String, ReloadError> {
    let current = shared.current();
    let (file, source) = (current.config.source.is_some(), current.config.policy_source.is_some());
    drop(current);
    if !file && !source {
        return Err(ReloadError::NoSource);
    }
    {
        let mut st = shared.reload_state.lock().await;
        st.last_text = None;
        st.etag = None;
        st.config_text = None;
    }
    if file {
        check_config(shared).await?;
    }
    if source {
        check_source(shared).await?;
    }
    Ok(shared.current().policy.version().to_string())
}

/// Reads the config file; applies it if it changed. `Ok(Some(needs_restart))` when a new
/// config was stored, with the names of the settings that keep their running values.
async fn check_config(shared: &Shared) -> Result<Option<Vec<&'static str>>, ReloadError> {
    let running = shared.current();
    let Some(path) = running.config.source.clone() else { return Err(ReloadError::NoSource) };
    let mut st = shared.reload_state.lock().await;
    let failed = |e: ReloadError| {
        shared.metrics.config_reload_failures.inc();
        e
    };
    let display = path.display().to_string();
    let text = tokio::fs::read(&path)
        .await
        .map_err(|error| failed(ReloadError::Read { path: display.clone(), error }))?;
    let text = Bytes::from(text);
    if st.config_text.as_ref() == Some(&text) {
        return Ok(None);
    }
    // Remembered either way: a bad document is reported once, not every poll.
    st.config_text = Some(text.clone());
    let invalid =
        |error: String| failed(ReloadError::InvalidConfig { path: display.clone(), error });
    let text =
        std::str::from_utf8(&text).map_err(|_| invalid("the file is not UTF-8 text".into()))?;
    let mut config = Config::from_str(text).map_err(|e| invalid(e.to_string()))?;
    config.pin_from_env(std::env::vars()).map_err(|e| invalid(format!("{e:#}")))?;
    config.source = Some(path);
    let restart = config.keep_restart_only(&running.config);
    // A policy from `policy_source` stays in force; otherwise the file's own policy does.
    let policy = match &running.config.policy_source {
        Some(_) => running.policy.clone(),
        None => Arc::new(config.engine.policy().clone()),
    };
    if policy.version() != running.policy.version() {
        shared.metrics.set_policy_version(policy.version());
    }
    shared.traces.set_sampling(config.traces.sampling);
    shared.current.store(Arc::new(Current { config: Arc::new(config), policy }));
    Ok(Some(restart))
}

/// Fetches the source; applies it if it changed. `Ok(Some(version))` when a new snapshot was
/// stored.
async fn check_source(shared: &Shared) -> Result<Option<String>, ReloadError> {
    let Some(source) = &shared.current().config.policy_source else {
        return Err(ReloadError::NoSource);
    };
    let mut st = shared.reload_state.lock().await;
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
            let config = shared.current().config.clone();
            shared.current.store(Arc::new(Current { config, policy: Arc::new(snapshot) }));
            Ok(Some(version))
        }
        Err(errors) => {
            let kept = shared.current().policy.version().to_string();
            Err(fail(shared, ReloadError::Invalid { kept, errors }))
        }
    }
}

fn fail(shared: &Shared, e: ReloadError) -> ReloadError {
    shared.metrics.policy_reload_failures.inc();
    e
}
