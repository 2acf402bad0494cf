//! Error escalation (`error_based`): an agent whose calls keep failing is
//! handed to a human, and past a point switched off.
//!
//! Consecutive errors per agent: from `review_at` (3) every action of the agent needs approval
//! (human review); at `disable_at` (5) the agent is disabled, and stays disabled until an
//! operator calls [`Escalation::reenable`]. A success resets the error count but not the
//! disabled state. Only agents with errors or disabled are stored, so memory follows the number
//! of misbehaving agents, not of all agents.
//!
//! Only the agent's own failures count ([`Outcome::of_status`]): a request the upstream refused
//! as bad (4xx other than 408 and 429). A provider that is overloaded, rate limiting or down
//! (429, 408, 5xx including Anthropic's 529, a timeout, no connection) is not the agent's
//! doing: [`Escalation::on_outcome`] leaves the count alone for it, and only the upstream's
//! circuit breaker hears of it ([`super::breaker::Breaker::on_outcome`]).
//!
//! This module tracks and decides; it never notifies anyone. The sidecar keeps the agents in a
//! map ([`Escalation`]); the Envoy filter in shared data, which cannot delete keys, so the
//! agents are spread over a fixed set of [`SLOTS`] keys by a stable hash ([`Slot::index`]), each
//! one [`Slot`] record updated with a compare-and-swap, with the same rules
//! ([`EscalationConfig::standing`]). The filter reports an agent it disables to its collector,
//! where an operator re-enables it; the filter learns of that when the agent leaves the
//! collector's disabled set, and [`Slot::reenable`] undoes only a disabling the collector had
//! already seen: one that happened since (the agent failing again after the re-enable, its
//! report still on its way) stays.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::autonomy::Effect;
use crate::doc::{Cx, Field};
use crate::time::UnixMillis;

/// Escalation thresholds. Defaults: review at 3, disable at 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscalationConfig {
    pub review_at: u32,
    pub disable_at: u32,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        EscalationConfig { review_at: 3, disable_at: 5 }
    }
}

impl EscalationConfig {
    /// The standing of an agent with `errors` consecutive errors, `disabled` or not.
    pub fn standing(&self, errors: u32, disabled: bool) -> Standing {
        let consecutive_errors = errors;
        if disabled {
            Standing::Disabled { consecutive_errors }
        } else if errors >= self.review_at {
            Standing::Review { consecutive_errors }
        } else {
            Standing::Normal { consecutive_errors }
        }
    }

    /// Decodes `{review_at: 3, disable_at: 5}`, each optional.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> EscalationConfig {
        let mut c = EscalationConfig::default();
        let Some(mut obj) = cx.object(field) else { return c };
        for (key, into) in [("review_at", &mut c.review_at), ("disable_at", &mut c.disable_at)] {
            if let Some(f) = obj.get(key) {
                match f.u64(cx).map(u32::try_from) {
                    Some(Ok(n)) if n > 0 => *into = n,
                    Some(_) => f.error(cx, "must be a positive integer"),
                    None => {}
                }
            }
        }
        if c.review_at > c.disable_at {
            cx.error(obj.path(), obj.node(), "review_at must not be above disable_at");
        }
        obj.finish(cx, &["review_at", "disable_at"]);
        c
    }
}

/// Whose doing an admitted call's result is, from the upstream's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream answered 1xx, 2xx or 3xx.
    Success,
    /// The upstream refused the request itself (400, 401, 403, 404, 422, ...): the agent's error.
    AgentError,
    /// The provider failed or pushed back: 408, 429, any 5xx (529 included), or no answer at all
    /// (status 0: no connection, or the proxy's own 502/504 for an unreachable or timed-out
    /// upstream).
    ProviderError,
}

impl Outcome {
    /// Classifies an upstream status; `0` means no response was received.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            0 | 408 | 429 | 500.. => Outcome::ProviderError,
            400..=499 => Outcome::AgentError,
            _ => Outcome::Success,
        }
    }
}

/// An agent's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "standing")]
pub enum Standing {
    Normal {
        consecutive_errors: u32,
    },
    /// Too many consecutive errors: a human reviews each action.
    Review {
        consecutive_errors: u32,
    },
    /// Disabled until re-enabled by an operator.
    Disabled {
        consecutive_errors: u32,
    },
}

impl Standing {
    /// `allow` (normal), `require_approval` (review), `deny` (disabled).
    pub fn effect(self) -> Effect {
        match self {
            Standing::Normal { .. } => Effect::Allow,
            Standing::Review { .. } => Effect::RequireApproval,
            Standing::Disabled { .. } => Effect::Deny,
        }
    }

