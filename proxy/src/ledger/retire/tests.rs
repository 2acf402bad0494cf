use super::*;
use crate::ledger::{Ledger, Settings};
use crate::store::retired::{path, Checkpoint};
use std::path::PathBuf;
use std::time::Duration;
use tollgate_core::record::{End, ReserveRecord, UsageSource};

const DAY: u64 = 86_400_000;
/// When the records were made; the passes run `now` days later.
const T0: u64 = 1_795_000_000_000;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-retire-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn settings(dir: &Path, key: Option<chain::Key>) -> Settings {
    Settings {
        data_dir: dir.to_path_buf(),
        fsync_interval: Duration::from_millis(1),
        segment_bytes: 4096,
        fault: None,
        hmac_key: key,
        accept_corrupt: Vec::new(),
        encoding: chain::Encoding::Compact,
        retention: None,
        acknowledge: false,
        volume_bytes: None,
    }
}

fn reserve(i: u64, at: u64) -> Entry {
    Entry::Reserve(Box::new(ReserveRecord {
        ts: tollgate_core::time::UnixMillis(at).to_string(),
        reserved_at_ms: at,
        expires_at_ms: at + 900_000,
        request_id: format!("req-{i}"),
        reservation_id: format!("tg-1-{i:x}"),
        agent: format!("bot-{}", i % 3),
        cost_center: "CC-1".into(),
        project: "P".into(),
        business_unit: None,
        amount: Money::from_nanos(1_000_000),
        budgets: vec!["cc".into()],
    }))
}

fn usage(i: u64, at: u64) -> Entry {
    let cost = Money::from_nanos(1000 + i as i64);
    Entry::Usage(Box::new(UsageRecord {
        ts: tollgate_core::time::UnixMillis(at + 5).to_string(),
        reserved_at_ms: at,
        request_id: format!("req-{i}"),
        reservation_id: format!("tg-1-{i:x}"),
        agent: format!("bot-{}", i % 3),
        cost_center: "CC-1".into(),
        project: "P".into(),
        business_unit: None,
        route: "openai".into(),
        provider: "openai".into(),
        model: Some(if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }.into()),
        tool: None,
        tokens: Usage { input: 10 + i, output: 3, ..Usage::default() },
        cost: Some(Cost { input: cost, total: cost, ..Cost::default() }),
        cost_usd: cost,
        cost_nano_usd: cost.nanos(),
        decision: tollgate_core::record::Decision::Allow,
        reason: "default_allow".into(),
        clause: "defaults.llm".into(),
        policy_version: "v1".into(),
        budgets: vec!["cc".into()],
        status: 200,
        latency_ms: 5,
        usage_source: UsageSource::Reported,
        price_source: None,
        end: End::Complete,
        source: None,
        source_event_id: None,
    }))
}

fn event(i: u64, at: u64) -> crate::audit::Event {
    crate::audit::Event {
        ts: tollgate_core::time::UnixMillis(at).to_string(),
        request_id: format!("req-{i}"),
        agent: format!("bot-{}", i % 3),
        effect: tollgate_core::policy::Effect::Allow,
        reason: "default_allow".into(),
        ..Default::default()
    }
}

/// Writes `n` requests (reservation, usage, audit record), one a minute from `T0`, plus
/// `unsettled` reservations without usage at the end.
async fn write(
    dir: &Path,
    key: Option<chain::Key>,
    n: u64,
    unsettled: u64,
) -> crate::ledger::head::Head {
    let (ledger, _) = Ledger::open(settings(dir, key), || {}, T0).unwrap();
    for i in 1..=n {
        let at = T0 + i * 60_000;
        ledger.append(reserve(i, at));
        ledger.append(usage(i, at));
        ledger.audit(event(i, at));
        if i % 10 == 0 {
            ledger.flush().await;
        }
    }
    for i in n + 1..=n + unsettled {
        ledger.append(reserve(i, T0 + n * 60_000));
    }
    ledger.flush().await;
    ledger.head().unwrap()
}

