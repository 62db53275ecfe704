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
use ward::measure::Scoring;
use ward::{IngestOptions, PipelineConfig, WardError};

mod logging;
mod memcap;

#[global_allocator]
static ALLOCATOR: memcap::Capped = memcap::Capped;

/// Exit code of a usage or configuration error.
const EXIT_CONFIG: u8 = 2;
/// Exit code of a run that failed (some input could not be loaded).
const EXIT_FAILED: u8 = 3;
/// Exit code of a conformance check with a mismatching test case, of a run
/// stopped by a data-quality gate, and of `ward status` when the latest run
/// did not publish.
const EXIT_MISMATCH: u8 = 1;
/// Exit code when another process holds the warehouse lock (retry later).
const EXIT_LOCKED: u8 = 4;

/// Ward: provider extracts in, validated Parquet warehouse and population
/// health measures out.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Pipeline config. Default: ./ward.toml if present, else the bundled
    /// sample config (said on stderr).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Never fall back to the bundled sample config: without --config and
    /// without ./ward.toml, exit 2 (for scheduled jobs).
    #[arg(long, global = true)]
    no_sample: bool,
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

/// `ward synth --noise`.
#[derive(Clone, Copy, ValueEnum)]
enum Noise {
    Classic,
    Hard,
}

#[derive(Clone, Copy, ValueEnum)]
enum QueryFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stage (the nightly job): ingest, link and core tables, every
    /// measure, the stratified summary and care-gap lists.
    Run {
        #[command(flatten)]
        period: PeriodArgs,
    },
    /// Load new and changed extracts into staging.
    Ingest,
    /// Check every extract (against its mapping, or the FHIR rules) and report; write nothing.
    Validate {
        /// Also print where the first N rejects of each rule are (file,
        /// line, column).
        #[arg(long, value_name = "N", default_value_t = 0)]
        examples: usize,
        /// With --examples, print each reject's offending value too: patient
        /// data on this terminal.
        #[arg(long, requires = "examples")]
        show_values: bool,
    },
    /// Link patient records across providers into persons, then build the
    /// core tables (core/person_link, core/person, core/<table>).
    Link {
        /// Ground truth (source,source_patient_id,person_id) to score the
        /// linkage against: pairwise precision, recall, F1.
        #[arg(long, value_name = "TRUTH.csv")]
        evaluate: Option<PathBuf>,
        /// Explain the model's verdict on two staged records (each
        /// SOURCE:ID): every field's level, m, u and weight, the prior, the
        /// probability and the blocking rule. Writes nothing.
        #[arg(long, num_args = 2, value_names = ["SOURCE:ID", "SOURCE:ID"], conflicts_with = "evaluate")]
        explain: Option<Vec<String>>,
    },
    /// Run measures and write marts/measure_patient/. Reads the current
    /// published run's linked core (else the working copy's); never writes
    /// into a published run.
    Measure {
        /// Measure id (repeatable); default: every measure.
        #[arg(long = "measure", value_name = "ID")]
        measures: Vec<String>,
        #[command(flatten)]
        period: PeriodArgs,
        /// Measure unlinked staging instead: every provider record counts
        /// as its own person (numbers differ from a linked run).
        #[arg(long, conflicts_with = "working_copy")]
        unlinked: bool,
        /// Measure the working copy's core (`ward link`) even when a run is published.
        #[arg(long)]
        working_copy: bool,
        /// Write marts/ under DIR instead of the warehouse root (the working copy).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// List past runs, newest first: status, timings, rows, headline rates.
    Runs {
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The current published run, the lock, and whether the latest run
    /// failed and why; exits 1 when the latest run did not publish.
    Status,
    /// Measures: list the measures of queries/measures/.
    Measures {
        #[command(subcommand)]
        action: MeasuresAction,
    },
    /// Check a measure against an eCQM test deck (one folder per case with a
    /// Bundle and its expected MeasureReport); exits 1 on any mismatch.
    Conformance {
        /// The deck directory (e.g. ../shared/data/ecqm/CMS165/tests).
        #[arg(long)]
        deck: PathBuf,
        /// Measure id.
        #[arg(long)]
        measure: String,
        /// Scratch warehouse (emptied first). Default: a temporary directory.
        #[arg(long)]
        scratch: Option<PathBuf>,
    },
    /// Value sets: convert FHIR ValueSet resources into queries/valuesets/.
    Valuesets {
        #[command(subcommand)]
        action: ValuesetsAction,
    },
    /// De-identify the working copy's core tables into research/ (Safe
    /// Harbor unless [deid] mode = "date_shift"); ages at the as-of day (or at death).
    Deid,
    /// Run one read-only SQL query over the research tables (nothing else is
    /// reachable; DDL, DML, COPY, SET and file access are refused, exit 2).
    Query {
        /// The SQL query (or --file).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        sql: Option<String>,
        /// Read the SQL query from a file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
        format: QueryFormat,
        /// Write the result to a file instead of stdout (required for
        /// parquet); never inside the warehouse, never through a symlink.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace the --out file when it exists.
        #[arg(long, requires = "out")]
        force: bool,
        /// Replace counts from 1 to N-1 (integer COUNT/SUM results) by NULL.
        #[arg(long, value_name = "N")]
        min_cell: Option<u64>,
        /// Memory the query may use, operators and result together (e.g.
        /// 512M, 8G); more fails the query. Default: half of physical memory.
        /// The process as a whole stops (exit 3) past twice this limit, so
        /// functions whose memory the engine does not track are bounded too.
        #[arg(long, value_name = "SIZE", value_parser = ward::query::parse_size)]
        memory_limit: Option<usize>,
        /// Time the query may take (e.g. 90s, 10m, 2h); longer fails it.
        #[arg(long, value_name = "DURATION", value_parser = ward::query::parse_duration,
              default_value = "10m")]
        timeout: std::time::Duration,
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
        /// The noise in the records: `hard` (default) adds what breaks
        /// naive linkage to `classic` (nicknames, typos, swapped day/month,
        /// moves): swapped names, initials, missing birth dates, identifier
        /// and street formats, duplicate registrations within a provider.
        #[arg(long, value_enum, default_value_t = Noise::Hard)]
        noise: Noise,
    },
}

