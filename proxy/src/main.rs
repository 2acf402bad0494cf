//! `tollgate`: the command line. `run` serves; `check` validates a config; `explain` prints the
//! decision for a described request; `ca init` creates the HTTPS_PROXY mode's CA; `approvals`
//! lists, approves and denies pending approvals; `pricing import` converts LiteLLM's price file to
//! a rate card.

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
    /// Monthly (or daily) invoices from the usage ledger.
    Invoice {
        /// `YYYY-MM` (a month) or `YYYY-MM-DD` (a day).
        #[arg(long)]
        period: String,
        #[arg(long, default_value = "cost_center", value_parser = ["cost_center", "project", "agent"])]
        group_by: String,
        /// `focus`: FinOps FOCUS 1.2 cost-and-usage rows (CSV; `--group-by` does not apply).
        #[arg(long, default_value = "json", value_parser = ["json", "csv", "focus"])]
        format: String,
        /// Configuration (for budgets, shared costs and the data directory).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "TOLLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Tollgate's certificate authority for HTTPS_PROXY mode.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Pending approvals on a running proxy: list, approve, deny (through its admin API).
    Approvals {
        #[command(subcommand)]
        command: tollgate::approvals_cli::ApprovalsCommand,
        /// The admin API (default: the config's admin.listen).
        #[arg(long, global = true, env = "TOLLGATE_ADMIN_URL")]
        admin: Option<String>,
        /// Configuration (for admin.listen and admin.token_env).
        #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Rate cards: `import` converts LiteLLM's price file to a Tollgate rate card.
    Pricing {
        #[command(subcommand)]
        command: tollgate::pricing_cli::PricingCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA (`ca.pem`, and `ca-key.pem` with mode 0600) and print how to make clients
    /// trust it.
    Init {
        /// Directory for the two files (created if missing).
        #[arg(long, default_value = "tollgate-ca")]
        dir: PathBuf,
        /// Replace an existing CA (clients trusting the old one will stop trusting Tollgate).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the ledger (checksums, records, chain) and the audit log's hash chain, and compare
    /// both with the checkpoint in the data directory and with --head. Exit 0 if everything
    /// verifies, 1 if tampered or corrupt (first bad segment:line named), 2 if there is nothing to
    /// verify (no such directory, no Tollgate data in it) or on an error, 3 for a torn last line
    /// after a crash, 4 if intact as far as it could be checked (records from before chaining,
    /// keyed links without the key).
    Verify {
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "TOLLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// A head published by the proxy, kept elsewhere: a file, the admin API's URL
        /// (`http://127.0.0.1:9090/admin/ledger/head`, with the admin token) or the JSON itself.
        #[arg(long)]
        head: Option<String>,
        /// The ledger's HMAC key, from a file (default: the config's ledger.hmac_key_file).
        #[arg(long, conflicts_with = "hmac_key_env")]
        hmac_key_file: Option<PathBuf>,
        /// The ledger's HMAC key, from this environment variable (default: the config's
        /// ledger.hmac_key_env).
        #[arg(long)]
        hmac_key_env: Option<String>,
    },
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
        Command::Invoice { period, group_by, format, config, data_dir } => {
            let config = match load(config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = tollgate_core::time::ReportPeriod::parse(&period) {
                eprintln!("--period: {e}");
                return ExitCode::from(2);
            }
            let dir = data_dir.unwrap_or(config.data_dir.clone());
            if let Err(e) = tollgate::ledger::require_data(&dir) {
                eprintln!("tollgate invoice: {e:#}");
                return ExitCode::FAILURE;
            }
            let read = tollgate::ledger::read_records(&dir)
                .and_then(|r| Ok((r, tollgate::ledger::read_retired(&dir)?)));
            let (records, retired) = match read {
                Ok(read) => read,
                Err(e) => {
                    eprintln!("reading the ledger in {}: {e:#}", dir.display());
                    return ExitCode::FAILURE;
                }
            };
            if format == "focus" {
                let rates = config.engine.rates();
                match tollgate::focus::from_ledger(&records, &retired, &period, rates) {
                    Ok(csv) => print!("{csv}"),
                    Err(e) => {
                        eprintln!("--period: {e}");
                        return ExitCode::from(2);
                    }
                }
                return ExitCode::SUCCESS;
            }
            let group = tollgate::invoice::GroupBy::parse(&group_by)
                .unwrap_or(tollgate::invoice::GroupBy::CostCenter);
            let invoices = tollgate::invoice::from_ledger(
                &records,
                &retired,
                &period,
                group,
                &config.shared_costs,
                config.engine.policy(),
            );
            if format == "csv" {
                print!("{}", tollgate::invoice::to_csv(&invoices));
            } else {
                println!("{}", serde_json::to_string_pretty(&invoices).unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Command::Ca { command: CaCommand::Init { dir, force } } => {
            match tollgate::ca::init(&dir, force) {
                Ok((cert, key)) => {
                    print!("{}", tollgate::ca::instructions(&cert, &key));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tollgate ca init: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Approvals { command, admin, config } => {
            let config = match load(config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let base = admin.unwrap_or_else(|| format!("http://{}", config.admin_listen));
            let token = std::env::var(&config.admin_token_env).ok().filter(|t| !t.is_empty());
            tollgate::approvals_cli::run(tollgate::approvals_cli::Target { base, token }, command)
        }
        Command::Pricing { command } => tollgate::pricing_cli::run(command),
        Command::Audit {
            command: AuditCommand::Verify { config, data_dir, head, hmac_key_file, hmac_key_env },
        } => {
            // The config gives the data directory, the key and the admin token's variable,
            // unless flags do.
            let config = match (&data_dir, &config) {
                (Some(_), None) => None,
                (_, config) => match load(config.as_deref()) {
                    Ok(config) => Some(config),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let key = match (hmac_key_file, hmac_key_env) {
                (Some(file), _) => Some(tollgate::store::chain::KeySource::File(file)),
                (None, Some(env)) => Some(tollgate::store::chain::KeySource::Env(env)),
                (None, None) => config.as_ref().and_then(|c| c.ledger_hmac_key.clone()),
            };
            let Some(data_dir) = data_dir.or_else(|| config.as_ref().map(|c| c.data_dir.clone()))
            else {
                return ExitCode::from(2);
            };
            tollgate::verify::run(tollgate::verify::Args {
                data_dir,
                key,
                head,
                token_env: config
                    .map_or_else(|| "TOLLGATE_ADMIN_TOKEN".to_string(), |c| c.admin_token_env),
            })
        }
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Config::load(path),
        None => Config::from_str(tollgate::config::DEFAULT_YAML)
            .map_err(|e| anyhow::anyhow!("embedded default config: {e}")),
    }
}
