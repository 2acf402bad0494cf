//! Reservations are real upper bounds, through real sockets: a request without `max_tokens`
//! reserves the model's whole output limit, so 1,000 concurrent requests answered at that limit
//! never spend more than the budget; a report above the reservation that the request could
//! have produced is charged in full and counted as an overrun; an absurd report is billed at
//! the reservation and marked implausible; a `max_tokens` of `u64::MAX` cannot slip under a
//! tokens-per-minute limit by wrapping.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use tollgate_e2e::exposition;
use tollgate_e2e::harness::{nanos, read_entries, tags, Harness};
use tollgate_e2e::mock::header;

/// gpt-4o at its list prices with its documented limits, over the built-in card.
const CARD: &str = "pricing:\n\
                    \x20 models:\n\
                    \x20   gpt-4o: {provider: openai, input: \"2.50\", output: \"10.00\", \
                    max_output_tokens: 16384, context_window: 128000}\n";

fn with(mut headers: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

fn budget(amount: &str) -> String {
    format!(
        "version: reserve-1\n\
         defaults: {{llm: allow}}\n\
         budgets:\n\
         \x20 - {{id: agent-daily, scope: agent, period: daily, amount: \"{amount}\"}}\n"
    )
}

async fn start(policy: &str) -> Harness {
    Harness::builder().policy(policy).extra(CARD).start().await
}

/// (spent, reserved) of the one budget, in nano-USD.
async fn budget_state(h: &Harness) -> (i64, i64) {
    let reply = h.admin_get("/admin/budgets", true).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    let b = &body["budgets"][0];
    (nanos(b["spent"].as_str().unwrap()), nanos(b["reserved"].as_str().unwrap()))
}

fn metric(text: &str, name: &str) -> f64 {
    let m = exposition::parse(text).expect("exposition");
    m.value(name, &[]).unwrap_or_else(|| panic!("{name} missing"))
}

fn usage_records(h: &Harness) -> Vec<Value> {
    read_entries(&h.data_dir).into_iter().filter(|r| r["type"] == "usage").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_without_max_tokens_never_spend_more_than_the_budget() {
    // Every answer is the model's whole output limit, 16,384 tokens ($0.16384). With the old
    // 4,096-token assumption, 121 requests got through a $5.00 budget and spent $19.37.
    let h = Arc::new(start(&budget("5.00")).await);
    let headers = with(tags("racer"), &[(header::OUTPUT_TOKENS, "16384")]);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "write"}]});
    let run = async {
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let (h, headers, body) = (h.clone(), headers.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                h.post("/v1/chat/completions", &headers, &body).await.status
            }));
        }
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
        statuses
    };
    let statuses = tokio::time::timeout(Duration::from_secs(120), run).await.expect("in 2 min");
    let ok = statuses.iter().filter(|&&s| s == StatusCode::OK).count();
    let refused = statuses.iter().filter(|&&s| s == StatusCode::PAYMENT_REQUIRED).count();
    assert_eq!(ok + refused, 1000, "{statuses:?}");
    assert!(ok >= 1, "at least one request fits");
    assert_eq!(h.mock.request_count(), ok, "refused requests never reach the upstream");

    let ledger = h.ledger_until(ok).await;
    let spent: i64 = ledger.iter().map(|r| r["cost_nano_usd"].as_i64().unwrap()).sum();
    eprintln!("{ok} of 1000 served, ${} spent of $5.00", spent as f64 / 1e9);
    assert!(spent <= 5_000_000_000, "spent ${} of $5.00 with {ok} requests", spent as f64 / 1e9);
    for r in &ledger {
        assert_eq!(r["usage_source"], "reported", "{r}");
        assert_eq!(r["tokens"]["output"], 16384, "{r}");
    }
    let (budget_spent, reserved) = budget_state(&h).await;
    assert_eq!(budget_spent, spent, "the budget's spent figure is the ledger's sum");
    assert_eq!(reserved, 0);
    // No request reserved less than it was charged.
    assert_eq!(metric(&h.metrics().await, "tollgate_budget_overrun_nanousd_total"), 0.0);
    // And the bound is not wildly loose: the budget is used up to the last request's worth.
    assert!(spent > 5_000_000_000 - 2 * 170_000_000, "spent only ${}", spent as f64 / 1e9);
}

