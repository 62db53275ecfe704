//! Reading a delimited extract into text columns.
//!
//! One pass over the bytes, read a buffer at a time and parsed by
//! `csv_core`, a slice of records at a time ([`CsvReader`]), finds every
//! record's line number, quarantines records that cannot be trusted
//! (wrong number of fields, a truncated last line, bytes that are not
//! UTF-8, a quote that never closes) as rejects, marks exact duplicates
//! of earlier records, and appends the cells of the others to one Arrow
//! string column per header field; casting happens later, per column,
//! with the mapping's formats. A quote left open swallows the lines after
//! it: such a record is refused as `malformed_record` for its first line
//! only, and reading resumes on the next line, so one stray quote costs
//! one record, never the file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
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

    /// The records whose (first) line `keep` takes, well-formed or not;
    /// `None` when there are none.
    pub fn only(&self, keep: impl Fn(u64) -> bool) -> Option<TextTable> {
        let rows: Vec<usize> = (0..self.lines.len())
            .filter(|r| keep(self.lines[*r]))
            .collect();
        let rejects: Vec<StructuralReject> = self
            .rejects
            .iter()
            .filter(|r| keep(r.line))
            .cloned()
            .collect();
        if rows.is_empty() && rejects.is_empty() {
            return None;
        }
        let columns = if rows.len() == self.lines.len() {
            self.columns.clone()
        } else {
            self.columns
                .iter()
                .map(|c| {
                    rows.iter()
                        .map(|r| c.is_valid(*r).then(|| c.value(*r)))
                        .collect()
                })
                .collect()
        };
        Some(TextTable {
            header: self.header.clone(),
            columns,
            lines: rows.iter().map(|r| self.lines[*r]).collect(),
            duplicate_of: rows.iter().map(|r| self.duplicate_of[*r]).collect(),
            rejects,
        })
    }

    /// The text of column `col` at row `row` (`None` when empty).
    pub fn cell(&self, col: usize, row: usize) -> Option<&str> {
        let c = self.columns.get(col)?;
        (row < c.len() && c.is_valid(row)).then(|| c.value(row))
    }
}

/// Reads one extract whole from memory (see [`CsvReader`]).
pub fn read(path: &Path, bytes: &[u8], mapping: &CsvMapping) -> Result<TextTable> {
    let mut reader = CsvReader::open(path, Extract::Bytes(bytes), mapping)?;
    Ok(reader
        .next_slice(usize::MAX)?
        .expect("the first slice is always returned"))
}

/// Where an extract's bytes are read from.
pub enum Extract<'b> {
    /// Bytes in memory.
    Bytes(&'b [u8]),
    /// An open file, read a buffer at a time: what is held of it is the
    /// buffer and the record being read, never the file.
    File(File),
}

impl Extract<'_> {
    /// Reads bytes at byte `at` into `buf`; fewer only at the end.
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Extract::Bytes(bytes) => {
                let rest = usize::try_from(at)
                    .ok()
                    .and_then(|at| bytes.get(at..))
                    .unwrap_or_default();
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                Ok(n)
            }
            Extract::File(file) => {
                use std::os::unix::fs::FileExt;
                let mut n = 0;
                while n < buf.len() {
                    match file.read_at(&mut buf[n..], at + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(n)
            }
        }
    }

    fn len(&self) -> std::io::Result<u64> {
        match self {
            Extract::Bytes(bytes) => Ok(bytes.len() as u64),
            Extract::File(file) => Ok(file.metadata()?.len()),
        }
    }
}

/// The extract from byte `at` on.
struct ReadFrom<'e, 'b> {
    extract: &'e Extract<'b>,
    at: u64,
}

