//! The compiled rule index: finds the first matching rule without scanning every rule.
//!
//! At compile time each rule is filed under one dimension on which all its values are exact
//! (the most selective available, in the order of [`INDEXED`]: agent before project before
//! cost center, and so on), once per value; rules with no such dimension (only globs, paths,
//! hosts or methods, or `match: {}`) go to a residual list per route kind. A request probes
//! each dimension's table once with its own value, which yields a handful of short, ascending
//! lists of rule numbers; the smallest rule number that really matches among them is exactly
//! the rule a linear scan in document order would find.
//!
//! Why it is exact: a rule that matches the request has, on its filing dimension, a value
//! equal to the request's value, so it is in the probed list; or it is residual and in the
//! residual list of its route. No matching rule is ever skipped. Each list is ascending, so its
//! first match is its earliest; the answer is the smallest of those, and a list is scanned only
//! below the best rule found so far.
//!
//! Why it is fast: the same probe also yields the value's small integer id in that dimension
//! (every exact value in the policy is interned at compile time), so candidates are tested
//! against dense arrays of ids instead of chasing strings: exact conditions become integer
//! comparisons, and only glob, path and host conditions look at text. Evaluation never
//! allocates: the lists are borrowed, the probe state lives on the stack.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;

use super::rule::{Condition, Dim, Pattern, RouteSet, Rule};
use super::{Facts, RouteKind};

/// Dimensions that may be indexed, most selective first. Hosts and methods are left out
/// because they compare case-insensitively, which an exact-key probe cannot do without
/// allocating; paths because they match by prefix.
pub const INDEXED: [Dim; 9] = [
    Dim::Agent,
    Dim::Project,
    Dim::CostCenter,
    Dim::Tool,
    Dim::Model,
    Dim::BusinessUnit,
    Dim::Tier,
    Dim::Provider,
    Dim::Category,
];

/// The id of a value the policy never mentions (or of an absent fact): matches no condition.
const UNKNOWN: u32 = u32::MAX;

/// One interned value of a dimension.
#[derive(Clone, Debug, Default)]
struct Entry {
    id: u32,
    /// The rules filed under this value, as a range of `Index::postings`.
    start: u32,
    len: u32,
}

/// The interned values of one dimension.
#[derive(Clone, Debug)]
struct Table {
    dim: Dim,
    values: HashMap<Box<str>, Entry, FxBuild>,
}

/// A rule's conditions in evaluation form.
#[derive(Clone, Copy, Debug)]
enum Test {
    /// The request's id in `dim` is one of `Index::ids[start..start + len]`.
    Ids { dim: Dim, start: u32, len: u32 },
    /// Text matching (globs, paths, hosts, methods): `rules[rule].conditions[condition]`.
    Text { rule: u32, condition: u32 },
}

/// The part of a rule that evaluation touches, kept dense (a few bytes per rule).
#[derive(Clone, Copy, Debug)]
struct Matcher {
    routes: RouteSet,
    tests: (u32, u32),
}

#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Only dimensions with at least one exact value, in [`INDEXED`] order.
    tables: Vec<Table>,
    postings: Vec<u32>,
    /// Rules without an exact dimension, per route kind, ascending.
    residual: [Vec<u32>; 3],
    matchers: Vec<Matcher>,
    tests: Vec<Test>,
    ids: Vec<u32>,
}

/// How the rules were filed, for diagnostics and benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexStats {
    pub indexed: usize,
    pub residual: usize,
    /// Dimensions with an interning table.
    pub dimensions: usize,
}

impl Index {
    pub fn build(rules: &[Rule]) -> Index {
        let mut index = Index::default();
        // Intern every exact value of every indexable dimension.
        for dim in INDEXED {
            let mut values: HashMap<Box<str>, Entry, FxBuild> = HashMap::default();
            for c in rules.iter().flat_map(|r| &r.conditions).filter(|c| c.dim == dim) {
                for p in &c.any_of {
                    if let Pattern::Exact(v) = p {
                        let next = values.len() as u32;
                        values.entry(v.clone()).or_insert(Entry { id: next, start: 0, len: 0 });
                    }
                }
            }
            if !values.is_empty() {
                index.tables.push(Table { dim, values });
            }
        }
        // File each rule, and compile its tests.
        let mut filed: Vec<Vec<Vec<u32>>> =
            index.tables.iter().map(|t| vec![Vec::new(); t.values.len()]).collect();
        for (n, rule) in rules.iter().enumerate() {
            let n = n as u32;
            let start = index.tests.len() as u32;
            let mut text = Vec::new();
            for (k, c) in rule.conditions.iter().enumerate() {
                match index.id_test(c) {
                    Some(test) => index.tests.push(test),
                    None => text.push(Test::Text { rule: n, condition: k as u32 }),
                }
            }
            // Integer tests first: cheaper, and order does not change a conjunction.
            index.tests.extend(text);
            let end = index.tests.len() as u32;
            index.matchers.push(Matcher { routes: rule.routes, tests: (start, end) });
            match index.filing(rule) {
                Some((t, ids)) => {
                    for id in ids {
                        let list = &mut filed[t][id as usize];
                        if list.last() != Some(&n) {
                            list.push(n);
                        }
                    }
                }
                None => {
                    for kind in RouteKind::ALL {
                        if rule.routes.contains(kind) {
                            index.residual[kind.index()].push(n);
                        }
                    }
                }
            }
        }
        for (t, lists) in filed.into_iter().enumerate() {
            for entry in index.tables[t].values.values_mut() {
                let list = &lists[entry.id as usize];
                entry.start = index.postings.len() as u32;
                entry.len = list.len() as u32;
                index.postings.extend_from_slice(list);
            }
        }
        index
    }

