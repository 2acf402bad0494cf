//! The shared decision table (`tests/fixtures/decisions.json`): one list of requests and the
//! outcome each must get, run against the sidecar (`proxy/tests/decisions.rs`: the `tollgate`
//! binary and `tollgate explain`; `tests/tests/decisions.rs`: the proxy in process and in
//! HTTPS_PROXY mode) and against the Envoy filter (`wasm-filter/tests/envoy.rs`), so they are
//! shown to decide alike on the same requests.
//! Each case also names the usage record it leaves in the ledger and the metric series it
//! changes; [`Case::check_ledger`] and [`Case::check_metrics`] compare what a mode produced with
//! that, so the sidecar, HTTPS_PROXY mode and Envoy with the filter are shown to meter and count
//! alike. This module only reads the table; each side sends the requests its own way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::exposition::Exposition;
use crate::metering::FIELDS;
use crate::mock::RecordedRequest;

/// The modes whose ledger records and metrics the table pins, as its `modes` name them.
pub const MODES: [&str; 3] = ["sidecar", "https_proxy", "envoy"];

/// The fixture's path.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/decisions.json")
}

/// The table: a policy, a rate card and its cases.
pub struct Table {
    /// The `policy:` document both sides run (JSON).
    pub policy: Value,
    /// The `pricing:` section every mode runs (JSON).
    pub pricing: Value,
    /// The `guardrails:` section every mode runs (JSON).
    pub guardrails: Value,
    /// The `autonomy:` section every mode runs (JSON).
    pub autonomy: Value,
    /// The `oversight:` section every mode runs (JSON): the loop detector, circuit breakers and
    /// error escalation.
    pub oversight: Value,
    /// Mode (or `all`) → the metric series names whose changes are compared in that mode.
    pub compared: BTreeMap<String, Vec<String>>,
    /// Gauges whose value follows from counters (`metrics_derived`): not listed per case, but
    /// checked after every case in every mode against the counters of the same scrape
    /// ([`Table::check_derived`]). Gauge name → the counter it is the autonomy ratio of.
    pub derived: BTreeMap<String, String>,
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
    /// The `x-mock-*` headers that make the mock upstream answer (the table's defaults merged
    /// with the case's own).
    pub mock: Vec<(String, String)>,
    pub expect: Outcome,
    /// The case's position: part of its request id.
    pub index: usize,
    /// The usage record's pinned fields ([`FIELDS`]), or `None`: no usage record.
    pub ledger: Option<Value>,
    /// Every series the request changes.
    pub metrics: Vec<Delta>,
    /// What the upstream must receive, when the case says.
    pub upstream: Option<Upstream>,
    /// How many times the request is sent (`repeat`, 1 unless the case says): the earlier
    /// sends ([`Case::earlier_headers`]) build the live state the last one is decided on
    /// (`live`: the loop detector's calls, a breaker's failures, an agent's errors); `expect`,
    /// `ledger`, `metrics` and `upstream` are the last one's.
    pub repeat: usize,
    /// The host the case is sent to (`host`), when not the default: a route of its own to the
    /// mock upstream in every mode ([`Table::hosts`]), so that its circuit breaker is its own.
    pub host: Option<String>,
    /// The oversight state (`live`: `loops`, `breaker` or `escalation`, a section of the table's
    /// `oversight:`) the answer is decided on that earlier sends left (the case's own repeats,
    /// or earlier cases of its agent or host): `tollgate explain` cannot know it.
    pub live: Option<String>,
    /// The answer's `Retry-After` (`expect.retry_after`), or `None`: no `Retry-After`
    /// ([`Case::check_retry_after`]).
    pub retry_after: Option<RetryAfter>,
}

/// What a case's answer must say in `Retry-After`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// These seconds, counted from an earlier send (`retry_after: 3600`): at most them and at
    /// most [`RETRY_AFTER_SLACK`] under them.
    About(u64),
    /// The end of a fixed window that began whenever the clock says (`retry_after: {"within":
    /// 60}`, a minute's rate limit): from 1 to these seconds.
    Within(u64),
}

