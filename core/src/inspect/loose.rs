//! Lenient, allocation-light readers for request fields.
//!
//! [`Loose`] reads a field of the expected JSON type and treats any other type as absent.
//! [`Prompt`] measures a prompt field (any JSON shape) for the input estimate without building
//! it: it sums the bytes of keys and strings, counts numbers as one token each, and counts inline
//! attachments separately so base64 payloads are not mistaken for text.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// A field value of type `T`, or `None` when absent, `null` or of another JSON type.
#[derive(Debug, Default)]
pub(crate) struct Loose<T>(pub Option<T>);

/// The JSON types a [`Loose`] field accepts.
pub(crate) trait Scalar<'de>: Sized {
    fn from_str(_: &str) -> Option<Self> {
        None
    }
    fn from_borrowed(s: &'de str) -> Option<Self> {
        Self::from_str(s)
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
}

impl<'de: 'a, 'a> Scalar<'de> for Cow<'a, str> {
    fn from_str(s: &str) -> Option<Self> {
        Some(Cow::Owned(s.to_owned()))
    }
    fn from_borrowed(s: &'de str) -> Option<Self> {
        Some(Cow::Borrowed(s))
    }
}

impl Scalar<'_> for String {
    fn from_str(s: &str) -> Option<Self> {
        Some(s.to_owned())
    }
}

impl Scalar<'_> for u64 {
    fn from_u64(v: u64) -> Option<Self> {
        Some(v)
    }
}

impl Scalar<'_> for bool {
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

impl<'de, T: Scalar<'de>> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Scalar<'de>> Visitor<'de> for V<T> {
            type Value = Loose<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Loose(T::from_borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Loose(T::from_str(s)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Loose(T::from_u64(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Loose(u64::try_from(v).ok().and_then(T::from_u64)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Loose(T::from_bool(v)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Keys whose long string values are base64 payloads (Anthropic `source.data`, OpenAI
/// `input_audio.data`, `file.file_data`).
const BINARY_KEYS: [&str; 2] = ["data", "file_data"];

/// Strings shorter than this are text even under a binary key or with a `data:` prefix.
const MIN_ATTACHMENT: usize = 64;

/// Bytes a number counts for: one token.
const NUMBER_BYTES: u64 = 4;

/// The measure of one prompt field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Prompt {
    pub present: bool,
    /// Bytes of keys and string values (and [`NUMBER_BYTES`] per number).
    pub bytes: u64,
    /// Inline attachments: `data:` URLs and long values under a binary key.
    pub attachments: u64,
}

impl Prompt {
    fn add(&mut self, o: Prompt) {
        self.bytes += o.bytes;
        self.attachments += o.attachments;
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut p = Walk { binary: false }.deserialize(d)?;
        p.present = true;
        Ok(p)
    }
}

/// Measures one value; `binary` when it sits under a binary key.
#[derive(Clone, Copy)]
struct Walk {
    binary: bool,
}

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = Prompt;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Prompt, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = Prompt;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<Prompt, E> {
        let attachment = s.len() >= MIN_ATTACHMENT && (self.binary || s.starts_with("data:"));
        Ok(if attachment {
            Prompt { attachments: 1, ..Prompt::default() }
        } else {
            Prompt { bytes: s.len() as u64, ..Prompt::default() }
        })
    }
    fn visit_u64<E>(self, _: u64) -> Result<Prompt, E> {
        Ok(Prompt { bytes: NUMBER_BYTES, ..Prompt::default() })
    }
    fn visit_i64<E>(self, _: i64) -> Result<Prompt, E> {
        Ok(Prompt { bytes: NUMBER_BYTES, ..Prompt::default() })
    }
    fn visit_f64<E>(self, _: f64) -> Result<Prompt, E> {
        Ok(Prompt { bytes: NUMBER_BYTES, ..Prompt::default() })
    }
    fn visit_bool<E>(self, _: bool) -> Result<Prompt, E> {
        Ok(Prompt::default())
    }
    fn visit_unit<E>(self) -> Result<Prompt, E> {
        Ok(Prompt::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let mut p = Prompt::default();
        while let Some(item) = seq.next_element_seed(Walk { binary: false })? {
            p.add(item);
        }
        Ok(p)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Prompt, A::Error> {
        let mut p = Prompt::default();
        while let Some(key) = map.next_key_seed(Key)? {
            p.bytes += key.len;
            p.add(map.next_value_seed(Walk { binary: key.binary })?);
        }
        Ok(p)
    }
}

/// A map key's length and whether it names a binary payload, read without allocating.
struct Key;

struct KeyInfo {
    len: u64,
    binary: bool,
}

impl<'de> DeserializeSeed<'de> for Key {
    type Value = KeyInfo;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<KeyInfo, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key {
    type Value = KeyInfo;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, s: &str) -> Result<KeyInfo, E> {
        Ok(KeyInfo { len: s.len() as u64, binary: BINARY_KEYS.contains(&s) })
    }
}
