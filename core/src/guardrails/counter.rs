//! In-memory window counters with an atomic check-and-increment, shared by the autonomy budget
//! (per agent per UTC day) and the guardrail rate limits (per agent per action per UTC hour).
//!
//! One counter set holds exactly one window (a day, an hour): when a call arrives for a later
//! window, every count of the old one is dropped, so memory never grows with time. A call that
//! names an *earlier* window than the current one (a request that read the clock just before
//! midnight and arrived just after) is counted against the current window: the conservative
//! choice, it can only make a limit trip earlier, never let more through.
//!
//! The check and the increment happen under one lock, so N threads racing against a limit of L
//! take exactly min(N, L) units. Stores shared between processes (Envoy shared data, Redis) do
//! the same with their own atomic primitive, keyed by the pure key functions of the callers
//! ([`crate::autonomy::budget_keys`], [`crate::guardrails::rate_key`]).
//!
//! Lookups of an existing subject and action borrow the `&str` and never allocate; only the
//! first use of a subject or action in a window allocates its entry. The number of subjects in
//! one window is capped: past the cap a *new* subject is refused (treated as over its limit,
//! which callers turn into require-approval or a block), never silently let through.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// The default cap on distinct subjects (agents) tracked in one window.
pub const DEFAULT_MAX_SUBJECTS: usize = 100_000;

/// The result of [`WindowCounters::take`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// One unit was taken; the counts include it.
    Taken { total: u32, action: u32 },
    /// The subject's total limit is reached; nothing was taken. `used` is the current total.
    TotalFull { used: u32, limit: u32 },
    /// The subject's limit for this action is reached; nothing was taken.
    ActionFull { used: u32, limit: u32 },
    /// Too many distinct subjects in this window; nothing was taken.
    TooManySubjects { max: usize },
}

/// Whether one more unit fits a subject that used `total` units in the window, `action` of them
/// for the action: the total limit is checked first. `Err` is the [`Take`] that refuses. Pure:
/// the rule of every store that counts these windows (this one, and the Envoy filter's shared
/// data through [`crate::autonomy::DayCounts`]).
pub fn room(
    total: u32,
    action: u32,
    total_limit: Option<u32>,
    action_limit: Option<u32>,
) -> Result<(), Take> {
    match (total_limit, action_limit) {
        (Some(limit), _) if total >= limit => Err(Take::TotalFull { used: total, limit }),
        (_, Some(limit)) if action >= limit => Err(Take::ActionFull { used: action, limit }),
        _ => Ok(()),
    }
}

#[derive(Debug, Default)]
struct Slot {
    total: u32,
    actions: HashMap<Box<str>, u32>,
}

#[derive(Debug, Default)]
struct State {
    window: u64,
    subjects: HashMap<Box<str>, Slot>,
}

/// Counts per subject and per (subject, action) for one window at a time; see the module docs.
#[derive(Debug)]
pub struct WindowCounters {
    state: Mutex<State>,
    max_subjects: usize,
}

impl Default for WindowCounters {
    fn default() -> Self {
        WindowCounters::new(DEFAULT_MAX_SUBJECTS)
    }
}

impl WindowCounters {
    /// Counters tracking at most `max_subjects` distinct subjects per window.
    pub fn new(max_subjects: usize) -> Self {
        WindowCounters { state: Mutex::new(State::default()), max_subjects }
    }

