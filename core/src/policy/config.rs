//! Decoding and validating a policy document into a [`Snapshot`].
//!
//! Every problem is reported with its field path and line in one pass: unknown fields, a
//! missing `version`, unknown effects, routes or categories, invalid globs, empty lists, zero
//! rate limits, invalid amounts, duplicate rule ids, duplicate budget ids (unique across the
//! whole document, rule budgets included), a fixed budget `key` on a `global` budget, and any
//! rule after a catch-all (`match: {}`), which could never fire. This module only reads the
//! document tree; it never touches files.

use std::collections::HashMap;

use super::glob::Glob;
use super::rule::{Condition, Dim, Outcome, Pattern, RouteSet, Rule};
use super::{Effect, Limits, RouteKind, Snapshot, CATEGORIES};
use crate::budget::{BudgetSpec, Scope};
use crate::doc::{Cx, Field, Value};
use crate::time::Period;

const DOCUMENT_FIELDS: [&str; 5] = ["version", "defaults", "limits", "budgets", "rules"];
const RULE_FIELDS: [&str; 8] =
    ["id", "match", "effect", "reason", "explanation", "limits", "budgets", "risk"];
const LIMIT_FIELDS: [&str; 3] = ["rpm", "tpm", "max_cost_per_request"];
const BUDGET_FIELDS: [&str; 5] = ["id", "scope", "key", "period", "amount"];
const PERIODS: [&str; 4] = ["hourly", "daily", "weekly", "monthly"];

/// Shipped defaults: "no silent allow" for tools and unknown hosts.
const SHIPPED_DEFAULTS: [Effect; 3] = [Effect::Allow, Effect::RequireApproval, Effect::Deny];

/// Where an id was first defined, to name it in the duplicate error.
type Seen<'a> = HashMap<&'a str, u32>;

pub(super) fn decode(cx: &mut Cx, field: &Field<'_>) -> Option<Snapshot> {
    let mut obj = cx.object(field)?;
    let version = obj.require(cx, "version").and_then(|f| f.non_empty_str(cx));
    let defaults = defaults(cx, obj.get("defaults"));
    let limits = obj.get("limits").map(|f| limits(cx, &f)).unwrap_or_default();
    let mut budget_ids = Seen::new();
    let budgets = obj
        .get("budgets")
        .map(|f| f.items(cx))
        .unwrap_or_default()
        .iter()
        .filter_map(|f| budget(cx, f, &mut budget_ids))
        .collect();
    let mut rule_ids = Seen::new();
    let mut catch_all: Option<(String, u32)> = None;
    let mut rules = Vec::new();
    for item in obj.get("rules").map(|f| f.items(cx)).unwrap_or_default() {
        if let Some((id, line)) = &catch_all {
            item.error(
                cx,
                format!("unreachable: rule `{id}` (line {line}) before it matches every request"),
            );
        }
        if let Some(r) = rule(cx, &item, limits, &mut rule_ids, &mut budget_ids) {
            if r.is_catch_all() && catch_all.is_none() {
                catch_all = Some((r.id().to_string(), r.line));
            }
            rules.push(r);
        }
    }
    obj.finish(cx, &DOCUMENT_FIELDS);
    Some(Snapshot::compile(version?.to_string(), defaults, limits, budgets, rules))
}

fn defaults(cx: &mut Cx, field: Option<Field<'_>>) -> [Outcome; 3] {
    let mut effects = SHIPPED_DEFAULTS;
    if let Some(mut obj) = field.and_then(|f| cx.object(&f)) {
        for kind in RouteKind::ALL {
            if let Some(f) = obj.get(kind.as_str()) {
                if let Some(e) = f.one_of(cx, &Effect::NAMES).and_then(Effect::parse) {
                    effects[kind.index()] = e;
                }
            }
        }
        obj.finish(cx, &RouteKind::NAMES);
    }
    RouteKind::ALL.map(|kind| default_outcome(kind, effects[kind.index()]))
}

