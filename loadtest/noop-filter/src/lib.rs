//! A proxy-wasm HTTP filter that does nothing: every hook answers `Continue` at once. Envoy
//! still calls each hook across the VM boundary (request and response headers and body chunks,
//! the log, the end of the stream), so `tollgate-load compare --targets envoy,envoy-noop-wasm`
//! measures what any wasm filter costs before it does any work: the floor the Tollgate filter
//! is measured against (`loadtest/README.md`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // `proxy_wasm::main!` defines the `#[no_mangle]` entry point Envoy calls.
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(super::Root)
        });
    }}
}

/// The VM's root: one [`Noop`] per HTTP stream.
pub struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }
}

/// Every hook's default: `Continue`.
pub struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
