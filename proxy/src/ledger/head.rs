//! The head: how many records the ledger and the audit log hold and the hash of the last of each.
//!
//! The proxy publishes the head of what it has synced on `GET /admin/ledger/head` and in
//! `<data_dir>/head.json` (atomically replaced after a sync, at most a second behind, exact after a
//! flush or a clean stop). A head kept elsewhere makes removing records from the end detectable:
//! `tollgate audit verify --head` checks that the ledger still holds the head's record count and
//! that its record at that count hashes to the head's hash (so later records may follow; earlier
//! ones cannot have changed, since every record links to the one before it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::chain;

/// The head of the ledger and of the audit log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub ledger: Tip,
    pub audit: Tip,
}

/// A count of records and the hash of the last one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tip {
    pub records: u64,
    /// Ledger: SHA-256 of the last line as written (without its newline). Audit log: the last
    /// record's `hash`. 64 zeros when there is none.
    pub last_hash: String,
}

impl Default for Tip {
    fn default() -> Tip {
        Tip { records: 0, last_hash: chain::hex(&chain::GENESIS) }
    }
}

/// `<data_dir>/head.json`.
pub fn checkpoint_path(data_dir: &Path) -> PathBuf {
    data_dir.join("head.json")
}

/// Replaces the checkpoint atomically (written aside, synced, renamed over).
pub fn write_checkpoint(path: &Path, head: &Head) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut file, head)?;
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

/// Parses a head (as the admin API and the checkpoint give it).
pub fn parse(text: &str) -> anyhow::Result<Head> {
    serde_json::from_str(text.trim()).map_err(|e| anyhow::anyhow!("not a ledger head: {e}"))
}

/// The checkpoint in `data_dir`, if there is one.
pub fn read_checkpoint(data_dir: &Path) -> anyhow::Result<Option<Head>> {
    let path = checkpoint_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).map(Some).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

/// Checks that a log of `records` records whose record number `tip.records` hashes to
/// `hash_at` still holds what `tip` describes. `what` names the log in the message.
pub fn compare(what: &str, tip: &Tip, records: u64, hash_at: Option<&str>) -> Result<(), String> {
    if tip.records == 0 {
        return Ok(());
    }
    if records < tip.records {
        return Err(format!(
            "{what} holds {records} records but the head says {}: records were removed from its \
             end",
            tip.records
        ));
    }
    if hash_at != Some(tip.last_hash.as_str()) {
        return Err(format!(
            "{what}'s record {} does not hash to the head's {}: the records up to it were rewritten",
            tip.records, tip.last_hash
        ));
    }
    Ok(())
}
