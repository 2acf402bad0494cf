//! The autonomy metrics (`tollgate_actions_total`, `tollgate_autonomy_basis_points`): which
//! category an action is counted under, which verdict the oversight step gave it, and the
//! autonomy ratio. One rule for both engines: the sidecar counts in atomics and copies them into
//! its registry at scrape time; the Envoy filter counts each verdict in an Envoy counter and keeps
//! the per-category totals in one shared-data record ([`Tally`]) so that every worker moves the
//! one gauge per category by the exact change its own count made.
//!
//! Pure: no I/O, no clock.

use crate::guardrails::{Category, Guardrails};
use crate::lifecycle::Step;
use crate::refusal::Class;

/// The categories the autonomy metrics are split by: the guardrail action categories, model calls,
/// and tool calls of no known category.
pub const CATEGORIES: [&str; 9] = [
    "read",
    "write",
    "execute",
    "deploy",
    "delete",
    "external_api",
    "database",
    "llm",
    "uncategorized",
];
/// The index of `llm` in [`CATEGORIES`].
pub const LLM: usize = 7;
/// The index of `uncategorized` in [`CATEGORIES`].
pub const UNCATEGORIZED: usize = 8;
/// The `category` label of the autonomy ratio over every category.
pub const ALL: &str = "all";

/// The metrics category of a request (an index into [`CATEGORIES`]): `llm` for model calls;
/// otherwise the category the route declares (the sidecar's route `category:`, the filter's
/// `filter.mcp_category`), else the guardrail policy's category of the tool, else
/// `uncategorized`.
pub fn category(
    llm: bool,
    declared: Option<&str>,
    tool: Option<&str>,
    guardrails: &Guardrails,
) -> usize {
    if llm {
        return LLM;
    }
    let category = declared
        .and_then(Category::parse)
        .or_else(|| tool.and_then(|t| guardrails.policy(t)).map(|p| p.category));
    category.map_or(UNCATEGORIZED, |c| c as usize)
}

/// How an action ended at the oversight step, for the autonomy metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ran without a human (allowed, auto-executed, or low risk).
    Auto,
    /// Sent to a human (a pending approval was created or is still pending).
    Approval,
    /// Refused.
    Denied,
    /// A retry that used a granted approval (the same action as its approval request, so not
    /// counted again in the total).
    Approved,
}

impl Verdict {
    pub const ALL: [Verdict; 4] =
        [Verdict::Auto, Verdict::Approval, Verdict::Denied, Verdict::Approved];

    /// The `verdict` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Auto => "auto",
            Verdict::Approval => "approval_required",
            Verdict::Denied => "denied",
            Verdict::Approved => "human_approved",
        }
    }

    /// The verdict of a request the lifecycle refused at `step` (`None`: refused before the
    /// oversight step had a say, by pricing, the cost cap, a rate limit or the ledger, and not
    /// counted). The policy's and the guardrails' refusals and the oversight step's own count as
    /// denied; a refusal after the oversight step let the action through on its own (its budget)
    /// counts as auto.
    pub fn of_refusal(step: Step) -> Option<Verdict> {
        if step == Step::Policy || step == Step::Guardrail || step.is_oversight() {
            Some(Verdict::Denied)
        } else if step.after_oversight() {
            Some(Verdict::Auto)
        } else {
            None
        }
    }

    /// The verdict of a request a human has to approve that was refused with `class`: sent to a
    /// human (an approval is pending, or still waiting), or refused outright (the approval
    /// cannot be used).
    pub fn of_asked(class: Class) -> Verdict {
        if class == Class::ApprovalRequired {
            Verdict::Approval
        } else {
            Verdict::Denied
        }
    }

    /// The verdict of a retry that used a granted approval and was then refused at `step`: still
    /// human-approved when the refusal came after the oversight step (its budget), else as
    /// [`Verdict::of_asked`].
    pub fn of_granted_refusal(step: Step, class: Class) -> Verdict {
        if step.after_oversight() {
            Verdict::Approved
        } else {
            Verdict::of_asked(class)
        }
    }
}

/// A category's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub auto: u64,
    pub approval_required: u64,
    pub denied: u64,
    pub human_approved: u64,
    /// auto + approval_required + denied.
    pub total: u64,
}

impl Counts {
    /// Autonomy in basis points (auto / total; 10000 = every action ran on its own); `None`
    /// before the first action (no series).
    pub fn autonomy_bp(&self) -> Option<u64> {
        (self.total > 0).then(|| self.auto.min(self.total) * 10_000 / self.total)
    }