fn default_outcome(kind: RouteKind, effect: Effect) -> Outcome {
    let what = match kind {
        RouteKind::Llm => "model calls",
        RouteKind::Tool => "tool actions",
        RouteKind::Other => "requests to other hosts",
    };
    let explanation = match effect {
        Effect::Allow => format!("no policy rule matched; {what} are allowed by default"),
        Effect::Deny => format!("no policy rule matched; {what} are denied by default"),
        Effect::RequireApproval => {
            format!("no policy rule matched; {what} require approval by default")
        }
    };
    Outcome {
        effect,
        reason: format!("default_{effect}"),
        clause: format!("defaults.{}", kind.as_str()),
        explanation,
        risk: None,
    }
}

fn limits(cx: &mut Cx, field: &Field<'_>) -> Limits {
    let Some(mut obj) = cx.object(field) else { return Limits::default() };
    let mut rate = |cx: &mut Cx, key: &str| {
        let f = obj.get(key)?;
        let n = f.u64(cx)?;
        if n == 0 {
            f.error(cx, "must be at least 1 (use `effect: deny` to block requests)");
            return None;
        }
        Some(n)
    };
    let rpm = rate(cx, "rpm");
    let tpm = rate(cx, "tpm");
    let max_cost_per_request = obj.get("max_cost_per_request").and_then(|f| f.money(cx));
    obj.finish(cx, &LIMIT_FIELDS);
    Limits { rpm, tpm, max_cost_per_request }
}

/// Decodes one budget (`{id, scope, key?, period, amount}`), checking that its id is unique
/// among `seen` (pass one map for a whole document).
pub fn budget_from_field<'a>(
    cx: &mut Cx,
    field: &Field<'a>,
    seen: &mut HashMap<&'a str, u32>,
) -> Option<BudgetSpec> {
    budget(cx, field, seen)
}

fn budget<'a>(cx: &mut Cx, field: &Field<'a>, seen: &mut Seen<'a>) -> Option<BudgetSpec> {
    let mut obj = cx.object(field)?;
    let id = obj.require(cx, "id").and_then(|f| identifier(cx, &f, "budget", seen));
    let scope = obj.require(cx, "scope").and_then(|f| f.one_of(cx, &Scope::NAMES));
    let scope = scope.and_then(Scope::parse);
    let key = obj.get("key");
    let key = match (&key, scope) {
        (Some(f), Some(Scope::Global)) => {
            f.error(cx, "a `global` budget has no key; remove `key` or choose another scope");
            None
        }
        (Some(f), _) => f.non_empty_str(cx).map(str::to_string),
        (None, _) => None,
    };
    let period = obj.require(cx, "period").and_then(|f| f.one_of(cx, &PERIODS));
    let amount = obj.require(cx, "amount").and_then(|f| f.money(cx));
    obj.finish(cx, &BUDGET_FIELDS);
    Some(BudgetSpec {
        id: id?.to_string(),
        scope: scope?,
        key,
        period: period.and_then(Period::parse)?,
        amount: amount?,
    })
}

/// A rule or budget id: non-empty, `[A-Za-z0-9_.:-]`, unique among `seen`.
fn identifier<'a>(cx: &mut Cx, f: &Field<'a>, what: &str, seen: &mut Seen<'a>) -> Option<&'a str> {
    let id = f.non_empty_str(cx)?;
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)) {
        f.error(
            cx,
            format!("{what} id `{id}` may only contain letters, digits, `_`, `.`, `:`, `-`"),
        );
        return None;
    }
    if let Some(line) = seen.get(id) {
        f.error(cx, format!("duplicate {what} id `{id}` (first defined on line {line})"));
        return None;
    }
    seen.insert(id, f.node.line);
    Some(id)
}

