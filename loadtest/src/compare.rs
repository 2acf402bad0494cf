//! One comparison: start the mock upstream and every target, warm each up, run the same
//! scenario against each in interleaved rounds (the order rotates every round, so slow drift of
//! a shared machine spreads over all targets), measure the proxy's CPU and peak RSS over each
//! round, and render the markdown table.
//!
//! Orchestrates; the generator ([`crate::load`]) measures and [`crate::report`] formats.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::load::{self, HttpClient, Mode, Outcome, Plan};
use crate::procfs;
use crate::report::{self, Measured, Row};
use crate::scenario::{Defaults, Scenario};
use crate::stats::{ErrorKind, Recorder, Summary};
use crate::target::{self, Kind, Paths, Running};

/// Open-loop connections when neither the command line nor the scenario says.
pub const DEFAULT_CONNECTIONS: u64 = 16;

/// Everything a comparison needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub scenario: Scenario,
    pub plan: Plan,
    pub rounds: u32,
    pub warmup: Duration,
    pub targets: Vec<Kind>,
    pub paths: Paths,
    /// CPU for the generator and the mock; the proxy under test gets `proxy_cpu`.
    pub generator_cpu: usize,
    pub proxy_cpu: usize,
    /// Whether the generator managed to pin itself (said in the output).
    pub generator_pinned: bool,
    /// CPUs of the machine (counted before pinning).
    pub cores: usize,
    pub command: String,
    /// Reuse connections (the default) or open one per request.
    pub connections: load::Connections,
}

/// The load mode from the command line, else from the scenario's defaults.
pub fn resolve_mode(
    rate: Option<u64>,
    concurrency: Option<u64>,
    connections: Option<u64>,
    defaults: &Defaults,
) -> anyhow::Result<Mode> {
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let connections = connections.or(defaults.connections).unwrap_or(DEFAULT_CONNECTIONS);
    match (rate, concurrency) {
        (Some(_), Some(_)) => {
            bail!("give either --rate (open loop) or --concurrency (closed loop), not both")
        }
        (Some(0), _) | (_, Some(0)) => bail!("--rate and --concurrency must be at least 1"),
        (Some(rate), None) => Ok(Mode::Open { rate, connections: to_usize(connections) }),
        (None, Some(c)) => Ok(Mode::Closed { concurrency: to_usize(c) }),
        (None, None) => match (defaults.rate, defaults.concurrency) {
            (Some(rate), _) => Ok(Mode::Open { rate, connections: to_usize(connections) }),
            (None, Some(c)) => Ok(Mode::Closed { concurrency: to_usize(c) }),
            (None, None) => {
                bail!("no load given: pass --rate or --concurrency (the scenario has no defaults)")
            }
        },
    }
}

/// A target's measurements, summed over its rounds.
#[derive(Debug, Default)]
struct Tally {
    recorder: Recorder,
    rps: Vec<f64>,
    cpu: Duration,
    requests: u64,
    peak_rss: Option<u64>,
    measured_cpu: bool,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome, cpu: Option<Duration>, peak: Option<u64>) {
        self.recorder.merge(&outcome.recorder);
        self.rps.push(outcome.rps());
        let unsent = outcome.recorder.errors.get(&ErrorKind::Unsent).copied().unwrap_or(0);
        self.requests += outcome.recorder.ok + outcome.recorder.error_count() - unsent;
        if let Some(cpu) = cpu {
            self.cpu += cpu;
            self.measured_cpu = true;
        }
        self.peak_rss = self.peak_rss.max(peak);
    }

    fn measured(&self) -> Measured {
        let mut rps = self.rps.clone();
        rps.sort_by(f64::total_cmp);
        Measured {
            latency: Summary::of(&self.recorder.latency),
            rps: rps.get(rps.len() / 2).copied().unwrap_or(0.0),
            errors: self.recorder.error_count(),
            errors_text: self.recorder.errors_text(),
            cpu_per_request: (self.measured_cpu && self.requests > 0)
                .then(|| self.cpu / u32::try_from(self.requests).unwrap_or(u32::MAX)),
            peak_rss: self.peak_rss,
            lateness: Summary::of(&self.recorder.event_lateness),
            send_lag_p99: Summary::of(&self.recorder.send_lag).map(|s| s.p99),
        }
    }
}

