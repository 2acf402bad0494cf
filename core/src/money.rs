//! Exact money: an integer count of nano-US-dollars.
//!
//! Prices are written as decimals in config (`"3.00"`, `"0.0375"`) and parsed here without ever
//! touching floating point. All accounting (reservations, settlements, ledger, invoices) adds and
//! subtracts `Money` values, so sums are exact. This module never rounds silently: a value with
//! more than nine decimals is an error, and the only rounding in the crate is the documented
//! round-up in [`Money::from_scaled_ceil`] used by pricing ("never undercharge").

use std::fmt;
use std::ops::{Add, AddAssign, Sub, SubAssign};

/// Nano-USD per USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// An exact amount of US dollars, stored as nano-USD (10⁻⁹ USD).
///
/// The range of `i64` (±9.2 billion USD) is far beyond any budget; arithmetic saturates rather
/// than wrapping so that a corrupt input can never turn a huge charge into a credit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Why a decimal string is not a valid amount of money.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("empty amount")]
    Empty,
    #[error("`{0}` is not a decimal number (expected e.g. \"3.00\" or \"0.0375\")")]
    NotDecimal(String),
    #[error("`{0}` has more than 9 decimal places (the smallest unit is 0.000000001 USD)")]
    TooPrecise(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
}

impl Money {
    pub const ZERO: Money = Money(0);
    pub const MAX: Money = Money(i64::MAX);

    /// An amount from nano-USD.
    pub const fn from_nanos(nanos: i64) -> Self {
        Money(nanos)
    }

    /// An amount from whole dollars.
    pub const fn from_usd(usd: i64) -> Self {
        Money(usd.saturating_mul(NANOS_PER_USD))
    }

    /// The amount in nano-USD.
    pub const fn nanos(self) -> i64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses a decimal USD amount: `"3"`, `"3.00"`, `"0.000000125"`, `"-1.5"`, optionally with a
    /// leading `$`. Scientific notation (`"3e-06"`) is accepted too, because rate cards such as
    /// LiteLLM's write per-token prices that way; it is converted exactly, never through `f64`.
    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        parse_scaled(text, 9).map(Money)
    }

    /// `numerator / denominator` nano-USD, rounded up to the next nano-USD (away from zero for
    /// positive values). Pricing uses this so that a charge is never understated.
    pub fn from_scaled_ceil(numerator: u128, denominator: u128) -> Self {
        debug_assert!(denominator > 0);
        let q = numerator.div_ceil(denominator.max(1));
        Money(i64::try_from(q).unwrap_or(i64::MAX))
    }

    pub fn saturating_mul(self, n: u64) -> Self {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        Money(self.0.saturating_mul(n))
    }

    pub fn min(self, other: Money) -> Money {
        if self <= other {
            self
        } else {
            other
        }
    }

    pub fn max(self, other: Money) -> Money {
        if self >= other {
            self
        } else {
            other
        }
    }

    /// This amount as a fraction of `total` in basis points (1/100 %), rounded down; used for
    /// budget utilisation thresholds without floating point. A zero total counts as fully used.
    pub fn basis_points_of(self, total: Money) -> u64 {
        if total.0 <= 0 {
            return if self.0 > 0 { u64::MAX } else { 0 };
        }
        let used = self.0.max(0) as u128;
        u64::try_from(used * 10_000 / total.0 as u128).unwrap_or(u64::MAX)
    }
}

