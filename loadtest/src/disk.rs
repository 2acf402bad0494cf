//! `run --data-dir DIR`: watches the data directory of the proxy under load, for the storage soak.
//!
//! Every second a thread reads the size of every file under `DIR`. The bytes the ledger and the
//! audit log wrote are the largest size each segment (`*.seg`) was seen at, summed (a segment
//! only grows until it is sealed; retention may remove it later): divided by the requests
//! completed, that is the bytes per request. The directory's total size over time shows whether
//! disk use stays flat once retention applies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the watch saw.
#[derive(Debug, Default)]
pub struct Samples {
    /// (time since the start, bytes of every file under the directory).
    pub sizes: Vec<(Duration, u64)>,
    /// Bytes written to segments (each segment at the largest size seen).
    pub written: u64,
    pub segments_seen: usize,
}

/// A running watch; [`Watch::finish`] stops it.
pub struct Watch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Samples>,
}

/// Starts watching `dir` every `every`.
pub fn watch(dir: PathBuf, every: Duration) -> Watch {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let start = Instant::now();
        let mut largest: HashMap<PathBuf, u64> = HashMap::new();
        let mut sizes = Vec::new();
        loop {
            let mut files = Vec::new();
            list(&dir, &mut files);
            let total = files.iter().map(|(_, len)| len).sum();
            sizes.push((start.elapsed(), total));
            for (path, len) in files {
                if path.extension().is_some_and(|e| e == "seg") {
                    let seen = largest.entry(path).or_default();
                    *seen = (*seen).max(len);
                }
            }
            if flag.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(every);
        }
        Samples { sizes, written: largest.values().sum(), segments_seen: largest.len() }
    });
    Watch { stop, handle }
}

impl Watch {
    /// Takes a last sample and returns them all.
    pub fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn list(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        match e.file_type() {
            Ok(t) if t.is_dir() => list(&e.path(), out),
            Ok(_) => out.push((e.path(), e.metadata().map_or(0, |m| m.len()))),
            Err(_) => {}
        }
    }
}

/// The report: bytes per request, and the directory's size at each tenth of the run.
pub fn report(samples: &Samples, requests: u64) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut out = format!(
        "data directory: {:.1} MiB written to {} segments for {requests} requests: {:.0} bytes per \
         request\n",
        mib(samples.written),
        samples.segments_seen,
        samples.written as f64 / requests.max(1) as f64
    );
    let Some(&(end, _)) = samples.sizes.last() else { return out };
    out.push_str("size on disk (MiB) at each tenth of the run:");
    for tenth in 1..=10 {
        let at = end.mul_f64(f64::from(tenth) / 10.0);
        let size = samples.sizes.iter().take_while(|(t, _)| *t <= at).last().map_or(0, |s| s.1);
        out.push_str(&format!(" {:.1}", mib(size)));
    }
    let half = end / 2;
    let max = |from: Duration, to: Duration| {
        samples.sizes.iter().filter(|(t, _)| *t >= from && *t <= to).map(|s| s.1).max().unwrap_or(0)
    };
    out.push_str(&format!(
        "\nlargest: {:.1} MiB in the first half, {:.1} MiB in the second\n",
        mib(max(Duration::ZERO, half)),
        mib(max(half, end))
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_count_at_their_largest_even_once_removed() {
        let dir = std::env::temp_dir().join(format!("tollgate-load-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ledger")).unwrap();
        let seg = dir.join("ledger").join("00000001.seg");
        std::fs::write(&seg, [0u8; 3000]).unwrap();
        std::fs::write(dir.join("head.json"), [0u8; 100]).unwrap();
        let w = watch(dir.clone(), Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(50));
        std::fs::remove_file(&seg).unwrap();
        std::fs::write(dir.join("ledger").join("00000002.seg"), [0u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let s = w.finish();
        assert_eq!((s.written, s.segments_seen), (4000, 2));
        assert_eq!(s.sizes.first().map(|s| s.1), Some(3100));
        assert_eq!(s.sizes.last().map(|s| s.1), Some(1100));
        let text = report(&s, 20);
        assert!(text.contains("for 20 requests: 200 bytes per request"), "{text}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
