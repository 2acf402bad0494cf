//! Human oversight through real sockets (seeds 000, 001, 002): approvals and their single-use
//! retries, risk-band timeouts, autonomy modes and budgets under concurrency, the loop
//! detector, the circuit breaker, error escalation, and approvals surviving a restart.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_e2e::harness::{tags, temp_dir, Harness, Reply};
use tollgate_e2e::mock::header;

const DEPLOY: &str = r#"{name: deploy, path_prefix: /tools/deploy, kind: tool, tool: deploy, category: deploy, upstream: "{upstream}"}"#;

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
}

fn with(agent: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = tags(agent);
    h.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    h
}

fn code(reply: &Reply) -> String {
    reply.json()["error"]["code"].as_str().unwrap_or_default().to_string()
}

fn approval_id(reply: &Reply) -> String {
    let id = reply.header("x-tollgate-approval-id").expect("approval id header").to_string();
    assert_eq!(reply.json()["error"]["approval_id"], id.as_str(), "id in the body too");
    assert!(id.starts_with("apr_") && id.len() == 36, "{id}");
    id
}

/// The agent's escalation standing, from the admin API.
async fn standing(h: &Harness, agent: &str) -> Value {
    h.admin_get(&format!("/admin/agents/{agent}"), true).await.json()["standing"].clone()
}

