//! The Grafana dashboard (`istio/grafana-dashboard.json`) against a real Prometheus.
//!
//! The structure test reads the JSON alone: every panel has the Prometheus datasource, a unique
//! id and a grid position inside the 24-column grid that overlaps no other panel; every variable
//! a query uses is defined; the spend and token panels filter by the cost center and agent
//! variables; money panels divide the nano-USD counter by 1e9 and say USD.
//!
//! The Prometheus test starts Debian's `prometheus` server on a loopback port, scraping the
//! proxy's admin port every second, puts a little load through the proxy (with the mock
//! upstream) so that every panel's series exists — a pending approval, a budget crossing its
//! 80 % warning, a circuit breaker, a guardrail refusal, a streamed and a non-streamed chat —
//! then runs every panel query through `/api/v1/query` and every template-variable query
//! through `/api/v1/label/.../values`, and requires data from each. A panel naming a metric or
//! a label the proxy does not export finds nothing there and fails the test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tollgate_e2e::harness::{tags, temp_dir, Harness, HttpClient, Reply};
use tollgate_e2e::mock::header;

/// How long Prometheus may take to start and answer `/-/ready`.
const PROMETHEUS_START: Duration = Duration::from_secs(30);
/// How long every panel query may take to return data after the load (a few scrapes).
const SERIES_WAIT: Duration = Duration::from_secs(30);

/// The agent whose chats carry the spend and token series.
const AGENT: &str = "dash-bot";
/// The cost center [`tags`] sends.
const COST_CENTER: &str = "CC-1234";

const DEPLOY: &str = r#"{name: deploy, path_prefix: /tools/deploy, kind: tool, tool: deploy, category: deploy, upstream: "{upstream}"}"#;
const MCP: &str = r#"{name: mcp, path_prefix: /mcp, kind: mcp, upstream: "{upstream}"}"#;

/// Every LLM call allowed; `deploy` waits for a human; a fixed-key budget small enough that one
/// chat crosses its 80 % warning (the case of `tests/fixtures/decisions.json`) and a cost
/// center budget for utilisation.
const POLICY: &str = "version: dash-1\n\
                      defaults: {llm: allow, tool: allow, other: deny}\n\
                      rules:\n\
                      \x20 - {id: deploy-needs-human, match: {tool: deploy}, effect: require_approval}\n\
                      budgets:\n\
                      \x20 - {id: cc-monthly, scope: cost_center, period: monthly, amount: \"100.00\"}\n\
                      \x20 - {id: watched-daily, scope: agent, key: watched-bot, period: daily, amount: \"0.000025\"}\n";

/// A breaker on every upstream, and the guardrails with `run_command` passing without approval
/// (only its forbidden patterns refuse it) and `deploy` described (an undescribed action is
/// refused as `unknown_action`).
const EXTRA: &str = "oversight: {breaker: {failure_threshold: 3, open_for: 60s}}\n\
                     guardrails:\n\
                     \x20 actions:\n\
                     \x20   run_command: {requires_approval: false}\n\
                     \x20   deploy: {category: deploy, risk_level: high}\n";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn dashboard() -> Value {
    let path = repo_root().join("istio/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn panels(d: &Value) -> &Vec<Value> {
    d["panels"].as_array().expect("`panels` is an array")
}

/// (panel title, refId, expr, legendFormat) of every panel target.
fn targets(d: &Value) -> Vec<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    panels(d)
        .iter()
        .flat_map(|p| {
            let title = s(&p["title"]);
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), s(&t["refId"]), s(&t["expr"]), s(&t["legendFormat"])))
        })
        .collect()
}

/// The `query` template variables: name → query text (`label_values(...)`).
fn query_variables(d: &Value) -> BTreeMap<String, String> {
    d["templating"]["list"]
        .as_array()
        .expect("`templating.list` is an array")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().expect("a variable name").to_string();
            let query = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or_else(|| panic!("variable {name} has no query"));
            assert_eq!(v["definition"].as_str(), Some(query), "variable {name}: definition");
            (name, query.to_string())
        })
        .collect()
}

