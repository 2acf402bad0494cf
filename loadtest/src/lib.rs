//! `tollgate-loadtest`: measures what Tollgate adds to a call, against a direct call and
//! against Envoy, on real sockets.
//!
//! - [`scenario`]: scenario files (what to send).
//! - [`schedule`]: when each open-loop request is due, and the mix order.
//! - [`load`]: the generator (open loop at a constant rate, closed loop for saturation).
//! - [`sse`], [`stats`]: event boundaries, HDR histograms, error counts.
//! - [`procfs`]: CPU time and peak RSS of the proxy process.
//! - [`disk`]: the proxy's data directory during a run (the storage soak).
//! - [`target`]: starting the mock upstream, Tollgate and Envoy, pinned to CPUs.
//! - [`floor`]: the bare hyper pass-through (`hyper-floor`), run by this binary itself.
//! - [`compare`], [`report`]: interleaved rounds and the markdown table.
//! - [`soak`]: one target for millions of requests, RSS and throughput over time.

pub mod compare;
pub mod disk;
pub mod floor;
pub mod load;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod soak;
pub mod sse;
pub mod stats;
pub mod target;
