use proptest::prelude::*;

use super::*;
use crate::doc;

fn f(b: Grade, r: Grade, d: Grade, c: Grade, h: Grade) -> Factors {
    Factors {
        blast_radius: b,
        reversibility: r,
        data_sensitivity: d,
        cost_impact: c,
        historical_success: h,
    }
}

#[test]
fn seed_example_deploy_tested_service_scores_22_and_is_auto_approved() {
    // 10 pods, automatic rollback, internal data, $50, 98 % success.
    let factors = Factors {
        blast_radius: blast_radius(10),
        reversibility: Reversibility::AutomaticRollback.grade(),
        data_sensitivity: Sensitivity::Internal.grade(),
        cost_impact: cost_impact(Money::from_usd(50)),
        historical_success: historical_success(98, 100),
    };
    let a = assess(&factors, &Thresholds::default());
    assert_eq!(a.score, Score(2200));
    assert_eq!(a.score.to_string(), "22");
    let weighted: Vec<u32> = a.parts.iter().map(|p| p.weighted.0).collect();
    assert_eq!(weighted, vec![1500, 250, 200, 150, 100]);
    assert_eq!(
        (a.band, a.band.effect(), a.on_timeout, a.timeout_ms),
        (Band::Low, Effect::Allow, None, None)
    );
    assert_eq!(
        a.explanation(),
        "risk 22 (low): blast_radius medium 15, reversibility low 2.5, data_sensitivity low 2, \
         cost_impact low 1.5, historical_success low 1"
    );
}

#[test]
fn seed_example_delete_production_database_scores_90_and_denies_on_timeout() {
    // 100+ resources, irreversible, critical data, $5000, never done.
    let factors = Factors {
        blast_radius: blast_radius(100),
        reversibility: Reversibility::Irreversible.grade(),
        data_sensitivity: Sensitivity::Critical.grade(),
        cost_impact: cost_impact(Money::from_usd(5000)),
        historical_success: historical_success(0, 0),
    };
    let a = assess(&factors, &Thresholds::default());
    assert_eq!(a.score, Score(9000));
    let weighted: Vec<u32> = a.parts.iter().map(|p| p.weighted.0).collect();
    assert_eq!(weighted, vec![2700, 2250, 1800, 1350, 900]);
    assert_eq!(a.band, Band::High);
    assert_eq!(a.band.effect(), Effect::RequireApproval);
    assert_eq!((a.on_timeout, a.timeout_ms), (Some(OnTimeout::Deny), Some(3_600_000)));
    assert!(a.explanation().ends_with("denied after 60 min"), "{}", a.explanation());
}

#[test]
fn bands_split_at_30_and_70() {
    use Grade::*;
    let t = Thresholds::default();
    let cases = [
        // 10·30 + 50·25 + 50·20 + 10·15 + 10·10 = 2800
        (f(Low, Medium, Medium, Low, Low), 2800, Band::Low),
        // 50·30 + 10·25 + 50·20 + 10·15 + 10·10 = 3000 exactly: medium
        (f(Medium, Low, Medium, Low, Low), 3000, Band::Medium),
        // 90·30 + 50·25 + 50·20 + 50·15 + 50·10 = 6200
        (f(High, Medium, Medium, Medium, Medium), 6200, Band::Medium),
        // 90·30 + 90·25 + 10·20 + 50·15 + 10·10 = 6000
        (f(High, High, Low, Medium, Low), 6000, Band::Medium),
        // 90·30 + 90·25 + 50·20 + 10·15 + 10·10 = 6200; + data high → 7000 exactly: high
        (f(High, High, High, Low, Low), 7000, Band::High),
    ];
    for (factors, score, band) in cases {
        let a = assess(&factors, &t);
        assert_eq!((a.score, a.band), (Score(score), band), "{factors:?}");
    }
    let medium = assess(&f(Medium, Low, Medium, Low, Low), &t);
    assert_eq!((medium.on_timeout, medium.timeout_ms), (Some(OnTimeout::Approve), Some(900_000)));
}

#[test]
fn classifiers_follow_the_seed_boundaries() {
    let blast = [
        (0, Grade::Low),
        (4, Grade::Low),
        (5, Grade::Medium),
        (50, Grade::Medium),
        (51, Grade::High),
    ];
    for (n, g) in blast {
        assert_eq!(blast_radius(n), g, "{n} resources");
    }
    let cost = [
        ("0", Grade::Low),
        ("99.999999999", Grade::Low),
        ("100", Grade::Medium),
        ("1000", Grade::Medium),
        ("1000.000000001", Grade::High),
    ];
    for (usd, g) in cost {
        assert_eq!(cost_impact(Money::parse(usd).unwrap()), g, "${usd}");
    }
    let history = [
        ((0, 0), Grade::High),
        ((96, 100), Grade::Low),
        ((95, 100), Grade::Medium),
        ((80, 100), Grade::Medium),
        ((79, 100), Grade::High),
        ((20, 20), Grade::Low),
        ((19, 20), Grade::Medium),
        // More successes than attempts is corrupt input: capped, not a division surprise.
        ((50, 10), Grade::Low),
    ];
    for ((s, t), g) in history {
        assert_eq!(historical_success(s, t), g, "{s}/{t}");
    }
    assert_eq!(Sensitivity::Pii.grade(), Grade::High);
    assert_eq!(Sensitivity::Confidential.grade(), Grade::Medium);
    assert_eq!(Sensitivity::Public.grade(), Grade::Low);
    assert_eq!(Reversibility::ManualRollback.grade(), Grade::Medium);
}