impl std::io::Read for ReadFrom<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.extract.read_at(self.at, buf)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Bytes read from the extract at a time (the buffer grows only for a
/// record longer than it).
const BUFFER: usize = 1 << 20;

/// The longest record read: past it a record is refused for its first line
/// and reading resumes on the next (a quote that never closes would
/// otherwise hold the rest of the file in the buffer).
const MAX_RECORD: u64 = 8 << 20;

/// The most of a refused record's first line kept as its raw text.
const MAX_RAW: usize = 64 << 10;

/// Reads an extract's records in slices, so that what is held of a file
/// follows the slice, not the file: a buffer of its bytes, the slice's
/// text, and per row read so far a hash and position (24 bytes) for exact
/// duplicates. `path` is used in error messages only, which name lines and
/// column positions, never cell values.
///
/// Each slice's rows carry [`TextTable::duplicate_of`]: the line of an
/// earlier row of the file, in any slice, with the same cells. Rows are
/// hashed; a hash seen before is confirmed by reading the earlier record
/// again from the extract and comparing its cells, so a hash collision
/// never marks a row.
///
/// Records are parsed by `csv_core` from the buffer: delimiters, quotes and
/// line ends are ASCII, so a Latin-1 extract is parsed as it is and its
/// fields are decoded to UTF-8; a UTF-8 byte order mark is skipped.
pub struct CsvReader<'b> {
    path: &'b Path,
    extract: Extract<'b>,
    /// The extract's size when opened: what is read.
    len: u64,
    mapping: &'b CsvMapping,
    core: csv_core::Reader,
    /// `buf[..filled]` holds the extract's bytes from byte `offset`;
    /// parsing resumes at `buf[pos]`.
    buf: Vec<u8>,
    offset: u64,
    pos: usize,
    filled: usize,
    /// The last record read: its fields' bytes and where each ends, and
    /// (Latin-1) its fields decoded.
    fields: Vec<u8>,
    ends: Vec<usize>,
    width: usize,
    decoded: String,
    ranges: Vec<std::ops::Range<usize>>,
    header: Vec<String>,
    ends_with_newline: bool,
    /// Whether a slice was returned.
    started: bool,
    /// The longest record read ([`MAX_RECORD`]).
    max_record: u64,
    /// Rows read so far by hash: the first row's line and byte offset.
    seen: HashMap<u64, (u64, u64), ahash::RandomState>,
    /// Rows whose hash was taken by a row with other cells.
    collided: HashMap<u64, Vec<(u64, u64)>>,
    hasher: ahash::RandomState,
}

impl<'b> CsvReader<'b> {
    /// Reads the header of `extract`.
    pub fn open(path: &'b Path, extract: Extract<'b>, mapping: &'b CsvMapping) -> Result<Self> {
        Self::with_buffer(path, extract, mapping, BUFFER, MAX_RECORD)
    }

    /// [`CsvReader::open`] with a buffer of `buffer` bytes at first and
    /// records of `max_record` bytes at most.
    fn with_buffer(
        path: &'b Path,
        extract: Extract<'b>,
        mapping: &'b CsvMapping,
        buffer: usize,
        max_record: u64,
    ) -> Result<Self> {
        let err = |line: Option<u64>, message: String| WardError::Extract {
            path: path.to_path_buf(),
            line,
            message,
        };
        let len = extract
            .len()
            .map_err(|e| WardError::io("cannot read", path, e))?;
        let mut last = [0u8];
        if len > 0 {
            extract
                .read_at(len - 1, &mut last)
                .map_err(|e| WardError::io("cannot read", path, e))?;
        }
        let mut reader = CsvReader {
            path,
            extract,
            len,
            mapping,
            core: csv_core::ReaderBuilder::new()
                .delimiter(mapping.delimiter)
                .quote(mapping.quote)
                .build(),
            buf: vec![0; buffer.clamp(1, len.saturating_add(1).try_into().unwrap_or(usize::MAX))],
            offset: 0,
            pos: 0,
            filled: 0,
            fields: vec![0; 1024],
            ends: vec![0; 64],
            width: 0,
            decoded: String::new(),
            ranges: Vec::new(),
            header: Vec::new(),
            ends_with_newline: matches!(last[0], b'\n' | b'\r'),
            started: false,
            max_record,
            seen: HashMap::default(),
            collided: HashMap::new(),
            hasher: ahash::RandomState::with_seeds(0x5741_5244, 1, 2, 3),
        };
        let Some(span) = reader.read_record()? else {
            return Err(err(None, "file is empty: no header line".into()));
        };
        if span.overlong {
            return Err(err(
                Some(span.line),
                format!("the header runs past {max_record} bytes: not a CSV header"),
            ));
        }
        if reader.body(&span).iter().all(u8::is_ascii_whitespace) {
            return Err(err(
                Some(span.line),
                "file is empty: its first line is blank, no header line".into(),
            ));
        }
        reader.header = read_header(&reader, span.line, &err)?;
        Ok(reader)
    }

