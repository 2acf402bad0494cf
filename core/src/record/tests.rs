use super::*;
use crate::time::UnixMillis;

/// A usage line exactly as the ledger writes it today (after `<crc> <link> `).
pub(crate) const USAGE_LINE: &str = r#"{"seq":7,"event_id":"18c2f0a1b2c3d4e5-7","type":"usage","ts":"2026-11-03T10:00:00.000Z","reserved_at_ms":1793700000000,"request_id":"req-1","reservation_id":"tg-r-1","agent":"bot-1","cost_center":"CC-1234","project":"PROJ-ABC123","business_unit":"BU-9","route":"openai","provider":"openai","model":"gpt-4o","tokens":{"input":834,"cached_input":200,"cache_write":0,"output":56,"reasoning":0},"cost":{"input":"0.002085","cached_input":"0.00025","cache_write":"0.00","output":"0.00056","reasoning":"0.00","per_call":"0.00","total":"0.002895"},"cost_usd":"0.002895","cost_nano_usd":2895000,"decision":"allow","reason":"default_allow","clause":"defaults.llm","policy_version":"v1","budgets":["cc-monthly"],"status":200,"latency_ms":12,"usage_source":"reported","price_source":"listed","end":"complete"}"#;

/// A reservation line as written today.
pub(crate) const RESERVE_LINE: &str = r#"{"seq":6,"event_id":"18c2f0a1b2c3d4e5-6","type":"reserve","ts":"2026-11-03T10:00:00.000Z","reserved_at_ms":1793700000000,"expires_at_ms":1793700600000,"request_id":"req-1","reservation_id":"tg-r-1","agent":"bot-1","cost_center":"CC-1234","project":"PROJ-ABC123","amount":"0.031","budgets":["cc-monthly"]}"#;

/// A mesh usage record as the collector writes it.
pub(crate) const MESH_LINE: &str = r#"{"seq":9,"event_id":"18c2f0a1b2c3d4e5-9","type":"usage","ts":"2026-11-03T10:00:00.000Z","reserved_at_ms":1793700000000,"request_id":"req-2","reservation_id":"e-1","agent":"bot-1","cost_center":"CC-1234","project":"PROJ-ABC123","route":"mesh","provider":"mcp","tool":"search","tokens":{"input":0,"cached_input":0,"cache_write":0,"output":0,"reasoning":0},"cost":{"input":"0.00","cached_input":"0.00","cache_write":"0.00","output":"0.00","reasoning":"0.00","per_call":"0.01","total":"0.01"},"cost_usd":"0.01","cost_nano_usd":10000000,"decision":"allow","reason":"tool_allowed","clause":"rules[2]","policy_version":"v1","budgets":[],"status":200,"latency_ms":3,"usage_source":"none","end":"aborted","source":"envoy","source_event_id":"e-1"}"#;

fn usage(line: &str) -> UsageRecord {
    match Stored::decode(line.as_bytes()).unwrap().entry {
        Entry::Usage(r) => *r,
        other => panic!("not a usage record: {other:?}"),
    }
}

#[test]
fn todays_lines_read_typed_and_write_back_byte_for_byte() {
    for line in [USAGE_LINE, RESERVE_LINE, MESH_LINE] {
        let stored = Stored::decode(line.as_bytes()).unwrap();
        let again =
            Stored { seq: stored.seq, event_id: stored.event_id.clone(), entry: &stored.entry };
        assert_eq!(serde_json::to_string(&again).unwrap(), line);
    }
    let r = usage(USAGE_LINE);
    assert_eq!(
        (r.decision, r.usage_source, r.end),
        (Decision::Allow, UsageSource::Reported, End::Complete)
    );
    assert_eq!(r.price_source, Some(PriceSource::Listed));
    assert_eq!(r.cost.unwrap().cached_input, Money::parse("0.00025").unwrap());
    assert_eq!(r.cost_total(), Money::from_nanos(2_895_000));
    assert_eq!(r.reservation_key(), "tg-r-1");
    assert_eq!(r.source, None);
    let mesh = usage(MESH_LINE);
    assert_eq!(
        (mesh.source.as_deref(), mesh.source_event_id.as_deref()),
        (Some("envoy"), Some("e-1"))
    );
    assert_eq!(
        (mesh.end, mesh.usage_source, mesh.price_source),
        (End::Aborted, UsageSource::None, None)
    );
    let Entry::Reserve(reserve) = Stored::decode(RESERVE_LINE.as_bytes()).unwrap().entry else {
        panic!("not a reservation")
    };
    assert_eq!(
        (reserve.amount, reserve.expires_at_ms),
        (Money::parse("0.031").unwrap(), 1_793_700_600_000)
    );
}

