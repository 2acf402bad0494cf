//! The counter store behind budgets: the few atomic operations the accounting needs, and the
//! atomicity each backend must provide.
//!
//! The same [`Budgets`](super::Budgets) engine runs on an in-process map
//! ([`MemoryStore`](super::MemoryStore)), on Envoy's shared data (get + compare-and-swap on
//! bytes, one key per counter) and on Redis (each method one Lua script or one native command). So the trait is
//! deliberately small: signed integer counters keyed by string, an "add unless it would pass
//! the limit" step for reservations, a set-once marker for idempotency, and a table of open
//! reservations ("holds") with their expiry so that money held by a crashed or forgotten request
//! comes back. Settling takes the hold, which is what makes it idempotent: nothing per request
//! stays in the store after it settles (only a hold that lapsed leaves a mark, so that its late
//! settlement is still charged once).
//!
//! This module decides nothing about budgets and never reads a clock: every expiry is an
//! instant passed in by the caller. A backend may drop a key or hold at any time after its
//! `expires_at` (Redis `PEXPIREAT`); before that it must keep it.

use crate::time::UnixMillis;

/// The result of [`Store::add_if_within`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    /// The delta was added; `total` is the counter's new value.
    Applied { total: i64 },
    /// Adding the delta would have passed the limit, so the counter was left at `current`.
    Refused { current: i64 },
}

/// Why a store operation could not be carried out. The counters are unchanged by a failed call
/// unless the backend documents otherwise.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or answered with an error (Redis down, host call
    /// failed).
    #[error("budget store unavailable: {reason}")]
    Unavailable { reason: String },
    /// A stored value could not be decoded (bytes written by another version, say).
    #[error("budget store holds a malformed value under `{key}`")]
    Corrupt { key: String },
    /// A compare-and-swap backend lost the race too many times in a row.
    #[error("budget store key `{key}` still contended after {attempts} attempts")]
    Contended { key: String, attempts: u32 },
    /// The store serves this counter from a share it holds locally (a lease of a budget kept
    /// elsewhere), and the share cannot cover `amount`: nothing was changed. The owner fetches
    /// more from its backend ([`Refill`]) and the caller tries again; the lifecycle hands this
    /// back as [`Admission::Short`](crate::lifecycle::Admission::Short) so that the wait
    /// happens outside the decision.
    #[error("budget store must refill `{}` before it can add {}", .0.key, .0.amount)]
    Short(Box<Refill>),
}

/// What a store that serves counters from a local share needs from its backend before an
/// [`Store::add_if_within`] can be answered: at least `amount` more on `key` under `limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refill {
    pub key: String,
    pub amount: i64,
    pub limit: i64,
    /// The counter's expiry, as passed to `add_if_within`.
    pub expires_at: UnixMillis,
}

/// An open reservation: the request that holds it, when it lapses, and how much it holds on
/// which counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub request_id: String,
    /// After this instant the hold may be taken by [`Store::take_expired_holds`] and its amounts
    /// given back.
    pub expires_at: UnixMillis,
    pub entries: Vec<HoldEntry>,
}

/// One counter a [`Hold`] has added to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldEntry {
    /// The counter key (a budget's committed counter).
    pub key: String,
    /// The amount added to it, in the counter's unit (nano-USD for budgets).
    pub amount: i64,
}

/// What [`Store::take_hold`] found under a request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Taken {
    /// The open reservation, now removed: the caller alone settles or gives back its amounts.
    Open(Hold),
    /// The reservation lapsed: [`Store::take_expired_holds`] took it and its amounts were given
    /// back. The lapse mark is now removed, so of concurrent callers exactly one sees it.
    Lapsed,
    /// Neither: already settled or released, or never reserved.
    Absent,
}

/// Atomic counters, set-once markers and open reservations.
///
/// Counters, markers and holds are three namespaces; counters and markers may share one
/// keyspace (the engine never uses the same key for both). A missing counter reads as 0.
/// Every method takes `&self`: a store is shared by every request (and, for
/// [`MemoryStore`](super::MemoryStore), every thread). Arithmetic saturates at the `i64` bounds.
///
/// Every method must be linearizable on its own: it behaves as if it ran alone at one instant
/// between its call and its return. Nothing is promised *across* calls; the engine is built so
/// that it needs no multi-key transaction.
pub trait Store {
    /// The counter's value, 0 if absent.
    fn get(&self, key: &str) -> Result<i64, StoreError>;

