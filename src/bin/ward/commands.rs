//! One function per command: each takes its parsed arguments and the
//! resolved [`Settings`], calls the library and prints through
//! [`crate::print`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use ward::settings::Settings;
use ward::{IngestOptions, WardError};

use crate::args::{
    ConformanceArgs, LinkArgs, MeasureArgs, PeriodArgs, RunArgs, ServeAction, ServeArgs,
    TokenAction, ValidateArgs, ValuesetsAction,
};
use crate::print::{self, announce_warnings};
use crate::{Bar, EXIT_FAILED, EXIT_MISMATCH, progress_bar};

/// Loads the settings of a command that reads a config, saying loudly when
/// that is the bundled sample's.
pub(crate) fn settings(config: Option<&Path>, no_sample: bool) -> anyhow::Result<Settings> {
    let settings = Settings::load(config, no_sample)?;
    tracing::info!(config = %settings.config_path.display(), "configuration");
    if settings.bundled_sample {
        // Whatever the verbosity: a job started in the wrong directory
        // must not pass for a real night.
        eprintln!(
            "warning: no --config and no ./ward.toml: using the bundled sample config {} \
             (warehouse {}); give --config, and --no-sample in scheduled jobs",
            settings.config_path.display(),
            settings.config.warehouse.display()
        );
    }
    Ok(settings)
}

/// Gives the warehouse the configured group (`warehouse_group`), if any.
fn apply_group(settings: &Settings) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Some(gid) = settings.config.warehouse_group {
        ward::warehouse::apply_group(&settings.config.warehouse, gid)?;
    }
    Ok(())
}

/// Takes the warehouse for a command that writes to it: the configured
/// group first, then the lock (one writer at a time).
fn writing(settings: &Settings, command: &str) -> anyhow::Result<ward::runs::Lock> {
    apply_group(settings)?;
    Ok(ward::runs::Lock::acquire(
        &settings.config.warehouse,
        &format!("ward {command}"),
    )?)
}

/// The measurement period of `--period-start`/`--period-end`, the config,
/// or the year before.
fn period(settings: &Settings, args: &PeriodArgs) -> ward::Result<ward::measure::Period> {
    settings.period(args.period_start, args.period_end)
}

