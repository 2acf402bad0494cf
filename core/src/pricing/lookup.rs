//! Model name lookup: turns the name a client sent into a listed model, without allocating.
//!
//! Real traffic rarely uses the card's exact names. In order, a name resolves by:
//! 1. exact match (`gpt-4o`, or a listed prefixed name such as LiteLLM's `azure/gpt-4o`);
//! 2. snapshot: the longest listed name that the request extends by a snapshot tag at a `-`
//!    boundary (`gpt-4o-2024-08-06`, `claude-sonnet-4-5-20250929`, `claude-3-7-sonnet-latest`);
//!    `gpt-4o-mini-2024-07-18` resolves to `gpt-4o-mini`, not `gpt-4o`;
//! 3. provider prefixes, stripped one segment at a time (`openai/gpt-4o`,
//!    `openrouter/anthropic/claude-sonnet-4-5`), each remainder tried as in 1 and 2. The
//!    segment just before the match must equal the model's `provider` when it has one, so that
//!    `azure/gpt-4o` is not silently priced at OpenAI's list price.
//!
//! A snapshot tag is `latest` or a run of all-digit segments starting with at least four digits
//! (`2024-08-06`, `20250929`, `0613`). Anything else is a different model, not a snapshot:
//! `gpt-5-pro`, `gpt-4o-realtime-preview` or `claude-sonnet-4-6` must not be priced as
//! `gpt-5`, `gpt-4o` or `claude-sonnet-4`, which would undercharge; they stay unknown, an
//! explicit outcome the card's unknown-model policy handles. Names are case-sensitive.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{ModelId, RateCard};

/// Name → position, with a deterministic hasher (no per-process random seed; the keys come
/// from configuration, not from requests, so hash flooding is not a concern).
pub(super) type Index = HashMap<Box<str>, u32, BuildHasherDefault<Fnv>>;

/// FNV-1a: fast for the short keys model names are.
#[derive(Clone, Copy, Debug)]
pub(super) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The id for the next entry of a list of `len`. A card of 4 billion entries cannot come from
/// a config file; saturating keeps this total.
pub(super) fn next_id(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl RateCard {
    /// The listed model `name` refers to, if any (see the module docs for the rules).
    pub fn resolve(&self, name: &str) -> Option<ModelId> {
        if let Some(id) = self.resolve_unprefixed(name) {
            return Some(id);
        }
        let mut rest = name;
        while let Some((provider, tail)) = rest.split_once('/') {
            if let Some(id) = self.resolve_unprefixed(tail) {
                let listed = self.models.get(id.0 as usize).and_then(|m| m.provider.as_deref());
                if listed.is_none_or(|p| p == provider) {
                    return Some(id);
                }
            }
            rest = tail;
        }
        None
    }

    fn resolve_unprefixed(&self, name: &str) -> Option<ModelId> {
        if let Some(&i) = self.model_index.get(name) {
            return Some(ModelId(i));
        }
        // Walk `-` boundaries from the right, so the longest listed prefix wins.
        let mut end = name.len();
        while let Some(dash) = name[..end].rfind('-') {
            let segment = &name[dash + 1..end];
            let tag = if end == name.len() && segment == "latest" {
                true
            } else if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
                segment.len() >= 4
            } else {
                return None;
            };
            if tag {
                if let Some(&i) = self.model_index.get(&name[..dash]) {
                    return Some(ModelId(i));
                }
            }
            end = dash;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::{Rate, Rates, UnknownModelPolicy};

    fn card() -> RateCard {
        let mut card = RateCard::new(UnknownModelPolicy::Deny);
        let rates = Rates::new(Rate::ZERO, Rate::ZERO);
        for (name, provider) in [
            ("gpt-4o", Some("openai")),
            ("gpt-4o-mini", Some("openai")),
            ("gpt-4o-2024-05-13", Some("openai")),
            ("claude-opus-4", Some("anthropic")),
            ("claude-opus-4-1", Some("anthropic")),
            ("claude-sonnet-4-5", Some("anthropic")),
            ("claude-3-7-sonnet", Some("anthropic")),
            ("o1", Some("openai")),
            ("azure/gpt-4o", Some("azure")),
            ("local-llama", None),
        ] {
            card.insert_model(name, provider, rates);
        }
        card
    }

    #[test]
    fn names_resolve_to_the_listed_model_they_mean() {
        let card = card();
        let cases = [
            ("gpt-4o", Some("gpt-4o")),
            ("gpt-4o-2024-08-06", Some("gpt-4o")),
            ("gpt-4o-2024-05-13", Some("gpt-4o-2024-05-13")),
            ("gpt-4o-mini", Some("gpt-4o-mini")),
            ("gpt-4o-mini-2024-07-18", Some("gpt-4o-mini")),
            ("openai/gpt-4o-mini-2024-07-18", Some("gpt-4o-mini")),
            ("openai/gpt-4o", Some("gpt-4o")),
            ("openrouter/openai/gpt-4o", Some("gpt-4o")),
            ("azure/gpt-4o", Some("azure/gpt-4o")),
            ("azure/gpt-4o-2024-08-06", Some("azure/gpt-4o")),
            ("claude-sonnet-4-5-20250929", Some("claude-sonnet-4-5")),
            ("anthropic/claude-sonnet-4-5-20250929", Some("claude-sonnet-4-5")),
            ("claude-opus-4-20250514", Some("claude-opus-4")),
            ("claude-opus-4-1-20250805", Some("claude-opus-4-1")),
            ("claude-opus-4-1", Some("claude-opus-4-1")),
            ("claude-3-7-sonnet-latest", Some("claude-3-7-sonnet")),
            ("o1-2024-12-17", Some("o1")),
            ("gpt-4o-0613", Some("gpt-4o")),
            ("acme/local-llama", Some("local-llama")),
            // Different models, not snapshots: unknown rather than mispriced.
            ("gpt-4o-realtime-preview", None),
            ("gpt-4o-audio-preview-2024-12-17", None),
            ("o1-mini", None),
            ("claude-sonnet-4-6", None),
            ("claude-opus-4-5", None),
            ("claude-opus-4-9-20260101", None),
            ("gpt-4o-24", None),
            ("gpt-4o-latest-2024", None),
            // A provider prefix must match the listed provider.
            ("anthropic/gpt-4o", None),
            ("bedrock/claude-sonnet-4-5", None),
            // Case-sensitive, and degenerate names.
            ("GPT-4o", None),
            ("", None),
            ("-", None),
            ("/", None),
            ("gpt-4o-", None),
            ("openai/", None),
            ("-2024", None),
        ];
        for (name, want) in cases {
            let got = card.resolve(name).and_then(|id| card.model(id)).map(|m| m.name.as_str());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn fnv_is_deterministic() {
        let mut a = Fnv::default();
        a.write(b"gpt-4o");
        let mut b = Fnv::default();
        b.write(b"gpt-4o");
        assert_eq!(a.finish(), b.finish());
        let mut c = Fnv::default();
        c.write(b"gpt-4o-mini");
        assert_ne!(a.finish(), c.finish());
    }
}
