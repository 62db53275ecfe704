//! Reading a delimited extract into text columns.
//!
//! One pass over the bytes with the `csv` crate, a slice of records at a
//! time ([`CsvReader`]), finds every record's line number, quarantines
//! records that cannot be trusted (wrong number of fields, a truncated last
//! line, bytes that are not UTF-8, a quote that never closes) as rejects,
//! marks exact duplicates of earlier records, and appends the cells of the
//! others to one Arrow string column per header field; casting happens
//! later, per column, with the mapping's formats. A quote left open
//! swallows the lines after it: such a record is refused as
//! `malformed_record` for its first line only, and reading resumes on the
//! next line, so one stray quote costs one record, never the file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::Path;

use datafusion::arrow::array::{Array, StringArray, StringBuilder};
use rayon::prelude::*;

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
    /// Per row, the line of an earlier row of the file with the same cells.
    pub duplicate_of: Vec<Option<u64>>,
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

    /// The records after line `line` (well-formed or not); `None` when
    /// there are none.
    pub fn after_line(self, line: u64) -> Option<TextTable> {
        let at = self.lines.partition_point(|l| *l <= line);
        let rejects: Vec<StructuralReject> =
            self.rejects.into_iter().filter(|r| r.line > line).collect();
        if at == self.lines.len() && rejects.is_empty() {
            return None;
        }
        let rows = self.lines.len() - at;
        Some(TextTable {
            header: self.header,
            columns: self.columns.iter().map(|c| c.slice(at, rows)).collect(),
            lines: self.lines[at..].to_vec(),
            duplicate_of: self.duplicate_of[at..].to_vec(),
            rejects,
        })
    }

    /// The text of column `col` at row `row` (`None` when empty).
    pub fn cell(&self, col: usize, row: usize) -> Option<&str> {
        let c = self.columns.get(col)?;
        (row < c.len() && c.is_valid(row)).then(|| c.value(row))
    }
}

/// Reads one extract whole (see [`CsvReader`]).
pub fn read(path: &Path, bytes: &[u8], mapping: &CsvMapping) -> Result<TextTable> {
    let decoded = decode(bytes, mapping.encoding);
    let mut reader = CsvReader::open(path, &decoded, mapping)?;
    Ok(reader
        .next_slice(usize::MAX)?
        .expect("the first slice is always returned"))
}

/// Reads an extract's records in slices, so that what is held besides the
/// file's bytes follows the slice, not the file. `path` is used in error
/// messages only, which name lines and column positions, never cell values.
///
/// Each slice's rows carry [`TextTable::duplicate_of`]: the line of an
/// earlier row of the file, in any slice, with the same cells. Rows are
/// hashed; a hash seen before is confirmed by reading the earlier record
/// again from the file's bytes and comparing its cells, so a hash collision
/// never marks a row.
pub struct CsvReader<'b> {
    path: &'b Path,
    bytes: &'b [u8],
    mapping: &'b CsvMapping,
    builder: csv::ReaderBuilder,
    reader: csv::Reader<&'b [u8]>,
    record: csv::ByteRecord,
    header: Vec<String>,
    ends_with_newline: bool,
    /// Where the current reader starts: byte offset and line number before it.
    base: (usize, u64),
    /// Whether a slice was returned.
    started: bool,
    /// Rows read so far by hash: the first row's line and byte offset.
    seen: HashMap<u64, (u64, usize), ahash::RandomState>,
    /// Rows whose hash was taken by a row with other cells.
    collided: HashMap<u64, Vec<(u64, usize)>>,
    hasher: ahash::RandomState,
}

