//! The decision value and its renderings (text for `tollgate explain`, JSON for the admin API).
//!
//! A decision borrows everything from the snapshot that made it, so producing one never
//! allocates; rendering it does, and is meant for the slow paths (CLI, admin, audit).

use std::fmt;

use serde::ser::SerializeSeq;

use super::rule::Outcome;
use super::{Effect, Limits};
use crate::budget::BudgetSpec;

/// The outcome of evaluating one request against a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Decision<'s> {
    pub effect: Effect,
    /// Stable machine-readable code: the rule's `reason`, `rule_<effect>` or
    /// `default_<effect>`.
    pub reason: &'s str,
    /// The rule id that fired, or `defaults.<route kind>`.
    pub clause: &'s str,
    pub policy_version: &'s str,
    /// Human-readable; meant for the caller on deny and require_approval.
    pub explanation: &'s str,
    /// Effective limits: the rule's over the document's, field by field.
    pub limits: Limits,
    /// Budgets the request must fit in: the document's, then the rule's.
    pub budgets: Budgets<'s>,
    /// The risk dimensions the matched rule declares, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<crate::risk::Profile>,
}

impl<'s> Decision<'s> {
    pub(super) fn new(
        outcome: &'s Outcome,
        version: &'s str,
        limits: Limits,
        budgets: Budgets<'s>,
    ) -> Self {
        Decision {
            effect: outcome.effect,
            reason: &outcome.reason,
            clause: &outcome.clause,
            policy_version: version,
            explanation: &outcome.explanation,
            limits,
            budgets,
            risk: outcome.risk,
        }
    }

    /// Whether the decision came from `defaults` rather than from a rule.
    pub fn is_default(&self) -> bool {
        self.clause.starts_with("defaults.")
    }
}

impl fmt::Display for Decision<'_> {
    /// A few aligned lines, as printed by `tollgate explain`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "effect:         {}", self.effect)?;
        writeln!(f, "reason:         {}", self.reason)?;
        writeln!(f, "clause:         {}", self.clause)?;
        writeln!(f, "policy_version: {}", self.policy_version)?;
        writeln!(f, "explanation:    {}", self.explanation)?;
        writeln!(f, "limits:         {}", self.limits)?;
        if let Some(risk) = &self.risk {
            let declared: Vec<String> = crate::risk::Dimension::ALL
                .iter()
                .filter_map(|d| {
                    let grade = match d {
                        crate::risk::Dimension::BlastRadius => risk.blast_radius,
                        crate::risk::Dimension::Reversibility => risk.reversibility,
                        crate::risk::Dimension::DataSensitivity => risk.data_sensitivity,
                        crate::risk::Dimension::CostImpact => risk.cost_impact,
                        crate::risk::Dimension::HistoricalSuccess => risk.historical_success,
                    }?;
                    Some(format!("{} {}", d.as_str(), grade.as_str()))
                })
                .collect();
            writeln!(f, "risk:           {} (undeclared: high, or observed)", declared.join(", "))?;
        }
        write!(f, "budgets:        ")?;
        if self.budgets.is_empty() {
            f.write_str("none")?;
        }
        for (i, b) in self.budgets.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let scope = b.scope.as_str();
            match &b.key {
                Some(key) => write!(f, "{sep}{} ({scope}={key} {} {})", b.id, b.period, b.amount)?,
                None => write!(f, "{sep}{} ({scope} {} {})", b.id, b.period, b.amount)?,
            }
        }
        Ok(())
    }
}

/// The budgets that apply to a request: the document's and the matched rule's, borrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budgets<'s> {
    pub document: &'s [BudgetSpec],
    pub rule: &'s [BudgetSpec],
}

impl<'s> Budgets<'s> {
    pub fn new(document: &'s [BudgetSpec], rule: &'s [BudgetSpec]) -> Self {
        Budgets { document, rule }
    }

    /// Document budgets first, then the rule's.
    pub fn iter(&self) -> impl Iterator<Item = &'s BudgetSpec> + 's {
        self.document.iter().chain(self.rule.iter())
    }

    pub fn len(&self) -> usize {
        self.document.len() + self.rule.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl serde::Serialize for Budgets<'_> {
    /// One flat list, document budgets first.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for b in self.iter() {
            seq.serialize_element(b)?;
        }
        seq.end()
    }
}