/// The counted live state a repeated case may name besides the oversight sections: the
/// policy's rate limits (`rpm`, `tpm`) and the guardrails' hourly action counts.
pub const LIVE_COUNTS: [&str; 2] = ["rate_limits", "guardrail_rate"];

/// How much of a fixed window must be left for a case counting in it to start
/// ([`Case::wait_for_window`]).
pub const WINDOW_MARGIN: std::time::Duration = std::time::Duration::from_secs(15);

/// How far below the table's `retry_after` an answer's `Retry-After` may be: the seconds that
/// pass between the send that started the clock (a breaker opening, a first call) and the one
/// checked.
pub const RETRY_AFTER_SLACK: u64 = 30;

/// The route of a case's own host: an OpenAI route (`path_prefix: /v1/`) named after the host's
/// first label, in every mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoute {
    /// The route's name (the sidecar's route, Envoy's named route).
    pub name: String,
    /// The host (`Host` header, or the host an HTTPS_PROXY client connects to).
    pub host: String,
}

/// What reaches the upstream for a case (`upstream` in the table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `null`: nothing, not even the request's head (a refusal decided on the body included).
    Nothing,
    /// The request, once and whole, with the client's `x-request-id` and without
    /// `absent_headers`.
    Arrived { absent_headers: Vec<String> },
}

/// One series a request changes, and by how much.
#[derive(Clone, Debug)]
pub struct Delta {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub delta: f64,
    /// The modes that produce it (every mode unless the fixture says otherwise).
    pub modes: Vec<String>,
}

