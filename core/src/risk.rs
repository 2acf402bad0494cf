//! The risk score (risk scoring and the automated approval decision):
//! how dangerous is an action, and who must agree before it runs?
//!
//! Five dimensions are each graded low / medium / high (10 / 50 / 90 points) and weighted: blast
//! radius 30 %, reversibility 25 %, data sensitivity 20 %, cost impact 15 %, historical success
//! 10 %. The weighted sum is kept in integer hundredths of a point (points × weight percent), so
//! the documented worked examples come out at exactly 22.00 and 90.00 and no float is involved. The
//! score picks a band: below 30 the action is auto-approved; from 30 to below 70 it waits for a
//! human and is approved if nobody answers within 15 minutes; from 70 it needs an explicit
//! approval and is denied if nobody answers within 60 minutes.
//!
//! This module scores and bands; it never waits, notifies or pages anyone. A dimension that is
//! neither declared nor observed counts as high: unknown risk is never scored as low.

use std::fmt;

pub mod history;

use crate::autonomy::Effect;
use crate::doc::{Cx, Field};
use crate::money::Money;

/// A dimension's grade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grade {
    Low,
    Medium,
    High,
}

impl Grade {
    /// 10, 50 or 90 points.
    pub const fn points(self) -> u32 {
        match self {
            Grade::Low => 10,
            Grade::Medium => 50,
            Grade::High => 90,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Grade::Low => "low",
            Grade::Medium => "medium",
            Grade::High => "high",
        }
    }
}

/// The five dimensions, in their documented order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    BlastRadius,
    Reversibility,
    DataSensitivity,
    CostImpact,
    HistoricalSuccess,
}

impl Dimension {
    pub const ALL: [Dimension; 5] = [
        Dimension::BlastRadius,
        Dimension::Reversibility,
        Dimension::DataSensitivity,
        Dimension::CostImpact,
        Dimension::HistoricalSuccess,
    ];

    /// The weight in percent; the five add up to 100.
    pub const fn weight_percent(self) -> u32 {
        match self {
            Dimension::BlastRadius => 30,
            Dimension::Reversibility => 25,
            Dimension::DataSensitivity => 20,
            Dimension::CostImpact => 15,
            Dimension::HistoricalSuccess => 10,
        }
    }

    /// The config key.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::BlastRadius => "blast_radius",
            Dimension::Reversibility => "reversibility",
            Dimension::DataSensitivity => "data_sensitivity",
            Dimension::CostImpact => "cost_impact",
            Dimension::HistoricalSuccess => "historical_success",
        }
    }

    /// The words accepted in config besides `low|medium|high` (which are risk grades).
    fn words(self) -> &'static [(&'static str, Grade)] {
        match self {
            Dimension::Reversibility => &[
                ("automatic_rollback", Grade::Low),
                ("manual_rollback", Grade::Medium),
                ("irreversible", Grade::High),
            ],
            Dimension::DataSensitivity => &[
                ("public", Grade::Low),
                ("internal", Grade::Low),
                ("confidential", Grade::Medium),
                ("critical", Grade::High),
                ("regulated", Grade::High),
                ("pii", Grade::High),
            ],
            _ => &[],
        }
    }
}

/// Blast radius from the number of resources or users affected: < 5 low, 5–50 medium, > 50 high.
pub fn blast_radius(resources: u64) -> Grade {
    match resources {
        0..=4 => Grade::Low,
        5..=50 => Grade::Medium,
        _ => Grade::High,
    }
}

/// Whether an action can be undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reversibility {
    AutomaticRollback,
    ManualRollback,
    Irreversible,
}

impl Reversibility {
    pub const fn grade(self) -> Grade {
        match self {
            Reversibility::AutomaticRollback => Grade::Low,
            Reversibility::ManualRollback => Grade::Medium,
            Reversibility::Irreversible => Grade::High,
        }
    }
}

/// The classification of the data an action touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    Public,
    Internal,
    Confidential,
    Critical,
    Regulated,
    Pii,
}

impl Sensitivity {
    pub const fn grade(self) -> Grade {
        match self {
            Sensitivity::Public | Sensitivity::Internal => Grade::Low,
            Sensitivity::Confidential => Grade::Medium,
            Sensitivity::Critical | Sensitivity::Regulated | Sensitivity::Pii => Grade::High,
        }
    }
}

/// Cost impact from the cost delta: < $100 low, $100–$1000 medium, > $1000 high.
pub fn cost_impact(delta: Money) -> Grade {
    if delta < Money::from_usd(100) {
        Grade::Low
    } else if delta <= Money::from_usd(1000) {
        Grade::Medium
    } else {
        Grade::High
    }
}

/// Historical success from counts of similar actions: > 95 % low, 80–95 % medium, < 80 % or
/// no history ("never done") high. Integer comparisons only.
pub fn historical_success(successes: u64, total: u64) -> Grade {
    let (s, t) = (u128::from(successes.min(total)), u128::from(total));
    if t == 0 {
        Grade::High
    } else if s * 100 > t * 95 {
        Grade::Low
    } else if s * 100 >= t * 80 {
        Grade::Medium
    } else {
        Grade::High
    }
}

