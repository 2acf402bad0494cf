//! The compiled configuration every adapter decides with: attribution, policy snapshot, rate
//! card, autonomy and guardrails, decoded from one document's sections in one pass so that every
//! error in any section is reported together, with its path and line.
//!
//! The request lifecycle is the same in the sidecar, the forward proxy and the Envoy filter:
//! *on request*: attribute ([`Engine::attribution`]), classify (`crate::inspect`), then admit
//! ([`crate::lifecycle::decide`]: policy, worst case, cost cap, rate limits, oversight, budget
//! reservation); *on response end*: meter (`crate::metering`), price, settle. The adapters own
//! the I/O and the state stores; this module owns no state.

use crate::attribution::Attribution;
use crate::autonomy;
use crate::doc::{self, Cx, DocErrors, Field};
use crate::guardrails::Guardrails;
use crate::policy::Snapshot;
use crate::pricing::{RateCard, ReadFile};

/// The sections of a configuration document the engine reads; each may be absent.
#[derive(Default)]
pub struct EngineConfig<'a> {
    /// `attribution:` absent → the default headers of product.md.
    pub attribution: Option<Field<'a>>,
    /// `policy:` required.
    pub policy: Option<Field<'a>>,
    /// `pricing:` a rate card (and the LiteLLM file its `litellm_file` names) merged over the
    /// built-in one; absent → the built-in card.
    pub pricing: Option<Field<'a>>,
    /// `autonomy:` absent → every action resolves to `APPROVAL_REQUIRED`.
    pub autonomy: Option<Field<'a>>,
    /// `guardrails:` absent → no tool action is checked by guardrails (the default action
    /// policies still name the categories); present → every tool action is checked against it.
    pub guardrails: Option<Field<'a>>,
    /// Reads the files a section names (`pricing.litellm_file`); `None` (an adapter that reads
    /// no files, such as the Envoy filter) refuses such fields with an error naming them.
    pub read_file: Option<ReadFile<'a>>,
}

/// Everything needed to decide and price a request. Cheap to clone (compiled tables are
/// shared-nothing but small; the policy index is the largest part).
#[derive(Clone, Debug)]
pub struct Engine {
    attribution: Attribution,
    policy: Snapshot,
    rates: RateCard,
    autonomy: autonomy::Policy,
    guardrails: Guardrails,
    /// The configuration has a `guardrails:` section: tool actions are checked against it.
    guardrails_on: bool,
}

impl EngineConfig<'_> {
    /// Decodes and compiles every section, recording all errors in `cx`. `None` if a required
    /// part could not be built (the errors say why).
    pub fn compile(self, cx: &mut Cx) -> Option<Engine> {
        let attribution = match &self.attribution {
            Some(f) => Attribution::from_field(cx, f),
            None => Some(Attribution::default()),
        };
        let policy = match &self.policy {
            Some(f) => Snapshot::from_field(cx, f),
            None => {
                cx.error(
                    "policy",
                    &doc::Node { value: doc::Value::Null, line: 1, col: 1 },
                    "missing required section `policy`",
                );
                None
            }
        };
        let builtin = match RateCard::builtin() {
            Ok(card) => card,
            Err(errors) => {
                for e in errors.0 {
                    cx.error(&format!("(built-in rate card) {}", e.path), &at(&e), e.message);
                }
                return None;
            }
        };
        let rates = match &self.pricing {
            Some(f) => RateCard::decode_section(cx, f, &builtin, self.read_file),
            None => builtin,
        };
        let autonomy = match &self.autonomy {
            Some(f) => autonomy::Policy::decode(cx, f),
            None => autonomy::Policy::default(),
        };
        let guardrails_on = self.guardrails.is_some();
        let guardrails = match &self.guardrails {
            Some(f) => Guardrails::decode(cx, f),
            None => Guardrails::defaults(),
        };
        Some(Engine {
            attribution: attribution?,
            policy: policy?,
            rates,
            autonomy,
            guardrails,
            guardrails_on,
        })
    }
}

fn at(e: &doc::DocError) -> doc::Node {
    doc::Node { value: doc::Value::Null, line: e.line, col: e.col }
}

