//! Budgets: spend limits per scope and calendar period, enforced by reserve → settle → release.
//!
//! This file holds the budget *specification* types shared with the policy module. The
//! accounting (store trait, in-memory store, reservations) is built on top of them.

use crate::money::Money;
use crate::time::Period;

/// What a budget is counted against. In Tollgate's terms the tenant is the cost center and the
/// account is the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One budget shared by every request the rule or policy covers.
    Global,
    Agent,
    Project,
    CostCenter,
    BusinessUnit,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        Some(match text {
            "global" => Scope::Global,
            "agent" => Scope::Agent,
            "project" => Scope::Project,
            "cost_center" => Scope::CostCenter,
            "business_unit" => Scope::BusinessUnit,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Agent => "agent",
            Scope::Project => "project",
            Scope::CostCenter => "cost_center",
            Scope::BusinessUnit => "business_unit",
        }
    }

    pub const NAMES: [&'static str; 5] =
        ["global", "agent", "project", "cost_center", "business_unit"];
}

/// One budget as configured: `scope` + optional fixed `key` + `period` + `amount`.
///
/// With `key: None` every distinct scope value (every agent, say) gets its own budget of
/// `amount`; with `key: Some("CC-1234")` the budget applies only to that value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BudgetSpec {
    /// Stable identifier, unique in the policy (used in counter keys, metrics and errors).
    pub id: String,
    pub scope: Scope,
    pub key: Option<String>,
    pub period: Period,
    pub amount: Money,
}
