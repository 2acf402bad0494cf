use super::*;
use std::time::Instant;
use tollgate_core::money::Money;

/// The clock the tests open the ledger at (records must be within the replay window).
const NOW: u64 = 1_795_000_000_000;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-ledger-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn settings(dir: &Path, interval_ms: u64, fault: Option<Arc<AtomicBool>>) -> Settings {
    Settings {
        data_dir: dir.to_path_buf(),
        fsync_interval: Duration::from_millis(interval_ms),
        segment_bytes: 64 * 1024 * 1024,
        fault,
        hmac_key: None,
        accept_corrupt: Vec::new(),
        encoding: Encoding::Compact,
        retention: None,
        acknowledge: false,
        volume_bytes: None,
    }
}

/// `settings` writing JSON lines (for the tests that edit lines as text).
fn json_lines(dir: &Path, interval_ms: u64) -> Settings {
    Settings { encoding: Encoding::Json, ..settings(dir, interval_ms, None) }
}

fn open(settings: Settings) -> (Ledger, Recovered) {
    Ledger::open(settings, || {}, NOW).expect("open")
}

fn reserve(i: u64) -> Entry {
    Entry::Reserve(Box::new(ReserveRecord {
        ts: "2026-11-18T00:00:00.000Z".into(),
        reserved_at_ms: NOW,
        expires_at_ms: NOW + 60_000,
        request_id: format!("r-{i}"),
        reservation_id: format!("res-{i}"),
        agent: "a".into(),
        cost_center: "CC-1234".into(),
        project: "PROJ-ABC123".into(),
        business_unit: None,
        amount: Money::from_nanos(i as i64),
        budgets: vec!["b".into()],
    }))
}

async fn flush(ledger: &Ledger) {
    tokio::time::timeout(Duration::from_secs(3), ledger.flush()).await.expect("flushed within 3 s");
}

fn ids(records: &[serde_json::Value]) -> Vec<(u64, String)> {
    records
        .iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r["request_id"].as_str().unwrap().to_string()))
        .collect()
}

