//! The command line: flags and subcommands, as clap parses them. Nothing
//! here decides anything; [`crate::commands`] and `ward::settings` do.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Ward: provider extracts in, validated Parquet warehouse and population
/// health measures out.
#[derive(Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Cli {
    /// Pipeline config. Default: ./ward.toml if present, else the bundled
    /// sample config (said on stderr).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Never fall back to the bundled sample config: without --config and
    /// without ./ward.toml, exit 2 (for scheduled jobs).
    #[arg(long, global = true)]
    pub(crate) no_sample: bool,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Errors only; no summary table.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub(crate) quiet: bool,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// `ward synth --noise`.
#[cfg(feature = "synth")]
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Noise {
    Classic,
    Hard,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum QueryFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run every stage (the nightly job): ingest, link and core tables, every
    /// measure, the stratified summary and care-gap lists.
    Run(RunArgs),
    /// Load new and changed extracts into staging.
    Ingest,
    /// Check every extract (against its mapping, or the FHIR rules) and report; write nothing.
    Validate(ValidateArgs),
    /// Link patient records across providers into persons, then build the
    /// core tables (core/person_link, core/person, core/<table>).
    Link(LinkArgs),
    /// Run measures and write marts/measure_patient/. Reads the current
    /// published run's linked core (else the working copy's); never writes
    /// into a published run.
    Measure(MeasureArgs),
    /// List past runs, newest first: status, timings, rows, headline rates.
    Runs {
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The current published run, the lock, and whether the latest run
    /// failed and why; exits 1 when the latest run did not publish.
    Status,
    /// The data-quality scorecard of the current published run: checks
    /// passed, warned and failed per source and category, the checks that
    /// did not pass, and drift.
    Dq {
        /// Print the run's every check result as JSON (dq.json).
        #[arg(long)]
        json: bool,
        /// List every check, not only those that did not pass or drifted.
        #[arg(long)]
        all: bool,
    },
    /// Measures: list the measures of queries/measures/.
    Measures {
        #[command(subcommand)]
        action: MeasuresAction,
    },
    /// Check a measure against an eCQM test deck (one folder per case with a
    /// Bundle and its expected MeasureReport); exits 1 on any mismatch.
    Conformance(ConformanceArgs),
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
    Query(QueryArgs),
    /// Serve the research tables of the current run over Arrow Flight SQL
    /// (TLS, researcher tokens, audit log; see [serve] in the config), or
    /// manage researchers' tokens.
    Serve(ServeArgs),
    /// Generate a synthetic multi-provider population with ground truth.
    #[cfg(feature = "synth")]
    Synth(SynthArgs),
    /// Run a Ballista scheduler for `[engine] kind = "ballista"`: it plans
    /// the SQL stages of `ward run` and hands their tasks to executors.
    #[cfg(feature = "ballista")]
    Scheduler {
        /// Listen on this address (gRPC for clients and executors, and the
        /// REST API /api/executors, /api/jobs).
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:50050")]
        listen: std::net::SocketAddr,
        /// Seconds without a heartbeat after which an executor is declared
        /// dead and its tasks run on the others.
        #[arg(long, value_name = "SECONDS", default_value_t = 180,
              value_parser = clap::value_parser!(u64).range(2..))]
        executor_timeout: u64,
    },
    /// Run a Ballista executor: registers with the scheduler and runs the
    /// tasks it is given.
    #[cfg(feature = "ballista")]
    Executor(ExecutorArgs),
}