    /// Adds `delta` (which may be negative) to the counter, creating it at 0 first if absent, and
    /// returns the new value. The counter's expiry becomes the later of its current expiry and
    /// `expires_at`.
    ///
    /// Atomicity: read-modify-write of one key (Redis `INCRBY`; shared data: CAS loop).
    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError>;

    /// Adds `delta` only if `current + delta <= limit`; otherwise changes nothing and reports
    /// the current value. Expiry as in [`Store::add`] (only when applied).
    ///
    /// Atomicity: the comparison and the addition are one step. Two concurrent calls must never
    /// both be applied if together they pass the limit; this is what makes N concurrent
    /// reservations unable to overspend (Redis: one Lua script; shared data: get, compare, then
    /// CAS with the version read, retrying on a version mismatch).
    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError>;

    /// Creates the marker `key` if it does not exist and returns `true`; returns `false` and
    /// changes nothing if it exists. Used to make settling idempotent by request id.
    ///
    /// Atomicity: of two concurrent calls on one key exactly one returns `true` (Redis
    /// `SET key 1 NX PXAT`; shared data: CAS against "absent").
    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError>;

    /// Records an open reservation under its request id. Returns `false` and changes nothing if
    /// that request id already holds one. A lapse mark of the same request id (see
    /// [`Store::take_expired_holds`]) is dropped: the hold replaces it.
    ///
    /// Atomicity: insert-if-absent on the request id, and the hold becomes visible to
    /// [`Store::take_expired_holds`] in the same step (Redis: `HSETNX` + `ZADD` in one script).
    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError>;

    /// Removes and returns the open reservation of `request_id`, or removes its lapse mark.
    ///
    /// Atomicity: of concurrent `take_hold` / `take_expired_holds` calls, exactly one obtains a
    /// given hold, and exactly one `take_hold` sees a given lapse mark.
    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError>;

    /// Removes and returns up to `max` holds whose `expires_at <= now`, earliest first, leaving
    /// for each a lapse mark kept until `lapse_until` (the next [`Store::take_hold`] of that
    /// request id reports [`Taken::Lapsed`]).
    ///
    /// Atomicity: as [`Store::take_hold`], per hold; the hold becomes a lapse mark in one step
    /// (Redis: one script), so a settlement racing the sweep finds one or the other.
    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError>;

    /// Drops counters, markers and lapse marks whose `expires_at <= now` and returns how many
    /// it dropped.
    /// Backends with native expiry (Redis) do nothing here and return 0.
    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError>;
}

impl<S: Store + ?Sized> Store for &S {
    fn get(&self, key: &str) -> Result<i64, StoreError> {
        (**self).get(key)
    }
    fn add(&self, key: &str, delta: i64, expires_at: UnixMillis) -> Result<i64, StoreError> {
        (**self).add(key, delta, expires_at)
    }
    fn add_if_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        expires_at: UnixMillis,
    ) -> Result<AddOutcome, StoreError> {
        (**self).add_if_within(key, delta, limit, expires_at)
    }
    fn insert_if_absent(&self, key: &str, expires_at: UnixMillis) -> Result<bool, StoreError> {
        (**self).insert_if_absent(key, expires_at)
    }
    fn put_hold(&self, hold: &Hold) -> Result<bool, StoreError> {
        (**self).put_hold(hold)
    }
    fn take_hold(&self, request_id: &str) -> Result<Taken, StoreError> {
        (**self).take_hold(request_id)
    }
    fn take_expired_holds(
        &self,
        now: UnixMillis,
        max: usize,
        lapse_until: UnixMillis,
    ) -> Result<Vec<Hold>, StoreError> {
        (**self).take_expired_holds(now, max, lapse_until)
    }
    fn prune(&self, now: UnixMillis) -> Result<usize, StoreError> {
        (**self).prune(now)
    }
}
