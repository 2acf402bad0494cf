//! Running the official Python SDK scripts (`tests/sdk/*.py`) with the interpreter of the venv
//! that `scripts/test` fills (`target/py`, with `openai` and `anthropic`). Each script prints
//! one JSON object per line, `{"check": <name>, ...}`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// `target/py/bin/python running tests/sdk/<script>`, its output piped. A missing venv is a
/// failure that says how to make it.
pub fn command(script: &str) -> Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../target/py/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test, which installs the openai and anthropic SDKs there",
        python.display()
    );
    let mut command = Command::new(python);
    command.arg(root.join("sdk").join(script)).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// What a script printed, by check name.
pub struct Checks {
    stdout: String,
    checks: Vec<Value>,
}

impl Checks {
    /// Runs `command` (at most 60 s) and asserts that it succeeded.
    pub async fn run(mut command: Command) -> Checks {
        let out = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the SDK script finished within 60 s")
            .expect("the SDK script ran");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "SDK script failed\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let checks = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        Checks { stdout, checks }
    }

    /// The check named `name`; panics with the whole output when there is none.
    pub fn get(&self, name: &str) -> &Value {
        self.checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name}: {}", self.stdout))
    }
}

/// The calls `tests/sdk/compressed.py` makes, in order (one ledger record each).
pub const COMPRESSED_CALLS: [&str; 8] = [
    "chat",
    "chat_stream",
    "chat_stream_no_usage",
    "responses",
    "responses_stream",
    "embeddings",
    "messages",
    "messages_stream",
];

/// Checks one run of `compressed.py` against the same calls answered plain: every answer
/// arrived with `encoding` (except the stream whose usage chunk the proxy removes, for which it
/// asks for `identity` unless the encoding was forced), and its ledger record (`records`, in
/// call order) has the tokens the SDK read, `reported`, and the same tokens and nano-USD as the
/// plain record (`plain`).
pub fn assert_metered_like_plain(
    checks: &Checks,
    records: &[&Value],
    plain: &[&Value],
    encoding: Option<&str>,
    forced: bool,
) {
    assert_eq!(records.len(), COMPRESSED_CALLS.len(), "{records:?}");
    assert_eq!(plain.len(), COMPRESSED_CALLS.len(), "{plain:?}");
    for (i, call) in COMPRESSED_CALLS.into_iter().enumerate() {
        let check = checks.get(call);
        let (record, plain) = (records[i], plain[i]);
        let want = if call == "chat_stream_no_usage" && !forced { None } else { encoding };
        assert_eq!(check["encoding"].as_str(), want, "{call}: {check}");
        assert_eq!(record["usage_source"], "reported", "{call}: {record}");
        assert_eq!(record["tokens"], plain["tokens"], "{call}: {record} vs {plain}");
        assert_eq!(record["cost_nano_usd"], plain["cost_nano_usd"], "{call}: {record}");
        assert_eq!(record["model"], plain["model"], "{call}: {record}");
        if !check["input_tokens"].is_null() {
            assert_eq!(record["tokens"]["input"], check["input_tokens"], "{call}: {record}");
            assert_eq!(record["tokens"]["output"], check["output_tokens"], "{call}: {record}");
        }
    }
    // The usage chunk Tollgate asked for is removed from a plain stream; a stream that arrives
    // compressed anyway goes to the client as sent, usage chunk included.
    let chunks = &checks.get("chat_stream_no_usage")["usage_chunks"];
    assert_eq!(chunks, if forced && encoding.is_some() { 1 } else { 0 });
}
