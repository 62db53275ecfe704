//! A source: one provider's extract as the config declares it (name,
//! format, files, mapping), and the files its pattern matches.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, WardError};

/// A path a source's glob matched but that is not read, with the reason.
pub type IgnoredPath = (PathBuf, &'static str);

/// The formats a source can be delivered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// Delimited text in the provider's own layout, described by a mapping.
    Csv,
    /// FHIR R4 bulk export: `<Type>*.ndjson`, one resource per line.
    FhirNdjson,
    /// FHIR R4 Bundles (transaction, collection, searchset), one per `.json` file.
    FhirBundle,
}

/// One provider's extract.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Provider name: lowercase letters, digits, `_` and `-`; used in paths.
    pub name: String,
    pub format: SourceFormat,
    /// Absolute glob of the input files (a directory means every file in it).
    pub pattern: String,
    /// Absolute path of the mapping file (CSV sources only).
    pub mapping: Option<PathBuf>,
    /// The source delivers every night: a run that loads no new or changed
    /// file of it fails its delivery gate (`nightly = true`).
    pub nightly: bool,
}

impl SourceConfig {
    /// The input files of this source, sorted; an error when none match.
    ///
    /// A path the glob matched is ignored, with its reason in `ignored`,
    /// when it is not a regular file (a FIFO, a device, a dangling link), when
    /// it is reached through a directory symlink (a symlink cycle under `**`
    /// would load the same files again, 40 levels deep), or when it resolves
    /// outside the source's directory (the fixed part of its pattern).
    pub fn input_files(&self) -> Result<(Vec<PathBuf>, Vec<IgnoredPath>)> {
        let paths = glob::glob(&self.pattern).map_err(|e| WardError::NoInput {
            source_name: self.name.clone(),
            pattern: format!("{} ({e})", self.pattern),
        })?;
        let base = self.base_dir();
        let real_base = base.canonicalize().unwrap_or_else(|_| base.clone());
        let mut files = Vec::new();
        let mut ignored = Vec::new();
        for entry in paths {
            let path = match entry {
                Ok(p) => p,
                // Unreadable (a symlink loop, permissions): said, not fatal.
                Err(e) => {
                    ignored.push((e.path().to_path_buf(), "unreadable"));
                    continue;
                }
            };
            let through_link = path
                .strip_prefix(&base)
                .ok()
                .and_then(Path::parent)
                .is_some_and(|rel| {
                    rel.ancestors()
                        .filter(|a| !a.as_os_str().is_empty())
                        .any(|a| base.join(a).is_symlink())
                });
            let reason = if through_link {
                Some("reached through a directory symlink")
            } else if !path.is_file() {
                Some("not a regular file")
            } else if !path
                .canonicalize()
                .is_ok_and(|real| real.starts_with(&real_base))
            {
                Some("outside the source's directory")
            } else {
                None
            };
            match reason {
                Some(reason) => ignored.push((path, reason)),
                None => files.push(path),
            }
        }
        files.sort();
        ignored.sort();
        if files.is_empty() {
            return Err(WardError::NoInput {
                source_name: self.name.clone(),
                pattern: self.pattern.clone(),
            });
        }
        Ok((files, ignored))
    }

    /// The fixed (glob-free) directory part of the pattern.
    pub fn base_dir(&self) -> PathBuf {
        let base: PathBuf = Path::new(&self.pattern)
            .components()
            .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
            .collect();
        if base == Path::new(&self.pattern) {
            base.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            base
        }
    }
}
