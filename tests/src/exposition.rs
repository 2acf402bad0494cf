//! A strict parser of the Prometheus text exposition format (version 0.0.4), for asserting on
//! `/metrics`: every line must be a `# HELP`, a `# TYPE`, another comment, or a well-formed
//! sample of a family whose `# TYPE` came first; a series may appear only once.
//!
//! Parses; never fetches or interprets the numbers.

use std::collections::{BTreeMap, HashMap, HashSet};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// Family name → type (`counter`, `gauge`, `histogram`, `summary`, `untyped`).
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The samples named exactly `name`.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the series `name` whose labels include every pair of `labels`; the sum if
    /// several match, `None` if none does.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .series(name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v)))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }
}

/// Why a line is not valid exposition text.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub message: &'static str,
    pub text: String,
}

/// Parses the whole text; the first bad line is the error.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    let mut seen: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let fail = |message| ParseError { line: index + 1, message, text: line.to_string() };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| fail("TYPE without a type"))?;
            if !is_name(name) {
                return Err(fail("bad metric name in TYPE"));
            }
            if !matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped") {
                return Err(fail("unknown metric type"));
            }
            if out.types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(fail("second TYPE for a family"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !is_name(name) {
                return Err(fail("bad metric name in HELP"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = sample(line).ok_or_else(|| fail("malformed sample"))?;
        let family = family(&sample.name, &out.types).ok_or_else(|| fail("sample before TYPE"))?;
        let kind = out.types.get(family).map(String::as_str);
        if kind == Some("counter") && sample.value < 0.0 {
            return Err(fail("negative counter"));
        }
        let key = (
            sample.name.clone(),
            sample.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        );
        if !seen.insert(key) {
            return Err(fail("duplicate series"));
        }
        out.samples.push(sample);
    }
    Ok(out)
}

fn family<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(types.get(base).map(String::as_str), Some("histogram" | "summary")).then_some(base)
    })
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':')
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_name(name) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut at = body;
        loop {
            if let Some(after) = at.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = at.split_once("=\"")?;
            if !is_label_name(label) {
                return None;
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    c => value.push(c),
                }
            };
            if labels.insert(label.to_string(), value).is_some() {
                return None;
            }
            at = &after[end + 1..];
            if let Some(next) = at.strip_prefix(',') {
                at = next;
            } else if !at.starts_with('}') {
                return None;
            }
        }
    }
    let mut fields = rest.strip_prefix(' ')?.split(' ');
    let value = match fields.next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Sample { name: name.to_string(), labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_families_labels_and_escapes() {
        let text = "# HELP a_total Things\n# TYPE a_total counter\n\
                    a_total{x=\"1\",y=\"q\\\"uo\\\\te\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let e = parse(text).unwrap();
        assert_eq!(e.samples.len(), 4);
        assert_eq!(e.samples[0].labels["y"], "q\"uo\\te");
        assert_eq!(e.value("a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(e.value("h_count", &[]), Some(2.0));
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "a 1\n",                              // no TYPE
            "# TYPE a counter\na{x=1} 1\n",       // unquoted value
            "# TYPE a counter\na{x=\"1\"}1\n",    // no space
            "# TYPE a counter\na one\n",          // not a number
            "# TYPE a counter\na 1\na 2\n",       // duplicate series
            "# TYPE a counter\n# TYPE a gauge\n", // two types
            "# TYPE a counter\na{x=\"1\" 1\n",    // unclosed labels
            "# TYPE a counter\na -1\n",           // negative counter
            "# TYPE 1a counter\n",                // bad name
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