/// The `$name` / `${name}` references in `expr`.
fn references(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let len =
            body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
        out.push(body[..len].to_string());
        rest = &body[len..];
    }
    out
}

/// `expr` with Grafana's variables replaced: the globals by fixed windows, the template
/// variables by `values`. Panics if a reference is left over.
fn substitute(expr: &str, values: &[(&str, &str)]) -> String {
    let mut out = expr.to_string();
    for (name, value) in
        [("__rate_interval", "1m"), ("__interval", "1m"), ("__range", "1h")].iter().chain(values)
    {
        out = out.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
    }
    assert!(!out.contains('$'), "unsubstituted variable in {out}");
    out
}

/// The metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tollgate_") {
        let tail = &rest[i..];
        let len = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..len].to_string());
        rest = &tail[len..];
    }
    out
}

/// The `{{label}}`s of a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_string()))
        .collect()
}

#[test]
fn dashboard_json_is_well_formed() {
    let d = dashboard();
    let panels = panels(&d);
    // The panels the dashboard is for, each found by its metric.
    let exprs: Vec<String> = targets(&d).into_iter().map(|(_, _, e, _)| e).collect();
    for metric in [
        "tollgate_cost_nano_usd_total",
        "tollgate_tokens_total",
        "tollgate_requests_total",
        "tollgate_budget_warnings_total",
        "histogram_quantile(0.5, sum by (le, decision) (rate(tollgate_decision_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, decision) (rate(tollgate_decision_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (le, route) (rate(tollgate_upstream_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, route) (rate(tollgate_upstream_duration_seconds_bucket",
        "tollgate_approvals_pending",
        "tollgate_approvals_requested_total",
        "tollgate_autonomy_basis_points) / 10000",
        "tollgate_budget_utilization_basis_points) / 10000",
        "tollgate_circuit_breaker_state",
        "tollgate_guardrail_violations_total",
        "tollgate_shed_total",
        "tollgate_data_free_bytes",
        "tollgate_data_seconds_until_full",
    ] {
        assert!(exprs.iter().any(|e| e.contains(metric)), "no panel queries {metric}");
    }
    let variables = query_variables(&d);
    let list = d["templating"]["list"].as_array().expect("templating list");
    assert!(
        list.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "a `datasource` variable"
    );
    for name in ["cost_center", "agent"] {
        assert!(variables.contains_key(name), "template variable {name}");
    }
    for v in list.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"]["uid"], "${datasource}", "variable {}", v["name"]);
    }

    let mut ids = std::collections::BTreeSet::new();
    let mut cells: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_else(|| panic!("a panel without a title: {p}"));
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: id is not an integer"));
        assert!(id > 0 && ids.insert(id), "{title}: id {id} is not unique");
        assert_eq!(
            p["datasource"],
            json!({"type": "prometheus", "uid": "${datasource}"}),
            "{title}: datasource"
        );
        let g = &p["gridPos"];
        let n = |k: &str| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}"));
        let (x, y, w, h) = (n("x"), n("y"), n("w"), n("h"));
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{title}: gridPos {g} outside the 24 columns");
        for (ox, oy, ow, oh, other) in &cells {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        cells.push((x, y, w, h, title.to_string()));
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = std::collections::BTreeSet::new();
        for t in targets {
            let r = t["refId"].as_str().unwrap_or_else(|| panic!("{title}: a target's refId"));
            assert!(refs.insert(r), "{title}: refId {r} twice");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("tollgate_"), "{title}/{r}: {expr:?} queries no Tollgate metric");
        }
        let exprs: Vec<&str> = targets.iter().filter_map(|t| t["expr"].as_str()).collect();
        let text = exprs.join("\n");
        if text.contains("tollgate_cost_nano_usd_total") || text.contains("tollgate_tokens_total") {
            for e in &exprs {
                for selector in ["cost_center=~\"$cost_center\"", "agent=~\"$agent\""] {
                    assert!(e.contains(selector), "{title}: {e} does not filter by {selector}");
                }
            }
        }
        if text.contains("tollgate_cost_nano_usd_total") {
            // nano-USD shown as USD: divided in the query, the unit and title say so.
            assert!(exprs.iter().all(|e| e.ends_with("/ 1e9")), "{title}: {exprs:?}");
            assert_eq!(p["fieldConfig"]["defaults"]["unit"], "currencyUSD", "{title}");
            assert!(title.contains("USD"), "{title}");
        }
    }

    // Every variable reference is defined, and every template variable is used.
    let defined: Vec<&str> = list.iter().filter_map(|v| v["name"].as_str()).collect();
    let mut used = std::collections::BTreeSet::new();
    let all_queries =
        targets(&d).into_iter().map(|(_, _, e, _)| e).chain(variables.values().cloned());
    for expr in all_queries {
        for r in references(&expr) {
            assert!(
                r.starts_with("__") || defined.contains(&r.as_str()),
                "{expr}: ${r} is not a template variable"
            );
            used.insert(r);
        }
    }
    for name in variables.keys() {
        assert!(used.contains(name), "template variable {name} is used by no query");
    }
}