/// The measurement period; default: the config's, else the previous calendar year.
#[derive(clap::Args, Clone, Copy)]
struct PeriodArgs {
    /// First day of the measurement period (YYYY-MM-DD).
    #[arg(long, requires = "period_end")]
    period_start: Option<chrono::NaiveDate>,
    /// Last day of the measurement period (YYYY-MM-DD).
    #[arg(long, requires = "period_start")]
    period_end: Option<chrono::NaiveDate>,
}

#[derive(Subcommand)]
enum MeasuresAction {
    /// One line per measure: id, title, version, improvement direction.
    List,
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
    restrict_file_mode();
    let cli = Cli::parse();
    init_logging(&cli);
    match execute(&cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(match e.downcast_ref::<WardError>() {
                Some(w) if w.is_config_error() => EXIT_CONFIG,
                Some(WardError::GateFailed { .. }) => EXIT_MISMATCH,
                Some(WardError::Locked { .. }) => EXIT_LOCKED,
                _ => EXIT_FAILED,
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
        noise,
    } = &cli.command
    {
        let opts = ward::synth::SynthOptions {
            patients: *patients,
            providers: *providers,
            seed: *seed,
            out: out.clone(),
            bad_rate: *bad_rate,
            year: *year,
            hard_noise: matches!(noise, Noise::Hard),
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
    if let Command::Conformance {
        deck,
        measure,
        scratch,
    } = &cli.command
    {
        let queries = resolve_queries(None);
        let defs = ward::measure::catalog(&queries)?;
        let def = ward::measure::select(&defs, std::slice::from_ref(measure))?[0];
        let temp;
        let scratch = match scratch {
            Some(s) => s.clone(),
            None => {
                temp = tempfile::tempdir().context("creating a scratch directory")?;
                temp.path().join("conformance")
            }
        };
        let outcome = ward::measure::conformance::run(deck, def, &queries, &scratch)?;
        print_conformance(&outcome, cli.quiet);
        return Ok(if outcome.failures() == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_MISMATCH)
        });
    }
    if let Command::Measures {
        action: MeasuresAction::List,
    } = &cli.command
    {
        let configured = match &cli.config {
            Some(path) => PipelineConfig::load(path)?.queries,
            None => None,
        };
        let defs = ward::measure::catalog(&resolve_queries(configured.as_deref()))?;
        print_measure_list(&defs);
        return Ok(ExitCode::SUCCESS);
    }
    let (config_path, sample) = resolve_config(cli.config.as_deref(), cli.no_sample)?;
    tracing::info!(config = %config_path.display(), "configuration");
    let config = PipelineConfig::load(&config_path)?;
    if sample {
        // Whatever the verbosity: a job started in the wrong directory
        // must not pass for a real night.
        eprintln!(
            "warning: no --config and no ./ward.toml: using the bundled sample config {} \
             (warehouse {}); give --config, and --no-sample in scheduled jobs",
            config_path.display(),
            config.warehouse.display()
        );
    }
    let queries = resolve_queries(config.queries.as_deref());
    let today = config
        .as_of
        .unwrap_or_else(|| chrono::Local::now().date_naive());
    let period = |args: &PeriodArgs| -> anyhow::Result<ward::config::Period> {
        let p = match (
            args.period_start,
            args.period_end,
            config.measurement_period,
        ) {
            (Some(start), Some(end), _) => ward::config::Period { start, end },
            (_, _, Some(p)) => p,
            _ => {
                let year = chrono::Datelike::year(&today) - 1;
                ward::config::Period {
                    start: chrono::NaiveDate::from_ymd_opt(year, 1, 1).expect("valid date"),
                    end: chrono::NaiveDate::from_ymd_opt(year, 12, 31).expect("valid date"),
                }
            }
        };
        if p.start > p.end {
            return Err(WardError::Usage {
                message: "the measurement period starts after it ends (--period-start, \
                          --period-end or [measurement_period])"
                    .into(),
            }
            .into());
        }
        Ok(p)
    };
    if let Command::Query {
        sql,
        file,
        format,
        out,
        force,
        min_cell,
        memory_limit,
        timeout,
    } = &cli.command
    {
        let opts = ward::query::QueryOptions {
            min_cell: *min_cell,
            memory_limit: Some(memory_limit.unwrap_or_else(ward::query::default_memory_limit)),
            timeout: Some(*timeout),
        };
        return query(&config, sql, file, *format, out, *force, cli.quiet, &opts);
    }
    if let Command::Runs { limit } = &cli.command {
        print_runs(&ward::runs::list(&config.warehouse)?, *limit);
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Status = &cli.command {
        return status(&config.warehouse);
    }
    // Every other command writes to the warehouse: one at a time, and
    // within the configured group.
    #[cfg(unix)]
    if let (Some(gid), false) = (
        config.warehouse_group,
        matches!(cli.command, Command::Validate { .. }),
    ) {
        ward::warehouse::apply_group(&config.warehouse, gid)?;
    }
    let _lock = match &cli.command {
        Command::Run { .. } | Command::Validate { .. } => None, // `run` locks itself
        _ => Some(ward::runs::Lock::acquire(
            &config.warehouse,
            &format!("ward {}", command_name(&cli.command)),
        )?),
    };
    if let Command::Deid = &cli.command {
        let key = deid_key(&config)?;
        let (core, research) = deid_dirs(&config);
        let (state, warnings) =
            ward::reads::resolve(&config.warehouse, ward::reads::Choice::WorkingCopy)?;
        if !cli.quiet {
            println!(
                "deid reads: {}; writes: {}",
                state.describe(),
                research.display()
            );
        }
        announce_warnings(&warnings);
        let opts = ward::deid::DeidOptions {
            valuesets: Some(queries.join("valuesets")),
            ..ward::deid::DeidOptions::from_config(&config.deid, key, today)
        };
        let report = ward::deid::deid(&core, &research, &opts)?;
        if !cli.quiet {
            print_deid(&report);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Link {
        explain: Some(records),
        ..
    } = &cli.command
    {
        let record = |text: &str| -> anyhow::Result<(String, String)> {
            text.split_once(':')
                .map(|(s, i)| (s.to_string(), i.to_string()))
                .ok_or_else(|| {
                    WardError::Usage {
                        message: format!("--explain: '{text}' is not SOURCE:ID"),
                    }
                    .into()
                })
        };
        let (a, b) = (record(&records[0])?, record(&records[1])?);
        let warehouse = ward::warehouse::Warehouse::new(&config.warehouse);
        let e = ward::link::explain(&warehouse, &config.link, (&a.0, &a.1), (&b.0, &b.1))?;
        print_explanation(&e, &records[0], &records[1]);
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Link { evaluate, .. } = &cli.command {
        let warehouse = ward::warehouse::Warehouse::new(&config.warehouse);
        if !cli.quiet {
            println!(
                "link reads: staging ({}); writes: working copy {}",
                config.warehouse.join("staging").display(),
                config.warehouse.join("core").display()
            );
        }
        let previous = ward::link::read_person_links(
            &warehouse.out().join("core").join("person_link.parquet"),
        )?;
        let linkage = ward::link::link(&warehouse, &config.link, &previous)?;
        let core = ward::link::build::build(&warehouse)?;
        if !cli.quiet {
            print_link(&linkage.report, &core);
        }
        if let Some(truth) = evaluate {
            let e = ward::link::evaluate(&linkage.links, truth)?;
            let rate = |x: Option<f64>| x.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"));
            println!(
                "evaluation against {} over all {} truth records ({} not linked: rejected or \
                 not loaded, scored as persons of their own; {} linked records not in the truth, \
                 not scored):",
                truth.display(),
                e.records,
                e.records_not_linked,
                e.records_not_in_truth
            );
            println!(
                "  pairs: precision {}, recall {}, F1 {:.4} ({} true pairs, {} predicted, {} correct)",
                rate(e.precision),
                rate(e.recall),
                e.f1,
                e.true_pairs,
                e.predicted_pairs,
                e.true_positive_pairs
            );
            println!(
                "  persons: {} true, {} predicted, {} exactly right ({:.2} %)",
                e.true_persons,
                e.predicted_persons,
                e.persons_exact,
                100.0 * e.persons_exact as f64 / e.true_persons.max(1) as f64
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Measure {
        measures,
        period: p,
        unlinked,
        working_copy,
        out,
    } = &cli.command
    {
        let period = period(p)?;
        let defs = ward::measure::catalog(&queries)?;
        let chosen = ward::measure::select(&defs, measures)?;
        let choice = match (unlinked, working_copy) {
            (true, _) => ward::reads::Choice::Unlinked,
            (_, true) => ward::reads::Choice::WorkingCopy,
            _ => ward::reads::Choice::Default,
        };
        let (state, warnings) = ward::reads::resolve(&config.warehouse, choice)?;
        let out_dir = out.clone().unwrap_or_else(|| config.warehouse.clone());
        refuse_inside_runs(&config.warehouse, &out_dir)?;
        if !cli.quiet {
            println!(
                "measure reads: {}; writes: {}",
                state.describe(),
                out_dir.join("marts").display()
            );
        }
        announce_warnings(&warnings);
        let results =
            ward::measure::run(&state.reader(&config.warehouse), &queries, &chosen, period)?;
        let writer = ward::warehouse::Warehouse::new(&config.warehouse).with_output(&out_dir);
        ward::measure::write_marts(&writer, &results)?;
        if !cli.quiet {
            print_measures(&results);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (examples, show_values) = match cli.command {
        Command::Validate {
            examples,
            show_values,
        } => (examples, show_values),
        _ => (0, false),
    };
    if show_values {
        eprintln!(
            "warning: --show-values prints patient data (PHI) from the extracts to this terminal"
        );
    }
    let opts = IngestOptions {
        today,
        dry_run: matches!(cli.command, Command::Validate { .. }),
        examples,
        show_values,
    };
    if !cli.quiet && matches!(cli.command, Command::Ingest | Command::Validate { .. }) {
        let writes = if opts.dry_run {
            "nothing".to_string()
        } else {
            format!(
                "{} and {}",
                config.warehouse.join("staging").display(),
                config.warehouse.join("rejects").display()
            )
        };
        println!(
            "{} reads: the extracts of {} source(s) in {}; writes: {writes}",
            command_name(&cli.command),
            config.sources.len(),
            config_path.display()
        );
    }
    let progress = progress_bar(cli.quiet, "ingest", "files");
    let (report, run) = match &cli.command {
        Command::Run { period: p } => {
            let period = period(p)?;
            let key = deid_key(&config)?;
            let run = ward::run(&config, &opts, &queries, period, &key, &progress)?;
            (run.ingest.clone(), Some(run))
        }
        _ => (ward::ingest::ingest(&config, &opts, &progress)?, None),
    };
    progress.finish_and_clear();
    if !cli.quiet {
        print_summary(&report, opts.dry_run, opts.examples);
        if let Some(run) = &run {
            print_link(&run.link, &run.core);
            print_measures(&run.measures);
            println!(
                "summary by stratum (small cells suppressed): {}",
                run.report_dir.display()
            );
            println!("report (open in a browser): {}", run.report_html.display());
            println!(
                "care-gap lists (identified, owner-only): {} in {}",
                run.care_gaps.len(),
                run.report_dir.join("phi").display()
            );
            print_deid(&run.research);
            for w in &run.manifest.warnings {
                println!("warning: {w}");
            }
            println!(
                "run {} published: {}",
                run.run_id,
                run.run_dir.join(ward::runs::MANIFEST).display()
            );
        }
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

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Run { .. } => "run",
        Command::Ingest => "ingest",
        Command::Validate { .. } => "validate",
        Command::Link { .. } => "link",
        Command::Measure { .. } => "measure",
        Command::Runs { .. } => "runs",
        Command::Status => "status",
        Command::Measures { .. } => "measures",
        Command::Conformance { .. } => "conformance",
        Command::Valuesets { .. } => "valuesets",
        Command::Synth { .. } => "synth",
        Command::Deid => "deid",
        Command::Query { .. } => "query",
    }
}

fn print_runs(runs: &[ward::runs::RunListing], limit: usize) {
    let mut table = TextTable::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "run",
        "status",
        "finished",
        "seconds",
        "rows read",
        "rejected",
        "persons",
        "measures",
        "note",
    ]);
    for r in runs.iter().take(limit) {
        let Some(m) = &r.manifest else {
            table.add_row(vec![
                r.run_id.clone(),
                r.status().into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                r.unreadable
                    .clone()
                    .unwrap_or_else(|| "no manifest: killed, or running now".into()),
            ]);
            continue;
        };
        let sum = |f: fn(&ward::runs::SourceTable) -> u64| -> u64 { m.sources.iter().map(f).sum() };
        let seconds: f64 = m.stages.iter().map(|s| s.seconds).sum();
        let rates: Vec<String> = m
            .measures
            .iter()
            .map(|x| match x.rate {
                Some(r) => format!("{} {:.1}%", x.id, r * 100.0),
                None => format!("{} -", x.id),
            })
            .collect();
        let note = match (&m.error, m.warnings.len()) {
            (Some(e), _) => e.clone(),
            (None, 0) => String::new(),
            (None, n) => format!("{n} warning(s)"),
        };
        table.add_row(vec![
            r.run_id.clone(),
            r.status().into(),
            m.finished.clone(),
            format!("{seconds:.1}"),
            sum(|t| t.rows_read).to_string(),
            sum(|t| t.rows_rejected).to_string(),
            m.linkage
                .as_ref()
                .map(|l| l.persons.to_string())
                .unwrap_or_default(),
            rates.join(", "),
            note,
        ]);
    }
    println!("{table}");
}

/// `ward status`: exit 0 when the latest run is the current one.
fn status(warehouse: &Path) -> anyhow::Result<ExitCode> {
    let runs = ward::runs::list(warehouse)?;
    let current = runs.iter().find(|r| r.current);
    match current.and_then(|r| r.manifest.as_ref()) {
        Some(m) => println!(
            "current run: {} (finished {}, period {} to {}, {} output files)",
            m.run_id,
            m.finished,
            m.period.start,
            m.period.end,
            m.outputs.len()
        ),
        None => println!("current run: none published yet"),
    }
    let lock = ward::runs::Lock::inspect(warehouse)?;
    match &lock {
        Some((holder, true)) => println!("lock: held by {holder}"),
        Some((holder, false)) => {
            println!("lock: free (left by {holder}, which died; the next run takes it over)")
        }
        None => println!("lock: free"),
    }
    let Some(latest) = runs.first() else {
        println!("latest run: none");
        return Ok(ExitCode::from(EXIT_MISMATCH));
    };
    if latest.current {
        println!("latest run: {} published", latest.run_id);
        return Ok(ExitCode::SUCCESS);
    }
    let running = matches!(lock, Some((_, true)));
    match &latest.manifest {
        // Between its manifest and the publishing rename a run is still
        // running, not failed: no alarm while it holds the lock.
        Some(m) if running && m.status == ward::runs::RunStatus::Complete => {
            println!("latest run: {} complete, publishing now", latest.run_id);
            return Ok(ExitCode::SUCCESS);
        }
        Some(m) => {
            println!("latest run: {} {}", latest.run_id, latest.status());
            if let Some(e) = &m.error {
                println!("  why: {e}");
            }
            for g in m
                .gates
                .iter()
                .filter(|g| g.outcome == ward::runs::GateOutcome::Fail)
            {
                println!("  gate {}: {}", g.gate, g.message);
            }
        }
        None if latest.unreadable.is_some() => println!(
            "latest run: {} has an unreadable manifest: {}",
            latest.run_id,
            latest.unreadable.as_deref().unwrap_or_default()
        ),
        None => {
            if running {
                println!("latest run: {} running now", latest.run_id);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "latest run: {} interrupted (no manifest); the next run removes it",
                latest.run_id
            );
        }
    }
    Ok(ExitCode::from(EXIT_MISMATCH))
}

/// Warnings about the data a stage command reads: to stderr (even with
/// --quiet) and to the log.
fn announce_warnings(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
}

/// Refuses an output directory inside `runs/`: a published run is never
/// changed after publication.
fn refuse_inside_runs(warehouse: &Path, out: &Path) -> anyhow::Result<()> {
    let runs = ward::runs::runs_dir(warehouse);
    if is_inside(out, &runs) {
        return Err(WardError::Usage {
            message: format!(
                "{} is inside {}: published runs are never written to; choose another --out",
                out.display(),
                runs.display()
            ),
        }
        .into());
    }
    Ok(())
}

/// Whether `path` is `dir` or lies under it, after resolving symbolic
/// links of the longest part of each that exists (a link cannot hide it).
fn is_inside(path: &Path, dir: &Path) -> bool {
    let absolute = |p: &Path| {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        // Resolve the longest existing ancestor, so symlinks cannot hide runs/.
        let mut existing = p.clone();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut resolved = existing.canonicalize().unwrap_or(existing);
        resolved.extend(rest.iter().rev());
        resolved
    };
    absolute(path).starts_with(absolute(dir))
}

/// Opens `ward query --out`: never inside the warehouse (a query must not
/// replace `runs/CURRENT` or a research table), never through a symbolic
/// link, and an existing file only with `--force`.
fn create_query_output(
    warehouse: &Path,
    path: &Path,
    force: bool,
) -> anyhow::Result<std::fs::File> {
    check_query_output(warehouse, path, force)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// The checks of [`create_query_output`], made before the query runs.
fn check_query_output(warehouse: &Path, path: &Path, force: bool) -> anyhow::Result<()> {
    let usage = |message: String| anyhow::Error::from(WardError::Usage { message });
    if is_inside(path, warehouse) {
        return Err(usage(format!(
            "--out {} is inside the warehouse {}: query results are written elsewhere",
            path.display(),
            warehouse.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(usage(format!(
                "--out {} is a symbolic link: give the file itself",
                path.display()
            )));
        }
        Ok(m) if !m.is_file() => {
            return Err(usage(format!(
                "--out {} is not a regular file",
                path.display()
            )));
        }
        Ok(_) if !force => {
            return Err(usage(format!(
                "--out {} exists: pass --force to replace it",
                path.display()
            )));
        }
        _ => {}
    }
    Ok(())
}

/// The core tables `ward deid` reads and the research directory it
/// writes: the working copy at the warehouse root, like `link` and
/// `measure` (`ward run` de-identifies into its own run directory).
fn deid_dirs(config: &PipelineConfig) -> (PathBuf, PathBuf) {
    (
        config.warehouse.join("core"),
        config.warehouse.join("research"),
    )
}

/// The research tables `ward query` reads: those of the current published run.
fn research_dir(config: &PipelineConfig) -> anyhow::Result<PathBuf> {
    match ward::runs::current_dir(&config.warehouse)? {
        Some(run) => Ok(run.join("research")),
        None => anyhow::bail!(
            "no published run in {}: `ward run` publishes the research tables",
            config.warehouse.display()
        ),
    }
}

/// The `[deid]` key (the binary reads the environment for `key_env`); warns
/// loudly about the demo key.
fn deid_key(config: &PipelineConfig) -> anyhow::Result<ward::deid::DeidKey> {
    let key = ward::deid::resolve_key(&config.deid, |name| std::env::var(name).ok())?;
    if key.is_demo() {
        tracing::warn!(
            "DE-IDENTIFYING WITH THE PUBLIC DEMO KEY ([deid] demo_key = true): anyone can \
             recompute these research ids; set [deid] key_file or key_env for real data"
        );
    }
    Ok(key)
}

fn print_deid(r: &ward::deid::DeidReport) {
    let mode = if r.safe_harbor {
        "HIPAA Safe Harbor"
    } else {
        "date shift: a LIMITED DATA SET, NOT Safe Harbor"
    };
    let k = &r.k_anonymity;
    let rows: Vec<String> = r
        .tables
        .iter()
        .map(|t| format!("{} {}", t.table, t.rows_out))
        .collect();
    println!(
        "research tables ({mode}): {} ({}); k-anonymity (k = {}): {} of {} persons in {} classes \
         under k, {} fact rows{}",
        r.research_dir.display(),
        rows.join(", "),
        k.k,
        k.persons_below_k,
        k.persons,
        k.classes_below_k,
        k.records_below_k,
        if k.suppressed {
            ", suppressed"
        } else {
            " (not suppressed)"
        }
    );
}

#[allow(clippy::too_many_arguments)]
/// The text of `ward query --file`: a regular file of at most 1 MiB, read
/// without quoting any of it in an error.
fn read_query_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let usage = |message: &str| {
        anyhow::Error::from(WardError::Usage {
            message: format!("--file {}: {message}", path.display()),
        })
    };
    let meta = std::fs::metadata(path).map_err(|e| usage(&format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(usage("not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(|e| usage(&format!("cannot read: {e}")))?
        .take(1 << 20 | 1)
        .read_to_string(&mut text)
        .map_err(|_| usage("not UTF-8 text"))?;
    if text.len() > 1 << 20 {
        return Err(usage("larger than 1 MiB: not a query"));
    }
    Ok(text)
}

#[allow(clippy::too_many_arguments)]
fn query(
    config: &PipelineConfig,
    sql: &Option<String>,
    file: &Option<PathBuf>,
    format: QueryFormat,
    out: &Option<PathBuf>,
    force: bool,
    quiet: bool,
    opts: &ward::query::QueryOptions,
) -> anyhow::Result<ExitCode> {
    let min_cell = opts.min_cell;
    let from_file = sql.is_none();
    let usage = |key: &str, message: &str| WardError::Usage {
        message: format!("{key}: {message}"),
    };
    let sql = match (sql, file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) => read_query_file(f)?,
        (None, None) => return Err(usage("SQL", "give a query or --file").into()),
    };
    if min_cell == Some(0) {
        return Err(usage("--min-cell", "must be at least 1").into());
    }
    let format = match format {
        QueryFormat::Table => ward::query::OutputFormat::Table,
        QueryFormat::Csv => ward::query::OutputFormat::Csv,
        QueryFormat::Json => ward::query::OutputFormat::Json,
        QueryFormat::Parquet => ward::query::OutputFormat::Parquet,
    };
    if format == ward::query::OutputFormat::Parquet && out.is_none() {
        return Err(usage("--out", "--format parquet needs --out FILE").into());
    }
    if let Some(path) = out {
        check_query_output(&config.warehouse, path, force)?;
    }
    let research = research_dir(config)?;
    bound_query_process(opts);
    if !quiet {
        // On stderr: stdout is the result (CSV, JSON) and stays clean.
        eprintln!(
            "query reads: the research tables of the published run ({})",
            research.display()
        );
    }
    let result = match ward::query::query(&research, &sql, opts) {
        // Parser messages quote the text they stopped at: for a file that
        // is not SQL (`--file /etc/shadow`), only where.
        Err(WardError::Query {
            refused: false,
            message,
        }) if from_file => {
            let at = message
                .find("at Line:")
                .map(|i| format!(" ({})", &message[i..]))
                .unwrap_or_default();
            return Err(WardError::Query {
                refused: false,
                message: format!("the --file is not one valid SQL query{at}"),
            }
            .into());
        }
        other => other?,
    };
    match out {
        Some(path) => {
            let file = create_query_output(&config.warehouse, path, force)?;
            ward::query::write_output(&result, format, std::io::BufWriter::new(file))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => ward::query::write_output(&result, format, std::io::stdout())?,
    }
    if result.suppressed_cells > 0 {
        eprintln!(
            "min-cell {}: {} count(s) under {} replaced by NULL in {}",
            min_cell.unwrap_or(0),
            result.suppressed_cells,
            min_cell.unwrap_or(0),
            result.count_columns.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Hard limits on the `ward query` process, behind the engine's own: the
/// process stops (exit 3, nothing written) when it holds more than twice
/// the memory limit beyond what it held before the query (a function whose
/// memory the engine does not track: `repeat`, `range`, `string_agg`), or
/// when it outlives the time limit by a grace period (work that never
/// yields to the engine's timer).
fn bound_query_process(opts: &ward::query::QueryOptions) {
    const GRACE: std::time::Duration = std::time::Duration::from_secs(15);
    if let Some(limit) = opts.memory_limit {
        let cap = memcap::held().saturating_add(limit.saturating_mul(2));
        memcap::set_cap(
            cap,
            format!(
                "error: the query needed more than twice its memory limit of {} MiB and was \
                 stopped; nothing was written (filter, aggregate or add LIMIT, or raise \
                 --memory-limit)",
                limit >> 20
            ),
        );
    }
    if let Some(timeout) = opts.timeout {
        let message = format!(
            "error: the query did not finish within its time limit of {} and was stopped; \
             nothing was written (raise --timeout)\n",
            ward::query::format_duration(timeout)
        );
        std::thread::spawn(move || {
            std::thread::sleep(timeout + GRACE);
            eprint!("{message}");
            std::process::exit(EXIT_FAILED.into());
        });
    }
}

/// The config file: `--config`, else `./ward.toml`, else (unless
/// `no_sample`) the bundled sample's; and whether it is the sample's.
fn resolve_config(given: Option<&Path>, no_sample: bool) -> anyhow::Result<(PathBuf, bool)> {
    if let Some(p) = given {
        return Ok((p.to_path_buf(), false));
    }
    let local = PathBuf::from("ward.toml");
    if local.is_file() {
        return Ok((local, false));
    }
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sample_data")
        .join("ward.toml");
    if no_sample {
        return Err(WardError::Usage {
            message: "no --config given and no ./ward.toml in the working directory \
                      (--no-sample: the bundled sample is not used)"
                .into(),
        }
        .into());
    }
    if bundled.is_file() {
        return Ok((bundled, true));
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

/// The queries directory: the config's `queries`, else `./queries`, else the
/// bundled one.
fn resolve_queries(configured: Option<&Path>) -> PathBuf {
    if let Some(q) = configured {
        return q.to_path_buf();
    }
    let local = PathBuf::from("queries");
    if local.join("measures").is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("queries")
}

fn print_link(report: &ward::link::LinkReport, core: &ward::link::build::BuildReport) {
    let rules: Vec<String> = report
        .pairs_by_rule
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    println!(
        "link: {} patient records -> {} persons ({} seen by more than one provider); \
         {} candidate pairs ({}), {} above the threshold, {} weighed by the household level \
         (given names differ; family name, address or phone and birth date agree; {:.1} % of them matches), \
         {} within-source duplicates merged, {} merges refused (same source on both sides, \
         evidence below the within-source threshold); {} persons kept their id from the last run; \
         {} records ({} persons) without a usable birth date",
        report.records,
        report.persons,
        report.linked_persons,
        report.candidate_pairs,
        rules.join(", "),
        report.accepted_pairs,
        report.household_pairs,
        100.0 * report.household_match_share,
        report.within_source_merges,
        report.refused_merges,
        report.ids_carried_forward,
        report.records_without_birth_date,
        report.persons_without_birth_date
    );
    for w in &report.warnings {
        println!("warning: linkage: {w}");
    }
    let tables: Vec<String> = core
        .iter()
        .map(|(t, n)| format!("{} {n}", t.name()))
        .collect();
    println!("core rows: {}", tables.join(", "));
}

/// The match-weight waterfall of `ward link --explain` (identified record
/// ids the operator gave; no field values).
fn print_explanation(e: &ward::link::Explanation, a: &str, b: &str) {
    println!("{a} and {b}:");
    let mut table = TextTable::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "field",
        "level",
        "m",
        "u",
        "weight (log2)",
    ]);
    table.add_row(vec![
        "prior".to_string(),
        "odds of a match among all pairs".into(),
        String::new(),
        String::new(),
        format!("{:+.2}", e.prior_weight),
    ]);
    for f in &e.fields {
        let p = |x: Option<f64>| x.map_or_else(String::new, |v| format!("{v:.4}"));
        table.add_row(vec![
            f.field.clone(),
            f.level
                .clone()
                .unwrap_or_else(|| "missing: no evidence".into()),
            p(f.m),
            p(f.u),
            format!("{:+.2}", f.weight),
        ]);
    }
    println!("{table}");
    let verdict = match (e.blocked_by.as_deref(), e.probability >= e.threshold) {
        (None, _) => "never compared: no blocking rule holds for this pair".to_string(),
        (Some(rule), true) => format!("linked (candidate by blocking rule {rule})"),
        (Some(rule), false) => format!("not linked (candidate by blocking rule {rule})"),
    };
    println!(
        "match weight {:+.2}, probability {:.6} (threshold {}): {verdict}",
        e.weight, e.probability, e.threshold
    );
}

fn print_measure_list(defs: &[ward::measure::MeasureDef]) {
    let mut table = TextTable::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(vec!["id", "title", "version", "better", "steward"]);
    for d in defs {
        table.add_row(vec![
            d.id.clone(),
            d.title.clone(),
            d.version.clone().unwrap_or_default(),
            match d.improvement {
                ward::measure::Improvement::Increase => "higher".into(),
                ward::measure::Improvement::Decrease => "lower".to_string(),
            },
            d.steward.clone(),
        ]);
    }
    println!("{table}");
}

fn print_measures(results: &[ward::measure::MeasureResult]) {
    let Some(first) = results.first() else {
        return;
    };
    println!(
        "measures, period {} to {}; rate = numerator / (denominator - exclusions - exceptions)",
        first.period.start, first.period.end
    );
    let mut table = TextTable::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "measure",
        "initial pop.",
        "denominator",
        "exclusions",
        "exceptions",
        "numerator",
        "rate",
        "better",
    ]);
    for r in results {
        let c = &r.counts;
        table.add_row(vec![
            r.key(),
            c.initial_population.to_string(),
            c.denominator.to_string(),
            c.denominator_exclusion.to_string(),
            c.denominator_exception.to_string(),
            c.numerator.to_string(),
            r.def.format_score(r.score),
            match r.def.improvement {
                ward::measure::Improvement::Increase => "higher".into(),
                ward::measure::Improvement::Decrease => "lower".into(),
            },
        ]);
    }
    println!("{table}");
    // The other scorings fill the proportion's columns their own way.
    for r in results {
        match r.def.scoring {
            Scoring::Proportion => {}
            Scoring::Ratio => println!(
                "{} is a ratio: exceptions = numerator exclusions, \
                 rate = (numerator - exceptions) / (denominator - exclusions)",
                r.key()
            ),
            Scoring::ContinuousVariable => println!(
                "{} is a continuous variable: denominator = measure population, \
                 exclusions = its exclusions, rate = the aggregate of {} observations",
                r.key(),
                r.counts.performance(r.def.scoring)
            ),
        }
    }
    for r in results.iter().filter(|r| !r.categories.is_empty()) {
        let list: Vec<String> = r
            .categories
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!(
            "{} by {}: {}",
            r.key(),
            r.def.category.as_deref().unwrap_or(""),
            list.join(", ")
        );
    }
    // The measure's own stratifiers: numerator / performance denominator.
    for r in results {
        let mut by: Vec<(&str, Vec<String>)> = Vec::new();
        for s in &r.strata {
            let c = &s.counts;
            let scoring = r.def.scoring;
            let text = if scoring == Scoring::ContinuousVariable {
                format!(
                    "{} n={} ({})",
                    s.value,
                    c.performance(scoring),
                    r.def.format_score(s.score)
                )
            } else {
                format!(
                    "{} {}/{} ({})",
                    s.value,
                    c.performance_numerator(scoring),
                    c.performance(scoring),
                    r.def.format_score(s.score)
                )
            };
            match by.last_mut() {
                Some((id, list)) if *id == s.stratifier => list.push(text),
                _ => by.push((&s.stratifier, vec![text])),
            }
        }
        for (id, list) in by {
            println!("{} by {id}: {}", r.key(), list.join(", "));
        }
    }
}

fn print_conformance(outcome: &ward::measure::conformance::Conformance, quiet: bool) {
    let failures = outcome.failures();
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        ward::measure::POPULATIONS
            .iter()
            .map(|p| m.get(*p).map_or("-".into(), u64::to_string))
            .collect::<Vec<_>>()
            .join("/")
    };
    // One line per scope (group, stratum), labelled when there are several.
    let lines = |scopes: &[&ward::measure::conformance::Scope],
                 pick: &dyn Fn(&ward::measure::conformance::Scope) -> String| {
        scopes
            .iter()
            .map(|s| {
                if s.label.is_empty() {
                    pick(s)
                } else {
                    format!("{}: {}", s.label, pick(s))
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if quiet {
        // Quiet still names what failed.
        for c in outcome.cases.iter().filter(|c| !c.passed()) {
            for s in c.scopes.iter().filter(|s| !s.passed()) {
                let label = if s.label.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.label)
                };
                println!(
                    "FAIL {}{label}: expected {}, computed {} (IP/DEN/DENEX/DENEXCEP/NUM)",
                    c.name,
                    counts(&s.expected),
                    counts(&s.actual)
                );
            }
        }
    } else {
        let mut table = TextTable::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
            "case",
            "result",
            "expected (IP/DEN/DENEX/DENEXCEP/NUM)",
            "computed",
            "rejected resources",
        ]);
        for c in &outcome.cases {
            let scopes: Vec<_> = c.scopes.iter().collect();
            table.add_row(vec![
                c.name.clone(),
                if c.passed() { "pass" } else { "FAIL" }.into(),
                lines(&scopes, &|s| counts(&s.expected)),
                lines(&scopes, &|s| counts(&s.actual)),
                c.rejects
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
        }
        println!("{table}");
    }
    println!(
        "conformance {}: {} of {} cases pass",
        outcome.measure,
        outcome.cases.len() - failures,
        outcome.cases.len()
    );
}

/// Every file and directory Ward creates is at most 0640 / 0750 (staging
/// holds SSNs, rejects raw rows), whatever umask cron or a shell left: the
/// process's file-creation mask keeps the caller's bits and adds 027.
fn restrict_file_mode() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    unsafe {
        let caller = libc::umask(0o027);
        libc::umask(caller | 0o027);
    }
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
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || logging::ControlEscaped::new(std::io::stderr(), ansi))
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            use tracing_subscriber::layer::SubscriberExt;
            let context = logging::RunContext::default();
            let subscriber = builder
                .event_format(logging::JsonLines(context.clone()))
                .finish()
                .with(context);
            tracing::subscriber::set_global_default(subscriber).expect("logging set up once");
        }
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

/// `ward validate --examples N`: per rule, where its first N rejects are
/// (control characters of file names and values escaped).
fn print_reject_examples(report: &IngestReport, n: usize) {
    let mut by_rule = std::collections::BTreeMap::<&str, Vec<String>>::new();
    for f in &report.files {
        for e in &f.reject_examples {
            let places = by_rule.entry(e.rule).or_default();
            if places.len() == n {
                continue;
            }
            let mut at = format!("{}/{}:{}", f.source, f.file, e.line)
                .escape_debug()
                .to_string();
            if let Some(column) = &e.column {
                at.push_str(&format!(" column {}", column.escape_debug()));
            }
            if let Some(value) = &e.value {
                at.push_str(&format!(" value {value:?}"));
            }
            places.push(at);
        }
    }
    if !by_rule.is_empty() {
        println!("first {n} reject(s) of each rule (file:line):");
    }
    for (rule, places) in by_rule {
        println!("  {rule}:");
        for place in places {
            println!("    {place}");
        }
    }
}

fn print_summary(report: &IngestReport, dry_run: bool, examples: usize) {
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
            count(&[
                FileStatus::Duplicate,
                FileStatus::Unmapped,
                FileStatus::Ignored,
            ]),
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
         (ignored: unmapped or duplicate files, and matched paths that are not regular files of the source's directory; skipped: FHIR resource types Ward does not load)"
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
    print_reject_examples(report, examples);
    let mut flagged = std::collections::BTreeMap::<&str, u64>::new();
    for f in &report.files {
        for (what, n) in &f.values_flagged {
            *flagged.entry(what).or_default() += n;
        }
    }
    if !flagged.is_empty() {
        let list: Vec<String> = flagged.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!(
            "values kept as unknown (rows accepted): {}",
            list.join(", ")
        );
    }
}
