//! The console in a real browser: headless Chromium driven through chromedriver (WebDriver,
//! with `fantoccini`) against the `tollgate` binary and the mock upstream.
//!
//! An agent's tool call waits for a human (403 `require_approval` with an approval id); a person
//! signs in to the console (a wrong token first: 401 page), sees the pending approval with its
//! risk breakdown, approves it with a reason; the agent's retry with the approval passes and the
//! audit log records who approved and why. An agent named `<script>alert(1)</script>` is shown
//! as text (no script element, no alert), and re-enabled with the console's button after its
//! errors disabled it. Forms without the CSRF token, or from another origin, are refused 403.
//!
//! Chromium and chromedriver come from Debian's packages (`apt-get install -y chromium
//! chromium-driver`, which `scripts/test` runs); without them this test fails and says so.
//! Screenshots are saved to `target/console-screenshots/`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_e2e::harness::temp_dir;
use tollgate_e2e::mock::{header, MockUpstream};
use tollgate_e2e::process::{ConfigFile, Tollgate};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const TOKEN_ENV: &str = "TOLLGATE_CONSOLE_TEST_TOKEN";
const TOKEN: &str = "console-test-token-4f1c";
const HOSTILE: &str = "<script>alert(1)</script>";
const PERSON: &str = "Alice Example";
const REASON: &str = "release 1.2.3 checked with on-call";

const POLICY: &str = "version: console-1\n\
                      defaults: {llm: allow, tool: require_approval, other: deny}\n\
                      budgets:\n\
                      \x20 - {id: cc-monthly, scope: cost_center, period: monthly, amount: \"100.00\"}\n";
/// Any agent name (the hostile one too); one error of its own disables an agent.
const EXTRA: &str = "attribution: {headers: [{attribute: agent, pattern: '^.+$'}]}\n\
                     oversight: {escalation: {review_at: 1, disable_at: 1}}\n";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP answer read to its end.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Answer {
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Answer { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// An agent's call through the proxy, attributed to `agent`.
async fn agent_call(
    client: &HttpClient,
    proxy: SocketAddr,
    path: &str,
    agent: &str,
    extra: &[(&str, &str)],
    body: &Value,
) -> Answer {
    let mut headers = vec![
        ("content-type", "application/json"),
        ("x-agent-id", agent),
        ("x-cost-center", "CC-1234"),
        ("x-project-id", "PROJ-ABC123"),
    ];
    headers.extend_from_slice(extra);
    send(client, "POST", &format!("http://{proxy}{path}"), &headers, body.to_string()).await
}

/// chromedriver on a loopback port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| default.into());
    assert!(
        path.exists(),
        "{} is missing: this test drives a real browser. Install Debian's packages with \
         `apt-get install -y chromium chromium-driver` (scripts/test does), or point {env} at it.",
        path.display()
    );
    path
}

async fn start_driver() -> Driver {
    let chromedriver = installed("CHROMEDRIVER", "/usr/bin/chromedriver");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client.get(format!("{}/status", driver.url).parse().unwrap()).await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return driver;
        }
        assert!(Instant::now() < deadline, "chromedriver did not answer on port {port} in 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_browser(driver: &Driver) -> Browser {
    let chromium = installed("CHROMIUM", "/usr/bin/chromium");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,2400", "--no-first-run", "--disable-extensions"],
        }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("headless Chromium did not start through chromedriver: {e}"))
}

/// Saves a PNG of the page to `target/console-screenshots/NAME.png` and says so in the test
/// output (written to the process's stderr, which the test harness does not capture).
async fn screenshot(browser: &Browser, name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).expect("create target/console-screenshots");
    let png = browser.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write the screenshot");
    let _ = writeln!(
        std::io::stderr(),
        "console screenshot saved: target/console-screenshots/{name}.png"
    );
}

async fn text_of(browser: &Browser, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.expect("text"),
        Err(e) => {
            let page = browser.source().await.unwrap_or_default();
            panic!("no `{css}` ({e}) on {:?}:\n{page}", browser.current_url().await)
        }
    }
}

