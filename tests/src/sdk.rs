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
