//! The rate card config format (YAML or JSON) and the embedded default card.
//!
//! ```yaml
//! version: 1
//! unknown_model: deny            # or: {fallback: {input: "10.00", output: "30.00"}}
//! models:
//!   gpt-4o: {provider: openai, input: "2.50", cached_input: "1.25", output: "10.00"}
//!   claude-sonnet-4-5: {provider: anthropic, input: "3.00", cached_input: "0.30",
//!                       cache_write: "3.75", output: "15.00"}
//! tools:
//!   web_search: {per_call: "0.01"}
//!   blob_fetch: {per_gb: "0.12", per_call: "0.0001"}
//! ```
//!
//! Model prices are USD per million tokens. `input` and `output` are required (write `"0"` for
//! a free bucket, such as an embedding model's output); `cached_input` and `cache_write`
//! default to `input`, `reasoning` to `output`, `per_call` to zero. A tool needs `per_call`,
//! `per_gb` (USD per 10⁹ bytes) or both. `max_output_tokens` and `context_window` are the
//! model's documented limits (optional).
//!
//! Embedded in a config as its `pricing:` section, `version` and `models` are optional and
//! `litellm_file: PATH` names a LiteLLM price file layered between the section and the built-in
//! card ([`RateCard::decode_section`]). This module reads no files: the adapter passes a
//! [`ReadFile`] that does, and without one the field is refused.

use crate::doc::{self, Cx, DocErrors, Field, Obj};
use crate::money::Money;

use super::{ModelLimits, Rate, RateCard, Rates, ToolRates, UnknownModelPolicy};

/// The default card shipped with Tollgate: list prices of current OpenAI and Anthropic models.
pub const BUILTIN: &str = include_str!("defaults.yaml");

const CARD_FIELDS: &[&str] = &["version", "unknown_model", "models", "tools"];
const SECTION_FIELDS: &[&str] = &["version", "unknown_model", "litellm_file", "models", "tools"];
const MODEL_FIELDS: &[&str] = &[
    "provider",
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
    "per_call",
    "max_output_tokens",
    "context_window",
];
const RATE_FIELDS: &[&str] =
    &["input", "cached_input", "cache_write", "output", "reasoning", "per_call"];
const TOOL_FIELDS: &[&str] = &["per_call", "per_gb"];

impl RateCard {
    /// Parses a rate card document; `version: 1` is required. Reports every error at once.
    pub fn from_config(text: &str) -> Result<RateCard, DocErrors> {
        let doc = doc::parse(text)?;
        let mut cx = Cx::new();
        let (card, _) = decode(&mut cx, &Field::root(&doc), true);
        cx.finish(card)
    }

    /// Decodes a rate card embedded in a larger document (e.g. a policy's `pricing:` section),
    /// where `version` is optional. Errors are recorded in `cx` with their full paths. A
    /// `litellm_file` in it is refused: see [`RateCard::decode_section`].
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> RateCard {
        RateCard::decode_section(cx, field, &RateCard::default(), None)
    }

    /// Decodes a config's `pricing:` section into the card to price with: the section's own
    /// models and tools, over the LiteLLM price file its `litellm_file` names, over `base` (the
    /// built-in card); the unknown-model outcome is the section's. The core reads no files:
    /// `read_file` does (the proxy passes one); without it `litellm_file` is an error. A file
    /// that cannot be read or parsed is an error on the `litellm_file` field naming the path
    /// and, for a bad entry, the entry and its line in the file.
    pub fn decode_section(
        cx: &mut Cx,
        field: &Field<'_>,
        base: &RateCard,
        read_file: Option<ReadFile<'_>>,
    ) -> RateCard {
        let (own, file) = decode(cx, field, false);
        let litellm = file.and_then(|f| litellm_file(cx, &f, read_file));
        match litellm {
            Some(litellm) => own.merged_over(&litellm.merged_over(base)),
            None => own.merged_over(base),
        }
    }

