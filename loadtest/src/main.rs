//! `tollgate-load`: `compare` runs one scenario against direct, Tollgate and Envoy in
//! interleaved rounds and prints a markdown table; `run` loads one URL and prints its numbers.
//! Builds nothing: it uses the release binaries next to itself (see loadtest/README.md).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use tollgate_loadtest::compare::{self, Settings};
use tollgate_loadtest::load::{self, Mode, Plan};
use tollgate_loadtest::report::{self, Measured, Row};
use tollgate_loadtest::scenario::Scenario;
use tollgate_loadtest::soak;
use tollgate_loadtest::stats::Summary;
use tollgate_loadtest::target::{self, Kind, Paths};

/// Longest run the command line accepts, so that every run stops by itself.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Longest soak the command line accepts.
const MAX_SOAK: Duration = Duration::from_secs(2 * 3600);

#[derive(Parser)]
#[command(name = "tollgate-load", about = "Load tests for Tollgate")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare direct, Tollgate and Envoy on one scenario (interleaved rounds, markdown table).
    Compare {
        #[command(flatten)]
        load: LoadArgs,
        /// Rounds per target.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Warm-up per target before the first round.
        #[arg(long, default_value = "1s")]
        warmup: String,
        /// Comma-separated targets: direct, hyper-floor, tollgate, tollgate-https-proxy, envoy,
        /// envoy-tollgate (and the others in loadtest/README.md).
        #[arg(long, default_value = "direct,tollgate,tollgate-https-proxy,envoy,envoy-tollgate")]
        targets: String,
        #[command(flatten)]
        setup: Setup,
        /// Another build's `target/release` (with `tollgate`), run as the `tollgate-baseline` row
        /// beside `tollgate` in the same interleaved rounds: before/after in one run.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Another build's filter module, run as the `envoy-tollgate-baseline` row.
        #[arg(long)]
        baseline_wasm: Option<PathBuf>,
    },
    /// One target for millions of requests: samples the proxy's RSS and req/s after every
    /// slice (`--duration` each) and prints the samples, the RSS slope and the throughput change.
    Soak {
        #[command(flatten)]
        load: LoadArgs,
        /// The target (one with a process): tollgate, tollgate-https-proxy, envoy-tollgate, ...
        #[arg(long, default_value = "tollgate")]
        target: String,
        /// Stop after this many requests in all...
        #[arg(long, default_value_t = 10_000_000)]
        requests: u64,
        /// ...or after this long, whichever comes first (at most 2h).
        #[arg(long, default_value = "30m")]
        max_time: String,
        /// The baseline is the first sample after this many requests (the process warm).
        #[arg(long, default_value_t = 1_000_000)]
        warm: u64,
        #[command(flatten)]
        setup: Setup,
    },
    /// Load one base URL (e.g. a running proxy) and print its numbers.
    Run {
        #[command(flatten)]
        load: LoadArgs,
        /// Base URL, e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        /// The data directory of the proxy under load: reports the bytes its ledger and audit
        /// log wrote per request, and its size on disk over the run (the storage soak).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The bare hyper pass-through that `compare` runs as its `hyper-floor` row: a hyper
    /// server forwarding every request to `--upstream` through hyper-util's pooled client.
    HyperFloor {
        /// Address to listen on (port 0: any; the address is printed).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The upstream's address (the mock).
        #[arg(long)]
        upstream: std::net::SocketAddr,
    },
}

/// Where the programs under test are and which CPUs they run on.
#[derive(Args)]
struct Setup {
    /// Directory with the release `tollgate` and `mock-upstream` (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Envoy binary (default: target/envoy-venv/bin/envoy).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// The filter module for `envoy-tollgate` (default:
    /// target/wasm32-wasip1/wasm/tollgate_wasm.wasm).
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// CPU for the generator and the mock upstream.
    #[arg(long, default_value_t = 0)]
    generator_cpu: usize,
    /// CPU for the proxy under test.
    #[arg(long, default_value_t = 1)]
    proxy_cpu: usize,
}

