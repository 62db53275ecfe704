//! `report.html`: one self-contained page per run for analysts and clinics —
//! headline measures, rates by provider with confidence intervals, the
//! control-band distribution, trend lines, data quality per source and run
//! metadata.
//!
//! The page references nothing outside itself (no scripts, external styles,
//! fonts or images) and says so in a Content-Security-Policy (`default-src
//! 'none'`, the one inline stylesheet allowed by its hash), so it works
//! offline and as an e-mail attachment, and a stray external reference
//! fails visibly in a browser. Markup comes from minijinja templates
//! (`templates/`) with HTML auto-escaping; chart geometry is computed here.
//!
//! Only suppressed data is shown: counts and rates come from the summary
//! [`Cell`]s (already suppressed); the control-band counts of
//! [`MeasureResult::categories`] are all hidden here when any is from 1 to
//! `min_cell_size - 1`. [`MeasureResult::counts`] is never read.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Cell;
use crate::error::{Result, WardError};
use crate::ingest::{FileStatus, IngestReport};
use crate::measure::Period;
use crate::measure::{Improvement, MeasureResult, Scoring};

mod dq;
pub use dq::DqPoint;

const PAGE: &str = include_str!("templates/report.html");
const CHARTS: &str = include_str!("templates/charts.html");
const CSS: &str = include_str!("templates/report.css");

/// Everything the page shows; plain data the caller fills.
#[derive(Debug, Clone)]
pub struct HtmlInput<'a> {
    /// `reports/<run_id>/` of this run.
    pub run_id: &'a str,
    pub generated_at: DateTime<Utc>,
    /// Measurement period of the run.
    pub period: Period,
    /// Version of Ward that produced the run.
    pub ward_version: &'a str,
    /// The summary's suppression threshold (counts from 1 to this − 1 are hidden).
    pub min_cell_size: u64,
    /// The measures: definitions (id, title, direction, description,
    /// category) and control-band counts. Their unsuppressed `counts` are
    /// not used; every number comes from `cells`.
    pub measures: &'a [MeasureResult],
    /// The suppressed summary (`report::summarize`).
    pub cells: &'a [Cell],
    /// Overall rates of previous runs, any order (sorted by date, then run
    /// id); this run's point is added from `cells`. Empty on the first run.
    pub trend: &'a [TrendPoint],
    /// Data quality per source ([`SourceQuality::from_ingest`]).
    pub quality: &'a [SourceQuality],
    /// Further run metadata (configuration, input fingerprints, ...), shown
    /// in order after the run id, period, version and suppression threshold.
    pub metadata: &'a [(String, String)],
    /// The run's warnings (gates that warned, files that failed, ...),
    /// listed on the page; they name sources and files, never values.
    pub warnings: &'a [String],
    /// The data-quality checks of this run (counts only).
    pub dq: &'a [crate::dq::CheckResult],
    /// The checks' rates in earlier runs, any order (sparklines).
    pub dq_trend: &'a [DqPoint],
}

impl<'a> HtmlInput<'a> {
    /// An input generated now by this version of Ward, without trend or
    /// extra metadata.
    pub fn new(
        run_id: &'a str,
        period: Period,
        min_cell_size: u64,
        measures: &'a [MeasureResult],
        cells: &'a [Cell],
        quality: &'a [SourceQuality],
    ) -> Self {
        HtmlInput {
            run_id,
            generated_at: Utc::now(),
            period,
            ward_version: env!("CARGO_PKG_VERSION"),
            min_cell_size,
            measures,
            cells,
            trend: &[],
            quality,
            metadata: &[],
            warnings: &[],
            dq: &[],
            dq_trend: &[],
        }
    }
}

/// One measure's overall rate in a previous run (from that run's summary;
/// `None` when it was suppressed or undefined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrendPoint {
    pub run_id: String,
    /// Label on the time axis (e.g. the run's date, `2025-12-31`).
    pub date: String,
    pub measure: String,
    pub rate: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
}

/// What ingest did with one source's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceQuality {
    pub source: String,
    /// Input files seen (every status).
    pub files: u64,
    /// Files already loaded with the same content, not re-read this run.
    pub files_unchanged: u64,
    pub files_failed: u64,
    pub rows_read: u64,
    pub rows_accepted: u64,
    pub rows_rejected: u64,
    /// FHIR resources of types Ward does not load.
    pub rows_skipped: u64,
    /// Reject rules with their row counts, most frequent first.
    pub top_rules: Vec<(String, u64)>,
    /// Messages of failed files and of a source that could not be read
    /// (they name files, never patient values).
    pub problems: Vec<String>,
}

impl SourceQuality {
    /// How many reject rules [`SourceQuality::from_ingest`] keeps per source.
    pub const TOP_RULES: usize = 5;

    /// One row per source of the ingest report, sorted by source.
    pub fn from_ingest(report: &IngestReport) -> Vec<SourceQuality> {
        let mut by_source: BTreeMap<&str, (SourceQuality, BTreeMap<&str, u64>)> = BTreeMap::new();
        for f in &report.files {
            let (q, rules) = by_source
                .entry(&f.source)
                .or_insert_with(|| (SourceQuality::empty(&f.source), BTreeMap::new()));
            q.files += 1;
            q.files_unchanged += u64::from(f.status == FileStatus::Unchanged);
            if f.status == FileStatus::Failed {
                q.files_failed += 1;
                q.problems
                    .push(f.detail.clone().unwrap_or_else(|| f.file.clone()));
            }
            q.rows_read += f.rows_read;
            q.rows_accepted += f.rows_accepted;
            q.rows_rejected += f.rows_rejected;
            q.rows_skipped += f.rows_skipped;
            for (rule, n) in &f.rejects_by_rule {
                *rules.entry(rule).or_default() += n;
            }
        }
        for s in &report.source_failures {
            by_source
                .entry(&s.source)
                .or_insert_with(|| (SourceQuality::empty(&s.source), BTreeMap::new()))
                .0
                .problems
                .push(s.message.clone());
        }
        by_source
            .into_values()
            .map(|(mut q, rules)| {
                let mut rules: Vec<(String, u64)> =
                    rules.into_iter().map(|(r, n)| (r.to_string(), n)).collect();
                rules.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                rules.truncate(Self::TOP_RULES);
                q.top_rules = rules;
                q
            })
            .collect()
    }

    fn empty(source: &str) -> SourceQuality {
        SourceQuality {
            source: source.to_string(),
            files: 0,
            files_unchanged: 0,
            files_failed: 0,
            rows_read: 0,
            rows_accepted: 0,
            rows_rejected: 0,
            rows_skipped: 0,
            top_rules: Vec::new(),
            problems: Vec::new(),
        }
    }
}

/// Renders the page.
pub fn render(input: &HtmlInput) -> Result<String> {
    let view = build_view(input);
    let mut env = Environment::new();
    // Every template is HTML (SVG inside HTML): escape everything.
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let err = |e: minijinja::Error| {
        WardError::data("rendering report.html", PathBuf::from("report.html"), e)
    };
    env.add_template("charts.html", CHARTS).map_err(err)?;
    env.add_template("report.html", PAGE).map_err(err)?;
    let ctx = minijinja::context! {
        view => Value::from(Serde(&view)),
        // The stylesheet is ours (compiled in) and allowed by its hash.
        css => Value::from_safe_string(CSS.to_string()),
        // Ours too (quotes, base64): kept readable rather than entity-escaped.
        csp => Value::from_safe_string(content_security_policy()),
    };
    env.get_template("report.html")
        .and_then(|t| t.render(ctx))
        .map_err(err)
}

