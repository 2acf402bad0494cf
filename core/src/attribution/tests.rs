use std::collections::HashMap;

use super::*;

fn headers(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
    pairs.iter().copied().collect()
}

const GOOD: [(&str, &str); 6] = [
    ("x-agent-id", "billing-bot"),
    ("x-cost-center", "CC-1234"),
    ("x-project-id", "PROJ-AB12CD"),
    ("x-business-unit", "research"),
    ("x-agent-tier", "2"),
    ("x-agent-owner", "ana.lee@example.com"),
];

fn kinds(err: &AttributionError) -> Vec<(&str, ProblemKind)> {
    err.problems.iter().map(|p| (p.header.as_str(), p.kind)).collect()
}

#[test]
fn shipped_patterns_compile_and_accept_a_complete_request() {
    let attribution = Attribution::default();
    let map = headers(&GOOD);
    let identity = attribution.check(|name| map.get(name).copied()).unwrap();
    assert_eq!(
        identity,
        Identity {
            agent: Some("billing-bot"),
            cost_center: Some("CC-1234"),
            project: Some("PROJ-AB12CD"),
            business_unit: Some("research"),
            tier: Some("2"),
            owner: Some("ana.lee@example.com"),
        }
    );
}

#[test]
fn optional_headers_may_be_absent() {
    let attribution = Attribution::default();
    let map = headers(&GOOD[..3]);
    let identity = attribution.check(|name| map.get(name).copied()).unwrap();
    assert_eq!((identity.tier, identity.business_unit, identity.owner), (None, None, None));
}

#[test]
fn shipped_patterns_table() {
    let cases: &[(&str, &str, bool)] = &[
        ("x-agent-id", "agent-7", true),
        ("x-agent-id", "Agent-7", false),
        ("x-agent-id", "agent_7", false),
        ("x-cost-center", "CC-0001", true),
        ("x-cost-center", "CC-001", false),
        ("x-cost-center", "cc-0001", false),
        ("x-project-id", "PROJ-A1B2C3", true),
        ("x-project-id", "PROJ-a1b2c3", false),
        ("x-project-id", "PROJ-A1B2C3D", false),
        ("x-business-unit", "sales", true),
        ("x-business-unit", "marketing", false),
        ("x-agent-tier", "4", true),
        ("x-agent-tier", "5", false),
        ("x-agent-owner", "a.b+c@corp.example.io", true),
        ("x-agent-owner", "not-an-email", false),
        ("x-agent-owner", "x@y.z", false),
    ];
    let attribution = Attribution::default();
    for &(header, value, ok) in cases {
        let mut map = headers(&GOOD);
        map.insert(header, value);
        let result = attribution.check(|name| map.get(name).copied());
        assert_eq!(result.is_ok(), ok, "{header}: {value}");
        if let Err(e) = result {
            assert_eq!(kinds(&e), [(header, ProblemKind::Invalid)]);
        }
    }
}

#[test]
fn one_error_lists_every_missing_invalid_and_contradicting_header() {
    let mut attribution = Attribution::default();
    attribution.pin("X-Agent-Id", "billing-bot").unwrap();
    let map = headers(&[
        ("x-agent-id", "other-bot"),
        ("x-project-id", "PROJ-nope-this-is-a-very-long-value"),
        ("x-agent-tier", "9"),
    ]);
    let err = attribution.check(|name| map.get(name).copied()).unwrap_err();
    assert_eq!(
        kinds(&err),
        [
            ("x-agent-id", ProblemKind::Contradicts),
            ("x-cost-center", ProblemKind::Missing),
            ("x-project-id", ProblemKind::Invalid),
            ("x-agent-tier", ProblemKind::Invalid),
        ]
    );
    assert_eq!(err.problems[2].value.as_deref(), Some("PROJ-nope-this-i..."));
    assert_eq!(
        err.to_string(),
        "attribution rejected: x-agent-id contradicts the identity pinned to this proxy \
         (got `other-bot`); x-cost-center is missing (expected ^CC-[0-9]{4}$); x-project-id is \
         invalid (got `PROJ-nope-this-i...`, expected ^PROJ-[A-Z0-9]{6}$); x-agent-tier is \
         invalid (got `9`, expected ^[1-4]$)"
    );
}

#[test]
fn pinned_value_fills_a_missing_header_and_accepts_an_equal_one() {
    let mut attribution = Attribution::default();
    attribution.pin("x-agent-id", "billing-bot").unwrap();
    let map = headers(&GOOD[1..3]);
    let identity = attribution.check(|name| map.get(name).copied()).unwrap();
    assert_eq!(identity.agent, Some("billing-bot"));
    let map = headers(&GOOD[..3]);
    assert_eq!(
        attribution.check(|name| map.get(name).copied()).unwrap().agent,
        Some("billing-bot")
    );
}

