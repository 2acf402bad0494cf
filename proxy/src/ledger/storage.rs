//! How much the data directory takes, how much its volume has free, and when it will be full at
//! the rate it has grown over the last hour: for `/metrics` and `/readyz`.
//!
//! Read on demand (a scrape, a readiness probe): the sizes of the files under the data directory
//! and the volume's free space (`statvfs`). Each reading is kept for an hour; the growth between
//! the oldest and the newest (at least a minute apart) projects when the free space runs out.
//! While the directory is not growing (retention removes as much as is written) the projection
//! is `+Inf`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back the growth is measured.
const WINDOW: Duration = Duration::from_secs(3600);
/// The shortest span a projection is made from.
const MIN_SPAN: Duration = Duration::from_secs(60);

/// One reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    pub data_bytes: u64,
    pub free_bytes: u64,
    /// `+Inf` while the data is not growing or there is too little history.
    pub hours_until_full: f64,
}

/// Readings of one data directory.
#[derive(Debug)]
pub struct Monitor {
    data_dir: PathBuf,
    /// The volume's size when it is not the filesystem's (`ledger.volume_bytes`: an `emptyDir`
    /// with a `sizeLimit` shares the node's disk, and is evicted past its limit).
    limit: Option<u64>,
    samples: Mutex<VecDeque<(Instant, u64)>>,
    /// When the last low-space warning was logged.
    warned: Mutex<Option<Instant>>,
}

impl Monitor {
    pub fn new(data_dir: &Path, limit: Option<u64>) -> Monitor {
        Monitor {
            data_dir: data_dir.to_path_buf(),
            limit,
            samples: Mutex::new(VecDeque::new()),
            warned: Mutex::new(None),
        }
    }

    /// Reads the sizes now and projects.
    pub fn read(&self) -> Reading {
        let data_bytes = dir_bytes(&self.data_dir);
        let mut free_bytes = free_bytes(&self.data_dir).unwrap_or(0);
        if let Some(limit) = self.limit {
            free_bytes = free_bytes.min(limit.saturating_sub(data_bytes));
        }
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while samples.front().is_some_and(|(t, _)| now.duration_since(*t) > WINDOW) {
            samples.pop_front();
        }
        samples.push_back((now, data_bytes));
        let hours_until_full = match samples.front() {
            Some(&(t, bytes)) => project(now.duration_since(t), bytes, data_bytes, free_bytes),
            None => f64::INFINITY,
        };
        Reading { data_bytes, free_bytes, hours_until_full }
    }

    /// True at most once a minute: whether to log a low-space warning now.
    pub fn warn_now(&self) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *warned {
            Some(t) if t.elapsed() < Duration::from_secs(60) => false,
            _ => {
                *warned = Some(Instant::now());
                true
            }
        }
    }
}

/// Hours until `free` bytes are used at the growth from `then` to `now` bytes over `span`.
pub fn project(span: Duration, then: u64, now: u64, free: u64) -> f64 {
    if span < MIN_SPAN || now <= then {
        return f64::INFINITY;
    }
    let per_hour = (now - then) as f64 / span.as_secs_f64() * 3600.0;
    free as f64 / per_hour
}

/// The bytes of every file under `dir` (the ledger, the audit log, checkpoints, journals).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Bytes available to this process on the volume of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projection_needs_a_minute_of_growth() {
        let minute = Duration::from_secs(60);
        assert_eq!(project(Duration::from_secs(30), 0, 1000, 1000), f64::INFINITY);
        assert_eq!(project(minute, 1000, 1000, 1000), f64::INFINITY, "flat");
        assert_eq!(project(minute, 2000, 1000, 1000), f64::INFINITY, "shrinking");
        // 1 MB a minute, 60 MB free: one hour.
        assert!((project(minute, 0, 1_000_000, 60_000_000) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_reading_counts_every_file_and_sees_free_space() {
        let dir = std::env::temp_dir().join(format!("tollgate-storage-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ledger")).unwrap();
        std::fs::write(dir.join("ledger").join("00000001.seg"), [0u8; 1000]).unwrap();
        std::fs::write(dir.join("head.json"), [0u8; 24]).unwrap();
        let monitor = Monitor::new(&dir, None);
        let r = monitor.read();
        assert_eq!(r.data_bytes, 1024);
        assert!(r.free_bytes > 0);
        // A volume smaller than the filesystem: what is left of it.
        assert_eq!(Monitor::new(&dir, Some(4096)).read().free_bytes, 3072);
        assert_eq!(r.hours_until_full, f64::INFINITY, "no history yet");
        assert!(monitor.warn_now() && !monitor.warn_now(), "once a minute");
        let _ = std::fs::remove_dir_all(dir);
    }
}