/// Renders the page and writes it atomically (temporary file in `dir`,
/// then rename) as `dir/report.html`; returns its path.
pub fn write(dir: &Path, input: &HtmlInput) -> Result<PathBuf> {
    let html = render(input)?;
    let path = dir.join("report.html");
    std::fs::create_dir_all(dir).map_err(|e| WardError::io("cannot create", dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".report.html.")
        .tempfile_in(dir)
        .map_err(|e| WardError::io("cannot create a temporary file in", dir, e))?;
    tmp.write_all(html.as_bytes())
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| WardError::io("cannot write", tmp.path(), e))?;
    // A report to share with the warehouse's group, like the summary files
    // (tempfile creates 0600; warehouse files are never world-readable).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o640))
            .map_err(|e| WardError::io("cannot set permissions of", tmp.path(), e))?;
    }
    tmp.persist(&path)
        .map_err(|e| WardError::io("cannot publish", &path, e.error))?;
    Ok(path)
}

/// The page's policy: nothing may load or run; only the inline stylesheet
/// (by hash) applies, so `style` attributes are refused too.
fn content_security_policy() -> String {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS.as_bytes()));
    format!("default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; form-action 'none'")
}

// ---------------------------------------------------------------- view model

#[derive(Debug, Serialize)]
struct View {
    run_id: String,
    generated_at: String,
    period: String,
    ward_version: String,
    suppression_note: String,
    headlines: Vec<Headline>,
    providers: Vec<DotChart>,
    /// Rates by each stratifier the measures define.
    strata: Vec<DotChart>,
    bands: Vec<BarChart>,
    trends: Vec<LineChart>,
    first_run: bool,
    previous_runs: usize,
    quality: Vec<QualityRow>,
    quality_total: QualityRow,
    dq: dq::DqView,
    metadata: Vec<(String, String)>,
    warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Headline {
    anchor: String,
    id: String,
    title: String,
    description: String,
    /// What the counts count (`patients`, `encounters`).
    subjects: &'static str,
    /// `increase` or `decrease`.
    improvement: &'static str,
    direction: &'static str,
    /// `ok`, `suppressed` or `empty` (no one in the denominator).
    status: &'static str,
    /// Why the denominator is empty, in terms of the data (suppressed).
    why_empty: Option<String>,
    rate: String,
    ci: String,
    /// Age-standardized rate and interval (2000 US standard), when the
    /// measure has one and it is published.
    age_std: Option<(String, String)>,
    counts: Counts,
    gauge: Option<Gauge>,
    change: Option<Change>,
}

/// Formatted counts of a cell (`None`: suppressed).
#[derive(Debug, Serialize)]
struct Counts {
    initial_population: Option<String>,
    denominator: Option<String>,
    exclusions: Option<String>,
    exceptions: Option<String>,
    performance: Option<String>,
    numerator: Option<String>,
}

/// A small 0–100 % scale with the rate and its interval.
#[derive(Debug, Serialize)]
struct Gauge {
    width: f64,
    height: f64,
    x0: f64,
    x1: f64,
    cx: f64,
    lo: f64,
    hi: f64,
    label: String,
}

#[derive(Debug, Serialize)]
struct Change {
    text: String,
    /// `better`, `worse` or `same`.
    verdict: &'static str,
    since: String,
}

#[derive(Debug, Clone, Serialize)]
struct Tick {
    pos: f64,
    label: String,
}

/// Rates with interval whiskers, one row per stratum (providers).
#[derive(Debug, Serialize)]
struct DotChart {
    anchor: String,
    /// What a row is (`Provider`, or the measure's stratifier).
    dimension: String,
    measure: String,
    /// The measure's title, under the chart's heading.
    caption: String,
    title: String,
    desc: String,
    width: f64,
    height: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    ticks: Vec<Tick>,
    /// The overall rate, as a reference line.
    reference: Option<Tick>,
    rows: Vec<DotRow>,
}

#[derive(Debug, Serialize)]
struct DotRow {
    label: String,
    full_label: String,
    y: f64,
    suppressed: bool,
    /// No rate (empty denominator), not suppressed.
    empty: bool,
    cx: f64,
    x_low: f64,
    x_high: f64,
    value: String,
    rate: String,
    ci: String,
    numerator: Option<String>,
    performance: Option<String>,
}

/// Share of each category (control band), bars on a 0–100 % scale.
#[derive(Debug, Serialize)]
struct BarChart {
    anchor: String,
    measure: String,
    /// The measure's title, under the chart's heading.
    caption: String,
    title: String,
    desc: String,
    width: f64,
    height: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    ticks: Vec<Tick>,
    rows: Vec<BarRow>,
    total: String,
}

#[derive(Debug, Serialize)]
struct BarRow {
    label: String,
    y: f64,
    bar_y: f64,
    bar_h: f64,
    x: f64,
    w: f64,
    suppressed: bool,
    value: String,
    count: Option<String>,
    share: Option<String>,
}

/// A measure's overall rate over runs, with its interval as a band.
#[derive(Debug, Serialize)]
struct LineChart {
    anchor: String,
    measure: String,
    /// The measure's title, under the chart's heading.
    caption: String,
    title: String,
    desc: String,
    width: f64,
    height: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    y_ticks: Vec<Tick>,
    x_ticks: Vec<Tick>,
    /// `points` of the polyline through the published rates.
    line: String,
    /// `points` of the interval polygon (empty when no interval).
    band: String,
    points: Vec<LinePoint>,
    /// x of runs whose rate was suppressed or undefined.
    gaps: Vec<f64>,
    rows: Vec<TrendRow>,
}

#[derive(Debug, Serialize)]
struct LinePoint {
    x: f64,
    y: f64,
    label: String,
}

#[derive(Debug, Serialize)]
struct TrendRow {
    run_id: String,
    date: String,
    rate: String,
    ci: String,
    current: bool,
}

#[derive(Debug, Serialize)]
struct QualityRow {
    source: String,
    files: String,
    files_unchanged: u64,
    files_failed: u64,
    rows_read: String,
    rows_accepted: String,
    rows_rejected: String,
    rows_skipped: String,
    reject_share: String,
    /// Width in % of the accepted part of a small bar.
    accepted_pct: f64,
    rejected_pct: f64,
    top_rules: Vec<(String, String)>,
    problems: Vec<String>,
}

// -------------------------------------------------------------- formatting

fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

fn ci_text(lo: Option<f64>, hi: Option<f64>) -> String {
    match (lo, hi) {
        (Some(lo), Some(hi)) => format!("{:.1}–{:.1}%", lo * 100.0, hi * 100.0),
        _ => "–".into(),
    }
}

/// `1234567` → `1,234,567`.
/// [`crate::measure::EmptyDenominator`] in words an analyst can act on;
/// counts from 1 to `min_cell - 1` are not printed.
fn why_empty(e: &crate::measure::EmptyDenominator, min_cell: u64) -> String {
    let n = |v: u64| {
        if v > 0 && v < min_cell {
            format!("fewer than {min_cell}")
        } else {
            count(v)
        }
    };
    let mut text = if e.persons_by_table.is_empty() {
        format!(
            "No fact in the data is coded in the {} value set(s) the measure names.",
            e.valuesets
        )
    } else {
        let tables: Vec<String> = e
            .persons_by_table
            .iter()
            .map(|(t, p)| format!("{t} {}", n(*p)))
            .collect();
        format!(
            "Persons with facts coded in the measure's {} value set(s), at any date: {}; \
             none met every criterion in the period.",
            e.valuesets,
            tables.join(", ")
        )
    };
    text.push_str(&format!(
        " {} encounter(s) start in the period",
        n(e.encounters_in_period)
    ));
    if e.unmatched_encounter_codes.is_empty() {
        text.push('.');
    } else {
        text.push_str(&format!(
            "; their most frequent codes outside the measure's value sets are {}. If these \
             are the visits the measure counts, the source's codes need mapping to the value \
             sets' code systems.",
            e.unmatched_encounter_codes.join(", ")
        ));
    }
    text
}

fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Rounds geometry to 0.1 user unit.
fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Shortens a label for a chart axis (the full text is in the table and
/// the element's title).
fn short(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_string()
    } else {
        let mut s: String = label.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

fn performance(c: &Cell) -> Option<u64> {
    // (Checked: a ratio keeps numerator exclusions in the exception slot.)
    c.denominator?
        .checked_sub(c.denominator_exclusion? + c.denominator_exception?)
}

fn counts(c: Option<&Cell>) -> Counts {
    let f = |v: Option<u64>| v.map(count);
    Counts {
        initial_population: f(c.and_then(|c| c.initial_population)),
        denominator: f(c.and_then(|c| c.denominator)),
        exclusions: f(c.and_then(|c| c.denominator_exclusion)),
        exceptions: f(c.and_then(|c| c.denominator_exception)),
        performance: f(c.and_then(performance)),
        numerator: f(c.and_then(|c| c.numerator)),
    }
}

// -------------------------------------------------------------- geometry

/// Chart width in user units; charts scale to their container.
const WIDTH: f64 = 720.0;

/// x of a rate on a 0–100 % scale from `left` to `right`.
fn scale(rate: f64, left: f64, right: f64) -> f64 {
    r1(left + rate.clamp(0.0, 1.0) * (right - left))
}

fn percent_ticks(left: f64, right: f64) -> Vec<Tick> {
    (0..=4)
        .map(|i| {
            let r = f64::from(i) * 0.25;
            Tick {
                pos: scale(r, left, right),
                label: format!("{}%", i * 25),
            }
        })
        .collect()
}

fn gauge(rate: f64, lo: f64, hi: f64) -> Gauge {
    let (width, x0, x1) = (240.0, 4.0, 236.0);
    Gauge {
        width,
        height: 34.0,
        x0,
        x1,
        cx: scale(rate, x0, x1),
        lo: scale(lo, x0, x1),
        hi: scale(hi, x0, x1),
        label: format!("{} (95% CI {})", pct(rate), ci_text(Some(lo), Some(hi))),
    }
}

/// Rates of one measure by the strata of one dimension (`dimension`: the
/// noun of a row, `Provider` or a stratifier's id).
fn dot_chart(
    anchor: String,
    dimension: &str,
    m: &MeasureResult,
    overall: Option<&Cell>,
    cells: &[&Cell],
) -> DotChart {
    let (left, right, top, row_h) = (190.0, WIDTH - 150.0, 30.0, 30.0);
    let height = top + row_h * cells.len().max(1) as f64 + 12.0;
    let rows = cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let y = r1(top + row_h * (i as f64 + 0.5));
            let (rate, lo, hi) = (c.rate, c.ci_low.or(c.rate), c.ci_high.or(c.rate));
            let value = if c.suppressed {
                "suppressed".to_string()
            } else {
                rate.map_or_else(|| "no patients".to_string(), pct)
            };
            DotRow {
                label: short(&c.stratum, 26),
                full_label: c.stratum.clone(),
                y,
                suppressed: c.suppressed,
                empty: !c.suppressed && rate.is_none(),
                cx: rate.map_or(left, |r| scale(r, left, right)),
                x_low: lo.map_or(left, |r| scale(r, left, right)),
                x_high: hi.map_or(left, |r| scale(r, left, right)),
                value,
                rate: rate.map_or_else(String::new, pct),
                ci: ci_text(c.ci_low, c.ci_high),
                numerator: c.numerator.map(count),
                performance: performance(c).map(count),
            }
        })
        .collect();
    let noun = dimension.to_lowercase();
    DotChart {
        anchor,
        dimension: dimension.to_string(),
        measure: m.key(),
        caption: m.title(),
        title: format!("{}: rate by {noun} with 95% confidence intervals", m.key()),
        desc: format!(
            "{}. One row per {noun}: the dot is the rate, the whisker its 95% Wilson interval; \
             the dashed line is the overall rate. Suppressed rows are marked, without a value.",
            m.title()
        ),
        width: WIDTH,
        height: r1(height),
        left,
        right,
        top,
        bottom: r1(height - 12.0),
        ticks: percent_ticks(left, right),
        reference: overall.and_then(|c| c.rate).map(|r| Tick {
            pos: scale(r, left, right),
            label: format!("overall {}", pct(r)),
        }),
        rows,
    }
}

/// Order of band labels: by their first number, `<n` before `n-m` before
/// `>n`; labels without a number (`untested`) last.
fn band_key(label: &str) -> (u8, f64, i8, String) {
    let number: String = label
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let rank = match label.trim_start().chars().next() {
        Some('<') => -1,
        Some('>') => 1,
        _ => 0,
    };
    match number.parse::<f64>() {
        Ok(n) => (0, n, rank, label.to_string()),
        Err(_) => (1, 0.0, 0, label.to_string()),
    }
}

/// Suppresses category counts: when any count is from 1 to `min_cell - 1`,
/// or the measure's overall cell is suppressed, every category is hidden.
/// Hiding only the small one and a complement is not enough here: the
/// categories add up to published totals in more than one way (the
/// performance denominator, and the numerator is a sum of bands — DM-CONTROL's
/// is `<7` + `7-8`), so a hidden band could be recovered by subtraction.
fn suppress_categories(
    categories: &BTreeMap<String, u64>,
    min_cell: u64,
    overall_suppressed: bool,
) -> Vec<(String, Option<u64>)> {
    let hide = overall_suppressed
        || categories
            .values()
            .any(|&n| super::small_count(n, min_cell));
    categories
        .iter()
        .map(|(label, &n)| (label.clone(), (!hide).then_some(n)))
        .collect()
}

fn bar_chart(index: usize, m: &MeasureResult, min_cell: u64, overall: Option<&Cell>) -> BarChart {
    let overall_suppressed = overall.is_none_or(|c| c.suppressed);
    let mut bands = suppress_categories(&m.categories, min_cell, overall_suppressed);
    bands.sort_by(|a, b| {
        band_key(&a.0)
            .partial_cmp(&band_key(&b.0))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    // Shares of the whole category total, which is the published
    // performance denominator of the overall cell.
    let total: u64 = m.categories.values().sum();
    let (left, right, top, row_h) = (150.0, WIDTH - 170.0, 30.0, 32.0);
    let height = top + row_h * bands.len().max(1) as f64 + 12.0;
    let rows = bands
        .into_iter()
        .enumerate()
        .map(|(i, (label, n))| {
            let y = top + row_h * (i as f64 + 0.5);
            let share = n.filter(|_| total > 0).map(|n| n as f64 / total as f64);
            BarRow {
                label: short(&label, 20),
                y: r1(y),
                bar_y: r1(y - 9.0),
                bar_h: 18.0,
                x: left,
                w: share.map_or(0.0, |s| r1(scale(s, left, right) - left)),
                suppressed: n.is_none(),
                value: match (n, share) {
                    (Some(n), Some(s)) => format!("{} ({})", count(n), pct(s)),
                    (Some(n), None) => count(n),
                    _ => "suppressed".into(),
                },
                count: n.map(count),
                share: share.map(pct),
            }
        })
        .collect();
    let column = m.def.category.clone().unwrap_or_default();
    BarChart {
        anchor: format!("bands-{index}"),
        measure: m.key(),
        caption: m.title(),
        title: format!("{}: distribution by {column}", m.key()),
        desc: format!(
            "{}. Share of {} in the denominator (after exclusions) by {column}; \
             suppressed groups are marked, without a value.",
            m.title(),
            m.def.basis.noun()
        ),
        width: WIDTH,
        height: r1(height),
        left,
        right,
        top,
        bottom: r1(height - 12.0),
        ticks: percent_ticks(left, right),
        rows,
        total: if overall_suppressed {
            "suppressed".into()
        } else {
            count(total)
        },
    }
}

/// A scale for rates between `lo` and `hi`: bounds on multiples of a
/// step of 5, 10, 20 or 25 points, within 0–100 %.
fn rate_axis(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (lo, hi) = if hi - lo < 0.02 {
        (lo - 0.05, hi + 0.05)
    } else {
        (lo, hi)
    };
    let step = [0.05, 0.1, 0.2, 0.25]
        .into_iter()
        .find(|s| (hi - lo) / s <= 5.0)
        .unwrap_or(0.25);
    let min = ((lo / step).floor() * step).max(0.0);
    let max = ((hi / step).ceil() * step).min(1.0);
    (min, max.max(min + step), step)
}

/// Trend of one measure: previous runs' points then this run's.
fn line_chart(index: usize, m: &MeasureResult, points: &[(TrendPoint, bool)]) -> LineChart {
    let (width, height) = (WIDTH, 240.0);
    let (left, right, top, bottom) = (56.0, width - 24.0, 16.0, height - 44.0);
    let values: Vec<f64> = points
        .iter()
        .flat_map(|(p, _)| [p.rate, p.ci_low, p.ci_high])
        .flatten()
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (min, max, step) = if values.is_empty() {
        (0.0, 1.0, 0.25)
    } else {
        rate_axis(lo, hi)
    };
    let y = |r: f64| r1(bottom - (r.clamp(min, max) - min) / (max - min) * (bottom - top));
    let n = points.len();
    let x = |i: usize| {
        if n <= 1 {
            r1((left + right) / 2.0)
        } else {
            r1(left + 12.0 + i as f64 * (right - left - 24.0) / (n - 1) as f64)
        }
    };
    let steps = ((max - min) / step).round() as usize;
    let y_ticks = (0..=steps)
        .map(|k| {
            let r = min + k as f64 * step;
            Tick {
                pos: y(r),
                label: format!("{:.0}%", r * 100.0),
            }
        })
        .collect();
    // At most about eight labels on the time axis; always the last.
    let every = n.div_ceil(8).max(1);
    let x_ticks = (0..n)
        .filter(|i| i.is_multiple_of(every) || *i == n - 1)
        .map(|i| Tick {
            pos: x(i),
            label: short(&points[i].0.date, 12),
        })
        .collect();
    let mut line = Vec::new();
    let (mut upper, mut lower) = (Vec::new(), Vec::new());
    let mut marks = Vec::new();
    let mut gaps = Vec::new();
    for (i, (p, _)) in points.iter().enumerate() {
        match p.rate {
            Some(r) => {
                line.push(format!("{},{}", x(i), y(r)));
                if let (Some(l), Some(h)) = (p.ci_low, p.ci_high) {
                    upper.push(format!("{},{}", x(i), y(h)));
                    lower.push(format!("{},{}", x(i), y(l)));
                }
                marks.push(LinePoint {
                    x: x(i),
                    y: y(r),
                    label: format!(
                        "{}: {} (95% CI {})",
                        p.date,
                        pct(r),
                        ci_text(p.ci_low, p.ci_high)
                    ),
                });
            }
            None => gaps.push(x(i)),
        }
    }
    lower.reverse();
    let band = if upper.len() >= 2 {
        upper.into_iter().chain(lower).collect::<Vec<_>>().join(" ")
    } else {
        String::new()
    };
    LineChart {
        anchor: format!("trend-{index}"),
        measure: m.key(),
        caption: m.title(),
        title: format!("{}: overall rate by run", m.key()),
        desc: format!(
            "{}. Overall rate of each run, oldest first, with the 95% interval as a shaded band.",
            m.title()
        ),
        width,
        height,
        left,
        right,
        top,
        bottom,
        y_ticks,
        x_ticks,
        line: line.join(" "),
        band,
        points: marks,
        gaps,
        rows: points
            .iter()
            .map(|(p, current)| TrendRow {
                run_id: p.run_id.clone(),
                date: p.date.clone(),
                rate: p.rate.map_or_else(|| "suppressed or none".into(), pct),
                ci: ci_text(p.ci_low, p.ci_high),
                current: *current,
            })
            .collect(),
    }
}

// -------------------------------------------------------------- assembly

fn build_view(input: &HtmlInput) -> View {
    let mut trend: Vec<&TrendPoint> = input.trend.iter().collect();
    trend.sort_by(|a, b| (&a.date, &a.run_id).cmp(&(&b.date, &b.run_id)));

    let mut headlines = Vec::new();
    let mut providers = Vec::new();
    let mut strata = Vec::new();
    let mut bands = Vec::new();
    let mut trends = Vec::new();
    for (i, m) in input.measures.iter().enumerate() {
        let overall = cells_of(input, &m.key(), "overall").into_iter().next();
        headlines.push(headline(input, i, m, overall, &trend));
        // The charts draw rates on a 0–100 % scale: proportions only.
        let proportion = m.def.scoring == Scoring::Proportion;
        let by_provider = cells_of(input, &m.key(), "provider");
        if !by_provider.is_empty() && proportion {
            providers.push(dot_chart(
                format!("providers-{i}"),
                "Provider",
                m,
                overall,
                &by_provider,
            ));
        }
        for (k, st) in m.def.stratifiers.iter().enumerate() {
            let by_stratum = cells_of(input, &m.key(), &st.id);
            if !by_stratum.is_empty() && proportion {
                strata.push(dot_chart(
                    format!("strata-{i}-{k}"),
                    &st.id,
                    m,
                    overall,
                    &by_stratum,
                ));
            }
        }
        if m.def.category.is_some() && !m.categories.is_empty() {
            bands.push(bar_chart(i, m, input.min_cell_size, overall));
        }
        if proportion {
            trends.extend(trend_chart(input, i, m, overall, &trend));
        }
    }

    let period = format!("{} to {}", input.period.start, input.period.end);
    View {
        run_id: input.run_id.to_string(),
        generated_at: input.generated_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        period: period.clone(),
        ward_version: input.ward_version.to_string(),
        suppression_note: suppression_note(input.min_cell_size),
        headlines,
        providers,
        strata,
        bands,
        first_run: trends.is_empty(),
        previous_runs: {
            let mut runs: Vec<&str> = trend.iter().map(|p| p.run_id.as_str()).collect();
            runs.sort_unstable();
            runs.dedup();
            runs.len()
        },
        trends,
        quality: input.quality.iter().map(quality_row).collect(),
        quality_total: quality_row(&quality_total(input.quality)),
        dq: dq::view(input.dq, input.dq_trend),
        metadata: metadata(input, period),
        warnings: input.warnings.to_vec(),
    }
}

/// The summary cells of one measure by one dimension.
fn cells_of<'a>(input: &HtmlInput<'a>, measure: &str, dimension: &str) -> Vec<&'a Cell> {
    input
        .cells
        .iter()
        .filter(|c| c.measure == measure && c.dimension == dimension)
        .collect()
}

/// The headline card of measure `m` (the `i`th): its overall score, counts
/// and the change since the last run of the (sorted) `trend` that had one.
fn headline(
    input: &HtmlInput,
    i: usize,
    m: &MeasureResult,
    overall: Option<&Cell>,
    trend: &[&TrendPoint],
) -> Headline {
    let increase = m.def.improvement == Improvement::Increase;
    let rate = overall.and_then(|c| c.rate);
    let status = match overall {
        Some(c) if c.suppressed => "suppressed",
        Some(c) if c.rate.is_some() => "ok",
        _ => "empty",
    };
    let previous = trend
        .iter()
        .rev()
        .find(|p| p.measure == m.key() && p.rate.is_some());
    let proportion = m.def.scoring == Scoring::Proportion;
    let change = match (rate, previous) {
        (Some(now), Some(p)) => Some(change_since(now, p, proportion, increase)),
        _ => None,
    };
    Headline {
        anchor: format!("measure-{i}"),
        id: m.key(),
        title: m.title(),
        description: m.def.description.clone(),
        subjects: m.def.basis.noun(),
        improvement: if increase { "increase" } else { "decrease" },
        direction: if increase {
            "▲ higher is better"
        } else {
            "▼ lower is better"
        },
        status,
        why_empty: m.empty.as_ref().map(|e| why_empty(e, input.min_cell_size)),
        rate: rate.map_or_else(String::new, |r| m.def.format_score(Some(r))),
        ci: overall.map_or_else(String::new, |c| ci_text(c.ci_low, c.ci_high)),
        age_std: overall.and_then(|c| {
            Some((
                pct(c.age_std_rate?),
                ci_text(c.age_std_ci_low, c.age_std_ci_high),
            ))
        }),
        counts: counts(overall),
        gauge: overall.and_then(|c| Some(gauge(c.rate?, c.ci_low?, c.ci_high?))),
        change,
    }
}

/// The change of a score from the `previous` run's: in percentage points
/// for a proportion; other scores change in their own unit.
fn change_since(now: f64, previous: &TrendPoint, proportion: bool, increase: bool) -> Change {
    let delta = now - previous.rate.unwrap_or(now);
    let (shown, same_below, text) = if proportion {
        let points = delta * 100.0;
        (points, 0.05, format!("{points:+.1} pts"))
    } else {
        (delta, 0.0005, format!("{delta:+.3}"))
    };
    let verdict = if shown.abs() < same_below {
        "same"
    } else if (shown > 0.0) == increase {
        "better"
    } else {
        "worse"
    };
    Change {
        text,
        verdict,
        since: previous.date.clone(),
    }
}

/// The trend chart of measure `m` (the `i`th): the previous runs' points of
/// the (sorted) `trend`, then this run's; none on the measure's first run.
fn trend_chart(
    input: &HtmlInput,
    i: usize,
    m: &MeasureResult,
    overall: Option<&Cell>,
    trend: &[&TrendPoint],
) -> Option<LineChart> {
    let mut points: Vec<(TrendPoint, bool)> = trend
        .iter()
        .filter(|p| p.measure == m.key())
        .map(|p| ((*p).clone(), false))
        .collect();
    if points.is_empty() {
        return None;
    }
    points.push((
        TrendPoint {
            run_id: input.run_id.to_string(),
            date: input.generated_at.format("%Y-%m-%d").to_string(),
            measure: m.key(),
            rate: overall.and_then(|c| c.rate),
            ci_low: overall.and_then(|c| c.ci_low),
            ci_high: overall.and_then(|c| c.ci_high),
        },
        true,
    ));
    Some(line_chart(i, m, &points))
}

/// The sum of every source's data quality.
fn quality_total(quality: &[SourceQuality]) -> SourceQuality {
    let mut total = SourceQuality::empty("All sources");
    for q in quality {
        total.files += q.files;
        total.files_unchanged += q.files_unchanged;
        total.files_failed += q.files_failed;
        total.rows_read += q.rows_read;
        total.rows_accepted += q.rows_accepted;
        total.rows_rejected += q.rows_rejected;
        total.rows_skipped += q.rows_skipped;
    }
    total
}

/// How small counts are shown.
fn suppression_note(min_cell_size: u64) -> String {
    if min_cell_size > 1 {
        format!(
            "Counts from 1 to {} are suppressed (with a complementary cell where needed) \
             and shown as “suppressed”; their rates and intervals are withheld too.",
            min_cell_size - 1
        )
    } else {
        "Small-cell suppression is off (minimum cell size ≤ 1).".into()
    }
}

/// The run's metadata: run id, period, time, version, suppression
/// threshold, measures and sources, then the input's own.
fn metadata(input: &HtmlInput, period: String) -> Vec<(String, String)> {
    let mut metadata = vec![
        ("Run id".to_string(), input.run_id.to_string()),
        ("Measurement period".to_string(), period),
        (
            "Generated".to_string(),
            input.generated_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        ),
        ("Ward version".to_string(), input.ward_version.to_string()),
        (
            "Minimum cell size".to_string(),
            input.min_cell_size.to_string(),
        ),
        (
            "Measures".to_string(),
            input
                .measures
                .iter()
                .map(MeasureResult::key)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("Sources".to_string(), input.quality.len().to_string()),
    ];
    metadata.extend(input.metadata.iter().cloned());
    metadata
}

/// Shares are of the rows read, the denominator of the reject-rate gate:
/// a row read is accepted, rejected or skipped.
fn quality_row(q: &SourceQuality) -> QualityRow {
    let read = q.rows_read;
    let share = |n: u64| {
        if read > 0 {
            r1(n as f64 / read as f64 * 100.0)
        } else {
            0.0
        }
    };
    let accepted_pct = share(q.rows_accepted);
    QualityRow {
        source: q.source.clone(),
        files: count(q.files),
        files_unchanged: q.files_unchanged,
        files_failed: q.files_failed,
        rows_read: count(q.rows_read),
        rows_accepted: count(q.rows_accepted),
        rows_rejected: count(q.rows_rejected),
        rows_skipped: count(q.rows_skipped),
        reject_share: if read > 0 {
            format!("{:.2}%", q.rows_rejected as f64 / read as f64 * 100.0)
        } else {
            "–".into()
        },
        accepted_pct,
        rejected_pct: share(q.rows_rejected),
        top_rules: q
            .top_rules
            .iter()
            .map(|(r, n)| (r.clone(), count(*n)))
            .collect(),
        problems: q.problems.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{NaiveDate, TimeZone};
    use datafusion::arrow::datatypes::Schema;

    use super::*;
    use crate::ingest::FileReport;
    use crate::measure::MeasureDef;

    fn def(id: &str, title: &str, category: Option<&str>) -> MeasureDef {
        MeasureDef {
            id: id.into(),
            title: title.into(),
            cms_id: None,
            version: None,
            steward: "test".into(),
            scoring: crate::measure::Scoring::Proportion,
            observation: None,
            improvement: Improvement::Increase,
            description: format!("{title} described"),
            url: None,
            category: category.map(str::to_string),
            care_gap: None,
            care_gap_priority: None,
            age_standardize: false,
            library: None,
            basis: Default::default(),
            groups: Vec::new(),
            stratifiers: Vec::new(),
            person_local: true,
            sql: PathBuf::new(),
        }
    }

    /// A measure whose raw (unsuppressed) counts are distinctive numbers
    /// that must never reach the page.
    fn result(def: MeasureDef, categories: &[(&str, u64)]) -> MeasureResult {
        MeasureResult {
            def,
            group: None,
            strata: Vec::new(),
            period: period(),
            counts: crate::measure::Counts {
                initial_population: 987_654,
                denominator: 987_653,
                denominator_exclusion: 0,
                denominator_exception: 0,
                numerator: 876_543,
            },
            score: None,
            categories: categories
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            rows: Vec::new(),
            schema: Arc::new(Schema::empty()),
            empty: None,
        }
    }

    fn period() -> Period {
        Period {
            start: NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(),
            end: NaiveDate::from_ymd_opt(2025, 12, 31).unwrap(),
        }
    }

    /// A published cell with its Wilson interval, or a suppressed one.
    fn cell(measure: &str, dimension: &str, stratum: &str, counts: Option<(u64, u64)>) -> Cell {
        let ci = counts.and_then(|(num, den)| super::super::wilson(num, den));
        Cell {
            measure: measure.into(),
            dimension: dimension.into(),
            stratum: stratum.into(),
            initial_population: counts.map(|c| c.1),
            denominator: counts.map(|c| c.1),
            denominator_exclusion: counts.map(|_| 0),
            denominator_exception: counts.map(|_| 0),
            numerator: counts.map(|c| c.0),
            rate: counts.map(|(num, den)| num as f64 / den as f64),
            ci_low: ci.map(|c| c.0),
            ci_high: ci.map(|c| c.1),
            age_std_rate: None,
            age_std_ci_low: None,
            age_std_ci_high: None,
            suppressed: counts.is_none(),
        }
    }

    struct Fixture {
        measures: Vec<MeasureResult>,
        cells: Vec<Cell>,
        quality: Vec<SourceQuality>,
        metadata: Vec<(String, String)>,
        warnings: Vec<String>,
        dq: Vec<crate::dq::CheckResult>,
        dq_trend: Vec<DqPoint>,
    }

    fn fixture(hostile: &str) -> Fixture {
        let mut ctrl = def("CTRL", "Control", Some("band"));
        ctrl.stratifiers = vec![crate::measure::StratifierDef {
            id: "Stratification 1".into(),
            column: "s1".into(),
            description: Some("Age 18-44".into()),
        }];
        let measures = vec![
            result(
                ctrl,
                &[
                    ("<7", 4_242),
                    ("7-8", 7),
                    ("8-9", 3_131),
                    (">9", 2_020),
                    ("untested", 1_517),
                ],
            ),
            result(def(hostile, hostile, None), &[]),
            result(def("HIDDEN", "All suppressed", None), &[]),
        ];
        let cells = vec![
            cell("CTRL", "overall", "all", Some((4_249, 10_917))),
            cell("CTRL", "provider", "north", Some((2_000, 5_000))),
            cell("CTRL", "provider", "south", Some((2_249, 5_909))),
            cell("CTRL", "provider", hostile, None),
            cell("CTRL", "Stratification 1", "true", Some((1_000, 3_000))),
            cell("CTRL", "Stratification 1", "false", Some((3_249, 7_917))),
            cell(hostile, "overall", "all", Some((300, 1_000))),
            cell("HIDDEN", "overall", "all", None),
        ];
        let quality = vec![SourceQuality {
            source: hostile.into(),
            files: 2,
            files_unchanged: 0,
            files_failed: 0,
            rows_read: 100,
            rows_accepted: 92,
            rows_rejected: 3,
            rows_skipped: 5,
            top_rules: vec![(hostile.into(), 3)],
            problems: vec![],
        }];
        let metadata = vec![(hostile.to_string(), hostile.to_string())];
        Fixture {
            measures,
            cells,
            quality,
            metadata,
            warnings: vec![format!("source '{hostile}': 3 of 100 rows rejected")],
            dq: vec![crate::dq::CheckResult {
                check: "bmi_implausible".into(),
                category: crate::dq::Category::Plausibility,
                subcategory: Some(crate::dq::Subcategory::Atemporal),
                table: Some("observation".into()),
                column: Some("value_num".into()),
                source: hostile.into(),
                severity: crate::dq::Severity::Warn,
                threshold_pct: 1.0,
                violating: 3,
                checked: 100,
                rate_pct: Some(3.0),
                new_violating: 3,
                new_checked: 100,
                new_rate_pct: Some(3.0),
                status: crate::dq::Status::Warn,
                baseline_pct: Some(0.5),
                drift_tolerance_pct: 2.0,
                drift: true,
                description: hostile.into(),
            }],
            dq_trend: vec![DqPoint {
                run_id: "20260130T120000Z".into(),
                date: "2026-01-30".into(),
                check: "bmi_implausible".into(),
                source: hostile.into(),
                rate_pct: 0.5,
            }],
        }
    }

    fn input<'a>(f: &'a Fixture, trend: &'a [TrendPoint]) -> HtmlInput<'a> {
        HtmlInput {
            run_id: "20260131T120000Z",
            generated_at: Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap(),
            period: period(),
            ward_version: "0.1.0",
            min_cell_size: 11,
            measures: &f.measures,
            cells: &f.cells,
            trend,
            quality: &f.quality,
            metadata: &f.metadata,
            warnings: &f.warnings,
            dq: &f.dq,
            dq_trend: &f.dq_trend,
        }
    }

    const HOSTILE: &str = "\"><script>alert(1)</script><img src=x onerror=alert(2)>&";

    #[test]
    fn measure_strata_get_their_own_chart() {
        let f = fixture(HOSTILE);
        let html = render(&input(&f, &[])).unwrap();
        assert!(html.contains(r#"id="strata-0-0""#));
        assert!(html.contains("CTRL: rate by stratification 1 with 95% confidence intervals"));
        assert!(html.contains(r#"<th scope="col">Stratification 1</th>"#));
        // 1,000 of 3,000: the stratum's rate.
        assert!(html.contains("33.3%"));
    }

    #[test]
    fn every_text_is_escaped() {
        let f = fixture(HOSTILE);
        let html = render(&input(&f, &[])).unwrap();
        assert!(!html.contains("<script"), "a script element got through");
        assert!(!html.contains("<img"), "an img element got through");
        assert!(!html.contains(HOSTILE));
        let escaped = "&quot;&gt;&lt;script&gt;alert(1)&lt;&#x2f;script&gt;&lt;img";
        // Measure id and title, provider, source, rule, metadata key and
        // value, data-quality source and description.
        assert!(
            html.matches(escaped).count() >= 8,
            "{}",
            html.matches(escaped).count()
        );
    }

    #[test]
    fn suppressed_numbers_never_reach_the_page() {
        let f = fixture("Other");
        let html = render(&input(&f, &[])).unwrap();
        // Raw counts of MeasureResult are never shown, in any format.
        for hidden in ["987654", "987,654", "876543", "876,543"] {
            assert!(!html.contains(hidden), "{hidden} leaked");
        }
        // The band of 7 is small: every band is hidden, with its share.
        for hidden in ["1,517", "1517", "13.9%", "4,242", "2,020", "3,131"] {
            assert!(!html.contains(hidden), "{hidden} leaked");
        }
        let row = |label: &str| {
            let start = html
                .find(&format!("<tr><th scope=\"row\">{label}</th>"))
                .unwrap_or_else(|| panic!("no row {label}"));
            html[start..start + html[start..].find("</tr>").unwrap()].to_string()
        };
        assert!(row("7-8").contains("suppressed"));
        assert!(row("untested").contains("suppressed"));
        assert!(row("&lt;7").contains("suppressed"));
        // A suppressed measure is marked on its card, without a rate.
        let card = &html[html.find("id=\"measure-2\"").unwrap()..];
        let card = &card[..card.find("</article>").unwrap()];
        assert!(card.contains("suppressed") && !card.contains('%'), "{card}");
    }

    #[test]
    fn one_small_category_hides_them_all() {
        let cats = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let shown = |c: &BTreeMap<String, u64>, overall_suppressed| -> Vec<Option<u64>> {
            suppress_categories(c, 11, overall_suppressed)
                .into_iter()
                .map(|(_, n)| n)
                .collect()
        };
        // Zeros and counts of 11 or more are published...
        let fine = cats(&[("a", 50), ("b", 0), ("c", 11)]);
        assert_eq!(shown(&fine, false), [Some(50), Some(0), Some(11)]);
        // ...unless the overall cell is suppressed.
        assert_eq!(shown(&fine, true), [None, None, None]);
        // One band of 3: a complement alone could be undone through the
        // numerator (a sum of bands), so nothing is published.
        let small = cats(&[("<7", 41), ("7-8", 4), ("8-9", 20), (">9", 30)]);
        assert!(shown(&small, false).iter().all(Option::is_none));
    }

    #[test]
    fn bands_are_ordered_by_their_numbers() {
        let mut labels = vec!["untested", ">9", "8-9", "<7", "7-8"];
        labels.sort_by(|a, b| band_key(a).partial_cmp(&band_key(b)).unwrap());
        assert_eq!(labels, ["<7", "7-8", "8-9", ">9", "untested"]);
    }

    #[test]
    fn chart_geometry_stays_in_the_view_box() {
        let f = fixture("Other");
        let m = &f.measures[0];
        let cells: Vec<&Cell> = f
            .cells
            .iter()
            .filter(|c| c.dimension == "provider")
            .collect();
        let c = dot_chart(
            "providers-0".into(),
            "Provider",
            m,
            Some(&f.cells[0]),
            &cells,
        );
        for r in c.rows.iter().filter(|r| !r.suppressed) {
            assert!(
                c.left <= r.x_low && r.x_low <= r.cx && r.cx <= r.x_high && r.x_high <= c.right
            );
            assert!(r.x_low < r.x_high, "a visible whisker");
            assert!(0.0 < r.y && r.y < c.height);
        }
        // The dot sits at its rate: 2000/5000 = 40 % of the plot width.
        let north = &c.rows[0];
        assert!((north.cx - (c.left + 0.4 * (c.right - c.left))).abs() < 0.11);
        assert!(c.right < c.width);

        // Bands all published (none small).
        let mut banded = m.clone();
        banded.categories.insert("7-8".into(), 70);
        let b = bar_chart(0, &banded, 11, Some(&f.cells[0]));
        assert!(b.rows.iter().all(|r| !r.suppressed));
        let total = 4_242.0 + 70.0 + 3_131.0 + 2_020.0 + 1_517.0;
        for r in &b.rows {
            assert!(r.x >= b.left && r.x + r.w <= b.right + 1e-9);
            assert!(r.bar_y >= 0.0 && r.bar_y + r.bar_h <= b.height);
        }
        let first = &b.rows[0];
        assert_eq!(first.label, "<7");
        assert!((first.w - 4_242.0 / total * (b.right - b.left)).abs() < 0.11);

        let points: Vec<(TrendPoint, bool)> =
            [(0.2, 0.15, 0.25), (0.35, 0.3, 0.4), (0.3, 0.26, 0.34)]
                .iter()
                .enumerate()
                .map(|(i, &(r, lo, hi))| {
                    (
                        TrendPoint {
                            run_id: format!("run{i}"),
                            date: format!("2025-0{}-01", i + 1),
                            measure: "CTRL".into(),
                            rate: Some(r),
                            ci_low: Some(lo),
                            ci_high: Some(hi),
                        },
                        i == 2,
                    )
                })
                .collect();
        let l = line_chart(0, m, &points);
        assert_eq!(l.points.len(), 3);
        for p in &l.points {
            assert!(l.left <= p.x && p.x <= l.right && l.top <= p.y && p.y <= l.bottom);
        }
        // Later runs to the right; the higher rate higher up (smaller y).
        assert!(l.points[0].x < l.points[1].x && l.points[1].x < l.points[2].x);
        assert!(l.points[1].y < l.points[2].y && l.points[2].y < l.points[0].y);
        // The axis covers every interval bound.
        let first_tick: f64 = l.y_ticks[0].label.trim_end_matches('%').parse().unwrap();
        let last_tick: f64 = l
            .y_ticks
            .last()
            .unwrap()
            .label
            .trim_end_matches('%')
            .parse()
            .unwrap();
        assert!(first_tick <= 15.0 && last_tick >= 40.0);
        for xy in l.band.split(' ') {
            let (x, y) = xy.split_once(',').unwrap();
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!(l.left <= x && x <= l.right && l.top <= y && y <= l.bottom);
        }
    }

    #[test]
    fn svg_elements_are_inside_their_view_boxes() {
        let f = fixture("Other");
        let html = render(&input(&f, &[])).unwrap();
        let svgs: Vec<&str> = html.split("<svg ").skip(1).collect();
        assert!(svgs.len() >= 3, "gauges, provider and band charts");
        let num = |tag: &str, attr: &str| -> Option<f64> {
            let at = tag.find(&format!(" {attr}=\""))? + attr.len() + 3;
            tag[at..tag[at..].find('"')? + at].parse().ok()
        };
        for svg in svgs {
            let svg = &svg[..svg.find("</svg>").unwrap()];
            let vb = &svg[svg.find("viewBox=\"").unwrap() + 9..];
            let vb: Vec<f64> = vb[..vb.find('"').unwrap()]
                .split(' ')
                .map(|v| v.parse().unwrap())
                .collect();
            for tag in svg
                .split('<')
                .filter(|t| t.starts_with("circle") || t.starts_with("rect"))
            {
                let x = num(tag, "cx").or(num(tag, "x")).unwrap();
                let y = num(tag, "cy").or(num(tag, "y")).unwrap();
                let w = num(tag, "width").unwrap_or(0.0);
                let h = num(tag, "height").unwrap_or(0.0);
                assert!(
                    x >= 0.0 && x + w <= vb[2] && y >= 0.0 && y + h <= vb[3],
                    "{tag}"
                );
            }
        }
    }

    #[test]
    fn age_standardized_rates_are_shown_where_published() {
        let mut f = fixture("Other");
        let html = render(&input(&f, &[])).unwrap();
        assert!(!html.contains("Age-standardized"));
        f.cells[0].age_std_rate = Some(0.4321);
        f.cells[0].age_std_ci_low = Some(0.41);
        f.cells[0].age_std_ci_high = Some(0.45);
        let html = render(&input(&f, &[])).unwrap();
        assert!(html.contains("Age-standardized (2000 US standard): 43.2%, 95% CI 41.0–45.0%"));
    }

    #[test]
    fn trend_needs_an_earlier_run() {
        let f = fixture("Other");
        let html = render(&input(&f, &[])).unwrap();
        assert!(html.contains("first run on record"));
        assert!(!html.contains("<polyline class=\"trend\""));
        let trend = vec![TrendPoint {
            run_id: "20251231T120000Z".into(),
            date: "2025-12-31".into(),
            measure: "CTRL".into(),
            rate: Some(0.35),
            ci_low: Some(0.34),
            ci_high: Some(0.36),
        }];
        let html = render(&input(&f, &trend)).unwrap();
        assert!(!html.contains("first run on record"));
        assert_eq!(
            html.matches("<polyline class=\"trend\"").count(),
            1,
            "one measure has history"
        );
        // 4249/10917 = 38.9 %: up 3.9 points on a higher-is-better measure.
        assert!(
            html.contains("+3.9 pts since 2025-12-31 (better)"),
            "change shown"
        );
    }

    #[test]
    fn the_policy_admits_exactly_the_inline_stylesheet() {
        let f = fixture("Other");
        let html = render(&input(&f, &[])).unwrap();
        let css = &html[html.find("<style>").unwrap() + 7..html.find("</style>").unwrap()];
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(css.as_bytes()));
        assert!(html.contains(&format!("default-src 'none'; style-src 'sha256-{hash}'")));
        assert!(
            !html.contains(" style=\""),
            "style attributes would be refused"
        );
        assert!(!html.contains("<script"));
    }

    #[test]
    fn quality_rows_sum_the_ingest_report() {
        let file = |source: &str, status, read, rejected, rules: &[(&str, u64)]| FileReport {
            source: source.into(),
            file: "f.csv".into(),
            table: None,
            status,
            detail: None,
            rows_read: read,
            rows_accepted: read - rejected,
            rows_rejected: rejected,
            rows_skipped: 0,
            skipped_by_type: BTreeMap::new(),
            rejects_by_rule: rules.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
            values_flagged: BTreeMap::new(),
            reject_examples: Vec::new(),
        };
        let report = IngestReport {
            files: vec![
                file("b", FileStatus::Loaded, 10, 3, &[("x", 2), ("y", 1)]),
                file("b", FileStatus::Loaded, 20, 4, &[("y", 4)]),
                file("a", FileStatus::Unchanged, 0, 0, &[]),
                file("a", FileStatus::Failed, 0, 0, &[]),
            ],
            source_failures: vec![crate::ingest::SourceFailure {
                source: "c".into(),
                message: "no input".into(),
            }],
            orphans_removed: 0,
        };
        let q = SourceQuality::from_ingest(&report);
        let names: Vec<&str> = q.iter().map(|q| q.source.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            (q[0].files, q[0].files_unchanged, q[0].files_failed),
            (2, 1, 1)
        );
        assert_eq!(q[0].problems.len(), 1);
        assert_eq!(
            (q[1].rows_read, q[1].rows_accepted, q[1].rows_rejected),
            (30, 23, 7)
        );
        assert_eq!(q[1].top_rules, [("y".to_string(), 5), ("x".to_string(), 2)]);
        assert_eq!(q[2].problems, ["no input"]);
    }

    #[test]
    fn quality_shares_are_of_rows_read_and_warnings_are_listed() {
        let f = fixture("north");
        let html = render(&input(&f, &[])).unwrap();
        let table = &html[html.find("<table class=\"quality\">").unwrap()..];
        let row = &table[table.find("<tr><th scope=\"row\">north</th>").unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        // 3 rejected of 100 read (5 skipped): 3.00 %, as the gate says,
        // not 3 of 95 accepted or rejected.
        assert!(row.contains(">3.00%<"), "{row}");
        assert!(
            row.contains("<td class=\"num rows\">5</td>"),
            "skipped shown: {row}"
        );
        assert!(html.contains("rejected ÷ rows read"));
        assert!(html.contains("<li>source &#x27;north&#x27;: 3 of 100 rows rejected</li>"));
    }

    #[test]
    fn an_empty_denominator_is_explained_without_small_counts() {
        let mut f = fixture("Other");
        // A measure without a summary cell: no one in its denominator.
        f.measures.push(result(def("EMPTY", "Empty", None), &[]));
        f.measures[3].empty = Some(crate::measure::EmptyDenominator {
            valuesets: 4,
            persons_by_table: vec![("condition".into(), 7), ("observation".into(), 1_234)],
            encounters_in_period: 940,
            unmatched_encounter_codes: vec!["local V01".into(), "snomed 185349003".into()],
        });
        let html = render(&input(&f, &[])).unwrap();
        let why = &html[html.find("<p class=\"why\">").unwrap()..];
        let why = &why[..why.find("</p>").unwrap()];
        assert!(why.contains("4 value set(s)"), "{why}");
        assert!(
            why.contains("condition fewer than 11, observation 1,234"),
            "{why}"
        );
        assert!(why.contains("940 encounter(s)"), "{why}");
        assert!(why.contains("local V01, snomed 185349003"), "{why}");
        assert!(!why.contains(" 7"), "a small count leaked: {why}");
        f.measures[3].empty = Some(crate::measure::EmptyDenominator::default());
        let html = render(&input(&f, &[])).unwrap();
        assert!(html.contains("No fact in the data is coded in the 0 value set(s)"));
    }

    #[test]
    fn write_publishes_report_html_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture("Other");
        let path = write(&dir.path().join("run"), &input(&f, &[])).unwrap();
        assert_eq!(path, dir.path().join("run").join("report.html"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("<!DOCTYPE html>") && text.trim_end().ends_with("</html>"));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.html"], "no temporary file left");
    }
}
