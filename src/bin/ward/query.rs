//! `ward query`: one read-only SQL query over the research tables of the
//! published run, with the process bounded behind the engine's own limits
//! and the output file checked before the query runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use ward::WardError;
use ward::settings::Settings;

use crate::args::{QueryArgs, QueryFormat};
use crate::{EXIT_FAILED, commands::is_inside, memcap};

/// `ward query`.
pub(crate) fn query(
    settings: &Settings,
    args: &QueryArgs,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let warehouse = &settings.config.warehouse;
    let opts = ward::query::QueryOptions {
        min_cell: args.min_cell,
        memory_limit: Some(
            args.memory_limit
                .unwrap_or_else(ward::query::default_memory_limit),
        ),
        timeout: Some(args.timeout),
        tables: None,
    };
    let usage = |key: &str, message: &str| WardError::Usage {
        message: format!("{key}: {message}"),
    };
    let from_file = args.sql.is_none();
    let sql = match (&args.sql, &args.file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) => read_query_file(f)?,
        (None, None) => return Err(usage("SQL", "give a query or --file").into()),
    };
    if args.min_cell == Some(0) {
        return Err(usage("--min-cell", "must be at least 1").into());
    }
    let format = match args.format {
        QueryFormat::Table => ward::query::OutputFormat::Table,
        QueryFormat::Csv => ward::query::OutputFormat::Csv,
        QueryFormat::Json => ward::query::OutputFormat::Json,
        QueryFormat::Parquet => ward::query::OutputFormat::Parquet,
    };
    if format == ward::query::OutputFormat::Parquet && args.out.is_none() {
        return Err(usage("--out", "--format parquet needs --out FILE").into());
    }
    if let Some(path) = &args.out {
        check_query_output(warehouse, path, args.force)?;
    }
    let research = research_dir(warehouse)?;
    bound_query_process(&opts);
    if !quiet {
        // On stderr: stdout is the result (CSV, JSON) and stays clean.
        eprintln!(
            "query reads: the research tables of the published run ({})",
            research.display()
        );
    }
    let result = match ward::query::query(&research, &sql, &opts) {
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
    match &args.out {
        Some(path) => {
            let file = create_query_output(warehouse, path, args.force)?;
            ward::query::write_output(&result, format, std::io::BufWriter::new(file))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => ward::query::write_output(&result, format, std::io::stdout())?,
    }
    if result.suppressed_cells > 0 {
        let min_cell = args.min_cell.unwrap_or(0);
        eprintln!(
            "min-cell {min_cell}: {} count(s) under {min_cell} replaced by NULL in {}",
            result.suppressed_cells,
            result.count_columns.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The research tables `ward query` reads: those of the current published run.
fn research_dir(warehouse: &Path) -> anyhow::Result<PathBuf> {
    match ward::runs::current_dir(warehouse)? {
        Some(run) => Ok(run.join("research")),
        None => anyhow::bail!(
            "no published run in {}: `ward run` publishes the research tables",
            warehouse.display()
        ),
    }
}

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
