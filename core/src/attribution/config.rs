//! Decoding the `attribution:` section.
//!
//! ```yaml
//! attribution:
//!   headers:                      # overrides per attribute; unlisted attributes keep defaults
//!     - {attribute: agent, name: x-agent-id, pattern: "^[a-z0-9-]+$", required: true}
//!     - {attribute: tier, required: true}
//!   pinned:                       # header -> fixed value (the sidecar's own identity)
//!     x-agent-id: billing-bot
//! ```
//!
//! Reports every error with its path and line: unknown attributes or fields, a header name that
//! is not a valid HTTP token, an invalid regex, two attributes on one header, the same attribute
//! twice, and pinned values for unknown headers or not matching their pattern.

use super::{Attribute, Attribution, Header};
use crate::doc::{Cx, Field};

const SECTION_FIELDS: [&str; 2] = ["headers", "pinned"];
const HEADER_FIELDS: [&str; 4] = ["attribute", "name", "pattern", "required"];

pub(super) fn decode(cx: &mut Cx, field: &Field<'_>) -> Option<Attribution> {
    let mut attribution = Attribution::default();
    let mut obj = cx.object(field)?;
    let mut configured: [Option<u32>; 6] = [None; 6];
    for item in obj.get("headers").map(|f| f.items(cx)).unwrap_or_default() {
        let Some((attribute, header)) = header(cx, &item) else { continue };
        let slot = attribute as usize;
        if let Some(line) = configured[slot] {
            item.error(
                cx,
                format!("attribute `{}` is already configured on line {line}", attribute.as_str()),
            );
            continue;
        }
        configured[slot] = Some(item.node.line);
        attribution.headers[slot] = header;
    }
    for (i, h) in attribution.headers.iter().enumerate() {
        let clash = attribution.headers[..i].iter().position(|o| o.name == h.name);
        if let Some(j) = clash {
            field.error(
                cx,
                format!(
                    "header `{}` is used for both `{}` and `{}`",
                    h.name,
                    Attribute::ALL[j].as_str(),
                    Attribute::ALL[i].as_str()
                ),
            );
        }
    }
    if let Some(pinned) = obj.get("pinned") {
        for (name, value_field) in pinned.entries(cx) {
            let Some(value) = value_field.non_empty_str(cx) else { continue };
            if let Err(e) = attribution.pin(name, value) {
                value_field.error(cx, e.to_string());
            }
        }
    }
    obj.finish(cx, &SECTION_FIELDS);
    Some(attribution)
}

fn header(cx: &mut Cx, field: &Field<'_>) -> Option<(Attribute, Header)> {
    let mut obj = cx.object(field)?;
    let attribute = obj.require(cx, "attribute").and_then(|f| f.one_of(cx, &Attribute::NAMES));
    let attribute = attribute.and_then(Attribute::parse);
    let name = obj.get("name").and_then(|f| {
        let name = f.non_empty_str(cx)?;
        if !name.bytes().all(is_token_byte) {
            f.error(cx, format!("`{name}` is not a valid HTTP header name"));
            return None;
        }
        Some(name)
    });
    let pattern_field = obj.get("pattern");
    let pattern = pattern_field.as_ref().and_then(|f| f.non_empty_str(cx));
    let required = obj.get("required").and_then(|f| f.bool(cx));
    obj.finish(cx, &HEADER_FIELDS);
    let attribute = attribute?;
    let (default_name, default_pattern, default_required) = attribute.default_spec();
    let built = Header::new(
        name.unwrap_or(default_name),
        pattern.unwrap_or(default_pattern),
        required.unwrap_or(default_required),
    );
    match built {
        Ok(h) => Some((attribute, h)),
        Err(e) => {
            let f = pattern_field.unwrap_or_else(|| field.clone());
            let first = e.to_string();
            let first = first.lines().last().unwrap_or("invalid pattern").trim().to_string();
            f.error(cx, format!("invalid regular expression: {first}"));
            None
        }
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
