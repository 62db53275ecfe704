//! Data-quality gates: thresholds on reject rates, row drops and
//! deliveries that fail a nightly run or warn.

use serde::{Deserialize, Serialize};

use super::manifest::{Manifest, SourceTable};

/// Data-quality gates (`[gates]`): thresholds that fail a nightly run
/// (exit code 1, nothing published) or warn.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    /// Fail when a source's rejected rows exceed this share of rows read.
    pub max_reject_rate: f64,
    /// Warn when a source's reject rate exceeds this share.
    pub warn_reject_rate: f64,
    /// Fail when a source's accepted rows fell by more than this share since
    /// the last published run.
    pub max_row_drop: f64,
    /// Warn when they fell by more than this share.
    pub warn_row_drop: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_reject_rate: 0.05,
            warn_reject_rate: 0.01,
            max_row_drop: 0.2,
            warn_row_drop: 0.05,
        }
    }
}

/// The outcome of one gate for one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Warn,
    Fail,
}

/// The data-quality checks as gates: one per check and source that did
/// not pass (a `fail` check above its threshold fails the night, a `warn`
/// one warns); the checks that passed are in `dq.json`, not here.
pub fn dq_gates(results: &[crate::dq::CheckResult]) -> Vec<GateResult> {
    use crate::dq::Status;
    results
        .iter()
        .filter_map(|r| {
            let outcome = match r.status {
                Status::Fail => GateOutcome::Fail,
                Status::Warn => GateOutcome::Warn,
                Status::Pass | Status::Info | Status::NoData => return None,
            };
            let rate = r.rate_pct?;
            Some(GateResult {
                gate: format!("dq:{}", r.check),
                source: r.source.clone(),
                outcome,
                value: Some(rate / 100.0),
                message: format!(
                    "source '{}': data-quality check '{}' ({}): {} of {} rows ({rate:.2} %; {} above {} %)",
                    r.source,
                    r.check,
                    r.category.name(),
                    r.violating,
                    r.checked,
                    if outcome == GateOutcome::Fail { "fail" } else { "warn" },
                    r.threshold_pct
                ),
            })
        })
        .collect()
}

/// One gate checked for one source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateResult {
    /// `reject_rate`, `row_drop` or `delivery`.
    pub gate: String,
    pub source: String,
    pub outcome: GateOutcome,
    /// The measured value (a share), when the gate measures one.
    pub value: Option<f64>,
    pub message: String,
}

/// Checks the gates per source: reject rate over the source's files,
/// accepted rows against the previous published run, and delivery for the
/// sources expected every night (`nightly`).
pub fn check_gates(
    gates: &Gates,
    sources: &[crate::ingest::SourceConfig],
    tables: &[SourceTable],
    previous: Option<&Manifest>,
) -> Vec<GateResult> {
    let mut results = Vec::new();
    for source in sources {
        let name = &source.name;
        let rows = |f: fn(&SourceTable) -> u64| -> u64 {
            tables.iter().filter(|t| &t.source == name).map(f).sum()
        };
        let (read, rejected, accepted) = (
            rows(|t| t.rows_read),
            rows(|t| t.rows_rejected),
            rows(|t| t.rows_accepted),
        );
        let rate = if read == 0 {
            0.0
        } else {
            rejected as f64 / read as f64
        };
        let outcome = grade(rate, gates.warn_reject_rate, gates.max_reject_rate);
        results.push(GateResult {
            gate: "reject_rate".into(),
            source: name.clone(),
            outcome,
            value: Some(rate),
            message: format!(
                "source '{name}': {rejected} of {read} rows rejected ({:.2} %; warn above {:.2} %, fail above {:.2} %)",
                rate * 100.0,
                gates.warn_reject_rate * 100.0,
                gates.max_reject_rate * 100.0
            ),
        });
        if let Some(prev) = previous {
            let before: u64 = prev
                .sources
                .iter()
                .filter(|t| &t.source == name)
                .map(|t| t.rows_accepted)
                .sum();
            if before > 0 {
                let drop = before.saturating_sub(accepted) as f64 / before as f64;
                results.push(GateResult {
                    gate: "row_drop".into(),
                    source: name.clone(),
                    outcome: grade(drop, gates.warn_row_drop, gates.max_row_drop),
                    value: Some(drop),
                    message: format!(
                        "source '{name}': {accepted} rows accepted, {before} in run {} (a drop of {:.1} %; warn above {:.1} %, fail above {:.1} %)",
                        prev.run_id,
                        drop * 100.0,
                        gates.warn_row_drop * 100.0,
                        gates.max_row_drop * 100.0
                    ),
                });
            }
        }
        if source.nightly {
            let loaded = rows(|t| t.files_new);
            results.push(GateResult {
                gate: "delivery".into(),
                source: name.clone(),
                outcome: if loaded == 0 {
                    GateOutcome::Fail
                } else {
                    GateOutcome::Pass
                },
                value: None,
                message: format!(
                    "source '{name}' is expected nightly: {loaded} file(s) new or changed since the last published run"
                ),
            });
        }
    }
    results
}

fn grade(value: f64, warn: f64, fail: f64) -> GateOutcome {
    if value > fail {
        GateOutcome::Fail
    } else if value > warn {
        GateOutcome::Warn
    } else {
        GateOutcome::Pass
    }
}