/// Polls an approval until it leaves `pending` (every 20 ms, at most 5 s).
async fn until_decided(h: &Harness, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = h.admin_get(&format!("/admin/approvals/{id}"), true).await.json();
        if a["state"] != "pending" {
            return a;
        }
        assert!(Instant::now() < deadline, "approval {id} still pending after 5 s: {a}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn audit_kinds(h: &Harness, id: &str) -> Vec<String> {
    h.audit()
        .await
        .into_iter()
        .filter(|r| r["approval_id"] == id)
        .map(|r| r["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until the audit log (written by the ledger thread) has `kinds` for `id`.
async fn audit_until(h: &Harness, id: &str, kinds: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        h.shared().ledger.flush().await;
        let got = audit_kinds(h, id).await;
        if kinds.iter().all(|k| got.iter().any(|g| g == k)) {
            return got;
        }
        assert!(Instant::now() < deadline, "audit for {id} has {got:?}, expected {kinds:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn approval_round_trip_is_single_use_and_bound_to_agent_and_action() {
    let h = Harness::builder()
        .route(DEPLOY)
        .policy("version: v1\ndefaults: {llm: allow, tool: require_approval, other: deny}\n")
        .start()
        .await;
    let args = json!({"service": "api", "version": "1.2.3"});

    let first = h.post("/tools/deploy", &tags("bot-a"), &args).await;
    assert_eq!(first.status, StatusCode::FORBIDDEN, "{}", first.text());
    assert_eq!(first.header("x-tollgate-decision"), Some("require_approval"));
    assert_eq!(code(&first), "default_require_approval");
    let id = approval_id(&first);
    let message = first.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("risk ") && message.contains("blast_radius high"), "{message}");
    assert_eq!(h.mock.request_count(), 0, "nothing reached the tool");

    // The same call again while pending: the same approval, no copy for the operator.
    let again = h.post("/tools/deploy", &tags("bot-a"), &args).await;
    assert_eq!(approval_id(&again), id);
    let pending = h.admin_get("/admin/approvals?state=pending", true).await.json();
    let list = pending["approvals"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{pending}");
    let a = &list[0];
    assert_eq!(
        (a["id"].as_str(), a["agent"].as_str(), a["action"].as_str()),
        (Some(&*id), Some("bot-a"), Some("deploy"))
    );
    assert_eq!(a["reason"], "default_require_approval");
    assert_eq!(a["on_timeout"], "deny", "undeclared risk scores high: denied at its timeout");
    assert!(a["risk_score"].as_u64().unwrap() >= 7000, "{a}");
    assert_eq!(a["digest"].as_str().map(str::len), Some(16));

    // A retry before anyone answered: still pending.
    let retry = with("bot-a", &[("x-tollgate-approval", &id)]);
    let early = h.post("/tools/deploy", &retry, &args).await;
    assert_eq!((early.status, code(&early)), (StatusCode::FORBIDDEN, "approval_pending".into()));

    let granted = h.admin_call(Method::POST, &format!("/admin/approvals/{id}/approve"), true).await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.text());
    assert_eq!(granted.json()["state"], "approved");

    // Another agent, or the same agent with other arguments, cannot use it.
    let thief =
        h.post("/tools/deploy", &with("bot-b", &[("x-tollgate-approval", &id)]), &args).await;
    assert_eq!((thief.status, code(&thief)), (StatusCode::FORBIDDEN, "approval_mismatch".into()));
    let other = json!({"service": "billing", "version": "9.9.9"});
    let swapped = h.post("/tools/deploy", &retry, &other).await;
    assert_eq!(code(&swapped), "approval_mismatch");
    assert_eq!(h.mock.request_count(), 0);

    // The approved retry passes once.
    let ok = h.post("/tools/deploy", &retry, &args).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(h.mock.request_count(), 1);
    let recorded = &h.mock.requests()[0];
    assert!(
        recorded.header("x-tollgate-approval").is_none(),
        "the approval header is not forwarded"
    );
    let twice = h.post("/tools/deploy", &retry, &args).await;
    assert_eq!((twice.status, code(&twice)), (StatusCode::FORBIDDEN, "approval_used".into()));
    assert_eq!(h.mock.request_count(), 1);

    // Decided approvals cannot be decided again; unknown ids are named.
    let late = h.admin_call(Method::POST, &format!("/admin/approvals/{id}/deny"), true).await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    let unknown = h.admin_call(Method::POST, "/admin/approvals/apr_nope/approve", true).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let forged = h
        .post("/tools/deploy", &with("bot-a", &[("x-tollgate-approval", "apr_nope")]), &args)
        .await;
    assert_eq!(code(&forged), "approval_unknown");
    let unauthorized = h.admin_get("/admin/approvals", false).await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);

    let kinds = audit_until(&h, &id, &["decision", "approval_granted", "approval_used"]).await;
    let pos = |k: &str| kinds.iter().position(|g| g == k).unwrap();
    assert!(
        pos("decision") < pos("approval_granted") && pos("approval_granted") < pos("approval_used"),
        "{kinds:?}"
    );
    let overview = h.admin_get("/admin/oversight", true).await.json();
    assert_eq!(
        overview["top_approval_reasons"][0]["reason"], "default_require_approval",
        "{overview}"
    );
    assert_eq!(
        overview["autonomy"]["by_category"]["deploy"]["counts"]["human_approved"], 1,
        "{overview}"
    );
}

#[tokio::test]
async fn timeouts_follow_the_risk_band_medium_approves_high_denies() {
    let medium = r#"{name: restart, path_prefix: /tools/restart, kind: tool, tool: restart, category: execute, upstream: "{upstream}", risk: {blast_radius: high, reversibility: manual_rollback, data_sensitivity: internal, cost_impact: low, historical_success: low}}"#;
    let high = r#"{name: drop, path_prefix: /tools/drop, kind: tool, tool: drop_db, category: delete, upstream: "{upstream}", risk: {blast_radius: high, reversibility: irreversible, data_sensitivity: pii, cost_impact: high, historical_success: high}}"#;
    let low = r#"{name: read, path_prefix: /tools/read, kind: tool, tool: read_doc, category: read, upstream: "{upstream}", risk: {blast_radius: low, reversibility: automatic_rollback, data_sensitivity: public, cost_impact: low, historical_success: low}}"#;
    let h = Harness::builder()
        .route(medium)
        .route(high)
        .route(low)
        .extra("oversight: {approvals: {medium_timeout: 300ms, high_timeout: 300ms}, sweep_interval: 50ms}")
        .policy("version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\n")
        .start()
        .await;
    let args = json!({"target": "prod"});

    // Below 30: runs on its own, the score on the answer.
    let read = h.post("/tools/read", &tags("ops"), &args).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(read.header("x-tollgate-risk"), Some("10"));

    // 30 to 70: waits for a human; the score and its parts in the explanation.
    let m = h.post("/tools/restart", &tags("ops"), &args).await;
    assert_eq!((m.status, code(&m)), (StatusCode::FORBIDDEN, "risk_medium".into()), "{}", m.text());
    let message = m.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("risk 44 (medium): blast_radius high 27, reversibility medium 12.5, data_sensitivity low 2, cost_impact low 1.5, historical_success low 1"),
        "{message}"
    );
    let m_id = approval_id(&m);
    let x = h.post("/tools/drop", &tags("ops"), &args).await;
    assert_eq!(code(&x), "risk_high");
    assert!(x.json()["error"]["message"].as_str().unwrap().contains("risk 90 (high)"));
    let x_id = approval_id(&x);

    // Nobody answers: medium is approved, high denied, by the timeout.
    let m_after = until_decided(&h, &m_id).await;
    assert_eq!(
        (m_after["state"].as_str(), m_after["decided_by"].as_str()),
        (Some("approved"), Some("timeout"))
    );
    let x_after = until_decided(&h, &x_id).await;
    assert_eq!(
        (x_after["state"].as_str(), x_after["decided_by"].as_str()),
        (Some("denied"), Some("timeout"))
    );

    let m_retry =
        h.post("/tools/restart", &with("ops", &[("x-tollgate-approval", &m_id)]), &args).await;
    assert_eq!(m_retry.status, StatusCode::OK, "{}", m_retry.text());
    let x_retry =
        h.post("/tools/drop", &with("ops", &[("x-tollgate-approval", &x_id)]), &args).await;
    assert_eq!((x_retry.status, code(&x_retry)), (StatusCode::FORBIDDEN, "approval_denied".into()));
    assert_eq!(h.mock.request_count(), 2, "the low-risk call and the medium retry only");
    audit_until(&h, &m_id, &["approval_expired_approved", "approval_used"]).await;
    audit_until(&h, &x_id, &["approval_expired_denied"]).await;
}

/// An approval an Envoy filter raises through the collector (`POST /v1/fleet/approvals`) times
/// out on the collector's own `oversight.approvals` timeouts, whatever timeout the filter sent
/// (the filter refuses those fields in its configuration): high risk is denied, anything else
/// approved.
#[tokio::test]
async fn a_filters_approval_times_out_on_the_collectors_timeouts() {
    let h = Harness::builder()
        .extra("oversight: {approvals: {medium_timeout: 300ms, high_timeout: 300ms}, sweep_interval: 50ms}")
        .start()
        .await;
    let raise = |action: &str, band: &str, on_timeout: Value| {
        json!({"request_id": format!("envoy-{action}"), "agent": "mesh-bot", "cost_center": "CC-1",
            "project": "P-1", "route": "tool", "action": action, "digest": format!("{:016x}", action.bytes().map(u64::from).sum::<u64>()),
            "reason": format!("risk_{band}"), "why": "the action's risk needs a human",
            "risk": "risk 80", "risk_score": 8000, "risk_band": band,
            "on_timeout": on_timeout, "timeout_ms": 86_400_000u64})
    };
    let mut ids = Vec::new();
    for body in [
        raise("drop_db", "high", json!("deny")),
        raise("restart", "medium", json!("approve")),
        raise("deploy", "low", Value::Null),
    ] {
        let request = hyper::Request::post(format!("{}/v1/fleet/approvals", h.admin))
            .header("authorization", format!("Bearer {}", h.token))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .unwrap();
        let answer = tollgate_e2e::harness::read(h.client.request(request).await.unwrap()).await;
        let answer = answer.json();
        assert_eq!(answer["ok"], true, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    let started = Instant::now();
    let mut states = Vec::new();
    for id in &ids {
        let a = until_decided(&h, id).await;
        states.push((
            a["state"].as_str().map(str::to_owned),
            a["decided_by"].as_str().map(str::to_owned),
        ));
    }
    assert!(started.elapsed() < Duration::from_secs(3), "timed out on the collector's 300ms");
    let want = |state: &str| (Some(state.to_owned()), Some("timeout".to_owned()));
    assert_eq!(states, [want("denied"), want("approved"), want("approved")]);
}

#[tokio::test]
async fn historical_success_comes_from_the_proxys_own_outcomes() {
    let route = r#"{name: lookup, path_prefix: /tools/lookup, kind: tool, tool: lookup, category: read, upstream: "{upstream}", risk: {blast_radius: low, reversibility: automatic_rollback, data_sensitivity: public}}"#;
    let h = Harness::builder()
        .route(route)
        .policy("version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\n")
        .start()
        .await;
    let call = |n: u32| json!({"q": n});
    // Never done: history counts as high (9 points of 10).
    let first = h.post("/tools/lookup", &tags("finder"), &call(1)).await;
    assert_eq!(first.header("x-tollgate-risk"), Some("18"));
    // One success of one: > 95 % → low (1 point).
    let second = h.post("/tools/lookup", &tags("finder"), &call(2)).await;
    assert_eq!(second.header("x-tollgate-risk"), Some("10"));
    // A failure (the upstream answers 500): 2 of 3 → high again.
    let failing =
        h.post("/tools/lookup", &with("finder", &[(header::STATUS, "500")]), &call(3)).await;
    assert_eq!(failing.status, StatusCode::INTERNAL_SERVER_ERROR);
    let fourth = h.post("/tools/lookup", &tags("finder"), &call(4)).await;
    assert_eq!(fourth.header("x-tollgate-risk"), Some("18"));
    // Per agent: another agent has no history.
    let other = h.post("/tools/lookup", &tags("other"), &call(5)).await;
    assert_eq!(other.header("x-tollgate-risk"), Some("18"));
}

#[tokio::test]
async fn autonomy_budget_of_5_lets_exactly_5_of_20_concurrent_calls_run() {
    let h = Harness::builder()
        .extra("autonomy: {default: AUTO_EXECUTE, budgets: {default: {per_day: 5}}}")
        .start()
        .await;
    let h = std::sync::Arc::new(h);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.post("/v1/chat/completions", &tags("auto-bot"), &chat()).await
        }));
    }
    let mut ran = 0;
    let mut asked = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            StatusCode::OK => ran += 1,
            StatusCode::FORBIDDEN => {
                assert_eq!(
                    r.header("x-tollgate-decision"),
                    Some("require_approval"),
                    "{}",
                    r.text()
                );
                assert_eq!(code(&r), "autonomy_budget_exhausted");
                assert!(r.header("x-tollgate-approval-id").is_some());
                asked += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!((ran, asked), (5, 15), "exactly the budget runs, never a silent pass or a 429");
    assert_eq!(h.mock.request_count(), 5);

    let metrics = h.metrics().await;
    for line in [
        r#"tollgate_actions_total{category="llm",verdict="auto"} 5"#,
        r#"tollgate_actions_total{category="llm",verdict="approval_required"} 15"#,
        r#"tollgate_autonomy_basis_points{category="all"} 2500"#,
        r#"tollgate_approvals_requested_total{reason="autonomy_budget_exhausted"} 15"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in\n{metrics}");
    }
    let overview = h.admin_get("/admin/oversight", true).await.json();
    assert_eq!(overview["autonomy"]["overall"]["autonomy"], "0.25", "{overview}");
    assert_eq!(overview["autonomy"]["by_category"]["llm"]["counts"]["total"], 20);
    assert_eq!(
        overview["top_approval_reasons"][0],
        json!({"reason": "autonomy_budget_exhausted", "count": 15})
    );
}

#[tokio::test]
async fn autonomy_modes_gate_execution() {
    let h = Harness::builder()
        .extra(
            "autonomy:\n  default: AUTO_EXECUTE\n  accounts:\n    off-bot: {default: DISABLED}\n    \
             idea-bot: {default: PROPOSE_ONLY}\n    ask-bot: {default: APPROVAL_REQUIRED}\n",
        )
        .start()
        .await;
    let off = h.post("/v1/chat/completions", &tags("off-bot"), &chat()).await;
    assert_eq!((off.status, code(&off)), (StatusCode::FORBIDDEN, "autonomy_disabled".into()));
    let idea = h
        .post("/v1/chat/completions", &with("idea-bot", &[("x-request-id", "idea-1")]), &chat())
        .await;
    assert_eq!((idea.status, code(&idea)), (StatusCode::FORBIDDEN, "autonomy_propose_only".into()));
    assert!(idea.json()["error"]["message"].as_str().unwrap().contains("proposal recorded"));
    let ask = h.post("/v1/chat/completions", &tags("ask-bot"), &chat()).await;
    assert_eq!(code(&ask), "autonomy_approval_required");
    approval_id(&ask);
    let auto = h.post("/v1/chat/completions", &tags("free-bot"), &chat()).await;
    assert_eq!(auto.status, StatusCode::OK);
    assert_eq!(h.mock.request_count(), 1);
    let proposal =
        h.audit().await.into_iter().find(|r| r["kind"] == "proposal").expect("a proposal record");
    assert_eq!(
        (proposal["agent"].as_str(), proposal["request_id"].as_str()),
        (Some("idea-bot"), Some("idea-1"))
    );
}

#[tokio::test]
async fn the_loop_detector_blocks_the_fourth_identical_call_and_recovers() {
    let h = Harness::builder()
        .route(r#"{name: search, path_prefix: /tools/search, kind: tool, tool: web_search, category: read, upstream: "{upstream}"}"#)
        .extra("oversight: {loops: {max_repeats: 3, window: 1s}}")
        .policy("version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\n")
        .start()
        .await;
    let same = json!({"query": "why is my build failing", "page": 1});
    for n in 1..=3 {
        let r = h.post("/tools/search", &tags("looper"), &same).await;
        assert_eq!(r.status, StatusCode::OK, "call {n}: {}", r.text());
    }
    let fourth = h.post("/tools/search", &tags("looper"), &same).await;
    assert_eq!((fourth.status, code(&fourth)), (StatusCode::FORBIDDEN, "loop_detected".into()));
    assert!(fourth.header("retry-after").is_some());
    assert_eq!(h.mock.request_count(), 3);
    // Other arguments, or another agent, are other calls.
    let reordered_but_same = json!({"page": 1, "query": "why is my build failing"});
    assert_eq!(
        code(&h.post("/tools/search", &tags("looper"), &reordered_but_same).await),
        "loop_detected"
    );
    assert_eq!(
        h.post("/tools/search", &tags("looper"), &json!({"query": "x"})).await.status,
        StatusCode::OK
    );
    assert_eq!(h.post("/tools/search", &tags("other"), &same).await.status, StatusCode::OK);
    // Once the window has passed the call goes through again (bounded poll).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = h.post("/tools/search", &tags("looper"), &same).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert_eq!(code(&r), "loop_detected");
        assert!(Instant::now() < deadline, "still blocked after 5 s");
    }
}

#[tokio::test]
async fn the_circuit_breaker_opens_fails_fast_and_closes_after_a_good_probe() {
    let h = Harness::builder()
        .extra("oversight: {breaker: {failure_threshold: 3, open_for: 400ms}}")
        .start()
        .await;
    let failing = with("caller", &[(header::STATUS, "503")]);
    for _ in 0..3 {
        let r = h.post("/v1/chat/completions", &failing, &chat()).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "the upstream's own 503");
        assert_ne!(code(&r), "circuit_open");
    }
    assert_eq!(h.mock.request_count(), 3);
    let started = Instant::now();
    let fast = h.post("/v1/chat/completions", &tags("caller"), &chat()).await;
    assert_eq!(
        (fast.status, code(&fast)),
        (StatusCode::SERVICE_UNAVAILABLE, "circuit_open".into())
    );
    assert!(fast.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_millis(200), "fails fast");
    assert_eq!(h.mock.request_count(), 3, "nothing sent while open");
    assert!(h.metrics().await.contains("tollgate_circuit_breaker_state{upstream=\""));

    // Half-open: a failing probe opens it again.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let probe = h.post("/v1/chat/completions", &failing, &chat()).await;
    assert_eq!(probe.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.mock.request_count(), 4, "one probe went through");
    assert_eq!(
        code(&h.post("/v1/chat/completions", &tags("caller"), &chat()).await),
        "circuit_open"
    );

    // A good probe closes it.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let probe = h.post("/v1/chat/completions", &tags("caller"), &chat()).await;
    assert_eq!(probe.status, StatusCode::OK, "{}", probe.text());
    for _ in 0..3 {
        assert_eq!(
            h.post("/v1/chat/completions", &tags("caller"), &chat()).await.status,
            StatusCode::OK
        );
    }
    let overview = h.admin_get("/admin/oversight", true).await.json();
    assert_eq!(overview["breakers"][0]["state"], "closed", "{overview}");
}

