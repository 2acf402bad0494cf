//! `tollgate audit verify`: the ledger, the audit log and published heads, in one report.
//!
//! The ledger: every checksum, every record, every link (keyed links with the key), naming the
//! first bad `segment:line`. The audit log: the same over its segments, after the single-file log
//! of older versions where there is one ([`crate::audit::verify`]). The heads:
//! the checkpoint the proxy keeps in the data directory (`head.json`) and, with `--head`, one kept
//! elsewhere (a file, the admin API's URL, or the JSON itself); each must still be covered (the
//! record counts reached, the records at those counts unchanged), so records removed from the end
//! are found.
//!
//! Exit codes: 0 everything verified; 1 tampered or corrupt (a bad line, a broken link, a log
//! shorter than a head, a missing log); 2 nothing to verify or an error (no such directory, no
//! Tollgate data in it, a bad argument); 3 only a torn last line (a crash mid-write); 4 intact as
//! far as it could be checked, but some of it could not be (records from before chaining existed,
//! keyed links without the key).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::audit::{self, Verdict};
use crate::ledger::head::{self, Head};
use crate::store::chain::{self, KeySource, Mode, Problem, Walk};

/// What to verify and with what.
pub struct Args {
    pub data_dir: PathBuf,
    pub key: Option<KeySource>,
    /// A file, an `http://` URL (the admin API's `/admin/ledger/head`) or the head's JSON.
    pub head: Option<String>,
    /// The variable holding the admin token, for a URL.
    pub token_env: String,
}

/// How bad a finding is; the worst decides the exit code (2, nothing to verify or an error,
/// ends the run at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Severity {
    Ok,
    Unverifiable,
    Torn,
    Tampered,
}

impl Severity {
    fn code(self) -> u8 {
        match self {
            Severity::Ok => 0,
            Severity::Tampered => 1,
            Severity::Torn => 3,
            Severity::Unverifiable => 4,
        }
    }
}

