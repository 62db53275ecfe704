//! Reading a delimited extract into text columns.
//!
//! One pass over the bytes with the `csv` crate finds every record's line
//! number, quarantines records that cannot be trusted (wrong number of
//! fields, a truncated last line, bytes that are not UTF-8, a quote that
//! never closes) as rejects, and appends the cells of the others to one
//! Arrow string column per header field; casting happens later, per column,
//! with the mapping's formats. A quote left open swallows the lines after
//! it: such a record is refused as `malformed_record` for its first line
//! only, and reading resumes on the next line, so one stray quote costs one
//! record, never the file.

use std::borrow::Cow;
use std::path::Path;

use datafusion::arrow::array::{Array, StringArray, StringBuilder};

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

/// An extract read as text: the header, the well-formed records as one
/// string column per header field (in header order), and the line number
/// each of them started on.
#[derive(Debug)]
pub struct TextTable {
    pub header: Vec<String>,
    /// One column per header field; empty and blank cells are null.
    pub columns: Vec<StringArray>,
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
        self.columns.iter().map(|c| c.iter().collect()).collect()
    }

    /// The text of column `col` at row `row` (`None` when empty).
    pub fn cell(&self, col: usize, row: usize) -> Option<&str> {
        let c = self.columns.get(col)?;
        (row < c.len() && c.is_valid(row)).then(|| c.value(row))
    }
}

/// Reads one extract. `path` is used in error messages only, which name
/// lines and column positions, never cell values.
pub fn read(path: &Path, bytes: &[u8], mapping: &CsvMapping) -> Result<TextTable> {
    let err = |line: Option<u64>, message: String| WardError::Extract {
        path: path.to_path_buf(),
        line,
        message,
    };
    let decoded = decode(bytes, mapping.encoding);
    let bytes: &[u8] = &decoded;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(err(None, "file is empty: no header line".into()));
    }

    let mut builder = csv::ReaderBuilder::new();
    builder
        .has_headers(false)
        .flexible(true)
        .delimiter(mapping.delimiter)
        .quote(mapping.quote);
    let mut reader = builder.from_reader(bytes);
    let mut record = csv::ByteRecord::new();
    // Reading bytes from memory cannot fail: the reader's only errors are
    // I/O and UTF-8 errors of string records.
    let read_record = |reader: &mut csv::Reader<&[u8]>, record: &mut csv::ByteRecord| {
        reader.read_byte_record(record).map_err(|e| {
            err(
                e.position().map(|p| p.line()),
                "unreadable CSV record".into(),
            )
        })
    };

    if !read_record(&mut reader, &mut record)? {
        return Err(err(None, "file is empty: no header line".into()));
    }
    let header = read_header(&record, &err)?;
    let width = header.len();

    let ends_with_newline = bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r');
    let mut columns: Vec<StringBuilder> = (0..width)
        .map(|_| StringBuilder::with_capacity(1024, 16 * 1024))
        .collect();
    let mut lines = Vec::new();
    let mut rejects = Vec::new();
    // Where the current reader starts: byte offset and line number before it.
    let (mut base_byte, mut base_line) = (0usize, 0u64);
    while read_record(&mut reader, &mut record)? {
        let Span {
            start,
            end,
            leading,
            line,
        } = locate(&record, &reader, (base_byte, base_line), bytes);
        let body = trim_terminator(&bytes[start..end]);
        let is_last = end >= bytes.len();
        // A quoted field still open at the end of the file.
        let unclosed = is_last
            && opens_quote(body, mapping)
            && body.iter().filter(|b| **b == mapping.quote).count() % 2 == 1;
        if record.len() != width || unclosed {
            let shape = Shape {
                fields: record.len(),
                width,
                unclosed,
                cut_short: is_last && !ends_with_newline,
            };
            let (reject, resume_after) = misshapen(line, body, shape, mapping);
            rejects.push(reject);
            if let Some(eol) = resume_after {
                base_byte = start + leading + eol + 1;
                base_line = line;
                reader = builder.from_reader(&bytes[base_byte..]);
            }
            continue;
        }
        if let Some(i) = record.iter().position(|f| std::str::from_utf8(f).is_err()) {
            rejects.push(StructuralReject {
                line,
                rule: "invalid_utf8",
                message: format!("column '{}' holds bytes that are not UTF-8", header[i]),
                raw: String::from_utf8_lossy(body).into_owned(),
            });
            continue;
        }
        for (column, field) in columns.iter_mut().zip(record.iter()) {
            match std::str::from_utf8(field) {
                Ok(v) if !v.trim().is_empty() => column.append_value(v),
                _ => column.append_null(),
            }
        }
        lines.push(line);
    }

    Ok(TextTable {
        header,
        columns: columns.iter_mut().map(StringBuilder::finish).collect(),
        lines,
        rejects,
    })
}

