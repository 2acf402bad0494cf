//! `tollgate-load soak`: one target under steady load for millions of requests, sampling the
//! proxy's resident set and throughput after every slice, to show whether anything is kept per
//! request. The report is the samples and two verdicts against a baseline taken once the
//! process is warm (after `--warm` requests): RSS growth (and its slope per million requests,
//! by least squares) and throughput change (the median of the first three slices after the
//! warm-up against the median of the last three).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::load::{self, HttpClient, Plan};
use crate::procfs;
use crate::scenario::Scenario;
use crate::target::Running;

/// One slice of the soak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Requests completed since the start, including this slice.
    pub requests: u64,
    /// Seconds since the start, at the end of this slice.
    pub elapsed_s: f64,
    /// The proxy's resident set at the end of the slice (`VmRSS`), bytes.
    pub rss: u64,
    /// Completed requests per second in this slice.
    pub rps: f64,
    /// Errors in this slice.
    pub errors: u64,
}

/// What the samples after the warm-up show.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Requests and RSS at the first sample at or after the warm-up.
    pub warm_requests: u64,
    pub warm_rss: u64,
    /// RSS at the last sample minus `warm_rss` (negative: it shrank).
    pub rss_growth: i64,
    /// Least-squares slope of RSS over requests after the warm-up, bytes per million requests.
    pub rss_slope_per_million: f64,
    /// Median req/s of the first three slices after the warm-up, and of the last three.
    pub rps_first: f64,
    pub rps_last: f64,
}

impl Verdict {
    /// The throughput change from the first slices to the last, as a fraction (-0.05: 5 % down).
    pub fn rps_change(&self) -> f64 {
        if self.rps_first == 0.0 {
            return 0.0;
        }
        self.rps_last / self.rps_first - 1.0
    }
}

