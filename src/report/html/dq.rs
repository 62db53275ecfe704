//! The data-quality section of report.html: a source × category scorecard,
//! the checks that did not pass with their trend, drift alerts, and every
//! result as a table. Counts and rates only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dq::{Category, CheckResult, Status};

/// One check's rate on one source in an earlier run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DqPoint {
    pub run_id: String,
    /// Label on the time axis (the run's date).
    pub date: String,
    pub check: String,
    pub source: String,
    pub rate_pct: f64,
}

#[derive(Debug, Serialize)]
pub(super) struct DqView {
    /// Whether any check ran.
    present: bool,
    categories: Vec<&'static str>,
    scorecard: Vec<ScoreRow>,
    flagged: Vec<FlagRow>,
    drift: Vec<FlagRow>,
    rows: Vec<DataRow>,
}

#[derive(Debug, Serialize)]
struct ScoreRow {
    source: String,
    cells: Vec<ScoreCell>,
}

#[derive(Debug, Default, Serialize)]
struct ScoreCell {
    passed: usize,
    warned: usize,
    failed: usize,
    /// Info checks above their threshold.
    noted: usize,
    no_data: usize,
    /// `fail`, `warn` or `pass`: the worst status of the cell.
    status: &'static str,
}

#[derive(Debug, Serialize)]
struct FlagRow {
    check: String,
    source: String,
    category: &'static str,
    status: &'static str,
    rate: String,
    /// Tonight's rows: their rate and counts (empty when too few).
    tonight: String,
    threshold: String,
    baseline: String,
    counts: String,
    description: String,
    spark: Spark,
}

/// A small line of the rate over the runs kept, this run last.
#[derive(Debug, Serialize)]
struct Spark {
    width: f64,
    height: f64,
    /// `points` of the polyline (empty with fewer than two runs).
    line: String,
    /// The current run's point.
    x: f64,
    y: f64,
    label: String,
}

#[derive(Debug, Serialize)]
struct DataRow {
    check: String,
    source: String,
    category: &'static str,
    subcategory: &'static str,
    status: &'static str,
    violating: u64,
    checked: u64,
    rate: String,
    tonight: String,
    threshold: String,
    baseline: String,
    drift: bool,
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{r:.2}%"))
}

/// Tonight's rate with its counts, or a dash when there were too few rows.
fn tonight(r: &CheckResult) -> String {
    r.new_rate_pct.map_or_else(
        || "–".into(),
        |n| format!("{n:.2}% ({} of {})", r.new_violating, r.new_checked),
    )
}

pub(super) fn view(results: &[CheckResult], trend: &[DqPoint]) -> DqView {
    let mut by_source: BTreeMap<&str, Vec<ScoreCell>> = BTreeMap::new();
    for r in results {
        let cells = by_source
            .entry(&r.source)
            .or_insert_with(|| Category::ALL.iter().map(|_| ScoreCell::default()).collect());
        let cell = &mut cells[Category::ALL
            .iter()
            .position(|c| *c == r.category)
            .expect("every category is listed")];
        match r.status {
            Status::Pass => cell.passed += 1,
            Status::Warn => cell.warned += 1,
            Status::Fail => cell.failed += 1,
            Status::Info => cell.noted += 1,
            Status::NoData => cell.no_data += 1,
        }
    }
    let scorecard = by_source
        .into_iter()
        .map(|(source, mut cells)| {
            for c in &mut cells {
                c.status = match (c.failed, c.warned) {
                    (0, 0) => "pass",
                    (0, _) => "warn",
                    _ => "fail",
                };
            }
            ScoreRow {
                source: source.to_string(),
                cells,
            }
        })
        .collect();
    let flag = |r: &CheckResult| FlagRow {
        check: r.check.clone(),
        source: r.source.clone(),
        category: r.category.name(),
        status: r.status.name(),
        rate: pct(r.rate_pct),
        tonight: tonight(r),
        threshold: format!("{}%", r.threshold_pct),
        baseline: pct(r.baseline_pct),
        counts: format!("{} of {}", r.violating, r.checked),
        description: r.description.clone(),
        spark: spark(r, trend),
    };
    let mut flagged: Vec<&CheckResult> = results
        .iter()
        .filter(|r| matches!(r.status, Status::Fail | Status::Warn | Status::Info))
        .collect();
    flagged.sort_by_key(|r| (r.status, &r.source, &r.check));
    DqView {
        present: !results.is_empty(),
        categories: Category::ALL.iter().map(|c| c.name()).collect(),
        scorecard,
        flagged: flagged.into_iter().map(flag).collect(),
        drift: results.iter().filter(|r| r.drift).map(flag).collect(),
        rows: results
            .iter()
            .map(|r| DataRow {
                check: r.check.clone(),
                source: r.source.clone(),
                category: r.category.name(),
                subcategory: r.subcategory.map_or("", |s| s.name()),
                status: r.status.name(),
                violating: r.violating,
                checked: r.checked,
                rate: pct(r.rate_pct),
                tonight: tonight(r),
                threshold: format!("{}%", r.threshold_pct),
                baseline: pct(r.baseline_pct),
                drift: r.drift,
            })
            .collect(),
    }
}

