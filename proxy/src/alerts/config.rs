//! The `alerts:` section: webhook receivers and the delivery schedule.
//!
//! ```yaml
//! alerts:
//!   webhooks:
//!     - url: "https://hooks.example.com/tollgate"
//!       format: json            # or slack
//!       secret_env: ALERTS_KEY  # the HMAC key's environment variable (required)
//!       events: [budget_threshold, approval_pending, agent_disabled, circuit_open]  # default: all
//!   initial_backoff: 1s         # first retry; doubles per failed attempt, with jitter
//!   max_backoff: 5m
//!   max_attempts: 50            # then the delivery is dropped (logged and counted)
//!   max_age: 24h                # or once the event is this old
//!   timeout: 10s                # per attempt
//! ```

use std::time::Duration;

use tollgate_core::doc::{Cx, Field};

/// The kinds of event an alert is raised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    BudgetThreshold,
    ApprovalPending,
    AgentDisabled,
    CircuitOpen,
}

impl Kind {
    pub const ALL: [Kind; 4] =
        [Kind::BudgetThreshold, Kind::ApprovalPending, Kind::AgentDisabled, Kind::CircuitOpen];
    const NAMES: [&'static str; 4] =
        ["budget_threshold", "approval_pending", "agent_disabled", "circuit_open"];

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Self::NAMES.iter().position(|n| *n == text).map(|i| Self::ALL[i])
    }
}

/// The body a receiver gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The event as JSON ([`super::event::Event`]).
    Json,
    /// A Slack incoming-webhook message: `{"text": ..., "blocks": [...]}`.
    Slack,
}

/// One receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub url: http::Uri,
    pub format: Format,
    /// The environment variable holding the signing key (the key itself is never in the config
    /// nor in a log line).
    pub secret_env: String,
    /// The events it receives, each once.
    pub events: Vec<Kind>,
}

impl Webhook {
    /// The receiver's identity in the outbox: its URL.
    pub fn key(&self) -> String {
        self.url.to_string()
    }

    /// Scheme and authority only, for log lines (a webhook's path often carries a token).
    pub fn host(&self) -> String {
        format!(
            "{}://{}",
            self.url.scheme_str().unwrap_or("http"),
            self.url.authority().map(|a| a.as_str()).unwrap_or("-")
        )
    }
}

/// The compiled `alerts:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertsConfig {
    pub webhooks: Vec<Webhook>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub timeout: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhooks: Vec::new(),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_attempts: 50,
            max_age: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
        }
    }
}

const FIELDS: [&str; 6] =
    ["webhooks", "initial_backoff", "max_backoff", "max_attempts", "max_age", "timeout"];
const WEBHOOK_FIELDS: [&str; 4] = ["url", "format", "secret_env", "events"];

impl AlertsConfig {
    /// Whether any receiver is configured.
    pub fn enabled(&self) -> bool {
        !self.webhooks.is_empty()
    }

    /// Decodes the section, recording every error (with its path and line) in `cx`.
    pub fn decode(cx: &mut Cx, field: Option<Field<'_>>) -> AlertsConfig {
        let mut out = AlertsConfig::default();
        let Some(field) = field else { return out };
        let Some(mut obj) = cx.object(&field) else { return out };
        let mut duration = |cx: &mut Cx, key: &str, into: &mut Duration| {
            if let Some(f) = obj.get(key) {
                match f.duration_ms(cx) {
                    Some(0) => f.error(cx, "must be longer than zero"),
                    Some(ms) => *into = Duration::from_millis(ms),
                    None => {}
                }
            }
        };
        duration(cx, "initial_backoff", &mut out.initial_backoff);
        duration(cx, "max_backoff", &mut out.max_backoff);
        duration(cx, "max_age", &mut out.max_age);
        duration(cx, "timeout", &mut out.timeout);
        if let Some(f) = obj.get("max_attempts") {
            match f.u64(cx).map(u32::try_from) {
                Some(Ok(n)) if n > 0 => out.max_attempts = n,
                Some(_) => f.error(cx, "must be a positive integer"),
                None => {}
            }
        }
        for item in obj.get("webhooks").map(|f| f.items(cx)).unwrap_or_default() {
            let Some(mut w) = cx.object(&item) else { continue };
            let url = w.require(cx, "url").and_then(|f| {
                let text = f.str(cx)?;
                match text.parse::<http::Uri>() {
                    Ok(uri)
                        if matches!(uri.scheme_str(), Some("http" | "https"))
                            && uri.authority().is_some() =>
                    {
                        Some(uri)
                    }
                    _ => {
                        f.error(cx, format!("expected an http:// or https:// URL, found `{text}`"));
                        None
                    }
                }
            });
            let format = match w.get("format") {
                Some(f) => f.one_of(cx, &["json", "slack"]).map(|name| match name {
                    "slack" => Format::Slack,
                    _ => Format::Json,
                }),
                None => Some(Format::Json),
            };
            let secret_env =
                w.require(cx, "secret_env").and_then(|f| f.non_empty_str(cx).map(str::to_string));
            let events = match w.get("events") {
                Some(f) => {
                    let mut events = Vec::new();
                    for e in f.items(cx) {
                        let Some(name) = e.one_of(cx, &Kind::NAMES) else { continue };
                        let kind = Kind::parse(name).unwrap_or(Kind::BudgetThreshold);
                        if !events.contains(&kind) {
                            events.push(kind);
                        }
                    }
                    if events.is_empty() {
                        f.error(cx, "name at least one event (or leave `events` out for all)");
                    }
                    events
                }
                None => Kind::ALL.to_vec(),
            };
            w.finish(cx, &WEBHOOK_FIELDS);
            let (Some(url), Some(format), Some(secret_env)) = (url, format, secret_env) else {
                continue;
            };
            if out.webhooks.iter().any(|o| o.url == url) {
                item.error(cx, format!("duplicate webhook url `{url}`"));
                continue;
            }
            out.webhooks.push(Webhook { url, format, secret_env, events });
        }
        if out.max_backoff < out.initial_backoff {
            out.max_backoff = out.initial_backoff;
        }
        obj.finish(cx, &FIELDS);
        out
    }
}
