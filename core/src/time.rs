//! Time as a value: milliseconds since the Unix epoch, passed in by the caller.
//!
//! The core never reads a clock. This module turns an instant into UTC calendar periods (hour,
//! day, ISO week starting Monday, month) for budgets and invoices, with the civil-date algorithms
//! of Howard Hinnant's `chrono`-free date library, so it behaves the same in the proxy and in
//! wasm.

use std::fmt;

/// Milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

const MS_PER_HOUR: u64 = 3_600_000;
const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;

impl UnixMillis {
    pub const fn from_secs(secs: u64) -> Self {
        UnixMillis(secs * 1000)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    pub const fn saturating_add_ms(self, ms: u64) -> Self {
        UnixMillis(self.0.saturating_add(ms))
    }

    pub const fn saturating_sub_ms(self, ms: u64) -> Self {
        UnixMillis(self.0.saturating_sub(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn since(self, earlier: UnixMillis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The UTC calendar date of this instant.
    pub fn date(self) -> Date {
        Date::from_days((self.0 / MS_PER_DAY) as i64)
    }
}

impl fmt::Display for UnixMillis {
    /// RFC 3339 in UTC with milliseconds: `2026-11-22T10:04:05.123Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.date();
        let ms_of_day = self.0 % MS_PER_DAY;
        let (h, m, s, ms) = (
            ms_of_day / MS_PER_HOUR,
            ms_of_day / 60_000 % 60,
            ms_of_day / 1000 % 60,
            ms_of_day % 1000,
        );
        write!(f, "{d}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
    }
}

/// A proleptic Gregorian date in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// The date `days` after 1970-01-01.
    pub fn from_days(days: i64) -> Self {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Date { year, month, day }
    }

    /// Days since 1970-01-01.
    pub fn to_days(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Midnight UTC at the start of this date (dates before 1970 clamp to the epoch).
    pub fn start(self) -> UnixMillis {
        UnixMillis(self.to_days().max(0) as u64 * MS_PER_DAY)
    }

    /// 0 = Monday … 6 = Sunday.
    pub fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (3).
        ((self.to_days() + 3).rem_euclid(7)) as u32
    }

    /// Parses `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Option<Date> {
        let mut it = text.splitn(3, '-');
        let year = it.next()?.parse().ok()?;
        let month = it.next()?.parse().ok()?;
        let day = it.next()?.parse().ok()?;
        let d = Date { year, month, day };
        (Date::from_days(d.to_days()) == d).then_some(d)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// A reporting period asked for by name (usage totals, invoices): one UTC month `YYYY-MM` or
/// one UTC day `YYYY-MM-DD`. Parsed strictly, in this one place: four-digit year, two-digit
/// month `01`–`12`, two-digit day that exists in that month. Its text ([`fmt::Display`]) is the
/// canonical form, a prefix of every RFC 3339 timestamp inside the period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportPeriod {
    Month { year: i32, month: u32 },
    Day(Date),
}

/// Why a text is not a [`ReportPeriod`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a period: {why} (expected YYYY-MM for a month or YYYY-MM-DD for a day, e.g. 2026-11 or 2026-11-22)")]
pub struct ReportPeriodError {
    pub text: String,
    pub why: &'static str,
}

impl ReportPeriod {
    pub fn parse(text: &str) -> Result<ReportPeriod, ReportPeriodError> {
        let fail = |why| Err(ReportPeriodError { text: text.chars().take(64).collect(), why });
        let b = text.as_bytes();
        if !matches!(b.len(), 7 | 10) {
            return fail("wrong length");
        }
        let digits_at = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
        if !digits_at(0..4) || b[4] != b'-' || !digits_at(5..7) {
            return fail("not digits in the form YYYY-MM");
        }
        let number = |range: std::ops::Range<usize>| {
            b[range].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
        };
        let (year, month) = (number(0..4) as i32, number(5..7));
        if !(1..=12).contains(&month) {
            return fail("the month must be 01 to 12");
        }
        if b.len() == 7 {
            return Ok(ReportPeriod::Month { year, month });
        }
        if b[7] != b'-' || !digits_at(8..10) {
            return fail("not digits in the form YYYY-MM-DD");
        }
        let date = Date { year, month, day: number(8..10) };
        if date.day == 0 || Date::from_days(date.to_days()) != date {
            return fail("no such day in that month");
        }
        Ok(ReportPeriod::Day(date))
    }

    /// A whole month (not a single day).
    pub fn is_month(self) -> bool {
        matches!(self, ReportPeriod::Month { .. })
    }
}

impl fmt::Display for ReportPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReportPeriod::Month { year, month } => write!(f, "{year:04}-{month:02}"),
            ReportPeriod::Day(d) => d.fmt(f),
        }
    }
}

/// A calendar budget period in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

impl Period {
    pub fn parse(text: &str) -> Option<Period> {
        Some(match text {
            "hourly" | "hour" => Period::Hourly,
            "daily" | "day" => Period::Daily,
            "weekly" | "week" => Period::Weekly,
            "monthly" | "month" => Period::Monthly,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
        }
    }

    /// The window `[start, end)` of this period that contains `now`.
    pub fn window(self, now: UnixMillis) -> Window {
        match self {
            Period::Hourly => {
                let start = now.0 / MS_PER_HOUR * MS_PER_HOUR;
                Window { start: UnixMillis(start), end: UnixMillis(start + MS_PER_HOUR) }
            }
            Period::Daily => {
                let start = now.0 / MS_PER_DAY * MS_PER_DAY;
                Window { start: UnixMillis(start), end: UnixMillis(start + MS_PER_DAY) }
            }
            Period::Weekly => {
                let d = now.date();
                let monday = d.to_days() - i64::from(d.weekday());
                let start = Date::from_days(monday).start();
                Window { start, end: start.saturating_add_ms(7 * MS_PER_DAY) }
            }
            Period::Monthly => {
                let d = now.date();
                let start = Date { year: d.year, month: d.month, day: 1 };
                let next = if d.month == 12 {
                    Date { year: d.year + 1, month: 1, day: 1 }
                } else {
                    Date { year: d.year, month: d.month + 1, day: 1 }
                };
                Window { start: start.start(), end: next.start() }
            }
        }
    }

    /// A short stable key for the window containing `now`: `2026-11-22T10`, `2026-11-22`,
    /// `2026-W47` (ISO week), `2026-11`. Used in counter keys so that a new period starts at zero.
    pub fn key(self, now: UnixMillis) -> String {
        let d = now.date();
        match self {
            Period::Hourly => format!("{d}T{:02}", now.0 % MS_PER_DAY / MS_PER_HOUR),
            Period::Daily => d.to_string(),
            Period::Weekly => {
                let (y, w) = iso_week(d);
                format!("{y:04}-W{w:02}")
            }
            Period::Monthly => format!("{:04}-{:02}", d.year, d.month),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A half-open time window `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: UnixMillis,
    pub end: UnixMillis,
}

impl Window {
    pub fn contains(&self, t: UnixMillis) -> bool {
        self.start <= t && t < self.end
    }
}

/// ISO 8601 week-numbering year and week of a date.
fn iso_week(d: Date) -> (i32, u32) {
    let days = d.to_days();
    // The Thursday of this week decides the year.
    let thursday = days - i64::from(d.weekday()) + 3;
    let year = Date::from_days(thursday).year;
    let jan1 = Date { year, month: 1, day: 1 }.to_days();
    let week = (thursday - jan1) / 7 + 1;
    (year, week as u32)
}

/// Parses a human duration: `"500ms"`, `"30s"`, `"15m"`, `"2h"`, `"1d"`, into milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => MS_PER_HOUR,
        "d" => MS_PER_DAY,
        _ => return None,
    };
    n.checked_mul(scale)
}

#[cfg(test)]
mod report_period_tests {
    use super::*;

    #[test]
    fn months_and_days_parse_to_their_canonical_text() {
        for text in ["2026-11", "2026-01", "2026-12", "2026-11-22", "2024-02-29", "2026-12-31"] {
            assert_eq!(ReportPeriod::parse(text).map(|p| p.to_string()).as_deref(), Ok(text));
        }
        assert!(ReportPeriod::parse("2026-11").unwrap().is_month());
        assert!(!ReportPeriod::parse("2026-11-22").unwrap().is_month());
    }

    #[test]
    fn impossible_or_malformed_periods_are_rejected_with_the_reason() {
        for (text, why) in [
            ("2026-13", "the month must be 01 to 12"),
            ("2026-00", "the month must be 01 to 12"),
            ("2026-1", "wrong length"),
            ("abc", "wrong length"),
            ("", "wrong length"),
            ("abcd-ef", "not digits in the form YYYY-MM"),
            ("2026/11", "not digits in the form YYYY-MM"),
            ("+026-11", "not digits in the form YYYY-MM"),
            ("2026-11-2x", "not digits in the form YYYY-MM-DD"),
            ("2026-11T22", "not digits in the form YYYY-MM-DD"),
            ("2026-02-29", "no such day in that month"),
            ("2026-04-31", "no such day in that month"),
            ("2026-11-00", "no such day in that month"),
            ("2026-13-01", "the month must be 01 to 12"),
        ] {
            let e = ReportPeriod::parse(text).unwrap_err();
            assert_eq!(e.why, why, "{text}");
            assert!(e.to_string().starts_with(&format!("`{text}` is not a period: {why}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, hour: u64) -> UnixMillis {
        Date { year: y, month: m, day: d }.start().saturating_add_ms(hour * MS_PER_HOUR)
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-800_000i64, -1, 0, 1, 59, 60, 10_957, 20_779, 2_000_000] {
            assert_eq!(Date::from_days(days).to_days(), days);
        }
        assert_eq!(Date::from_days(0), Date { year: 1970, month: 1, day: 1 });
        assert_eq!(UnixMillis(1_795_305_600_000).date().to_string(), "2026-11-22");
    }

    #[test]
    fn windows_follow_the_utc_calendar() {
        let now = at(2026, 11, 22, 10).saturating_add_ms(123_456);
        assert_eq!(Period::Hourly.window(now).start, at(2026, 11, 22, 10));
        assert_eq!(Period::Daily.window(now).start, at(2026, 11, 22, 0));
        assert_eq!(Period::Daily.window(now).end, at(2026, 11, 23, 0));
        // 2026-11-22 is a Sunday; its ISO week began on Monday the 16th.
        assert_eq!(Period::Weekly.window(now).start, at(2026, 11, 16, 0));
        assert_eq!(Period::Monthly.window(now).start, at(2026, 11, 1, 0));
        assert_eq!(Period::Monthly.window(now).end, at(2026, 12, 1, 0));
        let dec = at(2026, 12, 31, 23);
        assert_eq!(Period::Monthly.window(dec).end, at(2027, 1, 1, 0));
        let feb_leap = at(2028, 2, 29, 0);
        assert_eq!(Period::Monthly.window(feb_leap).end, at(2028, 3, 1, 0));
    }

    #[test]
    fn period_keys() {
        let now = at(2026, 11, 22, 10);
        assert_eq!(Period::Hourly.key(now), "2026-11-22T10");
        assert_eq!(Period::Daily.key(now), "2026-11-22");
        assert_eq!(Period::Weekly.key(now), "2026-W47");
        assert_eq!(Period::Monthly.key(now), "2026-11");
        // 2027-01-01 is a Friday: it belongs to ISO week 53 of 2026.
        assert_eq!(Period::Weekly.key(at(2027, 1, 1, 0)), "2026-W53");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("15m"), Some(900_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("10"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("5y"), None);
    }

    #[test]
    fn display_is_rfc3339() {
        assert_eq!(
            at(2026, 11, 22, 10).saturating_add_ms(5_123).to_string(),
            "2026-11-22T10:00:05.123Z"
        );
    }
}
