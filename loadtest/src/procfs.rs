//! Reads a process's CPU time and peak memory from `/proc` (Linux), and resets the peak.
//!
//! CPU is `utime + stime` of the whole process (all threads) in clock ticks; peak memory is
//! `VmHWM` (the resident set's high-water mark). Parses text; never signals or changes a
//! process except by resetting its high-water mark.

use std::time::Duration;

/// A `/proc` file did not have the expected shape.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProcError {
    #[error("/proc/<pid>/stat: no `)` closing the command name")]
    NoCommandEnd,
    #[error("/proc/<pid>/stat: field {field} missing or not a number")]
    StatField { field: usize },
    #[error("/proc/<pid>/status: no `{key}` line")]
    MissingKey { key: &'static str },
    #[error("/proc/<pid>/status: `{key}` is not `<number> kB`")]
    BadValue { key: &'static str },
}

/// User plus system CPU time in clock ticks (`utime` and `stime`, fields 14 and 15 of
/// `/proc/<pid>/stat`).
pub fn parse_cpu_ticks(stat: &str) -> Result<u64, ProcError> {
    // The command name (field 2) may hold spaces and parentheses: split after the last `)`.
    let rest = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or(ProcError::NoCommandEnd)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is fields[n - 3].
    let field = |n: usize| -> Result<u64, ProcError> {
        fields.get(n - 3).and_then(|f| f.parse().ok()).ok_or(ProcError::StatField { field: n })
    };
    Ok(field(14)? + field(15)?)
}

/// A `kB` line of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn parse_status_bytes(status: &str, key: &'static str) -> Result<u64, ProcError> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .ok_or(ProcError::MissingKey { key })?;
    let kib = line
        .trim()
        .strip_suffix("kB")
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or(ProcError::BadValue { key })?;
    Ok(kib * 1024)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, the Linux value, if that fails).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// A process's CPU time so far.
pub fn cpu_time(pid: u32, ticks_per_second: u64) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat)?;
    Ok(Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / ticks_per_second.max(1)))
}

/// A process's peak resident set (bytes) since it started or since [`reset_peak_rss`].
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_status_bytes(&status, "VmHWM")?)
}

/// A process's current resident set (bytes).
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_status_bytes(&status, "VmRSS")?)
}

/// Resets `VmHWM` to the current resident set (`echo 5 > /proc/<pid>/clear_refs`), so that
/// each round reports its own peak. Returns false where the kernel does not allow it.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (tokio-rt (worker) x) S 1 4242 4242 0 -1 4194560 1523 0 0 0 \
        731 268 0 0 20 0 3 0 1186 22528000 1780 18446744073709551615 1 1 0 0 0 0 0 4096 1260 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn cpu_ticks_add_utime_and_stime_after_a_tricky_command_name() {
        assert_eq!(parse_cpu_ticks(STAT), Ok(731 + 268));
    }

    #[test]
    fn truncated_or_unnamed_stat_lines_are_errors() {
        assert_eq!(parse_cpu_ticks("12 (x) S 1 2 3"), Err(ProcError::StatField { field: 14 }));
        assert_eq!(parse_cpu_ticks("12 x S 1"), Err(ProcError::NoCommandEnd));
    }

    #[test]
    fn status_values_are_read_in_bytes() {
        let status = "Name:\ttollgate\nVmPeak:\t  100 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 2048 kB\n";
        assert_eq!(parse_status_bytes(status, "VmHWM"), Ok(12345 * 1024));
        assert_eq!(parse_status_bytes(status, "VmRSS"), Ok(2048 * 1024));
        assert_eq!(
            parse_status_bytes("VmHWM:\t12 MB\n", "VmHWM"),
            Err(ProcError::BadValue { key: "VmHWM" })
        );
        assert_eq!(
            parse_status_bytes(status, "VmSwap"),
            Err(ProcError::MissingKey { key: "VmSwap" })
        );
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak() {
        let pid = std::process::id();
        let ticks = clock_ticks_per_second();
        assert!(cpu_time(pid, ticks).is_ok());
        assert!(peak_rss(pid).unwrap() > 0);
    }
}