/// Where a record sits in the file.
struct Span {
    /// Its bytes, line terminators around it included.
    start: usize,
    end: usize,
    /// Line terminators before it: after a CRLF the reader positions the
    /// next record on the LF.
    leading: usize,
    /// The line it starts on.
    line: u64,
}

/// Where the record just read sits, for a reader started at `base` (byte
/// offset, and line number before it) in `bytes`.
fn locate(
    record: &csv::ByteRecord,
    reader: &csv::Reader<&[u8]>,
    (base_byte, base_line): (usize, u64),
    bytes: &[u8],
) -> Span {
    let pos = record
        .position()
        .expect("records read from a reader have a position");
    let start = base_byte + pos.byte() as usize;
    let end = (base_byte + reader.position().byte() as usize).min(bytes.len());
    let raw = &bytes[start..end];
    let leading = raw
        .iter()
        .take_while(|b| matches!(b, b'\n' | b'\r'))
        .count();
    let line =
        base_line + pos.line() + raw[..leading].iter().filter(|b| **b == b'\n').count() as u64;
    Span {
        start,
        end,
        leading,
        line,
    }
}

/// The file's bytes as UTF-8: without a UTF-8 byte order mark, or decoded
/// from Latin-1.
fn decode(bytes: &[u8], encoding: Encoding) -> Cow<'_, [u8]> {
    match encoding {
        Encoding::Utf8 => Cow::Borrowed(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)),
        Encoding::Latin1 => Cow::Owned(
            bytes
                .iter()
                .map(|&b| b as char)
                .collect::<String>()
                .into_bytes(),
        ),
    }
}

/// The header record's field names, trimmed; refused when not UTF-8 or
/// when two fields share a name (likely a data line, not a header).
fn read_header(
    record: &csv::ByteRecord,
    err: &impl Fn(Option<u64>, String) -> WardError,
) -> Result<Vec<String>> {
    let header_line = record.position().map_or(1, |p| p.line());
    let mut header: Vec<String> = Vec::with_capacity(record.len());
    for (i, field) in record.iter().enumerate() {
        let name = std::str::from_utf8(field)
            .map_err(|_| err(Some(header_line), "header is not valid UTF-8".into()))?
            .trim()
            .to_string();
        if let Some(first) = header.iter().position(|h| *h == name) {
            return Err(err(
                Some(header_line),
                format!(
                    "header fields {} and {} have the same name (is the first line a header?)",
                    first + 1,
                    i + 1
                ),
            ));
        }
        header.push(name);
    }
    Ok(header)
}

/// How a record without the header's shape is wrong.
#[derive(Clone, Copy)]
struct Shape {
    /// Fields found, and expected (the header's).
    fields: usize,
    width: usize,
    /// A quoted field is still open at the end of the file.
    unclosed: bool,
    /// The record is the file's last and has no line end.
    cut_short: bool,
}

