//! The wall clock, read here and passed to the core, which never reads a clock itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_core::time::UnixMillis;

/// Now, in milliseconds since the Unix epoch.
pub fn now() -> UnixMillis {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    UnixMillis(since.as_millis() as u64)
}