    fn table(&self, dim: Dim) -> Option<(usize, &Table)> {
        self.tables.iter().enumerate().find(|(_, t)| t.dim == dim)
    }

    /// An integer test for an all-exact condition on an interned dimension.
    fn id_test(&mut self, c: &Condition) -> Option<Test> {
        let (_, table) = self.table(c.dim)?;
        let ids: Vec<u32> = c
            .any_of
            .iter()
            .map(|p| match p {
                Pattern::Exact(v) => table.values.get(v).map(|e| e.id),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let start = self.ids.len() as u32;
        self.ids.extend(ids);
        Some(Test::Ids { dim: c.dim, start, len: self.ids.len() as u32 - start })
    }

    /// The table and value ids a rule is filed under: its first all-exact indexed dimension.
    fn filing(&self, rule: &Rule) -> Option<(usize, Vec<u32>)> {
        INDEXED.iter().find_map(|&dim| {
            let c = rule.conditions.iter().find(|c| c.dim == dim)?;
            let (t, table) = self.table(dim)?;
            let ids = c
                .exact_values()?
                .into_iter()
                .map(|v| table.values.get(v).map(|e| e.id))
                .collect::<Option<Vec<u32>>>()?;
            Some((t, ids))
        })
    }

    pub fn stats(&self) -> IndexStats {
        let mut residual: Vec<u32> = self.residual.iter().flatten().copied().collect();
        residual.sort_unstable();
        residual.dedup();
        let mut indexed = self.postings.clone();
        indexed.sort_unstable();
        indexed.dedup();
        IndexStats {
            indexed: indexed.len(),
            residual: residual.len(),
            dimensions: self.tables.len(),
        }
    }

    /// The number of the first rule in document order that matches `facts`.
    pub fn first_match(&self, rules: &[Rule], facts: &Facts<'_>) -> Option<usize> {
        let mut ids = [UNKNOWN; Dim::ALL.len()];
        let mut lists: [&[u32]; INDEXED.len() + 1] = [&[]; INDEXED.len() + 1];
        let mut n = 0;
        for table in &self.tables {
            let Some(entry) = table.dim.of(facts).and_then(|v| table.values.get(v)) else {
                continue;
            };
            ids[table.dim as usize] = entry.id;
            let list = self.postings.get(range(entry.start, entry.len)).unwrap_or_default();
            if !list.is_empty() {
                lists[n] = list;
                n += 1;
            }
        }
        let residual = &self.residual[facts.route.index()];
        if !residual.is_empty() {
            lists[n] = residual;
            n += 1;
        }
        // The first match overall is the smallest of each list's first match, so each list is
        // scanned only below the best rule found so far; no merge is needed.
        let mut best: Option<u32> = None;
        for list in &lists[..n] {
            for &candidate in list.iter() {
                if best.is_some_and(|b| candidate >= b) {
                    break;
                }
                if self.matches(candidate as usize, rules, facts, &ids) {
                    best = Some(candidate);
                    break;
                }
            }
        }
        best.map(|b| b as usize)
    }

    fn matches(&self, n: usize, rules: &[Rule], facts: &Facts<'_>, ids: &[u32]) -> bool {
        let Some(m) = self.matchers.get(n) else { return false };
        if !m.routes.contains(facts.route) {
            return false;
        }
        let tests = self.tests.get(m.tests.0 as usize..m.tests.1 as usize).unwrap_or_default();
        tests.iter().all(|test| match *test {
            Test::Ids { dim, start, len } => {
                let id = ids.get(dim as usize).copied().unwrap_or(UNKNOWN);
                id != UNKNOWN
                    && self.ids.get(range(start, len)).is_some_and(|set| set.contains(&id))
            }
            Test::Text { rule, condition } => rules
                .get(rule as usize)
                .and_then(|r| r.conditions.get(condition as usize))
                .is_some_and(|c| c.matches(facts)),
        })
    }
}

fn range(start: u32, len: u32) -> Range<usize> {
    start as usize..start as usize + len as usize
}

/// The Fx hash (rustc's): a multiply-rotate over machine words, several times faster than
/// SipHash on short keys. Hash flooding is not a concern here: keys come from the policy, and
/// a request only probes, it never inserts.
#[derive(Clone, Copy, Debug, Default)]
pub struct FxBuild;

impl BuildHasher for FxBuild {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
