//! Reading a delimited extract into text columns.
//!
//! Two passes over the bytes. A structural pass with the `csv` crate finds
//! every record's line number and quarantines records that cannot be trusted
//! (wrong number of fields, a truncated last line, bytes that are not UTF-8):
//! these become rejects. The records that pass are handed to Polars'
//! multi-threaded CSV reader with every column read as text; casting happens
//! later, per column, with the mapping's formats. Polars alone cannot report
//! source line numbers (quoted newlines make rows and lines differ) nor turn a
//! ragged row into a reject instead of failing the whole file.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use polars::prelude::*;

use crate::error::{Result, WardError};
use crate::mapping::{CsvMapping, Encoding};

/// A record refused before mapping, with the reason.
#[derive(Debug, Clone)]
pub struct StructuralReject {
    pub line: u64,
    pub rule: &'static str,
    pub message: String,
    /// The record as text (invalid bytes replaced).
    pub raw: String,
}

/// An extract read as text: the header, the well-formed records as a Polars
/// frame of `String` columns (one per header field, in header order), and
/// the line number each of them started on.
#[derive(Debug)]
pub struct TextTable {
    pub header: Vec<String>,
    pub frame: DataFrame,
    pub lines: Vec<u64>,
    pub rejects: Vec<StructuralReject>,
}

impl TextTable {
    /// Data records found in the file (well-formed or not).
    pub fn records(&self) -> u64 {
        (self.lines.len() + self.rejects.len()) as u64
    }

    /// Every column as a vector of cells (`None` when empty), for fast
    /// random access while mapping.
    pub fn text_columns(&self) -> Vec<Vec<Option<&str>>> {
        self.frame
            .columns()
            .iter()
            .map(|c| match c.str() {
                Ok(ca) => ca
                    .iter()
                    .map(|v| v.filter(|s| !s.trim().is_empty()))
                    .collect(),
                Err(_) => vec![None; self.frame.height()],
            })
            .collect()
    }

    /// The text of column `col` at row `row` (`None` when empty).
    #[cfg(test)]
    pub fn cell(&self, col: usize, row: usize) -> Option<&str> {
        self.frame.columns()[col]
            .str()
            .ok()
            .and_then(|c| c.get(row))
            .filter(|s| !s.trim().is_empty())
    }
}

/// Reads one extract. `path` is used in error messages only.
pub fn read(path: &Path, bytes: &[u8], mapping: &CsvMapping) -> Result<TextTable> {
    let err = |line: Option<u64>, message: String| WardError::Extract {
        path: path.to_path_buf(),
        line,
        message,
    };
    let decoded;
    let bytes: &[u8] = match mapping.encoding {
        Encoding::Utf8 => bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes),
        Encoding::Latin1 => {
            decoded = bytes.iter().map(|&b| b as char).collect::<String>();
            decoded.as_bytes()
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(err(None, "file is empty: no header line".into()));
    }

    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(mapping.delimiter)
        .quote(mapping.quote)
        .from_reader(bytes);
    let mut record = csv::ByteRecord::new();
    let read_record = |reader: &mut csv::Reader<&[u8]>, record: &mut csv::ByteRecord| {
        reader.read_byte_record(record).map_err(|e| {
            err(
                e.position().map(|p| p.line()),
                format!("unreadable CSV: {e}"),
            )
        })
    };

    if !read_record(&mut reader, &mut record)? {
        return Err(err(None, "file is empty: no header line".into()));
    }
    let header_line = record.position().map_or(1, |p| p.line());
    let mut header = Vec::with_capacity(record.len());
    for field in record.iter() {
        let name = std::str::from_utf8(field)
            .map_err(|_| err(Some(header_line), "header is not valid UTF-8".into()))?
            .trim()
            .to_string();
        if header.contains(&name) {
            return Err(err(
                Some(header_line),
                format!("duplicate column '{name}' in header"),
            ));
        }
        header.push(name);
    }
    let width = header.len();

    let ends_with_newline = bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r');
    let mut clean = Vec::with_capacity(bytes.len());
    let mut lines = Vec::new();
    let mut rejects = Vec::new();
    while read_record(&mut reader, &mut record)? {
        let pos = record
            .position()
            .expect("records read from a reader have a position");
        let (mut line, start) = (pos.line(), pos.byte() as usize);
        let end = (reader.position().byte() as usize).min(bytes.len());
        let raw = &bytes[start..end];
        // After a CRLF the reader positions the next record on the LF.
        line += raw
            .iter()
            .take_while(|b| matches!(b, b'\n' | b'\r'))
            .filter(|b| **b == b'\n')
            .count() as u64;
        let is_last = end >= bytes.len();
        let reject = |rule: &'static str, message: String| StructuralReject {
            line,
            rule,
            message,
            raw: String::from_utf8_lossy(trim_terminator(raw)).into_owned(),
        };
        if record.len() != width {
            let (rule, what) = if is_last && !ends_with_newline && record.len() < width {
                ("truncated_record", "last line is cut short: ")
            } else {
                ("wrong_field_count", "")
            };
            rejects.push(reject(
                rule,
                format!("{what}expected {width} fields, found {}", record.len()),
            ));
            continue;
        }
        if let Some(i) = record.iter().position(|f| std::str::from_utf8(f).is_err()) {
            rejects.push(StructuralReject {
                message: format!("column '{}' holds bytes that are not UTF-8", header[i]),
                ..reject("invalid_utf8", String::new())
            });
            continue;
        }
        clean.extend_from_slice(trim_terminator(raw));
        clean.push(b'\n');
        lines.push(line);
    }

    let frame = parse_text_columns(&clean, width, mapping)
        .map_err(|e| err(None, format!("CSV parser: {e}")))?;
    if frame.height() != lines.len() {
        return Err(err(
            None,
            format!(
                "CSV parser disagreement: {} records found, {} parsed",
                lines.len(),
                frame.height()
            ),
        ));
    }
    Ok(TextTable {
        header,
        frame,
        lines,
        rejects,
    })
}