    /// This card as a rate card document (YAML, `version: 1`) that [`RateCard::from_config`]
    /// reads back to the same card, and that can stand under a config's `pricing:` key. A bucket
    /// is written only where it differs from its default (`cached_input` and `cache_write` from
    /// `input`, `reasoning` from `output`), limits only where known.
    pub fn to_config(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from("version: 1\n");
        match self.unknown_model {
            UnknownModelPolicy::Deny => out.push_str("unknown_model: deny\n"),
            UnknownModelPolicy::Fallback(r) => {
                let _ = writeln!(out, "unknown_model: {{fallback: {{{}}}}}", rate_fields(&r));
            }
        }
        if self.models.is_empty() {
            out.push_str("models: {}\n");
        } else {
            out.push_str("models:\n");
        }
        for m in &self.models {
            let _ = write!(out, "  {}: {{", quoted(&m.name));
            if let Some(p) = &m.provider {
                let _ = write!(out, "provider: {}, ", quoted(p));
            }
            out.push_str(&rate_fields(&m.rates));
            if let Some(n) = m.limits.max_output_tokens {
                let _ = write!(out, ", max_output_tokens: {n}");
            }
            if let Some(n) = m.limits.context_window {
                let _ = write!(out, ", context_window: {n}");
            }
            out.push_str("}\n");
        }
        if self.tools.is_empty() {
            out.push_str("tools: {}\n");
        } else {
            out.push_str("tools:\n");
        }
        for (name, t) in &self.tools {
            let _ = writeln!(
                out,
                "  {}: {{per_call: \"{}\", per_gb: \"{}\"}}",
                quoted(name),
                t.per_call,
                t.per_gb
            );
        }
        out
    }

    /// The embedded default card ([`BUILTIN`]). It is parsed by a test, so this only fails if
    /// the binary was built from a broken tree.
    pub fn builtin() -> Result<RateCard, DocErrors> {
        RateCard::from_config(BUILTIN)
    }
}

/// Reads a file a config names, for adapters that can (the core does no I/O): its text, or why
/// it cannot be read (shown next to the field).
pub type ReadFile<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// At most this many errors of a bad LiteLLM file are reported (a wrong file would give
/// thousands); the count of the rest follows.
const MAX_FILE_ERRORS: usize = 10;

/// The card of the LiteLLM file `field` names, or `None` with the reason recorded on `field`.
fn litellm_file(
    cx: &mut Cx,
    field: &Field<'_>,
    read_file: Option<ReadFile<'_>>,
) -> Option<RateCard> {
    let path = field.non_empty_str(cx)?;
    let Some(read_file) = read_file else {
        field.error(
            cx,
            "not supported here: the Envoy filter reads no files; list the prices under \
             `pricing.models` instead (`tollgate pricing import FILE` converts a LiteLLM price \
             file)",
        );
        return None;
    };
    let text = match read_file(path) {
        Ok(text) => text,
        Err(e) => {
            field.error(cx, format!("cannot read LiteLLM price file `{path}`: {e}"));
            return None;
        }
    };
    match RateCard::from_litellm(&text) {
        Ok(card) => Some(card),
        Err(errors) => {
            let n = errors.0.len();
            for e in errors.0.iter().take(MAX_FILE_ERRORS) {
                let entry = if e.path.is_empty() { "(document)" } else { e.path.as_str() };
                field.error(
                    cx,
                    format!(
                        "LiteLLM price file `{path}`, {entry} (line {}): {}",
                        e.line, e.message
                    ),
                );
            }
            if n > MAX_FILE_ERRORS {
                field.error(
                    cx,
                    format!("LiteLLM price file `{path}`: {} more errors", n - MAX_FILE_ERRORS),
                );
            }
            None
        }
    }
}

