//! The `oversight:` section: approval thresholds and timeouts, and the runaway-agent guards.
//!
//! ```yaml
//! oversight:
//!   approvals: {medium_from: 30, high_from: 70, medium_timeout: 15m, high_timeout: 60m}
//!   use_within: 1h          # an approved approval must be used by then
//!   sweep_interval: 1s      # how often timed-out approvals are settled
//!   loops: {max_repeats: 3, window: 10m}              # present → the loop detector is on
//!   breaker: {failure_threshold: 5, open_for: 60s}    # present → a breaker per upstream
//!   escalation: {review_at: 3, disable_at: 5}         # present → consecutive-error escalation
//! ```
//!
//! Approvals work without the section (built-in defaults); the guards are on only when named, so
//! a proxy without `oversight:` does no per-request oversight work for allowed model calls.
//!
//! Decoded here, in the core, for every adapter: the sidecar runs all of it; the Envoy filter
//! runs `loops`, `breaker`, `escalation` and the approval thresholds and refuses the approval
//! timeouts at load, naming the field.

use std::time::Duration;

use crate::doc::{Cx, Field};
use crate::guardrails::breaker::BreakerConfig;
use crate::guardrails::escalation::EscalationConfig;
use crate::guardrails::loops::LoopConfig;
use crate::risk::Thresholds;

/// The compiled `oversight:` section.
#[derive(Clone, Debug)]
pub struct OversightConfig {
    pub thresholds: Thresholds,
    pub use_within: Duration,
    pub sweep_interval: Duration,
    pub loops: Option<LoopConfig>,
    pub breaker: Option<BreakerConfig>,
    pub escalation: Option<EscalationConfig>,
}

impl Default for OversightConfig {
    fn default() -> Self {
        OversightConfig {
            thresholds: Thresholds::default(),
            use_within: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(1),
            loops: None,
            breaker: None,
            escalation: None,
        }
    }
}

const FIELDS: [&str; 6] =
    ["approvals", "use_within", "sweep_interval", "loops", "breaker", "escalation"];

impl OversightConfig {
    /// Decodes the section, recording every error (with its path and line) in `cx`.
    pub fn decode(cx: &mut Cx, field: Option<Field<'_>>) -> OversightConfig {
        let mut out = OversightConfig::default();
        let Some(field) = field else { return out };
        let Some(mut obj) = cx.object(&field) else { return out };
        if let Some(f) = obj.get("approvals") {
            out.thresholds = Thresholds::decode(cx, &f);
        }
        let mut duration = |cx: &mut Cx, key: &str, into: &mut Duration| {
            if let Some(f) = obj.get(key) {
                match f.duration_ms(cx) {
                    Some(0) => f.error(cx, "must be longer than zero"),
                    Some(ms) => *into = Duration::from_millis(ms),
                    None => {}
                }
            }
        };
        duration(cx, "use_within", &mut out.use_within);
        duration(cx, "sweep_interval", &mut out.sweep_interval);
        out.loops = obj.get("loops").map(|f| LoopConfig::decode(cx, &f));
        out.breaker = obj.get("breaker").map(|f| BreakerConfig::decode(cx, &f));
        out.escalation = obj.get("escalation").map(|f| EscalationConfig::decode(cx, &f));
        obj.finish(cx, &FIELDS);
        out
    }
}
