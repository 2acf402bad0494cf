//! The shared decision table (`tests/fixtures/decisions.json`): one list of requests and the
//! outcome each must get, run against the sidecar (`proxy/tests/decisions.rs`: the `tollgate`
//! binary; `tests/tests/decisions.rs`: the proxy in process) and against the Envoy filter
//! (`wasm-filter/tests/envoy.rs`), so the two are shown to decide alike on the same requests.
//! This module only reads the table; each side sends the requests its own way.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The fixture's path.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/decisions.json")
}

/// The table: a policy and its cases.
pub struct Table {
    /// The `policy:` document both sides run (JSON).
    pub policy: Value,
    pub cases: Vec<Case>,
}

/// One request and what it must get.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub path: String,
    /// Request headers, the table's defaults merged with the case's own.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub expect: Outcome,
}

/// The status and decision headers of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub clause: Option<String>,
    pub policy_version: Option<String>,
}

impl Outcome {
    /// The outcome of an answer, from its status and a header lookup.
    pub fn of<'a>(status: u16, header: impl Fn(&str) -> Option<&'a str>) -> Outcome {
        let h = |name: &str| header(name).map(str::to_owned);
        Outcome {
            status,
            decision: h("x-tollgate-decision"),
            reason: h("x-tollgate-reason"),
            clause: h("x-tollgate-clause"),
            policy_version: h("x-tollgate-policy-version"),
        }
    }
}

impl Table {
    /// Reads the fixture.
    ///
    /// # Panics
    /// If the file is missing or malformed (a test fixture).
    pub fn load() -> Table {
        let text = std::fs::read_to_string(path()).expect("read tests/fixtures/decisions.json");
        let doc: Value = serde_json::from_str(&text).expect("decisions.json is JSON");
        let version = doc["policy"]["version"].as_str().expect("policy.version").to_owned();
        let defaults = doc["default_headers"].as_object().expect("default_headers");
        let cases = doc["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| {
                let mut headers: Vec<(String, String)> = defaults
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                for (k, v) in c["headers"].as_object().into_iter().flatten() {
                    headers.retain(|(n, _)| n != k);
                    if let Some(v) = v.as_str() {
                        headers.push((k.clone(), v.to_owned()));
                    }
                }
                let body = match c["body_text"].as_str() {
                    Some(text) => text.as_bytes().to_vec(),
                    None => serde_json::to_vec(&c["body"]).expect("body"),
                };
                let e = &c["expect"];
                let text = |v: &Value| v.as_str().map(str::to_owned);
                // A decision made by the policy names its version; attribution and body
                // refusals come before any policy.
                let decided = !e["clause"].is_null();
                Case {
                    name: c["name"].as_str().expect("name").to_owned(),
                    path: c["path"].as_str().expect("path").to_owned(),
                    headers,
                    body,
                    expect: Outcome {
                        status: u16::try_from(e["status"].as_u64().expect("status")).expect("u16"),
                        decision: text(&e["decision"]),
                        reason: text(&e["reason"]),
                        clause: text(&e["clause"]),
                        policy_version: decided.then(|| version.clone()),
                    },
                }
            })
            .collect();
        Table { policy: doc["policy"].clone(), cases }
    }
}
