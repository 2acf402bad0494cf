//! Budgets: spend limits per scope and calendar period, enforced by reserve → settle → release.
//!
//! This file holds the budget *specification* types shared with the policy module, which
//! produces them. The accounting is built on top of them: [`Store`] is the small set of atomic
//! counter operations a backend (in-process map, Envoy shared data, Redis) must provide,
//! [`MemoryStore`] the in-process one, and [`Budgets`] the engine that reserves a request's
//! worst-case cost against every applicable budget, settles the actual cost, releases the rest
//! and reports the 80 / 95 / 100 % warnings. Periods are UTC calendar windows
//! ([`Period::window`]). Nothing here prices a request or reads a clock.

mod engine;
mod holds;
pub mod lease;
mod memory;
mod store;
#[cfg(test)]
mod tests;

pub use engine::{
    BudgetError, BudgetStatus, Budgets, Reservation, ReservedBudget, SettleOutcome, Settlement,
    Warning, GLOBAL_VALUE, LAPSE_RETENTION_MS, RETENTION_MS, WARNING_THRESHOLDS_BP,
};
pub use holds::HoldTable;
pub use memory::MemoryStore;
pub use store::{AddOutcome, Hold, HoldEntry, Refill, Store, StoreError, Taken};

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