fn policy(now: u64, dir: &Path) -> Policy {
    let last = |d: PathBuf| crate::store::segments(&d).unwrap().last().copied().unwrap_or(1);
    Policy {
        retention_ms: 7 * DAY,
        now_ms: now,
        ledger_current: last(dir.join("ledger")),
        audit_current: last(crate::audit::dir(dir)),
        acknowledged: None,
    }
}

fn invoice(dir: &Path) -> String {
    let records = crate::ledger::read_records(dir).unwrap();
    let groups = crate::ledger::read_retired(dir).unwrap();
    let policy =
        tollgate_core::policy::Snapshot::from_yaml_str("version: r-1\ndefaults: {llm: allow}\n")
            .unwrap();
    let period = tollgate_core::time::UnixMillis(T0).to_string()[..7].to_string();
    let by = crate::invoice::GroupBy::Agent;
    let invoices = crate::invoice::from_ledger(&records, &groups, &period, by, &[], &policy);
    serde_json::to_string(&invoices).unwrap()
}

#[tokio::test]
async fn retired_segments_leave_the_chain_the_counts_the_invoices_and_the_budgets_whole() {
    let dir = temp("whole");
    let head = write(&dir, None, 150, 0).await;
    let before = invoice(&dir);
    let all = crate::ledger::read_all(&dir).unwrap();
    let segments_before = crate::store::segments(&dir.join("ledger")).unwrap();
    assert!(segments_before.len() >= 4, "{segments_before:?}");

    // Too young: nothing goes.
    let young = run(&dir, &Linker::new(None), &policy(T0 + DAY, &dir)).unwrap();
    assert_eq!(young, Outcome::default());
    // Past the retention: every sealed segment goes, the current ones stay.
    let p = policy(T0 + 30 * DAY, &dir);
    let done = run(&dir, &Linker::new(None), &p).unwrap();
    assert_eq!(done.ledger_segments, segments_before.len() - 1);
    assert!(done.audit_segments >= 1 && done.bytes > 0, "{done:?}");
    assert_eq!(crate::store::segments(&dir.join("ledger")).unwrap(), [p.ledger_current]);

    // The invoice over the retired days is exactly what it was.
    assert_eq!(invoice(&dir), before);
    // The kept records verify after the checkpoint, and the count is the whole ledger's.
    let walk = crate::ledger::verify(&dir, None, &[head.ledger.records]).unwrap();
    assert!(walk.problems.is_empty(), "{:?}", walk.problems);
    assert_eq!(walk.records, all.len() as u64);
    assert_eq!(chain::hex(&walk.hashes_at[0].1), head.ledger.last_hash);
    let kept = crate::ledger::read_all(&dir).unwrap();
    assert_eq!(kept[..], all[all.len() - kept.len()..]);
    let audit = crate::audit::verify(&dir, None, &[]).unwrap();
    assert!(audit.walk.problems.is_empty(), "{:?}", audit.walk.problems);
    assert_eq!(audit.records(), 150);

    // Reopened: the head still holds, the sequence continues, and the budget rebuild gets the
    // retired usage as totals.
    let (ledger, recovered) = Ledger::open(settings(&dir, None), || {}, T0 + 8 * DAY).unwrap();
    assert_eq!(ledger.head().unwrap(), head);
    let spent: i64 =
        recovered.records.iter().filter_map(|s| s.entry.usage()).map(|r| r.cost_nano_usd).sum();
    let all_spent: i64 = all
        .iter()
        .filter(|r| r["type"] == "usage")
        .map(|r| r["cost_nano_usd"].as_i64().unwrap())
        .sum();
    assert_eq!(spent, all_spent);
    ledger.append(reserve(999, T0 + 8 * DAY));
    ledger.flush().await;
    drop(ledger);
    let last = crate::ledger::read_all(&dir).unwrap().pop().unwrap();
    assert_eq!(last["seq"], all.len() as u64 + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unacknowledged_or_unsettled_segments_stay() {
    let dir = temp("stay");
    write(&dir, None, 60, 0).await;
    let segments = crate::store::segments(&dir.join("ledger")).unwrap();
    // The collector has acknowledged only the first segment.
    let acked = crate::ledger::cursor::Cursor { segment: segments[1], offset: 0 };
    let p = Policy { acknowledged: Some(acked), ..policy(T0 + 30 * DAY, &dir) };
    let done = run(&dir, &Linker::new(None), &p).unwrap();
    assert_eq!(done.ledger_segments, 1);
    assert_eq!(crate::store::segments(&dir.join("ledger")).unwrap()[0], segments[1]);

    // A reservation still open (not expired, no usage record) keeps its segment.
    let dir = temp("unsettled");
    write(&dir, None, 0, 1).await;
    let (ledger, _) = Ledger::open(settings(&dir, None), || {}, T0).unwrap();
    for i in 1..=60 {
        ledger.append(reserve(100 + i, T0));
        ledger.append(usage(100 + i, T0));
    }
    ledger.flush().await;
    drop(ledger);
    let p = Policy { retention_ms: 1, ..policy(T0 + 60_000, &dir) };
    assert_eq!(run(&dir, &Linker::new(None), &p).unwrap().ledger_segments, 0);
    // Once it has expired it was released: settled.
    let p = Policy { retention_ms: 1, ..policy(T0 + DAY, &dir) };
    assert!(run(&dir, &Linker::new(None), &p).unwrap().ledger_segments > 0);
}

#[tokio::test]
async fn a_keyed_checkpoint_cannot_be_rewritten_and_a_removed_kept_segment_is_found() {
    let dir = temp("keyed");
    let key_file = dir.join("key");
    std::fs::write(&key_file, "a-key-of-at-least-16-bytes").unwrap();
    let key = chain::KeySource::File(key_file).load().unwrap();
    write(&dir, Some(key.clone()), 150, 0).await;
    let linker = Linker::new(Some(&key));
    // Keep the last two sealed segments: retire up to the third from the end.
    let segments = crate::store::segments(&dir.join("ledger")).unwrap();
    let p = Policy { ledger_current: segments[segments.len() - 3], ..policy(T0 + 30 * DAY, &dir) };
    assert!(run(&dir, &linker, &p).unwrap().ledger_segments > 0);
    assert!(crate::ledger::verify(&dir, Some(&key), &[]).unwrap().problems.is_empty());
    // More records claimed retired than were: the HMAC no longer holds.
    let path = path(&dir);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut forged: Checkpoint = serde_json::from_str(&text).unwrap();
    forged.ledger.records += 1;
    std::fs::write(&path, serde_json::to_string(&forged).unwrap()).unwrap();
    let err = read(&dir, Some(&linker)).unwrap_err();
    assert!(err.to_string().contains("its HMAC does not hold"), "{err}");
    assert!(Ledger::open(settings(&dir, Some(key.clone())), || {}, T0).is_err());
    // Without its HMAC (as before a key was configured): read, but not vouched for.
    forged.ledger.records -= 1;
    forged.mac = String::new();
    std::fs::write(&path, serde_json::to_string(&forged).unwrap()).unwrap();
    assert_eq!(
        read(&dir, Some(&linker)).unwrap().map(|c| c.ledger.records),
        Some(forged.ledger.records)
    );
    std::fs::write(&path, text).unwrap();
    // A kept segment removed: the one after it does not link to what is left.
    let kept = crate::store::segments(&dir.join("ledger")).unwrap();
    std::fs::remove_file(chain::segment_path(&dir.join("ledger"), kept[0])).unwrap();
    let walk = crate::ledger::verify(&dir, Some(&key), &[]).unwrap();
    assert!(!walk.problems.is_empty(), "the removal is found");
}
