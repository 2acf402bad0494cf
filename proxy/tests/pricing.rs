//! LiteLLM's real price file (the pinned release `scripts/fetch-litellm-prices` puts in
//! `target/litellm/`) through the `tollgate` binary: converted by `tollgate pricing import`, and
//! loaded by a config's `pricing.litellm_file`; known models must come out at their exact prices
//! and limits. Bad input is refused with the entry, field and line named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tollgate::config::Config;
use tollgate_core::pricing::{ModelLimits, Rate, RateCard, Rates};
use tollgate_e2e::harness::temp_dir;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The real LiteLLM price file; its absence is a failure that names the setup step.
fn litellm_file() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/litellm/model_prices_and_context_window.json");
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/fetch-litellm-prices` (./scripts/test runs it before the \
         tests) to download LiteLLM's price file at the pinned release",
        path.display()
    );
    path
}

fn tollgate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("TOLLGATE_CONFIG").output().expect("run tollgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn r(usd_per_million: &str) -> Rate {
    Rate::per_million(usd_per_million).unwrap()
}

/// (model, input, cached input, cache write, output, max output tokens, context window) as the
/// pinned LiteLLM file lists them, USD per million tokens.
const KNOWN: [(&str, &str, &str, &str, &str, u64, u64); 5] = [
    ("gpt-5.4", "2.50", "0.25", "2.50", "15.00", 128_000, 1_050_000),
    ("gpt-4o-mini", "0.15", "0.075", "0.15", "0.60", 16_384, 128_000),
    ("claude-opus-4-8", "5.00", "0.50", "6.25", "25.00", 128_000, 1_000_000),
    ("claude-haiku-4-5", "1.00", "0.10", "1.25", "5.00", 64_000, 200_000),
    ("claude-sonnet-4-5-20250929", "3.00", "0.30", "3.75", "15.00", 64_000, 200_000),
];

fn assert_known_models(card: &RateCard) {
    for (model, input, cached, write, output, max_output, context) in KNOWN {
        let (rates, _) = card.rates(model).unwrap_or_else(|e| panic!("{e}"));
        let want = Rates {
            input: r(input),
            cached_input: r(cached),
            cache_write: r(write),
            output: r(output),
            reasoning: r(output),
            ..Rates::default()
        };
        assert_eq!(*rates, want, "{model}");
        let limits =
            ModelLimits { max_output_tokens: Some(max_output), context_window: Some(context) };
        assert_eq!(card.limits(model), limits, "{model}");
    }
    let (embedding, _) = card.rates("text-embedding-3-small").unwrap();
    assert_eq!((embedding.input, embedding.output), (r("0.02"), Rate::ZERO));
    assert_eq!(card.limits("text-embedding-3-small").context_window, Some(8_191));
}

const ROUTES_AND_POLICY: &str = "version: 1\n\
    routes:\n\
    \x20 - {name: openai, path_prefix: /v1/, kind: openai, upstream: \"https://api.openai.com\"}\n\
    policy:\n\
    \x20 version: p1\n\
    \x20 defaults: {llm: allow}\n";

#[test]
fn import_converts_the_real_litellm_file_to_a_rate_card() {
    let file = litellm_file();
    let out =
        tollgate(&["pricing", "import", file.to_str().unwrap(), "--provider", "openai,anthropic"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let yaml = text(&out.stdout);
    let card = RateCard::from_config(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_known_models(&card);
    assert!(card
        .models()
        .iter()
        .all(|m| matches!(m.provider.as_deref(), Some("openai" | "anthropic"))));
    // `text-completion-openai` is another provider, and Gemini is not asked for.
    assert!(card.resolve("babbage-002").is_none());
    assert!(card.resolve("gemini/gemini-2.5-pro").is_none());
    // The same entries as the core's loader takes from the file.
    let direct = RateCard::import_litellm(
        &std::fs::read_to_string(&file).unwrap(),
        Some(&["openai", "anthropic"]),
    )
    .unwrap();
    assert_eq!(card.models(), direct.card.models());
    // Every skipped entry is named with its line and reason, then a summary.
    assert!(
        stderr.lines().any(|l| l
            == "skipped whisper-1 (line 55645): no `input_cost_per_token`: not priced per token \
                (per image, second, character or query)"),
        "{stderr}"
    );
    let summary = stderr.lines().last().unwrap_or("");
    assert_eq!(
        summary,
        format!(
            "{} models imported, {} skipped, {} entries of providers other than openai, \
             anthropic left out",
            direct.card.models().len(),
            direct.skipped.len(),
            direct.other_providers
        )
    );
    assert_eq!(stderr.lines().count(), direct.skipped.len() + 1);

    // The card indented under `pricing:` is a valid config section.
    let dir = temp_dir("pricing-import");
    let config = dir.join("tollgate.yaml");
    let indented: String = yaml.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(&config, format!("{ROUTES_AND_POLICY}pricing:\n{indented}")).unwrap();
    let check = tollgate(&["check", config.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    let loaded = Config::load(&config).unwrap();
    assert_known_models(loaded.engine.rates());
}

#[test]
fn pricing_litellm_file_loads_the_real_file_under_the_configs_own_models() {
    let file = litellm_file();
    let dir = temp_dir("pricing-litellm-file");
    let config = dir.join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "{ROUTES_AND_POLICY}pricing:\n\
             \x20 litellm_file: {}\n\
             \x20 models:\n\
             \x20   gpt-4o: {{provider: openai, input: \"2.00\", output: \"8.00\"}}\n",
            file.display()
        ),
    )
    .unwrap();
    let check = tollgate(&["check", config.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    let loaded = Config::load(&config).unwrap_or_else(|e| panic!("{e:#}"));
    let card = loaded.engine.rates();
    assert_known_models(card);
    // Other providers' entries of the file are priced too.
    let (gemini, _) = card.rates("gemini/gemini-2.5-pro").unwrap();
    assert_eq!(
        (gemini.input, gemini.cached_input, gemini.output),
        (r("1.25"), r("0.125"), r("10"))
    );
    assert_eq!(
        card.limits("gemini/gemini-2.5-pro"),
        ModelLimits { max_output_tokens: Some(65_536), context_window: Some(1_048_576) }
    );
    // The config's own model wins over the file; what the file lacks keeps its built-in price.
    let (gpt4o, _) = card.rates("gpt-4o").unwrap();
    assert_eq!((gpt4o.input, gpt4o.output), (r("2"), r("8")));
    let (opus, _) = card.rates("claude-opus-4-1").unwrap();
    assert_eq!(opus.output, r("75"));

    // The proxy's decision path prices with it: a model only the file lists is not refused.
    let explain = |config: &Path| {
        tollgate(&[
            "explain",
            "--config",
            config.to_str().unwrap(),
            "-H",
            "x-agent-id=bot",
            "-H",
            "x-cost-center=CC-1234",
            "-H",
            "x-project-id=PROJ-ABC123",
            "--model",
            "gemini/gemini-2.5-pro",
            "--max-tokens",
            "1000",
        ])
    };
    let out = explain(&config);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("worst case:     $0.01"), "{}", text(&out.stdout));
    let without = dir.join("without.yaml");
    std::fs::write(&without, ROUTES_AND_POLICY).unwrap();
    let out = explain(&without);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("unknown_model"), "{}", text(&out.stdout));
}

#[test]
fn a_missing_litellm_file_is_a_config_error_naming_the_path_and_line() {
    let dir = temp_dir("pricing-missing");
    let config = dir.join("tollgate.yaml");
    let missing = dir.join("nope.json");
    std::fs::write(
        &config,
        format!("{ROUTES_AND_POLICY}pricing:\n  litellm_file: {}\n", missing.display()),
    )
    .unwrap();
    let out = tollgate(&["check", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "pricing.litellm_file (line 8, column 17): cannot read LiteLLM price file `{}`: No \
             such file or directory",
            missing.display()
        )),
        "{stderr}"
    );
    let out = tollgate(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "the proxy does not start");
    assert!(text(&out.stderr).contains("pricing.litellm_file"), "{}", text(&out.stderr));
}

#[test]
fn import_refuses_bad_input_with_exit_2_naming_the_entry_and_line() {
    let dir = temp_dir("pricing-bad");
    let bad = dir.join("prices.json");
    std::fs::write(
        &bad,
        "{\n  \"ok\": {\"input_cost_per_token\": 1e-06, \"output_cost_per_token\": 2e-06},\n  \
         \"gpt-x\": {\"input_cost_per_token\": \"cheap\", \"output_cost_per_token\": 2e-06}\n}\n",
    )
    .unwrap();
    let out = tollgate(&["pricing", "import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("gpt-x.input_cost_per_token (line 3, column"), "{stderr}");
    assert!(stderr.contains("`cheap` is not a decimal number"), "{stderr}");

    let out =
        tollgate(&["pricing", "import", litellm_file().to_str().unwrap(), "--provider", "openia"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no token-priced entry of provider openia"),
        "{}",
        text(&out.stderr)
    );

    let missing = dir.join("nope.json");
    let out = tollgate(&["pricing", "import", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&format!("reading {}", missing.display())));

    std::fs::write(&bad, "{\"a\": [1,").unwrap();
    let out = tollgate(&["pricing", "import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("syntax error"), "{}", text(&out.stderr));
}

#[test]
fn the_builtin_card_agrees_with_the_real_litellm_file() {
    let text = std::fs::read_to_string(litellm_file()).unwrap();
    let litellm = RateCard::import_litellm(&text, Some(&["openai", "anthropic"])).unwrap().card;
    let builtin = RateCard::builtin().unwrap();
    let mut compared = 0;
    // Every OpenAI / Anthropic entry the built-in card prices (by name or as a snapshot of a
    // listed model) has the file's prices; its limits are the file's, the context window at
    // least the file's input limit.
    for m in litellm.models() {
        let Some(id) = builtin.resolve(&m.name) else { continue };
        let listed = builtin.model(id).unwrap();
        assert_eq!(listed.rates, m.rates, "{} (as {})", m.name, listed.name);
        if let Some(max_output) = m.limits.max_output_tokens {
            assert_eq!(listed.limits.max_output_tokens, Some(max_output), "{}", m.name);
        }
        let (context, input) = (listed.limits.context_window, m.limits.context_window);
        assert!(context >= input, "{}: context window {context:?} < {input:?}", m.name);
        compared += 1;
    }
    assert!(compared >= 90, "only {compared} entries compared");
    // Every built-in model the file still lists for its provider is among them.
    let missing: Vec<&str> = builtin
        .models()
        .iter()
        .map(|m| m.name.as_str())
        .filter(|name| litellm.resolve(name).is_none())
        .collect();
    assert_eq!(missing, ["claude-opus-4-1", "claude-opus-4", "claude-sonnet-4"], "not in the file");
}
