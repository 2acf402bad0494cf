//! `tollgate pricing import FILE`: converts LiteLLM's community price file
//! (`model_prices_and_context_window.json`) into a Tollgate rate card (YAML, `version: 1`) on
//! stdout, to review and commit, or to use as it is.
//!
//! The card is what `pricing.litellm_file` would load, written out: every token-priced entry (of
//! the `--provider`s given), with its per-million prices converted exactly and its limits.
//! Entries that cannot be priced per token (images, audio seconds, characters, search queries)
//! are named on stderr with the reason, never priced at $0. A malformed entry is an error naming
//! the entry, the field and its line (exit 2), and so is a provider filter that matches nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use tollgate_core::pricing::RateCard;

#[derive(Subcommand, Debug)]
pub enum PricingCommand {
    /// Convert LiteLLM's model_prices_and_context_window.json to a rate card (YAML on stdout;
    /// skipped entries on stderr; exit 2 on bad input).
    Import {
        /// The LiteLLM price file (`-` reads stdin).
        file: PathBuf,
        /// Only entries whose `litellm_provider` is one of these (comma-separated, e.g.
        /// `openai,anthropic`); every entry when omitted.
        #[arg(long, value_delimiter = ',')]
        provider: Vec<String>,
    },
}

pub fn run(command: PricingCommand) -> ExitCode {
    match command {
        PricingCommand::Import { file, provider } => match import(&file, &provider) {
            Ok(report) => {
                print!("{}", report.card);
                for line in &report.notes {
                    eprintln!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate pricing import: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// A converted card and what to tell the operator about it.
pub struct Imported {
    /// The rate card document.
    pub card: String,
    /// One line per skipped entry, then a summary.
    pub notes: Vec<String>,
}

/// Reads and converts `file` (see the module docs); the error names the file and the problem.
pub fn import(file: &std::path::Path, providers: &[String]) -> Result<Imported, String> {
    let stdin = file.as_os_str() == "-";
    let name = if stdin { "(stdin)".to_string() } else { file.display().to_string() };
    let text = if stdin {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("reading stdin: {e}"))?;
        text
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("reading {name}: {e}"))?
    };
    let providers: Vec<&str> =
        providers.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect();
    let filter = (!providers.is_empty()).then_some(providers.as_slice());
    let import = RateCard::import_litellm(&text, filter).map_err(|e| format!("{name}: {e}"))?;
    let models = import.card.models().len();
    if models == 0 {
        return Err(match filter {
            Some(p) => format!("{name}: no token-priced entry of provider {}", p.join(", ")),
            None => format!("{name}: no token-priced entry"),
        });
    }
    let mut notes: Vec<String> = import
        .skipped
        .iter()
        .map(|s| format!("skipped {} (line {}): {}", s.name, s.line, s.reason))
        .collect();
    let mut summary = format!("{models} models imported, {} skipped", import.skipped.len());
    if let Some(p) = filter {
        summary.push_str(&format!(
            ", {} entries of providers other than {} left out",
            import.other_providers,
            p.join(", ")
        ));
    }
    notes.push(summary);
    let scope = filter.map(|p| format!(" (providers: {})", p.join(", "))).unwrap_or_default();
    let card = format!(
        "# Converted by `tollgate pricing import` from LiteLLM's price file {name}{scope}.\n\
         # Prices in USD per million tokens. Use it as a rate card, or indent it under a\n\
         # config's `pricing:` key (its models then replace the built-in card's of the same name).\n\
         {}",
        import.card.to_config()
    );
    Ok(Imported { card, notes })
}
