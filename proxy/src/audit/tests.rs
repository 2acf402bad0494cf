use super::*;
use crate::store::chain::Problem;
use tollgate_core::policy::Effect;
use tollgate_core::record::AuditKind;

pub(crate) fn event(i: u64) -> Event {
    Event {
        ts: format!("2026-11-22T10:00:{:02}.000Z", i % 60),
        kind: AuditKind::Decision,
        request_id: format!("req-{i}"),
        agent: "bot".into(),
        cost_center: "CC-1234".into(),
        project: "PROJ-ABC123".into(),
        route: "openai".into(),
        effect: if i % 3 == 0 { Effect::Deny } else { Effect::Allow },
        reason: "default_allow".into(),
        clause: Some("defaults.llm".into()),
        policy_version: Some("v1".into()),
        model: Some("gpt-4o".into()),
        ..Default::default()
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-audit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Appends records `from..=to` as JSON lines, one write each (so that small segments rotate
/// between them).
fn append(data_dir: &Path, segment_bytes: u64, from: u64, to: u64) -> (u64, String) {
    append_as(Encoding::Json, data_dir, segment_bytes, from, to)
}

fn append_as(
    encoding: Encoding,
    data_dir: &Path,
    segment_bytes: u64,
    from: u64,
    to: u64,
) -> (u64, String) {
    let (mut chain, opened) =
        Chain::open(data_dir, Linker::new(None), segment_bytes, encoding).unwrap();
    assert_eq!(opened.records, from - 1);
    for i in from..=to {
        let mut batch = Vec::new();
        chain.append_to(event(i), &mut batch);
        chain.write(&batch, true).unwrap();
        chain.rotate_if_full();
    }
    chain.head()
}

fn segment(data_dir: &Path, n: u64) -> PathBuf {
    chain::segment_path(&dir(data_dir), n)
}

#[test]
fn the_chain_runs_across_segments_and_continues_after_reopening() {
    let data = temp("segments");
    append(&data, 600, 1, 6);
    let head = append(&data, 600, 7, 9);
    let report = verify(&data, None, &[9]).unwrap();
    assert!(report.walk.problems.is_empty(), "{:?}", report.walk.problems);
    assert!(report.walk.segments.len() >= 3, "rotated: {:?}", report.walk.segments);
    assert_eq!(report.records(), 9);
    assert_eq!(head, (9, chain::hex(&report.walk.hashes_at[0].1)));
    assert_eq!(hash_of_record(&data, 9).unwrap(), Some(head.1));
    let all = read_all(&data).unwrap();
    let ids: Vec<&str> = all.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids, (1..=9).map(|i| format!("req-{i}")).collect::<Vec<_>>());
    assert_eq!(all[8]["seq"], 9);
}

#[test]
fn a_changed_middle_segment_is_found_and_not_appended_to() {
    let data = temp("middle");
    append(&data, 600, 1, 9);
    let segments = crate::store::segments(&dir(&data)).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    // A record of the middle segment edited with its checksum recomputed: the next record
    // (the first of the segment after) no longer links to it.
    let middle = segment(&data, segments[1]);
    let text = std::fs::read_to_string(&middle).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let last = lines.len() - 1;
    let body = lines[last][9..].replace("\"agent\":\"bot\"", "\"agent\":\"bob\"");
    lines[last] = format!("{:08x} {body}", crc32fast::hash(body.as_bytes()));
    std::fs::write(&middle, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let report = verify(&data, None, &[]).unwrap();
    match report.walk.problems.as_slice() {
        [Problem::Unlinked { at, next }] => {
            assert_eq!(at.segment, middle);
            assert_eq!(next.segment, segment(&data, segments[2]));
            assert_eq!(next.line, 1);
        }
        other => panic!("expected one broken link, got {other:?}"),
    }
    let err = Chain::open(&data, Linker::new(None), 600, Encoding::Json).err().expect("refused");
    assert!(err.to_string().contains("refusing to append"), "{err}");
    // A whole middle segment removed: the first record after the gap links to nothing left.
    let data = temp("removed-segment");
    append(&data, 600, 1, 9);
    let segments = crate::store::segments(&dir(&data)).unwrap();
    std::fs::remove_file(segment(&data, segments[1])).unwrap();
    let report = verify(&data, None, &[]).unwrap();
    assert!(
        matches!(report.walk.problems.as_slice(), [Problem::Unlinked { .. }]),
        "{:?}",
        report.walk.problems
    );
}

#[test]
fn a_torn_tail_is_cut_off_on_open() {
    let data = temp("torn");
    append(&data, 1 << 20, 1, 4);
    let path = segment(&data, 1);
    let intact = std::fs::metadata(&path).unwrap().len();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"0123abcd s00");
    std::fs::write(&path, &bytes).unwrap();
    assert!(verify(&data, None, &[]).unwrap().walk.torn.is_some());
    let (_, opened) = Chain::open(&data, Linker::new(None), 1 << 20, Encoding::Json).unwrap();
    assert_eq!(opened, Opened { records: 4, truncated_bytes: bytes.len() as u64 - intact });
    let report = verify(&data, None, &[]).unwrap();
    assert!(report.walk.torn.is_none() && report.walk.problems.is_empty());
}

#[test]
fn a_log_written_before_segmentation_starts_the_chain() {
    let data = temp("legacy");
    let mut batch = Vec::new();
    let mut prev = legacy::GENESIS.to_string();
    for i in 1..=3 {
        prev = legacy::append_to(i, &prev, event(i), &mut batch);
    }
    std::fs::write(legacy_path(&data), &batch).unwrap();
    let head = append(&data, 1 << 20, 4, 5);
    assert_eq!(head.0, 5);
    let report = verify(&data, None, &[3, 5]).unwrap();
    assert!(matches!(report.legacy, Some(Verdict::Ok { records: 3, .. })));
    assert!(report.walk.problems.is_empty(), "{:?}", report.walk.problems);
    assert_eq!(report.records(), 5);
    assert_eq!(hash_of_record(&data, 3).unwrap(), Some(prev.clone()));
    assert_eq!(hash_of_record(&data, 5).unwrap(), Some(head.1));
    let all = read_all(&data).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[2]["request_id"], "req-3");
    assert_eq!(all[4]["seq"], 5);
    // Its last record rewritten (rehashed): the segmented chain no longer starts from it.
    let text = std::fs::read_to_string(legacy_path(&data)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut batch = Vec::new();
    let mut prev = legacy::GENESIS.to_string();
    for (i, _) in lines.iter().enumerate() {
        let mut e = event(i as u64 + 1);
        if i == 2 {
            e.agent = "forged".into();
        }
        prev = legacy::append_to(i as u64 + 1, &prev, e, &mut batch);
    }
    std::fs::write(legacy_path(&data), &batch).unwrap();
    let report = verify(&data, None, &[]).unwrap();
    assert!(matches!(report.legacy, Some(Verdict::Ok { .. })));
    assert!(
        matches!(report.walk.problems.as_slice(), [Problem::Headless { .. }]),
        "{:?}",
        report.walk.problems
    );
}

#[test]
fn compact_records_read_back_as_written_and_a_changed_middle_segment_is_found() {
    let data = temp("compact");
    let mut odd = event(7);
    odd.ts = "yesterday".into();
    odd.approval_id = Some("tg-18c2f0a1-3e1-2a".into());
    odd.risk = Some("78.5".into());
    odd.actor = Some("alice".into());
    odd.note = Some("release 1.2, checked with <ops> & \"on-call\"".into());
    odd.tool = Some("deploy".into());
    odd.kind = AuditKind::ApprovalGranted;
    odd.effect = Effect::RequireApproval;
    let mut refused = event(8);
    refused.reason = "forbidden_pattern".into();
    refused.argument = Some("$.steps[1].run".into());
    refused.pattern = Some("rm -rf /".into());
    refused.excerpt = Some("sudo rm -rf / --no-preserve-root".into());
    let (mut chain, _) = Chain::open(&data, Linker::new(None), 200, Encoding::Compact).unwrap();
    let events: Vec<Event> =
        (1..=6).map(event).chain([odd, refused]).chain((9..=12).map(event)).collect();
    for e in &events {
        let mut batch = Vec::new();
        chain.append_to(e.clone(), &mut batch);
        chain.write(&batch, true).unwrap();
        chain.rotate_if_full();
    }
    drop(chain);
    let segments = crate::store::segments(&dir(&data)).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let all = read_all(&data).unwrap();
    let read: Vec<Event> = all
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("seq");
            serde_json::from_value(v).unwrap()
        })
        .collect();
    assert_eq!(read, events);
    // Reopened, it continues the last segment.
    let head = append_as(Encoding::Compact, &data, 200, 13, 13);
    assert_eq!(head.0, 13);
    assert!(verify(&data, None, &[]).unwrap().walk.problems.is_empty());
    // One bit of a middle segment's record changed: found there, and refused.
    let middle = segment(&data, segments[1]);
    let mut bytes = std::fs::read(&middle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&middle, &bytes).unwrap();
    let report = verify(&data, None, &[]).unwrap();
    match report.walk.problems.as_slice() {
        [Problem::Corrupt { at, what }] => {
            assert_eq!(at.segment, middle);
            assert_eq!(what, "checksum mismatch");
        }
        other => panic!("expected one corrupt record, got {other:?}"),
    }
    assert!(Chain::open(&data, Linker::new(None), 200, Encoding::Compact).is_err());
}
