//! What one run measured: latency, SSE event lateness and generator send lag as HDR
//! histograms (nanoseconds, 3 significant digits), and errors counted by kind; plus the
//! summaries printed from them.
//!
//! Records and summarises; never sends, sleeps or decides what a target is.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;

/// Largest value a histogram holds: one minute in nanoseconds (longer values are clamped).
const MAX_NANOS: u64 = 60_000_000_000;

/// Why a request did not count as a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The TCP connection could not be made.
    Connect,
    /// The request could not be sent or the response head not read.
    Request,
    /// An answer with a status other than the scenario's `expect_status`.
    Status(u16),
    /// The response body broke off.
    Body,
    /// No complete answer within the request timeout.
    Timeout,
    /// Still scheduled when the run's hard deadline passed; never sent.
    Unsent,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Request => f.write_str("request"),
            ErrorKind::Status(code) => write!(f, "status {code}"),
            ErrorKind::Body => f.write_str("body"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Unsent => f.write_str("unsent"),
        }
    }
}

/// Everything one run (or several merged runs) of one target recorded.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// Scheduled send (open loop) or actual send (closed loop) to the end of the body.
    pub latency: Histogram<u64>,
    /// Per SSE event after the first: the gap since the previous event minus the spacing the
    /// upstream was asked for, floored at zero.
    pub event_lateness: Histogram<u64>,
    /// Open loop only: how late the generator sent each request after its due time.
    pub send_lag: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// SSE events received in all.
    pub events: u64,
}

fn histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (1 ns..60 s, 3 digits): no input reaches this.
    Histogram::new_with_bounds(1, MAX_NANOS, 3)
        .unwrap_or_else(|e| panic!("hdrhistogram rejects constant bounds: {e}"))
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: histogram(),
            event_lateness: histogram(),
            send_lag: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            events: 0,
        }
    }
}

impl Recorder {
    pub fn success(&mut self, latency_ns: u64) {
        self.ok += 1;
        self.latency.saturating_record(latency_ns.min(MAX_NANOS));
    }

    pub fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// One SSE event arrived `gap_ns` after the previous one of its stream.
    pub fn event_gap(&mut self, gap_ns: u64, spacing_ns: u64) {
        self.event_lateness.saturating_record(gap_ns.saturating_sub(spacing_ns).min(MAX_NANOS));
    }

    pub fn send_lag(&mut self, lag_ns: u64) {
        self.send_lag.saturating_record(lag_ns.min(MAX_NANOS));
    }

    /// Adds everything `other` recorded (histograms share bounds, so nothing is lost).
    pub fn merge(&mut self, other: &Recorder) {
        for (mine, theirs) in [
            (&mut self.latency, &other.latency),
            (&mut self.event_lateness, &other.event_lateness),
            (&mut self.send_lag, &other.send_lag),
        ] {
            // Same bounds on both sides, so `add` cannot fail; a failure would only drop data.
            let _ = mine.add(theirs);
        }
        self.ok += other.ok;
        for (kind, n) in &other.errors {
            *self.errors.entry(*kind).or_insert(0) += n;
        }
        self.events += other.events;
    }

    /// Errors as `status 429: 12, timeout: 1`, or `0`.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        let parts: Vec<String> = self.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        parts.join(", ")
    }
}

/// Percentiles of one histogram, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Option<Summary> {
        if h.is_empty() {
            return None;
        }
        Some(Summary {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// Nanoseconds as milliseconds with three decimals (`0.254`).
pub fn ms(nanos: u64) -> String {
    format!("{:.3}", nanos as f64 / 1e6)
}

/// A signed difference of nanoseconds as milliseconds with a sign (`+0.246`, `-0.010`).
pub fn delta_ms(a: u64, b: u64) -> String {
    let d = a as f64 - b as f64;
    format!("{:+.3}", d / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_percentiles_within_histogram_precision() {
        let mut r = Recorder::default();
        for v in 1..=10_000u64 {
            r.success(v * 1000); // 1 µs .. 10 ms
        }
        let s = Summary::of(&r.latency).unwrap();
        assert_eq!(s.count, 10_000);
        // 3 significant digits: each value within 0.1 % of the exact quantile.
        for (got, exact) in [(s.p50, 5_000_000), (s.p90, 9_000_000), (s.p99, 9_900_000)] {
            assert!(got.abs_diff(exact) <= exact / 1000, "{got} vs {exact}");
        }
        assert!(s.p999.abs_diff(9_990_000) <= 9_990);
        assert!(s.max.abs_diff(10_000_000) <= 10_000);
        assert_eq!(Summary::of(&Recorder::default().latency), None);
    }

    #[test]
    fn event_lateness_floors_early_events_at_zero() {
        let mut r = Recorder::default();
        r.event_gap(10_400_000, 10_000_000);
        r.event_gap(9_000_000, 10_000_000);
        let s = Summary::of(&r.event_lateness).unwrap();
        assert_eq!((s.count, s.p50), (2, 0));
        assert!(s.max.abs_diff(400_000) <= 400);
    }

    #[test]
    fn merge_adds_counts_errors_and_histograms() {
        let mut a = Recorder::default();
        a.success(1_000);
        a.error(ErrorKind::Status(429));
        a.events = 3;
        let mut b = Recorder::default();
        b.success(2_000);
        b.error(ErrorKind::Status(429));
        b.error(ErrorKind::Timeout);
        b.events = 4;
        a.merge(&b);
        assert_eq!((a.ok, a.error_count(), a.events, a.latency.len()), (2, 3, 7, 2));
        assert_eq!(a.errors_text(), "status 429: 2, timeout: 1");
        assert_eq!(Recorder::default().errors_text(), "0");
    }

    #[test]
    fn values_beyond_a_minute_are_clamped_not_dropped() {
        let mut r = Recorder::default();
        r.success(u64::MAX);
        assert_eq!(r.latency.len(), 1);
        assert!(r.latency.max() >= MAX_NANOS);
    }

    #[test]
    fn millisecond_formatting() {
        assert_eq!(ms(254_000), "0.254");
        assert_eq!(ms(12_345_678), "12.346");
        assert_eq!(delta_ms(500_000, 254_000), "+0.246");
        assert_eq!(delta_ms(244_000, 254_000), "-0.010");
    }
}