/// The five grades of one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Factors {
    pub blast_radius: Grade,
    pub reversibility: Grade,
    pub data_sensitivity: Grade,
    pub cost_impact: Grade,
    pub historical_success: Grade,
}

impl Factors {
    pub fn grade(&self, d: Dimension) -> Grade {
        match d {
            Dimension::BlastRadius => self.blast_radius,
            Dimension::Reversibility => self.reversibility,
            Dimension::DataSensitivity => self.data_sensitivity,
            Dimension::CostImpact => self.cost_impact,
            Dimension::HistoricalSuccess => self.historical_success,
        }
    }
}

/// The grades a rule or tool route declares in config; missing ones are filled from
/// observations by [`Profile::factors`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Profile {
    pub blast_radius: Option<Grade>,
    pub reversibility: Option<Grade>,
    pub data_sensitivity: Option<Grade>,
    pub cost_impact: Option<Grade>,
    pub historical_success: Option<Grade>,
}

impl Profile {
    /// Decodes `{blast_radius: high, reversibility: irreversible, data_sensitivity: pii, ...}`.
    /// Every dimension takes `low|medium|high` (risk grades, so `historical_success: low` means
    /// a good track record); reversibility and data sensitivity also take their documented words.
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> Profile {
        let mut p = Profile::default();
        let Some(mut obj) = cx.object(field) else { return p };
        for d in Dimension::ALL {
            let grade = obj.get(d.as_str()).and_then(|f| grade_word(cx, &f, d));
            match d {
                Dimension::BlastRadius => p.blast_radius = grade,
                Dimension::Reversibility => p.reversibility = grade,
                Dimension::DataSensitivity => p.data_sensitivity = grade,
                Dimension::CostImpact => p.cost_impact = grade,
                Dimension::HistoricalSuccess => p.historical_success = grade,
            }
        }
        obj.finish(cx, &Dimension::ALL.map(Dimension::as_str));
        p
    }

    /// This profile's declared grades, with `base`'s for the dimensions it leaves open (a
    /// policy rule's profile over its tool route's).
    pub fn over(self, base: Profile) -> Profile {
        Profile {
            blast_radius: self.blast_radius.or(base.blast_radius),
            reversibility: self.reversibility.or(base.reversibility),
            data_sensitivity: self.data_sensitivity.or(base.data_sensitivity),
            cost_impact: self.cost_impact.or(base.cost_impact),
            historical_success: self.historical_success.or(base.historical_success),
        }
    }

    /// Complete grades: declared ones win; otherwise cost impact from `cost` and historical
    /// success from `history` (successes, total); anything still unknown is high.
    pub fn factors(&self, cost: Option<Money>, history: Option<(u64, u64)>) -> Factors {
        Factors {
            blast_radius: self.blast_radius.unwrap_or(Grade::High),
            reversibility: self.reversibility.unwrap_or(Grade::High),
            data_sensitivity: self.data_sensitivity.unwrap_or(Grade::High),
            cost_impact: self.cost_impact.or(cost.map(cost_impact)).unwrap_or(Grade::High),
            historical_success: self
                .historical_success
                .or(history.map(|(s, t)| historical_success(s, t)))
                .unwrap_or(Grade::High),
        }
    }
}

fn grade_word(cx: &mut Cx, field: &Field<'_>, d: Dimension) -> Option<Grade> {
    let word = field.str(cx)?;
    let grade = match word {
        "low" => Some(Grade::Low),
        "medium" => Some(Grade::Medium),
        "high" => Some(Grade::High),
        _ => d.words().iter().find(|(w, _)| *w == word).map(|(_, g)| *g),
    };
    if grade.is_none() {
        let mut allowed = vec!["low", "medium", "high"];
        allowed.extend(d.words().iter().map(|(w, _)| *w));
        field.error(cx, format!("unknown value `{word}`, expected one of: {}", allowed.join(", ")));
    }
    grade
}

/// A score in hundredths of a point: `Score(2250)` is 22.5. Always within [1000, 9000].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Score(pub u32);

impl Score {
    pub const fn hundredths(self) -> u32 {
        self.0
    }

    /// The whole points, rounded down (22.5 → 22).
    pub const fn whole(self) -> u32 {
        self.0 / 100
    }
}

impl fmt::Display for Score {
    /// `22`, or `22.5` / `22.25` when there is a fraction.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 100, self.0 % 100);
        match frac {
            0 => write!(f, "{whole}"),
            n if n % 10 == 0 => write!(f, "{whole}.{}", n / 10),
            n => write!(f, "{whole}.{n:02}"),
        }
    }
}

/// One dimension's part of a score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Part {
    pub dimension: Dimension,
    pub grade: Grade,
    /// `points × weight`, in hundredths: 50 points × 30 % = `Score(1500)`.
    pub weighted: Score,
}

