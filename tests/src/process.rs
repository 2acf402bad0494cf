//! The `tollgate` binary as a child process, for tests that need what only a process has: its
//! own exit code, a `SIGTERM` or a `SIGKILL`, a restart on the same data directory.
//!
//! [`Tollgate::run`] starts `tollgate run --log-json --config FILE`, reads its JSON log lines on a
//! thread, and learns the proxy and admin addresses from the `tollgate listening` line. Every
//! wait is bounded; a child still running when its handle is dropped is killed.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long [`Tollgate::wait_for`] and [`Tollgate::exit_code`] wait.
pub const PROCESS_WAIT: Duration = Duration::from_secs(10);

/// A running `tollgate run`.
pub struct Tollgate {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The proxy listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Tollgate {
    /// Starts `bin run --log-json --config config` with extra environment variables and waits
    /// (at most [`PROCESS_WAIT`]) until it listens.
    ///
    /// # Panics
    /// If it cannot be spawned or does not log its addresses in time.
    pub fn run(bin: &Path, config: &Path, env: &[(&str, &str)]) -> Tollgate {
        let mut command = Command::new(bin);
        command
            .args(["run", "--log-json", "--config"])
            .arg(config)
            .env_remove("TOLLGATE_CONFIG")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn tollgate run");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut process = Tollgate { child, lines, proxy: unknown, admin: unknown };
        let listening = process.wait_for("tollgate listening");
        let addr = |name: &str| -> SocketAddr {
            listening["fields"][name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no `{name}` address in {listening}"))
        };
        process.proxy = addr("proxy");
        process.admin = addr("admin");
        process
    }

    /// The next log line whose message is `message` (at most [`PROCESS_WAIT`]), as JSON. Lines
    /// before it are consumed.
    ///
    /// # Panics
    /// If no such line arrives in time (or the process exits first).
    pub fn wait_for(&self, message: &str) -> Value {
        let deadline = Instant::now() + PROCESS_WAIT;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "no `{message}` log line ({}); its output:\n{}",
                    match e {
                        mpsc::RecvTimeoutError::Timeout => "timed out",
                        mpsc::RecvTimeoutError::Disconnected => "the process closed stderr",
                    },
                    skipped.join("\n")
                ),
            };
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v["fields"]["message"] == message => return v,
                _ => skipped.push(line),
            }
        }
    }

    /// The value of one series on the admin `/metrics` (e.g. `tollgate_shed_total{reason="connections"}`).
    ///
    /// # Panics
    /// If the scrape fails or the series is not exposed.
    pub fn metric(&self, series: &str) -> u64 {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(self.admin).expect("connect to the admin listener");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("send the scrape");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read the scrape");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} not in /metrics"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now (`VmRSS`), in KiB.
    ///
    /// # Panics
    /// If `/proc/<pid>/status` cannot be read.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Sends a signal (`TERM`, `KILL`, ...) with `kill(1)`.
    ///
    /// # Panics
    /// If `kill` fails.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (at most [`PROCESS_WAIT`]) for the process to exit; its exit code, `None` when a
    /// signal ended it.
    ///
    /// # Panics
    /// If it is still running after the wait.
    pub fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "tollgate did not exit within {PROCESS_WAIT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `bin args...` to completion (without `TOLLGATE_CONFIG` from the environment).
///
/// # Panics
/// If it cannot be run.
pub fn command(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).env_remove("TOLLGATE_CONFIG").output().expect("run tollgate")
}

/// A config document for `tollgate run`: loopback listeners, the admin token read from
/// `token_env`, an OpenAI route to `upstream` and any `more_routes` (YAML flow mappings), then
/// `extra` (top-level sections such as `ledger:`, `chargeback:`, `pricing:`) and the `policy`
/// (a YAML document, indented here).
pub struct ConfigFile<'a> {
    pub upstream: &'a str,
    pub data_dir: &'a Path,
    pub token_env: &'a str,
    pub more_routes: &'a [String],
    pub extra: &'a str,
    pub policy: &'a str,
}

impl ConfigFile<'_> {
    /// The YAML text.
    pub fn yaml(&self) -> String {
        let policy: String = self.policy.lines().map(|l| format!("  {l}\n")).collect();
        let routes: String = self.more_routes.iter().map(|r| format!("  - {r}\n")).collect();
        format!(
            "version: 1\n\
             listen: 127.0.0.1:0\n\
             admin: {{listen: 127.0.0.1:0, token_env: {token_env}}}\n\
             data_dir: {data}\n\
             shutdown_drain: 5s\n\
             routes:\n\
             \x20 - {{name: openai, path_prefix: /v1/, kind: openai, upstream: \"{upstream}\"}}\n\
             {routes}\
             {extra}\
             policy:\n{policy}",
            token_env = self.token_env,
            upstream = self.upstream,
            extra = self.extra,
            data = serde_json::to_string(&self.data_dir.display().to_string()).unwrap_or_default(),
        )
    }
}
