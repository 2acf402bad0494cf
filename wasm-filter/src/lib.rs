//! `tollgate-wasm`: Tollgate as an Envoy proxy-wasm HTTP filter, built from the same
//! `tollgate-core` as the sidecar so that a decision is identical in both places.
//!
//! The crate is split like Kuadrant's wasm-shim: host-agnostic adapter logic that is tested
//! natively ([`settings`] compiles the plugin configuration, [`exchange`] runs one request's
//! lifecycle, [`shared`] keeps budget and rate-limit counters in Envoy's shared data with
//! compare-and-swap, [`reply`] renders refusals in the provider's error shape, [`metrics`] names
//! the Envoy stats), and a thin proxy-wasm glue (`envoy`, compiled for `wasm32` only, since its
//! host imports do not link natively).
//!
//! Nothing here panics on input: `unwrap`, `expect` and `panic!` are denied by lint outside
//! tests, because a panic kills the worker's VM inside Envoy. Errors follow the configured
//! fail-open / fail-closed policy.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
// A refusal is the cold path and is rendered once; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

pub mod exchange;
pub mod lease;
pub mod metrics;
pub mod reply;
pub mod settings;
pub mod shared;

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // `proxy_wasm::main!` defines the `#[no_mangle]` entry point Envoy calls.
mod envoy;