    /// The header's field names.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// The extract's size in bytes when it was opened: what is read.
    pub fn size(&self) -> u64 {
        self.len
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
        while lines.len() + rejects.len() < max {
            let Some(span) = self.read_record()? else {
                break;
            };
            if span.overlong {
                let body = self.body(&span);
                let line = &body[..body.iter().position(|b| *b == b'\n').unwrap_or(body.len())];
                rejects.push(StructuralReject {
                    line: span.line,
                    rule: "malformed_record",
                    message: format!(
                        "the record runs past {} bytes (a quote that never closes?); \
                         its first line was refused and reading resumed on the next",
                        self.max_record
                    ),
                    raw: String::from_utf8_lossy(trim_terminator(&line[..line.len().min(MAX_RAW)]))
                        .into_owned(),
                });
                self.skip_line(span.start + span.leading as u64)?;
                self.core.reset();
                self.core.set_line(span.line + 1);
                continue;
            }
            let is_last = span.end >= self.len;
            // A quoted field still open at the end of the file.
            let unclosed = is_last && {
                let body = self.body(&span);
                opens_quote(body, self.mapping)
                    && body.iter().filter(|b| **b == self.mapping.quote).count() % 2 == 1
            };
            if self.width != width || unclosed {
                let shape = Shape {
                    fields: self.width,
                    width,
                    unclosed,
                    cut_short: is_last && !self.ends_with_newline,
                };
                let (reject, resume_after) =
                    misshapen(span.line, self.body(&span), shape, self.mapping);
                rejects.push(reject);
                if let Some(eol) = resume_after {
                    // The line's end is in the buffer: the record is.
                    self.pos = (span.start + span.leading as u64 - self.offset) as usize + eol + 1;
                    self.core.reset();
                    self.core.set_line(span.line + 1);
                }
                continue;
            }
            let Some(text) = self.text() else {
                let i = (0..self.width)
                    .position(|i| std::str::from_utf8(self.field(i)).is_err())
                    .unwrap_or(0);
                rejects.push(StructuralReject {
                    line: span.line,
                    rule: "invalid_utf8",
                    message: format!("column '{}' holds bytes that are not UTF-8", self.header[i]),
                    raw: String::from_utf8_lossy(self.body(&span)).into_owned(),
                });
                continue;
            };
            for (column, range) in columns.iter_mut().zip(&self.ranges) {
                let v = &text[range.clone()];
                if crate::normalize::trim(v).is_empty() {
                    column.append_null();
                } else {
                    column.append_value(v);
                }
            }
            lines.push(span.line);
            starts.push(span.start + span.leading as u64);
        }
        if lines.is_empty() && rejects.is_empty() && self.started {
            return Ok(None);
        }
        self.started = true;
        let columns: Vec<StringArray> = columns.iter_mut().map(StringBuilder::finish).collect();
        let duplicate_of = self.duplicates(&columns, &lines, &starts)?;
        Ok(Some(TextTable {
            header: self.header.clone(),
            columns,
            lines,
            duplicate_of,
            rejects,
        }))
    }