// ---- Prometheus ----

/// The Prometheus server binary: `prometheus` on `PATH` (Debian's package installs it as
/// /usr/bin/prometheus).
fn prometheus_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the Prometheus server binary `prometheus` is missing: install Debian's prometheus \
                 package (apt-get install -y prometheus; scripts/test does)"
            )
        })
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `target` every second, and waits
    /// (at most [`PROMETHEUS_START`]) until it is ready.
    async fn start(client: &HttpClient, target: SocketAddr) -> Prometheus {
        let bin = prometheus_binary();
        let mut dir = temp_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n\
                 \x20 - job_name: tollgate\n\
                 \x20   static_configs: [{{targets: [\"{target}\"]}}]\n"
            ),
        )
        .expect("write prometheus.yml");
        // A port freed just before; another process could take it in between, so a start
        // that exits is tried again on another port.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
            let child = Command::new(&bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut p = Prometheus { child, url: format!("http://127.0.0.1:{port}"), dir };
            let deadline = Instant::now() + PROMETHEUS_START;
            loop {
                if p.child.try_wait().expect("try_wait").is_some() {
                    break;
                }
                if let Ok((StatusCode::OK, _)) = get(client, &format!("{}/-/ready", p.url)).await {
                    return p;
                }
                assert!(
                    Instant::now() < deadline,
                    "Prometheus not ready after {PROMETHEUS_START:?}:\n{}",
                    p.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("Prometheus exited at start:\n{}", p.log());
            // Keep the directory for the next attempt.
            dir = std::mem::take(&mut p.dir);
        }
        panic!("Prometheus did not start in 3 attempts");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` on the HTTP API; the `data` of a `success` answer.
    async fn api(&self, client: &HttpClient, path: &str) -> Value {
        let (status, body) = get(client, &format!("{}{path}", self.url))
            .await
            .unwrap_or_else(|e| panic!("Prometheus {path}: {e}"));
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("Prometheus {path}: {status} {e}: {}", String::from_utf8_lossy(&body))
        });
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("success")),
            "Prometheus {path}: {v}"
        );
        v["data"].clone()
    }

    /// An instant query's result (a vector's samples; a scalar as one element).
    async fn query(&self, client: &HttpClient, expr: &str) -> Vec<Value> {
        let data = self.api(client, &format!("/api/v1/query?query={}", encode(expr))).await;
        match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar" | "string") => vec![data["result"].clone()],
            other => panic!("{expr}: result type {other:?}"),
        }
    }

    /// The values of `label` on the series `selector` matches.
    async fn label_values(&self, client: &HttpClient, label: &str, selector: &str) -> Vec<String> {
        let path = format!("/api/v1/label/{label}/values?match[]={}", encode(selector));
        let data = self.api(client, &path).await;
        data.as_array()
            .expect("a list of values")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET url` with a 5 s bound: the status and body, or why not.
async fn get(client: &HttpClient, url: &str) -> Result<(StatusCode, Bytes), String> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .map_err(|_| "body not read within 5 s".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// The metrics the README's table lists as emitted by the Envoy filter only: a sidecar never
/// has their series, so a panel may name them without data here.
fn filter_only_metrics() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let start = readme
        .find("| metric | type | labels | emitted by | meaning |")
        .expect("the README's metrics table");
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells.get(3) == Some(&"Envoy filter")).then(|| cells[0].trim_matches('`').to_string())
        })
        .collect()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 16, "stream": stream,
           "messages": [{"role": "user", "content": "hello"}]})
}