/// A series: its name and labels.
type Key = (String, BTreeMap<String, String>);

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
        let default_mock = doc["default_mock"].as_object().expect("default_mock");
        let compared: BTreeMap<String, Vec<String>> =
            serde_json::from_value(doc["metrics_compared"].clone()).expect("metrics_compared");
        for mode in compared.keys() {
            assert!(mode == "all" || MODES.contains(&mode.as_str()), "unknown mode {mode}");
        }
        let derived: BTreeMap<String, String> =
            serde_json::from_value(doc["metrics_derived"].clone()).expect("metrics_derived");
        for (gauge, counter) in &derived {
            assert!(
                compared["all"].contains(counter),
                "metrics_derived.{gauge}: {counter} is compared in every mode"
            );
        }
        let compared_in = |name: &str| -> Vec<String> {
            let all = compared.get("all").is_some_and(|m| m.iter().any(|n| n == name));
            MODES
                .iter()
                .filter(|mode| {
                    all || compared.get(**mode).is_some_and(|m| m.iter().any(|n| n == name))
                })
                .map(|m| (*m).to_owned())
                .collect()
        };
        let cases = doc["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let name = c["name"].as_str().expect("name").to_owned();
                let mut headers: Vec<(String, String)> = defaults
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                // A string replaces the default, `null` removes it, a list sends one line each.
                for (k, v) in c["headers"].as_object().into_iter().flatten() {
                    headers.retain(|(n, _)| n != k);
                    let lines = match v {
                        Value::Array(lines) => lines.iter().filter_map(Value::as_str).collect(),
                        v => v.as_str().into_iter().collect::<Vec<_>>(),
                    };
                    headers.extend(lines.into_iter().map(|v| (k.clone(), v.to_owned())));
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
                let mut mock: Vec<(String, String)> = default_mock
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("mock values are text").into()))
                    .collect();
                for (k, v) in c["mock"].as_object().into_iter().flatten() {
                    mock.retain(|(n, _)| n != k);
                    mock.push((k.clone(), v.as_str().expect("mock values are text").into()));
                }
                let ledger = match &c["ledger"] {
                    Value::Null => {
                        assert!(c.get("ledger").is_some(), "{name}: `ledger` is missing");
                        None
                    }
                    record => {
                        for field in FIELDS {
                            assert!(
                                record.get(field).is_some(),
                                "{name}: ledger.{field} is missing"
                            );
                        }
                        let sum = record["cost"].as_str().expect("ledger.cost");
                        assert_eq!(
                            Some(sum_of(sum)),
                            record["cost_nano_usd"].as_i64(),
                            "{name}: ledger.cost_nano_usd is not {sum}"
                        );
                        Some(record.clone())
                    }
                };
                let metrics: Vec<Delta> = c["metrics"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{name}: `metrics` is missing"))
                    .iter()
                    .map(|m| {
                        let series = m["name"].as_str().expect("metrics[].name").to_owned();
                        let compared = compared_in(&series);
                        let modes: Vec<String> = match m.get("modes") {
                            None => MODES.iter().map(|m| (*m).to_owned()).collect(),
                            Some(modes) => {
                                serde_json::from_value(modes.clone()).expect("metrics[].modes")
                            }
                        };
                        // Never checked silently nowhere: the modes a series is listed for are
                        // exactly the modes that compare it.
                        assert_eq!(
                            modes, compared,
                            "{name}: {series} is listed for {modes:?} but compared in {compared:?}"
                        );
                        Delta {
                            name: series,
                            labels: serde_json::from_value(m["labels"].clone())
                                .expect("metrics[].labels"),
                            delta: m["delta"].as_f64().expect("metrics[].delta"),
                            modes,
                        }
                    })
                    .collect();
                let upstream = match c.get("upstream") {
                    None => None,
                    Some(Value::Null) => Some(Upstream::Nothing),
                    Some(u) => Some(Upstream::Arrived {
                        absent_headers: serde_json::from_value(u["absent_headers"].clone())
                            .expect("upstream.absent_headers"),
                    }),
                };
                let repeat = match c.get("repeat") {
                    None => 1,
                    Some(n) => {
                        let n = n.as_u64().expect("repeat is a count");
                        assert!(
                            n >= 2,
                            "{name}: repeat {n}: a repeated case is sent twice or more"
                        );
                        usize::try_from(n).expect("repeat")
                    }
                };
                let host = c.get("host").map(|h| {
                    let h = h.as_str().unwrap_or_else(|| panic!("{name}: host is text"));
                    assert!(
                        !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b == b'.'),
                        "{name}: host {h:?} is a lowercase name"
                    );
                    h.to_owned()
                });
                let live = c.get("live").map(|l| {
                    let l = l.as_str().unwrap_or_else(|| panic!("{name}: live is text"));
                    assert!(
                        doc["oversight"].get(l).is_some() || LIVE_COUNTS.contains(&l),
                        "{name}: live {l:?} is neither a section of the table's oversight nor \
                         one of {LIVE_COUNTS:?}"
                    );
                    l.to_owned()
                });
                assert!(
                    repeat == 1 || live.is_some(),
                    "{name}: a repeated case names the live state its repeats build (`live`)"
                );
                let retry_after = e.get("retry_after").map(|r| {
                    let within = r.get("within").and_then(|w| w.as_u64());
                    match (r.as_u64(), within) {
                        (Some(secs), _) => RetryAfter::About(secs),
                        (None, Some(secs)) => RetryAfter::Within(secs),
                        _ => panic!(
                            "{name}: expect.retry_after is seconds or {{\"within\": seconds}}"
                        ),
                    }
                });
                Case {
                    name,
                    upstream,
                    repeat,
                    host,
                    live,
                    retry_after,
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
                    mock,
                    index,
                    ledger,
                    metrics,
                }
            })
            .collect();
        Table {
            policy: doc["policy"].clone(),
            pricing: doc["pricing"].clone(),
            guardrails: doc["guardrails"].clone(),
            autonomy: doc["autonomy"].clone(),
            oversight: doc["oversight"].clone(),
            compared,
            derived,
            cases,
        }
    }

    /// The `pricing:`, `guardrails:`, `autonomy:` and `oversight:` sections as config lines
    /// (JSON is YAML).
    pub fn sections_yaml(&self) -> String {
        format!(
            "pricing: {}\nguardrails: {}\nautonomy: {}\noversight: {}\n",
            self.pricing, self.guardrails, self.autonomy, self.oversight
        )
    }

    /// Checks each derived gauge (`metrics_derived`) against its counter in one scrape: the
    /// autonomy ratio, `auto` over `auto + approval_required + denied` in basis points (rounded
    /// down), per `category` and over all of them (`category="all"`), a series exactly for each
    /// category with actions. One line per difference.
    pub fn check_derived(&self, mode: &str, scrape: &Exposition) -> Vec<String> {
        let mut failures = Vec::new();
        for (gauge, counter) in &self.derived {
            // category → (auto, total)
            let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for s in scrape.series(counter) {
                let (Some(category), Some(verdict)) =
                    (s.labels.get("category"), s.labels.get("verdict"))
                else {
                    failures.push(format!("{mode}: {counter} {:?} without its labels", s.labels));
                    continue;
                };
                let n = s.value as u64;
                for key in [category.as_str(), "all"] {
                    let c = counts.entry(key.to_owned()).or_default();
                    match verdict.as_str() {
                        "auto" => *c = (c.0 + n, c.1 + n),
                        "approval_required" | "denied" => c.1 += n,
                        _ => {}
                    }
                }
            }
            let want: BTreeMap<String, f64> = counts
                .into_iter()
                .filter(|(_, (_, total))| *total > 0)
                .map(|(k, (auto, total))| (k, (auto * 10_000 / total) as f64))
                .collect();
            let got: BTreeMap<String, f64> = scrape
                .series(gauge)
                .map(|s| (s.labels.get("category").cloned().unwrap_or_default(), s.value))
                .collect();
            if got != want {
                failures.push(format!(
                    "{mode}: {gauge} is {got:?}, want {want:?} (the ratio of {counter})"
                ));
            }
        }
        failures
    }

    /// The hosts of the cases that name one (`host`), each once, with its route.
    pub fn hosts(&self) -> Vec<HostRoute> {
        let mut hosts: Vec<HostRoute> = Vec::new();
        for host in self.cases.iter().filter_map(|c| c.host.as_deref()) {
            if hosts.iter().all(|h| h.host != host) {
                let name = host.split('.').next().unwrap_or(host).to_owned();
                assert!(hosts.iter().all(|h| h.name != name), "two hosts named {name}");
                hosts.push(HostRoute { name, host: host.to_owned() });
            }
        }
        hosts
    }

    /// The metric series names compared in `mode`.
    pub fn compared(&self, mode: &str) -> Vec<&str> {
        ["all", mode]
            .iter()
            .filter_map(|m| self.compared.get(*m))
            .flatten()
            .map(String::as_str)
            .collect()
    }
}