    /// Reads the next record into `fields`/`ends`; `None` at the end.
    fn read_record(&mut self) -> Result<Option<Span>> {
        use csv_core::ReadRecordResult::*;
        let mut start = self.offset + self.pos as u64;
        // The line the parse began on, and line ends passed before the record.
        let mut first_line = self.core.line();
        let (mut nout, mut nend) = (0, 0);
        let span = loop {
            if self.pos == self.filled {
                // Keeps the record's bytes from `start` on; blank lines before
                // it are not kept (a run of them costs no buffer).
                let passed = &self.buf[(start - self.offset) as usize..self.pos];
                if passed.iter().all(|b| matches!(b, b'\n' | b'\r')) {
                    first_line += passed.iter().filter(|b| **b == b'\n').count() as u64;
                    start = self.offset + self.pos as u64;
                }
                self.fill((start - self.offset) as usize)?;
            }
            let input = &self.buf[self.pos..self.filled];
            let (res, i, o, e) =
                self.core
                    .read_record(input, &mut self.fields[nout..], &mut self.ends[nend..]);
            self.pos += i;
            nout += o;
            nend += e;
            match res {
                InputEmpty | Record => {
                    // Whether it ends in the buffer or not, a record past
                    // the longest is refused.
                    let span = self.span(start, first_line);
                    if span.end - span.start - span.leading as u64 > self.max_record {
                        return Ok(Some(Span {
                            overlong: true,
                            ..span
                        }));
                    }
                    if res == Record {
                        break span;
                    }
                }
                OutputFull => self.fields.resize(self.fields.len() * 2, 0),
                OutputEndsFull => self.ends.resize(self.ends.len() * 2, 0),
                End => return Ok(None),
            }
        };
        self.width = nend;
        // The fields as text (UTF-8: checked later), one range each.
        self.ranges.clear();
        if self.mapping.encoding == Encoding::Latin1 {
            self.decoded.clear();
            for i in 0..nend {
                let at = self.decoded.len();
                let field = &self.fields[field_range(&self.ends, i)];
                self.decoded.extend(field.iter().map(|&b| b as char));
                self.ranges.push(at..self.decoded.len());
            }
        } else {
            self.ranges
                .extend((0..nend).map(|i| field_range(&self.ends, i)));
        }
        Ok(Some(span))
    }

    /// The span of the record read from byte `start` to `pos`, its parse
    /// begun on line `first_line`.
    fn span(&self, start: u64, first_line: u64) -> Span {
        let raw = &self.buf[(start - self.offset) as usize..self.pos];
        let leading = raw
            .iter()
            .take_while(|b| matches!(b, b'\n' | b'\r'))
            .count();
        let newlines = raw[..leading].iter().filter(|b| **b == b'\n').count() as u64;
        Span {
            start,
            end: self.offset + self.pos as u64,
            leading,
            line: first_line + newlines,
            overlong: false,
        }
    }

    /// Moves `pos` past the end of the line that starts at byte `from`,
    /// reading on without keeping what it passes; at the end of the
    /// extract, to its end.
    fn skip_line(&mut self, from: u64) -> Result<()> {
        let mut at = from;
        loop {
            let i = (at - self.offset) as usize;
            if let Some(eol) = self.buf[i..self.filled].iter().position(|b| *b == b'\n') {
                self.pos = i + eol + 1;
                return Ok(());
            }
            self.pos = self.filled;
            at = self.offset + self.filled as u64;
            if at >= self.len {
                return Ok(());
            }
            self.fill(self.filled)?;
        }
    }