pub fn run(args: Args) -> ExitCode {
    let dir = &args.data_dir;
    let ledger_dir = dir.join("ledger");
    let audit_dir = audit::dir(dir);
    let legacy_path = audit::legacy_path(dir);
    if !dir.is_dir() {
        eprintln!("{}: no such directory (the proxy's data_dir): nothing to verify", dir.display());
        return ExitCode::from(2);
    }
    let segments = match crate::store::segments(&ledger_dir) {
        Ok(segments) => segments,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            eprintln!("reading {}: {e}", ledger_dir.display());
            return ExitCode::from(2);
        }
    };
    if segments.is_empty() && !audit::exists(dir) {
        eprintln!(
            "{}: no Tollgate data here (no ledger/*.seg, no audit log): wrong --data-dir, or \
             everything was removed; nothing to verify",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let key = match args.key.as_ref().map(KeySource::load).transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let mut heads: Vec<(String, Head)> = Vec::new();
    match head::read_checkpoint(dir) {
        Ok(Some(h)) => heads.push((head::checkpoint_path(dir).display().to_string(), h)),
        Ok(None) => {}
        Err(e) => {
            println!("{e:#}");
            return ExitCode::from(Severity::Tampered.code());
        }
    }
    if let Some(source) = &args.head {
        match load_head(source, &args.token_env) {
            Ok(h) => heads.push((source.clone(), h)),
            Err(e) => {
                eprintln!("--head {source}: {e:#}");
                return ExitCode::from(2);
            }
        }
    }

    let mut worst = Severity::Ok;
    // The retirement checkpoint: with the key, its HMAC must hold.
    let linker = chain::Linker::new(key.as_ref());
    match crate::store::retired::read(dir, Some(&linker)) {
        Err(e) => {
            println!("TAMPERED: {e:#}");
            worst = worst.max(Severity::Tampered);
        }
        Ok(Some(c)) if key.is_some() && c.mac.is_empty() => {
            println!(
                "{}: NOT KEYED: the retirement checkpoint carries no HMAC (written before the key \
                 was configured): its counts cannot be vouched for",
                crate::store::retired::path(dir).display()
            );
            worst = worst.max(Severity::Unverifiable);
        }
        Ok(_) => {}
    }
    // The ledger.
    let wanted: Vec<u64> = heads.iter().map(|(_, h)| h.ledger.records).collect();
    let walk = if segments.is_empty() {
        println!(
            "{}: MISSING: no ledger segments, although the audit log is there (the proxy creates \
             both): removed",
            ledger_dir.display()
        );
        worst = worst.max(Severity::Tampered);
        None
    } else {
        match crate::ledger::verify(dir, key.as_ref(), &wanted) {
            Ok(walk) => {
                let (line, severity) = ledger_report(&ledger_dir, &walk, key.is_some());
                println!("{line}");
                worst = worst.max(severity);
                Some(walk)
            }
            Err(e) => {
                eprintln!("reading {}: {e}", ledger_dir.display());
                return ExitCode::from(2);
            }
        }
    };
    // The audit log.
    let mut audit_records = None;
    let mut audit_report = None;
    if audit::exists(dir) {
        let wanted: Vec<u64> = heads.iter().map(|(_, h)| h.audit.records).collect();
        let report = match audit::verify(dir, key.as_ref(), &wanted) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("reading the audit log in {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        };
        let mut intact = report.walk.problems.is_empty();
        if let Some(verdict) = &report.legacy {
            println!("{}: {verdict}", legacy_path.display());
            let severity = match verdict {
                Verdict::Ok { .. } => Severity::Ok,
                // The single-file log is no longer written: the segments continue it.
                Verdict::TornTail { .. } if report.walk.records > 0 => Severity::Tampered,
                Verdict::TornTail { .. } => Severity::Torn,
                Verdict::Tampered { .. } => Severity::Tampered,
            };
            intact &= severity != Severity::Tampered;
            worst = worst.max(severity);
        }
        if audit_dir.is_dir() {
            let mut walk = report.walk.clone();
            walk.records += report.retired_records;
            walk.retired = report.retired_records;
            let (line, severity) = ledger_report(&audit_dir, &walk, key.is_some());
            println!("{line}");
            worst = worst.max(severity);
        }
        if intact {
            audit_records = Some(report.records());
        }
        audit_report = Some(report);
    } else {
        println!(
            "{}: MISSING, although the ledger is there (the proxy creates both): removed",
            audit_dir.display()
        );
        worst = worst.max(Severity::Tampered);
    }
    // The heads.
    for (name, h) in &heads {
        let audit_at = audit_report.as_ref().map(|r| {
            let n = h.audit.records;
            let retired = n > r.legacy_records && n < r.legacy_records + r.retired_records;
            audit_hash_at(dir, r, n)
                .map(|at| at.or_else(|| retired.then(|| h.audit.last_hash.clone())))
        });
        let (line, severity) = head_report(name, h, walk.as_ref(), audit_at, audit_records);
        println!("{line}");
        worst = worst.max(severity);
    }
    ExitCode::from(worst.code())
}

/// The ledger's line of the report.
fn ledger_report(dir: &Path, walk: &Walk, keyed: bool) -> (String, Severity) {
    if let Some(first) = walk.problems.first() {
        let word = match first {
            Problem::Corrupt { .. } => "CORRUPT",
            _ => "TAMPERED",
        };
        let mut line = format!("{}: {word} at {first}", dir.display());
        for more in walk.problems.iter().skip(1).take(9) {
            line.push_str(&format!("\n  and at {more}"));
        }
        if walk.problems.len() > 10 {
            line.push_str(&format!("\n  ({} problems in all)", walk.problems.len()));
        }
        return (line, Severity::Tampered);
    }
    let segments = walk.segments.len();
    let mut line = format!(
        "{}: OK: {} records in {segments} segment{}",
        dir.display(),
        walk.records,
        if segments == 1 { "" } else { "s" }
    );
    if walk.retired > 0 {
        line.push_str(&format!(
            " (the first {} in retired segments, vouched for by ledger/retired.json)",
            walk.retired
        ));
    }
    let mut severity = Severity::Ok;
    match walk.last_mode {
        Some(Mode::Hmac) if walk.unchecked == 0 => line.push_str(", chain intact (HMAC-SHA256)"),
        Some(Mode::Hmac) => {
            line.push_str(&format!(
                ", chain intact as far as it could be checked: {} keyed links NOT checked (no \
                 key: --hmac-key-file, --hmac-key-env or the config's ledger.hmac_key_*)",
                walk.unchecked
            ));
            severity = Severity::Unverifiable;
        }
        Some(Mode::Sha256) => line.push_str(", chain intact (SHA-256)"),
        None => {}
    }
    if keyed && walk.records > 0 && walk.keyed_from.is_none() {
        line.push_str(
            "; NOT KEYED: no record carries an HMAC link although a key was given (written \
             before the key was configured, or the chain was recomputed without it)",
        );
        severity = Severity::Unverifiable;
    }
    if walk.unchained > 0 {
        let before = walk.chained_from.as_ref().map_or("the end".to_string(), |p| p.to_string());
        line.push_str(&format!(
            "; unchained before {before}: {} records written before chaining existed are \
             checked by their checksum only",
            walk.unchained
        ));
        severity = Severity::Unverifiable;
    }
    if let Some(torn) = &walk.torn {
        line.push_str(&format!(
            "; {} is a torn tail ({} bytes without a newline: a write cut short by a crash, not \
             tampering)",
            torn.at, torn.bytes
        ));
        severity = severity.max(Severity::Torn);
    }
    (line, severity)
}

/// One head's line of the report.
fn head_report(
    name: &str,
    h: &Head,
    walk: Option<&Walk>,
    audit_at: Option<std::io::Result<Option<String>>>,
    audit_records: Option<u64>,
) -> (String, Severity) {
    let mut problems = Vec::new();
    if let Some(walk) = walk {
        let at = walk
            .hashes_at
            .iter()
            .find(|(n, _, _)| *n == h.ledger.records)
            .map(|(_, hash, _)| chain::hex(hash))
            // Inside the retired records: vouched for by the retirement checkpoint (only the last
            // retired record's hash is kept).
            .or_else(|| (h.ledger.records < walk.retired).then(|| h.ledger.last_hash.clone()));
        if let Err(e) = head::compare("the ledger", &h.ledger, walk.records, at.as_deref()) {
            problems.push(e);
        }
    }
    match audit_at.unwrap_or(Ok(None)) {
        Ok(at) => {
            // A tampered log has no trustworthy count: whether it reaches the head is enough.
            let reached = if at.is_some() { h.audit.records } else { 0 };
            let records = audit_records.unwrap_or(reached);
            if let Err(e) = head::compare("the audit log", &h.audit, records, at.as_deref()) {
                problems.push(e);
            }
        }
        Err(e) => problems.push(format!("reading the audit log: {e}")),
    }
    if problems.is_empty() {
        let line = format!(
            "head {name}: OK: the ledger still holds its {} records and the audit log its {}",
            h.ledger.records, h.audit.records
        );
        (line, Severity::Ok)
    } else {
        (format!("head {name}: TAMPERED: {}", problems.join("; ")), Severity::Tampered)
    }
}

/// The hash of the audit log's record `n`: from the walk over the segments, or from the
/// single-file log before them.
fn audit_hash_at(
    data_dir: &Path,
    report: &audit::Report,
    n: u64,
) -> std::io::Result<Option<String>> {
    if n == 0 {
        return Ok(None);
    }
    if n <= report.legacy_records + report.retired_records {
        return audit::hash_of_record(data_dir, n);
    }
    Ok(report
        .walk
        .hashes_at
        .iter()
        .find(|(at, _, _)| *at == n)
        .map(|(_, hash, _)| chain::hex(hash)))
}

/// A head from a file, a URL (with the admin token) or its JSON.
fn load_head(source: &str, token_env: &str) -> anyhow::Result<Head> {
    if source.trim_start().starts_with('{') {
        return head::parse(source);
    }
    if source.starts_with("http://") || source.starts_with("https://") {
        let token = std::env::var(token_env).ok().filter(|t| !t.is_empty()).ok_or_else(|| {
            anyhow::anyhow!("no admin token for the URL: set {token_env} (admin.token_env)")
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (status, value) = runtime.block_on(crate::approvals_cli::call(
            http::Method::GET,
            source,
            &token,
            None,
        ))?;
        if status != 200 {
            anyhow::bail!("answered {status}: {value}");
        }
        return Ok(serde_json::from_value(value)?);
    }
    let text = std::fs::read_to_string(source)?;
    head::parse(&text)
}