/// `ward executor`.
#[cfg(feature = "ballista")]
#[derive(clap::Args)]
pub(crate) struct ExecutorArgs {
    /// The scheduler to register with.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) scheduler: String,
    /// Listen on this address for fetches of shuffle data (Arrow Flight).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:50051")]
    pub(crate) listen: std::net::SocketAddr,
    /// Port of the executor's gRPC service.
    #[arg(long, default_value_t = 50052)]
    pub(crate) grpc_port: u16,
    /// The host name the scheduler, the driver and other executors reach
    /// this executor at (default: the --listen address).
    #[arg(long)]
    pub(crate) external_host: Option<String>,
    /// Tasks run at once (default: the machine's cores).
    #[arg(long)]
    pub(crate) slots: Option<usize>,
    /// Directory for shuffle files (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub(crate) work_dir: Option<PathBuf>,
    /// Seconds between heartbeats to the scheduler (keep well under its
    /// --executor-timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) heartbeat: u64,
    /// Memory the executor's queries may hold (e.g. 8G) before they spill;
    /// default: no limit.
    #[arg(long, value_name = "SIZE")]
    pub(crate) memory_limit: Option<String>,
}

#[derive(clap::Args, Clone, Copy)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) period: PeriodArgs,
    /// Recompute every stage from staging, even those whose inputs did not
    /// change since the current run (by default their outputs are taken
    /// from it).
    #[arg(long)]
    pub(crate) full: bool,
    /// Fit the linkage model anew and recompute every stage (by default the
    /// model of the current run is kept until the patient records grow by
    /// `[link] refit_growth`).
    #[arg(long)]
    pub(crate) refit: bool,
}

/// The measurement period; default: the config's, else the previous calendar year.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct PeriodArgs {
    /// First day of the measurement period (YYYY-MM-DD).
    #[arg(long, requires = "period_end")]
    pub(crate) period_start: Option<chrono::NaiveDate>,
    /// Last day of the measurement period (YYYY-MM-DD).
    #[arg(long, requires = "period_start")]
    pub(crate) period_end: Option<chrono::NaiveDate>,
}

#[derive(Subcommand)]
pub(crate) enum MeasuresAction {
    /// One line per measure: id, title, version, improvement direction.
    List,
}

