//! Lenient, allocation-light readers for request fields.
//!
//! [`Loose`] reads a field of the expected JSON type and treats any other type as absent.
//! [`Prompt`] measures a prompt field (any JSON shape) for the input estimate without building
//! it: it sums the bytes of keys and strings, counts numbers as one token each, and counts inline
//! attachments separately so base64 payloads are not mistaken for text.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// What the `type` field of a JSON object says the object is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Tag {
    /// No `type` field.
    #[default]
    Untyped,
    /// An image content part: OpenAI `image_url` / `input_image`, Anthropic `image`.
    Image,
    /// A file content part: OpenAI `file` / `input_file`, Anthropic `document`.
    File,
    /// A tool the client runs itself: `function`, `custom`, Anthropic's `bash_*`,
    /// `text_editor_*`, `computer_*`, `memory_*`, OpenAI's `computer_use*`, `local_shell`.
    ClientTool,
    /// Any other `type` value (`text`, `object`, `web_search`, ...).
    Other,
}

impl Tag {
    fn of(s: &str) -> Tag {
        match s {
            "image_url" | "input_image" | "image" => Tag::Image,
            "file" | "input_file" | "document" => Tag::File,
            "function" | "custom" | "local_shell" | "shell" | "apply_patch" => Tag::ClientTool,
            _ if ["bash_", "text_editor_", "computer_", "memory_"]
                .iter()
                .any(|p| s.starts_with(p)) =>
            {
                Tag::ClientTool
            }
            _ => Tag::Other,
        }
    }
}

/// The measure of one prompt field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Prompt {
    pub present: bool,
    /// Bytes of keys and string values (and [`NUMBER_BYTES`] per number).
    pub bytes: u64,
    /// Inline attachments: `data:` URLs and long values under a binary key.
    pub attachments: u64,
    /// Image content parts (typed objects, and `data:image/` URLs outside one).
    pub images: u64,
    /// File content parts (typed objects, and other `data:` URLs outside one).
    pub files: u64,
    /// Bytes of attachment strings inside those images and files: their tokens are bounded per
    /// item, not per byte.
    pub item_bytes: u64,
    /// The value is a JSON object (a stored prompt reference, for `prompt`).
    pub is_map: bool,
    /// This object's own `type` (not propagated to enclosing values).
    pub tag: Tag,
    /// `data:image/` URLs not yet inside a typed object, and their bytes.
    open_images: u64,
    open_image_bytes: u64,
    /// Other `data:` URLs not yet inside a typed object, and their bytes.
    open_files: u64,
    open_file_bytes: u64,
    /// Long strings under a binary key not yet inside a typed object (e.g. `input_audio.data`):
    /// inside an image or file they belong to it; otherwise they stay text.
    open_raw_bytes: u64,
}

impl Prompt {
    fn add(&mut self, o: Prompt) {
        let sum = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        sum(&mut self.bytes, o.bytes);
        sum(&mut self.attachments, o.attachments);
        sum(&mut self.images, o.images);
        sum(&mut self.files, o.files);
        sum(&mut self.item_bytes, o.item_bytes);
        sum(&mut self.open_images, o.open_images);
        sum(&mut self.open_image_bytes, o.open_image_bytes);
        sum(&mut self.open_files, o.open_files);
        sum(&mut self.open_file_bytes, o.open_file_bytes);
        sum(&mut self.open_raw_bytes, o.open_raw_bytes);
    }

    /// An image or file object takes the attachment strings inside it as its own.
    fn claim(&mut self) {
        let bytes = self
            .open_image_bytes
            .saturating_add(self.open_file_bytes)
            .saturating_add(self.open_raw_bytes);
        self.item_bytes = self.item_bytes.saturating_add(bytes);
        match self.tag {
            Tag::Image => self.images = self.images.saturating_add(1),
            _ => self.files = self.files.saturating_add(1),
        }
        (self.open_images, self.open_image_bytes, self.open_files, self.open_file_bytes) =
            (0, 0, 0, 0);
        self.open_raw_bytes = 0;
    }