impl<'b> CsvReader<'b> {
    /// Reads the header of `bytes` (already [`decode`]d).
    pub fn open(path: &'b Path, bytes: &'b [u8], mapping: &'b CsvMapping) -> Result<CsvReader<'b>> {
        let err = |line: Option<u64>, message: String| WardError::Extract {
            path: path.to_path_buf(),
            line,
            message,
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(err(None, "file is empty: no header line".into()));
        }
        let mut builder = csv::ReaderBuilder::new();
        builder
            .has_headers(false)
            .flexible(true)
            .delimiter(mapping.delimiter)
            .quote(mapping.quote);
        let mut reader = CsvReader {
            path,
            bytes,
            mapping,
            reader: builder.from_reader(bytes),
            builder,
            record: csv::ByteRecord::new(),
            header: Vec::new(),
            ends_with_newline: bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r'),
            base: (0, 0),
            started: false,
            seen: HashMap::default(),
            collided: HashMap::new(),
            hasher: ahash::RandomState::with_seeds(0x5741_5244, 1, 2, 3),
        };
        if !reader.read_record()? {
            return Err(err(None, "file is empty: no header line".into()));
        }
        reader.header = read_header(&reader.record, &err)?;
        Ok(reader)
    }

    /// The header's field names.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// Reads the next `max` records at most (well-formed or not); `None`
    /// at the end of the file. The first slice is returned even when the
    /// file has no record, so that a mapping is checked against the header.
    pub fn next_slice(&mut self, max: usize) -> Result<Option<TextTable>> {
        let width = self.header.len();
        let mut columns: Vec<StringBuilder> = (0..width)
            .map(|_| StringBuilder::with_capacity(1024, 16 * 1024))
            .collect();
        let (mut lines, mut starts, mut rejects) = (Vec::new(), Vec::new(), Vec::new());
        let bytes = self.bytes;
        while lines.len() + rejects.len() < max && self.read_record()? {
            let Span {
                start,
                end,
                leading,
                line,
            } = locate(&self.record, &self.reader, self.base, bytes);
            let body = trim_terminator(&bytes[start..end]);
            let is_last = end >= bytes.len();
            // A quoted field still open at the end of the file.
            let unclosed = is_last
                && opens_quote(body, self.mapping)
                && body.iter().filter(|b| **b == self.mapping.quote).count() % 2 == 1;
            if self.record.len() != width || unclosed {
                let shape = Shape {
                    fields: self.record.len(),
                    width,
                    unclosed,
                    cut_short: is_last && !self.ends_with_newline,
                };
                let (reject, resume_after) = misshapen(line, body, shape, self.mapping);
                rejects.push(reject);
                if let Some(eol) = resume_after {
                    self.base = (start + leading + eol + 1, line);
                    self.reader = self.builder.from_reader(&bytes[self.base.0..]);
                }
                continue;
            }
            // The record's fields are UTF-8 when their concatenation is and
            // every field starts and ends on a character: one check of the
            // whole record instead of one per field.
            let fields = self.record.as_slice();
            let text = std::str::from_utf8(fields).ok().filter(|text| {
                (0..self.record.len()).all(|i| {
                    self.record.range(i).is_some_and(|r| {
                        text.is_char_boundary(r.start) && text.is_char_boundary(r.end)
                    })
                })
            });
            let Some(text) = text else {
                let i = self
                    .record
                    .iter()
                    .position(|f| std::str::from_utf8(f).is_err())
                    .unwrap_or(0);
                rejects.push(StructuralReject {
                    line,
                    rule: "invalid_utf8",
                    message: format!("column '{}' holds bytes that are not UTF-8", self.header[i]),
                    raw: String::from_utf8_lossy(body).into_owned(),
                });
                continue;
            };
            for (i, column) in columns.iter_mut().enumerate() {
                let v = self.record.range(i).map_or("", |r| &text[r]);
                if v.trim().is_empty() {
                    column.append_null();
                } else {
                    column.append_value(v);
                }
            }
            lines.push(line);
            starts.push(start + leading);
        }
        if lines.is_empty() && rejects.is_empty() && self.started {
            return Ok(None);
        }
        self.started = true;
        let columns: Vec<StringArray> = columns.iter_mut().map(StringBuilder::finish).collect();
        let duplicate_of = self.duplicates(&columns, &lines, &starts);
        Ok(Some(TextTable {
            header: self.header.clone(),
            columns,
            lines,
            duplicate_of,
            rejects,
        }))
    }

    /// Reads the next record into `self.record`; `false` at the end.
    fn read_record(&mut self) -> Result<bool> {
        // Reading bytes from memory cannot fail: the reader's only errors
        // are I/O and UTF-8 errors of string records.
        self.reader
            .read_byte_record(&mut self.record)
            .map_err(|e| WardError::Extract {
                path: self.path.to_path_buf(),
                line: e.position().map(|p| p.line()),
                message: "unreadable CSV record".into(),
            })
    }

    /// For each row of a slice, the line of an earlier row of the file with
    /// the same cells (see [`CsvReader`]); registers the new rows.
    fn duplicates(
        &mut self,
        columns: &[StringArray],
        lines: &[u64],
        starts: &[usize],
    ) -> Vec<Option<u64>> {
        let cells = |row: usize| {
            columns
                .iter()
                .map(move |c| c.is_valid(row).then(|| c.value(row)))
        };
        let hashes: Vec<u64> = (0..lines.len())
            .into_par_iter()
            .map(|row| {
                let mut h = self.hasher.build_hasher();
                cells(row).for_each(|c| c.hash(&mut h));
                h.finish()
            })
            .collect();
        let (builder, bytes) = (&self.builder, self.bytes);
        let same = |row: usize, &(_, start): &(u64, usize)| {
            let earlier = cells_at(builder, bytes, start);
            earlier.len() == columns.len()
                && earlier
                    .iter()
                    .zip(cells(row))
                    .all(|(a, b)| a.as_deref() == b)
        };
        let mut out = Vec::with_capacity(lines.len());
        for (row, hash) in hashes.into_iter().enumerate() {
            let here = (lines[row], starts[row]);
            let first = match self.seen.entry(hash) {
                Entry::Vacant(v) => {
                    v.insert(here);
                    None
                }
                Entry::Occupied(o) if same(row, o.get()) => Some(o.get().0),
                Entry::Occupied(_) => {
                    let others = self.collided.entry(hash).or_default();
                    match others.iter().find(|o| same(row, o)) {
                        Some(o) => Some(o.0),
                        None => {
                            others.push(here);
                            None
                        }
                    }
                }
            };
            out.push(first);
        }
        out
    }
}

/// The cells of the well-formed record starting at byte `start` of `bytes`.
fn cells_at(builder: &csv::ReaderBuilder, bytes: &[u8], start: usize) -> Vec<Option<String>> {
    let mut record = csv::ByteRecord::new();
    // The record was read once already, so it reads again.
    let _ = builder
        .from_reader(&bytes[start..])
        .read_byte_record(&mut record);
    record.iter().map(|f| cell(f).map(str::to_string)).collect()
}

/// A field's text; `None` when empty or blank (or, for a record refused
/// as `invalid_utf8`, not UTF-8).
fn cell(field: &[u8]) -> Option<&str> {
    std::str::from_utf8(field)
        .ok()
        .filter(|v| !v.trim().is_empty())
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
pub fn decode(bytes: &[u8], encoding: Encoding) -> Cow<'_, [u8]> {
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
    fn a_character_split_by_a_delimiter_is_not_utf8() {
        // "é" is C3 A9: split by the comma, each field is invalid, though
        // the record's fields put together are not.
        let t = read_str(b"a,b\n\xC3,\xA9\nx,\xC3\xA9\n").unwrap();
        assert_eq!(t.lines, [3]);
        assert_eq!(t.cell(1, 0), Some("é"));
        let rejects: Vec<_> = t.rejects.iter().map(|r| (r.line, r.rule)).collect();
        assert_eq!(rejects, [(2, "invalid_utf8")]);
        assert!(t.rejects[0].message.contains("'a'"));
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
            // Reading in slices changes nothing.
            let whole = summary(std::slice::from_ref(&t));
            for size in [1, 2, 7] {
                proptest::prop_assert_eq!(&summary(&slices(&bytes, size)), &whole);
            }
        }
    }

