//! Shell-style glob patterns for policy match values (`gpt-4*`, `search_*`, `*.openai.com`).
//!
//! Decides whether one string matches one pattern: `*` is any run of characters (including
//! `/` and the empty run), `?` is exactly one character, `[a-z]` / `[!0-9]` are character
//! classes, and `\` escapes the next character. There is no `**`, no alternation and no regex:
//! matching is a single pass with one backtrack point, linear in practice and never allocating.
//! Patterns are validated once at load time; this module never sees a request it cannot match.

use std::fmt;

/// A compiled glob pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    text: Box<str>,
    shape: Shape,
}

/// Common shapes get a direct comparison instead of the general matcher.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// No wildcard at all (after unescaping).
    Literal(Box<str>),
    /// `abc*`.
    Prefix(Box<str>),
    /// `*abc`.
    Suffix(Box<str>),
    General(Box<[Token]>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Char(char),
    AnyOne,
    Star,
    Class { negated: bool, ranges: Box<[(char, char)]> },
}

/// Why a pattern is not a valid glob.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("empty pattern")]
    Empty,
    #[error("unclosed `[` at character {at}")]
    UnclosedClass { at: usize },
    #[error("empty character class at character {at}")]
    EmptyClass { at: usize },
    #[error("inverted range `{from}-{to}` in character class")]
    InvertedRange { from: char, to: char },
    #[error("pattern ends with a lone `\\`")]
    TrailingEscape,
}

impl Glob {
    /// Whether `text` contains glob syntax (`*`, `?`, `[` or `\`); plain values are compared
    /// exactly and can be indexed.
    pub fn is_pattern(text: &str) -> bool {
        text.contains(['*', '?', '[', '\\'])
    }

    /// Compiles a pattern, rejecting empty patterns and malformed classes or escapes.
    pub fn parse(text: &str) -> Result<Glob, GlobError> {
        if text.is_empty() {
            return Err(GlobError::Empty);
        }
        let tokens = tokenize(text)?;
        Ok(Glob { text: text.into(), shape: shape_of(tokens) })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `s` matches the whole pattern (case-sensitive).
    pub fn matches(&self, s: &str) -> bool {
        self.matches_with(s, false)
    }

    /// Whether `s` matches, ignoring ASCII case when `fold_case` (host names, methods).
    pub fn matches_with(&self, s: &str, fold_case: bool) -> bool {
        let eq = |a: &[u8], b: &[u8]| if fold_case { a.eq_ignore_ascii_case(b) } else { a == b };
        match &self.shape {
            Shape::Literal(lit) => eq(s.as_bytes(), lit.as_bytes()),
            Shape::Prefix(p) => s.len() >= p.len() && eq(&s.as_bytes()[..p.len()], p.as_bytes()),
            Shape::Suffix(p) => {
                s.len() >= p.len() && eq(&s.as_bytes()[s.len() - p.len()..], p.as_bytes())
            }
            Shape::General(tokens) => match_tokens(tokens, s, fold_case),
        }
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, GlobError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => {
                // `**` means the same as `*`; keep one so backtracking stays linear.
                if tokens.last() != Some(&Token::Star) {
                    tokens.push(Token::Star);
                }
            }
            '?' => tokens.push(Token::AnyOne),
            '\\' => {
                i += 1;
                let c = *chars.get(i).ok_or(GlobError::TrailingEscape)?;
                tokens.push(Token::Char(c));
            }
            '[' => {
                let (token, next) = class(&chars, i)?;
                tokens.push(token);
                i = next;
                continue;
            }
            c => tokens.push(Token::Char(c)),
        }
        i += 1;
    }
    Ok(tokens)
}

/// Parses the class starting at `chars[start] == '['`; returns it and the index after `]`.
fn class(chars: &[char], start: usize) -> Result<(Token, usize), GlobError> {
    let mut i = start + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        let c = *chars.get(i).ok_or(GlobError::UnclosedClass { at: start + 1 })?;
        if c == ']' {
            break;
        }
        let from = if c == '\\' {
            i += 1;
            *chars.get(i).ok_or(GlobError::TrailingEscape)?
        } else {
            c
        };
        i += 1;
        let to = if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']') {
            let to = chars[i + 1];
            i += 2;
            if to < from {
                return Err(GlobError::InvertedRange { from, to });
            }
            to
        } else {
            from
        };
        ranges.push((from, to));
    }
    if ranges.is_empty() {
        return Err(GlobError::EmptyClass { at: start + 1 });
    }
    Ok((Token::Class { negated, ranges: ranges.into() }, i + 1))
}

fn literal(tokens: &[Token]) -> Option<String> {
    tokens
        .iter()
        .map(|t| match t {
            Token::Char(c) => Some(*c),
            _ => None,
        })
        .collect()
}