#[derive(Args)]
struct LoadArgs {
    /// Scenario file (YAML or JSON).
    #[arg(long)]
    scenario: PathBuf,
    /// Open loop: requests per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Closed loop: concurrent workers (saturation).
    #[arg(long)]
    concurrency: Option<u64>,
    /// Open loop: connections (default: the scenario's, else 16).
    #[arg(long)]
    connections: Option<u64>,
    /// Length of one round, e.g. 5s (default: the scenario's, else 5s).
    #[arg(long)]
    duration: Option<String>,
    /// Per-request timeout (default: 10s plus the scenario's longest stream).
    #[arg(long)]
    timeout: Option<String>,
    /// Most requests in one round.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Open a new connection for every request (measures connection setup: TCP, and the
    /// CONNECT + TLS handshake in HTTPS_PROXY mode). Use a modest --rate.
    #[arg(long)]
    fresh_connections: bool,
}

impl LoadArgs {
    fn connections(&self) -> load::Connections {
        if self.fresh_connections {
            load::Connections::Fresh
        } else {
            load::Connections::Reused
        }
    }
}

fn duration(text: &str, what: &str) -> anyhow::Result<Duration> {
    let ms = tollgate_core::time::parse_duration_ms(text).with_context(|| {
        format!("{what}: expected a duration such as 5s or 500ms, got {text:?}")
    })?;
    Ok(Duration::from_millis(ms))
}

fn plan(args: &LoadArgs) -> anyhow::Result<(Scenario, Plan)> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let scenario =
        Scenario::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
    let mode =
        compare::resolve_mode(args.rate, args.concurrency, args.connections, &scenario.defaults)?;
    let length = match &args.duration {
        Some(text) => duration(text, "--duration")?,
        None => Duration::from_millis(scenario.defaults.duration_ms.unwrap_or(5_000)),
    };
    anyhow::ensure!(length <= MAX_DURATION, "--duration is at most {MAX_DURATION:?}");
    let stream = Duration::from_millis(scenario.longest_stream_ms());
    let request_timeout = match &args.timeout {
        Some(text) => duration(text, "--timeout")?,
        None => Duration::from_secs(10) + stream,
    };
    let plan = Plan {
        mode,
        duration: length,
        max_requests: args.max_requests,
        request_timeout,
        grace: Duration::from_secs(2),
    };
    Ok((scenario, plan))
}

