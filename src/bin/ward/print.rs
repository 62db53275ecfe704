//! What the commands print: summary tables and one-line reports on stdout,
//! warnings on stderr. Record ids and counts only, never patient values
//! (but `validate --show-values`, which says so).

use comfy_table::{Table as TextTable, presets::UTF8_FULL_CONDENSED};
use ward::ingest::{FileStatus, IngestReport};
use ward::measure::Scoring;

/// Warnings about the data a stage command reads: to stderr (even with
/// --quiet) and to the log.
pub(crate) fn announce_warnings(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
}

/// `ward link --evaluate`: pairwise and person-level scores.
pub(crate) fn print_evaluation(truth: &std::path::Path, e: &ward::link::Evaluation) {
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

/// `ward run`'s closing lines after the ingest summary: linkage, measures,
/// where the reports went, warnings and the published run.
pub(crate) fn print_run(run: &ward::RunReport) {
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
    let stages = &run.manifest.stages;
    if let Some(from) = stages.iter().find_map(|s| s.reused_from.as_deref()) {
        let reused: Vec<&str> = stages
            .iter()
            .filter(|s| s.reused_from.is_some())
            .map(|s| s.stage.as_str())
            .collect();
        println!(
            "inputs unchanged since run {from}; its outputs were taken for: {} (`ward run --full` recomputes them)",
            reused.join(", ")
        );
    }
    for s in stages {
        if let Some(r) = &s.recomputed {
            println!(
                "{}: computed for the {} of {} persons whose records changed where the measures read them; the others' results are run {}'s",
                s.stage, r.persons, r.of, r.rest_from
            );
        }
        if let Some(r) = &s.recounts {
            println!(
                "{}: of the previous run's counts (per check and source), {} kept, {} added to with tonight's rows, {} counted again",
                s.stage, r.kept, r.added_to, r.counted_again
            );
        }
        if !s.reused_sources.is_empty() {
            println!(
                "{}: counts kept from the previous run for the sources whose files did not change: {}",
                s.stage,
                s.reused_sources.join(", ")
            );
        }
    }
    for w in &run.manifest.warnings {
        println!("warning: {w}");
    }
    println!(
        "run {} published: {}",
        run.run_id,
        run.run_dir.join(ward::runs::MANIFEST).display()
    );
}

/// `ward serve token list`.
pub(crate) fn print_tokens(entries: &[ward::serve::tokens::TokenEntry]) {
    let mut table = TextTable::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "researcher",
        "issued",
        "revoked",
        "tables",
    ]);
    for e in entries {
        table.add_row(vec![
            e.name.clone(),
            e.created.clone(),
            e.revoked.clone().unwrap_or_default(),
            e.tables
                .as_ref()
                .map(|t| t.join(", "))
                .unwrap_or_else(|| "all".into()),
        ]);
    }
    println!("{table}");
}

pub(crate) fn print_runs(runs: &[ward::runs::RunListing], limit: usize) {
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

/// The data-quality scorecard (source × category), then the checks that
/// did not pass or drifted (every check with `all`).
pub(crate) fn print_dq(results: &[ward::dq::CheckResult], all: bool) {
    use ward::dq::{Category, Status};
    let mut score = TextTable::new();
    let mut header = vec!["source".to_string()];
    header.extend(Category::ALL.iter().map(|c| c.name().to_string()));
    score.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    let mut sources: Vec<&str> = results.iter().map(|r| r.source.as_str()).collect();
    sources.dedup();
    for source in sources {
        let mut row = vec![source.to_string()];
        for category in Category::ALL {
            let n = |s: Status| {
                results
                    .iter()
                    .filter(|r| r.source == source && r.category == category && r.status == s)
                    .count()
            };
            let mut cell = format!(
                "{} pass, {} warn, {} fail",
                n(Status::Pass),
                n(Status::Warn),
                n(Status::Fail)
            );
            for (s, label) in [(Status::Info, "noted"), (Status::NoData, "no data")] {
                if n(s) > 0 {
                    cell.push_str(&format!(", {} {label}", n(s)));
                }
            }
            row.push(cell);
        }
        score.add_row(row);
    }
    println!("{score}");
    let listed: Vec<&ward::dq::CheckResult> = results
        .iter()
        .filter(|r| {
            all || r.drift || matches!(r.status, Status::Fail | Status::Warn | Status::Info)
        })
        .collect();
    if listed.is_empty() {
        println!("every check passed on every source, no drift");
        return;
    }
    let mut table = TextTable::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "check",
        "source",
        "status",
        "violating",
        "checked",
        "rate",
        "threshold",
        "baseline",
        "drift",
    ]);
    let pct = |v: Option<f64>| v.map(|v| format!("{v:.2}%")).unwrap_or_else(|| "-".into());
    for r in listed {
        table.add_row(vec![
            r.check.clone(),
            r.source.clone(),
            r.status.name().to_string(),
            r.violating.to_string(),
            r.checked.to_string(),
            pct(r.rate_pct),
            r.new_rate_pct
                .map(|n| format!("{n:.2}% of {}", r.new_checked))
                .unwrap_or_else(|| "-".into()),
            format!("{}%", r.threshold_pct),
            pct(r.baseline_pct),
            if r.drift {
                "drift".into()
            } else {
                String::new()
            },
        ]);
    }
    println!("{table}");
}

pub(crate) fn print_deid(r: &ward::deid::DeidReport) {
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

pub(crate) fn print_link(report: &ward::link::LinkReport, core: &ward::link::build::BuildReport) {
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
    use ward::link::LinkMode;
    match report.mode {
        LinkMode::Fitted => println!(
            "link: model fitted on these {} records (kept until they grow by [link] refit_growth; `--refit` fits it anew)",
            report.model_records
        ),
        LinkMode::ModelKept => println!(
            "link: the model fitted on {} records kept; every record blocked again",
            report.model_records
        ),
        LinkMode::Incremental => println!(
            "link: the model fitted on {} records and the scored pairs of the last run kept; {} new records blocked against every record",
            report.model_records, report.blocked_records
        ),
    }
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
pub(crate) fn print_explanation(e: &ward::link::Explanation, a: &str, b: &str) {
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

pub(crate) fn print_measure_list(defs: &[ward::measure::MeasureDef]) {
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

pub(crate) fn print_measures(results: &[ward::measure::MeasureResult]) {
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

pub(crate) fn print_conformance(outcome: &ward::measure::conformance::Conformance, quiet: bool) {
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

/// `ward validate --examples N`: per rule, where its first N rejects are
/// (control characters of file names and values escaped).
pub(crate) fn print_reject_examples(report: &IngestReport, n: usize) {
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

pub(crate) fn print_summary(report: &IngestReport, dry_run: bool, examples: usize) {
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
