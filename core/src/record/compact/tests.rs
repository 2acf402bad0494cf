use super::*;
use crate::record::tests::{MESH_LINE, RESERVE_LINE, USAGE_LINE};

/// Encodes `records` as one segment, then decodes them from a fresh context.
fn round_trip(records: &[Stored]) -> (Vec<Stored>, Vec<usize>) {
    let mut enc = Encoder::default();
    let bodies: Vec<Vec<u8>> = records
        .iter()
        .map(|s| {
            let mut out = Vec::new();
            let view = Stored { seq: s.seq, event_id: s.event_id.clone(), entry: &s.entry };
            assert!(enc.stored(&view, &mut out));
            out
        })
        .collect();
    let mut ctx = Context::default();
    let decoded = bodies
        .iter()
        .map(|body| {
            let fields = ctx.define(body).expect("defs");
            Reader::new(&mut ctx, fields).stored().expect("decodes")
        })
        .collect();
    (decoded, bodies.iter().map(Vec::len).collect())
}

fn line(json: &str) -> Stored {
    Stored::decode(json.as_bytes()).unwrap()
}

#[test]
fn todays_records_decode_to_exactly_what_was_encoded_in_a_fraction_of_the_bytes() {
    let records: Vec<Stored> = [RESERVE_LINE, USAGE_LINE, MESH_LINE, RESERVE_LINE, USAGE_LINE]
        .iter()
        .map(|l| line(l))
        .collect();
    let (decoded, sizes) = round_trip(&records);
    assert_eq!(decoded, records);
    // JSON written from a decoded record is the JSON line it came from.
    for (d, json) in decoded.iter().zip([RESERVE_LINE, USAGE_LINE, MESH_LINE]) {
        let view = Stored { seq: d.seq, event_id: d.event_id.clone(), entry: &d.entry };
        assert_eq!(serde_json::to_string(&view).unwrap(), json);
    }
    // The second time a segment sees the strings they are references: a reservation and its
    // usage record take under 200 bytes together (the JSON: over 1,100).
    assert!(sizes[3] + sizes[4] < 200, "{sizes:?}");
    assert!(sizes[3] < sizes[0] && sizes[4] < sizes[1], "{sizes:?}");
}

#[test]
fn unusual_values_still_round_trip() {
    let mut odd = line(USAGE_LINE);
    odd.event_id = "from-elsewhere".into();
    let Entry::Usage(r) = &mut odd.entry else { unreachable!() };
    r.ts = "2026-11-03 10:00:00".into(); // not the canonical form: written out
    r.request_id = "550e8400-e29b-41d4-a716-446655440000".into();
    r.reservation_id = "req-007".into(); // a leading zero: written out
    r.cost_nano_usd = 1; // disagrees with cost_usd: both kept
    r.cost.as_mut().unwrap().total = Money::from_nanos(-5); // not the buckets' sum
    r.business_unit = Some(String::new());
    r.price_source = None;
    r.tokens.reasoning = u64::MAX;
    r.budgets = vec!["a".into(), "b".into(), "a".into()];
    let mut old = line(USAGE_LINE);
    old.seq = 0;
    old.event_id = String::new();
    let Entry::Usage(r) = &mut old.entry else { unreachable!() };
    r.cost = None;
    r.reserved_at_ms = 0; // before the time base
    r.reservation_id = String::new();
    let mut reserve = line(RESERVE_LINE);
    let Entry::Reserve(r) = &mut reserve.entry else { unreachable!() };
    r.expires_at_ms = r.reserved_at_ms - 1;
    r.reservation_id = r.request_id.clone();
    r.amount = Money::from_nanos(i64::MIN);
    let records = vec![odd, old, reserve];
    assert_eq!(round_trip(&records).0, records);
}

#[test]
fn a_full_string_table_writes_new_strings_out() {
    let records: Vec<Stored> = (0..MAX_STRINGS as u64 + 10)
        .map(|i| {
            let mut s = line(RESERVE_LINE);
            let Entry::Reserve(r) = &mut s.entry else { unreachable!() };
            r.agent = format!("agent-x{i}");
            r.request_id = format!("r{i}");
            s
        })
        .collect();
    let (decoded, sizes) = round_trip(&records);
    assert_eq!(decoded, records);
    assert!(sizes.last().unwrap() > &sizes[100], "written out once the table is full");
}

#[test]
fn damaged_records_are_errors_never_panics() {
    let (_, _) = round_trip(&[line(USAGE_LINE)]);
    let mut enc = Encoder::default();
    let mut body = Vec::new();
    let s = line(USAGE_LINE);
    enc.stored(&Stored { seq: s.seq, event_id: s.event_id.clone(), entry: &s.entry }, &mut body);
    for cut in 0..body.len() {
        let mut ctx = Context::default();
        if let Ok(fields) = ctx.define(&body[..cut]) {
            assert!(Reader::new(&mut ctx, fields).stored().is_err(), "cut at {cut}");
        }
    }
    // A reference to a string the segment never defined.
    let mut ctx = Context::default();
    let fields = ctx.define(&body).unwrap();
    let mut fresh = Context::default();
    assert!(matches!(Reader::new(&mut fresh, fields).stored(), Err(Error::Undefined(_))));
    // An unknown end code.
    let mut bad = body.clone();
    let at = bad.len() - 3; // end, source, source_event_id
    bad[at] = 9;
    let mut ctx = Context::default();
    let fields = ctx.define(&bad).unwrap();
    assert_eq!(
        Reader::new(&mut ctx, fields).stored(),
        Err(Error::Code { what: "an end", value: 9 })
    );
}

#[test]
fn timestamps_round_trip_only_in_the_canonical_form() {
    assert_eq!(parse_ts("2026-11-03T10:00:00.000Z"), Some(1_793_700_000_000));
    assert_eq!(parse_ts("1970-01-01T00:00:00.001Z"), Some(1));
    for odd in ["2026-11-03T10:00:00Z", "2026-11-03T25:00:00.000Z", "2026-02-30T00:00:00.000Z"] {
        assert_eq!(parse_ts(odd), None, "{odd}");
    }
    assert_eq!(split_id("tg-18c2f0a1-3e1-2a"), Some(("tg-18c2f0a1-3e1", 0x2a)));
    assert_eq!(split_id("req-0"), Some(("req", 0)));
    for odd in ["req-01", "req-", "req-A", "plain", "x-11111111111111111"] {
        assert_eq!(split_id(odd), None, "{odd}");
    }
}
