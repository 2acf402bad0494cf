//! `tollgate-core`: Tollgate's decision and metering engine.
//!
//! Pure logic shared by the sidecar proxy, the forward proxy and the Envoy proxy-wasm filter, so
//! that a decision is identical wherever it is made. It performs no I/O, reads no clock (time is a
//! parameter, [`time::UnixMillis`]), spawns nothing, logs nothing and builds for `wasm32-wasip1`.

pub mod approval;
pub mod attribution;
pub mod autonomy;
pub mod budget;
pub mod doc;
pub mod endpoints;
pub mod engine;
pub mod framing;
pub mod guardrails;
pub mod head;
pub mod inspect;
pub mod lifecycle;
pub mod metering;
pub mod metrics;
pub mod money;
pub mod oversight;
pub mod policy;
pub mod pricing;
pub mod record;
pub mod refusal;
pub mod reservation;
pub mod risk;
pub mod slot;
pub mod time;
pub mod usage;