    fn add(&mut self, other: &Counts) {
        self.auto += other.auto;
        self.approval_required += other.approval_required;
        self.denied += other.denied;
        self.human_approved += other.human_approved;
        self.total += other.total;
    }
}

/// The counts of every category, and over all of them.
pub fn overall(by: &[Counts]) -> Counts {
    let mut all = Counts::default();
    for c in by {
        all.add(c);
    }
    all
}

/// The counts behind the autonomy ratio, per category, as the Envoy filter keeps them in one
/// shared-data record updated with a compare-and-swap: (auto, approval_required, denied) per
/// category, so the ratio every worker derives from it is the fleet of workers' ratio. The
/// `human_approved` verdicts do not enter the ratio and are not kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    counts: [[u64; 3]; CATEGORIES.len()],
}

/// One autonomy gauge series and how much a counted verdict moved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GaugeMove {
    /// The `category` label: a [`CATEGORIES`] name or [`ALL`].
    pub category: &'static str,
    /// The change in basis points (from 0 for a series that did not exist yet).
    pub delta: i64,
}

impl Tally {
    const BYTES: usize = CATEGORIES.len() * 3 * 8;

    /// Decodes a stored tally (empty bytes: nothing counted yet). `None`: not a tally.
    pub fn decode(bytes: &[u8]) -> Option<Tally> {
        let mut tally = Tally::default();
        if bytes.is_empty() {
            return Some(tally);
        }
        if bytes.len() != Tally::BYTES {
            return None;
        }
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            tally.counts[i / 3][i % 3] = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        Some(tally)
    }

    /// The bytes [`Tally::decode`] reads.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Tally::BYTES);
        for c in &self.counts {
            for n in c {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        out
    }

    /// The counts of each category (in [`CATEGORIES`] order; `human_approved` is not kept).
    pub fn counts(&self) -> Vec<Counts> {
        self.counts
            .iter()
            .map(|[auto, approval_required, denied]| Counts {
                auto: *auto,
                approval_required: *approval_required,
                denied: *denied,
                human_approved: 0,
                total: auto.saturating_add(*approval_required).saturating_add(*denied),
            })
            .collect()
    }

    /// Counts one `verdict` of `category` (an index into [`CATEGORIES`]); a human-approved
    /// retry is not kept (it is not in the ratio). For a worker's batch, [`Tally::merge`]d into
    /// the shared record later.
    pub fn count(&mut self, category: usize, verdict: Verdict) {
        let slot = match verdict {
            Verdict::Auto => 0,
            Verdict::Approval => 1,
            Verdict::Denied => 2,
            Verdict::Approved => return,
        };
        let c = &mut self.counts[category.min(UNCATEGORIZED)][slot];
        *c = c.saturating_add(1);
    }

    /// Nothing counted.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().flatten().all(|n| *n == 0)
    }

