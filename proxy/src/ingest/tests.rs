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
    let stored: Vec<Stored> =
        entries.into_iter().map(|e| serde_json::from_value(e).unwrap()).collect();
    let restarted = Ingest::from_records(&stored);
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
    assert_eq!((outcome.accepted, outcome.implausible, outcome.rejected), (5, 2, 4));
    let got: Vec<(usize, &str)> =
        outcome.errors.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(got, [(3, ""), (6, "tokens.output"), (8, "ts_ms"), (9, "decision")]);
    let ids: Vec<&str> = entries.iter().map(|e| e["source_event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["e-1", "e-2", "e-3", "e-5", "e-8"], "every well-formed event is written");
    assert_eq!(
        entries[1]["agent"], "",
        "an absent attribute is recorded empty, as the sidecar does"
    );
    assert_eq!(entries[2]["usage_source"], "implausible");
    assert_eq!(entries[2]["cost_nano_usd"], 3_396_000, "the most the event claims");
}

#[test]
fn every_line_is_answered_by_its_event_id() {
    let mut absurd = event("e-2");
    absurd["cost"]["output"] = json!("9223372036.854775807");
    absurd["cost"]["total"] = json!("9223372036.854775807");
    absurd["cost_usd"] = json!("9223372036.854775807");
    absurd["cost_nano_usd"] = json!(i64::MAX);
    let mut stale = event("e-3");
    stale["ts_ms"] = json!(NOW.0 - DEDUP_WINDOW_MS - 1);
    stale.as_object_mut().unwrap().remove("ts");
    let ingest = Ingest::default();
    take(&ingest, &ndjson(&[event("e-4")]));
    let mut body = ndjson(&[event("e-1"), absurd, stale, event("e-4")]);
    body.extend_from_slice(b"[1]\n");
    let (outcome, entries) = take(&ingest, &body);
    let answer = serde_json::to_value(&outcome).unwrap();
    let results: Vec<(Value, Value, Value)> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].clone(), r["event_id"].clone(), r["result"].clone()))
        .collect();
    assert_eq!(
        results,
        [
            (json!(1), json!("e-1"), json!("accepted")),
            (json!(2), json!("e-2"), json!("accepted")),
            (json!(3), json!("e-3"), json!("refused")),
            (json!(4), json!("e-4"), json!("duplicate")),
            (json!(5), Value::Null, json!("refused")),
        ]
    );
    assert_eq!(answer["results"][1]["implausible"], true);
    assert_eq!(answer["results"][1]["field"], "cost.total");
    assert_eq!(answer["results"][2]["field"], "ts_ms");
    assert_eq!(entries[1]["usage_source"], "implausible");
    assert_eq!(entries[1]["cost_nano_usd"], i64::MAX, "on the invoice as claimed");
}

#[test]
fn a_refused_line_does_not_reserve_its_id() {
    let ingest = Ingest::default();
    let mut bad = event("e-1");
    bad["status"] = json!(99);
    let (outcome, _) = take(&ingest, &ndjson(&[bad]));
    assert_eq!(outcome.rejected, 1);
    let (outcome, _) = take(&ingest, &ndjson(&[event("e-1")]));
    assert_eq!(outcome.accepted, 1, "the corrected event is taken");
}