/// The card and, in an embedded section, its `litellm_file` field.
fn decode<'a>(
    cx: &mut Cx,
    field: &Field<'a>,
    version_required: bool,
) -> (RateCard, Option<Field<'a>>) {
    let mut card = RateCard::default();
    let Some(mut obj) = cx.object(field) else {
        return (card, None);
    };
    let file = if version_required { None } else { obj.get("litellm_file") };
    let version = if version_required { obj.require(cx, "version") } else { obj.get("version") };
    if let Some(v) = version {
        match v.u64(cx) {
            Some(1) | None => {}
            Some(n) => v.error(cx, format!("unsupported version {n}, expected 1")),
        }
    }
    if let Some(f) = obj.get("unknown_model") {
        if let Some(policy) = unknown_model(cx, &f) {
            card.unknown_model = policy;
        }
    }
    // A standalone card must list its models; a section merged over the built-in card may only
    // add tools or change the unknown-model outcome.
    let models = if version_required { obj.require(cx, "models") } else { obj.get("models") };
    if let Some(models) = models {
        // Opened as an object first to report duplicate model names.
        if cx.object(&models).is_some() {
            for (name, f) in models.entries(cx) {
                if name.is_empty() {
                    f.error(cx, "model name must not be empty");
                }
                let Some(mut m) = cx.object(&f) else { continue };
                let provider = m.get("provider").and_then(|p| p.non_empty_str(cx));
                let rates = rates(cx, &mut m);
                let limits = ModelLimits {
                    max_output_tokens: m.get("max_output_tokens").and_then(|f| f.u64(cx)),
                    context_window: m.get("context_window").and_then(|f| f.u64(cx)),
                };
                m.finish(cx, MODEL_FIELDS);
                if let Some(rates) = rates {
                    card.insert_model_with_limits(name, provider, rates, limits);
                }
            }
        }
    }
    if let Some(tools) = obj.get("tools") {
        if cx.object(&tools).is_some() {
            for (name, f) in tools.entries(cx) {
                if let Some(rates) = tool(cx, &f) {
                    card.insert_tool(name, rates);
                }
            }
        }
    }
    obj.finish(cx, if version_required { CARD_FIELDS } else { SECTION_FIELDS });
    (card, file)
}

fn unknown_model(cx: &mut Cx, field: &Field<'_>) -> Option<UnknownModelPolicy> {
    const EXPECTED: &str = "expected `deny` or `{fallback: {input: \"10.00\", output: \"30.00\"}}`";
    if let Some(text) = field.node.scalar() {
        if text == "deny" {
            return Some(UnknownModelPolicy::Deny);
        }
        field.error(cx, format!("unknown value `{text}`, {EXPECTED}"));
        return None;
    }
    if !matches!(field.node.value, doc::Value::Map(_)) {
        field.error(cx, EXPECTED);
        return None;
    }
    let mut obj = cx.object(field)?;
    let policy = obj.require(cx, "fallback").and_then(|f| {
        let mut rates_obj = cx.object(&f)?;
        let rates = rates(cx, &mut rates_obj);
        rates_obj.finish(cx, RATE_FIELDS);
        rates
    });
    obj.finish(cx, &["fallback"]);
    policy.map(UnknownModelPolicy::Fallback)
}

/// The price fields of a model or of the fallback; `None` if any is missing or invalid.
fn rates(cx: &mut Cx, obj: &mut Obj<'_>) -> Option<Rates> {
    let input = obj.require(cx, "input").and_then(|f| rate(cx, &f));
    let output = obj.require(cx, "output").and_then(|f| rate(cx, &f));
    let mut ok = true;
    let mut optional = |cx: &mut Cx, obj: &mut Obj<'_>, key: &str| match obj.get(key) {
        Some(f) => {
            let r = rate(cx, &f);
            ok &= r.is_some();
            r
        }
        None => None,
    };
    let cached_input = optional(cx, obj, "cached_input");
    let cache_write = optional(cx, obj, "cache_write");
    let reasoning = optional(cx, obj, "reasoning");
    let per_call = match obj.get("per_call") {
        Some(f) => f.money(cx),
        None => Some(Money::ZERO),
    };
    let (input, output, per_call) = (input?, output?, per_call?);
    if !ok {
        return None;
    }
    let mut rates = Rates::new(input, output);
    rates.cached_input = cached_input.unwrap_or(input);
    rates.cache_write = cache_write.unwrap_or(input);
    rates.reasoning = reasoning.unwrap_or(output);
    rates.per_call = per_call;
    Some(rates)
}

