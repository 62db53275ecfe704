//! The `ward` command line: parses arguments ([`args`]), resolves the
//! config into checked settings (`ward::settings`), dispatches to one
//! function per command ([`commands`]) and maps the outcome to an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use ward::WardError;

use args::{Cli, Command, LogFormat, MeasuresAction};

mod args;
mod commands;
mod logging;
mod memcap;
mod print;
mod query;

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

fn main() -> ExitCode {
    restrict_file_mode();
    let cli = Cli::parse();
    init_logging(&cli);
    if !matches!(cli.command, Command::Serve(_)) {
        memcap::batch_memory_settings();
    }
    ward::runs::set_memory_counter(ward::runs::MemoryCounter {
        peak: memcap::peak,
        reset: memcap::reset_peak,
    });
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            let message = describe(&e);
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::from(match e.downcast_ref::<WardError>() {
                Some(w) if w.is_config_error() => EXIT_CONFIG,
                Some(WardError::GateFailed { .. }) => EXIT_MISMATCH,
                Some(WardError::Locked { .. }) => EXIT_LOCKED,
                _ => EXIT_FAILED,
            })
        }
    }
}

/// The error and its causes, each said once: Ward's errors already end
/// with their cause's message, which the chain repeats.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// Runs the command: those that need no config first, then the rest with
/// the settings resolved from `--config` (see `ward::settings`).
fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    let quiet = cli.quiet;
    let config = cli.config.as_deref();
    let settings = || commands::settings(config, cli.no_sample);
    // The stages that run SQL do so on the engine of `[engine]`.
    let staged = |f: &dyn Fn(&ward::settings::Settings) -> anyhow::Result<ExitCode>| {
        let settings = settings()?;
        let _engine = ward::cluster::activate(&settings.config.engine)?;
        f(&settings)
    };
    match &cli.command {
        #[cfg(feature = "synth")]
        Command::Synth(args) => commands::synth(args, quiet),
        #[cfg(feature = "ballista")]
        Command::Scheduler {
            listen,
            executor_timeout,
        } => {
            ward::cluster::run_scheduler(*listen, *executor_timeout)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "ballista")]
        Command::Executor(args) => commands::executor(args),
        Command::Valuesets { action } => commands::valuesets(action, quiet),
        Command::Measures {
            action: MeasuresAction::List,
        } => commands::list_measures(config),
        Command::Conformance(args) => commands::conformance(args, config, quiet),
        Command::Query(args) => query::query(&settings()?, args, quiet),
        Command::Serve(args) => commands::serve(&settings()?, args, quiet),
        Command::Runs { limit } => commands::runs(&settings()?, *limit),
        Command::Status => commands::status(&settings()?),
        Command::Dq { json, all } => commands::dq(&settings()?, *json, *all),
        Command::Deid => commands::deid(&settings()?, quiet),
        Command::Link(args) => staged(&|s| commands::link(s, args, quiet)),
        Command::Measure(args) => staged(&|s| commands::measure(s, args, quiet)),
        Command::Run(args) => staged(&|s| commands::run(s, args, quiet)),
        Command::Ingest => commands::ingest(&settings()?, None, quiet),
        Command::Validate(args) => commands::ingest(&settings()?, Some(args), quiet),
    }
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

/// The library's progress on a terminal bar.
struct Bar(ProgressBar);

impl ward::Progress for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
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
