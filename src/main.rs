//! The `ward` command line: parses arguments, sets up logging and progress,
//! calls the library, prints the summary and maps the outcome to an exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table as TextTable, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use ward::ingest::{FileStatus, IngestReport};
use ward::{IngestOptions, PipelineConfig, WardError};

/// Exit code of a usage or configuration error.
const EXIT_CONFIG: u8 = 2;
/// Exit code of a run that failed (some input could not be loaded).
const EXIT_FAILED: u8 = 3;

/// Ward: provider extracts in, validated Parquet warehouse and population
/// health measures out.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Pipeline config. Default: ./ward.toml if present, else the bundled sample config.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Errors only; no summary table.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stage (the nightly job): today, ingest.
    Run,
    /// Load new and changed extracts into staging.
    Ingest,
    /// Check every extract (against its mapping, or the FHIR rules) and report; write nothing.
    Validate,
    /// Value sets: convert FHIR ValueSet resources into queries/valuesets/.
    Valuesets {
        #[command(subcommand)]
        action: ValuesetsAction,
    },
    /// Generate a synthetic multi-provider population with ground truth.
    Synth {
        /// Number of persons.
        #[arg(long, default_value_t = 1000)]
        patients: u64,
        /// Number of providers (clinics, hospitals and endocrinology practices in turn).
        #[arg(long, default_value_t = 3)]
        providers: usize,
        /// Random seed: the same options give the same files.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (provider folders, mappings, ward.toml, truth.csv, ...).
        #[arg(long)]
        out: PathBuf,
        /// Share of rows written deliberately bad (each listed in expected_rejects.csv).
        #[arg(long, default_value_t = 0.002)]
        bad_rate: f64,
        /// Calendar year of the measurement period.
        #[arg(long, default_value_t = 2025)]
        year: i32,
    },
}

#[derive(Subcommand)]
enum ValuesetsAction {
    /// Convert ValueSet JSON (files, directories, Bundles) into one CSV per value set.
    Convert {
        /// Output directory.
        #[arg(long, default_value = "queries/valuesets")]
        out: PathBuf,
        /// ValueSet files or directories (searched recursively for *.json).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match execute(&cli) {
        Ok(code) => code,
        Err(e) => {
            let config_error = e
                .downcast_ref::<WardError>()
                .is_some_and(WardError::is_config_error);
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(if config_error {
                EXIT_CONFIG
            } else {
                EXIT_FAILED
            })
        }
    }
}

