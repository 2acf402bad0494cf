//! The fallback estimate for responses whose usage never arrives.
//!
//! Decides how many tokens a piece of text is worth when the provider did not say:
//! `ceil(utf8_bytes / 4)`. Four bytes per token is the usual rule of thumb for English with
//! current BPE vocabularies; counting UTF-8 bytes rather than characters keeps the estimate
//! closer for scripts whose characters are several bytes and often a token each (CJK). Bytes are
//! summed over the whole response and divided once, so splitting text into many deltas does not
//! round up once per delta.
//!
//! Also home to the zero-allocation serde helpers the meters use to measure text inside a JSON
//! payload without keeping it. Never used when the provider reported usage.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::Api;

/// Estimated tokens for `bytes` bytes of UTF-8 text.
pub fn tokens_from_bytes(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// The UTF-8 length of a JSON string value; any other JSON value (null, number, object, ...)
/// measures 0. Reads the string without allocating when it has no escapes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TextLen(pub u64);

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<TextLen, E> {
                Ok(TextLen(s.len() as u64))
            }
            fn visit_bool<E>(self, _: bool) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_unit<E>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_none<E>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TextLen(0))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(TextLen(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// Something inside a JSON payload that carries output text.
pub(crate) trait TextBytes {
    fn text_bytes(&self) -> u64;
}

/// The summed [`TextBytes`] of a JSON array's elements, read one by one without collecting
/// them (a `Vec` per streamed chunk would be an allocation per chunk). `null` measures 0.
#[derive(Debug)]
pub(crate) struct SeqText<T>(pub u64, PhantomData<T>);

impl<T> Default for SeqText<T> {
    fn default() -> Self {
        SeqText(0, PhantomData)
    }
}

impl<'de, T: Deserialize<'de> + TextBytes> Deserialize<'de> for SeqText<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + TextBytes> Visitor<'de> for V<T> {
            type Value = SeqText<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(SeqText::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut sum = 0;
                while let Some(item) = seq.next_element::<T>()? {
                    sum = u64::saturating_add(sum, item.text_bytes());
                }
                Ok(SeqText(sum, PhantomData))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Output text bytes in a whole (non-streamed) response body that carried no usage, e.g. from
/// an OpenAI-compatible server that omits it. Only this rare fallback builds a `Value` tree.
pub(crate) fn body_text_bytes(api: Api, body: &Value) -> u64 {
    fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
        v.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }
    let str_len = |v: &Value| v.as_str().map_or(0, |s| s.len() as u64);
    match api {
        Api::ChatCompletions => items(body, "choices")
            .iter()
            .filter_map(|c| c.get("message"))
            .map(|m| {
                str_len(&m["content"])
                    + str_len(&m["refusal"])
                    + items(m, "tool_calls")
                        .iter()
                        .map(|t| {
                            str_len(&t["function"]["name"]) + str_len(&t["function"]["arguments"])
                        })
                        .sum::<u64>()
            })
            .sum(),
        Api::Completions => items(body, "choices").iter().map(|c| str_len(&c["text"])).sum(),
        Api::Responses => items(body, "output")
            .iter()
            .map(|o| {
                str_len(&o["arguments"])
                    + items(o, "content").iter().map(|c| str_len(&c["text"])).sum::<u64>()
            })
            .sum(),
        Api::Messages => items(body, "content")
            .iter()
            .map(|c| {
                str_len(&c["text"])
                    + str_len(&c["thinking"])
                    + c.get("input").map_or(0, |i| i.to_string().len() as u64)
            })
            .sum(),
        Api::Embeddings => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bytes_per_token_rounded_up() {
        let cases = [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (401, 101)];
        for (bytes, tokens) in cases {
            assert_eq!(tokens_from_bytes(bytes), tokens, "{bytes} bytes");
        }
    }

    #[test]
    fn text_len_measures_decoded_strings_only() {
        let cases = [
            (r#""hello""#, 5),
            (r#""a\nb""#, 3),
            (r#""\u4e2d""#, 3),
            ("null", 0),
            ("12", 0),
            (r#"{"a":"bbbb"}"#, 0),
            (r#"["cc"]"#, 0),
        ];
        for (json, len) in cases {
            assert_eq!(serde_json::from_str::<TextLen>(json).unwrap(), TextLen(len), "{json}");
        }
    }

    #[test]
    fn body_text_covers_each_api_shape() {
        let chat = serde_json::json!({"choices":[{"message":{"content":"abcd","tool_calls":
            [{"function":{"name":"f","arguments":"{\"x\":1}"}}]}}]});
        assert_eq!(body_text_bytes(Api::ChatCompletions, &chat), 4 + 1 + 7);
        let msg = serde_json::json!({"content":[{"type":"text","text":"hi"},
            {"type":"tool_use","input":{"q":"x"}}]});
        assert_eq!(body_text_bytes(Api::Messages, &msg), 2 + 9);
        let resp = serde_json::json!({"output":[{"content":[{"text":"abc"}]}]});
        assert_eq!(body_text_bytes(Api::Responses, &resp), 3);
    }
}
