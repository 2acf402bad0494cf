//! The comparison as a markdown table: one row per target, ratios and differences against the
//! direct row, and a row that says why for every target that could not run.
//!
//! Formats numbers it is given; never measures.

use std::fmt::Write;
use std::time::Duration;

use crate::stats::{delta_ms, ms, Summary};

/// What was measured for one target over all its rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub latency: Option<Summary>,
    /// Median of the rounds' completed requests per second.
    pub rps: f64,
    pub errors: u64,
    pub errors_text: String,
    /// Proxy CPU (utime + stime) over the rounds / requests completed; None for direct.
    pub cpu_per_request: Option<Duration>,
    /// Highest `VmHWM` of the proxy over the rounds, bytes.
    pub peak_rss: Option<u64>,
    /// SSE scenarios: event lateness (gap minus configured spacing).
    pub lateness: Option<Summary>,
    /// Open loop: how late the generator sent (p99), a check on the generator itself.
    pub send_lag_p99: Option<u64>,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub label: String,
    /// `Err` carries why the target did not run ("not available in this build: ...").
    pub result: Result<Measured, String>,
}

/// Renders the table; the first row whose label starts with `direct` is the reference.
pub fn table(rows: &[Row], streaming: bool) -> String {
    let direct =
        rows.iter().find(|r| r.label.starts_with("direct")).and_then(|r| r.result.as_ref().ok());
    let mut out = String::new();
    let mut header = vec![
        "target",
        "RPS",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "p99 vs direct",
        "RPS vs direct",
        "proxy CPU/req",
        "proxy peak RSS",
    ];
    if streaming {
        header.extend(["event lateness p50 ms", "p99 ms", "added p99 vs direct"]);
    }
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let align: Vec<&str> =
        header.iter().enumerate().map(|(i, _)| if i == 0 { "---" } else { "---:" }).collect();
    let _ = writeln!(out, "| {} |", align.join(" | "));
    for row in rows {
        let cells = match &row.result {
            Ok(m) => measured_cells(m, direct, streaming),
            Err(reason) => {
                let mut cells = vec![reason.clone()];
                cells.resize(header.len() - 1, "—".into());
                cells
            }
        };
        let _ = writeln!(out, "| {} | {} |", row.label, cells.join(" | "));
    }
    out
}

fn measured_cells(m: &Measured, direct: Option<&Measured>, streaming: bool) -> Vec<String> {
    let dash = || "—".to_string();
    let pct = |s: Option<Summary>, f: fn(&Summary) -> u64| s.as_ref().map(f).map(ms);
    let p99 = m.latency.map(|s| s.p99);
    let direct_p99 = direct.and_then(|d| d.latency).map(|s| s.p99);
    let mut cells = vec![
        format!("{:.0}", m.rps),
        pct(m.latency, |s| s.p50).unwrap_or_else(dash),
        pct(m.latency, |s| s.p90).unwrap_or_else(dash),
        pct(m.latency, |s| s.p99).unwrap_or_else(dash),
        pct(m.latency, |s| s.p999).unwrap_or_else(dash),
        m.errors_text.clone(),
        match (p99, direct_p99) {
            (Some(a), Some(b)) if b > 0 => {
                format!("{} ms ({:.2}x)", delta_ms(a, b), a as f64 / b as f64)
            }
            _ => dash(),
        },
        match direct.map(|d| d.rps) {
            Some(d) if d > 0.0 => format!("{:.2}x", m.rps / d),
            _ => dash(),
        },
        m.cpu_per_request
            .map(|c| format!("{:.1} µs", c.as_nanos() as f64 / 1e3))
            .unwrap_or_else(dash),
        m.peak_rss.map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))).unwrap_or_else(dash),
    ];
    if streaming {
        let late_p99 = m.lateness.map(|s| s.p99);
        let direct_late = direct.and_then(|d| d.lateness).map(|s| s.p99);
        cells.push(pct(m.lateness, |s| s.p50).unwrap_or_else(dash));
        cells.push(pct(m.lateness, |s| s.p99).unwrap_or_else(dash));
        cells.push(match (late_p99, direct_late) {
            (Some(a), Some(b)) => format!("{} ms", delta_ms(a, b)),
            _ => dash(),
        });
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p50: u64, p99: u64) -> Summary {
        Summary { count: 100, p50, p90: p50 + 10_000, p99, p999: p99 * 2, max: p99 * 3 }
    }

    fn measured(p99: u64, rps: f64, cpu: Option<u64>) -> Measured {
        Measured {
            latency: Some(summary(100_000, p99)),
            rps,
            errors: 0,
            errors_text: "0".into(),
            cpu_per_request: cpu.map(Duration::from_nanos),
            peak_rss: cpu.map(|_| 12 * 1024 * 1024),
            lateness: Some(summary(50_000, p99 / 10)),
            send_lag_p99: Some(20_000),
        }
    }

    #[test]
    fn rows_compare_against_direct_and_explain_missing_targets() {
        let rows = vec![
            Row { label: "direct (no proxy)".into(), result: Ok(measured(254_000, 3000.0, None)) },
            Row { label: "Tollgate".into(), result: Ok(measured(500_000, 2990.0, Some(41_500))) },
            Row {
                label: "Envoy + filter".into(),
                result: Err("not available in this build: x".into()),
            },
        ];
        let text = table(&rows, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(
            lines[2],
            "| direct (no proxy) | 3000 | 0.100 | 0.110 | 0.254 | 0.508 | 0 | +0.000 ms (1.00x) | 1.00x | — | — |"
        );
        assert_eq!(
            lines[3],
            "| Tollgate | 2990 | 0.100 | 0.110 | 0.500 | 1.000 | 0 | +0.246 ms (1.97x) | 1.00x | 41.5 µs | 12.0 MiB |"
        );
        assert_eq!(
            lines[4],
            "| Envoy + filter | not available in this build: x | — | — | — | — | — | — | — | — | — |"
        );
    }

    #[test]
    fn streaming_tables_add_event_lateness_columns() {
        let rows = vec![
            Row { label: "direct".into(), result: Ok(measured(1_000_000, 100.0, None)) },
            Row { label: "proxy".into(), result: Ok(measured(1_500_000, 100.0, Some(70_000))) },
        ];
        let text = table(&rows, true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("| event lateness p50 ms | p99 ms | added p99 vs direct |"));
        assert!(lines[3].ends_with("| 0.050 | 0.150 | +0.050 ms |"), "{}", lines[3]);
    }
}