/// `ward synth` (the `synth` feature).
#[cfg(feature = "synth")]
pub(crate) fn synth(args: &crate::args::SynthArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let opts = ward_synth::SynthOptions {
        patients: args.patients,
        providers: args.providers,
        seed: args.seed,
        out: args.out.clone(),
        bad_rate: args.bad_rate,
        year: args.year,
        hard_noise: matches!(args.noise, crate::args::Noise::Hard),
    };
    let progress = progress_bar(quiet, "synth", "persons");
    progress.set_length(opts.patients);
    let report = ward_synth::synth(&opts, &|n| progress.inc(n)).map_err(|e| match e {
        ward_synth::SynthError::Options(message) => {
            anyhow::Error::from(WardError::Usage { message })
        }
        e => e.into(),
    })?;
    progress.finish_and_clear();
    if !quiet {
        println!(
            "synth: {} persons, {} provider records, {} rows ({} deliberately bad) in {}",
            report.persons,
            report.source_patients,
            report.rows,
            report.expected_rejects,
            args.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ward valuesets convert`.
pub(crate) fn valuesets(action: &ValuesetsAction, quiet: bool) -> anyhow::Result<ExitCode> {
    let ValuesetsAction::Convert { out, inputs } = action;
    let report = ward::valuesets::convert(inputs, out)?;
    for (oid, kept, dropped) in &report.superseded {
        tracing::info!(valueset = %oid, kept = %kept, dropped = %dropped, "value set read twice; newer version kept");
    }
    for oid in &report.not_expanded {
        tracing::warn!(valueset = %oid, "no expansion and no enumerated concepts: not converted");
    }
    if !quiet {
        let codes: usize = report.written.iter().map(|v| v.codes.len()).sum();
        println!(
            "valuesets: {} value sets, {codes} codes written to {}; {} not converted (no expansion)",
            report.written.len(),
            out.display(),
            report.not_expanded.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The queries directory of a command that needs no config but honours
/// `--config`'s `queries` when given.
fn queries_of(config: Option<&Path>) -> anyhow::Result<PathBuf> {
    let configured = match config {
        Some(path) => ward::PipelineConfig::load(path)?.queries,
        None => None,
    };
    Ok(ward::settings::queries_dir(configured.as_deref()))
}

/// `ward measures list`.
pub(crate) fn list_measures(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let defs = ward::measure::catalog(&queries_of(config)?)?;
    print::print_measure_list(&defs);
    Ok(ExitCode::SUCCESS)
}

/// `ward conformance`: exit 1 on any mismatching case.
pub(crate) fn conformance(
    args: &ConformanceArgs,
    config: Option<&Path>,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let queries = queries_of(config)?;
    let defs = ward::measure::catalog(&queries)?;
    let def = ward::measure::select(&defs, std::slice::from_ref(&args.measure))?[0];
    let temp;
    let scratch = match &args.scratch {
        Some(s) => s.clone(),
        None => {
            temp = tempfile::tempdir().context("creating a scratch directory")?;
            temp.path().join("conformance")
        }
    };
    let outcome = ward::measure::conformance::run(&args.deck, def, &queries, &scratch)?;
    print::print_conformance(&outcome, quiet);
    Ok(if outcome.failures() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_MISMATCH)
    })
}

/// `ward serve`: the Flight SQL server, or its `token` commands.
pub(crate) fn serve(
    settings: &Settings,
    args: &ServeArgs,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let mut config = settings.config.serve.clone();
    let store = ward::serve::tokens::TokenStore::new(&config.tokens);
    match &args.action {
        Some(ServeAction::Token { action }) => {
            match action {
                TokenAction::Add { name, tables } => {
                    let token = store.add(name, tables.clone())?;
                    if !quiet {
                        eprintln!(
                            "token for {name} (shown once; {} keeps only its hash):",
                            store.path().display()
                        );
                    }
                    println!("{token}");
                }
                TokenAction::Revoke { name } => {
                    if !store.revoke(name)? {
                        return Err(WardError::Usage {
                            message: format!("{name} has no active token"),
                        }
                        .into());
                    }
                    if !quiet {
                        eprintln!("revoked: {name}'s token is refused from its next request on");
                    }
                }
                TokenAction::List => print::print_tokens(&store.list()?),
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let warehouse = &settings.config.warehouse;
    ward::serve::serve(warehouse, &config, |addr| {
        use std::io::Write;
        let mode = if config.tls.is_some() {
            "TLS"
        } else {
            "plaintext (insecure)"
        };
        println!(
            "ward serve: listening on {addr} ({mode}); research tables of {}",
            warehouse.display()
        );
        let _ = std::io::stdout().flush();
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `ward executor`: a Ballista executor with Ward's functions.
#[cfg(feature = "ballista")]
pub(crate) fn executor(args: &crate::args::ExecutorArgs) -> anyhow::Result<ExitCode> {
    let memory_limit = args
        .memory_limit
        .as_deref()
        .map(ward::query::parse_size)
        .transpose()
        .map_err(|message| WardError::Usage {
            message: format!("--memory-limit: {message}"),
        })?;
    ward::cluster::run_executor(&ward::cluster::ExecutorOptions {
        scheduler: args.scheduler.clone(),
        listen: args.listen,
        external_host: args.external_host.clone(),
        grpc_port: args.grpc_port,
        slots: args.slots,
        work_dir: args.work_dir.clone(),
        heartbeat: args.heartbeat,
        memory_limit: memory_limit.map(|b| b as u64),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `ward runs`.
pub(crate) fn runs(settings: &Settings, limit: usize) -> anyhow::Result<ExitCode> {
    print::print_runs(&ward::runs::list(&settings.config.warehouse)?, limit);
    Ok(ExitCode::SUCCESS)
}

/// `ward dq`: the current run's data-quality results.
pub(crate) fn dq(settings: &Settings, json: bool, all: bool) -> anyhow::Result<ExitCode> {
    let warehouse = &settings.config.warehouse;
    let Some(dir) = ward::runs::current_dir(warehouse)? else {
        anyhow::bail!("no run has been published yet in {}", warehouse.display());
    };
    let run_id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join("reports").join(&run_id).join("dq.json");
    if !path.is_file() {
        anyhow::bail!(
            "run {run_id} has no data-quality results ({} is missing: it ran before the checks existed)",
            path.display()
        );
    }
    let results = ward::dq::read(&path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("data-quality checks of run {run_id}");
        print::print_dq(&results, all);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ward status`: exit 0 when the latest run is the current one.
pub(crate) fn status(settings: &Settings) -> anyhow::Result<ExitCode> {
    let warehouse = &settings.config.warehouse;
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

/// The `[deid]` key (from the environment for `key_env`); warns loudly
/// about the demo key.
fn deid_key(settings: &Settings) -> anyhow::Result<ward::deid::DeidKey> {
    let key = ward::deid::resolve_key(&settings.config.deid, |name| std::env::var(name).ok())?;
    if key.is_demo() {
        tracing::warn!(
            "DE-IDENTIFYING WITH THE PUBLIC DEMO KEY ([deid] demo_key = true): anyone can \
             recompute these research ids; set [deid] key_file or key_env for real data"
        );
    }
    Ok(key)
}

/// `ward deid`: the working copy's core tables (at the warehouse root, like
/// `link` and `measure`) into its research directory; `ward run`
/// de-identifies into its own run directory.
pub(crate) fn deid(settings: &Settings, quiet: bool) -> anyhow::Result<ExitCode> {
    let _lock = writing(settings, "deid")?;
    let warehouse = &settings.config.warehouse;
    let key = deid_key(settings)?;
    let (core, research) = (warehouse.join("core"), warehouse.join("research"));
    let (state, warnings) = ward::reads::resolve(warehouse, ward::reads::Choice::WorkingCopy)?;
    if !quiet {
        println!(
            "deid reads: {}; writes: {}",
            state.describe(),
            research.display()
        );
    }
    announce_warnings(&warnings);
    let opts = ward::deid::DeidOptions {
        valuesets: Some(settings.queries.join("valuesets")),
        ..ward::deid::DeidOptions::from_config(&settings.config.deid, key, settings.today)
    };
    let report = ward::deid::deid(&core, &research, &opts)?;
    if !quiet {
        print::print_deid(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ward link`: link and build the core tables, or `--explain` one pair.
pub(crate) fn link(settings: &Settings, args: &LinkArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let _lock = writing(settings, "link")?;
    let config = &settings.config;
    let warehouse = ward::warehouse::Warehouse::new(&config.warehouse);
    if let Some(records) = &args.explain {
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
        let code = ward::runs::Fingerprint::code().map(ward::runs::Fingerprint::finish);
        let e = ward::link::explain(
            &warehouse,
            &config.link,
            (&a.0, &a.1),
            (&b.0, &b.1),
            code.as_deref(),
        )?;
        print::print_explanation(&e, &records[0], &records[1]);
        return Ok(ExitCode::SUCCESS);
    }
    if !quiet {
        println!(
            "link reads: staging ({}); writes: working copy {}",
            config.warehouse.join("staging").display(),
            config.warehouse.join("core").display()
        );
    }
    let core = warehouse.out().join("core");
    let previous = ward::link::read_person_links(&core.join("person_link.parquet"))?;
    let person = core.join("person.parquet");
    let code = ward::runs::Fingerprint::code().map(ward::runs::Fingerprint::finish);
    let earlier = ward::link::Earlier {
        links: &previous,
        core: Some(&core),
        refit: args.refit,
        incremental: true,
        code: code.as_deref(),
        person: Some(&person),
    };
    let linkage = ward::link::link(&warehouse, &config.link, &earlier)?;
    let core = ward::link::build::build(&warehouse)?;
    if !quiet {
        print::print_link(&linkage.report, &core);
    }
    if let Some(truth) = &args.evaluate {
        print::print_evaluation(truth, &ward::link::evaluate(&linkage.links, truth)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ward measure`: marts/ of the working copy (or `--out`), never inside a
/// published run.
pub(crate) fn measure(
    settings: &Settings,
    args: &MeasureArgs,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let _lock = writing(settings, "measure")?;
    let warehouse = &settings.config.warehouse;
    let period = period(settings, &args.period)?;
    let defs = ward::measure::catalog(&settings.queries)?;
    let chosen = ward::measure::select(&defs, &args.measures)?;
    let choice = match (args.unlinked, args.working_copy) {
        (true, _) => ward::reads::Choice::Unlinked,
        (_, true) => ward::reads::Choice::WorkingCopy,
        _ => ward::reads::Choice::Default,
    };
    let (state, warnings) = ward::reads::resolve(warehouse, choice)?;
    let out_dir = args.out.clone().unwrap_or_else(|| warehouse.clone());
    refuse_inside_runs(warehouse, &out_dir)?;
    if !quiet {
        println!(
            "measure reads: {}; writes: {}",
            state.describe(),
            out_dir.join("marts").display()
        );
    }
    announce_warnings(&warnings);
    let results = ward::measure::run_profiled(
        &state.reader(warehouse),
        &settings.queries,
        &chosen,
        period,
        args.profile.as_deref(),
    )?;
    let writer = ward::warehouse::Warehouse::new(warehouse).with_output(&out_dir);
    ward::measure::write_marts(&writer, &results)?;
    if !quiet {
        print::print_measures(&results);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ward run`: every stage, published as one run (it takes the lock itself).
pub(crate) fn run(settings: &Settings, args: &RunArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let config = &settings.config;
    apply_group(settings)?;
    let period = period(settings, &args.period)?;
    let rebuild = match (args.refit, args.full) {
        (true, _) => ward::runs::Rebuild::Refit,
        (false, true) => ward::runs::Rebuild::Full,
        (false, false) => ward::runs::Rebuild::Incremental,
    };
    let key = deid_key(settings)?;
    let opts = ingest_options(settings, None);
    let progress = Bar(progress_bar(quiet, "ingest", "files"));
    let run = ward::run(
        config,
        &opts,
        &settings.queries,
        period,
        &key,
        rebuild,
        &progress,
    )?;
    progress.0.finish_and_clear();
    if !quiet {
        print::print_summary(&run.ingest, false, 0);
        print::print_run(&run);
    }
    Ok(exit_for(&run.ingest))
}

/// `ward ingest` (`validate` = None) and `ward validate` (a dry run).
pub(crate) fn ingest(
    settings: &Settings,
    validate: Option<&ValidateArgs>,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let _lock = match validate {
        Some(_) => None,
        None => Some(writing(settings, "ingest")?),
    };
    let config = &settings.config;
    let opts = ingest_options(settings, validate);
    if opts.show_values {
        eprintln!(
            "warning: --show-values prints patient data (PHI) from the extracts to this terminal"
        );
    }
    if !quiet {
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
            if opts.dry_run { "validate" } else { "ingest" },
            config.sources.len(),
            settings.config_path.display()
        );
    }
    let progress = Bar(progress_bar(quiet, "ingest", "files"));
    let report = ward::ingest::ingest(&config.warehouse, &config.sources, &opts, &progress)?;
    progress.0.finish_and_clear();
    tracing::debug!(peak_bytes = ward::runs::peak_memory(), "ingest finished");
    if !quiet {
        print::print_summary(&report, opts.dry_run, opts.examples);
    }
    Ok(exit_for(&report))
}

/// The ingest options of `run`, `ingest` and `validate`.
fn ingest_options(settings: &Settings, validate: Option<&ValidateArgs>) -> IngestOptions {
    IngestOptions {
        today: settings.today,
        dry_run: validate.is_some(),
        examples: validate.map_or(0, |v| v.examples),
        show_values: validate.is_some_and(|v| v.show_values),
        slice_records: None,
    }
}

/// Exit 3 naming every input that failed, else 0.
fn exit_for(report: &ward::IngestReport) -> ExitCode {
    let failures = report.failures();
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    for f in &failures {
        eprintln!("error: {f}");
    }
    eprintln!(
        "error: {} input(s) failed; everything else was loaded",
        failures.len()
    );
    ExitCode::from(EXIT_FAILED)
}

/// Refuses an output directory inside `runs/`: a published run is never
/// changed after publication.
pub(crate) fn refuse_inside_runs(warehouse: &Path, out: &Path) -> anyhow::Result<()> {
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
pub(crate) fn is_inside(path: &Path, dir: &Path) -> bool {
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