/// The reject of a record without the header's shape, and, when a quote
/// opened on its first line ran past that line, the offset in `body` of the
/// line's end: the record is refused for that line alone and reading
/// resumes after it.
fn misshapen(
    line: u64,
    body: &[u8],
    shape: Shape,
    mapping: &CsvMapping,
) -> (StructuralReject, Option<usize>) {
    let reject = |rule: &'static str, message: String| StructuralReject {
        line,
        rule,
        message,
        raw: String::from_utf8_lossy(body).into_owned(),
    };
    let eol = body.iter().position(|b| *b == b'\n');
    if let Some(eol) = eol
        && opens_quote(&body[..eol], mapping)
    {
        // A quote opened on this line and closed lines later (or never).
        let reject = StructuralReject {
            raw: String::from_utf8_lossy(trim_terminator(&body[..eol])).into_owned(),
            ..reject(
                "malformed_record",
                "unbalanced quote: the record runs past the end of its line; \
                 this line was refused and reading resumed on the next"
                    .into(),
            )
        };
        return (reject, Some(eol));
    }
    if shape.unclosed {
        let message = "unbalanced quote: a quoted field is still open at the end of the file";
        return (reject("malformed_record", message.into()), None);
    }
    let (rule, what) = if shape.cut_short && shape.fields < shape.width {
        ("truncated_record", "last line is cut short: ")
    } else {
        ("wrong_field_count", "")
    };
    let message = format!(
        "{what}expected {} fields, found {}",
        shape.width, shape.fields
    );
    (reject(rule, message), None)
}

/// Whether a line opens a quoted field: a quote at the start of a field.
fn opens_quote(line: &[u8], mapping: &CsvMapping) -> bool {
    line.iter()
        .enumerate()
        .any(|(i, b)| *b == mapping.quote && (i == 0 || line[i - 1] == mapping.delimiter))
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
        assert_eq!(t.columns.len(), 2);
    }

    #[test]
    fn duplicate_header_is_an_error() {
        let e = read_str(b"a,a\n1,2\n").unwrap_err();
        assert!(e.to_string().contains("header fields 1 and 2"), "{e}");
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
    fn a_stray_quote_costs_one_record_not_the_file() {
        // A quote inside an unquoted field is a character of the value.
        let t = read_str(b"id,code\n1,Hb\"A1c\n2,x\n").unwrap();
        assert_eq!(t.lines, [2, 3]);
        assert_eq!(t.cell(1, 0), Some("Hb\"A1c"));
        // A quoted field that never closes would swallow the rest of the
        // file: its line alone is refused and reading resumes on the next.
        let t = read_str(b"id,code,v\n1,\"abc,1\n2,def,2\n3,ghi,3\n").unwrap();
        assert_eq!(t.lines, [3, 4]);
        assert_eq!(t.cell(1, 0), Some("def"));
        assert_eq!(t.rejects.len(), 1);
        assert_eq!(
            (t.rejects[0].line, t.rejects[0].rule),
            (2, "malformed_record")
        );
        assert_eq!(t.rejects[0].raw, "1,\"abc,1");
        // With CRLF line ends; a quote still open at the end of the file.
        let t = read_str(b"a,b\r\n\"x,1\r\n3,4\r\n5,\"6\r\n").unwrap();
        assert_eq!(t.lines, [3]);
        let rules: Vec<_> = t.rejects.iter().map(|r| (r.line, r.rule)).collect();
        assert_eq!(rules, [(2, "malformed_record"), (4, "malformed_record")]);
        assert_eq!(t.records(), 3);
    }

    #[test]
    fn errors_name_positions_not_values() {
        // A file without a header: its first record is taken as the header.
        let e = read_str(b"Jane,Jane,123-45-6789\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("Jane") && !e.contains("6789"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any bytes: no panic, and every record is either a row or a reject.
        #[test]
        fn any_bytes_are_read_or_refused(body in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::Just(b'"'), proptest::prelude::Just(b','),
                proptest::prelude::Just(b'\n'), proptest::prelude::Just(b'\r'),
                proptest::prelude::Just(b'a'), proptest::prelude::any::<u8>(),
            ],
            0..300,
        )) {
            let mut bytes = b"a,b,c\n".to_vec();
            bytes.extend(&body);
            let t = read_str(&bytes).unwrap();
            proptest::prop_assert!(t.columns.iter().all(|c| c.len() == t.lines.len()));
            let last = 2 + bytes.iter().filter(|b| **b == b'\n').count() as u64;
            proptest::prop_assert!(t.lines.iter().chain(t.rejects.iter().map(|r| &r.line))
                .all(|l| (2..=last).contains(l)));
        }
    }

    #[test]
    fn empty_cells_are_none() {
        let t = read_str(b"a,b\n1,\n, \n").unwrap();
        assert_eq!(t.cell(1, 0), None);
        assert_eq!(t.cell(0, 1), None);
        assert_eq!(t.cell(1, 1), None);
    }
}
