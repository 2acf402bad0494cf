//! HTML output for the console: the one escaping function every value goes through, and the
//! page frame.

use std::fmt::{self, Display, Write};

/// `value` escaped for HTML text and quoted attribute values: `&`, `<`, `>`, `"` and `'`
/// become character references, everything else is kept. Written with `{}` in a format string,
/// so that no value reaches a page unescaped by accident.
pub struct Escaped<'a>(pub &'a str);

/// Shorthand for [`Escaped`].
pub fn esc(value: &str) -> Escaped<'_> {
    Escaped(value)
}

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#x27;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// A whole page: `title` (escaped here) and `body` (already HTML), with the console's style
/// sheet.
pub fn page(title: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 512);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Tollgate console</title>\
         <link rel=\"stylesheet\" href=\"/console/console.css\"></head>\n<body>\n{body}\n</body></html>\n",
        esc(title)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_markup_character_is_escaped_and_the_rest_kept() {
        assert_eq!(
            esc("<script>alert('x')</script>").to_string(),
            "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
        );
        assert_eq!(esc(r#"" onmouseover="x"#).to_string(), "&quot; onmouseover=&quot;x");
        assert_eq!(
            esc("a&amp;b").to_string(),
            "a&amp;amp;b",
            "already escaped text is escaped again"
        );
        assert_eq!(esc("bot-7 · é 🚀").to_string(), "bot-7 · é 🚀");
        assert_eq!(esc("").to_string(), "");
        assert_eq!(esc("<<>>").to_string(), "&lt;&lt;&gt;&gt;");
    }

    #[test]
    fn the_title_is_escaped_in_the_page() {
        let p = page("<b>", "<p>body</p>");
        assert!(p.contains("<title>&lt;b&gt; · Tollgate console</title>"), "{p}");
        assert!(p.contains("<p>body</p>"));
    }
}