impl Engine {
    /// Compiles a document whose top level holds the sections (`attribution:`, `policy:`,
    /// `pricing:`, `autonomy:`, `guardrails:`), e.g. the Envoy filter's plugin configuration.
    /// Other top-level keys are rejected, naming the allowed ones.
    pub fn from_document(text: &str) -> Result<Engine, DocErrors> {
        let node = doc::parse(text)?;
        let mut cx = Cx::new();
        let root = Field::root(&node);
        let Some(mut obj) = cx.object(&root) else { return Err(finish_err(cx)) };
        let engine = EngineConfig {
            attribution: obj.get("attribution"),
            policy: obj.get("policy"),
            pricing: obj.get("pricing"),
            autonomy: obj.get("autonomy"),
            guardrails: obj.get("guardrails"),
            read_file: None,
        }
        .compile(&mut cx);
        obj.finish(&mut cx, &["attribution", "policy", "pricing", "autonomy", "guardrails"]);
        match engine {
            Some(engine) if !cx.has_errors() => Ok(engine),
            _ => Err(finish_err(cx)),
        }
    }

    pub fn attribution(&self) -> &Attribution {
        &self.attribution
    }

    /// The policy snapshot the configuration was loaded with (adapters may later swap in newer
    /// ones of their own).
    pub fn policy(&self) -> &Snapshot {
        &self.policy
    }

    pub fn rates(&self) -> &RateCard {
        &self.rates
    }

    pub fn autonomy(&self) -> &autonomy::Policy {
        &self.autonomy
    }

    pub fn guardrails(&self) -> &Guardrails {
        &self.guardrails
    }

    /// The guardrails tool actions are checked against: `None` without a `guardrails:`
    /// section.
    pub fn enforced_guardrails(&self) -> Option<&Guardrails> {
        self.guardrails_on.then_some(&self.guardrails)
    }

    /// Pins the sidecar's own identity (from its environment) so that a request claiming to be
    /// another agent is denied.
    pub fn attribution_mut(&mut self) -> &mut Attribution {
        &mut self.attribution
    }
}

fn finish_err(cx: Cx) -> DocErrors {
    cx.finish(()).err().unwrap_or(DocErrors(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_with_only_a_policy_uses_every_default() {
        let engine = Engine::from_document("policy:\n  version: v1\n  defaults: {llm: allow}\n")
            .expect("valid document");
        assert_eq!(engine.policy().version(), "v1");
        assert!(engine.rates().resolve("gpt-4o").is_some(), "built-in rate card");
        assert!(engine.attribution().header_names().any(|h| h == "x-agent-id"));
    }

    #[test]
    fn errors_from_every_section_are_reported_together() {
        let text = "\
attribution:
  headers: 3
policy:
  version: v1
  rules:
    - {id: a, match: {route: nowhere}, effect: allow}
pricing:
  models:
    gpt-x: {input: abc, output: \"1.00\"}
extra: 1
";
        let errors = Engine::from_document(text).expect_err("invalid").0;
        let lines: Vec<u32> = errors.iter().map(|e| e.line).collect();
        for line in [2, 6, 9, 10] {
            assert!(lines.contains(&line), "no error on line {line}: {errors:?}");
        }
        assert!(errors.iter().any(|e| e.path == "extra"), "{errors:?}");
    }

    #[test]
    fn a_document_without_a_file_reader_refuses_litellm_file() {
        let text = "policy: {version: v1}\npricing: {litellm_file: prices.json}\n";
        let errors = Engine::from_document(text).expect_err("no file reader").0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].path.as_str(), errors[0].line), ("pricing.litellm_file", 2));
        assert!(errors[0].message.contains("reads no files"), "{}", errors[0].message);
    }

    #[test]
    fn a_file_reader_layers_the_litellm_file_into_the_card() {
        let read = |path: &str| match path {
            "prices.json" => Ok(r#"{"my-model": {"input_cost_per_token": 1e-06,
                "output_cost_per_token": 2e-06, "max_output_tokens": 4096}}"#
                .to_string()),
            other => Err(format!("no {other}")),
        };
        let node =
            doc::parse("policy: {version: v1}\npricing: {litellm_file: prices.json}\n").unwrap();
        let mut cx = Cx::new();
        let root = Field::root(&node);
        let mut obj = cx.object(&root).unwrap();
        let engine = EngineConfig {
            policy: obj.get("policy"),
            pricing: obj.get("pricing"),
            read_file: Some(&read),
            ..EngineConfig::default()
        }
        .compile(&mut cx)
        .expect("compiles");
        obj.finish(&mut cx, &["policy", "pricing"]);
        assert!(!cx.has_errors());
        assert_eq!(engine.rates().limits("my-model").max_output_tokens, Some(4096));
        assert!(engine.rates().resolve("gpt-5.4").is_some(), "over the built-in card");
    }

    #[test]
    fn a_missing_policy_is_named() {
        let errors = Engine::from_document("pricing: {}\n").expect_err("no policy").0;
        assert!(errors.iter().any(|e| e.message.contains("`policy`")), "{errors:?}");
    }
}
