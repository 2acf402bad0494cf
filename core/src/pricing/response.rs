//! Pricing a response: never silently free.
//!
//! A provider answers with the model that actually served the request, which can differ from
//! the one asked for (an alias resolved to a dated snapshot, a router, a misbehaving gateway).
//! When the card does not price the answered model, the response is still charged, by the
//! first of these that applies, and the ledger says which ([`PriceSource`]):
//!
//! 1. `listed`: the answered model is on the card (or the response named no model and the
//!    requested one is);
//! 2. `requested_model`: the requested model's listed rates;
//! 3. `fallback`: the card's `unknown_model: {fallback: ...}` rates;
//! 4. `reservation`: none of these: the amount reserved before sending (the worst case), which
//!    the caller must log loudly and count.

use serde::Serialize;

use super::{Cost, RateCard, UnknownModelPolicy};
use crate::usage::Usage;

/// Which rates a metered response was charged at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceSource {
    /// The model the response named (or, naming none, the requested one) is on the card.
    Listed,
    /// The answered model is not on the card: the requested model's rates.
    RequestedModel,
    /// Neither is on the card: the card's fallback rates.
    Fallback,
    /// Nothing on the card prices it: the worst case reserved before the request was sent.
    Reservation,
    /// A free endpoint (a model listing): nothing to price.
    Free,
}

impl PriceSource {
    pub const ALL: [PriceSource; 5] = [
        PriceSource::Listed,
        PriceSource::RequestedModel,
        PriceSource::Fallback,
        PriceSource::Reservation,
        PriceSource::Free,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PriceSource::Listed => "listed",
            PriceSource::RequestedModel => "requested_model",
            PriceSource::Fallback => "fallback",
            PriceSource::Reservation => "reservation",
            PriceSource::Free => "free",
        }
    }

    /// Parses [`PriceSource::as_str`]'s names.
    pub fn parse(text: &str) -> Option<PriceSource> {
        Some(match text {
            "listed" => PriceSource::Listed,
            "requested_model" => PriceSource::RequestedModel,
            "fallback" => PriceSource::Fallback,
            "reservation" => PriceSource::Reservation,
            "free" => PriceSource::Free,
            _ => return None,
        })
    }

    /// Priced by something other than the answered model's own listing: worth a warning and a
    /// count, and for [`PriceSource::Reservation`] an error.
    pub fn is_substitute(self) -> bool {
        matches!(
            self,
            PriceSource::RequestedModel | PriceSource::Fallback | PriceSource::Reservation
        )
    }
}

/// A response's cost and where its price came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResponsePrice {
    pub cost: Cost,
    pub source: PriceSource,
}

impl RateCard {
    /// The cost of a response with `usage` whose body named the model `answered` (`None`: it
    /// named none), for a request that asked for `requested` and reserved `reserved` (its worst
    /// case). See the module docs for the order; the result is never a silent $0 for a model
    /// the card does not know.
    pub fn price_response(
        &self,
        answered: Option<&str>,
        requested: Option<&str>,
        usage: Usage,
        reserved: Cost,
    ) -> ResponsePrice {
        let listed = |model: &str| self.resolve(model).and_then(|id| self.model(id));
        let priced =
            |m: &super::Model, source| ResponsePrice { cost: m.rates.price(usage), source };
        if let Some(m) = answered.or(requested).and_then(listed) {
            return priced(m, PriceSource::Listed);
        }
        if answered.is_some() {
            if let Some(m) = requested.and_then(listed) {
                return priced(m, PriceSource::RequestedModel);
            }
        }
        match &self.unknown_model {
            UnknownModelPolicy::Fallback(rates) => {
                ResponsePrice { cost: rates.price(usage), source: PriceSource::Fallback }
            }
            UnknownModelPolicy::Deny => {
                ResponsePrice { cost: reserved, source: PriceSource::Reservation }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::pricing::{Rate, Rates};

    fn card(fallback: bool) -> RateCard {
        let policy = if fallback {
            UnknownModelPolicy::Fallback(Rates::new(rate("10"), rate("30")))
        } else {
            UnknownModelPolicy::Deny
        };
        let mut card = RateCard::new(policy);
        card.insert_model("gpt-4o", Some("openai"), Rates::new(rate("2.50"), rate("10")));
        card.insert_model("gpt-4o-mini", Some("openai"), Rates::new(rate("0.15"), rate("0.60")));
        card
    }

    fn rate(text: &str) -> Rate {
        Rate::per_million(text).unwrap()
    }

    fn usd(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    const USAGE: Usage = Usage {
        input: 1_000_000,
        cached_input: 0,
        cache_write: 0,
        output: 1_000_000,
        reasoning: 0,
    };

    fn reserved() -> Cost {
        Cost::from_buckets(usd("7"), Money::ZERO, Money::ZERO, usd("9"), Money::ZERO, Money::ZERO)
    }

    fn price(
        card: &RateCard,
        answered: Option<&str>,
        requested: Option<&str>,
    ) -> (Money, &'static str) {
        let p = card.price_response(answered, requested, USAGE, reserved());
        (p.cost.total, p.source.as_str())
    }

    #[test]
    fn a_listed_answer_is_priced_at_its_own_rates() {
        let card = card(false);
        // The answer names a dated snapshot of a listed model: its listing, not the request's.
        assert_eq!(
            price(&card, Some("gpt-4o-2024-08-06"), Some("gpt-4o-mini")),
            (usd("12.5"), "listed")
        );
        // No model in the answer: the requested one, as listed.
        assert_eq!(price(&card, None, Some("gpt-4o-mini")), (usd("0.75"), "listed"));
    }

    #[test]
    fn an_unlisted_answer_is_priced_at_the_requested_model_then_the_fallback() {
        assert_eq!(
            price(&card(false), Some("mystery-1"), Some("gpt-4o")),
            (usd("12.5"), "requested_model")
        );
        assert_eq!(
            price(&card(true), Some("mystery-1"), Some("gpt-4o")),
            (usd("12.5"), "requested_model")
        );
        assert_eq!(
            price(&card(true), Some("mystery-1"), Some("also-unknown")),
            (usd("40"), "fallback")
        );
        assert_eq!(price(&card(true), Some("mystery-1"), None), (usd("40"), "fallback"));
        assert_eq!(price(&card(true), None, Some("also-unknown")), (usd("40"), "fallback"));
    }

    #[test]
    fn with_nothing_on_the_card_the_reservation_is_charged_never_zero() {
        let card = card(false);
        for (answered, requested) in
            [(Some("mystery-1"), Some("also-unknown")), (Some("mystery-1"), None), (None, None)]
        {
            let p = card.price_response(answered, requested, USAGE, reserved());
            assert_eq!((p.cost, p.source), (reserved(), PriceSource::Reservation));
            assert!(p.source.is_substitute());
        }
        assert!(!PriceSource::Listed.is_substitute());
    }

    #[test]
    fn names_round_trip() {
        for s in [
            PriceSource::Listed,
            PriceSource::RequestedModel,
            PriceSource::Fallback,
            PriceSource::Reservation,
            PriceSource::Free,
        ] {
            assert_eq!(PriceSource::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(PriceSource::parse("free-ish"), None);
    }
}