/// A record's bytes without line terminators around it.
fn trim_terminator(raw: &[u8]) -> &[u8] {
    let mut r = raw;
    while let [b'\n' | b'\r', rest @ ..] = r {
        r = rest;
    }
    while let [rest @ .., b'\n' | b'\r'] = r {
        r = rest;
    }
    r
}

/// Parses headerless, well-formed CSV into `width` String columns.
fn parse_text_columns(clean: &[u8], width: usize, mapping: &CsvMapping) -> PolarsResult<DataFrame> {
    let schema: Schema = (0..width)
        .map(|i| Field::new(format!("c{i}").into(), DataType::String))
        .collect();
    if clean.is_empty() {
        return Ok(DataFrame::empty_with_schema(&schema));
    }
    let parse = CsvParseOptions::default()
        .with_separator(mapping.delimiter)
        .with_quote_char(Some(mapping.quote));
    CsvReadOptions::default()
        .with_has_header(false)
        .with_schema(Some(Arc::new(schema)))
        .with_parse_options(parse)
        .with_rechunk(true)
        .with_raise_if_empty(false)
        .into_reader_with_file_handle(Cursor::new(clean))
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(encoding: Encoding) -> CsvMapping {
        CsvMapping {
            path: "m.toml".into(),
            hash: String::new(),
            delimiter: b',',
            quote: b'"',
            encoding,
            files: vec![],
        }
    }

    fn read_str(bytes: &[u8]) -> Result<TextTable> {
        read(Path::new("f.csv"), bytes, &mapping(Encoding::Utf8))
    }

    #[test]
    fn bom_crlf_and_quoted_newlines() {
        let t = read_str(b"\xEF\xBB\xBFid,note\r\n1,\"two\r\nlines\"\r\n2,plain\r\n").unwrap();
        assert_eq!(t.header, ["id", "note"]);
        assert_eq!(t.lines, [2, 4]);
        assert_eq!(t.cell(1, 0), Some("two\r\nlines"));
        assert_eq!(t.cell(1, 1), Some("plain"));
        assert_eq!(t.records(), 2);
    }

    #[test]
    fn ragged_truncated_and_invalid_utf8_rows_are_quarantined() {
        let t = read_str(b"a,b,c\n1,2,3\n1,2,3,4\n1,\xff,3\n1,2\n4,5,6\n7,8").unwrap();
        assert_eq!(t.lines, [2, 6]);
        let rules: Vec<_> = t.rejects.iter().map(|r| (r.line, r.rule)).collect();
        assert_eq!(
            rules,
            [
                (3, "wrong_field_count"),
                (4, "invalid_utf8"),
                (5, "wrong_field_count"),
                (7, "truncated_record")
            ]
        );
        assert_eq!(t.rejects[0].raw, "1,2,3,4");
        assert!(t.rejects[1].message.contains("'b'"));
        assert_eq!(t.records(), 6);
    }

    #[test]
    fn empty_and_header_only_files() {
        let e = read_str(b"").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = read_str(b"\xEF\xBB\xBF\n").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let t = read_str(b"a,b\n").unwrap();
        assert_eq!(t.records(), 0);
        assert_eq!(t.frame.width(), 2);
    }

    #[test]
    fn duplicate_header_is_an_error() {
        let e = read_str(b"a,a\n1,2\n").unwrap_err();
        assert!(e.to_string().contains("duplicate column 'a'"), "{e}");
    }

    #[test]
    fn latin1_is_decoded() {
        let t = read(
            Path::new("f.csv"),
            b"name\nJos\xe9\n",
            &mapping(Encoding::Latin1),
        )
        .unwrap();
        assert_eq!(t.cell(0, 0), Some("José"));
    }

    #[test]
    fn empty_cells_are_none() {
        let t = read_str(b"a,b\n1,\n, \n").unwrap();
        assert_eq!(t.cell(1, 0), None);
        assert_eq!(t.cell(0, 1), None);
        assert_eq!(t.cell(1, 1), None);
    }
}
