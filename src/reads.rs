//! Which data a stage command reads: the current published run, the
//! working copy, or unlinked staging — decided once, named in the
//! command's first line of output, and never a silent fallback.
//!
//! `ward run` writes its linked core only inside `runs/<run_id>/`; the stage
//! commands `ward link` and `ward deid` work on the *working copy* at the
//! warehouse root. A command that measured whatever it found first would,
//! after a nightly run, measure staging (a person per provider record) and
//! report different numbers than the published run without a word.

use std::path::{Path, PathBuf};

use crate::error::{Result, WardError};
use crate::warehouse::Warehouse;

/// The data state a command reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataState {
    /// The linked core tables of the current published run.
    Published { run_id: String, dir: PathBuf },
    /// The linked core tables of the working copy (`core/` at the warehouse
    /// root, written by `ward link`), with the UTC time they were built in
    /// the run-id format (`20261125T063000Z`).
    WorkingCopy { built: String },
    /// Staging, unlinked: every provider record is its own person.
    Unlinked,
}

/// What the user asked to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// The published run when there is one, else the working copy.
    #[default]
    Default,
    /// The working copy, even when a run is published.
    WorkingCopy,
    /// Unlinked staging.
    Unlinked,
}

impl DataState {
    /// One line for the command's output.
    pub fn describe(&self) -> String {
        match self {
            DataState::Published { run_id, dir } => format!(
                "published run {run_id} (linked core tables in {})",
                dir.join("core").display()
            ),
            DataState::WorkingCopy { built } => {
                format!("working copy (linked core tables built {built} by `ward link`)")
            }
            DataState::Unlinked => "staging, UNLINKED: every provider record counts as its own \
                                    person, so counts differ from a linked run"
                .into(),
        }
    }

    /// The warehouse as a reader of this state: its core tables are read
    /// from the run directory, the working copy, or not at all.
    pub fn reader(&self, root: &Path) -> Warehouse {
        let wh = Warehouse::new(root);
        match self {
            DataState::Published { dir, .. } => wh.with_output(dir),
            DataState::WorkingCopy { .. } => wh,
            DataState::Unlinked => wh.unlinked(),
        }
    }
}

/// The working copy's build time (`core/person.parquet`'s modification
/// time, UTC, run-id format), when it has linked core tables.
pub fn working_copy_built(root: &Path) -> Option<String> {
    let modified = std::fs::metadata(root.join("core").join("person.parquet"))
        .and_then(|m| m.modified())
        .ok()?;
    Some(
        chrono::DateTime::<chrono::Utc>::from(modified)
            .format("%Y%m%dT%H%M%SZ")
            .to_string(),
    )
}

/// Decides which data a command reads under `choice`. Returns the state and
/// the warnings to print with it (a working copy older than the published
/// run). Fails when nothing linked exists and unlinked data was not asked
/// for: the caller must choose staging explicitly.
pub fn resolve(root: &Path, choice: Choice) -> Result<(DataState, Vec<String>)> {
    let published = crate::runs::current(root)?;
    let working = working_copy_built(root);
    let refuse = |message: String| WardError::Usage { message };
    let state = match choice {
        Choice::Unlinked => DataState::Unlinked,
        Choice::WorkingCopy => match &working {
            Some(built) => DataState::WorkingCopy {
                built: built.clone(),
            },
            None => {
                return Err(refuse(format!(
                    "the working copy of {} has no linked core tables: run `ward link` first",
                    root.display()
                )));
            }
        },
        Choice::Default => match (&published, &working) {
            (Some(run_id), _) => DataState::Published {
                run_id: run_id.clone(),
                dir: crate::runs::runs_dir(root).join(run_id),
            },
            (None, Some(built)) => DataState::WorkingCopy {
                built: built.clone(),
            },
            (None, None) => {
                return Err(refuse(format!(
                    "{} has no published run and no linked working copy: run `ward run` (or \
                     `ward link`) first, or pass --unlinked to measure staging, where every \
                     provider record counts as its own person",
                    root.display()
                )));
            }
        },
    };
    let mut warnings = Vec::new();
    if let (DataState::WorkingCopy { built }, Some(run_id)) = (&state, &published)
        && built.as_str() < run_id.as_str()
    {
        warnings.push(format!(
            "the working copy (built {built}) is older than the published run {run_id}: \
             it does not hold what that run loaded since"
        ));
    }
    Ok((state, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_linked_is_refused_unless_unlinked_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(dir.path(), Choice::Default).unwrap_err();
        assert!(e.to_string().contains("--unlinked"), "{e}");
        assert!(resolve(dir.path(), Choice::WorkingCopy).is_err());
        let (state, warnings) = resolve(dir.path(), Choice::Unlinked).unwrap();
        assert_eq!(state, DataState::Unlinked);
        assert!(warnings.is_empty());
        assert!(state.describe().contains("UNLINKED"));
    }

    #[test]
    fn the_published_run_comes_first_and_a_stale_working_copy_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("core")).unwrap();
        std::fs::write(root.join("core/person.parquet"), b"x").unwrap();
        let (state, _) = resolve(root, Choice::Default).unwrap();
        assert!(matches!(state, DataState::WorkingCopy { .. }), "{state:?}");

        std::fs::create_dir_all(root.join("runs")).unwrap();
        std::fs::write(root.join("runs/CURRENT"), "29991231T000000Z").unwrap();
        let (state, warnings) = resolve(root, Choice::Default).unwrap();
        assert_eq!(
            state,
            DataState::Published {
                run_id: "29991231T000000Z".into(),
                dir: root.join("runs/29991231T000000Z"),
            }
        );
        assert!(warnings.is_empty());
        assert_eq!(state.reader(root).out(), root.join("runs/29991231T000000Z"));
        let (state, warnings) = resolve(root, Choice::WorkingCopy).unwrap();
        assert!(matches!(state, DataState::WorkingCopy { .. }));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("29991231T000000Z"), "{}", warnings[0]);
    }
}