/// Clicks the button `css` and waits (at most 10 s) until the page it submits to replaced the
/// current one (a form answered with a redirect to the same URL, too).
async fn submit(browser: &Browser, css: &str) {
    let before = browser.find(Locator::Css("html")).await.expect("a page");
    let button = browser.find(Locator::Css(css)).await;
    button.unwrap_or_else(|e| panic!("no button `{css}`: {e}")).click().await.expect("click");
    let deadline = Instant::now() + Duration::from_secs(10);
    while before.tag_name().await.is_ok() {
        assert!(Instant::now() < deadline, "clicking `{css}` loaded no page in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs in with the form: the person's name and `token`.
async fn sign_in(browser: &Browser, admin: SocketAddr, name: &str, token: &str) {
    browser.goto(&format!("http://{admin}/console/sign-in")).await.expect("open the sign-in page");
    browser.find(Locator::Css("input[name=name]")).await.unwrap().send_keys(name).await.unwrap();
    browser.find(Locator::Css("input[name=token]")).await.unwrap().send_keys(token).await.unwrap();
    submit(browser, "form button[type=submit]").await;
}

/// The audit records (flushed by the proxy within its fsync window) until `found` holds.
async fn audit_until(data_dir: &Path, what: &str, found: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = tollgate::audit::read_all(data_dir).unwrap_or_default();
        if let Some(r) = records.iter().find(|r| found(r)) {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "no audit record {what} in {records:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_approves_in_the_browser_and_the_agent_retry_passes_with_the_audit_naming_them() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("console");
    let data_dir = dir.join("data");
    let deploy = format!(
        "{{name: deploy, path_prefix: /tools/deploy, kind: tool, tool: deploy, category: deploy, upstream: \"{}\"}}",
        mock.base_url()
    );
    let yaml = ConfigFile {
        upstream: &mock.base_url(),
        data_dir: &data_dir,
        token_env: TOKEN_ENV,
        more_routes: &[deploy],
        extra: EXTRA,
        policy: POLICY,
    }
    .yaml();
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut proxy = tokio::task::block_in_place(|| {
        Tollgate::run(Path::new(BIN), &config, &[(TOKEN_ENV, TOKEN)])
    });
    let (admin, console) = (proxy.admin, format!("http://{}/console", proxy.admin));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // The agent's deploy waits for a human: 403 require_approval with the approval's id.
    let args = json!({"service": "api", "version": "1.2.3"});
    let first = agent_call(&client, proxy.proxy, "/tools/deploy", "bot-a", &[], &args).await;
    assert_eq!(first.status, 403, "{}", first.body);
    assert_eq!(first.headers["x-tollgate-decision"], "require_approval");
    let id = first.headers["x-tollgate-approval-id"].to_str().unwrap().to_string();
    // Spend this month, for the spend tables.
    let spent =
        agent_call(&client, proxy.proxy, "/v1/chat/completions", "bot-a", &[], &chat()).await;
    assert_eq!(spent.status, 200, "{}", spent.body);
    // The hostile agent asks for a deploy too, then one error of its own disables it.
    let hostile = agent_call(&client, proxy.proxy, "/tools/deploy", HOSTILE, &[], &args).await;
    let hostile_id = hostile.headers["x-tollgate-approval-id"].to_str().unwrap().to_string();
    let failing = [(header::STATUS, "422")];
    let failed =
        agent_call(&client, proxy.proxy, "/v1/chat/completions", HOSTILE, &failing, &chat()).await;
    assert_eq!(failed.status, 422, "{}", failed.body);
    let refused =
        agent_call(&client, proxy.proxy, "/v1/chat/completions", HOSTILE, &[], &chat()).await;
    assert!(refused.body.contains("agent_disabled"), "{}", refused.body);

    let driver = start_driver().await;
    let browser = start_browser(&driver).await;

    // Signed out, the console sends the browser to the sign-in form.
    browser.goto(&console).await.expect("open the console");
    let url = browser.current_url().await.unwrap();
    assert_eq!(url.path(), "/console/sign-in", "{url}");
    screenshot(&browser, "01-sign-in").await;

    // A wrong token: the 401 page says so, and no session cookie is set.
    sign_in(&browser, admin, PERSON, "not-the-token").await;
    let error = text_of(&browser, "#error").await;
    assert!(error.contains("Wrong admin token"), "{error}");
    assert!(browser.get_all_cookies().await.unwrap().is_empty(), "no cookie after a wrong token");
    screenshot(&browser, "02-wrong-token").await;
    let wrong = send(
        &client,
        "POST",
        &format!("{console}/sign-in"),
        &[
            ("origin", &format!("http://{admin}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        "name=x&token=wrong".into(),
    )
    .await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);

    // Signed in: an HttpOnly, SameSite=Strict cookie; the token is in no URL.
    sign_in(&browser, admin, PERSON, TOKEN).await;
    let url = browser.current_url().await.unwrap();
    assert_eq!(url.path(), "/console", "{url}");
    assert!(!url.as_str().contains(TOKEN));
    assert_eq!(text_of(&browser, "#who").await, PERSON);
    let cookie = browser.get_named_cookie("tollgate_console").await.expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    assert_eq!(cookie.value().len(), 64, "256 random bits, hex");

    // The pending approval with its risk breakdown.
    let card = format!("article[data-id=\"{id}\"]");
    let shown = text_of(&browser, &card).await;
    assert!(shown.contains("bot-a") && shown.contains("deploy"), "{shown}");
    assert!(shown.contains("default_require_approval"), "{shown}");
    let band = text_of(&browser, &format!("{card} .band")).await;
    assert!(band.starts_with("risk ") && band.contains("high"), "{band}");
    let dimensions =
        browser.find_all(Locator::Css(&format!("{card} table.risk tbody tr"))).await.unwrap();
    assert_eq!(dimensions.len(), 5, "one row per risk dimension");
    assert!(text_of(&browser, &format!("{card} table.risk")).await.contains("blast_radius"));

    // The hostile agent's name is text, in the approvals and the disabled agents.
    let hostile_card = format!("article[data-id=\"{hostile_id}\"] h3 .agent");
    assert_eq!(text_of(&browser, &hostile_card).await, HOSTILE);
    assert_eq!(text_of(&browser, "#disabled li .agent").await, HOSTILE);
    assert!(
        browser.find_all(Locator::Css("script")).await.unwrap().is_empty(),
        "no script element"
    );
    assert!(browser.get_alert_text().await.is_err(), "no alert opened");
    let source = browser.source().await.unwrap();
    assert!(!source.contains(HOSTILE) && source.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));

    // Spend by cost center, project and agent against the budget; the autonomy ratio.
    let by_cc = text_of(&browser, "#spend-cost-centers").await;
    assert!(by_cc.contains("CC-1234") && by_cc.contains("cc-monthly"), "{by_cc}");
    assert!(text_of(&browser, "#budgets").await.contains("$100.00"));
    assert!(text_of(&browser, "#spend-projects").await.contains("PROJ-ABC123"));
    assert!(text_of(&browser, "#spend-agents").await.contains("bot-a"));
    let ratio = text_of(&browser, "#autonomy-ratio").await;
    assert!(ratio.ends_with('%'), "{ratio}");
    screenshot(&browser, "03-console").await;

    // CSRF: the same session's POSTs without the form's token, or from another origin, are
    // refused 403 and change nothing; without the session they go to the sign-in page.
    let csrf = browser
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .expect("the CSRF field");
    let session = format!("tollgate_console={}", cookie.value());
    let origin = format!("http://{admin}");
    let form = ("content-type", "application/x-www-form-urlencoded");
    let decide = format!("{console}/approvals/decide");
    let body = |csrf: &str| format!("csrf={csrf}&id={id}&decision=approve&reason=forged");
    let cases = [
        (vec![("cookie", session.as_str()), ("origin", origin.as_str()), form], body(""), 403),
        (vec![("cookie", session.as_str()), ("origin", origin.as_str()), form], body("0000"), 403),
        (
            vec![("cookie", session.as_str()), ("origin", "http://evil.example"), form],
            body(&csrf),
            403,
        ),
        (vec![("cookie", session.as_str()), form], body(&csrf), 403),
        (vec![("origin", origin.as_str()), form], body(&csrf), 303),
    ];
    for (headers, body, status) in cases {
        let answer = send(&client, "POST", &decide, &headers, body).await;
        assert_eq!(answer.status, status, "{headers:?}: {}", answer.body);
    }
    let enable = send(
        &client,
        "POST",
        &format!("{console}/agents/enable"),
        &[("cookie", &session), ("origin", &origin), form],
        format!("agent={}", "%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
    )
    .await;
    assert_eq!(enable.status, 403, "no CSRF token: {}", enable.body);
    let still = agent_call(
        &client,
        proxy.proxy,
        "/tools/deploy",
        "bot-a",
        &[("x-tollgate-approval", &id)],
        &args,
    )
    .await;
    assert!(
        still.body.contains("approval_pending"),
        "the forged POSTs changed nothing: {}",
        still.body
    );

    // Approve with a reason.
    browser
        .find(Locator::Css(&format!("{card} input[name=reason]")))
        .await
        .unwrap()
        .send_keys(REASON)
        .await
        .unwrap();
    submit(&browser, &format!("{card} button[value=approve]")).await;
    let flash = text_of(&browser, "#flash").await;
    assert!(flash.contains(&id) && flash.contains("approved"), "{flash}");
    assert!(browser.find_all(Locator::Css(&card)).await.unwrap().is_empty(), "no longer pending");
    screenshot(&browser, "04-approved").await;

    // The agent's retry passes, once; the audit log names who approved, and why.
    let retry = agent_call(
        &client,
        proxy.proxy,
        "/tools/deploy",
        "bot-a",
        &[("x-tollgate-approval", &id)],
        &args,
    )
    .await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(mock.requests().iter().filter(|r| r.path == "/tools/deploy").count(), 1);
    let granted = audit_until(&data_dir, "approval_granted", |r| {
        r["kind"] == "approval_granted" && r["approval_id"] == id.as_str()
    })
    .await;
    assert_eq!(granted["actor"], PERSON, "{granted}");
    assert_eq!(granted["note"], REASON, "{granted}");
    assert_eq!(granted["agent"], "bot-a", "{granted}");

    // Deny the hostile agent's deploy with a reason: recorded the same way.
    let hostile_form = format!("article[data-id=\"{hostile_id}\"]");
    browser
        .find(Locator::Css(&format!("{hostile_form} input[name=reason]")))
        .await
        .unwrap()
        .send_keys("unknown agent <b>name</b>")
        .await
        .unwrap();
    submit(&browser, &format!("{hostile_form} button[value=deny]")).await;
    let flash = text_of(&browser, "#flash").await;
    assert!(flash.contains(&hostile_id) && flash.contains("denied"), "{flash}");
    assert!(flash.contains(HOSTILE), "the hostile name is text in the message too: {flash}");
    let denied = audit_until(&data_dir, "approval_denied", |r| {
        r["kind"] == "approval_denied" && r["approval_id"] == hostile_id.as_str()
    })
    .await;
    assert_eq!(
        (&denied["actor"], &denied["note"]),
        (&json!(PERSON), &json!("unknown agent <b>name</b>"))
    );
    assert!(text_of(&browser, "#approvals").await.contains("Nothing is waiting for a human"));

    // Re-enable the hostile agent with its button; it may call again.
    submit(&browser, "#disabled li button").await;
    let flash = text_of(&browser, "#flash").await;
    assert_eq!(flash, format!("{HOSTILE} is enabled again."));
    assert!(text_of(&browser, "#disabled").await.contains("No agent is disabled"));
    screenshot(&browser, "05-reenabled").await;
    let again =
        agent_call(&client, proxy.proxy, "/v1/chat/completions", HOSTILE, &[], &chat()).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let reenabled =
        audit_until(&data_dir, "agent_reenabled", |r| r["kind"] == "agent_reenabled").await;
    assert_eq!((&reenabled["agent"], &reenabled["actor"]), (&json!(HOSTILE), &json!(PERSON)));

    // Sign out: the session is gone, the console asks to sign in again.
    submit(&browser, "header form button").await;
    assert_eq!(browser.current_url().await.unwrap().path(), "/console/sign-in");
    let after = send(&client, "GET", &console, &[("cookie", &session)], String::new()).await;
    assert_eq!(after.status, 303, "the old session id no longer signs in");
    assert_eq!(after.headers["location"], "/console/sign-in");

    browser.close().await.expect("close the browser");
    drop(driver);
    proxy.signal("TERM");
    assert_eq!(tokio::task::block_in_place(|| proxy.exit_code()), Some(0));
}
