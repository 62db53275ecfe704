//! The run history (`history.json`): headline figures of every published
//! run, carried forward from run to run.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::manifest::{PeriodInfo, write_json_atomic};
use super::publish::HISTORY;
use crate::error::{Result, WardError};

/// Headline figures of one published run, kept in every later run's
/// `history.json` (so trends survive the pruning of old run directories).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    pub run_id: String,
    pub finished: String,
    pub period: PeriodInfo,
    pub persons: u64,
    /// Each measure's published overall cell (small counts suppressed:
    /// the history feeds published trends).
    pub overall: Vec<crate::report::Cell>,
    /// Every data-quality check's rate per source (drift baselines, trends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dq: Vec<crate::dq::DqRate>,
}

impl HistoryEntry {
    /// The day the run finished (`2025-12-31`): the label of its trend points.
    fn day(&self) -> String {
        self.finished
            .get(..10)
            .unwrap_or(&self.finished)
            .to_string()
    }
}

/// The HTML report's trend points: each measure's published overall rate
/// in every run of `history`, labelled with the day the run finished.
pub fn trend(history: &[HistoryEntry]) -> Vec<crate::report::html::TrendPoint> {
    history
        .iter()
        .flat_map(|h| {
            h.overall.iter().map(|c| crate::report::html::TrendPoint {
                run_id: h.run_id.clone(),
                date: h.day(),
                measure: c.measure.clone(),
                rate: c.rate,
                ci_low: c.ci_low,
                ci_high: c.ci_high,
            })
        })
        .collect()
}

/// The data-quality rates of every run of `history`, labelled like
/// [`trend`]'s points.
pub fn dq_trend(history: &[HistoryEntry]) -> Vec<crate::report::html::DqPoint> {
    history
        .iter()
        .flat_map(|h| {
            h.dq.iter().map(|r| crate::report::html::DqPoint {
                run_id: h.run_id.clone(),
                date: h.day(),
                check: r.check.clone(),
                source: r.source.clone(),
                rate_pct: r.rate_pct,
            })
        })
        .collect()
}

/// At most this many runs are kept in `history.json`.
pub(super) const HISTORY_LIMIT: usize = 1000;

/// The history of the current run (empty when there is none).
pub fn load_history(run_dir: Option<&Path>) -> Result<Vec<HistoryEntry>> {
    let Some(dir) = run_dir else {
        return Ok(Vec::new());
    };
    let path = dir.join(HISTORY);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| WardError::State {
            path,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(WardError::io("cannot read", path, e)),
    }
}

/// Writes `history` plus `entry` into `run_dir/history.json`.
pub fn write_history(
    run_dir: &Path,
    mut history: Vec<HistoryEntry>,
    entry: HistoryEntry,
) -> Result<Vec<HistoryEntry>> {
    history.push(entry);
    if history.len() > HISTORY_LIMIT {
        history.drain(..history.len() - HISTORY_LIMIT);
    }
    write_json_atomic(&run_dir.join(HISTORY), &history)?;
    Ok(history)
}