/// `input: "2.50", output: "10.00"` plus the buckets that differ from their defaults.
fn rate_fields(r: &Rates) -> String {
    let mut out = format!("input: \"{}\"", r.input);
    if r.cached_input != r.input {
        out.push_str(&format!(", cached_input: \"{}\"", r.cached_input));
    }
    if r.cache_write != r.input {
        out.push_str(&format!(", cache_write: \"{}\"", r.cache_write));
    }
    out.push_str(&format!(", output: \"{}\"", r.output));
    if r.reasoning != r.output {
        out.push_str(&format!(", reasoning: \"{}\"", r.reasoning));
    }
    if r.per_call != Money::ZERO {
        out.push_str(&format!(", per_call: \"{}\"", r.per_call));
    }
    out
}

/// A YAML double-quoted string (JSON's escapes are YAML's), so any name reads back as itself.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("\"{}\"", text.escape_default()))
}

/// A USD-per-million-tokens price, quoted or not.
fn rate(cx: &mut Cx, field: &Field<'_>) -> Option<Rate> {
    let Some(text) = field.node.scalar() else {
        field.error(cx, "expected a price in USD per million tokens, such as \"2.50\"");
        return None;
    };
    match Rate::per_million(text) {
        Ok(rate) => Some(rate),
        Err(e) => {
            field.error(cx, e.to_string());
            None
        }
    }
}

