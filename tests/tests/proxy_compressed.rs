//! Compressed upstream answers through the proxy: metered from their plain bytes (the same
//! tokens and nano-USD as a plain answer), while the client gets the upstream's compressed
//! bytes unchanged and still streamed; a decompression bomb costs the proxy no memory and is
//! metered as estimated and counted; an unknown coding is estimated and counted.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use tollgate_e2e::harness::{tags, Harness};
use tollgate_e2e::mock::compress::decode;
use tollgate_e2e::mock::header;

fn with(agent: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut headers = tags(agent);
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    headers
}

fn requests() -> [(&'static str, Value); 6] {
    let hello = json!([{"role": "user", "content": "hello"}]);
    [
        ("/v1/chat/completions", json!({"model": "gpt-4o", "messages": hello, "max_tokens": 50})),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": hello, "max_tokens": 50, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        ("/v1/responses", json!({"model": "gpt-4o", "input": "hello", "stream": true})),
        ("/v1/embeddings", json!({"model": "text-embedding-3-small", "input": ["a", "b"]})),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": hello}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": hello,
                   "stream": true}),
        ),
    ]
}

fn counter(metrics: &str, reason: &str) -> u64 {
    let name = format!("tollgate_meter_decode_aborted_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&name))
        .unwrap_or_else(|| panic!("no {name}in\n{metrics}"))
        .parse()
        .unwrap()
}

/// br and zstd (which the Python SDKs do not offer) and gzip, JSON and SSE, for every metered
/// endpoint: the same ledger as the plain answers, and the client decodes what it received.
#[tokio::test]
async fn br_zstd_and_gzip_answers_are_metered_like_plain_ones() {
    let h = Harness::builder().start().await;
    let codings = ["identity", "br", "zstd", "gzip"];
    for coding in codings {
        for (path, body) in requests() {
            let headers = with(&format!("agent-{coding}"), &[("accept-encoding", coding)]);
            let response = h.send(Method::POST, path, &headers, body.to_string()).await;
            assert_eq!(response.status(), 200, "{coding} {path}");
            let got = response.headers().get("content-encoding").map(|v| v.to_str().unwrap());
            assert_eq!(got, (coding != "identity").then_some(coding), "{coding} {path}");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            if coding != "identity" {
                let plain = String::from_utf8(decode(coding, &bytes)).unwrap();
                assert!(plain.contains("Hello") || path.ends_with("embeddings"), "{plain}");
            }
        }
    }
    let n = requests().len();
    let ledger = h.ledger_until(codings.len() * n).await;
    let of = |coding: &str| -> Vec<&Value> {
        ledger.iter().filter(|r| r["agent"] == format!("agent-{coding}")).collect()
    };
    let plain = of("identity");
    assert_eq!(plain.len(), n);
    for coding in &codings[1..] {
        let records = of(coding);
        assert_eq!(records.len(), n, "{coding}");
        for (record, plain) in records.iter().zip(&plain) {
            assert_eq!(record["usage_source"], "reported", "{coding}: {record}");
            assert_eq!(record["tokens"], plain["tokens"], "{coding}: {record}");
            assert_eq!(record["cost_nano_usd"], plain["cost_nano_usd"], "{coding}: {record}");
            assert!(plain["cost_nano_usd"].as_i64().unwrap() > 0, "{plain}");
        }
    }
    let metrics = h.metrics().await;
    for reason in ["unsupported_encoding", "corrupt", "too_large", "ratio"] {
        assert_eq!(counter(&metrics, reason), 0, "{reason}");
    }
}

/// A compressed SSE stream reaches the client as the upstream flushed it, event by event.
#[tokio::test]
async fn a_compressed_stream_is_passed_on_unchanged_and_unbuffered() {
    let h = Harness::builder().start().await;
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": true,
                      "messages": [{"role": "user", "content": "hello"}]});
    let headers =
        with("stream-agent", &[("accept-encoding", "gzip"), (header::EVENT_DELAY_MS, "150")]);
    let response = h.send(Method::POST, "/v1/messages", &headers, body.to_string()).await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = Instant::now();
    // The first frame decodes by itself (gzip header + a flushed block) to the first event.
    let mut partial = flate2::write::GzDecoder::new(Vec::new());
    std::io::Write::write_all(&mut partial, &first).unwrap();
    std::io::Write::flush(&mut partial).unwrap();
    let text = String::from_utf8(partial.get_ref().clone()).unwrap();
    assert!(text.starts_with("event: message_start\n"), "{text:?}");
    let mut all = first.to_vec();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            all.extend_from_slice(&data);
        }
    }
    assert!(first_at.elapsed() >= Duration::from_millis(600), "the rest came later");
    let text = String::from_utf8(decode("gzip", &all)).unwrap();
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"), "{text}");
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["usage_source"], "reported", "{}", ledger[0]);
    assert_eq!(ledger[0]["tokens"]["output"], 5, "{}", ledger[0]);
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 1 GiB of zeros in about 1 MiB of gzip, and in 32 KiB of zstd: the proxy stops decoding
/// after the ratio bound, its memory does not grow with the bomb, the record is estimated and
/// the counter moves. The client still gets every compressed byte.
#[tokio::test]
async fn a_decompression_bomb_costs_no_memory_and_is_estimated_and_counted() {
    let h = Harness::builder().start().await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    // Warm up (connection pools, the ledger writer) before taking the baseline.
    h.post("/v1/chat/completions", &tags("warm-agent"), &body).await;
    // Reset the peak so that VmHWM is the peak of the bombs alone.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let baseline = rss_kib("VmRSS:");
    for coding in ["gzip", "zstd"] {
        let headers =
            with("bomb-agent", &[(header::BOMB, "1024"), (header::CONTENT_ENCODING, coding)]);
        let started = Instant::now();
        let response =
            h.send(Method::POST, "/v1/chat/completions", &headers, body.to_string()).await;
        assert_eq!(response.headers()["content-encoding"], coding);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert!(bytes.len() < 2 << 20, "{coding}: {} bytes", bytes.len());
        assert!(started.elapsed() < Duration::from_secs(5), "{coding}: {:?}", started.elapsed());
    }
    let grown_kib = rss_kib("VmHWM:").saturating_sub(baseline);
    assert!(grown_kib < 64 << 10, "peak memory grew by {grown_kib} KiB for 2 GiB of bombs");
    let ledger = h.ledger_until(3).await;
    let bombs: Vec<&Value> = ledger.iter().filter(|r| r["agent"] == "bomb-agent").collect();
    assert_eq!(bombs.len(), 2);
    for record in bombs {
        assert_eq!(record["usage_source"], "estimated", "{record}");
        assert_eq!(record["status"], 200, "{record}");
    }
    assert_eq!(counter(&h.metrics().await, "ratio"), 2);
}

/// A coding the meter does not know: the answer passes, the usage is estimated and counted.
#[tokio::test]
async fn an_unknown_coding_is_estimated_and_counted() {
    let h = Harness::builder().start().await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let headers = with("odd-agent", &[(header::CONTENT_ENCODING, "snappy")]);
    let reply = h.post("/v1/chat/completions", &headers, &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-encoding"), Some("snappy"));
    let ledger = h.ledger_until(1).await;
    assert_eq!(ledger[0]["usage_source"], "estimated", "{}", ledger[0]);
    assert!(ledger[0]["cost_nano_usd"].as_i64().unwrap() > 0, "{}", ledger[0]);
    assert_eq!(counter(&h.metrics().await, "unsupported_encoding"), 1);
}
