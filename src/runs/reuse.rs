//! Incremental nights: a stage whose inputs are exactly those of the same
//! stage in the current published run takes that run's outputs instead of
//! recomputing them.
//!
//! Each stage's inputs are hashed into a [`Fingerprint`] recorded in the
//! manifest (`fingerprints`): the code (Ward's version and the executable
//! itself), the settings and files the stage reads, and the fingerprint of
//! the stage it builds on, so a change anywhere upstream recomputes every
//! stage after it. Equal fingerprints mean equal outputs, so the files are
//! hard-linked from the previous run's directory ([`adopt`]; copied where
//! the file system cannot link) and the run's manifest says which run they
//! came from. `ward run --full` recomputes everything.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Result, WardError};
use crate::warehouse::IngestState;

use super::manifest::OutputFile;

/// Whether a run may take unchanged stages' outputs from the current run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rebuild {
    /// Stages whose inputs did not change reuse the current run's outputs.
    #[default]
    Incremental,
    /// Every stage recomputes from staging (`ward run --full`); linkage
    /// keeps its model ([`crate::link::Earlier`]).
    Full,
    /// Every stage recomputes and the linkage model is fitted anew
    /// (`ward run --refit`).
    Refit,
}

/// A hash of everything one stage's outputs depend on, built part by part.
#[derive(Clone)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    /// A fingerprint started with the code's identity: Ward's version and
    /// the running executable's size and modification time (a rebuilt
    /// binary recomputes everything). `None` when the executable cannot be
    /// inspected: then nothing is reused.
    pub fn code() -> Option<Fingerprint> {
        let exe = std::env::current_exe().ok()?;
        let meta = std::fs::metadata(&exe).ok()?;
        let modified = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(
            Fingerprint(Sha256::new())
                .part("ward", env!("CARGO_PKG_VERSION"))
                .part("ingest version", crate::warehouse::INGEST_VERSION)
                .part("executable", (meta.len(), modified.as_nanos())),
        )
    }

    /// Adds a labelled part (its `Debug` form, which for Ward's settings
    /// spells out every field).
    pub fn part(mut self, label: &str, value: impl std::fmt::Debug) -> Fingerprint {
        let text = format!("{value:?}");
        for bytes in [label.as_bytes(), text.as_bytes()] {
            self.0.update((bytes.len() as u64).to_le_bytes());
            self.0.update(bytes);
        }
        self
    }

    /// Adds the staged files of `state` — every one, or with `table` those
    /// that wrote rows of that table (`staging/<table>/`): per source and
    /// file, its content and mapping hashes and the batch it became (a
    /// reload is a change).
    pub fn staged(self, state: &IngestState, table: Option<&str>) -> Fingerprint {
        let prefix = table.map(|t| format!("staging/{t}/"));
        let files: Vec<_> = state
            .sources
            .iter()
            .flat_map(|(source, files)| files.iter().map(move |(file, f)| (source, file, f)))
            .filter(|(_, _, f)| {
                prefix
                    .as_ref()
                    .is_none_or(|p| f.outputs.iter().any(|o| o.starts_with(p.as_str())))
            })
            .map(|(source, file, f)| {
                (
                    source,
                    file,
                    &f.sha256,
                    &f.mapping_sha256,
                    &f.patients_fingerprint,
                    &f.batch_id,
                    &f.outputs,
                )
            })
            .collect();
        self.part("staged", files)
    }

    /// Adds every file under `dir` (relative path and content), sorted; a
    /// missing directory adds nothing but its absence.
    pub fn tree(self, label: &str, dir: &Path) -> Result<Fingerprint> {
        if !dir.exists() {
            return Ok(self.part(label, "absent"));
        }
        let mut files = Vec::new();
        for path in super::publish::walk(dir)?.0 {
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            let (sha, _) = crate::warehouse::sha256_file(&path)?;
            files.push((rel, sha));
        }
        files.sort();
        Ok(self.part(label, files))
    }

    /// Adds one file's content (`None`: no file).
    pub fn file(self, label: &str, path: Option<&Path>) -> Result<Fingerprint> {
        let sha = match path {
            Some(p) => Some(crate::warehouse::sha256_file(p)?.0),
            None => None,
        };
        Ok(self.part(label, sha))
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// Takes the files that `outputs` (the manifest of the run in `from`)
/// lists under each of `paths` (files or directories relative to the run
/// directory) into `to`: hard-linked, or copied where the file system
/// refuses links. Each file must still have the size and SHA-256 the
/// manifest recorded ([`verify`]); one that does not (damaged, edited) is
/// an error, and the stage recomputes instead. Returns the number of files
/// taken.
pub fn adopt(from: &Path, to: &Path, paths: &[&str], outputs: &[OutputFile]) -> Result<usize> {
    let wanted = verify(from, paths, outputs)?;
    for output in &wanted {
        take(from, to, Path::new(&output.path))?;
    }
    Ok(wanted.len())
}

/// Takes the file `rel` (relative to the run directories) of the run in
/// `from` into `to` ([`link_or_copy`]), its directory made as needed;
/// unchecked: see [`adopt`].
pub fn take(from: &Path, to: &Path, rel: &Path) -> Result<()> {
    let dest = to.join(rel);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| WardError::io("cannot create", parent, e))?;
    }
    link_or_copy(&from.join(rel), &dest)
}

