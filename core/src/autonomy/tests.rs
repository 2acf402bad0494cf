use std::sync::Arc;

use super::*;
use crate::time::Date;

const FIXTURE: &str = include_str!("../../fixtures/autonomy/autonomy.yaml");

fn day(d: u32) -> UnixMillis {
    Date { year: 2026, month: 11, day: d }.start()
}

/// A policy where every level is configured for tenant `T`, account `A` and action `x`, with
/// a distinct mode per level so the winner is visible.
const ALL_LEVELS: &str = "
autonomy:
  default: DISABLED
  tenants:
    T: {default: PROPOSE_ONLY, actions: {x: AUTO_EXECUTE, y: DISABLED}}
  accounts:
    A: {default: APPROVAL_REQUIRED, actions: {x: PROPOSE_ONLY}}
";

#[test]
fn each_precedence_level_wins_when_present() {
    let p = Policy::from_yaml(ALL_LEVELS).unwrap();
    let cases = [
        // (tenant, account, action) → (mode, level)
        (("T", "A", "x"), (Mode::ProposeOnly, Level::AccountAction)),
        (("T", "B", "x"), (Mode::AutoExecute, Level::TenantAction)),
        (("T", "A", "z"), (Mode::ApprovalRequired, Level::AccountDefault)),
        (("T", "B", "z"), (Mode::ProposeOnly, Level::TenantDefault)),
        (("U", "B", "z"), (Mode::Disabled, Level::GlobalDefault)),
        // Tenant + action beats the account default.
        (("T", "A", "y"), (Mode::Disabled, Level::TenantAction)),
        // An account's default applies under any tenant.
        (("U", "A", "x"), (Mode::ProposeOnly, Level::AccountAction)),
        (("U", "A", "z"), (Mode::ApprovalRequired, Level::AccountDefault)),
    ];
    for ((tenant, account, action), (mode, level)) in cases {
        assert_eq!(
            p.resolve(tenant, account, action),
            Resolution { mode, level },
            "{tenant}/{account}/{action}"
        );
    }
}

#[test]
fn nothing_configured_is_approval_required_never_auto_execute() {
    for p in [Policy::default(), Policy::from_yaml("autonomy: {}").unwrap()] {
        assert_eq!(
            p.resolve("CC-0001", "agent", "llm"),
            Resolution { mode: Mode::ApprovalRequired, level: Level::Builtin }
        );
    }
}

#[test]
fn fixture_resolves_as_documented() {
    let p = Policy::from_yaml(FIXTURE).unwrap();
    let cases = [
        (("CC-1234", "any-agent", "run_command"), (Mode::AutoExecute, Level::TenantDefault)),
        (
            ("CC-1234", "any-agent", "deploy_to_production"),
            (Mode::ApprovalRequired, Level::TenantAction),
        ),
        (("CC-9999", "security-agent", "delete_resource"), (Mode::Disabled, Level::AccountAction)),
        (("CC-9999", "security-agent", "llm"), (Mode::AutoExecute, Level::AccountDefault)),
        (("CC-9999", "other", "llm"), (Mode::ApprovalRequired, Level::GlobalDefault)),
    ];
    for ((tenant, account, action), (mode, level)) in cases {
        assert_eq!(p.resolve(tenant, account, action), Resolution { mode, level });
    }
    assert_eq!(p.limits("someone", "llm"), Limits { per_day: Some(100), per_action: None });
    assert_eq!(
        p.limits("someone", "deploy_to_production"),
        Limits { per_day: Some(100), per_action: Some(5) }
    );
    assert_eq!(
        p.limits("security-agent", "deploy_to_production"),
        Limits { per_day: Some(500), per_action: Some(5) }
    );
}

#[test]
fn config_errors_name_path_and_line() {
    let text = "autonomy:\n  default: YOLO\n  tenants:\n    T: {default: AUTO_EXECUTE, action: {}}\n  budgets:\n    default: {per_day: -1}\n";
    let errors = Policy::from_yaml(text).unwrap_err().0;
    let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
    assert_eq!(
        got,
        vec![
            ("autonomy.default", 2),
            ("autonomy.tenants.T.action", 4),
            ("autonomy.budgets.default.per_day", 6),
        ]
    );
    assert!(errors[0].message.contains("PROPOSE_ONLY, APPROVAL_REQUIRED"), "{}", errors[0]);
    assert!(errors[1].message.contains("unknown field `action`"), "{}", errors[1]);
}