/// The check's rate on the source over the earlier runs (by date, then
/// run id) and this one; the scale runs from 0 to the largest rate or the
/// threshold.
fn spark(r: &CheckResult, trend: &[DqPoint]) -> Spark {
    let (width, height, pad) = (120.0, 28.0, 3.0);
    let mut earlier: Vec<&DqPoint> = trend
        .iter()
        .filter(|p| p.check == r.check && p.source == r.source)
        .collect();
    earlier.sort_by(|a, b| (&a.date, &a.run_id).cmp(&(&b.date, &b.run_id)));
    let mut rates: Vec<f64> = earlier.iter().map(|p| p.rate_pct).collect();
    rates.extend(r.rate_pct);
    let top = rates
        .iter()
        .copied()
        .fold(r.threshold_pct.min(100.0), f64::max)
        .max(1.0);
    let n = rates.len();
    let at = |i: usize, v: f64| {
        let x = if n < 2 {
            width - pad
        } else {
            pad + (width - 2.0 * pad) * i as f64 / (n - 1) as f64
        };
        let y = height - pad - (height - 2.0 * pad) * (v / top);
        ((x * 10.0).round() / 10.0, (y * 10.0).round() / 10.0)
    };
    let points: Vec<(f64, f64)> = rates.iter().enumerate().map(|(i, v)| at(i, *v)).collect();
    let (x, y) = points
        .last()
        .copied()
        .unwrap_or((width - pad, height - pad));
    Spark {
        width,
        height,
        line: if n < 2 {
            String::new()
        } else {
            points
                .iter()
                .map(|(x, y)| format!("{x},{y}"))
                .collect::<Vec<_>>()
                .join(" ")
        },
        x,
        y,
        label: format!(
            "{} over {} run{}: {}",
            r.check,
            n,
            if n == 1 { "" } else { "s" },
            rates
                .iter()
                .map(|v| format!("{v:.2}%"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dq::Severity;

    fn result(source: &str, check: &str, category: Category, status: Status) -> CheckResult {
        CheckResult {
            check: check.into(),
            category,
            subcategory: None,
            table: None,
            column: None,
            source: source.into(),
            severity: Severity::Warn,
            threshold_pct: 5.0,
            violating: 1,
            checked: 10,
            rate_pct: Some(10.0),
            new_violating: 0,
            new_checked: 0,
            new_rate_pct: None,
            status,
            baseline_pct: None,
            drift_tolerance_pct: 5.0,
            drift: false,
            description: String::new(),
        }
    }

    #[test]
    fn the_scorecard_counts_each_status_per_source_and_category() {
        let results = [
            result("a", "x", Category::Conformance, Status::Pass),
            result("a", "y", Category::Conformance, Status::Warn),
            result("a", "z", Category::Plausibility, Status::Fail),
            result("b", "x", Category::Conformance, Status::NoData),
        ];
        let v = view(&results, &[]);
        assert_eq!(v.scorecard.len(), 2);
        let a = &v.scorecard[0].cells;
        assert_eq!((a[0].passed, a[0].warned, a[0].status), (1, 1, "warn"));
        assert_eq!((a[1].passed, a[1].status), (0, "pass"));
        assert_eq!((a[2].failed, a[2].status), (1, "fail"));
        assert_eq!(v.scorecard[1].cells[0].no_data, 1);
        // Failed first, then warned; passed and no-data are not flagged.
        let flagged: Vec<&str> = v.flagged.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(flagged, ["z", "y"]);
        assert!(v.drift.is_empty());
    }

    #[test]
    fn the_sparkline_runs_through_the_earlier_runs_in_order_then_this_one() {
        let mut r = result("a", "x", Category::Completeness, Status::Warn);
        r.rate_pct = Some(20.0);
        let point = |run: &str, rate_pct: f64| DqPoint {
            run_id: run.into(),
            date: run.into(),
            check: "x".into(),
            source: "a".into(),
            rate_pct,
        };
        let trend = [point("2026-01-02", 10.0), point("2026-01-01", 0.0)];
        let s = spark(&r, &trend);
        assert_eq!(s.line, "3,25 60,14 117,3");
        assert_eq!((s.x, s.y), (117.0, 3.0));
        assert!(s.label.ends_with("0.00%, 10.00%, 20.00%"), "{}", s.label);
        // A first run: one point, no line.
        let s = spark(&r, &[]);
        assert!(s.line.is_empty());
    }
}
