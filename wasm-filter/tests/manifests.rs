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
}
