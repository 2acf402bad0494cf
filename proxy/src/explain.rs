//! `tollgate explain`: the decision the proxy would make for a described request, without
//! sending anything anywhere.
//!
//! The request is described by flags (`--header x-agent-id=bot --path /v1/chat/completions
//! --model gpt-4o`) or as JSON (`--json '{"headers":{...},"path":"...","body":{...}}'`, or `-`
//! to read it from stdin). It runs the same steps as the proxy up to the decision: route,
//! attribution, classification, policy, worst-case cost.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde::Deserialize;

use tollgate_core::endpoints::{self, Pricing};
use tollgate_core::inspect;
use tollgate_core::metering::{Api, Provider};
use tollgate_core::policy::Facts;

use crate::config::{Config, UpstreamKind};

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Configuration file (the embedded default when omitted).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// A request header, `name=value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    #[arg(long, default_value = "POST")]
    method: String,
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    #[arg(long)]
    host: Option<String>,
    /// Shortcut for a body `{"model": MODEL}`.
    #[arg(long)]
    model: Option<String>,
    /// Shortcut for `max_tokens` in the body.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// The whole request as JSON: {"method","path","host","headers":{..},"body":{..}}; `-` reads
    /// stdin.
    #[arg(long)]
    json: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    output_json: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Described {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    body: Option<serde_json::Value>,
}

pub fn run(args: ExplainArgs) -> ExitCode {
    match explain(args) {
        Ok((text, allowed)) => {
            println!("{text}");
            if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("tollgate explain: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Returns the rendered explanation and whether the request would be allowed.
fn explain(args: ExplainArgs) -> anyhow::Result<(String, bool)> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::from_str(crate::config::DEFAULT_YAML)?,
    };
    let mut d = match args.json.as_deref() {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            serde_json::from_str::<Described>(&text)?
        }
        Some(text) => serde_json::from_str::<Described>(text)?,
        None => Described::default(),
    };
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .or_else(|| h.split_once(':'))
            .ok_or_else(|| anyhow::anyhow!("--header `{h}` is not name=value"))?;
        d.headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let method = d.method.clone().unwrap_or(args.method.clone());
    let path = d.path.clone().unwrap_or(args.path.clone());
    let host = d.host.clone().or(args.host.clone());
    let mut body = d.body.clone().unwrap_or_else(|| serde_json::json!({}));
    if let Some(model) = &args.model {
        body["model"] = model.clone().into();
    }
    if let Some(n) = args.max_tokens {
        body["max_tokens"] = n.into();
    }
    let headers: std::collections::BTreeMap<String, String> =
        d.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();

    let mut out = serde_json::Map::new();
    let mut lines = Vec::new();
    let Some(route) = config.route(host.as_deref(), &path) else {
        lines.push(format!("route:          none for {path} (the proxy answers 404 no_route)"));
        return Ok((lines.join("\n"), false));
    };
    lines.push(format!(
        "route:          {} ({} → {})",
        route.name,
        route.kind.as_str(),
        route.upstream
    ));
    out.insert("route".into(), route.name.clone().into());

    let identity =
        match config.engine.attribution().check(|name| headers.get(name).map(String::as_bytes)) {
            Ok(identity) => identity,
            Err(e) => {
                lines.push(format!("attribution:    REJECTED (403): {e}"));
                out.insert("attribution".into(), serde_json::to_value(&e)?);
                return Ok((render(&args, lines, out), false));
            }
        };
    lines.push(format!(
        "attribution:    agent={} cost_center={} project={}",
        identity.agent.unwrap_or("-"),
        identity.cost_center.unwrap_or("-"),
        identity.project.unwrap_or("-")
    ));
    let api = route.kind.is_llm().then(|| Api::from_path(&path)).flatten();
    let body_bytes = serde_json::to_vec(&body)?;
    let info = inspect::inspect(api, &body_bytes)?;
    let (tool, kind) = route.classify(&info);
    let facts = Facts {
        provider: Some(route.kind.provider()),
        model: info.model.as_deref(),
        tool,
        category: route.category.as_deref(),
        host: host.as_deref(),
        method: Some(&method),
        path: Some(&path),
        ..Facts::from_identity(&identity, kind)
    };
    let policy = config.engine.policy();
    let decision = policy.evaluate(&facts);
    lines.push(decision.to_string().trim_end().to_string());
    out.insert("decision".into(), serde_json::to_value(decision)?);
    if route.kind.is_llm() {
        let provider = match route.kind {
            UpstreamKind::Anthropic => Provider::Anthropic,
            _ => Provider::OpenAi,
        };
        let model =
            match endpoints::llm_pricing(Some(provider), &method, &path, info.model.as_deref()) {
                Ok(Pricing::Free(endpoint)) => {
                    lines.push(format!("worst case:     $0 ({endpoint} is free)"));
                    out.insert("worst_case_usd".into(), "0".into());
                    let allowed = decision.effect == tollgate_core::policy::Effect::Allow;
                    return Ok((render(&args, lines, out), allowed));
                }
                Ok(Pricing::Model(model)) => model,
                Err(e) => {
                    lines
                        .push(format!("worst case:     {e} (the proxy answers 400 missing_model)"));
                    return Ok((render(&args, lines, out), false));
                }
            };
        let bound =
            tollgate_core::reservation::bound(api, &info, config.engine.rates().limits(model));
        match config.engine.rates().worst_case(model, bound.input, bound.output) {
            Ok(priced) => {
                lines.push(format!(
                    "worst case:     ${} ({} input tokens at most, {} output tokens max)",
                    priced.cost.total, bound.input, bound.output
                ));
                out.insert("worst_case_usd".into(), priced.cost.total.to_string().into());
            }
            Err(e) => {
                lines.push(format!("worst case:     {e} (the proxy answers 403 unknown_model)"));
                return Ok((render(&args, lines, out), false));
            }
        }
    }
    let allowed = decision.effect == tollgate_core::policy::Effect::Allow;
    Ok((render(&args, lines, out), allowed))
}

fn render(
    args: &ExplainArgs,
    lines: Vec<String>,
    out: serde_json::Map<String, serde_json::Value>,
) -> String {
    if args.output_json {
        serde_json::to_string_pretty(&out).unwrap_or_default()
    } else {
        lines.join("\n")
    }
}