#[tokio::test]
async fn consecutive_errors_escalate_to_review_then_disable_until_reenabled() {
    let h = Harness::builder()
        .extra("oversight: {escalation: {review_at: 3, disable_at: 5}}")
        .start()
        .await;
    // The upstream refuses the agent's request as bad: the agent's error.
    let failing = with("flaky", &[(header::STATUS, "400")]);
    for _ in 0..3 {
        assert_eq!(
            h.post("/v1/chat/completions", &failing, &chat()).await.status,
            StatusCode::BAD_REQUEST
        );
    }
    // 3 in a row: every action needs a human.
    let review = h.post("/v1/chat/completions", &failing, &chat()).await;
    assert_eq!(code(&review), "error_escalation", "{}", review.text());
    // Two approved retries that fail again: errors 4 and 5.
    let mut id = approval_id(&review);
    for n in 4..=5 {
        let granted =
            h.admin_call(Method::POST, &format!("/admin/approvals/{id}/approve"), true).await;
        assert_eq!(granted.status, StatusCode::OK);
        let mut retry = failing.clone();
        retry.push(("x-tollgate-approval".into(), id.clone()));
        let r = h.post("/v1/chat/completions", &retry, &chat()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "error {n} reached the upstream");
        let next = h.post("/v1/chat/completions", &failing, &chat()).await;
        if n == 4 {
            assert_eq!(code(&next), "error_escalation");
            id = approval_id(&next);
        } else {
            assert_eq!(
                (next.status, code(&next)),
                (StatusCode::FORBIDDEN, "agent_disabled".into())
            );
        }
    }
    // Disabled even for healthy calls; other agents are unaffected.
    assert_eq!(
        code(&h.post("/v1/chat/completions", &tags("flaky"), &chat()).await),
        "agent_disabled"
    );
    assert_eq!(
        h.post("/v1/chat/completions", &tags("steady"), &chat()).await.status,
        StatusCode::OK
    );
    let standing = h.admin_get("/admin/agents/flaky", true).await.json();
    assert_eq!(standing["standing"]["standing"], "disabled", "{standing}");

    let enabled = h.admin_call(Method::POST, "/admin/agents/flaky/enable", true).await.json();
    assert_eq!(enabled["was_disabled"], true);
    assert_eq!(
        h.post("/v1/chat/completions", &tags("flaky"), &chat()).await.status,
        StatusCode::OK
    );
}

