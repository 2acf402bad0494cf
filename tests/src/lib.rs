//! Real-socket end-to-end support for Tollgate.
//!
//! Holds the mock upstream ([`mock::MockUpstream`]) that plays OpenAI, Anthropic and an MCP/REST
//! tool server on loopback, for the end-to-end and load tests. It never depends on
//! `tollgate-core`: it is a neutral peer that only speaks the providers' wire formats, so a
//! bug in the proxy's understanding of those formats cannot hide behind shared code.

pub mod mock;