/// Hard-links `source` to `dest`, or copies it where the file system
/// refuses links. A file already at `dest` (perhaps another link to
/// `source`) is replaced, never written through.
pub fn link_or_copy(source: &Path, dest: &Path) -> Result<()> {
    match std::fs::remove_file(dest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(WardError::io("cannot replace", dest, e));
        }
        _ => {}
    }
    if std::fs::hard_link(source, dest).is_err() {
        std::fs::copy(source, dest).map_err(|e| WardError::io("cannot copy", source, e))?;
    }
    Ok(())
}

/// The files that `outputs` (the manifest of the run in `from`) lists
/// under each of `paths`, each checked (in parallel) to still have the size
/// and SHA-256 recorded; one that does not is an error naming it.
pub fn verify<'a>(
    from: &Path,
    paths: &[&str],
    outputs: &'a [OutputFile],
) -> Result<Vec<&'a OutputFile>> {
    use rayon::prelude::*;
    let wanted: Vec<&OutputFile> = outputs
        .iter()
        .filter(|o| {
            paths.iter().any(|p| {
                o.path == *p || (o.path.starts_with(p) && o.path[p.len()..].starts_with('/'))
            })
        })
        .collect();
    wanted
        .into_par_iter()
        .map(|output| {
            let source = from.join(&output.path);
            let (sha256, bytes) = crate::warehouse::sha256_file(&source)?;
            if (sha256.as_str(), bytes) != (output.sha256.as_str(), output.bytes) {
                return Err(WardError::State {
                    path: source,
                    message: "differs from what its run's manifest recorded".into(),
                });
            }
            Ok(output)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn output(dir: &Path, rel: &str) -> OutputFile {
        let (sha256, bytes) = crate::warehouse::sha256_file(&dir.join(rel)).unwrap();
        OutputFile {
            path: rel.to_string(),
            bytes,
            sha256,
        }
    }

    #[test]
    fn fingerprints_change_with_any_part_and_with_files_under_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.sql"), "SELECT 1").unwrap();
        let of = |threshold: f64| {
            Fingerprint::code()
                .unwrap()
                .part("threshold", threshold)
                .tree("queries", dir.path())
                .unwrap()
                .finish()
        };
        let before = of(0.9);
        assert_eq!(of(0.9), before);
        assert_ne!(of(0.91), before);
        fs::write(dir.path().join("a.sql"), "SELECT 2").unwrap();
        assert_ne!(of(0.9), before);
        // Parts are delimited: moving a byte between label and value counts.
        let code = Fingerprint::code().unwrap();
        assert_ne!(
            code.clone().part("ab", "c").finish(),
            code.part("a", "bc").finish()
        );
    }

    #[test]
    fn adopt_takes_listed_files_and_refuses_one_changed_since() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::create_dir_all(from.path().join("core/observation")).unwrap();
        fs::write(from.path().join("core/observation/part-0.parquet"), "rows").unwrap();
        fs::write(from.path().join("core/person.parquet"), "persons").unwrap();
        fs::write(from.path().join("manifest.json"), "{}").unwrap();
        let outputs = vec![
            output(from.path(), "core/observation/part-0.parquet"),
            output(from.path(), "core/person.parquet"),
        ];
        let taken = adopt(from.path(), to.path(), &["core/observation"], &outputs).unwrap();
        assert_eq!(taken, 1);
        assert_eq!(
            fs::read_to_string(to.path().join("core/observation/part-0.parquet")).unwrap(),
            "rows"
        );
        assert!(!to.path().join("core/person.parquet").exists());
        // "core/person" is not a prefix of "core/person.parquet"'s directory.
        assert_eq!(
            adopt(from.path(), to.path(), &["core/person"], &outputs).unwrap(),
            0
        );

        fs::write(from.path().join("core/person.parquet"), "edited").unwrap();
        let err = adopt(from.path(), to.path(), &["core/person.parquet"], &outputs).unwrap_err();
        assert!(
            err.to_string().contains("person.parquet")
                && err
                    .to_string()
                    .contains("differs from what its run's manifest recorded"),
            "{err}"
        );
    }
}
