//! The plugin configurations shipped in `envoy/` and `istio/` compile with the filter's own
//! loader, so a deployment file cannot drift from the schema the module accepts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use tollgate_wasm::settings::{FailPolicy, Plugin};

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn envoy_plugin_with_the_tollgate_collector_compiles() {
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t0ken");
    let plugin = Plugin::from_document(&read("envoy/plugin-tollgate.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let collector = plugin.filter.collector.unwrap();
    assert_eq!(
        (collector.cluster.as_str(), collector.path.as_str()),
        ("collector", "/v1/usage/events")
    );
    assert!(collector.headers.contains(&("authorization".into(), "Bearer t0ken".into())));
}

#[test]
fn envoy_plugin_json_compiles() {
    let plugin =
        Plugin::from_document(&read("envoy/plugin.json")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plugin.filter.fail, FailPolicy::Closed);
    assert_eq!(plugin.filter.collector.unwrap().cluster, "collector");
    assert_eq!(plugin.engine.policy().version(), "2026-11-22.1");
}

/// The `pluginConfig:` block of the WasmPlugin, dedented (the filter reads YAML as well as the
/// JSON Istio hands it).
fn istio_plugin_config() -> String {
    let text = read("istio/wasmplugin.yaml");
    let mut lines = text.lines().skip_while(|l| l.trim_end() != "  pluginConfig:").skip(1);
    let mut block = String::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        block.push_str(line.get(4..).unwrap_or(""));
        block.push('\n');
    }
    assert!(block.contains("policy:"), "no pluginConfig block found");
    block
}

#[test]
fn istio_plugin_config_compiles() {
    // What `vmConfig.env` gives the VM.
    std::env::set_var("TOLLGATE_COLLECTOR_TOKEN", "t0ken");
    let plugin = Plugin::from_document(&istio_plugin_config()).unwrap_or_else(|e| panic!("{e}"));
    let collector = plugin.filter.collector.as_ref().unwrap();
    assert_eq!(collector.path, "/v1/usage/events");
    assert!(collector.headers.contains(&("authorization".into(), "Bearer t0ken".into())));
    assert_eq!(plugin.filter.max_label_values, 500);
    assert_eq!(plugin.engine.policy().rules().len(), 2);
    assert!(plugin.engine.rates().resolve("my-finetune").is_some());
    assert!(!plugin.filter.hold_headers, "a WasmPlugin cannot let the filter hold headers");
    assert_eq!(plugin.filter.max_body_bytes, 16 * 1024 * 1024);
}

/// The edge options of `envoy/envoy.yaml` and `istio/edge.yaml` are the same lines (the
/// EnvoyFilter merges them into the sidecars' connection manager), and the buffer that holds a
/// body is larger than the filter's body limit in both, so that the filter's 413 answers.
#[test]
fn envoy_and_istio_set_the_same_edge_options() {
    let envoy = read("envoy/envoy.yaml");
    let istio = read("istio/edge.yaml");
    let has = |text: &str, line: &str| text.lines().any(|l| l.trim() == line);
    for line in [
        "preserve_external_request_id: true",
        "headers_with_underscores_action: REJECT_REQUEST",
        "max_headers_count: 100",
        "max_request_headers_kb: 64",
        "request_headers_timeout: 10s",
        "stream_idle_timeout: 120s",
    ] {
        assert!(has(&envoy, line), "envoy/envoy.yaml lacks `{line}`");
        assert!(has(&istio, line), "istio/edge.yaml lacks `{line}`");
    }
    assert!(has(&envoy, "allow_on_headers_stop_iteration: true"));
    let number = |text: &str, key: &str| -> u64 {
        let line = text.lines().find_map(|l| l.trim().strip_prefix(key)).unwrap();
        line.trim().parse().unwrap()
    };
    let limit = tollgate_wasm::settings::FilterSettings::default().max_body_bytes;
    assert!(number(&envoy, "per_connection_buffer_limit_bytes:") > limit);
    assert!(number(&istio, "max_request_bytes:") > limit);
}

/// Envoy's `stats_tags` in `envoy/envoy.yaml` and in Istio's bootstrap override
/// (`istio/stats-tags.yaml`) are the rules `tollgate_core::metrics` derives from the metric
/// definitions: one per label the filter emits, none missing, none stale.
#[test]
fn envoy_and_istio_stats_tags_match_the_metric_definitions() {
    let expected: Vec<(String, String)> = tollgate_core::metrics::envoy_stats_tags()
        .into_iter()
        .map(|(tag, regex)| (tag.to_owned(), regex))
        .collect();
    assert!(expected.iter().any(|(tag, _)| tag == "model"));

    // envoy.yaml: `  - {tag_name: NAME, regex: 'REGEX'}` (single-quoted: backslashes verbatim).
    let envoy: Vec<(String, String)> = read("envoy/envoy.yaml")
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("- {tag_name: ")?;
            let (tag, rest) = rest.split_once(", regex: '")?;
            Some((tag.to_owned(), rest.strip_suffix("'}")?.to_owned()))
        })
        .collect();
    assert_eq!(envoy, expected, "envoy/envoy.yaml stats_tags");

    // The ConfigMap's `custom_bootstrap.json` block.
    let text = read("istio/stats-tags.yaml");
    let block: String = text
        .lines()
        .skip_while(|l| l.trim() != "custom_bootstrap.json: |")
        .skip(1)
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let bootstrap: serde_json::Value =
        serde_json::from_str(&block).unwrap_or_else(|e| panic!("{e}:\n{block}"));
    let istio: Vec<(String, String)> = bootstrap["stats_config"]["stats_tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tag_name"].as_str().unwrap().into(), t["regex"].as_str().unwrap().into()))
        .collect();
    assert_eq!(istio, expected, "istio/stats-tags.yaml stats_tags");
}

/// The README's metrics table is the metric definitions: every metric, its type, labels, which
/// engine emits it and its help text.
#[test]
fn the_readme_metrics_table_matches_the_definitions() {
    use tollgate_core::metrics::{Emitter, ALL};
    let expected: String = ALL
        .iter()
        .map(|m| {
            let labels: Vec<String> = m.labels.iter().map(|l| format!("`{l}`")).collect();
            let by = match m.emitter {
                Emitter::Both => "both",
                Emitter::Sidecar => "sidecar",
                Emitter::Filter => "Envoy filter",
            };
            format!(
                "| `{}` | {} | {} | {by} | {} |\n",
                m.name,
                m.kind.as_str(),
                if labels.is_empty() { "—".to_owned() } else { labels.join(", ") },
                m.help
            )
        })
        .collect();
    let readme = read("README.md");
    let header = "| metric | type | labels | emitted by | meaning |\n|---|---|---|---|---|\n";
    let at = readme.find(header).unwrap_or_else(|| panic!("README.md: no metrics table"));
    let rows: String = readme[at + header.len()..]
        .lines()
        .take_while(|l| l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(rows == expected, "README.md's metrics table should read:\n{header}{expected}");
}
