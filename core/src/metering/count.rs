//! A token count as an upstream reports it, read so that no report can fail the parse or wrap.
//!
//! Decides the number behind one usage field. A provider writes a non-negative JSON integer;
//! anything else is read rather than rejected, because rejecting the field would drop the whole
//! usage object and fall back to an estimate that can be far below the truth. `null` is absent.
//! A float is rounded up (`12.5` → 13) and saturates at `u64::MAX` (`1e300` → `u64::MAX`); a
//! decimal string is read like the number it spells. A negative number, `NaN`, a string that is
//! not a number, `true`/`false`, an array or an object reads as `u64::MAX`: a count that makes
//! no sense is as untrustworthy as an absurdly large one, and [`crate::reservation::judge`]
//! marks the report implausible and bills the request's reservation instead.

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One usage field; `None` when absent or `null`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Count(pub Option<u64>);

impl Count {
    pub(crate) fn get(self) -> u64 {
        self.0.unwrap_or(0)
    }
}

/// A non-negative float rounded up, saturating; negative or `NaN` is nonsense (`u64::MAX`).
fn from_f64(v: f64) -> u64 {
    if v.is_nan() || v < 0.0 {
        u64::MAX
    } else {
        // `as` saturates: 1e300 and +inf become u64::MAX.
        v.ceil() as u64
    }
}

fn from_str(s: &str) -> u64 {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return n;
    }
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() || v == f64::INFINITY => from_f64(v),
        _ => u64::MAX,
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(Some(u64::try_from(v).unwrap_or(u64::MAX))))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Count, E> {
                Ok(Count(Some(u64::try_from(v).unwrap_or(u64::MAX))))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Count, E> {
                Ok(Count(Some(u64::try_from(v).unwrap_or(u64::MAX))))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Count, E> {
                Ok(Count(Some(from_f64(v))))
            }
            fn visit_str<E>(self, s: &str) -> Result<Count, E> {
                Ok(Count(Some(from_str(s))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(Some(u64::MAX)))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_none<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(Some(u64::MAX)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(Some(u64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Option<u64> {
        serde_json::from_str::<Count>(json).unwrap_or_else(|e| panic!("{json}: {e}")).0
    }

    #[test]
    fn every_json_value_reads_without_failing() {
        let cases = [
            ("12", Some(12)),
            ("0", Some(0)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", Some(u64::MAX)),
            ("1e300", Some(u64::MAX)),
            ("12.5", Some(13)),
            ("12.0", Some(12)),
            ("-1", Some(u64::MAX)),
            ("-0.5", Some(u64::MAX)),
            ("\"42\"", Some(42)),
            ("\" 7 \"", Some(7)),
            ("\"1e3\"", Some(1000)),
            ("\"lots\"", Some(u64::MAX)),
            ("\"NaN\"", Some(u64::MAX)),
            ("\"-3\"", Some(u64::MAX)),
            ("true", Some(u64::MAX)),
            ("[1]", Some(u64::MAX)),
            ("{\"a\":1}", Some(u64::MAX)),
            ("null", None),
        ];
        for (json, want) in cases {
            assert_eq!(read(json), want, "{json}");
        }
    }
}
