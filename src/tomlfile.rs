//! Reading Ward's TOML files (the pipeline config, source mappings, measure
//! definitions): every parse, type or semantic error is a
//! [`WardError::Config`] naming the file, line, column and key.

use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Result, WardError};

/// Reads a TOML file into `T`, turning parse and type errors into
/// [`WardError::Config`] with line, column and key. Returns the text as well,
/// so callers can locate semantic errors found later.
pub(crate) fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<(T, String)> {
    let bytes = std::fs::read(path).map_err(|e| WardError::Config {
        path: path.to_path_buf(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| WardError::Config {
        path: path.to_path_buf(),
        line: None,
        column: None,
        key: None,
        message: format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
    })?;
    match toml::from_str::<T>(&text) {
        Ok(v) => Ok((v, text)),
        Err(e) => {
            let key = e.span().and_then(|s| key_at(&text, s));
            Err(config_error(
                path,
                &text,
                e.span(),
                key.as_deref(),
                e.message().trim().to_string(),
            ))
        }
    }
}

/// Builds a config error located at `span` (a byte range of `text`).
pub(crate) fn config_error(
    path: &Path,
    text: &str,
    span: Option<Range<usize>>,
    key: Option<&str>,
    message: String,
) -> WardError {
    let (line, column) = match span {
        Some(s) => {
            let (l, c) = line_col(text, s.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    WardError::Config {
        path: path.to_path_buf(),
        line,
        column,
        key: key.map(str::to_string),
        message,
    }
}

/// A config error about a whole file (no line or key to point at).
pub(crate) fn file_error(path: &Path, message: String) -> WardError {
    WardError::Config {
        path: path.to_path_buf(),
        line: None,
        column: None,
        key: None,
        message,
    }
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - line_start + 1)
}

/// The bare key that a span points at, if it points at one.
fn key_at(text: &str, span: Range<usize>) -> Option<String> {
    let s = text.get(span)?.trim().trim_matches('"');
    let is_key = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    is_key.then(|| s.to_string())
}