fn rule<'a>(
    cx: &mut Cx,
    field: &Field<'a>,
    defaults: Limits,
    rule_ids: &mut Seen<'a>,
    budget_ids: &mut Seen<'a>,
) -> Option<Rule> {
    let mut obj = cx.object(field)?;
    let id = obj.require(cx, "id").and_then(|f| identifier(cx, &f, "rule", rule_ids));
    let matched = obj.require(cx, "match").and_then(|f| conditions(cx, &f));
    let effect = obj.require(cx, "effect").and_then(|f| f.one_of(cx, &Effect::NAMES));
    let effect = effect.and_then(Effect::parse);
    let reason = obj.get("reason").and_then(|f| {
        let code = f.non_empty_str(cx)?;
        let valid = code.starts_with(|c: char| c.is_ascii_lowercase())
            && code.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            f.error(cx, format!("reason `{code}` must be a snake_case code such as `over_budget`"));
            return None;
        }
        Some(code)
    });
    let explanation = obj.get("explanation").and_then(|f| f.non_empty_str(cx));
    let risk = obj.get("risk").map(|f| crate::risk::Profile::decode(cx, &f));
    let own_limits = obj.get("limits").map(|f| limits(cx, &f)).unwrap_or_default();
    let budgets = obj
        .get("budgets")
        .map(|f| f.items(cx))
        .unwrap_or_default()
        .iter()
        .filter_map(|f| budget(cx, f, budget_ids))
        .collect();
    obj.finish(cx, &RULE_FIELDS);
    let (id, (conditions, routes), effect) = (id?, matched?, effect?);
    let explanation = match explanation {
        Some(text) => text.to_string(),
        None => match effect {
            Effect::Allow => format!("allowed by policy rule `{id}`"),
            Effect::Deny => format!("denied by policy rule `{id}`"),
            Effect::RequireApproval => format!("policy rule `{id}` requires approval"),
        },
    };
    let outcome = Outcome {
        effect,
        reason: reason.map_or_else(|| format!("rule_{effect}"), str::to_string),
        clause: id.to_string(),
        explanation,
        risk,
    };
    Some(Rule {
        conditions,
        routes,
        outcome,
        limits: own_limits.or(defaults),
        budgets,
        line: field.node.line,
    })
}

fn conditions(cx: &mut Cx, field: &Field<'_>) -> Option<(Vec<Condition>, RouteSet)> {
    let mut obj = cx.object(field)?;
    let mut conditions = Vec::new();
    for (dim, key) in Dim::ALL {
        let Some(f) = obj.get(key) else { continue };
        let any_of: Vec<Pattern> =
            values(cx, &f).iter().filter_map(|(text, vf)| pattern(cx, dim, text, vf)).collect();
        if !any_of.is_empty() {
            conditions.push(Condition { dim, any_of });
        }
    }
    let mut routes = RouteSet::ALL;
    if let Some(f) = obj.get("route") {
        routes = RouteSet::default();
        for (_, vf) in values(cx, &f) {
            if let Some(kind) = vf.one_of(cx, &RouteKind::NAMES).and_then(RouteKind::parse) {
                routes = routes.with(kind);
            }
        }
    }
    let mut allowed: Vec<&str> = Dim::ALL.iter().map(|(_, k)| *k).collect();
    allowed.push("route");
    obj.finish(cx, &allowed);
    Some((conditions, routes))
}

/// A scalar or a non-empty list of scalars, each with its own field (for its line).
fn values<'a>(cx: &mut Cx, field: &Field<'a>) -> Vec<(&'a str, Field<'a>)> {
    match &field.node.value {
        Value::Scalar { .. } => field.str(cx).map(|s| (s, field.clone())).into_iter().collect(),
        Value::Seq(items) if items.is_empty() => {
            field.error(cx, "empty list matches nothing; remove the field to match any value");
            Vec::new()
        }
        _ => field.items(cx).into_iter().filter_map(|f| f.str(cx).map(|s| (s, f))).collect(),
    }
}

fn pattern(cx: &mut Cx, dim: Dim, text: &str, f: &Field<'_>) -> Option<Pattern> {
    if text.is_empty() {
        f.error(cx, "must not be empty");
        return None;
    }
    match dim {
        Dim::Category if !CATEGORIES.contains(&text) => {
            f.error(
                cx,
                format!("unknown category `{text}`, expected one of: {}", CATEGORIES.join(", ")),
            );
            None
        }
        Dim::Path if !text.starts_with(['/', '*']) => {
            f.error(cx, format!("path `{text}` must start with `/`"));
            None
        }
        Dim::Path if !Glob::is_pattern(text) => Some(Pattern::PathPrefix(text.into())),
        _ if Glob::is_pattern(text) => match Glob::parse(text) {
            Ok(g) => Some(Pattern::Glob(g)),
            Err(e) => {
                f.error(cx, format!("invalid glob `{text}`: {e}"));
                None
            }
        },
        _ => Some(Pattern::Exact(text.into())),
    }
}
