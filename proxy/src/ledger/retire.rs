//! Retention: retiring old segments of the ledger and the audit log so that the data directory
//! stops growing, without losing what budgets, invoices and `audit verify` need.
//!
//! A sealed ledger segment (never the one being written) is retired only when every record in it
//! is settled (a reservation has its usage record, or has expired and been released), has been
//! acknowledged by the collector when records are shipped (the export's cursor is past it), and
//! is older than `ledger.retention`; segments retire oldest first, so what is kept is always the
//! end of the chain. An audit segment retires when it is sealed and every record in it is older
//! than the retention.
//!
//! Retiring first replaces the checkpoint `<data_dir>/ledger/retired.json` (written aside, synced,
//! renamed over), then removes the files; a crash between the two leaves files the checkpoint
//! already covers, which are removed on the next start. The checkpoint ([`crate::store::retired`])
//! keeps, for the ledger and the audit log, how many records were retired, the hash of the last
//! one and the link the first kept record carries, and, for the ledger, the last sequence number
//! and the usage totals of the retired records ([`Group`]), which a pass here adds to.

use std::collections::BTreeMap;
use std::path::Path;

#[cfg(test)]
use tollgate_core::money::Money;
use tollgate_core::pricing::Cost;
use tollgate_core::record::{Entry, Stored, UsageRecord};
use tollgate_core::usage::Usage;

use super::codec::decode;
use crate::store::chain::{self, Linker};
use crate::store::retired::{read, write, Group, Retired};

type Key = (
    String,
    u64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Vec<String>,
    bool,
);

fn add(groups: &mut BTreeMap<Key, Group>, r: &UsageRecord) {
    let day = r.ts.get(..10).unwrap_or(&r.ts).to_string();
    let reserved_day_ms = r.reserved_at_ms / 86_400_000 * 86_400_000;
    let key = (
        day.clone(),
        reserved_day_ms,
        r.agent.clone(),
        r.cost_center.clone(),
        r.project.clone(),
        r.business_unit.clone(),
        r.model.clone(),
        r.tool.clone(),
        r.budgets.clone(),
        r.cost.is_some(),
    );
    let g = groups.entry(key).or_insert_with(|| Group {
        day,
        reserved_day_ms,
        agent: r.agent.clone(),
        cost_center: r.cost_center.clone(),
        project: r.project.clone(),
        business_unit: r.business_unit.clone(),
        model: r.model.clone(),
        tool: r.tool.clone(),
        budgets: r.budgets.clone(),
        bucketed: r.cost.is_some(),
        requests: 0,
        per_call_requests: 0,
        tokens: Usage::default(),
        cost: Cost::default(),
    });
    g.requests += 1;
    let t = &mut g.tokens;
    t.input += r.tokens.input;
    t.cached_input += r.tokens.cached_input;
    t.cache_write += r.tokens.cache_write;
    t.output += r.tokens.output;
    t.reasoning += r.tokens.reasoning;
    let c = &mut g.cost;
    if let Some(b) = r.cost {
        g.per_call_requests += u64::from(!b.per_call.is_zero());
        c.input += b.input;
        c.cached_input += b.cached_input;
        c.cache_write += b.cache_write;
        c.output += b.output;
        c.reasoning += b.reasoning;
        c.per_call += b.per_call;
    }
    c.total += r.cost_total();
}

/// When a segment may retire.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub retention_ms: u64,
    pub now_ms: u64,
    /// The segment being written (never retired), for the ledger and the audit log.
    pub ledger_current: u64,
    pub audit_current: u64,
    /// The export's cursor, when records are shipped: a segment retires once it is past.
    pub acknowledged: Option<super::cursor::Cursor>,
}

/// What a retirement pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub ledger_segments: usize,
    pub audit_segments: usize,
    pub bytes: u64,
}