/// Runs the comparison and returns the markdown report.
pub async fn compare(settings: &Settings) -> anyhow::Result<String> {
    std::fs::create_dir_all(&settings.paths.work_dir)?;
    let (mock, mock_addr) = target::start_mock(&settings.paths, settings.generator_cpu)?;
    eprintln!("mock upstream on {mock_addr} (pid {}, CPU {})", mock.pid(), settings.generator_cpu);
    let mut running: Vec<(Running, HttpClient, Tally)> = Vec::new();
    let mut unavailable: Vec<(Kind, String)> = Vec::new();
    for &kind in &settings.targets {
        match target::launch(kind, &settings.paths, mock_addr, settings.proxy_cpu) {
            Ok(r) => {
                eprintln!(
                    "{}: {} (pid {:?})",
                    kind.label(),
                    r.base_url,
                    r.process.as_ref().map(|p| p.pid())
                );
                let client = r.client(settings.connections)?;
                running.push((r, client, Tally::default()));
            }
            Err(reason) => {
                eprintln!("{}: {reason}", kind.label());
                unavailable.push((kind, reason));
            }
        }
    }
    let ticks = procfs::clock_ticks_per_second();
    let warmup = Plan { duration: settings.warmup, ..settings.plan };
    for (r, client, _) in &running {
        if !settings.warmup.is_zero() {
            load::run(client, &r.base_url, &settings.scenario, &warmup).await?;
        }
    }
    let started = Instant::now();
    for round in 0..settings.rounds as usize {
        let n = running.len();
        for k in 0..n {
            let (r, client, tally) = &mut running[(round + k) % n];
            let pid = r.process.as_ref().map(|p| p.pid());
            if let Some(pid) = pid {
                procfs::reset_peak_rss(pid);
            }
            let cpu_before = pid.and_then(|p| procfs::cpu_time(p, ticks).ok());
            let outcome =
                load::run(client, &r.base_url, &settings.scenario, &settings.plan).await?;
            let cpu_after = pid.and_then(|p| procfs::cpu_time(p, ticks).ok());
            let cpu = cpu_before.zip(cpu_after).map(|(a, b)| b.saturating_sub(a));
            let peak = pid.and_then(|p| procfs::peak_rss(p).ok());
            let p99 = Summary::of(&outcome.recorder.latency).map_or(0, |s| s.p99);
            eprintln!(
                "round {}/{} {:<30} {:>8.0} req/s  p99 {} ms  errors {}  proxy CPU {}",
                round + 1,
                settings.rounds,
                r.kind.label(),
                outcome.rps(),
                crate::stats::ms(p99),
                outcome.recorder.errors_text(),
                cpu.map_or("—".into(), |c| format!("{c:?}")),
            );
            tally.add(&outcome, cpu, peak);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let measuring = started.elapsed();
    let mut rows: Vec<(Kind, Row)> = running
        .iter()
        .map(|(r, _, t)| (r.kind, Row { label: r.kind.label().into(), result: Ok(t.measured()) }))
        .collect();
    rows.extend(
        unavailable
            .into_iter()
            .map(|(k, reason)| (k, Row { label: k.label().into(), result: Err(reason) })),
    );
    rows.sort_by_key(|(k, _)| *k);
    let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
    let streaming = settings.scenario.requests.iter().any(|t| t.stream.is_some());
    let mut out = header(settings, measuring);
    out.push_str(&report::table(&rows, streaming));
    out.push_str(&footer(&rows, streaming));
    drop(running);
    drop(mock);
    Ok(out)
}

fn header(s: &Settings, measuring: Duration) -> String {
    let load = match s.plan.mode {
        Mode::Open { rate, connections } => {
            format!("open loop, {rate} req/s over {connections} connections (latency from the scheduled send time)")
        }
        Mode::Closed { concurrency } => {
            format!("closed loop, {concurrency} concurrent workers, each sending when its last request ended (latency from the actual send)")
        }
    };
    let pinned = if s.generator_pinned {
        format!(
            "load generator and mock upstream pinned to CPU {}, proxy under test pinned to CPU {} (taskset)",
            s.generator_cpu, s.proxy_cpu
        )
    } else {
        format!(
            "mock upstream pinned to CPU {}, proxy to CPU {} (taskset); the generator could NOT pin itself",
            s.generator_cpu, s.proxy_cpu
        )
    };
    format!(
        "### {name}: {load}\n\n{date}, {cores} CPUs. `{command}`\n\n{rounds} interleaved rounds of {dur:?} per target after a {warm:?} warm-up ({measuring:.0?} of measuring); {pinned}; Envoy runs with `--concurrency 1`, Tollgate's runtime sees the one CPU it is pinned to.\n\n",
        name = s.scenario.name,
        date = now_utc(),
        cores = s.cores,
        command = s.command,
        rounds = s.rounds,
        dur = s.plan.duration,
        warm = s.warmup,
    )
}

fn footer(rows: &[Row], streaming: bool) -> String {
    let mut out = String::from("\n");
    let lags: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let lag = r.result.as_ref().ok()?.send_lag_p99?;
            Some(format!("{} {} ms", r.label, crate::stats::ms(lag)))
        })
        .collect();
    if !lags.is_empty() {
        out.push_str(&format!(
            "Generator send lag p99 (how late requests left the generator; part of the latency): {}.\n",
            lags.join(", ")
        ));
    }
    out.push_str("CPU/req = (utime + stime of the proxy process over its rounds) / requests completed; peak RSS = highest VmHWM over the rounds (reset before each round).\n");
    if streaming {
        out.push_str("Event lateness = gap between consecutive SSE events at the client minus the spacing the mock was asked for (floored at 0); the mock's timer has 1 ms resolution, so compare with the direct row.\n");
    }
    out
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "(date unknown)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_beats_scenario_defaults() {
        let defaults = Defaults {
            rate: Some(100),
            duration_ms: None,
            connections: Some(4),
            concurrency: Some(50),
        };
        assert_eq!(
            resolve_mode(None, Some(8), None, &defaults).unwrap(),
            Mode::Closed { concurrency: 8 }
        );
        assert_eq!(
            resolve_mode(Some(3000), None, Some(32), &defaults).unwrap(),
            Mode::Open { rate: 3000, connections: 32 }
        );
        assert_eq!(
            resolve_mode(None, None, None, &defaults).unwrap(),
            Mode::Open { rate: 100, connections: 4 }
        );
        let closed = Defaults { concurrency: Some(50), ..Defaults::default() };
        assert_eq!(
            resolve_mode(None, None, None, &closed).unwrap(),
            Mode::Closed { concurrency: 50 }
        );
    }

    #[test]
    fn contradictory_or_missing_load_is_an_error() {
        let none = Defaults::default();
        assert!(resolve_mode(Some(1), Some(1), None, &none)
            .unwrap_err()
            .to_string()
            .contains("not both"));
        assert!(resolve_mode(None, None, None, &none)
            .unwrap_err()
            .to_string()
            .contains("no load given"));
        assert!(resolve_mode(Some(0), None, None, &none).is_err());
        assert_eq!(
            resolve_mode(Some(10), None, None, &none).unwrap(),
            Mode::Open { rate: 10, connections: DEFAULT_CONNECTIONS as usize }
        );
    }
}