    /// Adds every count of `batch` and returns how the autonomy gauges moved: each category the
    /// batch counted in, and [`ALL`], each listed once its series exists (a delta of 0
    /// included: the series appears), the change from before the batch to after it.
    pub fn merge(&mut self, batch: &Tally) -> Vec<GaugeMove> {
        let before = self.counts();
        let all_before = overall(&before);
        for (mine, theirs) in self.counts.iter_mut().zip(&batch.counts) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m = m.saturating_add(*t);
            }
        }
        let after = self.counts();
        let moved = |b: &Counts, a: &Counts| {
            let after = a.autonomy_bp()?;
            Some(after as i64 - b.autonomy_bp().unwrap_or(0) as i64)
        };
        let mut moves = Vec::new();
        let counted = batch.counts();
        for (i, c) in counted.iter().enumerate() {
            if c.total == 0 {
                continue;
            }
            if let Some(delta) = moved(&before[i], &after[i]) {
                moves.push(GaugeMove { category: CATEGORIES[i], delta });
            }
        }
        if overall(&counted).total > 0 {
            if let Some(delta) = moved(&all_before, &overall(&after)) {
                moves.push(GaugeMove { category: ALL, delta });
            }
        }
        moves
    }

    /// Counts one `verdict` of `category` and returns how the autonomy gauges moved
    /// ([`Tally::merge`] of that one count).
    pub fn add(&mut self, category: usize, verdict: Verdict) -> Vec<GaugeMove> {
        let mut one = Tally::default();
        one.count(category, verdict);
        self.merge(&one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_moves_add_up_to_the_ratio_of_the_counts() {
        let mut tally = Tally::default();
        let mut gauges: std::collections::BTreeMap<&str, i64> = Default::default();
        let steps = [
            (LLM, Verdict::Auto),
            (LLM, Verdict::Denied),
            (0, Verdict::Denied),
            (LLM, Verdict::Approval),
            (LLM, Verdict::Approved),
            (0, Verdict::Auto),
            (UNCATEGORIZED, Verdict::Auto),
        ];
        for (category, verdict) in steps {
            for m in tally.add(category, verdict) {
                *gauges.entry(m.category).or_default() += m.delta;
            }
            // Through the shared data's bytes, as the filter keeps it.
            tally = Tally::decode(&tally.encode()).unwrap();
        }
        let by = tally.counts();
        for (i, name) in CATEGORIES.iter().enumerate() {
            assert_eq!(gauges.get(name).copied(), by[i].autonomy_bp().map(|b| b as i64), "{name}");
        }
        assert_eq!(gauges[ALL], overall(&by).autonomy_bp().unwrap() as i64);
        // llm: 1 auto of 3; read: 1 of 2; uncategorized: 1 of 1; all: 3 of 6.
        assert_eq!((gauges["llm"], gauges["read"], gauges["uncategorized"]), (3333, 5000, 10_000));
        assert_eq!(gauges[ALL], 5000);
    }

    #[test]
    fn a_merged_batch_moves_the_gauges_as_its_counts_one_by_one() {
        let verdicts = [
            (LLM, Verdict::Auto),
            (LLM, Verdict::Denied),
            (3, Verdict::Approval),
            (LLM, Verdict::Approved),
            (LLM, Verdict::Auto),
        ];
        let mut shared = Tally::default();
        shared.add(LLM, Verdict::Denied);
        let (mut one_by_one, mut merged) = (shared.clone(), shared);
        let mut by_one: std::collections::BTreeMap<&str, i64> = Default::default();
        let mut batch = Tally::default();
        for (category, verdict) in verdicts {
            for m in one_by_one.add(category, verdict) {
                *by_one.entry(m.category).or_default() += m.delta;
            }
            batch.count(category, verdict);
        }
        assert!(!batch.is_empty() && Tally::default().is_empty());
        let moves = merged.merge(&batch);
        assert_eq!(merged, one_by_one);
        let by_batch: std::collections::BTreeMap<&str, i64> =
            moves.iter().map(|m| (m.category, m.delta)).collect();
        assert_eq!(by_batch, by_one);
        // llm: 1 denied, then 2 auto of 4 more: 5000 from 0; deploy: 0 (new); all: 2 of 5.
        assert_eq!((by_batch["llm"], by_batch["deploy"], by_batch[ALL]), (5000, 0, 4000));
    }

    #[test]
    fn a_first_denial_makes_the_series_at_zero() {
        let mut tally = Tally::default();
        assert_eq!(
            tally.add(2, Verdict::Denied),
            [GaugeMove { category: "execute", delta: 0 }, GaugeMove { category: ALL, delta: 0 }]
        );
        assert!(Tally::default().add(2, Verdict::Approved).is_empty());
    }

    #[test]
    fn a_tally_decodes_only_its_own_bytes() {
        assert_eq!(Tally::decode(b""), Some(Tally::default()));
        assert_eq!(Tally::decode(b"nope"), None);
        let mut t = Tally::default();
        t.add(LLM, Verdict::Auto);
        assert_eq!(Tally::decode(&t.encode()), Some(t));
    }

    #[test]
    fn verdicts_by_step() {
        assert_eq!(Verdict::of_refusal(Step::Policy), Some(Verdict::Denied));
        assert_eq!(Verdict::of_refusal(Step::Loop), Some(Verdict::Denied));
        assert_eq!(Verdict::of_refusal(Step::Budget), Some(Verdict::Auto));
        assert_eq!(Verdict::of_refusal(Step::RateLimit), None);
        assert_eq!(Verdict::of_asked(Class::ApprovalRequired), Verdict::Approval);
        assert_eq!(Verdict::of_asked(Class::Policy), Verdict::Denied);
        assert_eq!(
            Verdict::of_granted_refusal(Step::Budget, Class::BudgetExhausted),
            Verdict::Approved
        );
    }
}
