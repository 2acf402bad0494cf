//! The config file reloads while the proxy runs, through the real binary: a changed file
//! replaces routes, the inline policy and request limits for the next request; a broken file is
//! refused with its errors named (field and line), counted, and the running config keeps
//! serving; a setting that applies only at start keeps its running value and is named in the
//! log as needing a restart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::MockUpstream;
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_RELOAD_TEST_TOKEN";
const TAGS: &str =
    "x-agent-id: reloader\r\nx-cost-center: CC-1234\r\nx-project-id: PROJ-ABC123\r\n";
const BODY: &str =
    r#"{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

fn yaml(upstream: &str, dir: &Path, more_routes: &[String], extra: &str, policy: &str) -> String {
    ConfigFile {
        upstream,
        data_dir: &dir.join("data"),
        token_env: TOKEN_ENV,
        more_routes,
        extra,
        policy,
    }
    .yaml()
}

/// A POST of [`BODY`] to `path`; the status and the whole answer.
fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\n{TAGS}content-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_applies_to_the_next_request_and_a_broken_one_is_refused() {
    let mock = MockUpstream::start().await;
    let upstream = mock.base_url();
    tokio::task::block_in_place(|| {
        let dir = temp_dir("reload");
        let file = dir.join("tollgate.yaml");
        let allow = "version: r1\ndefaults: {llm: allow, tool: allow, other: deny}\n";
        std::fs::write(&file, yaml(&upstream, &dir, &[], "", allow)).unwrap();
        let proxy = Tollgate::run(Path::new(BIN), &file, &[(TOKEN_ENV, "t")]);

        let (status, answer) = post(proxy.proxy, "/v1/chat/completions");
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("x-tollgate-policy-version: r1"), "{answer}");
        let (status, answer) = post(proxy.proxy, "/tools/search");
        assert_eq!(status, 404, "no such route yet: {answer}");
        assert!(answer.contains("no_route"), "{answer}");

        // A new route, a policy that refuses gpt-4o, and a smaller body limit for one route's
        // worth of body: all apply without a restart.
        let deny = "version: r2\ndefaults: {llm: allow, tool: allow, other: deny}\nrules:\n  \
                    - {id: no-4o, match: {route: llm, model: gpt-4o}, effect: deny, reason: model_not_allowed}\n";
        let routes = [format!("{{name: search, path_prefix: /tools/, kind: tool, tool: search, upstream: \"{upstream}\"}}")];
        std::fs::write(&file, yaml(&upstream, &dir, &routes, "", deny)).unwrap();
        proxy.wait_for("config reloaded");
        let (status, answer) = post(proxy.proxy, "/v1/chat/completions");
        assert_eq!(status, 403, "{answer}");
        assert!(answer.contains("x-tollgate-policy-version: r2"), "{answer}");
        assert!(answer.contains("no-4o"), "{answer}");
        let served_before = mock.request_count();
        let (_, answer) = post(proxy.proxy, "/tools/search");
        assert!(answer.contains("x-tollgate-decision: allow"), "the new route is served: {answer}");
        assert_eq!(mock.request_count(), served_before + 1);
        let served_before = mock.request_count();

        // A broken file: refused with the field and line named, counted, and r2 keeps serving.
        let broken = yaml(&upstream, &dir, &routes, "limits: {max_body_bytes: lots}\n", allow);
        let line = broken.lines().position(|l| l.starts_with("limits:")).unwrap() + 1;
        std::fs::write(&file, &broken).unwrap();
        let rejected = proxy.wait_for("config update rejected");
        let error = rejected["fields"]["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("limits.max_body_bytes"), "{error}");
        assert!(error.contains(&format!("line {line}")), "line {line}: {error}");
        assert_eq!(proxy.metric("tollgate_config_reload_failures_total"), 1);
        let (status, answer) = post(proxy.proxy, "/v1/chat/completions");
        assert_eq!(status, 403, "the last good config keeps serving: {answer}");
        assert_eq!(mock.request_count(), served_before, "nothing forwarded under the bad file");

        // A listener change needs a restart: the rest applies, the listener stays.
        let moved = yaml(&upstream, &dir, &routes, "", allow)
            .replace("listen: 127.0.0.1:0\nadmin", "listen: 127.0.0.1:1\nadmin");
        assert!(moved.contains("listen: 127.0.0.1:1\n"), "{moved}");
        std::fs::write(&file, moved).unwrap();
        let warned = proxy.wait_for(
            "config reloaded; these settings changed but apply only at start, and keep their \
             running values until a restart",
        );
        let needs = warned["fields"]["needs_restart"].as_str().unwrap_or_default().to_string();
        assert!(needs.contains("\"listen\""), "{needs}");
        assert!(!needs.contains("routes"), "{needs}");
        let (status, answer) = post(proxy.proxy, "/v1/chat/completions");
        assert_eq!(status, 200, "allowed again under r1, on the same listener: {answer}");
        assert_eq!(proxy.metric("tollgate_config_reload_failures_total"), 1);
    });
}
