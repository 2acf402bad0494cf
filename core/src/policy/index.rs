//! The compiled rule index: finds the first matching rule without scanning every rule.
//!
//! At compile time each rule is filed under one dimension on which all its values are exact
//! (the most selective available, in the order of [`INDEXED`]: agent before project before
//! cost center, and so on), once per value; rules with no such dimension (only globs, paths,
//! hosts or methods, or `match: {}`) go to a residual list per route kind. A request probes
//! each dimension's map once with its own value, which yields a handful of short, ascending
//! lists of rule numbers; walking them merged in ascending order and stopping at the first
//! rule that really matches gives exactly the rule a linear scan in document order would.
//!
//! Why it is exact: a rule that matches the request has, on its filing dimension, a value
//! equal to the request's value, so it is in the probed bucket; or it is residual and in the
//! residual list of its route. No matching rule is ever skipped, and candidates are tested in
//! document order. Evaluation never allocates: the lists are borrowed, the merge state lives on
//! the stack.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use super::rule::{Dim, Rule};
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

/// Rule numbers by value of one dimension.
#[derive(Clone, Debug, Default)]
struct Bucket {
    dim: Option<Dim>,
    rules: HashMap<Box<str>, Vec<u32>, FxBuild>,
}

#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Only the dimensions some rule is filed under, in [`INDEXED`] order.
    buckets: Vec<Bucket>,
    /// Rules without an exact dimension, per route kind, ascending.
    residual: [Vec<u32>; 3],
}

/// How the rules were filed, for diagnostics and benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexStats {
    pub indexed: usize,
    pub residual: usize,
    pub dimensions: usize,
}

impl Index {
    pub fn build(rules: &[Rule]) -> Index {
        let mut by_dim: Vec<Bucket> =
            INDEXED.iter().map(|&d| Bucket { dim: Some(d), rules: HashMap::default() }).collect();
        let mut residual: [Vec<u32>; 3] = Default::default();
        for (n, rule) in rules.iter().enumerate() {
            let n = n as u32;
            let filed = INDEXED.iter().enumerate().find_map(|(slot, &dim)| {
                let condition = rule.conditions.iter().find(|c| c.dim == dim)?;
                Some((slot, condition.exact_values()?))
            });
            match filed {
                Some((slot, values)) => {
                    for value in values {
                        let list = by_dim[slot].rules.entry(value.into()).or_default();
                        if list.last() != Some(&n) {
                            list.push(n);
                        }
                    }
                }
                None => {
                    for kind in RouteKind::ALL {
                        if rule.routes.contains(kind) {
                            residual[kind.index()].push(n);
                        }
                    }
                }
            }
        }
        by_dim.retain(|b| !b.rules.is_empty());
        Index { buckets: by_dim, residual }
    }

    pub fn stats(&self) -> IndexStats {
        let mut residual: Vec<u32> = self.residual.iter().flatten().copied().collect();
        residual.sort_unstable();
        residual.dedup();
        let mut indexed: Vec<u32> =
            self.buckets.iter().flat_map(|b| b.rules.values().flatten().copied()).collect();
        indexed.sort_unstable();
        indexed.dedup();
        IndexStats {
            indexed: indexed.len(),
            residual: residual.len(),
            dimensions: self.buckets.len(),
        }
    }

    /// The number of the first rule in document order that matches `facts`.
    pub fn first_match(&self, rules: &[Rule], facts: &Facts<'_>) -> Option<usize> {
        let mut lists: [&[u32]; INDEXED.len() + 1] = [&[]; INDEXED.len() + 1];
        let mut n = 0;
        for bucket in &self.buckets {
            let found = bucket.dim.and_then(|d| d.of(facts)).and_then(|v| bucket.rules.get(v));
            if let Some(list) = found {
                lists[n] = list;
                n += 1;
            }
        }
        let residual = &self.residual[facts.route.index()];
        if !residual.is_empty() {
            lists[n] = residual;
            n += 1;
        }
        let lists = &mut lists[..n];
        loop {
            let mut best: Option<(usize, u32)> = None;
            for (k, list) in lists.iter().enumerate() {
                if let Some(&head) = list.first() {
                    if best.is_none_or(|(_, b)| head < b) {
                        best = Some((k, head));
                    }
                }
            }
            let (k, candidate) = best?;
            lists[k] = &lists[k][1..];
            let candidate = candidate as usize;
            if rules.get(candidate).is_some_and(|r| r.matches(facts)) {
                return Some(candidate);
            }
        }
    }
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
