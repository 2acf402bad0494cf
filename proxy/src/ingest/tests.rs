use super::*;

const NOW: UnixMillis = UnixMillis(1_795_322_169_107);

fn event(id: &str) -> Value {
    json!({
        "event_id": id, "ts_ms": NOW.0 - 1000, "ts": UnixMillis(NOW.0 - 1000).to_string(),
        "request_id": "req-1", "agent": "bot-1", "cost_center": "CC-1234", "project": "PROJ-ABC123",
        "provider": "openai", "model": "gpt-4o",
        "tokens": {"input": 1034, "cached_input": 200, "cache_write": 0, "output": 56, "reasoning": 0},
        "cost": {"input": "0.002585", "cached_input": "0.00025", "cache_write": "0", "output": "0.00056",
                 "reasoning": "0", "per_call": "0", "total": "0.003395"},
        "cost_usd": "0.003395", "cost_nano_usd": 3_395_000,
        "decision": "allow", "reason": "default_allow", "clause": "defaults.llm", "policy_version": "v1",
        "status": 200, "latency_ms": 12, "usage_source": "reported", "end": "complete", "source": "envoy"
    })
}

fn ndjson(events: &[Value]) -> Vec<u8> {
    events.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes()
}

fn take(ingest: &Ingest, body: &[u8]) -> (Outcome, Vec<Value>) {
    let mut entries = Vec::new();
    let outcome = ingest.take(body, NOW, |e| entries.push(serde_json::to_value(&e).unwrap()));
    (outcome, entries)
}

#[test]
fn a_valid_event_becomes_a_usage_record_with_its_exact_cost() {
    let (outcome, entries) = take(&Ingest::default(), &ndjson(&[event("e-1")]));
    assert_eq!((outcome.accepted, outcome.duplicates, outcome.rejected), (1, 0, 0));
    let r = &entries[0];
    assert_eq!(r["type"], "usage");
    assert_eq!(r["source"], "envoy");
    assert_eq!(r["source_event_id"], "e-1");
    assert_eq!(r["reservation_id"], "e-1");
    assert_eq!(r["cost_nano_usd"], 3_395_000);
    assert_eq!(r["cost"]["cached_input"], "0.00025");
    assert_eq!(r["tokens"]["input"], 1034);
    assert_eq!(r["budgets"], json!([]), "the filter's budgets are not charged here again");
    assert_eq!(r["ts"], UnixMillis(NOW.0 - 1000).to_string());
}

#[test]
fn the_price_source_is_kept_checked_and_optional() {
    let mut substituted = event("e-1");
    substituted["price_source"] = json!("requested_model");
    let mut bad = event("e-2");
    bad["price_source"] = json!("guessed");
    let (outcome, entries) = take(&Ingest::default(), &ndjson(&[substituted, bad, event("e-3")]));
    assert_eq!((outcome.accepted, outcome.rejected), (2, 1));
    assert_eq!((outcome.errors[0].line, outcome.errors[0].field.as_str()), (2, "price_source"));
    assert_eq!(entries[0]["price_source"], "requested_model");
    assert!(entries[1].get("price_source").is_none(), "older events have none");
}

#[test]
fn a_resent_event_is_a_duplicate_in_the_same_and_in_a_later_batch() {
    let ingest = Ingest::default();
    let (outcome, entries) = take(&ingest, &ndjson(&[event("e-1"), event("e-2"), event("e-1")]));
    assert_eq!((outcome.accepted, outcome.duplicates), (2, 1));
    assert_eq!(entries.len(), 2);
    let (outcome, entries) = take(&ingest, &ndjson(&[event("e-2"), event("e-1"), event("e-3")]));
    assert_eq!((outcome.accepted, outcome.duplicates), (1, 2));
    assert_eq!(entries[0]["source_event_id"], "e-3");
}

#[test]
fn ids_written_before_a_restart_stay_duplicates() {
    let (_, entries) = take(&Ingest::default(), &ndjson(&[event("e-1")]));
    let restarted = Ingest::from_records(&entries);
    let (outcome, _) = take(&restarted, &ndjson(&[event("e-1"), event("e-2")]));
    assert_eq!((outcome.accepted, outcome.duplicates), (1, 1));
}

#[test]
fn bad_lines_are_named_by_line_and_field_and_the_good_ones_kept() {
    let mut no_agent = event("e-2");
    no_agent.as_object_mut().unwrap().remove("agent");
    let mut bad_total = event("e-3");
    bad_total["cost"]["total"] = json!("0.003396");
    let mut negative = event("e-4");
    negative["tokens"]["output"] = json!(-5);
    let mut nanos = event("e-5");
    nanos["cost_nano_usd"] = json!(1);
    let mut stale = event("e-6");
    stale["ts_ms"] = json!(NOW.0 - DEDUP_WINDOW_MS - 1);
    stale.as_object_mut().unwrap().remove("ts");
    let mut denied = event("e-7");
    denied["decision"] = json!("deny");
    let mut body = ndjson(&[event("e-1"), no_agent]);
    body.extend_from_slice(b"{not json\n\n");
    body.extend(ndjson(&[bad_total, negative, nanos, stale, denied, event("e-8")]));
    let (outcome, entries) = take(&Ingest::default(), &body);
    assert_eq!((outcome.accepted, outcome.rejected), (2, 7));
    let got: Vec<(usize, &str)> =
        outcome.errors.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (2, "agent"),
            (3, ""),
            (5, "cost.total"),
            (6, "tokens.output"),
            (7, "cost_nano_usd"),
            (8, "ts_ms"),
            (9, "decision")
        ]
    );
    assert!(outcome.errors[2].error.contains("sum of the buckets"), "{:?}", outcome.errors[2]);
    let ids: Vec<&str> = entries.iter().map(|e| e["source_event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["e-1", "e-8"]);
}

#[test]
fn a_refused_line_does_not_reserve_its_id() {
    let ingest = Ingest::default();
    let mut bad = event("e-1");
    bad["status"] = json!(0);
    let (outcome, _) = take(&ingest, &ndjson(&[bad]));
    assert_eq!(outcome.rejected, 1);
    let (outcome, _) = take(&ingest, &ndjson(&[event("e-1")]));
    assert_eq!(outcome.accepted, 1, "the corrected event is taken");
}