#[test]
fn gate_maps_each_mode_to_its_effect() {
    let consumed = Some(BudgetOutcome::Consumed {
        used: 1,
        limit: Some(5),
        action_used: 1,
        action_limit: None,
    });
    let exhausted = Some(BudgetOutcome::Exhausted { limit: BudgetLimit::PerDay, used: 5, max: 5 });
    let cases = [
        (Mode::Disabled, consumed, Effect::Deny, "autonomy_disabled"),
        (Mode::ProposeOnly, None, Effect::Deny, "autonomy_propose_only"),
        (Mode::ApprovalRequired, consumed, Effect::RequireApproval, "autonomy_approval_required"),
        (Mode::AutoExecute, consumed, Effect::Allow, "autonomy_auto_execute"),
        (Mode::AutoExecute, exhausted, Effect::RequireApproval, "autonomy_budget_exhausted"),
        (Mode::AutoExecute, None, Effect::RequireApproval, "autonomy_budget_not_consumed"),
    ];
    for (mode, budget, effect, code) in cases {
        let g = gate(Resolution { mode, level: Level::TenantDefault }, budget);
        assert_eq!((g.effect, g.reason.code()), (effect, code), "{mode}");
        assert!(g.explanation().contains(mode.as_str()), "{}", g.explanation());
    }
    let g = gate(Resolution { mode: Mode::ProposeOnly, level: Level::Builtin }, None);
    assert!(g.explanation().contains("proposal recorded"));
    let g = gate(Resolution { mode: Mode::AutoExecute, level: Level::AccountDefault }, exhausted);
    assert_eq!(
        g.explanation(),
        "the action is AUTO_EXECUTE by the agent's default, but the agent's daily autonomy \
         budget is used up (5/5 today): a human must approve it"
    );
}

#[test]
fn budget_consumes_up_to_the_limit_then_requires_approval() {
    let p = Policy::from_yaml(FIXTURE).unwrap();
    let counters = Counters::default();
    let now = day(22);
    for i in 1..=5 {
        let g = p.decide(&counters, "CC-1234", "a1", "deploy_to_production", now);
        // deploy_to_production is APPROVAL_REQUIRED for CC-1234: no budget is consumed.
        assert_eq!(g.effect, Effect::RequireApproval, "{i}");
        assert_eq!(g.budget, None);
    }
    let p = Policy::from_yaml(
        "autonomy:\n  default: AUTO_EXECUTE\n  budgets:\n    default: {per_day: 3, per_action: {deploy: 2}}\n",
    )
    .unwrap();
    let effects: Vec<(Effect, &str)> = ["deploy", "deploy", "deploy", "llm", "llm"]
        .iter()
        .map(|a| {
            let g = p.decide(&counters, "T", "a1", a, now);
            (g.effect, g.reason.code())
        })
        .collect();
    assert_eq!(
        effects,
        vec![
            (Effect::Allow, "autonomy_auto_execute"),
            (Effect::Allow, "autonomy_auto_execute"),
            (Effect::RequireApproval, "autonomy_budget_exhausted"),
            (Effect::Allow, "autonomy_auto_execute"),
            (Effect::RequireApproval, "autonomy_budget_exhausted"),
        ]
    );
    assert_eq!(counters.used("a1", "deploy", now), (3, 2));
    // The next UTC day starts from zero.
    let g = p.decide(&counters, "T", "a1", "deploy", day(23));
    assert_eq!(
        g.budget,
        Some(BudgetOutcome::Consumed {
            used: 1,
            limit: Some(3),
            action_used: 1,
            action_limit: Some(2)
        })
    );
    assert_eq!(counters.used("a1", "deploy", day(22)), (0, 0));
}