/// 429s and 5xx are the provider's doing: an SDK call and its retries that all hit a rate
/// limit or an outage must not put the agent under review or disable it. They still open the
/// upstream's circuit breaker.
#[tokio::test]
async fn provider_errors_open_the_breaker_but_never_escalate_the_agent() {
    let h = Harness::builder()
        .extra(
            "oversight: {escalation: {review_at: 3, disable_at: 5}, \
             breaker: {failure_threshold: 6, open_for: 60s}}",
        )
        .start()
        .await;
    // One SDK call and its two retries, all rate limited.
    for _ in 0..3 {
        let failing = with("busy", &[(header::STATUS, "429")]);
        let r = h.post("/v1/chat/completions", &failing, &chat()).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(
        standing(&h, "busy").await["standing"],
        "normal",
        "not under review after three 429s"
    );
    // Two more: a 500 and Anthropic's 529 (overloaded). Five provider errors in a row.
    for status in ["500", "529"] {
        let failing = with("busy", &[(header::STATUS, status)]);
        let r = h.post("/v1/chat/completions", &failing, &chat()).await;
        assert_eq!(r.status.as_str(), status);
    }
    let now = standing(&h, "busy").await;
    assert_eq!(now, json!({"standing": "normal", "consecutive_errors": 0}), "not disabled");
    let fine = h.post("/v1/chat/completions", &tags("busy"), &chat()).await;
    assert_eq!(fine.status, StatusCode::OK, "{}", fine.text());

    // The breaker hears of them: six provider errors in a row open it.
    for _ in 0..6 {
        let failing = with("busy", &[(header::STATUS, "503")]);
        let r = h.post("/v1/chat/completions", &failing, &chat()).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let sent = h.mock.request_count();
    let open = h.post("/v1/chat/completions", &tags("busy"), &chat()).await;
    assert_eq!(
        (open.status, code(&open)),
        (StatusCode::SERVICE_UNAVAILABLE, "circuit_open".into())
    );
    assert_eq!(h.mock.request_count(), sent, "nothing sent while open");
    assert_eq!(standing(&h, "busy").await["standing"], "normal");
}

#[tokio::test]
async fn pending_approvals_survive_a_restart() {
    let dir = temp_dir("approvals-restart");
    let policy = "version: v1\ndefaults: {llm: allow, tool: require_approval, other: deny}\n";
    let args = json!({"service": "api"});
    let h = Harness::builder().route(DEPLOY).policy(policy).data_dir(&dir).start().await;
    let first = h.post("/tools/deploy", &tags("bot-a"), &args).await;
    let id = approval_id(&first);
    h.stop().await;

    let h = Harness::builder().route(DEPLOY).policy(policy).data_dir(&dir).start().await;
    let pending = h.admin_get("/admin/approvals?state=pending", true).await.json();
    assert_eq!(pending["approvals"][0]["id"], id.as_str(), "{pending}");
    assert_eq!(pending["approvals"][0]["agent"], "bot-a");
    let granted = h.admin_call(Method::POST, &format!("/admin/approvals/{id}/approve"), true).await;
    assert_eq!(granted.status, StatusCode::OK);
    let retry = with("bot-a", &[("x-tollgate-approval", &id)]);
    assert_eq!(h.post("/tools/deploy", &retry, &args).await.status, StatusCode::OK);
    h.stop().await;

    // Used stays used across a restart too.
    let h = Harness::builder().route(DEPLOY).policy(policy).data_dir(&dir).start().await;
    let again = h.post("/tools/deploy", &retry, &args).await;
    assert_eq!(code(&again), "approval_used");
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's worked example, as it reads.
#[tokio::test]
async fn readme_worked_example_first_deploy_needs_a_human_then_runs_on_its_own() {
    let route = r#"{name: deploy, path_prefix: /tools/deploy, kind: tool, tool: deploy, category: deploy, upstream: "{upstream}", risk: {blast_radius: medium, reversibility: automatic_rollback, data_sensitivity: internal}}"#;
    let h = Harness::builder()
        .route(route)
        .policy("version: v1\ndefaults: {llm: allow, tool: allow, other: deny}\n")
        .start()
        .await;
    let first = h
        .post("/tools/deploy", &tags("release-bot"), &json!({"service": "api", "version": "1.2.3"}))
        .await;
    assert_eq!(code(&first), "risk_medium");
    let message = first.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.starts_with(
            "the action's risk needs a human. risk 30 (medium): blast_radius medium 15, reversibility low 2.5, \
             data_sensitivity low 2, cost_impact low 1.5, historical_success high 9; approved if nobody answers \
             within 15 min. Approval apr_"
        ),
        "{message}"
    );
    let id = approval_id(&first);
    let granted = h.admin_call(Method::POST, &format!("/admin/approvals/{id}/approve"), true).await;
    assert_eq!(granted.status, StatusCode::OK);
    let retry = with("release-bot", &[("x-tollgate-approval", &id)]);
    let ran = h.post("/tools/deploy", &retry, &json!({"service": "api", "version": "1.2.3"})).await;
    assert_eq!(ran.status, StatusCode::OK);
    let next = h
        .post("/tools/deploy", &tags("release-bot"), &json!({"service": "api", "version": "1.2.4"}))
        .await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    assert_eq!(next.header("x-tollgate-risk"), Some("22"));
}

#[tokio::test]
async fn a_disabled_agent_stays_disabled_across_a_restart_until_reenabled() {
    let dir = temp_dir("disabled-restart");
    let config = "oversight: {escalation: {review_at: 1, disable_at: 1}}";
    let failing = with("flaky", &[(header::STATUS, "422")]);
    let h = Harness::builder().extra(config).data_dir(&dir).start().await;
    let first = h.post("/v1/chat/completions", &failing, &chat()).await;
    assert_eq!(first.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        code(&h.post("/v1/chat/completions", &tags("flaky"), &chat()).await),
        "agent_disabled"
    );
    h.stop().await;

    // A restart does not re-enable it; an operator does, and that survives a restart too.
    let h = Harness::builder().extra(config).data_dir(&dir).start().await;
    let refused = h.post("/v1/chat/completions", &tags("flaky"), &chat()).await;
    assert_eq!((refused.status, code(&refused)), (StatusCode::FORBIDDEN, "agent_disabled".into()));
    assert_eq!(
        h.post("/v1/chat/completions", &tags("steady"), &chat()).await.status,
        StatusCode::OK
    );
    let enabled = h.admin_call(Method::POST, "/admin/agents/flaky/enable", true).await.json();
    assert_eq!(enabled["was_disabled"], true, "{enabled}");
    h.stop().await;

    let h = Harness::builder().extra(config).data_dir(&dir).start().await;
    assert_eq!(
        h.post("/v1/chat/completions", &tags("flaky"), &chat()).await.status,
        StatusCode::OK
    );
    h.stop().await;
}

/// POSTs oversight reports to the collector's admin listener, as an Envoy filter does; the
/// answer (200).
async fn report(h: &Harness, body: &Value) -> Value {
    let request = hyper::Request::post(format!("{}/v1/fleet/oversight/reports", h.admin))
        .header("authorization", format!("Bearer {}", h.token))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .expect("a request");
    let reply =
        tollgate_e2e::harness::read(h.client.request(request).await.expect("answered")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

/// An Envoy filter's reports to its collector (`POST /v1/fleet/oversight/reports`): with
/// `oversight.escalation` a disabled agent joins the collector's disabled set (refused by the
/// collector itself too, kept across its restart, until an operator re-enables it), with one
/// audit record however often the report comes; a collector with neither escalation nor a fleet
/// store refuses that report, saying what it lacks, and still takes a breaker's.
#[tokio::test]
async fn an_envoys_reports_join_the_collectors_disabled_agents_or_are_refused_saying_why() {
    let dir = temp_dir("envoy-reports");
    let config = "oversight: {escalation: {review_at: 5, disable_at: 5}}";
    let h = Harness::builder().extra(config).data_dir(&dir).start().await;
    let body = json!({"source": "vm-1", "reports": [
        {"kind": "circuit_open", "upstream": "openai", "open_for_ms": 1000, "at_ms": 1},
        {"kind": "agent_disabled", "agent": "sloppy", "action": "llm", "status": 400, "at_ms": 1}
    ]});
    let accepted = json!({"results": [{"result": "accepted"}, {"result": "accepted"}]});
    assert_eq!(report(&h, &body).await, accepted);
    // Sent again (its answer lost, say): taken, nothing recorded twice.
    assert_eq!(report(&h, &body).await, accepted);
    let listed = h.admin_get("/v1/fleet/agents/disabled", true).await.json();
    assert_eq!(listed["agents"], json!(["sloppy"]), "{listed}");
    let refused = h.post("/v1/chat/completions", &tags("sloppy"), &chat()).await;
    assert_eq!((refused.status, code(&refused)), (StatusCode::FORBIDDEN, "agent_disabled".into()));
    let records: Vec<Value> = h
        .audit()
        .await
        .into_iter()
        .filter(|r| r["kind"] == "agent_disabled" && r["agent"] == "sloppy")
        .collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!((&records[0]["actor"], &records[0]["tool"]), (&json!("envoy/vm-1"), &json!("llm")));
    h.stop().await;

    let h = Harness::builder().extra(config).data_dir(&dir).start().await;
    let listed = h.admin_get("/v1/fleet/agents/disabled", true).await.json();
    assert_eq!(listed["agents"], json!(["sloppy"]), "kept across a restart: {listed}");
    let enabled = h.admin_call(Method::POST, "/admin/agents/sloppy/enable", true).await.json();
    assert_eq!(enabled["was_disabled"], true, "{enabled}");
    let listed = h.admin_get("/v1/fleet/agents/disabled", true).await.json();
    assert_eq!(listed["agents"], json!([]), "{listed}");
    h.stop().await;

    let bare = Harness::builder().start().await;
    let answer = report(&bare, &body).await;
    assert_eq!(answer["results"][0], json!({"result": "accepted"}), "{answer}");
    assert_eq!(answer["results"][1]["result"], "refused", "{answer}");
    let why = answer["results"][1]["error"].as_str().unwrap_or_default();
    assert!(why.contains("`oversight.escalation`"), "{why}");
}
