use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;

use super::*;

/// What Envoy's tag extraction makes of `wasmcustom.<stat>`: each regex searched on the whole
/// name, its second group the tag's value, its first group removed from the name.
fn envoy_extract(stat: &str) -> (String, BTreeMap<String, String>) {
    let full = format!("{ENVOY_NAMESPACE}.{stat}");
    let mut tags = BTreeMap::new();
    let mut removed = Vec::new();
    for (label, regex) in envoy_stats_tags() {
        let re = Regex::new(&regex).unwrap();
        if let Some(c) = re.captures(&full) {
            let (whole, value) = (c.get(1).unwrap(), c.get(2).unwrap());
            removed.push(whole.range());
            assert!(tags.insert(label.to_owned(), value.as_str().to_owned()).is_none());
        }
    }
    let name: String = full
        .char_indices()
        .filter(|(i, _)| !removed.iter().any(|r| r.contains(i)))
        .map(|(_, c)| c)
        .collect();
    let name = name.strip_prefix("wasmcustom.").unwrap().to_owned();
    (name, tags)
}

#[test]
fn names_are_unique_and_follow_prometheus_conventions() {
    let names: BTreeSet<&str> = ALL.iter().map(|m| m.name).collect();
    assert_eq!(names.len(), ALL.len(), "each metric once");
    let label = Regex::new("^[a-z_][a-z0-9_]*$").unwrap();
    for m in ALL {
        assert!(m.name.starts_with("tollgate_"), "{}", m.name);
        assert!(label.is_match(m.name), "{}", m.name);
        assert_eq!(m.kind == Type::Counter, m.name.ends_with("_total"), "{}", m.name);
        assert!(!m.help.is_empty() && !m.help.contains('\n'), "{}", m.name);
        for l in m.labels {
            assert!(label.is_match(l) && !l.starts_with("__") && *l != "le", "{}: {l}", m.name);
        }
        let distinct: BTreeSet<_> = m.labels.iter().collect();
        assert_eq!(distinct.len(), m.labels.len(), "{}", m.name);
        // The filter's metrics are counters, and one gauge (moved by deltas from every VM).
        if m.emitter.filter() {
            assert_ne!(m.kind, Type::Histogram, "{}", m.name);
        }
        assert_eq!(by_name(m.name), Some(m));
    }
}

#[test]
fn label_values_are_verbatim_but_for_the_separator_and_the_empty_value() {
    assert_eq!(label_value("gpt-4.1"), "gpt-4.1");
    assert_eq!(label_value("a b/c=d.e"), "a b/c=d.e");
    assert_eq!(label_value("a;b"), "a_b");
    assert_eq!(label_value(""), "-");
}

#[test]
fn envoy_tag_extraction_recovers_every_label_verbatim() {
    let tricky = ["gpt-4.1", "a.b.c", "x=y", "model=gpt", ".lead", "trail.", "a b", "-", "é"];
    for m in ALL.iter().filter(|m| m.emitter.filter()) {
        for shift in 0..tricky.len() {
            let values: Vec<&str> =
                (0..m.labels.len()).map(|i| tricky[(i + shift) % tricky.len()]).collect();
            let (name, tags) = envoy_extract(&stat_name(m, &values));
            assert_eq!(name, m.name);
            let expected: BTreeMap<String, String> =
                m.labels.iter().zip(&values).map(|(l, v)| (l.to_string(), v.to_string())).collect();
            assert_eq!(tags, expected, "{}", m.name);
        }
    }
    // A `;` in a value cannot split it.
    let (name, tags) = envoy_extract(&stat_name(&BUDGET_WARNINGS, &["b;threshold=1", "80"]));
    assert_eq!(name, BUDGET_WARNINGS.name);
    assert_eq!(tags["budget"], "b_threshold=1");
    assert_eq!(tags["threshold"], "80");
}

#[test]
fn stat_names_encode_each_label_in_order() {
    assert_eq!(
        stat_name(&REQUESTS, &["allow", "default_allow", "gpt-4.1", "2xx"]),
        "tollgate_requests_total;decision=allow;reason=default_allow;model=gpt-4.1;status=2xx"
    );
    assert_eq!(stat_name(&FAIL_OPEN, &[]), "tollgate_fail_open_total");
    assert_eq!(
        stat_name(&COST, &["m", "", "p", "c"]),
        "tollgate_cost_nano_usd_total;model=m;agent=-;project=p;cost_center=c"
    );
}

#[test]
fn the_engines_split_is_explicit() {
    let only = |e: Emitter| -> Vec<&str> {
        ALL.iter().filter(|m| m.emitter == e).map(|m| m.name).collect()
    };
    assert!(only(Emitter::Both).contains(&"tollgate_requests_total"));
    assert!(only(Emitter::Sidecar).contains(&"tollgate_in_flight_requests"));
    assert!(only(Emitter::Filter).contains(&"tollgate_fail_open_total"));
    assert_eq!(
        filter_labels(),
        [
            "decision",
            "reason",
            "model",
            "status",
            "kind",
            "agent",
            "project",
            "cost_center",
            "budget",
            "threshold",
            "price_source",
            "category",
            "verdict",
            "upstream"
        ]
    );
}
