//! The retirement checkpoint, `<data_dir>/ledger/retired.json`: what retention
//! (`ledger::retire`) has removed from the start of the ledger and of the audit log, so that each
//! log knows where its kept segments start.
//!
//! For each log it keeps how many records were retired, the hash of the last one and the link the
//! first kept record carries, so the chain over what is kept still starts where it must
//! ([`Retired`]); for the ledger also the last sequence number and the usage totals by day,
//! attribution, model, tool and budgets ([`Group`]): invoices and `/admin/usage` over retired
//! days add them, and the budget rebuild at start charges them. It is replaced atomically
//! (written aside, synced, renamed over). With a ledger key it carries an HMAC of its contents,
//! so it cannot be rewritten to hide more removed records without the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tollgate_core::pricing::Cost;
use tollgate_core::record::UsageRecord;
use tollgate_core::usage::Usage;

use super::chain::{self, Linker};

/// What has been retired.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub ledger: Retired,
    pub audit: Retired,
    /// The last sequence number retired (the next record continues after it).
    #[serde(default)]
    pub last_seq: u64,
    /// Usage totals of the retired ledger records.
    #[serde(default)]
    pub groups: Vec<Group>,
    /// `h` and the HMAC-SHA256 of the checkpoint without this field, when the ledger is keyed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

/// The retired start of one chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retired {
    /// Segments up to this number are retired.
    pub through_segment: u64,
    pub records: u64,
    /// SHA-256 of the last retired record as written.
    pub last_hash: String,
    /// The link the first kept record carries (64 hex digits).
    pub next_link: String,
}

impl Default for Retired {
    fn default() -> Retired {
        let zero = chain::hex(&chain::GENESIS);
        Retired { through_segment: 0, records: 0, last_hash: zero.clone(), next_link: zero }
    }
}

impl Retired {
    /// The link the first kept record carries.
    pub fn start(&self) -> [u8; 32] {
        chain::unhex(self.next_link.as_bytes()).unwrap_or(chain::GENESIS)
    }
}

/// The usage totals of retired records that share a day, attribution, model, tool and budgets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The day of the records' `ts` (what invoices select by).
    pub day: String,
    /// The day their reservations were made (what budgets are charged by), in Unix ms.
    pub reserved_day_ms: u64,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    pub business_unit: Option<String>,
    pub model: Option<String>,
    pub tool: Option<String>,
    pub budgets: Vec<String>,
    /// Whether the records carry cost buckets (all do but the oldest).
    pub bucketed: bool,
    pub requests: u64,
    /// Requests with a per-call price.
    pub per_call_requests: u64,
    pub tokens: Usage,
    pub cost: Cost,
}

impl Group {
    /// The totals as one usage record (for invoices and the budget rebuild); `n` makes its ids
    /// unique.
    pub fn as_record(&self, n: usize) -> UsageRecord {
        let id = format!("retired-{}-{n}", self.day);
        UsageRecord {
            ts: format!("{}T00:00:00.000Z", self.day),
            reserved_at_ms: self.reserved_day_ms,
            request_id: id.clone(),
            reservation_id: id,
            agent: self.agent.clone(),
            cost_center: self.cost_center.clone(),
            project: self.project.clone(),
            business_unit: self.business_unit.clone(),
            route: String::new(),
            provider: String::new(),
            model: self.model.clone(),
            tool: self.tool.clone(),
            tokens: self.tokens,
            cost: self.bucketed.then_some(self.cost),
            cost_usd: self.cost.total,
            cost_nano_usd: self.cost.total.nanos(),
            decision: tollgate_core::record::Decision::Allow,
            reason: String::new(),
            clause: String::new(),
            policy_version: String::new(),
            budgets: self.budgets.clone(),
            status: 200,
            latency_ms: 0,
            usage_source: tollgate_core::record::UsageSource::Reported,
            price_source: None,
            end: tollgate_core::record::End::Complete,
            source: None,
            source_event_id: None,
        }
    }
}

/// `<data_dir>/ledger/retired.json`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger").join("retired.json")
}

/// The checkpoint, if anything was retired. With `linker` keyed, its HMAC must hold.
pub fn read(data_dir: &Path, linker: Option<&Linker>) -> anyhow::Result<Option<Checkpoint>> {
    let path = path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    let checkpoint: Checkpoint = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a retirement checkpoint: {e}", path.display()))?;
    if let Some(linker) = linker.filter(|l| l.mode() == chain::Mode::Hmac) {
        if checkpoint.mac.is_empty() {
            // Written before the key was configured (like records linked before it): it cannot be
            // vouched for, and `audit verify` says so; the next retirement signs it.
            tracing::warn!(
                path = %path.display(),
                "the retirement checkpoint carries no HMAC (written before the ledger key was \
                 configured)"
            );
        } else if checkpoint.mac != mac(&checkpoint, linker) {
            anyhow::bail!(
                "{}: its HMAC does not hold: the checkpoint was changed (or written under \
                 another key)",
                path.display()
            );
        }
    }
    Ok(Some(checkpoint))
}

fn mac(checkpoint: &Checkpoint, linker: &Linker) -> String {
    let unsigned = Checkpoint { mac: String::new(), ..checkpoint.clone() };
    let bytes = serde_json::to_vec(&unsigned).unwrap_or_default();
    format!("h{}", chain::hex(&linker.link_after(&bytes)))
}

/// Replaces the checkpoint (written aside, synced, renamed over), signed when `linker` is keyed.
pub(crate) fn write(
    data_dir: &Path,
    checkpoint: &Checkpoint,
    linker: &Linker,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut checkpoint = checkpoint.clone();
    checkpoint.mac = match linker.mode() {
        chain::Mode::Hmac => mac(&checkpoint, linker),
        chain::Mode::Sha256 => String::new(),
    };
    let path = path(data_dir);
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut file, &checkpoint)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
