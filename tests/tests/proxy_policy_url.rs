//! Policy from an HTTP URL: polled with `If-None-Match`; a new version is applied, a `304` costs
//! nothing, and a bad document is rejected while the last good snapshot keeps serving.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tollgate_e2e::harness::temp_dir;

/// Serves `doc` with an ETag derived from its version number; counts requests and 304s.
#[derive(Clone, Default)]
struct PolicyServer {
    doc: Arc<Mutex<(u32, String)>>,
    hits: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
}

impl PolicyServer {
    fn set(&self, version: u32, text: &str) {
        *self.doc.lock().unwrap() = (version, text.to_string());
    }

    async fn start(&self) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let me = me.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            me.hits.fetch_add(1, Ordering::SeqCst);
                            let (version, text) = me.doc.lock().unwrap().clone();
                            let etag = format!("\"v{version}\"");
                            let inm =
                                req.headers().get("if-none-match").and_then(|v| v.to_str().ok());
                            let response = if inm == Some(etag.as_str()) {
                                me.not_modified.fetch_add(1, Ordering::SeqCst);
                                Response::builder().status(304).body(Full::new(Bytes::new()))
                            } else {
                                Response::builder()
                                    .header("etag", etag)
                                    .body(Full::new(Bytes::from(text)))
                            };
                            Ok::<_, std::convert::Infallible>(response.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }
}

const V1: &str = "version: url-1\ndefaults: {llm: allow}\n";
const V2: &str = "version: url-2\ndefaults: {llm: deny}\n";
const BAD: &str = "version: url-3\ndefaults: {llm: perhaps}\n";

async fn admin_policy(admin: std::net::SocketAddr, token: &str) -> serde_json::Value {
    let req = Request::get(format!("http://{admin}/admin/policy"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

async fn wait_for_version(admin: std::net::SocketAddr, token: &str, version: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = admin_policy(admin, token).await;
        if got["version"] == version {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {got} instead of {version}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn policy_polled_from_a_url_updates_and_keeps_the_last_good_one() {
    let server = PolicyServer::default();
    server.set(1, V1);
    let addr = server.start().await;
    let token_env = format!("TOLLGATE_E2E_URL_TOKEN_{}", std::process::id());
    std::env::set_var(&token_env, "url-secret");
    let yaml = format!(
        "version: 1\ndata_dir: {:?}\nadmin: {{listen: 127.0.0.1:0, token_env: {token_env}}}\n\
         routes: [{{path_prefix: /v1/, kind: openai, upstream: \"http://127.0.0.1:9\"}}]\n\
         policy_source: {{url: \"http://{addr}/policy.yaml\", poll: 100ms}}\n\
         policy: {{version: inline-0, defaults: {{llm: allow}}}}\n",
        temp_dir("policy-url").display().to_string()
    );
    let config = tollgate::config::Config::from_str(&yaml).expect("config");
    let running = tollgate::app::start(
        config,
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let admin = running.admin_addr;

    wait_for_version(admin, "url-secret", "url-1").await;
    // Unchanged documents are answered 304 and not parsed again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.not_modified.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no If-None-Match revalidation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    server.set(2, V2);
    wait_for_version(admin, "url-secret", "url-2").await;

    server.set(3, BAD);
    let failures_before = running.shared.metrics.policy_reload_failures.get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while running.shared.metrics.policy_reload_failures.get() == failures_before {
        assert!(tokio::time::Instant::now() < deadline, "the bad document was not rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin_policy(admin, "url-secret").await["version"], "url-2", "last good snapshot");
    assert_eq!(running.shared.current().policy.version(), "url-2");
}