impl Case {
    /// The `x-request-id` the case is sent with in `mode`: how its record is found.
    pub fn request_id(&self, mode: &str) -> String {
        format!("table-{mode}-{}", self.index)
    }

    /// Everything to send in `mode`: the attribution headers, the mock's and the request id.
    pub fn sent_headers(&self, mode: &str) -> Vec<(String, String)> {
        let mut headers = self.headers.clone();
        headers.extend(self.mock.iter().cloned());
        headers.push(("x-request-id".into(), self.request_id(mode)));
        headers
    }

    /// `headers` with the case's `host` as the `Host` header (reverse mode and Envoy; an
    /// HTTPS_PROXY client connects to the host instead).
    pub fn with_host(&self, mut headers: Vec<(String, String)>) -> Vec<(String, String)> {
        if let Some(host) = &self.host {
            headers.push(("host".into(), host.clone()));
        }
        headers
    }

    /// How long to wait before the case's first send so that all its sends fall in one fixed
    /// window of the live count it builds (a minute for `rate_limits`, a UTC hour for
    /// `guardrail_rate`; zero for any other case): a window that ended between them would
    /// start the count again. The sends and their settling take a few seconds, so a case that
    /// would start in a window's last [`WINDOW_MARGIN`] waits for the next one.
    pub fn wait_for_window(&self) -> std::time::Duration {
        let window_ms: u64 = match self.live.as_deref() {
            Some("rate_limits") => 60_000,
            Some("guardrail_rate") => 3_600_000,
            _ => return std::time::Duration::ZERO,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is past 1970")
            .as_millis() as u64;
        let left = window_ms - now % window_ms;
        if left > WINDOW_MARGIN.as_millis() as u64 {
            return std::time::Duration::ZERO;
        }
        std::time::Duration::from_millis(left + 50)
    }

    /// The headers of the case's earlier sends in `mode` (none unless it repeats): as
    /// [`Case::sent_headers`], each with its own request id (`table-<mode>-repeat<k>-<index>`),
    /// so that their records and what reached the upstream are told apart from the last send's.
    pub fn earlier_headers(&self, mode: &str) -> Vec<Vec<(String, String)>> {
        (1..self.repeat)
            .map(|k| {
                let mut headers = self.headers.clone();
                headers.extend(self.mock.iter().cloned());
                // Not the last send's id with a suffix: that would contain it.
                let id = format!("table-{mode}-repeat{k}-{}", self.index);
                headers.push(("x-request-id".into(), id));
                headers
            })
            .collect()
    }

    /// Compares an answer's `Retry-After` with the table's `expect.retry_after`: at most it and
    /// at most [`RETRY_AFTER_SLACK`] seconds under it, or absent when the table names none.
    pub fn check_retry_after(&self, header: Option<&str>) -> Option<String> {
        let got = header.map(|v| v.trim().parse::<u64>().map_err(|_| v.to_owned()));
        let (low, high) = match self.retry_after {
            Some(RetryAfter::About(s)) => (s.saturating_sub(RETRY_AFTER_SLACK), s),
            Some(RetryAfter::Within(s)) => (1, s),
            None => (0, 0),
        };
        let fine = match (self.retry_after, &got) {
            (None, None) => true,
            (Some(_), Some(Ok(secs))) => (low..=high).contains(secs),
            _ => false,
        };
        (!fine).then(|| {
            let want = self.retry_after.map_or("none".to_owned(), |_| format!("{low}..={high} s"));
            format!("{}: retry-after {header:?}, want {want}", self.name)
        })
    }

    /// Compares what reached the upstream for the case in `mode` with the table's `upstream`:
    /// `seen` is what the mock recorded (a head whose body broke off included), `raw` the
    /// bytes that reached it, per connection, where a mode can tell (empty otherwise).
    pub fn check_upstream(
        &self,
        mode: &str,
        seen: &[RecordedRequest],
        raw: &[Vec<u8>],
    ) -> Vec<String> {
        let id = self.request_id(mode);
        let mine: Vec<&RecordedRequest> =
            seen.iter().filter(|r| r.header("x-request-id") == Some(id.as_str())).collect();
        match &self.upstream {
            None => Vec::new(),
            Some(Upstream::Nothing) => {
                let mut found: Vec<String> = mine
                    .iter()
                    .map(|r| format!("{}: {} {} reached the upstream", self.name, r.method, r.path))
                    .collect();
                if raw.iter().any(|bytes| String::from_utf8_lossy(bytes).contains(&id)) {
                    found.push(format!("{}: bytes of the request reached the upstream", self.name));
                }
                found
            }
            Some(Upstream::Arrived { absent_headers }) => match &mine[..] {
                [r] if r.complete => absent_headers
                    .iter()
                    .filter(|h| r.headers.contains_key(h.as_str()))
                    .map(|h| format!("{}: {h} reached the upstream", self.name))
                    .collect(),
                _ => vec![format!(
                    "{}: {} requests with x-request-id {id} upstream (complete: {:?}), want 1",
                    self.name,
                    mine.len(),
                    mine.iter().map(|r| r.complete).collect::<Vec<_>>()
                )],
            },
        }
    }

    /// Compares the case's usage record in `mode` (found by request id among `records`) with
    /// the table's; one line per difference.
    pub fn check_ledger(&self, mode: &str, records: &[Value]) -> Vec<String> {
        let id = self.request_id(mode);
        let found: Vec<&Value> =
            records.iter().filter(|r| r["request_id"] == id.as_str()).collect();
        let shown = || found.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n  ");
        match (&self.ledger, &found[..]) {
            (None, []) => Vec::new(),
            (None, _) => vec![format!("{}: a usage record, want none:\n  {}", self.name, shown())],
            (Some(_), [record]) => FIELDS
                .iter()
                .filter(|field| {
                    record[**field] != self.ledger.as_ref().unwrap_or(&Value::Null)[**field]
                })
                .map(|field| {
                    let want = self.ledger.as_ref().map_or(&Value::Null, |l| &l[*field]);
                    format!("{}: ledger {field} is {}, want {want}", self.name, record[*field])
                })
                .collect(),
            (Some(_), _) => {
                vec![format!(
                    "{}: {} usage records, want 1:\n  {}",
                    self.name,
                    found.len(),
                    shown()
                )]
            }
        }
    }

    /// Compares the series the request changed in `mode` between two scrapes (`before` and
    /// `after` it) with the table's: every compared series that changed must be listed with its
    /// increase, and every listed one must have changed by it. One line per difference.
    pub fn check_metrics(
        &self,
        table: &Table,
        mode: &str,
        before: &Exposition,
        after: &Exposition,
    ) -> Vec<String> {
        let value = |e: &Exposition, key: &Key| -> f64 {
            e.samples.iter().find(|s| s.name == key.0 && s.labels == key.1).map_or(0.0, |s| s.value)
        };
        let mut keys: BTreeSet<Key> = BTreeSet::new();
        for name in table.compared(mode) {
            for s in before.series(name).chain(after.series(name)) {
                keys.insert((s.name.clone(), s.labels.clone()));
            }
        }
        let got: BTreeMap<Key, f64> = keys
            .into_iter()
            .map(|k| {
                let delta = value(after, &k) - value(before, &k);
                (k, delta)
            })
            .filter(|(_, d)| *d != 0.0)
            .collect();
        let want: BTreeMap<Key, f64> = self
            .metrics
            .iter()
            .filter(|m| m.modes.iter().any(|m| m == mode))
            .map(|m| ((m.name.clone(), m.labels.clone()), m.delta))
            .collect();
        let mut failures = Vec::new();
        for (key, delta) in &want {
            let changed = got.get(key).copied().unwrap_or(0.0);
            if changed != *delta {
                failures.push(format!(
                    "{}: {} {:?} rose by {changed}, want {delta}",
                    self.name, key.0, key.1
                ));
            }
        }
        for (key, delta) in got.iter().filter(|(k, _)| !want.contains_key(*k)) {
            failures.push(format!(
                "{}: {} {:?} rose by {delta}, want no change",
                self.name, key.0, key.1
            ));
        }
        failures
    }
}

/// The value of `a x b + c x d + ...` (or a plain number): a ledger record's cost spelled out.
fn sum_of(text: &str) -> i64 {
    text.split('+')
        .map(|term| {
            term.split('x')
                .map(|n| {
                    n.trim().parse::<i64>().unwrap_or_else(|_| panic!("not a number in {text:?}"))
                })
                .product::<i64>()
        })
        .sum()
}