    /// Makes more of the extract available past `buf[filled]`, keeping
    /// `buf[keep..]`; at the end of the extract, nothing (the parser is
    /// then handed no input, which ends its last record).
    fn fill(&mut self, keep: usize) -> Result<()> {
        let at = self.offset + self.filled as u64;
        if at >= self.len {
            return Ok(());
        }
        self.buf.copy_within(keep..self.filled, 0);
        self.offset += keep as u64;
        self.filled -= keep;
        self.pos -= keep;
        if self.filled == self.buf.len() {
            // A record longer than the buffer.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let want = (self.buf.len() - self.filled).min((self.len - at) as usize);
        let n = self
            .extract
            .read_at(at, &mut self.buf[self.filled..self.filled + want])
            .map_err(|e| WardError::io("cannot read", self.path, e))?;
        if n == 0 {
            // The file shrank while it was read: what there was is read.
            self.len = at;
        }
        self.filled += n;
        Ok(())
    }

    /// The bytes of field `i` of the last record.
    fn field(&self, i: usize) -> &[u8] {
        &self.fields[field_range(&self.ends, i)]
    }

    /// The last record's fields as one text (indexed by `ranges`), or
    /// `None` when a UTF-8 extract's record is not UTF-8.
    fn text(&self) -> Option<&str> {
        if self.mapping.encoding == Encoding::Latin1 {
            return Some(&self.decoded);
        }
        // The fields are UTF-8 when their concatenation is and every field
        // starts and ends on a character: one check of the whole record
        // instead of one per field.
        let all = &self.fields[..self.ends[..self.width].last().copied().unwrap_or(0)];
        std::str::from_utf8(all).ok().filter(|text| {
            self.ranges
                .iter()
                .all(|r| text.is_char_boundary(r.start) && text.is_char_boundary(r.end))
        })
    }

    /// The last record's bytes, without the line ends around it.
    fn body(&self, span: &Span) -> &[u8] {
        trim_terminator(&self.buf[(span.start - self.offset) as usize..self.pos])
    }

    /// For each row of a slice, the line of an earlier row of the file with
    /// the same cells (see [`CsvReader`]); registers the new rows.
    fn duplicates(
        &mut self,
        columns: &[StringArray],
        lines: &[u64],
        starts: &[u64],
    ) -> Result<Vec<Option<u64>>> {
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
        let mut out = Vec::with_capacity(lines.len());
        for (row, hash) in hashes.into_iter().enumerate() {
            let here = (lines[row], starts[row]);
            let first = match self.seen.get(&hash) {
                None => {
                    self.seen.insert(hash, here);
                    None
                }
                Some(&(line, earlier)) if self.same(earlier, cells(row))? => Some(line),
                Some(_) => {
                    // Taken out of the map while `same` reads the extract.
                    let mut others = self.collided.remove(&hash).unwrap_or_default();
                    let mut found = None;
                    for &(line, earlier) in &others {
                        if self.same(earlier, cells(row))? {
                            found = Some(line);
                            break;
                        }
                    }
                    if found.is_none() {
                        others.push(here);
                    }
                    self.collided.insert(hash, others);
                    found
                }
            };
            out.push(first);
        }
        Ok(out)
    }

    /// Whether the well-formed record starting at byte `start` has the
    /// cells `cells`.
    fn same<'c>(&self, start: u64, cells: impl Iterator<Item = Option<&'c str>>) -> Result<bool> {
        let mut record = csv::ByteRecord::new();
        csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(self.mapping.delimiter)
            .quote(self.mapping.quote)
            .buffer_capacity(4096)
            .from_reader(ReadFrom {
                extract: &self.extract,
                at: start,
            })
            .read_byte_record(&mut record)
            .map_err(|e| WardError::Extract {
                path: self.path.to_path_buf(),
                line: None,
                message: format!("cannot read a record again: {e}"),
            })?;
        let latin1 = self.mapping.encoding == Encoding::Latin1;
        Ok(record.len() == self.header.len()
            && record
                .iter()
                .zip(cells)
                .all(|(f, c)| cell(f, latin1).as_deref() == c))
    }
}

/// A field's text as [`CsvReader::next_slice`] keeps it: `None` when empty
/// or blank (or, in a UTF-8 extract, not UTF-8).
fn cell(field: &[u8], latin1: bool) -> Option<Cow<'_, str>> {
    let text = if latin1 {
        Cow::Owned(field.iter().map(|&b| b as char).collect())
    } else {
        Cow::Borrowed(std::str::from_utf8(field).ok()?)
    };
    (!crate::normalize::trim(&text).is_empty()).then_some(text)
}

/// Where field `i` of a record is in its fields' bytes, given where each
/// field ends (as `csv_core` writes them).
fn field_range(ends: &[usize], i: usize) -> std::ops::Range<usize> {
    let start = if i == 0 { 0 } else { ends[i - 1] };
    start..ends[i]
}

/// Where a record sits in the extract.
struct Span {
    /// Its bytes, line terminators around it included.
    start: u64,
    end: u64,
    /// Line terminators before it: after a CRLF the parser starts the next
    /// record on the LF.
    leading: usize,
    /// The line it starts on.
    line: u64,
    /// Read no further than past [`MAX_RECORD`] bytes: not a record.
    overlong: bool,
}

