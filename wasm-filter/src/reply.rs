//! The answers the filter gives on its own: the same refusals as the sidecar's, from
//! `tollgate_core::refusal` (statuses, error shapes, decision headers).

pub use tollgate_core::refusal::{Class, Denial, Reply, Shape};
