//! [`HoldTable`]: open reservations and the lapse marks of those the expiry sweep took, in
//! memory. The in-process store keeps one per shard; the Envoy filter one per VM.

use std::collections::{BTreeMap, BTreeSet};

use super::store::{Hold, Taken};
use crate::time::UnixMillis;

/// Open holds by request id, ordered by expiry for the sweep, and lapse marks.
#[derive(Debug, Default)]
pub struct HoldTable {
    holds: BTreeMap<String, Hold>,
    /// `(expires_at, request_id)` of every entry in `holds`.
    expiry: BTreeSet<(UnixMillis, String)>,
    /// Lapse marks: request id → kept until.
    lapsed: BTreeMap<String, UnixMillis>,
}

impl HoldTable {
    /// How many holds are open.
    pub fn open(&self) -> usize {
        self.holds.len()
    }

    /// How many lapse marks are kept.
    pub fn lapse_marks(&self) -> usize {
        self.lapsed.len()
    }

    /// [`super::Store::put_hold`].
    pub fn put(&mut self, hold: &Hold) -> bool {
        if self.holds.contains_key(&hold.request_id) {
            return false;
        }
        self.lapsed.remove(&hold.request_id);
        self.expiry.insert((hold.expires_at, hold.request_id.clone()));
        self.holds.insert(hold.request_id.clone(), hold.clone());
        true
    }

    /// [`super::Store::take_hold`].
    pub fn take(&mut self, request_id: &str) -> Taken {
        if let Some(hold) = self.holds.remove(request_id) {
            self.expiry.remove(&(hold.expires_at, hold.request_id.clone()));
            return Taken::Open(hold);
        }
        match self.lapsed.remove(request_id) {
            Some(_) => Taken::Lapsed,
            None => Taken::Absent,
        }
    }

    /// Moves holds expired at `now` into `taken` (until it holds `max`), earliest first,
    /// leaving a lapse mark kept until `lapse_until` for each ([`super::Store::take_expired_holds`]).
    pub fn take_expired(
        &mut self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
        taken: &mut Vec<Hold>,
    ) {
        while taken.len() < max {
            match self.expiry.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            let Some((_, request_id)) = self.expiry.pop_first() else { break };
            if let Some(hold) = self.holds.remove(&request_id) {
                self.lapsed.insert(request_id, lapse_until);
                taken.push(hold);
            }
        }
    }

    /// Drops lapse marks kept until `now` or earlier; returns how many.
    pub fn prune(&mut self, now: UnixMillis) -> usize {
        let before = self.lapsed.len();
        self.lapsed.retain(|_, until| *until > now);
        before - self.lapsed.len()
    }
}
