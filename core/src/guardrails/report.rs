//! What an Envoy filter tells its collector about its own circuit breakers and error escalation
//! (`POST /v1/fleet/oversight/reports` on the collector's admin listener): each breaker that
//! opened and each agent it disabled, so that the collector does what a sidecar does for its
//! own: raise the `circuit_open` / `agent_disabled` alert, write the `agent_disabled` audit
//! record and add the agent to the disabled set an operator re-enables it from.
//!
//! Request: `{"source": "<the VM's name>", "reports": [{"kind": "circuit_open", "upstream":
//! "openai", "open_for_ms": 60000, "at_ms": 1764000000000}, {"kind": "agent_disabled",
//! "agent": "bot", "action": "llm", "status": 400, "at_ms": 1764000000000}]}`. Answer (200):
//! one result per report, in order: `{"result": "accepted"}`, `{"result": "refused", "error":
//! "..."}` (it cannot be taken, ever: the filter drops it, logged), or `{"result":
//! "unavailable", "error": "..."}` (not now: the filter offers it again).

use serde::{Deserialize, Serialize};

/// One VM's reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reports {
    /// The VM that sends them (its lease-holder name): the audit record's actor is
    /// `envoy/<source>`.
    pub source: String,
    pub reports: Vec<Report>,
}

/// One thing that happened in the filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// The upstream's breaker opened (from closed, or a failed half-open probe) at `at_ms`,
    /// for `open_for_ms`.
    CircuitOpen { upstream: String, open_for_ms: u64, at_ms: u64 },
    /// Error escalation disabled the agent at `at_ms`: the action whose error did it, and the
    /// status it ended with (0: no answer).
    AgentDisabled { agent: String, action: String, status: u16, at_ms: u64 },
}

/// The collector's answer to one report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Taken {
    Accepted,
    /// It can never be taken (the collector keeps no disabled agents): drop it.
    Refused {
        error: String,
    },
    /// Not now (the fleet store did not answer): offer it again.
    Unavailable {
        error: String,
    },
}

/// The collector's answer: one [`Taken`] per report, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub results: Vec<Taken>,
}

/// Reports one request carries at most.
pub const MAX_REPORTS: usize = 256;

/// The longest name taken (source, upstream, agent, action).
pub const MAX_NAME: usize = 256;

impl Reports {
    /// Reads and checks a request body: the error names the field (`reports[1].agent`).
    pub fn parse(body: &[u8]) -> Result<Reports, String> {
        let r: Reports =
            serde_json::from_slice(body).map_err(|e| format!("not oversight reports: {e}"))?;
        let name = |field: String, value: &str| {
            if value.is_empty() || value.len() > MAX_NAME || value.chars().any(char::is_control) {
                Err(format!("`{field}` must be 1 to {MAX_NAME} printable characters"))
            } else {
                Ok(())
            }
        };
        name("source".into(), &r.source)?;
        if r.reports.len() > MAX_REPORTS {
            return Err(format!(
                "`reports` holds {} reports, at most {MAX_REPORTS} are taken at once",
                r.reports.len()
            ));
        }
        for (i, report) in r.reports.iter().enumerate() {
            match report {
                Report::CircuitOpen { upstream, .. } => {
                    name(format!("reports[{i}].upstream"), upstream)?
                }
                Report::AgentDisabled { agent, action, .. } => {
                    name(format!("reports[{i}].agent"), agent)?;
                    name(format!("reports[{i}].action"), action)?;
                }
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_read_back_and_bad_ones_name_their_field() {
        let reports = Reports {
            source: "vm-1".into(),
            reports: vec![
                Report::CircuitOpen { upstream: "openai".into(), open_for_ms: 60_000, at_ms: 5 },
                Report::AgentDisabled {
                    agent: "bot".into(),
                    action: "llm".into(),
                    status: 400,
                    at_ms: 6,
                },
            ],
        };
        let body = serde_json::to_vec(&reports).unwrap();
        assert_eq!(Reports::parse(&body), Ok(reports));
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(r#""kind":"circuit_open""#), "{text}");
        let bad = |body: &str| Reports::parse(body.as_bytes()).unwrap_err();
        assert!(bad(r#"{"source": "", "reports": []}"#).starts_with("`source` must be"));
        let e = bad(r#"{"source": "vm", "reports": [{"kind": "circuit_open", "upstream": "u",
            "open_for_ms": 1, "at_ms": 1}, {"kind": "agent_disabled", "agent": "a\nb",
            "action": "llm", "status": 400, "at_ms": 1}]}"#);
        assert!(e.starts_with("`reports[1].agent` must be"), "{e}");
        let e = bad(r#"{"source": "vm", "reports": [{"kind": "agent_disabled", "agent": "a",
            "status": 400, "at_ms": 1}]}"#);
        assert!(e.contains("missing field `action`"), "{e}");
        let e = bad(r#"{"source": "vm", "reports": [{"kind": "fire"}]}"#);
        assert!(e.contains("unknown variant `fire`"), "{e}");
        let answer = Answer {
            results: vec![
                Taken::Accepted,
                Taken::Refused { error: "no".into() },
                Taken::Unavailable { error: "later".into() },
            ],
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(
            text,
            r#"{"results":[{"result":"accepted"},{"result":"refused","error":"no"},{"result":"unavailable","error":"later"}]}"#
        );
        assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), answer);
    }
}
