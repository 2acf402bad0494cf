//! The metering corpus (`tests/fixtures/metering.json`): responses as real providers send them and
//! the ledger record each must produce, to the token and the nano-USD. The sidecar and HTTPS_PROXY
//! mode (`tests/tests/metering_corpus.rs`) and Envoy with the filter (`wasm-filter/tests/envoy.rs`)
//! each send every case their own way and hand the resulting ledger records to
//! [`Corpus::check`], so the three are shown to meter alike.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The fixture's path.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/metering.json")
}

/// The corpus: a rate card and its cases.
pub struct Corpus {
    /// The `pricing:` section every mode runs (JSON).
    pub pricing: Value,
    pub cases: Vec<Case>,
}

/// One request, how the mock answers it, and the ledger record it must produce.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    /// `x-request-id` sent with the case: how its record is found.
    pub request_id: String,
    pub path: String,
    /// Attribution defaults, the case's own headers and its `x-mock-*` headers.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The upstream cuts the stream: the client's read may fail.
    pub cut: bool,
    pub expect: Value,
}

/// The fields of a ledger record the corpus pins (`price_source` is null where nothing was
/// priced: no answer to bill).
pub const FIELDS: [&str; 6] =
    ["status", "model", "usage_source", "price_source", "tokens", "cost_nano_usd"];

impl Corpus {
    /// Reads the fixture; `mode` goes into each request id so that the modes' records never mix.
    ///
    /// # Panics
    /// If the file is missing or malformed (a test fixture).
    pub fn load(mode: &str) -> Corpus {
        let text = std::fs::read_to_string(path()).expect("read tests/fixtures/metering.json");
        let doc: Value = serde_json::from_str(&text).expect("metering.json is JSON");
        let defaults = doc["default_headers"].as_object().expect("default_headers");
        let cases = doc["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let request_id = format!("corpus-{mode}-{i}");
                let mut headers: Vec<(String, String)> = defaults
                    .iter()
                    .chain(c["headers"].as_object().into_iter().flatten())
                    .chain(c["mock"].as_object().into_iter().flatten())
                    .map(|(k, v)| (k.clone(), v.as_str().expect("header values are text").into()))
                    .collect();
                headers.push(("x-request-id".into(), request_id.clone()));
                let expect = &c["expect"];
                for field in FIELDS {
                    let present = expect.get(field).is_some();
                    assert!(present, "case {i}: expect.{field} is missing");
                }
                Case {
                    name: c["name"].as_str().expect("name").to_owned(),
                    request_id,
                    path: c["path"].as_str().expect("path").to_owned(),
                    headers,
                    body: serde_json::to_vec(&c["body"]).expect("body"),
                    cut: c["cut"].as_bool().unwrap_or(false),
                    expect: expect.clone(),
                }
            })
            .collect();
        Corpus { pricing: doc["pricing"].clone(), cases }
    }

    /// The `pricing:` section as a config line (JSON is YAML).
    pub fn pricing_yaml(&self) -> String {
        format!("pricing: {}\n", self.pricing)
    }

    /// Compares each case's record (found by request id among `records`) and the status the
    /// client saw with the expectation; returns one line per difference.
    pub fn check(&self, statuses: &[u16], records: &[Value]) -> Vec<String> {
        let mut failures = Vec::new();
        for (case, &status) in self.cases.iter().zip(statuses) {
            let want_status = case.expect["status"].as_u64().unwrap_or(0);
            if u64::from(status) != want_status {
                failures
                    .push(format!("{}: the client got {status}, want {want_status}", case.name));
            }
            let found: Vec<&Value> =
                records.iter().filter(|r| r["request_id"] == case.request_id.as_str()).collect();
            let [record] = found[..] else {
                failures.push(format!("{}: {} ledger records, want 1", case.name, found.len()));
                continue;
            };
            for field in FIELDS {
                if record[field] != case.expect[field] {
                    failures.push(format!(
                        "{}: {field} is {}, want {}",
                        case.name, record[field], case.expect[field]
                    ));
                }
            }
        }
        assert!(self.cases.len() >= 10, "the corpus has its cases");
        failures
    }
}