#[test]
fn the_oldest_records_read_without_the_fields_added_since() {
    // No seq, event_id, reservation_id, business_unit, model, cost buckets, clause,
    // policy_version, budgets or price_source.
    let old = r#"{"type":"usage","ts":"2026-10-01T00:00:00.000Z","reserved_at_ms":5,"request_id":"req-9","agent":"a","cost_center":"c","project":"p","route":"r","provider":"openai","tokens":{"input":1,"cached_input":0,"cache_write":0,"output":2,"reasoning":0},"cost_usd":"0.01","cost_nano_usd":10000000,"decision":"allow","reason":"default_allow","status":200,"latency_ms":1,"usage_source":"estimated","end":"client_gone"}"#;
    let stored = Stored::decode(old.as_bytes()).unwrap();
    assert_eq!((stored.seq, stored.event_id.as_str()), (0, ""));
    let r = usage(old);
    assert_eq!((r.cost, r.price_source, r.budgets.len()), (None, None, 0));
    assert_eq!(r.reservation_key(), "req-9", "keyed by the request id before reservation ids");
    let reserve = r#"{"type":"reserve","ts":"t","reserved_at_ms":1,"expires_at_ms":2,"request_id":"req-9","agent":"a","cost_center":"c","project":"p","amount":"1.00","budgets":["b"]}"#;
    let Entry::Reserve(reserve) = Stored::decode(reserve.as_bytes()).unwrap().entry else {
        panic!("not a reservation")
    };
    assert_eq!(reserve.reservation_key(), "req-9");
}

#[test]
fn an_unknown_record_type_reads_as_other() {
    let stored =
        Stored::decode(br#"{"seq":3,"event_id":"x-3","type":"checkpoint","at":1}"#).unwrap();
    assert_eq!(stored.entry.reserved_at_ms(), None);
    assert_eq!((stored.seq, stored.entry), (3, Entry::Other));
}

#[test]
fn every_coded_value_round_trips_by_its_name() {
    fn check<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug + Copy>(
        all: &[T],
        name: fn(T) -> &'static str,
    ) {
        for &v in all {
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{}\"", name(v)));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v);
        }
    }
    check(&End::ALL, End::as_str);
    check(&AuditKind::ALL, AuditKind::as_str);
    check(&UsageSource::ALL, UsageSource::as_str);
    check(&PriceSource::ALL, PriceSource::as_str);
    check(&Decision::ALL, Decision::as_str);
    let names: Vec<&str> = End::ALL.iter().map(|e| e.as_str()).collect();
    assert_eq!(names, ["complete", "aborted", "client_gone", "upstream_error", "idle_timeout"]);
    let kinds: Vec<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds.len(), 10);
    assert!(kinds.contains(&"approval_expired_approved") && kinds.contains(&"agent_reenabled"));
}

#[test]
fn an_unknown_value_is_refused_naming_the_field() {
    for (field, bad, wanted) in [
        ("end", "halted", "is not an end (expected one of complete, aborted, client_gone"),
        ("usage_source", "guessed", "is not a usage_source (expected one of reported,"),
        ("price_source", "cheap", "is not a price_source (expected one of listed,"),
        ("decision", "maybe", "is not a decision (expected one of allow, deny, require_approval)"),
    ] {
        let line = USAGE_LINE.replacen(
            &format!("\"{field}\":\"{}\"", usage_value(field)),
            &format!("\"{field}\":\"{bad}\""),
            1,
        );
        assert_ne!(line, USAGE_LINE, "{field} replaced");
        let err = Stored::decode(line.as_bytes()).unwrap_err().to_string();
        assert!(err.contains(&format!("`{bad}` {wanted}")), "{field}: {err}");
    }
    let err = serde_json::from_str::<AuditKind>("\"approval_lost\"").unwrap_err().to_string();
    assert!(err.contains("`approval_lost` is not an audit kind"), "{err}");
    let err = serde_json::from_str::<End>("5").unwrap_err().to_string();
    assert!(err.contains("expected an end (one of complete,"), "a wrong type names it too: {err}");
}

fn usage_value(field: &str) -> &'static str {
    match field {
        "end" => "complete",
        "usage_source" => "reported",
        "price_source" => "listed",
        _ => "allow",
    }
}

fn event() -> UsageEvent {
    let cost = Cost::from_buckets(
        Money::parse("0.002585").unwrap(),
        Money::parse("0.00025").unwrap(),
        Money::ZERO,
        Money::parse("0.00056").unwrap(),
        Money::ZERO,
        Money::ZERO,
    );
    UsageEvent {
        event_id: "e-1".into(),
        ts: Some(UnixMillis(NOW.0 - 1000).to_string()),
        ts_ms: NOW.0 - 1000,
        request_id: "req-1".into(),
        agent: "bot-1".into(),
        cost_center: "CC-1234".into(),
        project: "PROJ-ABC123".into(),
        business_unit: None,
        route: None,
        provider: "openai".into(),
        model: Some("gpt-4o".into()),
        tool: None,
        tokens: Usage { input: 1034, cached_input: 200, output: 56, ..Usage::default() },
        cost,
        cost_usd: Some(cost.total),
        cost_nano_usd: Some(cost.total.nanos()),
        decision: Decision::Allow,
        reason: "default_allow".into(),
        clause: "defaults.llm".into(),
        policy_version: "v1".into(),
        status: 200,
        latency_ms: 12,
        usage_source: UsageSource::Reported,
        price_source: Some(PriceSource::Listed),
        end: End::Complete,
        source: Some("envoy".into()),
    }
}

