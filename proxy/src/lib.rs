//! The `tollgate` proxy: hyper + tokio + rustls around `tollgate-core`.
//!
//! The binary (`main.rs`) is a thin command line over this library, so that the end-to-end tests
//! start the same server on `127.0.0.1:0` with [`app::start`].

// A `Denial` is returned once per refused request and rendered at once; boxing it would only
// add an allocation on the deny path.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod admission;
pub mod alerts;
pub mod app;
pub mod approvals_cli;
pub mod audit;
pub mod body;
pub mod ca;
pub mod clock;
pub mod config;
pub mod deny;
pub mod explain;
pub mod export;
pub mod fleet;
pub mod focus;
pub mod forward;
pub mod framing;
pub mod front;
pub mod ingest;
pub mod invoice;
pub mod ledger;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod oversight;
pub mod pipeline;
pub mod pricing_cli;
pub mod reload;
pub mod server;
pub mod state;
pub mod store;
pub mod traces;
pub mod upstream;
pub mod verify;