    /// Every slice of `bytes` of `size` records, read to the end.
    fn slices(bytes: &[u8], size: usize) -> Vec<TextTable> {
        let m = mapping(Encoding::Utf8);
        let mut reader = CsvReader::open(Path::new("f.csv"), bytes, &m).unwrap();
        std::iter::from_fn(|| reader.next_slice(size).unwrap()).collect()
    }

    /// (line, cells, duplicate of) of every row and (line, rule) of every
    /// reject, over all slices.
    #[allow(clippy::type_complexity)]
    fn summary(
        tables: &[TextTable],
    ) -> (
        Vec<(u64, Vec<Option<String>>, Option<u64>)>,
        Vec<(u64, &'static str)>,
    ) {
        let rows = tables
            .iter()
            .flat_map(|t| {
                (0..t.lines.len()).map(move |r| {
                    let cells = (0..t.columns.len()).map(|c| t.cell(c, r).map(str::to_string));
                    (t.lines[r], cells.collect(), t.duplicate_of[r])
                })
            })
            .collect();
        let rejects = tables
            .iter()
            .flat_map(|t| t.rejects.iter().map(|r| (r.line, r.rule)))
            .collect();
        (rows, rejects)
    }

    #[test]
    fn duplicates_are_found_across_slices_by_their_cells() {
        // Line 5 repeats line 2's cells with other quoting and blanks;
        // line 6 differs from line 2 in one cell; line 7 repeats line 3.
        let bytes = b"a,b,c\n1,x,\n2,y,z\n1,2\n\"1\",\"x\", \n1,x,q\n2,y,z\n";
        let whole = summary(&slices(bytes, usize::MAX));
        let duplicates: Vec<(u64, Option<u64>)> = whole.0.iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(
            duplicates,
            [(2, None), (3, None), (5, Some(2)), (6, None), (7, Some(3))]
        );
        assert_eq!(whole.1, [(4, "wrong_field_count")]);
        for size in 1..=3 {
            let sliced = slices(bytes, size);
            assert!(sliced.iter().all(|t| t.records() <= size as u64));
            assert_eq!(summary(&sliced), whole, "slices of {size}");
        }
        // A file without records still yields one (empty) slice.
        assert_eq!(slices(b"a,b\n", 10).len(), 1);
    }

    #[test]
    fn empty_cells_are_none() {
        let t = read_str(b"a,b\n1,\n, \n").unwrap();
        assert_eq!(t.cell(1, 0), None);
        assert_eq!(t.cell(0, 1), None);
        assert_eq!(t.cell(1, 1), None);
    }
}