    /// The stable reason code, `None` when normal.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Standing::Normal { .. } => None,
            Standing::Review { .. } => Some("error_escalation"),
            Standing::Disabled { .. } => Some("agent_disabled"),
        }
    }

    /// A human explanation, `None` when normal.
    pub fn explanation(self) -> Option<String> {
        match self {
            Standing::Normal { .. } => None,
            Standing::Review { consecutive_errors } => Some(format!(
                "the agent failed {consecutive_errors} times in a row: a human must review its actions"
            )),
            // Disabled elsewhere in the fleet (the count is not shared).
            Standing::Disabled { consecutive_errors: 0 } => Some(
                "the agent is disabled until an operator re-enables it".to_string(),
            ),
            Standing::Disabled { consecutive_errors } => Some(format!(
                "the agent is disabled after {consecutive_errors} consecutive errors until an operator re-enables it"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Record {
    errors: u32,
    disabled: bool,
}

/// Consecutive-error tracking for every agent, shared by every thread (`&self`).
#[derive(Debug, Default)]
pub struct Escalation {
    config: EscalationConfig,
    agents: Mutex<HashMap<Box<str>, Record>>,
}

impl Escalation {
    pub fn new(config: EscalationConfig) -> Self {
        Escalation { config, agents: Mutex::new(HashMap::new()) }
    }

    fn standing_of(&self, r: Record) -> Standing {
        self.config.standing(r.errors, r.disabled)
    }

    /// The agent's standing now. Never allocates.
    pub fn standing(&self, agent: &str) -> Standing {
        let agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        self.standing_of(agents.get(agent).copied().unwrap_or_default())
    }

    /// Records an error of `agent` and returns its new standing.
    pub fn on_error(&self, agent: &str) -> Standing {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let r = match agents.get_mut(agent) {
            Some(r) => r,
            None => agents.entry(agent.into()).or_default(),
        };
        r.errors = r.errors.saturating_add(1);
        if r.errors >= self.config.disable_at {
            r.disabled = true;
        }
        let r = *r;
        self.standing_of(r)
    }

    /// Records a success: the error count resets, a disabled agent stays disabled.
    pub fn on_success(&self, agent: &str) -> Standing {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = agents.get_mut(agent) else {
            return Standing::Normal { consecutive_errors: 0 };
        };
        r.errors = 0;
        let r = *r;
        if !r.disabled {
            agents.remove(agent);
        }
        self.standing_of(r)
    }

    /// Records the result of one of `agent`'s calls: a success resets the count, the agent's
    /// error adds to it, a provider error changes nothing (it is the breaker's business).
    pub fn on_outcome(&self, agent: &str, outcome: Outcome) -> Standing {
        match outcome {
            Outcome::Success => self.on_success(agent),
            Outcome::AgentError => self.on_error(agent),
            Outcome::ProviderError => self.standing(agent),
        }
    }

    /// Re-enables `agent` (an operator's action) and clears its count; true if it was disabled.
    pub fn reenable(&self, agent: &str) -> bool {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        agents.remove(agent).is_some_and(|r| r.disabled)
    }

    /// Disables `agent` without counting an error: restores an agent that was disabled before
    /// a restart.
    pub fn restore_disabled(&self, agent: &str) {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        agents.entry(agent.into()).or_default().disabled = true;
    }

    /// The agents disabled now, sorted.
    pub fn disabled(&self) -> Vec<String> {
        let agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<String> =
            agents.iter().filter(|(_, r)| r.disabled).map(|(a, _)| a.to_string()).collect();
        out.sort_unstable();
        out
    }

    /// The number of agents with errors or disabled.
    pub fn tracked(&self) -> usize {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// How many shared-data keys the Envoy filter spreads the agents' records over.
pub const SLOTS: usize = 256;

/// One shared-data record of error escalation: the agents whose name hashes to it that have
/// consecutive errors or are disabled, as [`Escalation`] keeps them, with when each was
/// disabled. Pure: decoding, the rules and encoding only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Agent, consecutive errors, and when it was disabled (unix ms; 0 when a slot written
    /// before the time was kept says only that it is disabled).
    entries: Vec<(String, u32, Option<u64>)>,
}

impl Slot {
    /// Agents one slot keeps at most; past that a new agent's errors are not counted (the
    /// number of keys and their size in shared data must stay bounded).
    pub const CAPACITY: usize = 64;

    /// The slot of `agent` (FNV-1a, stable across builds and workers).
    pub fn index(agent: &str) -> usize {
        (crate::risk::history::fnv1a(agent) % SLOTS as u64) as usize
    }

    /// The agent's standing.
    pub fn standing(&self, agent: &str, config: &EscalationConfig) -> Standing {
        let (errors, disabled) = self
            .entries
            .iter()
            .find(|(a, ..)| a == agent)
            .map_or((0, false), |(_, e, d)| (*e, d.is_some()));
        config.standing(errors, disabled)
    }

    /// When `agent` was disabled, if it is.
    pub fn disabled_at(&self, agent: &str) -> Option<UnixMillis> {
        self.entries.iter().find(|(a, ..)| a == agent).and_then(|(_, _, d)| d.map(UnixMillis))
    }

    /// Re-enables `agent` and clears its count ([`Escalation::reenable`]) if it was disabled at
    /// or before `seen`, a time by which the collector had it as disabled (it listed the agent
    /// then), so the operator's re-enable that took it off the list is about this disabling.
    /// One made after `seen` (the agent failed again since) is not the one the operator
    /// re-enabled, and stays. Returns whether the record must be written.
    pub fn reenable(&mut self, agent: &str, seen: UnixMillis) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(a, _, d)| a != agent || !d.is_some_and(|at| at <= seen.0));
        self.entries.len() != before
    }

    /// [`Escalation::on_outcome`] in this slot at `now`: the agent's new standing, and whether
    /// the record must be written.
    pub fn on_outcome(
        &mut self,
        agent: &str,
        config: &EscalationConfig,
        outcome: Outcome,
        now: UnixMillis,
    ) -> (Standing, bool) {
        let disabled = |errors: u32| (errors >= config.disable_at).then_some(now.0);
        let found = self.entries.iter().position(|(a, ..)| a == agent);
        match (outcome, found) {
            (Outcome::ProviderError, _) | (Outcome::Success, None) => {
                (self.standing(agent, config), false)
            }
            (Outcome::Success, Some(i)) => {
                let (_, errors, disabled) = &mut self.entries[i];
                let changed = *errors != 0;
                *errors = 0;
                if disabled.is_none() {
                    self.entries.remove(i);
                }
                (self.standing(agent, config), changed)
            }
            (Outcome::AgentError, Some(i)) => {
                let (_, errors, at) = &mut self.entries[i];
                *errors = errors.saturating_add(1);
                if at.is_none() {
                    *at = disabled(*errors);
                }
                (self.standing(agent, config), true)
            }
            (Outcome::AgentError, None) if self.entries.len() >= Slot::CAPACITY => {
                (self.standing(agent, config), false)
            }
            (Outcome::AgentError, None) => {
                self.entries.push((agent.to_owned(), 1, disabled(1)));
                (self.standing(agent, config), true)
            }
        }
    }

    /// Decodes a stored slot (empty bytes: an empty slot). `None`: not a slot.
    pub fn decode(bytes: &[u8]) -> Option<Slot> {
        crate::slot::decode(bytes, |r| {
            let entries = r.list(|r| {
                let (agent, errors) = (r.str()?.to_owned(), r.u32()?);
                let disabled = match r.u8()? {
                    0 => None,
                    // Disabled, written before the time was kept.
                    1 => Some(0),
                    2 => Some(r.u64()?),
                    _ => return None,
                };
                Some((agent, errors, disabled))
            })?;
            Some(Slot { entries })
        })
    }

    /// The bytes [`Slot::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = crate::slot::Writer::with_capacity(4 + self.entries.len() * 32);
        w.count(self.entries.len());
        for (agent, errors, disabled) in &self.entries {
            w.str(agent);
            w.u32(*errors);
            match disabled {
                None => w.u8(0),
                Some(at) => {
                    w.u8(2);
                    w.u64(*at);
                }
            }
        }
        w.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_escalate_to_review_then_disable() {
        let e = Escalation::default();
        let steps: Vec<(Effect, Option<&str>)> = (0..6)
            .map(|_| {
                let s = e.on_error("a");
                (s.effect(), s.reason())
            })
            .collect();
        assert_eq!(
            steps,
            vec![
                (Effect::Allow, None),
                (Effect::Allow, None),
                (Effect::RequireApproval, Some("error_escalation")),
                (Effect::RequireApproval, Some("error_escalation")),
                (Effect::Deny, Some("agent_disabled")),
                (Effect::Deny, Some("agent_disabled")),
            ]
        );
        assert_eq!(e.standing("other"), Standing::Normal { consecutive_errors: 0 });
    }

    #[test]
    fn restored_agents_are_disabled_until_reenabled() {
        let e = Escalation::default();
        e.restore_disabled("b");
        for _ in 0..5 {
            e.on_error("a");
        }
        e.on_error("c");
        assert_eq!(e.disabled(), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(e.standing("b"), Standing::Disabled { consecutive_errors: 0 });
        assert_eq!(e.on_success("b").effect(), Effect::Deny);
        assert!(e.reenable("b"));
        assert_eq!(e.disabled(), vec!["a".to_string()]);
    }

    #[test]
    fn success_resets_the_count_but_not_the_disabled_state() {
        let e = Escalation::default();
        for _ in 0..3 {
            e.on_error("a");
        }
        assert_eq!(e.on_success("a"), Standing::Normal { consecutive_errors: 0 });
        assert_eq!(e.tracked(), 0);
        for _ in 0..5 {
            e.on_error("a");
        }
        assert_eq!(e.on_success("a"), Standing::Disabled { consecutive_errors: 0 });
        assert_eq!(e.standing("a").effect(), Effect::Deny);
        assert!(e.reenable("a"));
        assert_eq!(e.standing("a"), Standing::Normal { consecutive_errors: 0 });
        assert!(!e.reenable("a"));
        assert_eq!(e.on_error("a"), Standing::Normal { consecutive_errors: 1 });
    }

    #[test]
    fn statuses_are_the_agents_or_the_providers() {
        for status in [0, 408, 429, 500, 502, 503, 504, 529, 599] {
            assert_eq!(Outcome::of_status(status), Outcome::ProviderError, "{status}");
        }
        for status in [400, 401, 403, 404, 409, 413, 422, 499] {
            assert_eq!(Outcome::of_status(status), Outcome::AgentError, "{status}");
        }
        for status in [100, 200, 201, 204, 304] {
            assert_eq!(Outcome::of_status(status), Outcome::Success, "{status}");
        }
    }

    #[test]
    fn provider_errors_never_escalate_and_do_not_reset_the_count() {
        let e = Escalation::default();
        for _ in 0..10 {
            for status in [429, 500, 529, 0] {
                let s = e.on_outcome("a", Outcome::of_status(status));
                assert_eq!(s, Standing::Normal { consecutive_errors: 0 });
            }
        }
        assert_eq!(e.tracked(), 0, "nothing stored for provider errors");
        e.on_outcome("a", Outcome::of_status(400));
        e.on_outcome("a", Outcome::of_status(503));
        assert_eq!(
            e.on_outcome("a", Outcome::of_status(422)),
            Standing::Normal { consecutive_errors: 2 }
        );
        assert_eq!(e.on_outcome("a", Outcome::of_status(404)).effect(), Effect::RequireApproval);
        assert_eq!(
            e.on_outcome("a", Outcome::of_status(200)),
            Standing::Normal { consecutive_errors: 0 }
        );
    }

    #[test]
    fn a_slot_escalates_as_the_sidecar_does_through_its_bytes() {
        let config = EscalationConfig { review_at: 2, disable_at: 3 };
        let sidecar = Escalation::new(config);
        let mut slot = Slot::default();
        let statuses = [400, 200, 404, 503, 422, 429, 401, 0, 403, 200, 400];
        for status in statuses {
            let outcome = Outcome::of_status(status);
            let expected = sidecar.on_outcome("a", outcome);
            let (got, _) = slot.on_outcome("a", &config, outcome, UnixMillis(7));
            assert_eq!(got, expected, "after {status}");
            slot = Slot::decode(&slot.encode()).unwrap();
            assert_eq!(slot.standing("a", &config), sidecar.standing("a"), "after {status}");
        }
        assert_eq!(slot.standing("a", &config).effect(), Effect::Deny);
        assert_eq!(slot.standing("b", &config), Standing::Normal { consecutive_errors: 0 });
        // Provider errors and the successes of untracked agents store nothing.
        let mut empty = Slot::default();
        assert!(!empty.on_outcome("b", &config, Outcome::ProviderError, UnixMillis(7)).1);
        assert!(!empty.on_outcome("b", &config, Outcome::Success, UnixMillis(7)).1);
        assert_eq!(empty, Slot::default());
        assert_eq!(Slot::decode(b""), Some(Slot::default()));
        assert_eq!(Slot::decode(&[1, 0, 0, 0, 9]), None);
        let mut bytes = slot.encode();
        bytes.push(0);
        assert_eq!(Slot::decode(&bytes), None, "trailing bytes");
    }

    fn t(ms: u64) -> UnixMillis {
        UnixMillis(ms)
    }

    #[test]
    fn a_slot_reenables_only_a_disabling_the_collector_had_seen() {
        let config = EscalationConfig { review_at: 1, disable_at: 2 };
        let through = |s: &Slot| Slot::decode(&s.encode()).unwrap();
        let mut slot = Slot::default();
        let err = Outcome::AgentError;
        assert_eq!(slot.on_outcome("a", &config, err, t(100)).0.effect(), Effect::RequireApproval);
        assert_eq!(slot.disabled_at("a"), None);
        assert!(!slot.reenable("a", t(1_000)), "not disabled: nothing to re-enable");
        slot.on_outcome("a", &config, err, t(200));
        slot = through(&slot);
        assert_eq!(slot.disabled_at("a"), Some(t(200)));
        // Further errors and a success keep the time it was disabled at.
        slot.on_outcome("a", &config, err, t(300));
        slot.on_outcome("a", &config, Outcome::Success, t(400));
        slot = through(&slot);
        assert_eq!(slot.standing("a", &config), Standing::Disabled { consecutive_errors: 0 });
        assert_eq!(slot.disabled_at("a"), Some(t(200)));
        // The collector last listed it before it was disabled: this disabling is not the one
        // an operator re-enabled.
        assert!(!slot.reenable("a", t(199)));
        assert_eq!(slot.standing("a", &config).effect(), Effect::Deny);
        // Listed at or after: re-enabled, count cleared, as the sidecar's re-enable.
        slot.on_outcome("b", &config, err, t(10));
        assert!(slot.reenable("a", t(200)));
        slot = through(&slot);
        assert_eq!(slot.standing("a", &config), Standing::Normal { consecutive_errors: 0 });
        assert_eq!(slot.standing("b", &config), Standing::Review { consecutive_errors: 1 });
        assert!(!slot.reenable("a", t(5_000)), "once");
        // Failing again after the re-enable disables it anew, at the new time.
        slot.on_outcome("a", &config, err, t(600));
        slot.on_outcome("a", &config, err, t(700));
        assert_eq!(slot.disabled_at("a"), Some(t(700)));
        assert!(!slot.reenable("a", t(650)));
        // A slot written before the time was kept (disabled byte 1) re-enables on any read.
        let mut w = crate::slot::Writer::with_capacity(32);
        w.count(1);
        w.str("old");
        w.u32(5);
        w.u8(1);
        let mut old = Slot::decode(&w.into_bytes()).unwrap();
        assert_eq!(old.standing("old", &config).effect(), Effect::Deny);
        assert_eq!(old.disabled_at("old"), Some(t(0)));
        assert!(old.reenable("old", t(1)));
        assert_eq!(old, Slot::default());
    }

    #[test]
    fn a_full_slot_counts_no_new_agent() {
        let config = EscalationConfig { review_at: 1, disable_at: 2 };
        let mut slot = Slot::default();
        for i in 0..Slot::CAPACITY {
            assert!(slot.on_outcome(&format!("a{i}"), &config, Outcome::AgentError, t(0)).1);
        }
        let late = slot.on_outcome("late", &config, Outcome::AgentError, t(0));
        assert_eq!(late, (Standing::Normal { consecutive_errors: 0 }, false));
        assert_eq!(
            slot.on_outcome("a0", &config, Outcome::AgentError, t(0)).0,
            Standing::Disabled { consecutive_errors: 2 }
        );
        assert_eq!(Slot::index("bot"), Slot::index("bot"));
        assert!((0..1000).all(|i| Slot::index(&format!("a{i}")) < SLOTS));
    }

    #[test]
    fn config_decodes_and_checks_order() {
        let node = crate::doc::parse("{review_at: 6, disable_at: 4}").unwrap();
        let mut cx = Cx::new();
        let c = EscalationConfig::decode(&mut cx, &Field::root(&node));
        assert_eq!(c, EscalationConfig { review_at: 6, disable_at: 4 });
        assert!(cx.finish(()).is_err());
        let e = Escalation::new(EscalationConfig { review_at: 1, disable_at: 2 });
        assert_eq!(e.on_error("a").effect(), Effect::RequireApproval);
        assert_eq!(
            e.on_error("a").explanation().as_deref(),
            Some(
                "the agent is disabled after 2 consecutive errors until an operator re-enables it"
            )
        );
    }
}