#[derive(Subcommand)]
pub(crate) enum ValuesetsAction {
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

/// `ward serve`.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    #[command(subcommand)]
    pub(crate) action: Option<ServeAction>,
    /// Listen on this address instead of [serve] listen (port 0: any free port).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
pub(crate) enum ServeAction {
    /// Researchers' tokens: issue, revoke, list.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenAction {
    /// Issue a token for NAME and print it (the only time it is shown; the
    /// store keeps its hash).
    Add {
        name: String,
        /// Only these research tables (comma-separated); default: all.
        #[arg(long, value_delimiter = ',', value_name = "TABLE,...")]
        tables: Option<Vec<String>>,
    },
    /// Revoke NAME's token: refused from its next request on.
    Revoke { name: String },
    /// List researchers: name, issued, revoked, tables.
    List,
}

/// `ward validate`.
#[derive(clap::Args)]
pub(crate) struct ValidateArgs {
    /// Also print where the first N rejects of each rule are (file,
    /// line, column).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) examples: usize,
    /// With --examples, print each reject's offending value too: patient
    /// data on this terminal.
    #[arg(long, requires = "examples")]
    pub(crate) show_values: bool,
}

/// `ward link`.
#[derive(clap::Args)]
pub(crate) struct LinkArgs {
    /// Ground truth (source,source_patient_id,person_id) to score the
    /// linkage against: pairwise precision, recall, F1.
    #[arg(long, value_name = "TRUTH.csv")]
    pub(crate) evaluate: Option<PathBuf>,
    /// Explain the model's verdict on two staged records (each
    /// SOURCE:ID): every field's level, m, u and weight, the prior, the
    /// probability and the blocking rule. Writes nothing.
    #[arg(long, num_args = 2, value_names = ["SOURCE:ID", "SOURCE:ID"], conflicts_with = "evaluate")]
    pub(crate) explain: Option<Vec<String>>,
    /// Fit the linkage model anew (by default the one kept in the working
    /// copy's core/ is used until the patient records grow by `[link]
    /// refit_growth`, and only new records are blocked).
    #[arg(long, conflicts_with = "explain")]
    pub(crate) refit: bool,
}

/// `ward measure`.
#[derive(clap::Args)]
pub(crate) struct MeasureArgs {
    /// Measure id (repeatable); default: every measure.
    #[arg(long = "measure", value_name = "ID")]
    pub(crate) measures: Vec<String>,
    #[command(flatten)]
    pub(crate) period: PeriodArgs,
    /// Measure unlinked staging instead: every provider record counts
    /// as its own person (numbers differ from a linked run).
    #[arg(long, conflicts_with = "working_copy")]
    pub(crate) unlinked: bool,
    /// Measure the working copy's core (`ward link`) even when a run is published.
    #[arg(long)]
    pub(crate) working_copy: bool,
    /// Write marts/ under DIR instead of the warehouse root (the working copy).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Write DIR/<measure>.txt per measure: its executed plan with the
    /// metrics of every operator (rows, time, memory), the slowest first.
    #[arg(long, value_name = "DIR")]
    pub(crate) profile: Option<PathBuf>,
}

/// `ward conformance`.
#[derive(clap::Args)]
pub(crate) struct ConformanceArgs {
    /// The deck directory (e.g. ../shared/data/ecqm/CMS165/tests).
    #[arg(long)]
    pub(crate) deck: PathBuf,
    /// Measure id.
    #[arg(long)]
    pub(crate) measure: String,
    /// Scratch warehouse (emptied first). Default: a temporary directory.
    #[arg(long)]
    pub(crate) scratch: Option<PathBuf>,
}

/// `ward query`.
#[derive(clap::Args)]
pub(crate) struct QueryArgs {
    /// The SQL query (or --file).
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub(crate) sql: Option<String>,
    /// Read the SQL query from a file.
    #[arg(long, value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
    pub(crate) format: QueryFormat,
    /// Write the result to a file instead of stdout (required for
    /// parquet); never inside the warehouse, never through a symlink.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Replace the --out file when it exists.
    #[arg(long, requires = "out")]
    pub(crate) force: bool,
    /// Replace counts from 1 to N-1 (integer COUNT/SUM results) by NULL.
    #[arg(long, value_name = "N")]
    pub(crate) min_cell: Option<u64>,
    /// Memory the query may use, operators and result together (e.g.
    /// 512M, 8G); more fails the query. Default: half of physical memory.
    /// The process as a whole stops (exit 3) past twice this limit, so
    /// functions whose memory the engine does not track are bounded too.
    #[arg(long, value_name = "SIZE", value_parser = ward::query::parse_size)]
    pub(crate) memory_limit: Option<usize>,
    /// Time the query may take (e.g. 90s, 10m, 2h); longer fails it.
    #[arg(long, value_name = "DURATION", value_parser = ward::query::parse_duration,
          default_value = "10m")]
    pub(crate) timeout: std::time::Duration,
}

/// `ward synth`.
#[cfg(feature = "synth")]
#[derive(clap::Args)]
pub(crate) struct SynthArgs {
    /// Number of persons.
    #[arg(long, default_value_t = 1000)]
    pub(crate) patients: u64,
    /// Number of providers (clinics, hospitals and endocrinology practices in turn).
    #[arg(long, default_value_t = 3)]
    pub(crate) providers: usize,
    /// Random seed: the same options give the same files.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Output directory (provider folders, mappings, ward.toml, truth.csv, ...).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Share of rows written deliberately bad (each listed in expected_rejects.csv).
    #[arg(long, default_value_t = 0.002)]
    pub(crate) bad_rate: f64,
    /// Calendar year of the measurement period.
    #[arg(long, default_value_t = 2025)]
    pub(crate) year: i32,
    /// The noise in the records: `hard` (default) adds what breaks
    /// naive linkage to `classic` (nicknames, typos, swapped day/month,
    /// moves): swapped names, initials, missing birth dates, identifier
    /// and street formats, duplicate registrations within a provider.
    #[arg(long, value_enum, default_value_t = Noise::Hard)]
    pub(crate) noise: Noise,
}
