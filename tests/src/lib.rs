//! Real-socket end-to-end support for Tollgate.
//!
//! Holds the mock upstream ([`mock::MockUpstream`]) that plays OpenAI, Anthropic and an MCP/REST
//! tool server on loopback, for the end-to-end and load tests. The mock never depends on
//! `tollgate-core` or the proxy: it is a neutral peer that only speaks the providers' wire
//! formats, so a bug in the proxy's understanding of those formats cannot hide behind shared
//! code. The [`harness`] is the one place that knows the proxy: it starts it next to the mock;
//! [`process`] runs the `tollgate` binary itself, for signals, exit codes and restarts.

pub mod decisions;
pub mod exposition;
pub mod forward;
pub mod harness;
pub mod metering;
pub mod mock;
pub mod process;
pub mod sdk;