/// Pins this process (all its threads so far, and those it starts later) to `cpu`.
fn pin_self(cpu: usize) -> bool {
    Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the generator shares its CPU with the mock upstream, like wrk in our notes.
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command: Vec<String> = std::env::args().collect();
    match cli.command {
        Cmd::Compare {
            load,
            rounds,
            warmup,
            targets,
            setup: Setup { bin_dir, envoy, wasm, generator_cpu, proxy_cpu },
            baseline,
            baseline_wasm,
        } => {
            let (scenario, plan) = plan(&load)?;
            let targets = targets
                .split(',')
                .map(|k| Kind::from_key(k.trim()).with_context(|| format!("unknown target {k:?}")))
                .collect::<anyhow::Result<Vec<Kind>>>()?;
            let paths = paths(bin_dir, envoy, wasm, baseline, baseline_wasm, &scenario.name)?;
            let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
            let settings = Settings {
                cores,
                scenario,
                plan,
                rounds: rounds.max(1),
                warmup: duration(&warmup, "--warmup")?,
                targets,
                paths,
                generator_cpu,
                proxy_cpu,
                generator_pinned: pin_self(generator_cpu),
                command: shown_command(&command),
                connections: load.connections(),
            };
            let markdown = runtime()?.block_on(compare::compare(&settings))?;
            println!("{markdown}");
        }
        Cmd::Soak {
            load,
            target,
            requests,
            max_time,
            warm,
            setup: Setup { bin_dir, envoy, wasm, generator_cpu, proxy_cpu },
        } => {
            let (scenario, slice) = plan(&load)?;
            let kind = Kind::from_key(target.trim())
                .with_context(|| format!("unknown target {target:?}"))?;
            let max_time = duration(&max_time, "--max-time")?;
            anyhow::ensure!(max_time <= MAX_SOAK, "--max-time is at most {MAX_SOAK:?}");
            let paths =
                paths(bin_dir, envoy, wasm, None, None, &format!("soak-{}", scenario.name))?;
            std::fs::create_dir_all(&paths.work_dir)?;
            pin_self(generator_cpu);
            let (mock, mock_addr) = target::start_mock(&paths, generator_cpu)?;
            let running = target::launch(kind, &paths, mock_addr, proxy_cpu)
                .map_err(|reason| anyhow::anyhow!("{}: {reason}", kind.label()))?;
            let client = running.client(load.connections())?;
            let soak = soak::Soak { requests, max_time, warm, slice };
            let samples = runtime()?.block_on(soak::run(&running, &client, &scenario, &soak))?;
            drop(running);
            drop(mock);
            println!(
                "{}",
                soak::report(kind.label(), &shown_command(&command), &samples, warm, 20)
            );
        }
        Cmd::HyperFloor { listen, upstream } => {
            // Like Tollgate: tokio's multi-thread runtime, one worker per CPU it may use.
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(tollgate_loadtest::floor::serve(listen, upstream))?;
        }
        Cmd::Run { load, url, data_dir } => {
            let (scenario, plan) = plan(&load)?;
            let watch =
                data_dir.map(|dir| tollgate_loadtest::disk::watch(dir, Duration::from_secs(1)));
            let outcome = runtime()?.block_on(load::run(
                &load::client(load.connections()),
                &url,
                &scenario,
                &plan,
            ))?;
            if let Some(watch) = watch {
                // The last records reach the disk within the ledger's sync window.
                std::thread::sleep(Duration::from_secs(2));
                let samples = watch.finish();
                print!("{}", tollgate_loadtest::disk::report(&samples, outcome.recorder.ok));
            }
            let r = &outcome.recorder;
            let row = Row {
                label: url,
                result: Ok(Measured {
                    latency: Summary::of(&r.latency),
                    rps: outcome.rps(),
                    errors: r.error_count(),
                    errors_text: r.errors_text(),
                    cpu_per_request: None,
                    peak_rss: None,
                    lateness: Summary::of(&r.event_lateness),
                    send_lag_p99: Summary::of(&r.send_lag).map(|s| s.p99),
                }),
            };
            let streaming = scenario.requests.iter().any(|t| t.stream.is_some());
            let mode = match plan.mode {
                Mode::Open { rate, connections } => {
                    format!("open loop {rate} req/s, {connections} connections")
                }
                Mode::Closed { concurrency } => format!("closed loop, {concurrency} workers"),
            };
            println!(
                "{}: {mode}, {:?}\n\n{}",
                scenario.name,
                plan.duration,
                report::table(&[row], streaming)
            );
        }
    }
    Ok(())
}

/// Where the binaries, Envoy, the filter and this run's work directory are.
fn paths(
    bin_dir: Option<PathBuf>,
    envoy: Option<PathBuf>,
    wasm: Option<PathBuf>,
    baseline: Option<PathBuf>,
    baseline_wasm: Option<PathBuf>,
    name: &str,
) -> anyhow::Result<Paths> {
    let bin_dir = match bin_dir {
        Some(dir) => dir,
        None => {
            std::env::current_exe()?.parent().context("the binary has no directory")?.to_path_buf()
        }
    };
    let target_dir = bin_dir.parent().map(PathBuf::from).unwrap_or_else(|| bin_dir.clone());
    let workspace = target_dir.parent().map(PathBuf::from).unwrap_or_else(|| target_dir.clone());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Paths {
        envoy: envoy.unwrap_or_else(|| target_dir.join("envoy-venv/bin/envoy")),
        wasm: wasm.unwrap_or_else(|| target_dir.join("wasm32-wasip1/wasm/tollgate_wasm.wasm")),
        work_dir: target_dir.join("loadtest").join(format!("{name}-{stamp}")),
        bin_dir,
        baseline_bin_dir: baseline,
        baseline_wasm,
        workspace,
    })
}

/// The command as a user would type it (the binary by its file name).
fn shown_command(args: &[String]) -> String {
    let mut shown: Vec<String> = args.to_vec();
    if let Some(first) = shown.first_mut() {
        if let Some(name) = std::path::Path::new(first).file_name() {
            *first = name.to_string_lossy().into_owned();
        }
    }
    shown.join(" ")
}
