//! The library's one error type. Every variant carries the file, line, key,
//! column or source it concerns, and never a field value from patient data.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = WardError> = std::result::Result<T, E>;

/// Any error kept as the cause of a [`WardError::Data`]; a `String` turns
/// into one with `.into()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in Ward, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum WardError {
    /// A configuration or mapping file is malformed or holds a bad value.
    /// `line` and `column` are 1-based when known.
    #[error("{}: {message}", location(path, *line, *column, key.as_deref()))]
    Config {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        key: Option<String>,
        message: String,
    },

    /// A source's path or glob matched no file.
    #[error("source '{source_name}': no input file matches '{pattern}'")]
    NoInput {
        source_name: String,
        pattern: String,
    },

    /// An extract cannot be read as a whole (as opposed to a bad row, which
    /// becomes a reject): empty file, mapping naming a missing column, ...
    #[error("{}: {message}", location(path, *line, None, None))]
    Extract {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },

    /// An I/O operation on a file or directory failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing or reading Parquet / Arrow data failed.
    #[error("{context}{}: {source}", in_path(path))]
    Data {
        context: &'static str,
        path: PathBuf,
        /// The cause: the engine's, Arrow's or Parquet's error as it was
        /// (`std::error::Error::source` walks on from it), or Ward's own
        /// message.
        source: BoxError,
    },

    /// Another process holds the warehouse lock.
    #[error("the warehouse is locked by {holder} ({}); wait for it to finish", path.display())]
    Locked { path: PathBuf, holder: String },

    /// A data-quality gate failed: the run's outputs were not published.
    #[error("data-quality gate failed, run {run_id} not published: {}", failures.join("; "))]
    GateFailed {
        run_id: String,
        failures: Vec<String>,
    },
    /// A research query (`ward query`) was refused — not one read-only
    /// SELECT over the research tables — or is not valid SQL. Nothing ran.
    #[error("{}: {message}", if *refused { "query refused" } else { "invalid query" })]
    Query { refused: bool, message: String },

    /// A command cannot do what it was asked as asked: a flag combination,
    /// or data it would read that is not there (exit code 2).
    #[error("{message}")]
    Usage { message: String },

    /// The warehouse state (manifest) is unreadable or inconsistent.
    #[error("warehouse state {}: {message}", path.display())]
    State { path: PathBuf, message: String },
}

impl WardError {
    /// Shorthand for an [`WardError::Io`] error.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WardError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A [`WardError::Data`] about `path`, keeping `source` as its cause.
    pub fn data(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<BoxError>,
    ) -> Self {
        WardError::Data {
            context,
            path: path.into(),
            source: source.into(),
        }
    }

    /// Whether this is a usage/configuration problem (exit code 2) rather than
    /// a failure while running (exit code 3); a refused or invalid research
    /// query is one.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            WardError::Config { .. } | WardError::Query { .. } | WardError::Usage { .. }
        )
    }
}

/// ` (path)`, or nothing for an error about no file in particular.
fn in_path(path: &std::path::Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" ({})", path.display())
    }
}

fn location(
    path: &std::path::Path,
    line: Option<impl std::fmt::Display>,
    column: Option<usize>,
    key: Option<&str>,
) -> String {
    let mut s = path.display().to_string();
    if let Some(line) = line {
        s.push_str(&format!(":{line}"));
        if let Some(column) = column {
            s.push_str(&format!(":{column}"));
        }
    }
    if let Some(key) = key {
        s.push_str(&format!(" (key '{key}')"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_error_names_file_line_and_key() {
        let e = WardError::Config {
            path: "ward.toml".into(),
            line: Some(3),
            column: Some(1),
            key: Some("sources.format".into()),
            message: "unknown variant".into(),
        };
        assert_eq!(
            e.to_string(),
            "ward.toml:3:1 (key 'sources.format'): unknown variant"
        );
        assert!(e.is_config_error());
    }
}