fn execute(cli: &Cli) -> anyhow::Result<ExitCode> {
    if let Command::Synth {
        patients,
        providers,
        seed,
        out,
        bad_rate,
        year,
    } = &cli.command
    {
        let opts = ward::synth::SynthOptions {
            patients: *patients,
            providers: *providers,
            seed: *seed,
            out: out.clone(),
            bad_rate: *bad_rate,
            year: *year,
        };
        let progress = progress_bar(cli.quiet, "synth", "persons");
        let report = ward::synth::synth(&opts, &progress)?;
        progress.finish_and_clear();
        if !cli.quiet {
            println!(
                "synth: {} persons, {} provider records, {} rows ({} deliberately bad) in {}",
                report.persons,
                report.source_patients,
                report.rows,
                report.expected_rejects,
                out.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Valuesets {
        action: ValuesetsAction::Convert { out, inputs },
    } = &cli.command
    {
        let report = ward::valuesets::convert(inputs, out)?;
        for (oid, kept, dropped) in &report.superseded {
            tracing::info!(valueset = %oid, kept = %kept, dropped = %dropped, "value set read twice; newer version kept");
        }
        for oid in &report.not_expanded {
            tracing::warn!(valueset = %oid, "no expansion and no enumerated concepts: not converted");
        }
        if !cli.quiet {
            let codes: usize = report.written.iter().map(|v| v.codes.len()).sum();
            println!(
                "valuesets: {} value sets, {codes} codes written to {}; {} not converted (no expansion)",
                report.written.len(),
                out.display(),
                report.not_expanded.len()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config_path = resolve_config(cli.config.as_deref())?;
    tracing::info!(config = %config_path.display(), "configuration");
    let config = PipelineConfig::load(&config_path)?;
    let opts = IngestOptions {
        today: config
            .as_of
            .unwrap_or_else(|| chrono::Local::now().date_naive()),
        dry_run: matches!(cli.command, Command::Validate),
    };
    let progress = progress_bar(cli.quiet, "ingest", "files");
    let report = match cli.command {
        Command::Run => ward::run(&config, &opts, &progress)?,
        _ => ward::ingest::ingest(&config, &opts, &progress)?,
    };
    progress.finish_and_clear();
    if !cli.quiet {
        print_summary(&report, opts.dry_run);
    }
    let failures = report.failures();
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            eprintln!("error: {f}");
        }
        eprintln!(
            "error: {} input(s) failed; everything else was loaded",
            failures.len()
        );
        Ok(ExitCode::from(EXIT_FAILED))
    }
}

fn resolve_config(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let local = PathBuf::from("ward.toml");
    if local.is_file() {
        return Ok(local);
    }
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sample_data")
        .join("ward.toml");
    if bundled.is_file() {
        return Ok(bundled);
    }
    Err(WardError::Config {
        path: local,
        line: None,
        column: None,
        key: None,
        message: "no --config given, no ./ward.toml and no bundled sample config".into(),
    })
    .context("finding the configuration")
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("ward={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A progress bar on an interactive terminal; hidden otherwise (cron, CI, pipes).
fn progress_bar(quiet: bool, stage: &str, unit: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {stage} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn print_summary(report: &IngestReport, dry_run: bool) {
    let mut table = TextTable::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "source",
        "files",
        "loaded",
        "unchanged",
        "ignored",
        "failed",
        "records read",
        "accepted",
        "rejected",
        "skipped",
    ]);
    let mut sources: Vec<&str> = report.files.iter().map(|f| f.source.as_str()).collect();
    sources.dedup();
    let mut totals = [0u64; 9];
    for source in sources {
        let files: Vec<_> = report.files.iter().filter(|f| f.source == source).collect();
        let count =
            |s: &[FileStatus]| files.iter().filter(|f| s.contains(&f.status)).count() as u64;
        let loaded: Vec<_> = files
            .iter()
            .filter(|f| f.status == FileStatus::Loaded)
            .collect();
        let row = [
            files.len() as u64,
            count(&[FileStatus::Loaded]),
            count(&[FileStatus::Unchanged]),
            count(&[FileStatus::Duplicate, FileStatus::Unmapped]),
            count(&[FileStatus::Failed]),
            loaded.iter().map(|f| f.rows_read).sum(),
            loaded.iter().map(|f| f.rows_accepted).sum(),
            loaded.iter().map(|f| f.rows_rejected).sum(),
            loaded.iter().map(|f| f.rows_skipped).sum(),
        ];
        totals.iter_mut().zip(row).for_each(|(t, v)| *t += v);
        let mut cells = vec![source.to_string()];
        cells.extend(row.iter().map(u64::to_string));
        table.add_row(cells);
    }
    let mut cells = vec!["total".to_string()];
    cells.extend(totals.iter().map(u64::to_string));
    table.add_row(cells);
    let verb = if dry_run {
        "checked (nothing written)"
    } else {
        "this run"
    };
    println!(
        "ingest, {verb}; record counts are for files loaded in this run \
         (ignored: unmapped or duplicate files; skipped: FHIR resource types Ward does not load)"
    );
    println!("{table}");
    let mut rules = std::collections::BTreeMap::<&str, u64>::new();
    for f in &report.files {
        for (rule, n) in &f.rejects_by_rule {
            *rules.entry(rule).or_default() += n;
        }
    }
    if !rules.is_empty() {
        let list: Vec<String> = rules.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!("rejects by rule: {}", list.join(", "));
    }
}
