//! What a request to an LLM API is priced by: a free endpoint, or its `model`.
//!
//! Some provider endpoints cost nothing: listing models and reading one model's card, on OpenAI
//! and Anthropic alike (`GET /v1/models`, `GET /v1/models/{id}`), and Anthropic's token counting
//! (`POST /v1/messages/count_tokens`, free by Anthropic's pricing, rate limited only). They pass
//! at $0 — attribution, policy and the ledger still apply — so `client.models.list()` works
//! through the proxy. Every other request to an LLM API is priced by the model it names; one
//! that names none is a [`MissingModel`] (the adapters answer 400 `missing_model`), never a
//! lookup of the empty model name.
//!
//! This module only classifies; it never decides or prices.

use std::fmt;

use crate::metering::Provider;

/// One free endpoint: method, path suffix and whether one `/{id}` segment follows it.
struct Free {
    provider: Provider,
    method: &'static str,
    suffix: &'static str,
    with_id: bool,
    name: &'static str,
}

const FREE: [Free; 5] = [
    Free {
        provider: Provider::OpenAi,
        method: "GET",
        suffix: "/v1/models",
        with_id: false,
        name: "GET /v1/models",
    },
    Free {
        provider: Provider::OpenAi,
        method: "GET",
        suffix: "/v1/models",
        with_id: true,
        name: "GET /v1/models/{id}",
    },
    Free {
        provider: Provider::Anthropic,
        method: "GET",
        suffix: "/v1/models",
        with_id: false,
        name: "GET /v1/models",
    },
    Free {
        provider: Provider::Anthropic,
        method: "GET",
        suffix: "/v1/models",
        with_id: true,
        name: "GET /v1/models/{id}",
    },
    Free {
        provider: Provider::Anthropic,
        method: "POST",
        suffix: "/v1/messages/count_tokens",
        with_id: false,
        name: "POST /v1/messages/count_tokens",
    },
];

/// The free endpoint `method path` addresses on `provider` (`None`: any provider, when the
/// adapter cannot tell), as `"GET /v1/models"`-style text. Like metered endpoints, any
/// base-path prefix (`/openai/v1/models`), one trailing `/`, a query and a fragment are ignored.
pub fn free_endpoint(provider: Option<Provider>, method: &str, path: &str) -> Option<&'static str> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    FREE.iter()
        .filter(|f| provider.is_none_or(|p| p == f.provider))
        .filter(|f| method.eq_ignore_ascii_case(f.method))
        .find(|f| {
            if f.with_id {
                path.rsplit_once('/').is_some_and(|(head, id)| {
                    head.ends_with(f.suffix) && !id.is_empty() && id != "models"
                })
            } else {
                path.ends_with(f.suffix)
            }
        })
        .map(|f| f.name)
}

/// What an LLM request is priced by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pricing<'a> {
    /// A free endpoint (its name): $0, nothing reserved.
    Free(&'static str),
    /// The model the request names.
    Model(&'a str),
}

/// An LLM request that is not to a free endpoint and names no model: nothing to price it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingModel {
    pub method: String,
    pub path: String,
}

impl fmt::Display for MissingModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} names no model: send the `model` field in the JSON body (only listing models, \
             reading a model and counting tokens are free without one)",
            self.method, self.path
        )
    }
}

impl std::error::Error for MissingModel {}

/// Classifies an LLM request: a free endpoint first (whatever its body says), else the model
/// it names (an empty name counts as none).
pub fn llm_pricing<'a>(
    provider: Option<Provider>,
    method: &str,
    path: &str,
    model: Option<&'a str>,
) -> Result<Pricing<'a>, MissingModel> {
    if let Some(name) = free_endpoint(provider, method, path) {
        return Ok(Pricing::Free(name));
    }
    match model {
        Some(m) if !m.is_empty() => Ok(Pricing::Model(m)),
        _ => Err(MissingModel {
            method: method.chars().take(16).collect(),
            path: path.split(['?', '#']).next().unwrap_or(path).chars().take(128).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI: Option<Provider> = Some(Provider::OpenAi);
    const ANTHROPIC: Option<Provider> = Some(Provider::Anthropic);

    #[test]
    fn model_listings_are_free_on_both_providers() {
        for provider in [OPENAI, ANTHROPIC, None] {
            for (method, path, name) in [
                ("GET", "/v1/models", "GET /v1/models"),
                ("GET", "/v1/models/", "GET /v1/models"),
                ("get", "/v1/models?limit=20&after_id=x", "GET /v1/models"),
                ("GET", "/openai/v1/models", "GET /v1/models"),
                ("GET", "/v1/models/gpt-4o", "GET /v1/models/{id}"),
                ("GET", "/v1/models/ft:gpt-4o-mini:org::abc", "GET /v1/models/{id}"),
                ("GET", "/v1/models/claude-sonnet-4-5?x=1", "GET /v1/models/{id}"),
            ] {
                assert_eq!(free_endpoint(provider, method, path), Some(name), "{method} {path}");
            }
        }
    }

    #[test]
    fn everything_else_is_not_free() {
        for (provider, method, path) in [
            (OPENAI, "DELETE", "/v1/models/ft:gpt-4o-mini:org::abc"),
            (OPENAI, "POST", "/v1/models"),
            (OPENAI, "GET", "/v1/models/gpt-4o/extra"),
            (OPENAI, "GET", "/v1/modelsx"),
            (OPENAI, "GET", "/v1/files"),
            (OPENAI, "POST", "/v1/chat/completions"),
            (OPENAI, "POST", "/v1/messages/count_tokens"),
            (ANTHROPIC, "POST", "/v1/messages"),
            (ANTHROPIC, "GET", "/v1/messages/count_tokens"),
        ] {
            assert_eq!(free_endpoint(provider, method, path), None, "{method} {path}");
        }
        assert_eq!(
            free_endpoint(ANTHROPIC, "POST", "/v1/messages/count_tokens"),
            Some("POST /v1/messages/count_tokens")
        );
    }

    #[test]
    fn a_priced_request_needs_a_model() {
        assert_eq!(
            llm_pricing(OPENAI, "POST", "/v1/chat/completions", Some("gpt-4o")),
            Ok(Pricing::Model("gpt-4o"))
        );
        assert_eq!(
            llm_pricing(ANTHROPIC, "POST", "/v1/messages/count_tokens", Some("claude-x")),
            Ok(Pricing::Free("POST /v1/messages/count_tokens"))
        );
        assert_eq!(
            llm_pricing(OPENAI, "GET", "/v1/models", None),
            Ok(Pricing::Free("GET /v1/models"))
        );
        for model in [None, Some("")] {
            let e = llm_pricing(OPENAI, "POST", "/v1/chat/completions?x=1", model).unwrap_err();
            assert_eq!(
                e.to_string(),
                "POST /v1/chat/completions names no model: send the `model` field in the JSON \
                 body (only listing models, reading a model and counting tokens are free without \
                 one)"
            );
        }
        let e = llm_pricing(OPENAI, "GET", "/v1/files", None).unwrap_err();
        assert!(e.to_string().starts_with("GET /v1/files names no model"), "{e}");
    }
}