#[tokio::test]
async fn absurd_usage_is_billed_at_the_reservation_and_marked_implausible() {
    let h = start(&budget("5.00")).await;
    let absurd = u64::MAX.to_string();
    let headers =
        with(tags("liar"), &[(header::INPUT_TOKENS, &absurd), (header::OUTPUT_TOKENS, &absurd)]);
    let body = json!({"model": "gpt-4o", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    let reply = h.post("/v1/chat/completions", &headers, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    h.ledger_until(1).await;
    let entries = read_entries(&h.data_dir);
    let reserve = entries.iter().find(|r| r["type"] == "reserve").expect("reserve entry");
    let amount = nanos(reserve["amount"].as_str().unwrap());
    let usage = usage_records(&h);
    let r = &usage[0];
    assert_eq!(r["usage_source"], "implausible", "{r}");
    assert_eq!(r["cost_nano_usd"].as_i64().unwrap(), amount, "billed the reservation: {r}");
    // The reservation: at most the body's bytes plus overhead in, 100 out; cents, not billions.
    assert!(amount < 10_000_000, "{amount}");
    assert_eq!(r["tokens"]["output"], 100, "{r}");
    let (spent, reserved) = budget_state(&h).await;
    assert_eq!((spent, reserved), (amount, 0));
    let text = h.metrics().await;
    assert_eq!(metric(&text, "tollgate_usage_implausible_total"), 1.0);
    assert_eq!(metric(&text, "tollgate_budget_overrun_nanousd_total"), 0.0);

    // The cost center is not locked out: the next honest request passes.
    let honest = with(tags("liar"), &[(header::OUTPUT_TOKENS, "10")]);
    let reply = h.post("/v1/chat/completions", &honest, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn plausible_usage_above_the_reservation_is_charged_in_full_and_blocks_the_budget() {
    // max_tokens 100, but the upstream answers 2,000 output tokens (within gpt-4o's 16,384):
    // the truth, $0.02, is charged to a $0.01 budget, counted as an overrun, and the budget
    // refuses the next request.
    let h = start(&budget("0.01")).await;
    let headers =
        with(tags("over"), &[(header::INPUT_TOKENS, "0"), (header::OUTPUT_TOKENS, "2000")]);
    let body = json!({"model": "gpt-4o", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    let reply = h.post("/v1/chat/completions", &headers, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    h.ledger_until(1).await;
    let entries = read_entries(&h.data_dir);
    let reserve = entries.iter().find(|r| r["type"] == "reserve").expect("reserve entry");
    let amount = nanos(reserve["amount"].as_str().unwrap());
    let r = &usage_records(&h)[0];
    assert_eq!(r["usage_source"], "reported", "{r}");
    assert_eq!(r["cost_nano_usd"], 20_000_000, "{r}");
    let (spent, _) = budget_state(&h).await;
    assert_eq!(spent, 20_000_000);
    let over = metric(&h.metrics().await, "tollgate_budget_overrun_nanousd_total");
    assert_eq!(over, (20_000_000 - amount) as f64);

    let reply = h.post("/v1/chat/completions", &headers, &body).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED, "{}", reply.text());
    assert_eq!(h.mock.request_count(), 1);
}

#[tokio::test]
async fn max_tokens_of_u64_max_does_not_wrap_under_a_tokens_per_minute_limit() {
    for extra in [CARD, ""] {
        // With the model's limits known, and with the built-in card alone.
        let h = Harness::builder()
            .policy("version: tpm-1\nlimits: {tpm: 1000}\n")
            .extra(extra)
            .start()
            .await;
        let body = json!({"model": "gpt-4o", "max_tokens": u64::MAX,
                          "messages": [{"role": "user", "content": "hi"}]});
        let reply = h.post("/v1/chat/completions", &tags("wrap"), &body).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "rate_limited_tokens");
        assert_eq!(h.mock.request_count(), 0);
    }
}