#[test]
fn pinning_rejects_unknown_headers_and_values_outside_the_pattern() {
    let mut attribution = Attribution::default();
    assert_eq!(
        attribution.pin("x-team", "a"),
        Err(PinError::UnknownHeader { header: "x-team".into() })
    );
    assert!(matches!(attribution.pin("x-cost-center", "CC-1"), Err(PinError::Invalid { .. })));
}

#[test]
fn pairs_match_names_case_insensitively_and_flag_repeats() {
    let attribution = Attribution::default();
    let pairs = [
        ("X-Agent-ID", "bot"),
        ("X-COST-CENTER", "CC-0001"),
        ("x-project-id", "PROJ-000000"),
        ("content-type", "application/json"),
    ];
    let identity = attribution.check_pairs(pairs).unwrap();
    assert_eq!(identity.agent, Some("bot"));
    let repeated = [("x-agent-id", "bot"), ("X-Agent-Id", "other"), ("x-cost-center", "CC-0001")];
    let err = attribution.check_pairs(repeated).unwrap_err();
    assert_eq!(
        kinds(&err),
        [("x-agent-id", ProblemKind::Repeated), ("x-project-id", ProblemKind::Missing)]
    );
}

#[test]
fn byte_values_that_are_not_utf8_are_invalid_and_never_echoed_raw() {
    let attribution = Attribution::default();
    let pairs: [(&str, &[u8]); 3] = [
        ("x-agent-id", b"bot\xff\n`x"),
        ("x-cost-center", b"CC-0001"),
        ("x-project-id", b"PROJ-000000"),
    ];
    let err = attribution.check_pairs(pairs).unwrap_err();
    assert_eq!(kinds(&err), [("x-agent-id", ProblemKind::Invalid)]);
    assert_eq!(err.problems[0].value.as_deref(), Some("bot???x"));
}

#[test]
fn config_overrides_headers_and_pins_identity() {
    let attribution = Attribution::from_yaml_str(
        "headers:\n\
         \x20 - {attribute: agent, name: X-Bot, pattern: '[a-z]+'}\n\
         \x20 - {attribute: tier, required: true}\n\
         pinned: {x-bot: alpha}\n",
    )
    .unwrap();
    assert_eq!(attribution.header_name(Attribute::Agent), "x-bot");
    let map = headers(&[("x-cost-center", "CC-0001"), ("x-project-id", "PROJ-000000")]);
    let err = attribution.check(|name| map.get(name).copied()).unwrap_err();
    assert_eq!(kinds(&err), [("x-agent-tier", ProblemKind::Missing)]);
    let map = headers(&[
        ("x-cost-center", "CC-0001"),
        ("x-project-id", "PROJ-000000"),
        ("x-agent-tier", "1"),
    ]);
    assert_eq!(attribution.check(|name| map.get(name).copied()).unwrap().agent, Some("alpha"));
}

#[test]
fn user_patterns_are_anchored_to_the_whole_value() {
    let attribution =
        Attribution::from_yaml_str("headers: [{attribute: agent, pattern: '[a-z]+'}]").unwrap();
    let map = headers(&[
        ("x-agent-id", "abc!"),
        ("x-cost-center", "CC-0001"),
        ("x-project-id", "PROJ-000000"),
    ]);
    let err = attribution.check(|name| map.get(name).copied()).unwrap_err();
    assert_eq!(kinds(&err), [("x-agent-id", ProblemKind::Invalid)]);
}

#[test]
fn config_errors_are_all_reported_with_lines() {
    let text = "\
headers:
  - {attribute: agent, pattern: '[a-z'}
  - {attribute: boss}
  - {attribute: tier, name: 'x tier', required: maybe}
  - {attribute: tier}
pinned:
  x-cost-center: CC-12
  x-unknown: v
extra: 1
";
    let err = Attribution::from_yaml_str(text).unwrap_err();
    let got: Vec<(&str, u32)> = err.0.iter().map(|e| (e.path.as_str(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("headers[0].pattern", 2),
            ("headers[1].attribute", 3),
            ("headers[2].name", 4),
            ("headers[2].required", 4),
            ("headers[3]", 5),
            ("pinned.x-cost-center", 7),
            ("pinned.x-unknown", 8),
            ("extra", 9),
        ],
        "{err}"
    );
    assert!(err.0[0].message.contains("invalid regular expression"), "{}", err.0[0].message);
    assert!(err.0[4].message.contains("already configured on line 4"), "{}", err.0[4].message);
}

#[test]
fn two_attributes_on_one_header_are_rejected() {
    let err =
        Attribution::from_yaml_str("headers: [{attribute: tier, name: x-agent-id}]").unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(err.0[0].message.contains("used for both `agent` and `tier`"), "{}", err.0[0].message);
}
