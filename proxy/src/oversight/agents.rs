//! The agents disabled by error escalation, kept in `<data_dir>/disabled-agents.json` so that a
//! restart does not re-enable them: only an operator does (`POST /admin/agents/{agent}/enable`).
//!
//! The file holds the whole set (`{"disabled": ["agent", ...]}`) and is replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory). Changes are rare (an agent
//! crossing `disable_at`, an operator's re-enable); each takes a numbered snapshot of the set and
//! the writer skips a snapshot older than the one already on disk, so writes that race end with
//! the newest set.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

const FILE: &str = "disabled-agents.json";

#[derive(Serialize, Deserialize)]
struct Stored {
    disabled: Vec<String>,
}

/// The set of disabled agents as of one change.
pub struct Snapshot {
    generation: u64,
    agents: Vec<String>,
}

pub struct DisabledAgents {
    path: PathBuf,
    generation: AtomicU64,
    /// The generation on disk; held while writing.
    written: Mutex<u64>,
}

impl DisabledAgents {
    /// Opens the file in `dir` and returns the agents it lists (none when it does not exist).
    /// A file that cannot be read is an error naming it: starting with every agent re-enabled
    /// would undo the operators' decisions silently.
    pub fn open(dir: &Path) -> io::Result<(DisabledAgents, Vec<String>)> {
        let path = dir.join(FILE);
        let agents = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<Stored>(&bytes)
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{}: {e} (expected {{\"disabled\": [\"agent\", ...]}})",
                                path.display()
                            ),
                        )
                    })?
                    .disabled
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let store = DisabledAgents { path, generation: AtomicU64::new(0), written: Mutex::new(0) };
        Ok((store, agents))
    }

    /// Numbers `agents`, the set right after a change. Take it after applying the change, so
    /// that the newest snapshot includes every change before it.
    pub fn snapshot(&self, agents: Vec<String>) -> Snapshot {
        Snapshot { generation: self.generation.fetch_add(1, Ordering::AcqRel) + 1, agents }
    }

    /// Replaces the file with `snapshot` unless a newer one is already written. Blocking (fsync).
    pub fn write(&self, snapshot: Snapshot) -> io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        if *written >= snapshot.generation {
            return Ok(());
        }
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec(&Stored { disabled: snapshot.agents })?;
        let mut file = File::create(&tmp)?;
        file.write_all(&body)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        *written = snapshot.generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tollgate-disabled-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_newest_snapshot_wins_and_survives_reopening() {
        let dir = dir("newest");
        let (store, agents) = DisabledAgents::open(&dir).unwrap();
        assert!(agents.is_empty());
        let older = store.snapshot(vec!["a".into()]);
        let newer = store.snapshot(vec!["a".into(), "b".into()]);
        store.write(newer).unwrap();
        store.write(older).unwrap(); // late: skipped
        let (_, agents) = DisabledAgents::open(&dir).unwrap();
        assert_eq!(agents, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = dir("corrupt");
        fs::write(dir.join(FILE), b"{\"disabled\": [1").unwrap();
        let err = DisabledAgents::open(&dir).err().expect("corrupt file refused");
        assert!(err.to_string().contains("disabled-agents.json"), "{err}");
    }
}