    /// At the top of a field: `data:` URLs outside any typed object are items of their own.
    pub(crate) fn close(&mut self) {
        self.images = self.images.saturating_add(self.open_images);
        self.files = self.files.saturating_add(self.open_files);
        let bytes = self.open_image_bytes.saturating_add(self.open_file_bytes);
        self.item_bytes = self.item_bytes.saturating_add(bytes);
        (self.open_images, self.open_image_bytes, self.open_files, self.open_file_bytes) =
            (0, 0, 0, 0);
        self.open_raw_bytes = 0;
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut p = Walk { key: KeyKind::Other }.deserialize(d)?;
        p.present = true;
        p.close();
        Ok(p)
    }
}

/// The `tools` field: measured like a prompt, and whether any tool runs on the provider's side
/// (web search, file search, code execution, remote MCP...), whose results are input tokens
/// the request body does not bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tools {
    pub prompt: Prompt,
    pub server_side: bool,
}

impl<'de> Deserialize<'de> for Tools {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tools;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tools, A::Error> {
                let mut t = Tools::default();
                while let Some(item) = seq.next_element_seed(Walk { key: KeyKind::Other })? {
                    t.server_side |=
                        item.is_map && !matches!(item.tag, Tag::Untyped | Tag::ClientTool);
                    t.prompt.add(item);
                }
                Ok(t)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Tools, A::Error> {
                Ok(Tools {
                    prompt: Walk { key: KeyKind::Other }.visit_map(map)?,
                    server_side: false,
                })
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Tools, E> {
                let prompt = Walk { key: KeyKind::Other }.visit_str(s)?;
                Ok(Tools { prompt, server_side: false })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Tools, E> {
                let prompt = Prompt { bytes: NUMBER_BYTES, ..Prompt::default() };
                Ok(Tools { prompt, server_side: false })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tools, E> {
                self.visit_u64(v.unsigned_abs())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Tools, E> {
                self.visit_u64(0)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Tools, E> {
                Ok(Tools::default())
            }
            fn visit_unit<E>(self) -> Result<Tools, E> {
                Ok(Tools::default())
            }
        }
        let mut t = d.deserialize_any(V)?;
        t.prompt.present = true;
        t.prompt.close();
        Ok(t)
    }
}

/// What the key a value sits under says about it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Other,
    /// A key whose long string values are base64 payloads.
    Binary,
    /// `type`.
    Type,
}

/// Measures one value, knowing the kind of key it sits under.
#[derive(Clone, Copy)]
struct Walk {
    key: KeyKind,
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
        let binary = self.key == KeyKind::Binary;
        let len = s.len() as u64;
        let attachment = s.len() >= MIN_ATTACHMENT && (binary || s.starts_with("data:"));
        Ok(if attachment {
            let mut p = Prompt { attachments: 1, ..Prompt::default() };
            if s.starts_with("data:image/") {
                (p.open_images, p.open_image_bytes) = (1, len);
            } else if s.starts_with("data:") {
                (p.open_files, p.open_file_bytes) = (1, len);
            } else {
                p.open_raw_bytes = len;
            }
            p
        } else {
            let tag = if self.key == KeyKind::Type { Tag::of(s) } else { Tag::Untyped };
            Prompt { bytes: len, tag, ..Prompt::default() }
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
        while let Some(item) = seq.next_element_seed(Walk { key: KeyKind::Other })? {
            p.add(item);
        }
        Ok(p)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Prompt, A::Error> {
        let mut p = Prompt { is_map: true, ..Prompt::default() };
        let mut tag = Tag::Untyped;
        while let Some(key) = map.next_key_seed(Key)? {
            p.bytes = p.bytes.saturating_add(key.len);
            let value = map.next_value_seed(Walk { key: key.kind })?;
            if key.kind == KeyKind::Type {
                tag = value.tag;
            }
            p.add(value);
        }
        p.tag = tag;
        if matches!(tag, Tag::Image | Tag::File) {
            p.claim();
        }
        Ok(p)
    }
}

/// A map key's length and whether it names a binary payload, read without allocating.
struct Key;

struct KeyInfo {
    len: u64,
    kind: KeyKind,
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
        let kind = if BINARY_KEYS.contains(&s) {
            KeyKind::Binary
        } else if s == "type" {
            KeyKind::Type
        } else {
            KeyKind::Other
        };
        Ok(KeyInfo { len: s.len() as u64, kind })
    }
}