/// Retires what `policy` allows, oldest segment first. Errors leave everything as it was.
pub fn run(data_dir: &Path, linker: &Linker, policy: &Policy) -> anyhow::Result<Outcome> {
    let mut checkpoint = read(data_dir, Some(linker))?.unwrap_or_default();
    let mut outcome = Outcome::default();
    let mut groups: BTreeMap<Key, Group> = BTreeMap::new();
    for g in std::mem::take(&mut checkpoint.groups) {
        let key = (
            g.day.clone(),
            g.reserved_day_ms,
            g.agent.clone(),
            g.cost_center.clone(),
            g.project.clone(),
            g.business_unit.clone(),
            g.model.clone(),
            g.tool.clone(),
            g.budgets.clone(),
            g.bucketed,
        );
        groups.insert(key, g);
    }
    let mut ledger_files = Vec::new();
    let dir = data_dir.join("ledger");
    let segments: Vec<u64> = crate::store::segments(&dir)?
        .into_iter()
        .filter(|&n| n > checkpoint.ledger.through_segment)
        .collect();
    for (i, &n) in segments.iter().enumerate() {
        if n >= policy.ledger_current {
            break;
        }
        let path = chain::segment_path(&dir, n);
        let len = std::fs::metadata(&path)?.len();
        if let Some(cursor) = policy.acknowledged {
            let past = cursor.segment > n || (cursor.segment == n && cursor.offset >= len);
            if !past {
                break;
            }
        }
        let mut records: Vec<Stored> = Vec::new();
        let walk = chain::walk_from(&dir, &[n], linker, &[], checkpoint.ledger.start(), |b, _| {
            records.push(decode(b)?);
            Ok(())
        })?;
        if !walk.problems.is_empty() || walk.torn.is_some() {
            anyhow::bail!(
                "{}: does not verify ({}); not retired",
                path.display(),
                walk.problems.first().map_or("torn".to_string(), |p| p.to_string())
            );
        }
        let newest = records.iter().filter_map(|r| r.entry.reserved_at_ms()).max().unwrap_or(0);
        if newest.saturating_add(policy.retention_ms) > policy.now_ms {
            break;
        }
        if !settled(&dir, &segments[i..], &records, policy.now_ms)? {
            break;
        }
        for r in records.iter().filter_map(|s| s.entry.usage()) {
            add(&mut groups, r);
        }
        checkpoint.last_seq =
            records.iter().map(|r| r.seq).max().unwrap_or(0).max(checkpoint.last_seq);
        checkpoint.ledger = Retired {
            through_segment: n,
            records: checkpoint.ledger.records + walk.records,
            last_hash: chain::hex(&walk.last_hash),
            next_link: chain::hex(&walk.next_link),
        };
        outcome.ledger_segments += 1;
        outcome.bytes += len;
        ledger_files.push(path);
    }
    // The audit log: sealed segments whose every record is older than the retention.
    let mut audit_files = Vec::new();
    let adir = crate::audit::dir(data_dir);
    let asegments: Vec<u64> = match crate::store::segments(&adir) {
        Ok(s) => s.into_iter().filter(|&n| n > checkpoint.audit.through_segment).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let legacy = crate::audit::legacy_start(data_dir)?;
    for &n in &asegments {
        if n >= policy.audit_current {
            break;
        }
        let path = chain::segment_path(&adir, n);
        let start = match checkpoint.audit.records {
            0 => legacy,
            _ => checkpoint.audit.start(),
        };
        let mut newest = 0u64;
        let walk = chain::walk_from(&adir, &[n], linker, &[], start, |b, _| {
            let ts = crate::audit::event::decode_ts(b)?;
            newest = newest.max(tollgate_core::record::compact::parse_ts(&ts).unwrap_or(u64::MAX));
            Ok(())
        })?;
        if !walk.problems.is_empty() || walk.torn.is_some() {
            anyhow::bail!("{}: does not verify; not retired", path.display());
        }
        if newest.saturating_add(policy.retention_ms) > policy.now_ms {
            break;
        }
        checkpoint.audit = Retired {
            through_segment: n,
            records: checkpoint.audit.records + walk.records,
            last_hash: chain::hex(&walk.last_hash),
            next_link: chain::hex(&walk.next_link),
        };
        outcome.audit_segments += 1;
        outcome.bytes += std::fs::metadata(&path)?.len();
        audit_files.push(path);
    }
    if ledger_files.is_empty() && audit_files.is_empty() {
        return Ok(outcome);
    }
    checkpoint.groups = groups.into_values().collect();
    write(data_dir, &checkpoint, linker)?;
    for file in ledger_files.iter().chain(&audit_files) {
        std::fs::remove_file(file)?;
    }
    Ok(outcome)
}

/// Whether every reservation in `records` (of `segments[0]`) is settled by a usage record there
/// or in a later segment, or has expired (and so been released).
fn settled(dir: &Path, segments: &[u64], records: &[Stored], now_ms: u64) -> anyhow::Result<bool> {
    let used: std::collections::HashSet<&str> =
        records.iter().filter_map(|s| s.entry.usage()).map(UsageRecord::reservation_key).collect();
    let mut open: std::collections::HashSet<String> = records
        .iter()
        .filter_map(|s| match &s.entry {
            Entry::Reserve(r) if r.expires_at_ms > now_ms => Some(r),
            _ => None,
        })
        .filter(|r| !used.contains(r.reservation_key()))
        .map(|r| r.reservation_key().to_string())
        .collect();
    for &n in &segments[1..] {
        if open.is_empty() {
            break;
        }
        chain::walk(dir, &[n], &Linker::new(None), &[], |b, _| {
            if let Entry::Usage(r) = decode(b)?.entry {
                open.remove(r.reservation_key());
            }
            Ok(())
        })?;
    }
    Ok(open.is_empty())
}

#[cfg(test)]
mod tests;