fn mcp_call(tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": tool, "arguments": arguments}})
}

fn expect(reply: &Reply, status: StatusCode, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.text());
}

/// The load: every kind of event a panel shows.
async fn load(h: &Harness) {
    let with = |agent: &str, extra: &[(&str, &str)]| {
        let mut headers = tags(agent);
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        headers
    };
    for _ in 0..3 {
        let plain = h.post("/v1/chat/completions", &tags(AGENT), &chat(false)).await;
        expect(&plain, StatusCode::OK, "a chat");
        let streamed = h.post("/v1/chat/completions", &tags(AGENT), &chat(true)).await;
        expect(&streamed, StatusCode::OK, "a streamed chat");
        assert!(streamed.text().contains("data: [DONE]"), "{}", streamed.text());
    }
    // One chat that spends 94 % of `watched-daily`: its 80 % warning.
    let watched = h
        .post(
            "/v1/chat/completions",
            &with("watched-bot", &[(header::INPUT_TOKENS, "117"), (header::OUTPUT_TOKENS, "10")]),
            &json!({"model": "gpt-4o-mini", "max_tokens": 10, "messages": []}),
        )
        .await;
    expect(&watched, StatusCode::OK, "the watched agent's chat");
    // An upstream 503: a breaker failure (below its threshold) and a 5xx decision.
    let failing = h
        .post("/v1/chat/completions", &with(AGENT, &[(header::STATUS, "503")]), &chat(false))
        .await;
    expect(&failing, StatusCode::SERVICE_UNAVAILABLE, "the upstream's 503");
    // A deploy waiting for a human: pending, requested by reason.
    let deploy = h.post("/tools/deploy", &tags("ops-bot"), &json!({"service": "api"})).await;
    expect(&deploy, StatusCode::FORBIDDEN, "the deploy");
    assert_eq!(deploy.header("x-tollgate-decision"), Some("require_approval"), "{}", deploy.text());
    // A tool call that runs on its own and one the guardrails refuse.
    let ok = h.post("/mcp", &tags("ops-bot"), &mcp_call("run_command", json!({"cmd": "ls"}))).await;
    expect(&ok, StatusCode::OK, "a harmless command");
    let refused = h
        .post("/mcp", &tags("ops-bot"), &mcp_call("run_command", json!({"cmd": "rm -rf /"})))
        .await;
    expect(&refused, StatusCode::FORBIDDEN, "a forbidden command");
    assert_eq!(refused.header("x-tollgate-reason"), Some("forbidden_pattern"));
    // Budget utilisation is set when the budgets are read.
    let budgets = h.admin_get("/admin/budgets", true).await;
    expect(&budgets, StatusCode::OK, "/admin/budgets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_from_a_real_prometheus() {
    let d = dashboard();
    let h = Harness::builder().policy(POLICY).extra(EXTRA).route(DEPLOY).route(MCP).start().await;
    let admin: SocketAddr = h.admin.trim_start_matches("http://").parse().expect("admin address");
    let prometheus = Prometheus::start(&h.client, admin).await;

    // The first scrape before the load, so that rates see the counters grow.
    let deadline = Instant::now() + SERIES_WAIT;
    loop {
        let up = prometheus.query(&h.client, "up{job=\"tollgate\"} == 1").await;
        if !up.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has not scraped the admin port: {:?}",
            prometheus.api(&h.client, "/api/v1/targets").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load(&h).await;

    // Every target with the variables at "All" and at the values the load used.
    let all = [("cost_center", ".*"), ("agent", ".*")];
    let one = [("cost_center", COST_CENTER), ("agent", AGENT)];
    let mut queries: Vec<(String, String, String)> = Vec::new();
    for (title, r, expr, legend) in targets(&d) {
        let mut variants = vec![substitute(&expr, &all)];
        if expr.contains("$cost_center") || expr.contains("$agent") {
            variants.push(substitute(&expr, &one));
        }
        for q in variants {
            queries.push((format!("{title} / {r}"), q, legend.clone()));
        }
    }

    // Polled (bounded) until every query has data: a rate needs two scrapes after the load.
    let deadline = Instant::now() + SERIES_WAIT;
    let results = loop {
        let mut results = Vec::new();
        for (panel, q, legend) in &queries {
            results.push((panel, q, legend, prometheus.query(&h.client, q).await));
        }
        let empty: Vec<String> = results
            .iter()
            .filter(|(_, _, _, r)| r.is_empty())
            .map(|(p, q, _, _)| format!("{p}: {q}"))
            .collect();
        if empty.is_empty() {
            break results;
        }
        assert!(
            Instant::now() < deadline,
            "no data after {SERIES_WAIT:?} for:\n  {}\nseries Prometheus has: {:?}",
            empty.join("\n  "),
            prometheus.label_values(&h.client, "__name__", "{job=\"tollgate\"}").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // The legend's labels are on every series (a `by` over a label the metric lacks is not).
    for (panel, q, legend, result) in &results {
        for label in legend_labels(legend) {
            for series in result {
                assert!(
                    series["metric"].get(&label).is_some(),
                    "{panel}: {q}: series {series} has no `{label}` for the legend {legend:?}"
                );
            }
        }
    }

    // Every metric a panel names exists here, or is one only the Envoy filter emits (panels
    // that fall back to `or vector(0)` would hide a misspelt name otherwise).
    let names = prometheus.label_values(&h.client, "__name__", "{job=\"tollgate\"}").await;
    let filter_only = filter_only_metrics();
    assert!(filter_only.len() >= 5, "the README's filter-only metrics: {filter_only:?}");
    for (_, q, _) in &queries {
        for name in metric_names(q) {
            assert!(
                names.contains(&name) || filter_only.contains(&name),
                "{q}: {name} is neither scraped from the proxy nor a filter metric"
            );
        }
    }

    // The variables filter: a cost center without traffic empties the spend and token panels.
    for (title, r, expr, _) in targets(&d) {
        if expr.contains("$cost_center") {
            let q = substitute(&expr, &[("cost_center", "CC-none"), ("agent", ".*")]);
            let result = prometheus.query(&h.client, &q).await;
            assert!(result.is_empty(), "{title} / {r}: {q} ignores the cost center: {result:?}");
        }
    }

    // The template variables' own queries list what the load sent.
    for (name, query) in query_variables(&d) {
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: {query} is not label_values(...)"));
        let (selector, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
        let selector = substitute(selector.trim(), &all);
        let values = prometheus.label_values(&h.client, label.trim(), &selector).await;
        let want = match name.as_str() {
            "cost_center" => COST_CENTER,
            "agent" => AGENT,
            other => panic!("unexpected variable {other}"),
        };
        assert!(values.iter().any(|v| v == want), "variable {name}: {query} gave {values:?}");
    }

    // A few panels against what the load did.
    let value = |series: &Value| -> f64 {
        series["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    let pending = prometheus.query(&h.client, "sum(tollgate_approvals_pending)").await;
    assert_eq!(pending.iter().map(value).collect::<Vec<_>>(), [1.0], "one approval pending");
    let warned = prometheus
        .query(
            &h.client,
            "tollgate_budget_warnings_total{budget=\"watched-daily\",threshold=\"80\"}",
        )
        .await;
    assert_eq!(warned.iter().map(value).collect::<Vec<_>>(), [1.0], "the 80 % warning");
    let refused = prometheus
        .query(&h.client, "tollgate_guardrail_violations_total{reason=\"forbidden_pattern\"}")
        .await;
    assert_eq!(refused.iter().map(value).collect::<Vec<_>>(), [1.0], "one guardrail refusal");
    let breakers = prometheus.query(&h.client, "tollgate_circuit_breaker_state").await;
    assert!(
        !breakers.is_empty() && breakers.iter().all(|s| value(s) == 0.0),
        "closed breakers: {breakers:?}"
    );
}
