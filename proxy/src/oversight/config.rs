//! The `oversight:` section (see `tollgate_core::oversight`, where it is decoded for the sidecar
//! and the Envoy filter alike).

pub use tollgate_core::oversight::OversightConfig;
