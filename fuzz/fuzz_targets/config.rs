//! The configuration loader (the YAML subset reader and every section's decoder): any text. It
//! must never panic; a refusal names at least one field with its line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::engine::Engine;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errors) = Engine::from_document(text) {
        assert!(!errors.0.is_empty(), "a refusal without an error");
    }
});
