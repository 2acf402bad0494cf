//! `tollgate approvals list|approve|deny`: the admin API's approvals, from a shell.
//!
//! Talks to a running proxy's admin listener (`--admin`, default from the config's
//! `admin.listen`) with the bearer token from the environment variable the config names
//! (`admin.token_env`, default `TOLLGATE_ADMIN_TOKEN`). Exit codes: 0 done, 1 the admin API
//! refused (unknown id: 4, no longer pending: 5), 2 bad input or the proxy is unreachable.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::deny::full;
use crate::upstream::{client, ClientSettings};

/// What to do.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals (pending ones unless --state says otherwise).
    List {
        /// pending, approved, denied, used, expired or all.
        #[arg(long, default_value = "pending")]
        state: String,
        /// Print the JSON the admin API returned.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending approval: the agent's next retry carrying its id passes once.
    Approve {
        id: String,
        /// Who approves (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "admin")]
        by: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// Deny a pending approval.
    Deny {
        id: String,
        #[arg(long, env = "USER", default_value = "admin")]
        by: String,
        #[arg(long)]
        note: Option<String>,
    },
}

/// Where the admin API is and how to authenticate.
pub struct Target {
    /// `http://127.0.0.1:9090`.
    pub base: String,
    pub token: Option<String>,
}

/// Runs the command against `target`.
pub fn run(target: Target, command: ApprovalsCommand) -> ExitCode {
    let Some(token) = target.token else {
        eprintln!(
            "no admin token: set the variable named by admin.token_env (TOLLGATE_ADMIN_TOKEN)"
        );
        return ExitCode::from(2);
    };
    let (method, path, body) = match &command {
        ApprovalsCommand::List { state, .. } => {
            let query = if state == "all" { String::new() } else { format!("?state={state}") };
            (Method::GET, format!("/admin/approvals{query}"), None)
        }
        ApprovalsCommand::Approve { id, by, note } => (
            Method::POST,
            format!("/admin/approvals/{id}/approve"),
            Some(json!({"by": by, "note": note})),
        ),
        ApprovalsCommand::Deny { id, by, note } => (
            Method::POST,
            format!("/admin/approvals/{id}/deny"),
            Some(json!({"by": by, "note": note})),
        ),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("{}{path}", target.base.trim_end_matches('/'));
    let answer = runtime.block_on(call(method, &url, &token, body));
    let (status, value) = match answer {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("calling {url}: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !(200..300).contains(&status) {
        eprintln!("{status}: {}", value["error"].as_str().unwrap_or(&value.to_string()));
        return ExitCode::from(match status {
            404 => 4,
            409 => 5,
            400 => 2,
            _ => 1,
        });
    }
    match command {
        ApprovalsCommand::List { json: true, .. } => {
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        ApprovalsCommand::List { .. } => {
            let approvals = value["approvals"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<37} {:<9} {:<20} {:<20} {:>5}  {:<28} expires",
                "id", "state", "agent", "action", "risk", "reason"
            );
            for a in &approvals {
                let risk = a["risk_score"].as_u64().unwrap_or(0);
                println!(
                    "{:<37} {:<9} {:<20} {:<20} {:>5}  {:<28} {}",
                    a["id"].as_str().unwrap_or("-"),
                    a["state"].as_str().unwrap_or("-"),
                    a["agent"].as_str().unwrap_or("-"),
                    a["action"].as_str().unwrap_or("-"),
                    tollgate_core::risk::Score(risk as u32).to_string(),
                    a["reason"].as_str().unwrap_or("-"),
                    tollgate_core::time::UnixMillis(a["expires_at_ms"].as_u64().unwrap_or(0)),
                );
            }
            println!("{} approval(s)", approvals.len());
        }
        ApprovalsCommand::Approve { .. } | ApprovalsCommand::Deny { .. } => {
            println!(
                "{} {} (agent {}, action {}, by {})",
                value["id"].as_str().unwrap_or("-"),
                value["state"].as_str().unwrap_or("-"),
                value["agent"].as_str().unwrap_or("-"),
                value["action"].as_str().unwrap_or("-"),
                value["decided_by"].as_str().unwrap_or("-"),
            );
        }
    }
    ExitCode::SUCCESS
}

pub(crate) async fn call(
    method: Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let client = client(&ClientSettings::default())?;
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(full(bytes))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .map_err(|_| anyhow::anyhow!("no body within 10 s"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_bytes();
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value))
}