#[test]
fn a_value_of_the_wrong_kind_or_a_missing_field_is_named_by_its_path() {
    let mut end = event("e-1");
    end["end"] = json!("halted");
    let mut no_tokens = event("e-2");
    no_tokens.as_object_mut().unwrap().remove("tokens");
    let mut no_total = event("e-3");
    no_total["cost"].as_object_mut().unwrap().remove("total");
    let mut status = event("e-4");
    status["status"] = json!("200");
    let mut source = event("e-5");
    source["usage_source"] = json!(null);
    let mut body = ndjson(&[end, no_tokens, no_total, status, source]);
    body.extend_from_slice(b"[1, 2]\n{\"event_id\": \"e-6\", \n");
    let mut bare = event("e-7");
    for optional in
        ["ts", "request_id", "model", "cost_usd", "cost_nano_usd", "latency_ms", "source"]
    {
        bare.as_object_mut().unwrap().remove(optional);
    }
    for bucket in ["cached_input", "cache_write", "reasoning", "per_call"] {
        bare["cost"].as_object_mut().unwrap().remove(bucket);
        bare["tokens"].as_object_mut().unwrap().remove(bucket);
    }
    bare["cost"]["total"] = json!("0.003145");
    body.extend(ndjson(&[bare]));
    let (outcome, entries) = take(&Ingest::default(), &body);
    let got: Vec<(usize, &str)> =
        outcome.errors.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (1, "end"),
            (2, "tokens"),
            (3, "cost.total"),
            (4, "status"),
            (5, "usage_source"),
            (6, ""),
            (7, "")
        ]
    );
    let errors: Vec<&str> = outcome.errors.iter().map(|e| e.error.as_str()).collect();
    assert!(errors[0].contains("`halted` is not an end (expected one of complete,"), "{errors:?}");
    assert_eq!(errors[1], "required: an object of token counts");
    assert!(errors[2].starts_with("required: a decimal USD string"), "{errors:?}");
    assert!(errors[3].contains("expected u32"), "{errors:?}");
    assert!(errors[4].contains("usage_source (one of reported"), "{errors:?}");
    assert!(errors[5].starts_with("not a JSON object"), "{errors:?}");
    assert!(errors[6].starts_with("not JSON"), "{errors:?}");
    assert_eq!(outcome.accepted, 1, "the optional fields may be left out: {outcome:?}");
    let r = &entries[0];
    assert_eq!((r["request_id"].as_str(), r["source"].as_str()), (Some("e-7"), Some("mesh")));
    assert_eq!(
        (r["cost_nano_usd"].as_i64(), r["tokens"]["cached_input"].as_u64()),
        (Some(3_145_000), Some(0))
    );
}

/// A usage record as a sidecar's export ships it: the ledger's JSON line with its `event_id`.
fn exported(id: &str) -> Value {
    json!({
        "type": "usage", "event_id": id, "ts": UnixMillis(NOW.0 - 2000).to_string(),
        "reserved_at_ms": NOW.0 - 2500, "request_id": "req-9", "reservation_id": "res-9",
        "agent": "bot-2", "cost_center": "CC-1234", "project": "PROJ-ABC123", "route": "mcp",
        "provider": "mcp", "tool": "echo",
        "tokens": {"input": 0, "cached_input": 0, "cache_write": 0, "output": 0, "reasoning": 0},
        "cost_usd": "0.1", "cost_nano_usd": 100_000_000, "decision": "allow",
        "reason": "default_allow", "clause": "defaults.tool", "policy_version": "v1",
        "budgets": ["cc-monthly"], "status": 200, "latency_ms": 3, "usage_source": "none",
        "end": "complete"
    })
}

#[test]
fn a_sidecars_exported_usage_is_taken_as_written_and_its_reservations_ignored() {
    let ingest = Ingest::default();
    let reserve = json!({"type": "reserve", "event_id": "L1-1", "request_id": "req-9"});
    let mut mismatched = exported("L1-4");
    mismatched["cost_usd"] = json!("0.2");
    let mut audit = exported("L1-5");
    audit["type"] = json!("audit");
    let body = ndjson(&[reserve, exported("L1-2"), exported("L1-2"), mismatched, audit]);
    let (outcome, entries) = take(&ingest, &body);
    let verdicts: Vec<Verdict> = outcome.results.iter().map(|r| r.result).collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Ignored,
            Verdict::Accepted,
            Verdict::Duplicate,
            Verdict::Refused,
            Verdict::Refused
        ],
        "{:?}",
        outcome.errors
    );
    assert_eq!(outcome.errors[0].field, "cost_usd", "{:?}", outcome.errors);
    assert_eq!(outcome.errors[1].field, "type");
    assert_eq!(entries.len(), 1);
    let r = &entries[0];
    assert_eq!(
        (r["source"].as_str(), r["source_event_id"].as_str()),
        (Some("sidecar"), Some("L1-2"))
    );
    assert_eq!(
        (r["cost_nano_usd"].as_i64(), r["tool"].as_str()),
        (Some(100_000_000), Some("echo"))
    );
    assert_eq!(r["reservation_id"], "res-9", "the record as the sidecar wrote it");
    // Sent again in a later batch: still a duplicate.
    let (again, entries) = take(&ingest, &ndjson(&[exported("L1-2")]));
    assert_eq!((again.duplicates, entries.len()), (1, 0));
}