fn stored_ids(records: &[Stored]) -> Vec<(u64, String)> {
    records
        .iter()
        .map(|r| match &r.entry {
            Entry::Reserve(reserve) => (r.seq, reserve.request_id.clone()),
            other => panic!("not a reservation: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn flush_waits_for_the_sync_but_not_for_a_long_sync_interval() {
    let dir = temp("long-interval");
    let (ledger, _) = open(settings(&dir, 10_000, None));
    for i in 1..=3 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    let records = read_all(&dir).unwrap();
    assert_eq!(ids(&records), [(1, "r-1".into()), (2, "r-2".into()), (3, "r-3".into())]);
    let id = std::fs::read_to_string(dir.join("ledger").join("ID")).unwrap();
    assert_eq!(records[2]["event_id"], format!("{id}-3"));
}

#[tokio::test]
async fn a_zero_interval_syncs_every_batch_and_loses_nothing() {
    let dir = temp("zero-interval");
    let (ledger, _) = open(settings(&dir, 0, None));
    for i in 1..=200 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    let seqs: Vec<u64> = ids(&read_all(&dir).unwrap()).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn reopening_hands_back_the_records_and_continues_the_sequence() {
    let dir = temp("reopen");
    let (ledger, _) = open(settings(&dir, 5, None));
    ledger.append(reserve(1));
    ledger.append(reserve(2));
    flush(&ledger).await;
    drop(ledger);
    let (ledger, recovered) = open(settings(&dir, 5, None));
    assert_eq!(stored_ids(&recovered.records), [(1, "r-1".into()), (2, "r-2".into())]);
    assert_eq!(recovered.truncated_bytes, 0);
    ledger.append(reserve(3));
    flush(&ledger).await;
    assert_eq!(ids(&read_all(&dir).unwrap()).last(), Some(&(3, "r-3".into())));
}

#[tokio::test]
async fn a_torn_last_record_is_truncated_and_a_corrupt_one_refuses_to_open() {
    let dir = temp("torn");
    let (ledger, _) = open(json_lines(&dir, 5));
    for i in 1..=3 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    let segment = dir.join("ledger").join("00000001.seg");
    let intact = std::fs::read(&segment).unwrap();
    let mut torn = intact.clone();
    torn.extend_from_slice(b"0badc0de {\"seq\":4,\"type\":\"res");
    std::fs::write(&segment, &torn).unwrap();
    assert_eq!(read_all(&dir).unwrap().len(), 3, "read_all skips a torn tail");
    let (ledger, recovered) = open(json_lines(&dir, 5));
    assert_eq!(recovered.truncated_bytes, (torn.len() - intact.len()) as u64);
    assert_eq!(recovered.records.len(), 3);
    drop(ledger);
    assert_eq!(std::fs::read(&segment).unwrap(), intact, "cut back to the last good record");

    // A changed value in the middle: the checksum fails, and that is not a torn tail.
    let text = String::from_utf8(intact).unwrap();
    let edited = text.replacen("\"r-2\"", "\"r-9\"", 1);
    assert_ne!(edited, text);
    std::fs::write(&segment, edited).unwrap();
    let err = Ledger::open(json_lines(&dir, 5), || {}, NOW).err().expect("refused");
    assert!(
        format!("{err:#}").contains("00000001.seg:2: checksum mismatch: the ledger is corrupt"),
        "{err:#}"
    );
    assert!(read_all(&dir).is_err());
}

#[tokio::test]
async fn segments_rotate_and_read_all_spans_them_in_order() {
    let dir = temp("rotate");
    let (ledger, _) = open(Settings { segment_bytes: 4096, ..settings(&dir, 5, None) });
    for i in 1..=200 {
        ledger.append(reserve(i));
        if i % 5 == 0 {
            flush(&ledger).await;
        }
    }
    flush(&ledger).await;
    assert!(segments(&dir.join("ledger")).unwrap().len() >= 3);
    let seqs: Vec<u64> = ids(&read_all(&dir).unwrap()).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_failing_disk_makes_the_ledger_unhealthy_until_it_works_and_leaves_no_partial_record() {
    let dir = temp("fault");
    let fault = Arc::new(AtomicBool::new(false));
    let (ledger, _) = open(settings(&dir, 0, Some(fault.clone())));
    ledger.append(reserve(1));
    flush(&ledger).await;
    fault.store(true, Ordering::Relaxed);
    ledger.append(reserve(2));
    let deadline = Instant::now() + Duration::from_secs(3);
    while ledger.is_healthy() {
        assert!(Instant::now() < deadline, "still healthy after 3 s of failing writes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ledger.append(reserve(3));
    fault.store(false, Ordering::Relaxed);
    flush(&ledger).await;
    assert!(ledger.is_healthy());
    assert_eq!(
        ids(&read_all(&dir).unwrap()),
        [(1, "r-1".into()), (2, "r-2".into()), (3, "r-3".into())]
    );
}

#[tokio::test]
async fn a_complete_last_line_that_does_not_verify_is_not_cut_and_refuses_to_open() {
    let dir = temp("complete-bad-last");
    let (ledger, _) = open(json_lines(&dir, 5));
    for i in 1..=3 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    let segment = dir.join("ledger").join("00000001.seg");
    let text = std::fs::read_to_string(&segment).unwrap();
    let corrupt = text.replacen("\"r-3\"", "\"r-8\"", 1);
    assert_ne!(corrupt, text);
    assert!(corrupt.ends_with('\n'), "the last line is complete");
    std::fs::write(&segment, &corrupt).unwrap();
    let err = Ledger::open(json_lines(&dir, 5), || {}, NOW).err().expect("refused");
    assert!(format!("{err:#}").contains("00000001.seg:3: checksum mismatch"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&segment).unwrap(), corrupt, "left as it is");
    let err = read_all(&dir).expect_err("read_all reports it too");
    assert!(format!("{err:#}").contains("00000001.seg:3: checksum mismatch"), "{err:#}");

    // Accepted as lost: opens without it, still leaves it, appends after it.
    let accepting =
        Settings { accept_corrupt: vec!["00000001.seg:3".into()], ..json_lines(&dir, 5) };
    let (ledger, recovered) = open(accepting);
    assert_eq!(recovered.corrupt_accepted, 1);
    assert_eq!(stored_ids(&recovered.records), [(1, "r-1".into()), (2, "r-2".into())]);
    ledger.append(reserve(4));
    flush(&ledger).await;
    drop(ledger);
    let after = std::fs::read_to_string(&segment).unwrap();
    assert!(after.starts_with(&corrupt), "the corrupt line is kept");
    assert_eq!(after.lines().count(), 4);
}

#[tokio::test]
async fn a_keyed_ledger_verifies_with_its_key_only() {
    let dir = temp("keyed");
    let key_file = |name: &str, key: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{key}\n")).unwrap();
        chain::KeySource::File(path).load()
    };
    let key = key_file("key", "a-key-of-at-least-16-bytes").unwrap();
    let keyed = Settings { hmac_key: Some(key.clone()), ..settings(&dir, 5, None) };
    let (ledger, _) = open(keyed.clone());
    for i in 1..=3 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    let walk = verify(&dir, Some(&key), &[]).unwrap();
    assert_eq!((walk.records, walk.problems.len(), walk.unchecked), (3, 0, 0));
    assert_eq!(walk.last_mode, Some(chain::Mode::Hmac));
    let head = Ledger::open(keyed, || {}, NOW).expect("reopens with its key").0.head().unwrap();
    assert_eq!(head.ledger.records, 3);
    assert_eq!(head.ledger.last_hash, chain::hex(&walk.last_hash));
    // Without the key: links unchecked, not failed; with another key: the first link fails.
    let walk = verify(&dir, None, &[]).unwrap();
    assert_eq!((walk.problems.len(), walk.unchecked), (0, 2));
    let other = key_file("other", "another-key-of-16-bytes").unwrap();
    let walk = verify(&dir, Some(&other), &[]).unwrap();
    assert!(matches!(&walk.problems[0], Problem::Unlinked { at, .. } if at.line == 1));
    // A short key is refused, naming the file but not the key.
    let err = key_file("short", "short-key").unwrap_err().to_string();
    assert!(err.contains("short holds 9 bytes") && !err.contains("short-key"), "{err}");
}

#[tokio::test]
async fn a_verified_record_with_a_value_no_version_writes_is_refused_naming_the_field() {
    let dir = temp("unknown-code");
    let (ledger, _) = open(json_lines(&dir, 0));
    ledger.append(reserve(1));
    flush(&ledger).await;
    drop(ledger);
    // A well-formed line (checksum and link hold) whose `end` is no known value.
    let seg = dir.join("ledger").join("00000001.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let first = bytes.len() - 1;
    let link = Linker::new(None).link_after(&bytes[..first]);
    let json = r#"{"seq":2,"event_id":"x-2","type":"usage","ts":"2026-11-18T00:00:00.000Z","reserved_at_ms":1795000000000,"request_id":"r-2","reservation_id":"res-2","agent":"a","cost_center":"CC-1234","project":"PROJ-ABC123","route":"openai","provider":"openai","tokens":{},"cost_usd":"0.00","cost_nano_usd":0,"decision":"allow","reason":"default_allow","status":200,"latency_ms":1,"usage_source":"none","end":"halted"}"#;
    chain::frame(&mut bytes, chain::Mode::Sha256, &link, |out| {
        out.extend_from_slice(json.as_bytes());
        true
    })
    .unwrap();
    std::fs::write(&seg, &bytes).unwrap();
    let err = read_records(&dir).expect_err("the record does not decode");
    let err = format!("{err:#}");
    assert!(err.contains("00000001.seg:2") && err.contains("`halted` is not an end"), "{err}");
    let err = Ledger::open(json_lines(&dir, 0), || {}, NOW).err().expect("refused");
    assert!(format!("{err:#}").contains("`halted` is not an end"), "{err:#}");
    // The same line with a known value reads.
    std::fs::write(&seg, &bytes[..first + 1]).unwrap();
    let json = json.replace("halted", "idle_timeout");
    let mut bytes = std::fs::read(&seg).unwrap();
    chain::frame(&mut bytes, chain::Mode::Sha256, &link, |out| {
        out.extend_from_slice(json.as_bytes());
        true
    })
    .unwrap();
    std::fs::write(&seg, &bytes).unwrap();
    let records = read_records(&dir).unwrap();
    let usage = records[1].entry.usage().expect("a usage record");
    assert_eq!((usage.end, usage.cost), (tollgate_core::record::End::IdleTimeout, None));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The frames of a compact segment: (start, end) of each.
fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    assert!(bytes.starts_with(chain::MAGIC));
    let mut out = Vec::new();
    let mut at = chain::MAGIC.len();
    while let chain::Next::Record { len, .. } = chain::next_frame(&bytes[at..]) {
        out.push((at, at + len));
        at += len;
    }
    out
}

/// Recomputes the checksum of the (one-byte length) frame at `range`.
fn recrc(bytes: &mut [u8], (start, end): (usize, usize)) {
    let crc = crc32fast::hash(&bytes[start + 5..end]);
    bytes[start + 1..start + 5].copy_from_slice(&crc.to_le_bytes());
}

#[tokio::test]
async fn compact_records_continue_after_a_restart_and_cost_a_fraction_of_json() {
    let dir = temp("compact");
    let (ledger, _) = open(settings(&dir, 5, None));
    for i in 1..=3 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    // Reopened: the same segment continues, its strings still known.
    let (ledger, recovered) = open(settings(&dir, 5, None));
    assert_eq!(stored_ids(&recovered.records).len(), 3);
    for i in 4..=6 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    assert_eq!(segments(&dir.join("ledger")).unwrap(), [1]);
    let all = read_all(&dir).unwrap();
    assert_eq!(ids(&all), (1..=6).map(|i| (i, format!("r-{i}"))).collect::<Vec<_>>());
    let records = read_records(&dir).unwrap();
    assert_eq!(
        records.iter().map(|r| r.entry.clone()).collect::<Vec<_>>(),
        (1..=6).map(reserve).collect::<Vec<_>>()
    );
    let walk = verify(&dir, None, &[]).unwrap();
    assert!(walk.problems.is_empty() && walk.torn.is_none(), "{:?}", walk.problems);
    // The same records as JSON lines take several times the bytes.
    let compact = std::fs::metadata(dir.join("ledger").join("00000001.seg")).unwrap().len();
    let jdir = temp("compact-vs-json");
    let (ledger, _) = open(json_lines(&jdir, 5));
    for i in 1..=6 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    let lines = std::fs::metadata(jdir.join("ledger").join("00000001.seg")).unwrap().len();
    assert!(compact * 3 < lines, "compact {compact} bytes, JSON {lines}");
}

#[tokio::test]
async fn a_compact_ledger_finds_torn_changed_and_rewritten_records() {
    let dir = temp("compact-tamper");
    let (ledger, _) = open(settings(&dir, 5, None));
    for i in 1..=4 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    let segment = dir.join("ledger").join("00000001.seg");
    let intact = std::fs::read(&segment).unwrap();
    let f = frames(&intact);
    assert_eq!(f.len(), 4);
    // A torn last frame (the start of a fifth) is cut off on open.
    let mut torn = intact.clone();
    torn.extend_from_slice(&intact[f[3].0..f[3].1 - 3]);
    std::fs::write(&segment, &torn).unwrap();
    assert_eq!(read_all(&dir).unwrap().len(), 4, "read_all skips a torn tail");
    let (ledger, recovered) = open(settings(&dir, 5, None));
    assert_eq!(
        (recovered.records.len(), recovered.truncated_bytes),
        (4, (f[3].1 - f[3].0 - 3) as u64)
    );
    drop(ledger);
    assert_eq!(std::fs::read(&segment).unwrap(), intact);
    // A changed byte in a complete frame: its checksum fails; not a torn tail.
    let mut changed = intact.clone();
    changed[f[1].1 - 3] ^= 2; // the amount: still a record, another one
    std::fs::write(&segment, &changed).unwrap();
    let err = Ledger::open(settings(&dir, 5, None), || {}, NOW).err().expect("refused");
    assert!(format!("{err:#}").contains("00000001.seg:2: checksum mismatch"), "{err:#}");
    // Its checksum recomputed: the next record no longer links to it.
    recrc(&mut changed, f[1]);
    std::fs::write(&segment, &changed).unwrap();
    let walk = verify(&dir, None, &[]).unwrap();
    assert!(
        matches!(&walk.problems[..], [Problem::Unlinked { at, next }] if at.line == 2 && next.line == 3),
        "{:?}",
        walk.problems
    );
    assert!(read_records(&dir).is_err());
}

#[tokio::test]
async fn a_json_ledger_is_continued_in_compact_segments_with_one_chain() {
    let dir = temp("json-then-compact");
    let (ledger, _) = open(json_lines(&dir, 5));
    for i in 1..=3 {
        ledger.append(reserve(i));
    }
    flush(&ledger).await;
    drop(ledger);
    let head = Ledger::open(settings(&dir, 5, None), || {}, NOW).unwrap().0;
    for i in 4..=5 {
        head.append(reserve(i));
    }
    flush(&head).await;
    drop(head);
    // A new segment for the new encoding; both read, one chain over both.
    assert_eq!(segments(&dir.join("ledger")).unwrap(), [1, 2]);
    let two = std::fs::read(dir.join("ledger").join("00000002.seg")).unwrap();
    assert!(two.starts_with(chain::MAGIC));
    assert_eq!(
        ids(&read_all(&dir).unwrap()),
        (1..=5).map(|i| (i, format!("r-{i}"))).collect::<Vec<_>>()
    );
    let walk = verify(&dir, None, &[]).unwrap();
    assert!(walk.problems.is_empty(), "{:?}", walk.problems);
    assert_eq!(walk.records, 5);
    // And back: JSON again after compact, in a third segment.
    let (ledger, recovered) = open(json_lines(&dir, 5));
    assert_eq!(recovered.records.len(), 5);
    ledger.append(reserve(6));
    flush(&ledger).await;
    drop(ledger);
    assert_eq!(segments(&dir.join("ledger")).unwrap(), [1, 2, 3]);
    assert_eq!(read_all(&dir).unwrap().len(), 6);
    assert!(verify(&dir, None, &[]).unwrap().problems.is_empty());
}