    /// Atomically takes one unit for `subject` and `action` in `window` (an index such as days
    /// since the epoch) if neither `total_limit` nor `action_limit` is reached. `None` means
    /// unlimited (the unit is still counted).
    pub fn take(
        &self,
        window: u64,
        subject: &str,
        action: &str,
        total_limit: Option<u32>,
        action_limit: Option<u32>,
    ) -> Take {
        // The state is consistent after every statement below, so a poisoned lock (a panic in
        // another thread while holding it) is safe to keep using.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if window > state.window {
            state.window = window;
            state.subjects.clear();
            state.subjects.shrink_to(self.max_subjects.min(1024));
        }
        if !state.subjects.contains_key(subject) {
            if state.subjects.len() >= self.max_subjects {
                return Take::TooManySubjects { max: self.max_subjects };
            }
            state.subjects.insert(subject.into(), Slot::default());
        }
        let Some(slot) = state.subjects.get_mut(subject) else {
            return Take::TooManySubjects { max: self.max_subjects };
        };
        let used = slot.actions.get(action).copied().unwrap_or(0);
        if let Err(full) = room(slot.total, used, total_limit, action_limit) {
            return full;
        }
        slot.total = slot.total.saturating_add(1);
        let action_count = match slot.actions.get_mut(action) {
            Some(n) => {
                *n = n.saturating_add(1);
                *n
            }
            None => {
                slot.actions.insert(action.into(), 1);
                1
            }
        };
        Take::Taken { total: slot.total, action: action_count }
    }

    /// The current counts of `subject` and (`subject`, `action`) in `window` (zero for another
    /// window). For dashboards and tests; decisions use [`WindowCounters::take`].
    pub fn get(&self, window: u64, subject: &str, action: &str) -> (u32, u32) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.window != window {
            return (0, 0);
        }
        match state.subjects.get(subject) {
            Some(slot) => (slot.total, slot.actions.get(action).copied().unwrap_or(0)),
            None => (0, 0),
        }
    }

    /// The number of subjects tracked in the current window.
    pub fn subjects(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).subjects.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_until_the_tighter_limit() {
        let c = WindowCounters::default();
        assert_eq!(c.take(1, "a", "x", Some(3), Some(2)), Take::Taken { total: 1, action: 1 });
        assert_eq!(c.take(1, "a", "x", Some(3), Some(2)), Take::Taken { total: 2, action: 2 });
        assert_eq!(c.take(1, "a", "x", Some(3), Some(2)), Take::ActionFull { used: 2, limit: 2 });
        assert_eq!(c.take(1, "a", "y", Some(3), Some(2)), Take::Taken { total: 3, action: 1 });
        assert_eq!(c.take(1, "a", "z", Some(3), None), Take::TotalFull { used: 3, limit: 3 });
        assert_eq!(c.take(1, "b", "x", Some(3), Some(2)), Take::Taken { total: 1, action: 1 });
        assert_eq!(c.get(1, "a", "x"), (3, 2));
    }

    #[test]
    fn a_new_window_starts_from_zero_and_drops_the_old_one() {
        let c = WindowCounters::default();
        for _ in 0..3 {
            c.take(10, "a", "x", None, None);
        }
        c.take(10, "b", "x", None, None);
        assert_eq!(c.subjects(), 2);
        assert_eq!(c.take(11, "a", "x", None, None), Take::Taken { total: 1, action: 1 });
        assert_eq!(c.subjects(), 1);
        assert_eq!(c.get(10, "a", "x"), (0, 0));
    }

    #[test]
    fn an_earlier_window_counts_against_the_current_one() {
        let c = WindowCounters::default();
        c.take(11, "a", "x", Some(1), None);
        assert_eq!(c.take(10, "a", "x", Some(1), None), Take::TotalFull { used: 1, limit: 1 });
    }

    #[test]
    fn new_subjects_past_the_cap_are_refused() {
        let c = WindowCounters::new(2);
        assert!(matches!(c.take(1, "a", "x", None, None), Take::Taken { .. }));
        assert!(matches!(c.take(1, "b", "x", None, None), Take::Taken { .. }));
        assert_eq!(c.take(1, "c", "x", None, None), Take::TooManySubjects { max: 2 });
        assert!(matches!(c.take(1, "a", "x", None, None), Take::Taken { .. }));
        assert!(matches!(c.take(2, "c", "x", None, None), Take::Taken { .. }));
    }

    proptest::proptest! {
        #[test]
        fn counts_never_pass_their_limits(
            ops in proptest::collection::vec((0u8..3, 0u8..3), 1..200),
            total in 0u32..20,
            per_action in 0u32..8,
        ) {
            let c = WindowCounters::default();
            let mut taken = std::collections::HashMap::<(u8, u8), u32>::new();
            for (s, a) in ops {
                let (subject, action) = (s.to_string(), a.to_string());
                let before = c.get(1, &subject, &action);
                match c.take(1, &subject, &action, Some(total), Some(per_action)) {
                    Take::Taken { total: t, action: n } => {
                        proptest::prop_assert_eq!((t, n), (before.0 + 1, before.1 + 1));
                        *taken.entry((s, a)).or_default() += 1;
                    }
                    _ => proptest::prop_assert!(before.0 >= total || before.1 >= per_action),
                }
            }
            for s in 0u8..3 {
                let sum: u32 = (0u8..3).map(|a| taken.get(&(s, a)).copied().unwrap_or(0)).sum();
                proptest::prop_assert!(sum <= total);
                for a in 0u8..3 {
                    proptest::prop_assert!(taken.get(&(s, a)).copied().unwrap_or(0) <= per_action);
                }
            }
        }
    }
}