#[test]
fn twenty_threads_racing_a_budget_of_five_consume_exactly_five() {
    let counters = Arc::new(Counters::default());
    let limits = Limits { per_day: Some(5), per_action: None };
    let now = day(22);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let counters = Arc::clone(&counters);
            std::thread::spawn(move || {
                matches!(
                    counters.consume(limits, "agent", "run_command", now),
                    BudgetOutcome::Consumed { .. }
                )
            })
        })
        .collect();
    let consumed = handles.into_iter().map(|h| h.join().unwrap_or(false)).filter(|&ok| ok).count();
    assert_eq!(consumed, 5);
    assert_eq!(counters.used("agent", "run_command", now), (5, 5));
}

#[test]
fn budget_keys_are_pure_and_name_the_utc_day() {
    let now = day(22).saturating_add_ms(23 * 3_600_000);
    assert_eq!(
        budget_keys("security-agent", "deploy", now),
        BudgetKeys {
            total: "autonomy:security-agent:2026-11-22".into(),
            action: "autonomy:security-agent:2026-11-22:deploy".into(),
            expires_at: day(23),
        }
    );
}

#[test]
fn gate_ignores_a_budget_outcome_for_other_modes() {
    let consumed =
        BudgetOutcome::Consumed { used: 1, limit: None, action_used: 1, action_limit: None };
    let g =
        gate(Resolution { mode: Mode::ApprovalRequired, level: Level::Builtin }, Some(consumed));
    assert_eq!((g.effect, g.budget), (Effect::RequireApproval, None));
}

#[test]
fn non_auto_modes_consume_no_budget() {
    let p = Policy::from_yaml(ALL_LEVELS).unwrap();
    let counters = Counters::default();
    for (tenant, account, action) in [("T", "A", "x"), ("T", "A", "z"), ("U", "B", "z")] {
        let g = p.decide(&counters, tenant, account, action, day(22));
        assert_eq!(g.budget, None);
        assert_eq!(counters.used(account, action, day(22)), (0, 0));
    }
    let g = p.decide(&counters, "T", "B", "x", day(22));
    assert_eq!((g.effect, counters.used("B", "x", day(22))), (Effect::Allow, (1, 1)));
}

#[test]
fn a_day_record_consumes_as_the_counters_do_through_its_bytes() {
    let counters = Counters::default();
    let mut record = DayCounts::default();
    let limits =
        |action: &str| Limits { per_day: Some(4), per_action: (action == "deploy").then_some(2) };
    let calls = [
        ("deploy", day(22)),
        ("deploy", day(22)),
        ("deploy", day(22)),
        ("read", day(22)),
        ("read", day(22)),
        ("read", day(22)),
        // The next day starts again; a late clock counts against the newer day.
        ("deploy", day(23)),
        ("deploy", day(22)),
        ("deploy", day(23)),
    ];
    for (i, (action, now)) in calls.into_iter().enumerate() {
        let mut stored = DayCounts::decode(&record.encode()).expect("a record");
        let got = stored.consume(limits(action), action, now);
        // The in-memory counters drop an earlier day's calls: only compare the same days.
        if i < 7 {
            assert_eq!(got, counters.consume(limits(action), "a", action, now), "call {i}");
        }
        record = stored;
    }
    assert_eq!(
        record.clone().consume(limits("deploy"), "deploy", day(23)),
        BudgetOutcome::Exhausted { limit: BudgetLimit::PerAction, used: 2, max: 2 },
        "the late call counted in the newer day"
    );
    assert_eq!(DayCounts::decode(b""), Some(DayCounts::default()));
    assert_eq!(DayCounts::decode(b"short"), None);
    let mut bytes = record.encode();
    bytes.push(1);
    assert_eq!(DayCounts::decode(&bytes), None);
}

#[test]
fn a_day_record_holds_a_bounded_number_of_actions() {
    let mut record = DayCounts::default();
    let unlimited = Limits::default();
    for i in 0..budget::MAX_ACTIONS_PER_DAY {
        let got = record.consume(unlimited, &format!("a{i}"), day(22));
        assert!(matches!(got, BudgetOutcome::Consumed { .. }), "{got:?}");
    }
    assert!(matches!(
        record.consume(unlimited, "one-more", day(22)),
        BudgetOutcome::Exhausted { limit: BudgetLimit::Capacity, .. }
    ));
    assert!(matches!(record.consume(unlimited, "a0", day(22)), BudgetOutcome::Consumed { .. }));
}