const NOW: UnixMillis = UnixMillis(1_795_322_169_107);

#[test]
fn an_event_round_trips_and_becomes_a_usage_record() {
    let e = event();
    let json = serde_json::to_string(&e).unwrap();
    assert!(json.contains(r#""business_unit":null"#), "the wire keeps an explicit null: {json}");
    assert!(!json.contains("\"route\""), "no route unless set: {json}");
    assert_eq!(serde_json::from_str::<UsageEvent>(&json).unwrap(), e);
    let r = e.into_record(NOW).unwrap();
    assert_eq!((r.reservation_id.as_str(), r.source_event_id.as_deref()), ("e-1", Some("e-1")));
    assert_eq!(
        (r.route.as_str(), r.source.as_deref(), r.budgets.len()),
        ("mesh", Some("envoy"), 0)
    );
    assert_eq!(r.cost_nano_usd, 3_395_000);
    assert_eq!(
        (r.ts.clone(), r.reserved_at_ms),
        (UnixMillis(NOW.0 - 1000).to_string(), NOW.0 - 1000)
    );
    // The stored form reads back as the same record.
    let line = serde_json::to_string(&Stored {
        seq: 1,
        event_id: "x-1".into(),
        entry: &Entry::Usage(Box::new(r.clone())),
    })
    .unwrap();
    assert_eq!(usage(&line), r);
}

#[test]
fn a_bad_event_names_its_field() {
    type Spoil = fn(&mut UsageEvent);
    let cases: [(Spoil, &str); 8] = [
        (|e| e.event_id = "has space".into(), "event_id"),
        (|e| e.event_id.clear(), "event_id"),
        (|e| e.ts_ms = NOW.0 - DEDUP_WINDOW_MS - 1, "ts_ms"),
        (|e| e.ts_ms = NOW.0 + MAX_SKEW_MS + 1, "ts_ms"),
        (|e| e.ts = Some("2020-01-01T00:00:00.000Z".into()), "ts"),
        (|e| e.status = 99, "status"),
        (|e| e.decision = Decision::Deny, "decision"),
        (|e| e.model = Some("m".repeat(MAX_VALUE + 1)), "model"),
    ];
    for (spoil, field) in cases {
        let mut e = event();
        spoil(&mut e);
        let err = e.into_record(NOW).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
    }
}

#[test]
fn an_impossible_cost_is_stored_as_implausible_at_the_most_it_claims() {
    type Spoil = fn(&mut UsageEvent);
    let cases: [(Spoil, &str, i64); 5] = [
        (|e| e.cost.total = Money::from_nanos(1), "cost.total", 3_395_000),
        (|e| e.cost.output = Money::from_nanos(-1), "cost.output", 3_395_000),
        (|e| e.cost_usd = Some(Money::from_nanos(9_000_000)), "cost_usd", 9_000_000),
        (|e| e.cost_nano_usd = Some(1), "cost_nano_usd", 3_395_000),
        // A price that overflowed: each bucket at the largest amount, the total saturated.
        (
            |e| {
                e.cost.input = Money::MAX;
                e.cost.output = Money::MAX;
                e.cost.total = Money::MAX;
                e.cost_usd = Some(Money::MAX);
                e.cost_nano_usd = Some(i64::MAX);
            },
            "cost.total",
            i64::MAX,
        ),
    ];
    for (spoil, field, billed) in cases {
        let mut e = event();
        spoil(&mut e);
        let (record, why) = e.accept(NOW).unwrap();
        assert_eq!(why.map(|w| w.field), Some(field.to_owned()));
        assert_eq!(record.usage_source, UsageSource::Implausible, "{field}");
        assert_eq!(record.cost_nano_usd, billed, "{field}");
        assert_eq!(record.cost, None, "no buckets that do not add up");
    }
    let (record, why) = event().accept(NOW).unwrap();
    assert_eq!((why, record.usage_source), (None, UsageSource::Reported));
}

#[test]
fn what_the_sidecar_would_record_is_taken() {
    let mut e = event();
    e.agent.clear();
    e.status = 0;
    let record = e.into_record(NOW).unwrap();
    assert_eq!((record.agent.as_str(), record.status), ("", 0), "no attribute, no response head");
}