fn shape_of(tokens: Vec<Token>) -> Shape {
    if let Some(lit) = literal(&tokens) {
        return Shape::Literal(lit.into());
    }
    if let [rest @ .., Token::Star] = tokens.as_slice() {
        if let Some(lit) = literal(rest) {
            return Shape::Prefix(lit.into());
        }
    }
    if let [Token::Star, rest @ ..] = tokens.as_slice() {
        if let Some(lit) = literal(rest) {
            return Shape::Suffix(lit.into());
        }
    }
    Shape::General(tokens.into())
}

fn char_matches(token: &Token, c: char, fold_case: bool) -> bool {
    match token {
        Token::Char(t) => *t == c || (fold_case && t.eq_ignore_ascii_case(&c)),
        Token::AnyOne => true,
        Token::Star => false,
        Token::Class { negated, ranges } => {
            let hit = |c: char| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi);
            let found = hit(c)
                || (fold_case && (hit(c.to_ascii_lowercase()) || hit(c.to_ascii_uppercase())));
            found != *negated
        }
    }
}

/// Classic wildcard matching with a single backtrack point: on a mismatch, the most recent `*`
/// absorbs one more character. One star suffices because a later star can always absorb what
/// an earlier one would have.
fn match_tokens(tokens: &[Token], s: &str, fold_case: bool) -> bool {
    let (mut t, mut i) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    loop {
        let next = s[i..].chars().next();
        match tokens.get(t) {
            Some(Token::Star) => {
                backtrack = Some((t, i));
                t += 1;
                continue;
            }
            Some(token) => {
                if let Some(c) = next {
                    if char_matches(token, c, fold_case) {
                        t += 1;
                        i += c.len_utf8();
                        continue;
                    }
                }
            }
            None if next.is_none() => return true,
            None => {}
        }
        let Some((star, from)) = backtrack else { return false };
        let Some(c) = s[from..].chars().next() else { return false };
        let from = from + c.len_utf8();
        backtrack = Some((star, from));
        t = star + 1;
        i = from;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("gpt-4*", "gpt-4", true),
            ("gpt-4*", "gpt-4o-mini", true),
            ("gpt-4*", "gpt-3.5", false),
            ("*.openai.com", "api.openai.com", true),
            ("*.openai.com", "openai.com", false),
            ("search_*", "search_web", true),
            ("search_*", "research_web", false),
            ("fetch_url", "fetch_url", true),
            ("fetch_url", "fetch_urls", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b*c", "abcbc", true),
            ("*a*", "", false),
            ("*", "", true),
            ("?", "é", true),
            ("??", "é", false),
            ("claude-[0-9]*", "claude-3-opus", true),
            ("claude-[0-9]*", "claude-x", false),
            ("o[!0-2]", "o3", true),
            ("o[!0-2]", "o1", false),
            (r"a\*b", "a*b", true),
            (r"a\*b", "axb", false),
            ("/v1/*/completions", "/v1/chat/completions", true),
            ("x**y", "xaay", true),
        ];
        for &(pattern, input, expected) in cases {
            let glob = Glob::parse(pattern).unwrap();
            assert_eq!(glob.matches(input), expected, "{pattern} vs {input}");
        }
    }

    #[test]
    fn fold_case_ignores_ascii_case_only_when_asked() {
        let glob = Glob::parse("*.OpenAI.com").unwrap();
        assert!(glob.matches_with("API.openai.COM", true));
        assert!(!glob.matches_with("API.openai.COM", false));
        let class = Glob::parse("[a-c]x?").unwrap();
        assert!(class.matches_with("BX1", true));
        assert!(!class.matches_with("BX1", false));
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        assert_eq!(Glob::parse(""), Err(GlobError::Empty));
        assert_eq!(Glob::parse("gpt-[4"), Err(GlobError::UnclosedClass { at: 5 }));
        assert_eq!(Glob::parse("a[]"), Err(GlobError::EmptyClass { at: 2 }));
        assert_eq!(Glob::parse("a[!]"), Err(GlobError::EmptyClass { at: 2 }));
        assert_eq!(Glob::parse("x[z-a]"), Err(GlobError::InvertedRange { from: 'z', to: 'a' }));
        assert_eq!(Glob::parse("abc\\"), Err(GlobError::TrailingEscape));
    }

    #[test]
    fn literal_detection_drives_indexing() {
        assert!(!Glob::is_pattern("gpt-4o"));
        assert!(Glob::is_pattern("gpt-4*"));
        assert!(Glob::is_pattern("o[13]"));
        assert_eq!(Glob::parse("gpt-4*").unwrap().shape, Shape::Prefix("gpt-4".into()));
        assert_eq!(Glob::parse("*-mini").unwrap().shape, Shape::Suffix("-mini".into()));
    }

    /// Exponential but obviously correct reference for `*` and literals.
    fn reference(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|k| reference(rest, &s[k..])),
            Some((c, rest)) => s.first() == Some(c) && reference(rest, &s[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn every_shape_agrees_with_the_reference(p in "[ab*]{1,7}", input in "[ab]{0,9}") {
            let glob = Glob::parse(&p).unwrap();
            proptest::prop_assert_eq!(
                glob.matches(&input),
                reference(p.as_bytes(), input.as_bytes()),
                "{} vs {}", p, input
            );
        }
    }
}