/// Parses a decimal (optionally signed, optionally with `$`, optionally in `e` notation) into an
/// integer scaled by `10^scale`. Exact: fails rather than rounds.
pub(crate) fn parse_scaled(text: &str, scale: u32) -> Result<i64, MoneyError> {
    let t = text.trim();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let t = t.strip_prefix('$').unwrap_or(t);
    if t.is_empty() {
        return Err(MoneyError::Empty);
    }
    let bad = || MoneyError::NotDecimal(text.to_string());
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => {
            let exp: i32 = t[i + 1..].parse().map_err(|_| bad())?;
            (&t[..i], exp)
        }
        None => (t, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // The digits as one integer, and the power of ten it must be multiplied by.
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let mut shift = i64::from(exponent) - frac_part.len() as i64 + i64::from(scale);
    let mut digits = digits.to_string();
    while shift < 0 {
        match digits.pop() {
            Some('0') => shift += 1,
            Some(_) => return Err(MoneyError::TooPrecise(text.to_string())),
            None => {
                shift = 0;
            }
        }
    }
    if digits.is_empty() {
        return Ok(0);
    }
    if digits.len() as i64 + shift > 19 {
        return Err(MoneyError::TooLarge(text.to_string()));
    }
    let mut value: i128 = digits.parse().map_err(|_| bad())?;
    for _ in 0..shift {
        value *= 10;
    }
    let value = if negative { -value } else { value };
    i64::try_from(value).map_err(|_| MoneyError::TooLarge(text.to_string()))
}

impl fmt::Display for Money {
    /// `$`-less decimal with at least two places: `3.00`, `0.000375`, `-1.50`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / NANOS_PER_USD as u64;
        let frac = abs % NANOS_PER_USD as u64;
        let mut frac = format!("{frac:09}");
        while frac.len() > 2 && frac.ends_with('0') {
            frac.pop();
        }
        write!(f, "{sign}{whole}.{frac}")
    }
}

impl Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Money {
    fn add_assign(&mut self, rhs: Money) {
        *self = *self + rhs;
    }
}

impl Sub for Money {
    type Output = Money;
    fn sub(self, rhs: Money) -> Money {
        Money(self.0.saturating_sub(rhs.0))
    }
}

impl SubAssign for Money {
    fn sub_assign(&mut self, rhs: Money) {
        *self = *self - rhs;
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, |a, b| a + b)
    }
}

impl serde::Serialize for Money {
    /// Serialized as a decimal string (`"0.000375"`) so that JSON consumers never see a float.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Money::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimals_exactly() {
        let cases = [
            ("3", 3_000_000_000),
            ("3.00", 3_000_000_000),
            ("$1.5", 1_500_000_000),
            ("0.000000001", 1),
            ("0.0375", 37_500_000),
            ("-2.25", -2_250_000_000),
            ("3e-06", 3_000),
            ("1.25E-7", 125),
            ("1.5e3", 1_500_000_000_000),
            (".5", 500_000_000),
            ("0.10000000000", 100_000_000),
        ];
        for (text, nanos) in cases {
            assert_eq!(Money::parse(text), Ok(Money::from_nanos(nanos)), "{text}");
        }
    }

    #[test]
    fn rejects_what_it_cannot_represent() {
        assert!(matches!(Money::parse(""), Err(MoneyError::Empty)));
        assert!(matches!(Money::parse("abc"), Err(MoneyError::NotDecimal(_))));
        assert!(matches!(Money::parse("1.2.3"), Err(MoneyError::NotDecimal(_))));
        assert!(matches!(Money::parse("0.0000000001"), Err(MoneyError::TooPrecise(_))));
        assert!(matches!(Money::parse("1e30"), Err(MoneyError::TooLarge(_))));
    }

    #[test]
    fn displays_with_at_least_two_places() {
        assert_eq!(Money::from_nanos(3_000_000_000).to_string(), "3.00");
        assert_eq!(Money::from_nanos(375_000).to_string(), "0.000375");
        assert_eq!(Money::from_nanos(-1_500_000_000).to_string(), "-1.50");
        assert_eq!(Money::from_nanos(1).to_string(), "0.000000001");
    }

    #[test]
    fn ceil_division_never_undercharges() {
        assert_eq!(Money::from_scaled_ceil(10, 3).nanos(), 4);
        assert_eq!(Money::from_scaled_ceil(9, 3).nanos(), 3);
        assert_eq!(Money::from_scaled_ceil(0, 3).nanos(), 0);
    }

    #[test]
    fn basis_points() {
        let total = Money::from_usd(100);
        assert_eq!(Money::from_usd(80).basis_points_of(total), 8_000);
        assert_eq!(Money::from_usd(101).basis_points_of(total), 10_100);
        assert_eq!(Money::ZERO.basis_points_of(Money::ZERO), 0);
    }

    proptest::proptest! {
        #[test]
        fn display_then_parse_round_trips(n in proptest::num::i64::ANY) {
            let m = Money::from_nanos(n);
            proptest::prop_assert_eq!(Money::parse(&m.to_string()), Ok(m));
        }
    }
}
