//! `tollgate`: the command line. `run` serves; `check` validates a config; `explain` prints the
//! decision for a described request.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tollgate::config::Config;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "The hot-path proxy for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default config unless --config is given).
    Run {
        /// YAML or JSON configuration file.
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Proxy listen address (overrides the config's `listen`).
        #[arg(long, env = "TOLLGATE_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Admin listen address (overrides the config's `admin.listen`).
        #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
        admin_listen: Option<std::net::SocketAddr>,
        /// Data directory for the ledger (overrides the config's `data_dir`).
        #[arg(long, env = "TOLLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Log as JSON lines.
        #[arg(long, env = "TOLLGATE_LOG_JSON")]
        log_json: bool,
    },
    /// Validate a configuration file; prints every error with its field path and line.
    Check {
        /// The file to check (the embedded default when omitted).
        file: Option<PathBuf>,
    },
    /// Print the decision for a request, described by flags or as JSON.
    Explain(tollgate::explain::ExplainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, listen, admin_listen, data_dir, log_json } => {
            tollgate::logging::init(log_json);
            let mut config = match load(config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match config.pin_from_env(std::env::vars()) {
                Ok(pinned) if !pinned.is_empty() => {
                    tracing::info!(headers = ?pinned, "attribution pinned from the environment");
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("{e:#}");
                    return ExitCode::from(2);
                }
            }
            let overrides = tollgate::app::Overrides { listen, admin_listen, data_dir };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tollgate::app::run(config, overrides)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "tollgate stopped");
                    eprintln!("tollgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { file } => match load(file.as_deref()) {
            Ok(config) => {
                println!(
                    "OK: {} route(s), policy version {}, {} rule(s)",
                    config.routes.len(),
                    config.engine.policy().version(),
                    config.engine.policy().rules().len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Explain(args) => tollgate::explain::run(args),
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Config::load(path),
        None => Config::from_str(tollgate::config::DEFAULT_YAML)
            .map_err(|e| anyhow::anyhow!("embedded default config: {e}")),
    }
}
