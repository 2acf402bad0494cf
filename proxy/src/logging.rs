//! Logging with `tracing`: human-readable by default, JSON lines with `--log-json`. The level
//! comes from `RUST_LOG` (default `info`). Request logs carry ids, decisions and reasons, never
//! header values such as `Authorization` or API keys.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}