/// The verdict over `samples`, from the first sample with at least `warm` requests. `None`
/// when fewer than two samples follow the warm-up.
pub fn verdict(samples: &[Sample], warm: u64) -> Option<Verdict> {
    let start = samples.iter().position(|s| s.requests >= warm)?;
    let after = &samples[start..];
    if after.len() < 2 {
        return None;
    }
    let first = after[0];
    let last = after[after.len() - 1];
    let n = after.len() as f64;
    let mean_x = after.iter().map(|s| s.requests as f64).sum::<f64>() / n;
    let mean_y = after.iter().map(|s| s.rss as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for s in after {
        let dx = s.requests as f64 - mean_x;
        sxy += dx * (s.rss as f64 - mean_y);
        sxx += dx * dx;
    }
    let slope = if sxx == 0.0 { 0.0 } else { sxy / sxx * 1e6 };
    let k = after.len().min(3);
    Some(Verdict {
        warm_requests: first.requests,
        warm_rss: first.rss,
        rss_growth: last.rss as i64 - first.rss as i64,
        rss_slope_per_million: slope,
        rps_first: median(after[..k].iter().map(|s| s.rps)),
        rps_last: median(after[after.len() - k..].iter().map(|s| s.rps)),
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How long and how far the soak goes.
#[derive(Clone, Copy, Debug)]
pub struct Soak {
    /// Stop after this many requests...
    pub requests: u64,
    /// ...or after this long, whichever comes first.
    pub max_time: Duration,
    /// The baseline is the first sample after this many requests.
    pub warm: u64,
    /// One slice of load (each slice is one bounded `load::run`).
    pub slice: Plan,
}

/// Loads `target` slice after slice, sampling after each, and prints progress to stderr.
pub async fn run(
    target: &Running,
    client: &HttpClient,
    scenario: &Scenario,
    soak: &Soak,
) -> anyhow::Result<Vec<Sample>> {
    let pid = target.process.as_ref().map(|p| p.pid());
    let pid =
        pid.ok_or_else(|| anyhow::anyhow!("{} has no process to watch", target.kind.key()))?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut requests = 0u64;
    while requests < soak.requests && started.elapsed() < soak.max_time {
        let left = soak.requests - requests;
        let plan = Plan { max_requests: soak.slice.max_requests.min(left), ..soak.slice };
        let outcome = load::run(client, &target.base_url, scenario, &plan).await?;
        let r = &outcome.recorder;
        let done = r.ok + r.error_count();
        requests = requests.saturating_add(done);
        let sample = Sample {
            requests,
            elapsed_s: started.elapsed().as_secs_f64(),
            rss: procfs::rss(pid)?,
            rps: outcome.rps(),
            errors: r.error_count(),
        };
        eprintln!(
            "{:>10} requests  {:>7.0} s  RSS {:>7.1} MiB  {:>8.0} req/s  errors {}",
            sample.requests,
            sample.elapsed_s,
            mib(sample.rss as f64),
            sample.rps,
            r.errors_text(),
        );
        samples.push(sample);
        if done == 0 {
            anyhow::bail!("a slice completed no request: is the target still up?");
        }
    }
    Ok(samples)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// The markdown report: the samples (at most `rows`, evenly spread, the last always shown) and
/// the verdict.
pub fn report(label: &str, command: &str, samples: &[Sample], warm: u64, rows: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Soak: {label}\n\n`{command}`\n");
    out.push_str("| requests | elapsed | RSS | req/s | errors |\n|---:|---:|---:|---:|---:|\n");
    let step = samples.len().div_ceil(rows.max(1)).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % step != 0 && i + 1 != samples.len() {
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {:.0} s | {:.1} MiB | {:.0} | {} |",
            s.requests,
            s.elapsed_s,
            mib(s.rss as f64),
            s.rps,
            s.errors
        );
    }
    let total_errors: u64 = samples.iter().map(|s| s.errors).sum();
    match verdict(samples, warm) {
        None => {
            let _ = writeln!(out, "\nToo few samples after {warm} requests for a verdict.");
        }
        Some(v) => {
            let _ = writeln!(
                out,
                "\nFrom {} requests (RSS {:.1} MiB) to the end: RSS {:+.1} MiB, slope {:+.0} \
                 bytes per million requests; throughput {:.0} → {:.0} req/s ({:+.1} %); \
                 {total_errors} errors in all.",
                v.warm_requests,
                mib(v.warm_rss as f64),
                mib(v.rss_growth as f64),
                v.rss_slope_per_million,
                v.rps_first,
                v.rps_last,
                v.rps_change() * 100.0,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(requests: u64, rss: u64, rps: f64) -> Sample {
        Sample { requests, elapsed_s: 0.0, rss, rps, errors: 0 }
    }

    #[test]
    fn a_process_that_keeps_130_bytes_per_request_shows_its_slope() {
        let samples: Vec<Sample> = (1..=10)
            .map(|i| sample(i * 1_000_000, 20_000_000 + i * 130_000_000, 10_000.0))
            .collect();
        let v = verdict(&samples, 1_000_000).unwrap();
        assert_eq!(v.warm_requests, 1_000_000);
        assert!((v.rss_slope_per_million - 130_000_000.0).abs() < 1.0, "{v:?}");
        assert_eq!(v.rss_growth, 9 * 130_000_000);
        assert_eq!(v.rps_change(), 0.0);
    }

    #[test]
    fn a_flat_process_has_no_slope_and_the_warm_up_is_left_out() {
        let mut samples = vec![sample(500_000, 5_000_000, 9_000.0)];
        samples.extend((1..=6).map(|i| sample(i * 1_000_000, 30_000_000, 12_000.0)));
        samples.push(sample(7_000_000, 30_000_000, 11_000.0));
        let v = verdict(&samples, 1_000_000).unwrap();
        assert_eq!((v.warm_rss, v.rss_growth), (30_000_000, 0));
        assert!(v.rss_slope_per_million.abs() < 1e-6);
        assert_eq!((v.rps_first, v.rps_last), (12_000.0, 12_000.0));
    }

    #[test]
    fn throughput_change_compares_medians_of_three() {
        let rps = [10_000.0, 10_000.0, 10_000.0, 9_000.0, 9_000.0, 1.0, 9_000.0];
        let samples: Vec<Sample> =
            rps.iter().enumerate().map(|(i, &r)| sample(i as u64 + 1, 1, r)).collect();
        let v = verdict(&samples, 1).unwrap();
        assert_eq!((v.rps_first, v.rps_last), (10_000.0, 9_000.0));
        assert!((v.rps_change() + 0.1).abs() < 1e-9);
    }

    #[test]
    fn no_verdict_without_two_samples_after_the_warm_up() {
        assert_eq!(verdict(&[sample(1, 1, 1.0)], 0), None);
        assert_eq!(verdict(&[sample(1, 1, 1.0), sample(2, 1, 1.0)], 5), None);
    }

    #[test]
    fn the_report_shows_the_last_sample_and_the_verdict() {
        let samples: Vec<Sample> =
            (1..=100).map(|i| sample(i * 100_000, 30 << 20, 10_000.0)).collect();
        let text = report("tollgate", "tollgate-load soak", &samples, 1_000_000, 10);
        assert!(text.contains("| 10000000 |"), "{text}");
        assert!(text.contains("From 1000000 requests (RSS 30.0 MiB)"), "{text}");
        assert!(text.lines().filter(|l| l.starts_with("| ")).count() <= 12, "{text}");
    }
}