/// The approval band of a score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Band {
    /// Below 30: auto-approve.
    Low,
    /// 30 to below 70: ask a human, approve on timeout.
    Medium,
    /// 70 and above: explicit approval, deny on timeout.
    High,
}

impl Band {
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::Medium => "medium",
            Band::High => "high",
        }
    }

    /// The decision effect before any human answer.
    pub fn effect(self) -> Effect {
        match self {
            Band::Low => Effect::Allow,
            Band::Medium | Band::High => Effect::RequireApproval,
        }
    }

    /// The stable reason code.
    pub fn reason(self) -> &'static str {
        match self {
            Band::Low => "risk_low",
            Band::Medium => "risk_medium",
            Band::High => "risk_high",
        }
    }
}

/// What happens to a pending approval when nobody answers in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    Approve,
    Deny,
}

/// Band limits and approval timeouts. Defaults: 30, 70, 15 min, 60 min.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Scores below this (hundredths) are auto-approved.
    pub medium_from: Score,
    /// Scores from this (hundredths) need explicit approval.
    pub high_from: Score,
    pub medium_timeout_ms: u64,
    pub high_timeout_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            medium_from: Score(3000),
            high_from: Score(7000),
            medium_timeout_ms: 15 * 60_000,
            high_timeout_ms: 60 * 60_000,
        }
    }
}

impl Thresholds {
    /// Decodes `{medium_from: 30, high_from: 70, medium_timeout: 15m, high_timeout: 60m}`, each
    /// optional (whole points for the limits).
    pub fn decode(cx: &mut Cx, field: &Field<'_>) -> Thresholds {
        let mut t = Thresholds::default();
        let Some(mut obj) = cx.object(field) else { return t };
        let mut points = |cx: &mut Cx, key: &str, into: &mut Score| {
            if let Some(f) = obj.get(key) {
                match f.u64(cx) {
                    Some(n @ 0..=100) => *into = Score(n as u32 * 100),
                    Some(_) => f.error(cx, "must be between 0 and 100"),
                    None => {}
                }
            }
        };
        points(cx, "medium_from", &mut t.medium_from);
        points(cx, "high_from", &mut t.high_from);
        if let Some(ms) = obj.get("medium_timeout").and_then(|f| f.duration_ms(cx)) {
            t.medium_timeout_ms = ms;
        }
        if let Some(ms) = obj.get("high_timeout").and_then(|f| f.duration_ms(cx)) {
            t.high_timeout_ms = ms;
        }
        if t.medium_from > t.high_from {
            cx.error(obj.path(), obj.node(), "medium_from must not be above high_from");
        }
        obj.finish(cx, &["medium_from", "high_from", "medium_timeout", "high_timeout"]);
        t
    }

    pub fn band(&self, score: Score) -> Band {
        if score < self.medium_from {
            Band::Low
        } else if score < self.high_from {
            Band::Medium
        } else {
            Band::High
        }
    }
}

/// A scored action, ready for a decision's explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Assessment {
    pub score: Score,
    pub parts: [Part; 5],
    pub band: Band,
    /// `None` for the low band (nothing to wait for).
    pub on_timeout: Option<OnTimeout>,
    /// How long to wait for a human; `None` for the low band.
    pub timeout_ms: Option<u64>,
}

impl Assessment {
    /// `risk 22 (low): blast_radius medium 15, reversibility low 2.5, ...`.
    pub fn explanation(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{} {} {}", p.dimension.as_str(), p.grade.as_str(), p.weighted))
            .collect();
        let then = match (self.on_timeout, self.timeout_ms) {
            (Some(OnTimeout::Approve), Some(ms)) => {
                format!("; approved if nobody answers within {} min", ms / 60_000)
            }
            (Some(OnTimeout::Deny), Some(ms)) => {
                format!("; needs explicit approval, denied after {} min", ms / 60_000)
            }
            _ => String::new(),
        };
        format!("risk {} ({}): {}{then}", self.score, self.band.as_str(), parts.join(", "))
    }
}

/// Scores `factors` and bands the result with `thresholds`. Pure and allocation-free.
pub fn assess(factors: &Factors, thresholds: &Thresholds) -> Assessment {
    let parts = Dimension::ALL.map(|dimension| {
        let grade = factors.grade(dimension);
        Part { dimension, grade, weighted: Score(grade.points() * dimension.weight_percent()) }
    });
    let score = Score(parts.iter().map(|p| p.weighted.0).sum());
    let band = thresholds.band(score);
    let (on_timeout, timeout_ms) = match band {
        Band::Low => (None, None),
        Band::Medium => (Some(OnTimeout::Approve), Some(thresholds.medium_timeout_ms)),
        Band::High => (Some(OnTimeout::Deny), Some(thresholds.high_timeout_ms)),
    };
    Assessment { score, parts, band, on_timeout, timeout_ms }
}

#[cfg(test)]
mod tests;