#[test]
fn profiles_decode_config_words_and_fill_the_rest() {
    let node = doc::parse(
        "risk: {blast_radius: high, reversibility: manual_rollback, data_sensitivity: pii}",
    )
    .unwrap();
    let mut cx = Cx::new();
    let mut root = cx.object(&Field::root(&node)).unwrap();
    let field = root.require(&mut cx, "risk").unwrap();
    let p = Profile::decode(&mut cx, &field);
    cx.finish(()).unwrap();
    assert_eq!(
        p,
        Profile {
            blast_radius: Some(Grade::High),
            reversibility: Some(Grade::Medium),
            data_sensitivity: Some(Grade::High),
            cost_impact: None,
            historical_success: None,
        }
    );
    let filled = p.factors(Some(Money::from_usd(150)), Some((99, 100)));
    assert_eq!((filled.cost_impact, filled.historical_success), (Grade::Medium, Grade::Low));
    // Nothing known: high.
    let unknown = Profile::default().factors(None, None);
    assert_eq!(assess(&unknown, &Thresholds::default()).score, Score(9000));
}

#[test]
fn profile_errors_list_the_accepted_words() {
    let node = doc::parse("reversibility: maybe\nblast_radius: 3\nspeed: high\n").unwrap();
    let mut cx = Cx::new();
    let _ = Profile::decode(&mut cx, &Field::root(&node));
    let errors = cx.finish(()).unwrap_err().0;
    assert_eq!(errors.len(), 3);
    assert_eq!((errors[0].path.as_str(), errors[0].line), ("reversibility", 1));
    assert!(errors[0].message.contains("automatic_rollback, manual_rollback, irreversible"));
    assert_eq!(errors[1].path, "blast_radius");
    assert_eq!(errors[2].path, "speed");
}

#[test]
fn thresholds_decode_and_validate() {
    let node = doc::parse("{medium_from: 20, high_from: 80, medium_timeout: 30m}").unwrap();
    let mut cx = Cx::new();
    let t = Thresholds::decode(&mut cx, &Field::root(&node));
    cx.finish(()).unwrap();
    assert_eq!(t.band(Score(1999)), Band::Low);
    assert_eq!(t.band(Score(2000)), Band::Medium);
    assert_eq!(t.band(Score(8000)), Band::High);
    assert_eq!((t.medium_timeout_ms, t.high_timeout_ms), (1_800_000, 3_600_000));
    let node = doc::parse("{medium_from: 80, high_from: 70}").unwrap();
    let mut cx = Cx::new();
    let _ = Thresholds::decode(&mut cx, &Field::root(&node));
    assert!(cx.finish(()).is_err());
}

fn grade() -> impl Strategy<Value = Grade> {
    prop_oneof![Just(Grade::Low), Just(Grade::Medium), Just(Grade::High)]
}

proptest! {
    #[test]
    fn score_is_always_between_10_and_90_and_equals_its_parts(
        b in grade(), r in grade(), d in grade(), c in grade(), h in grade()
    ) {
        let a = assess(&f(b, r, d, c, h), &Thresholds::default());
        prop_assert!((1000..=9000).contains(&a.score.0));
        prop_assert_eq!(a.score.0, a.parts.iter().map(|p| p.weighted.0).sum::<u32>());
    }

    #[test]
    fn raising_any_grade_never_lowers_the_score(
        b in grade(), r in grade(), d in grade(), c in grade(), h in grade()
    ) {
        let base = assess(&f(b, r, d, c, h), &Thresholds::default()).score;
        let higher = assess(&f(Grade::High, r, d, c, h), &Thresholds::default()).score;
        prop_assert!(higher >= base);
    }

    #[test]
    fn more_successes_never_raise_the_history_grade(s in 0u64..10_000, extra in 1u64..10_000) {
        let t = s + extra;
        prop_assert!(historical_success(s + 1, t) <= historical_success(s, t));
    }
}

#[test]
fn a_rules_profile_over_its_routes_keeps_the_routes_grades_it_leaves_open() {
    let route = Profile {
        blast_radius: Some(Grade::Low),
        data_sensitivity: Some(Grade::High),
        ..Profile::default()
    };
    let rule = Profile { blast_radius: Some(Grade::High), ..Profile::default() };
    let merged = rule.over(route);
    assert_eq!(merged.blast_radius, Some(Grade::High), "the rule wins");
    assert_eq!(merged.data_sensitivity, Some(Grade::High), "the route fills in");
    assert_eq!(merged.reversibility, None, "unknown stays unknown (scored high)");
}