fn tool(cx: &mut Cx, field: &Field<'_>) -> Option<ToolRates> {
    let mut obj = cx.object(field)?;
    let per_call = obj.get("per_call").map(|f| f.money(cx));
    let per_gb = obj.get("per_gb").map(|f| f.money(cx));
    obj.finish(cx, TOOL_FIELDS);
    if per_call.is_none() && per_gb.is_none() {
        field.error(cx, "a tool needs `per_call`, `per_gb` or both");
        return None;
    }
    Some(ToolRates {
        per_call: per_call.unwrap_or(Some(Money::ZERO))?,
        per_gb: per_gb.unwrap_or(Some(Money::ZERO))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::DocError;

    fn errors(text: &str) -> Vec<(String, u32, String)> {
        let errors = RateCard::from_config(text).expect_err("config should be rejected").0;
        errors
            .into_iter()
            .map(|DocError { path, line, message, .. }| (path, line, message))
            .collect()
    }

    #[test]
    fn builtin_card_loads_with_deny_for_unknown_models() {
        let card = RateCard::builtin().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Deny);
        assert!(card.models().len() >= 26, "{}", card.models().len());
        assert!(card.models().iter().all(|m| m.provider.is_some()), "every entry names a provider");
    }

    #[test]
    fn example_config_loads() {
        let text = r#"
version: 1
unknown_model: {fallback: {input: "10.00", output: "30.00"}}
models:
  gpt-4o: {provider: openai, input: "2.50", cached_input: "1.25", output: "10.00"}
  claude-sonnet-4-5: {provider: anthropic, input: "3.00", cached_input: "0.30", cache_write: "3.75", output: "15.00"}
  priced-per-call: {input: 1, output: 2, reasoning: "2.5", per_call: "0.002"}
tools:
  web_search: {per_call: "0.01"}
  blob_fetch: {per_gb: "0.12", per_call: "0.0001"}
"#;
        let card = RateCard::from_config(text).unwrap_or_else(|e| panic!("{e}"));
        let r = |s: &str| Rate::per_million(s).unwrap();
        let fallback = Rates::new(r("10"), r("30"));
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Fallback(fallback));
        let m = &card.models()[0];
        assert_eq!((m.name.as_str(), m.provider.as_deref()), ("gpt-4o", Some("openai")));
        assert_eq!(
            m.rates,
            Rates {
                input: r("2.5"),
                cached_input: r("1.25"),
                cache_write: r("2.5"),
                output: r("10"),
                reasoning: r("10"),
                per_call: Money::ZERO,
            }
        );
        let m = &card.models()[2];
        assert_eq!(m.provider, None);
        assert_eq!(m.rates.reasoning, r("2.5"));
        assert_eq!(m.rates.per_call, Money::parse("0.002").unwrap());
        assert_eq!(
            card.tool("blob_fetch"),
            Some(&ToolRates {
                per_call: Money::parse("0.0001").unwrap(),
                per_gb: Money::parse("0.12").unwrap()
            })
        );
        assert_eq!(card.tool("web_search").map(|t| t.per_gb), Some(Money::ZERO));
    }

    #[test]
    fn json_config_loads_with_the_same_decoder() {
        let text = r#"{"version": 1, "models": {"m": {"input": "0.025", "output": "0.0375"}}}"#;
        let card = RateCard::from_config(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(card.models()[0].rates.input.nanos_per_million(), 25_000_000);
        assert_eq!(card.models()[0].rates.output.nanos_per_million(), 37_500_000);
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Deny);
    }

    #[test]
    fn every_bad_field_is_reported_with_path_and_line() {
        let text = "\
version: 2
unknown_model: allow
models:
  gpt-4o: {input: abc, output: \"10.00\"}
  no-output: {input: \"1.00\"}
  typo: {input: 1, output: 2, cahced_input: 1}
  negative: {input: \"-1\", output: 2}
  precise: {input: \"0.0000000001\", output: 2}
  listy: {input: [1], output: 2, per_call: x}
  no-output: {input: 1, output: 1}
tools:
  web_search: {}
  blob: {per_gb: cheap}
extra: true
";
        let got = errors(text);
        let paths: Vec<(&str, u32)> = got.iter().map(|(p, l, _)| (p.as_str(), *l)).collect();
        assert_eq!(
            paths,
            vec![
                ("version", 1),
                ("unknown_model", 2),
                ("models.gpt-4o.input", 4),
                ("models.no-output", 5),
                ("models.typo.cahced_input", 6),
                ("models.negative.input", 7),
                ("models.precise.input", 8),
                ("models.listy.input", 9),
                ("models.listy.per_call", 9),
                ("models", 10),
                ("tools.web_search", 12),
                ("tools.blob.per_gb", 13),
                ("extra", 14),
            ],
            "{got:#?}"
        );
        let message = |path: &str| {
            got.iter().find(|(p, _, _)| p == path).map(|(_, _, m)| m.as_str()).unwrap_or("")
        };
        assert!(message("version").contains("unsupported version 2"));
        assert!(message("unknown_model").contains("`allow`"));
        assert!(message("models.no-output").contains("missing required field `output`"));
        assert!(message("models.typo.cahced_input").contains("unknown field `cahced_input`"));
        assert!(message("models.negative.input").contains("negative"));
        assert!(message("models.precise.input").contains("9 decimal places"));
        assert!(message("models").contains("duplicate key `no-output`"));
        assert!(message("tools.web_search").contains("`per_call`, `per_gb`"));
    }

    #[test]
    fn version_and_models_are_required_at_top_level() {
        let got = errors("unknown_model: deny\n");
        let messages: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
        assert_eq!(
            messages,
            vec!["missing required field `version`", "missing required field `models`"]
        );
    }

    #[test]
    fn fallback_needs_its_prices() {
        let got = errors("version: 1\nunknown_model:\n  fallback: {input: \"1\"}\nmodels: {}\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("unknown_model.fallback", 3));
        assert!(got[0].2.contains("`output`"));
        let got = errors("version: 1\nunknown_model: [deny]\nmodels: {}\n");
        assert_eq!((got[0].0.as_str(), got[0].1), ("unknown_model", 2));
    }

    #[test]
    fn a_card_written_as_yaml_reads_back_the_same() {
        let builtin = RateCard::builtin().unwrap();
        let back = RateCard::from_config(&builtin.to_config()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.models(), builtin.models());
        assert_eq!(back.unknown_model(), UnknownModelPolicy::Deny);
        let text = r#"
version: 1
unknown_model: {fallback: {input: "10.00", output: "30.00", reasoning: "40"}}
models:
  "ft:gpt-4o:acme:x#1": {input: "0.000000001", cached_input: 0, output: 2, per_call: "0.002"}
  'say "hi" \ there': {provider: "a: b", input: 1, cache_write: "1.25", output: 2}
tools:
  web_search: {per_call: "0.01"}
  "blob: fetch": {per_gb: "0.12"}
"#;
        let card = RateCard::from_config(text).unwrap_or_else(|e| panic!("{e}"));
        let yaml = card.to_config();
        let back = RateCard::from_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(back.models(), card.models(), "{yaml}");
        assert_eq!(back.unknown_model(), card.unknown_model(), "{yaml}");
        assert_eq!(back.tools().collect::<Vec<_>>(), card.tools().collect::<Vec<_>>(), "{yaml}");
    }

    /// A `pricing:` section decoded as the proxy does, with `files` as the file system.
    fn section(text: &str, files: &[(&str, &str)]) -> Result<RateCard, Vec<(String, u32, String)>> {
        let read = |path: &str| {
            files
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| "No such file or directory (os error 2)".to_string())
        };
        decoded(text, Some(&read))
    }

    fn decoded(
        text: &str,
        read: Option<ReadFile<'_>>,
    ) -> Result<RateCard, Vec<(String, u32, String)>> {
        let doc = doc::parse(text).unwrap();
        let mut cx = Cx::new();
        let root = Field::root(&doc);
        let mut obj = cx.object(&root).unwrap();
        let pricing = obj.require(&mut cx, "pricing").unwrap();
        let card = RateCard::decode_section(&mut cx, &pricing, &RateCard::builtin().unwrap(), read);
        obj.finish(&mut cx, &["pricing"]);
        cx.finish(card).map_err(|e| {
            e.0.into_iter()
                .map(|DocError { path, line, message, .. }| (path, line, message))
                .collect()
        })
    }

    #[test]
    fn litellm_file_is_layered_under_the_section_and_over_the_builtin_card() {
        let litellm = r#"{
  "gpt-4o": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.2e-05, "litellm_provider": "openai"},
  "o3": {"input_cost_per_token": 1e-06, "output_cost_per_token": 4e-06, "litellm_provider": "openai",
         "max_input_tokens": 200000, "max_output_tokens": 100000},
  "mistral/mistral-large": {"input_cost_per_token": 2e-06, "output_cost_per_token": 6e-06, "litellm_provider": "mistral"}
}"#;
        let text = "pricing:\n  litellm_file: /etc/tollgate/prices.json\n  models:\n    \
                    gpt-4o: {provider: openai, input: \"2.00\", output: \"8.00\"}\n";
        let card = section(text, &[("/etc/tollgate/prices.json", litellm)]).unwrap();
        let rates = |m: &str| card.rates(m).map(|(r, _)| *r).unwrap_or_else(|e| panic!("{e}"));
        let r = |t: &str| Rate::per_million(t).unwrap();
        // The section's own price wins over the file's, the file's over the built-in card's.
        assert_eq!((rates("gpt-4o").input, rates("gpt-4o").output), (r("2"), r("8")));
        assert_eq!((rates("o3").input, rates("o3").output), (r("1"), r("4")));
        assert_eq!(rates("mistral/mistral-large").output, r("6"));
        // What the file does not list keeps its built-in price.
        let builtin = RateCard::builtin().unwrap();
        assert_eq!(rates("claude-opus-4-8"), *builtin.rates("claude-opus-4-8").unwrap().0);
        assert_eq!(card.models().len(), builtin.models().len() + 1);
        assert_eq!(card.unknown_model(), UnknownModelPolicy::Deny);
        let without = section("pricing: {unknown_model: deny}\n", &[]).unwrap();
        assert_eq!(without.models(), builtin.models());
    }

    #[test]
    fn an_unreadable_or_bad_litellm_file_is_an_error_on_the_field() {
        let text = "pricing:\n  unknown_model: deny\n  litellm_file: prices.json\n";
        let got = section(text, &[]).unwrap_err();
        assert_eq!(
            got,
            vec![(
                "pricing.litellm_file".to_string(),
                3,
                "cannot read LiteLLM price file `prices.json`: No such file or directory (os error 2)"
                    .to_string()
            )]
        );
        let bad = "{\n  \"ok\": {\"input_cost_per_token\": 1e-06, \"output_cost_per_token\": 1e-06},\n  \
                   \"gpt-x\": {\"input_cost_per_token\": \"cheap\", \"output_cost_per_token\": 1e-06}\n}";
        let got = section(text, &[("prices.json", bad)]).unwrap_err();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("pricing.litellm_file", 3));
        assert!(
            got[0].2.starts_with(
                "LiteLLM price file `prices.json`, gpt-x.input_cost_per_token (line 3): `cheap`"
            ),
            "{got:?}"
        );
        let got = section(text, &[("prices.json", "{\"a\": [1,")]).unwrap_err();
        assert!(got[0].2.contains("(document) (line"), "{got:?}");
        let many: String = (0..25)
            .map(|i| {
                format!("\"m{i}\": {{\"input_cost_per_token\": -1, \"output_cost_per_token\": 1}}")
            })
            .collect::<Vec<_>>()
            .join(",\n");
        let got = section(text, &[("prices.json", &format!("{{{many}}}"))]).unwrap_err();
        assert_eq!(got.len(), MAX_FILE_ERRORS + 1);
        assert!(got[MAX_FILE_ERRORS].2.ends_with("15 more errors"), "{got:?}");
        let got = section("pricing: {litellm_file: \"\"}\n", &[]).unwrap_err();
        assert_eq!((got[0].0.as_str(), got[0].1), ("pricing.litellm_file", 1));
    }

    #[test]
    fn litellm_file_is_refused_where_files_cannot_be_read() {
        let got = decoded("pricing:\n  litellm_file: prices.json\n", None).unwrap_err();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.as_str(), got[0].1), ("pricing.litellm_file", 2));
        assert!(got[0].2.contains("reads no files"), "{}", got[0].2);
        assert!(got[0].2.contains("tollgate pricing import"), "{}", got[0].2);
        // A standalone rate card has no such field.
        let errors =
            RateCard::from_config("version: 1\nlitellm_file: x\nmodels: {}\n").unwrap_err();
        assert!(errors.0[0].message.contains("unknown field `litellm_file`"), "{errors}");
    }

    #[test]
    fn embedded_section_decodes_without_version() {
        let text = "pricing:\n  models:\n    m: {input: 1, output: oops}\n";
        let doc = doc::parse(text).unwrap();
        let mut cx = Cx::new();
        let root = Field::root(&doc);
        let mut obj = cx.object(&root).unwrap();
        let section = obj.require(&mut cx, "pricing").unwrap();
        let _ = RateCard::decode(&mut cx, &section);
        obj.finish(&mut cx, &["pricing"]);
        let errors = cx.finish(()).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].path.as_str(), errors[0].line), ("pricing.models.m.output", 3));
    }
}