/// The header record's field names, trimmed; refused when not UTF-8 or
/// when two fields share a name (likely a data line, not a header).
fn read_header(
    reader: &CsvReader,
    line: u64,
    err: &impl Fn(Option<u64>, String) -> WardError,
) -> Result<Vec<String>> {
    let text = reader
        .text()
        .ok_or_else(|| err(Some(line), "header is not valid UTF-8".into()))?;
    let mut header: Vec<String> = Vec::with_capacity(reader.ranges.len());
    for (i, range) in reader.ranges.iter().enumerate() {
        let name = text[range.clone()].trim().to_string();
        if let Some(first) = header.iter().position(|h| *h == name) {
            return Err(err(
                Some(line),
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
        let e = read_str(b" \t\n1,2\n").unwrap_err();
        assert!(e.to_string().contains("first line is blank"), "{e}");
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
    fn a_record_past_the_longest_is_refused_for_its_first_line() {
        let m = mapping(Encoding::Utf8);
        let read = |bytes: &[u8], buffer: usize| {
            let extract = Extract::Bytes(bytes);
            let mut reader =
                CsvReader::with_buffer(Path::new("f.csv"), extract, &m, buffer, 40).unwrap();
            let tables: Vec<TextTable> =
                std::iter::from_fn(|| reader.next_slice(2).unwrap()).collect();
            let buffer = reader.buf.len();
            (summary(&tables), tables, buffer)
        };
        // A quote that never closes, then 200 lines: the buffer stays
        // small, the quote's line alone is refused.
        let mut bytes = b"id,code,v\n1,\"abc,1\n".to_vec();
        for i in 2..202 {
            bytes.extend(format!("{i},def,{i}\n").bytes());
        }
        for buffer in [1, 7, 64] {
            let ((rows, rejects), tables, held) = read(&bytes, buffer);
            assert_eq!(rows.len(), 200, "buffer {buffer}");
            assert_eq!(rows[0].0, 3);
            assert_eq!(rows[0].1[1].as_deref(), Some("def"));
            assert_eq!(rejects, [(2, "malformed_record")]);
            let reject = tables.iter().flat_map(|t| &t.rejects).next().unwrap();
            assert_eq!(reject.raw, "1,\"abc,1");
            assert!(
                reject.message.contains("runs past 40 bytes"),
                "{}",
                reject.message
            );
            assert!(held <= 256, "buffer {buffer} grew to {held}");
        }
        // One line longer than that, without any quote; then the last line
        // with no line end.
        let long = "x".repeat(100);
        let bytes = format!("id,v\n1,{long}\n2,y\n3,{long}");
        let ((rows, rejects), tables, _) = read(bytes.as_bytes(), 16);
        let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(lines, [3]);
        assert_eq!(rejects, [(2, "malformed_record"), (4, "malformed_record")]);
        let raw: Vec<&str> = tables
            .iter()
            .flat_map(|t| &t.rejects)
            .map(|r| r.raw.as_str())
            .collect();
        // What was read of each: past the limit, never the line's rest.
        for (raw, line) in raw.iter().zip([format!("1,{long}"), format!("3,{long}")]) {
            assert!(
                line.starts_with(raw) && raw.len() > 40 && raw.len() < line.len(),
                "{raw}"
            );
        }
        // Refused whether the record ends within the buffer or not.
        let ((_, rejects), _, _) = read(bytes.as_bytes(), 4096);
        assert_eq!(rejects, [(2, "malformed_record"), (4, "malformed_record")]);
        // Blank lines before a record are not part of it, nor kept: a run
        // of them longer than the limit passes, its lines counted.
        let bytes = format!("id,v\n{}1,a\r\n\r\n2,b\n", "\n".repeat(100));
        for buffer in [1, 16, 4096] {
            let ((rows, rejects), _, held) = read(bytes.as_bytes(), buffer);
            let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
            assert_eq!(lines, [102, 104], "buffer {buffer}");
            assert!(rejects.is_empty(), "buffer {buffer}: {rejects:?}");
            assert!(held <= buffer.max(32), "buffer {buffer} grew to {held}");
        }
        // A header past it is no header.
        let bytes = format!("{long},v\n1,2\n");
        let extract = Extract::Bytes(bytes.as_bytes());
        let Err(e) = CsvReader::with_buffer(Path::new("f.csv"), extract, &m, 8, 40) else {
            panic!("a header of 100 bytes is read")
        };
        assert!(
            e.to_string() == "f.csv:1: the header runs past 40 bytes: not a CSV header",
            "{e}"
        );
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
            // Reading in slices, through a buffer of any size, changes nothing.
            let whole = summary(std::slice::from_ref(&t));
            for (size, buffer) in [(1, 1), (2, 5), (7, 64), (usize::MAX, 3)] {
                proptest::prop_assert_eq!(&summary(&slices(&bytes, size, buffer)), &whole);
            }
        }
    }

    /// Every slice of `bytes` of `size` records, read to the end through a
    /// buffer of `buffer` bytes.
    fn slices(bytes: &[u8], size: usize, buffer: usize) -> Vec<TextTable> {
        let m = mapping(Encoding::Utf8);
        let mut reader = CsvReader::with_buffer(
            Path::new("f.csv"),
            Extract::Bytes(bytes),
            &m,
            buffer,
            MAX_RECORD,
        )
        .unwrap();
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
        let whole = summary(&slices(bytes, usize::MAX, BUFFER));
        let duplicates: Vec<(u64, Option<u64>)> = whole.0.iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(
            duplicates,
            [(2, None), (3, None), (5, Some(2)), (6, None), (7, Some(3))]
        );
        assert_eq!(whole.1, [(4, "wrong_field_count")]);
        for size in 1..=3 {
            let sliced = slices(bytes, size, 4);
            assert!(sliced.iter().all(|t| t.records() <= size as u64));
            assert_eq!(summary(&sliced), whole, "slices of {size}");
        }
        // A file without records still yields one (empty) slice.
        assert_eq!(slices(b"a,b\n", 10, BUFFER).len(), 1);
    }

    #[test]
    fn a_file_is_read_as_its_bytes_are() {
        let bytes = b"a,b\r\n1,\"two\r\nlines\"\r\n1,2,3\r\n2,x\r\n1,\"two\r\nlines\"\r\n4,\"y";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.csv");
        std::fs::write(&path, bytes).unwrap();
        let m = mapping(Encoding::Utf8);
        for buffer in [1, 8, BUFFER] {
            let file = File::open(&path).unwrap();
            let mut reader =
                CsvReader::with_buffer(&path, Extract::File(file), &m, buffer, MAX_RECORD).unwrap();
            assert_eq!(reader.size(), bytes.len() as u64);
            let sliced: Vec<TextTable> =
                std::iter::from_fn(|| reader.next_slice(2).unwrap()).collect();
            assert_eq!(summary(&sliced), summary(&slices(bytes, 2, BUFFER)));
        }
        let (rows, rejects) = summary(&slices(bytes, 2, BUFFER));
        let rows: Vec<(u64, Option<u64>)> = rows.iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(rows, [(2, None), (5, None), (6, Some(2))]);
        assert_eq!(rejects, [(4, "wrong_field_count"), (8, "malformed_record")]);
    }

    #[test]
    fn latin1_duplicates_compare_decoded_cells() {
        let m = mapping(Encoding::Latin1);
        let bytes = b"name,n\nJos\xe9,1\nJose,1\n\"Jos\xe9\",1\n";
        let mut reader =
            CsvReader::with_buffer(Path::new("f.csv"), Extract::Bytes(bytes), &m, 4, MAX_RECORD)
                .unwrap();
        let t = reader.next_slice(usize::MAX).unwrap().unwrap();
        assert_eq!(t.cell(0, 2), Some("José"));
        assert_eq!(t.duplicate_of, [None, None, Some(2)]);
    }

    #[test]
    fn empty_cells_are_none() {
        let t = read_str(b"a,b\n1,\n, \n").unwrap();
        assert_eq!(t.cell(1, 0), None);
        assert_eq!(t.cell(0, 1), None);
        assert_eq!(t.cell(1, 1), None);
    }
}
