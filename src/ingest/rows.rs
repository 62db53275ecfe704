//! Turning an extract's text rows into canonical rows: apply the mapping,
//! cast, normalize, validate, and build Arrow batches of accepted rows plus
//! one reject per refused row.
//!
//! Rows are mapped in parallel chunks; each chunk appends accepted rows
//! straight into its own Arrow builders, so nothing row-shaped is kept for
//! the whole file, and values that need no change are borrowed from the
//! text columns rather than copied.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::Path;

use chrono::{Datelike, NaiveDate, NaiveDateTime};
use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, ListBuilder,
    RecordBatch, StringBuilder, StructBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use datafusion::arrow::datatypes::DataType;
use rayon::prelude::*;

use super::csv::{StructuralReject, TextTable};
use crate::error::{Result, WardError};
use crate::mapping::{FieldSpec, FileMapping, ValueSource};
use crate::normalize::{self, DateFormat};
use crate::schema::{Kind, Table, coding_fields};

/// Rows mapped per parallel chunk (and per output record batch).
const CHUNK: usize = 16 * 1024;

/// What a file's rows are checked against.
pub struct RowContext<'a> {
    /// The extract, for error messages.
    pub path: &'a Path,
    pub source: &'a str,
    /// The file's name relative to the source's folder (stored as lineage).
    pub file: &'a str,
    /// Dates after this day are `future_date`.
    pub today: NaiveDate,
    /// Birth dates of the source's accepted patients (`None`: unknown), when
    /// the source delivers patients: facts of other ids are `unknown_patient`.
    pub patients: Option<&'a super::PatientLookup>,
}

/// One refused source record.
#[derive(Debug, Clone)]
pub struct RejectRow {
    pub line: u64,
    /// The canonical table of the refused record, when known (a FHIR file
    /// mixes resource types); else the record is the file's table's.
    pub table: Option<Table>,
    /// The file column (or, for constants and derived checks, the canonical
    /// column) of the first failure.
    pub column: Option<String>,
    pub rule: &'static str,
    pub message: String,
    /// Every failure as `column: rule`, separated by `; `.
    pub errors: String,
    /// The record's fields as a JSON object keyed by header name, or the raw
    /// line when the record could not be split into fields.
    pub raw: String,
}

/// The outcome of mapping one file.
pub struct MappedFile {
    /// Accepted rows, in file order (one batch per chunk).
    pub batches: Vec<RecordBatch>,
    pub rejects: Vec<RejectRow>,
    /// Values of accepted rows that could not be normalized and were kept as
    /// `unknown` (or empty), per `column: rule`.
    pub flagged: BTreeMap<String, u64>,
}

impl MappedFile {
    /// Number of accepted rows.
    pub fn accepted(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

#[derive(Debug, Clone)]
enum Cell<'a> {
    Null,
    Str(Cow<'a, str>),
    Date(NaiveDate),
    Ts(NaiveDateTime),
    F64(f64),
    Bool(bool),
}

impl Cell<'_> {
    fn str(&self) -> Option<&str> {
        match self {
            Cell::Str(s) => Some(s),
            _ => None,
        }
    }
    fn day(&self) -> Option<NaiveDate> {
        match self {
            Cell::Date(d) => Some(*d),
            Cell::Ts(t) => Some(t.date()),
            _ => None,
        }
    }
    fn time(&self) -> Option<NaiveDateTime> {
        match self {
            Cell::Ts(t) => Some(*t),
            Cell::Date(d) => d.and_hms_opt(0, 0, 0),
            _ => None,
        }
    }
}

struct Violation<'a> {
    column: &'a str,
    rule: &'static str,
    message: String,
}

#[derive(Clone, Copy)]
enum Input<'a> {
    Column(usize),
    Constant(&'a str),
}

struct FieldPlan<'a> {
    target: usize,
    kind: Kind,
    spec: &'a FieldSpec,
    input: Input<'a>,
    label: &'a str,
    formats: &'a [DateFormat],
    /// Postal codes are US ZIPs (the mapping's `postal_codes`).
    us_postal: bool,
}

/// Where each canonical column of the table sits (schema index).
struct Columns {
    patient_id: usize,
    birth_date: Option<usize>,
    birth_date_partial: Option<usize>,
    code_system: Option<usize>,
    code: Option<usize>,
    value_code_system: Option<usize>,
    codings: Option<usize>,
    value_num: Option<usize>,
    value_text: Option<usize>,
    unit: Option<usize>,
    original_unit: Option<usize>,
    events: Vec<(usize, &'static str)>,
    period: Option<(usize, usize)>,
}

pub(crate) struct Plan<'a> {
    table: Table,
    fields: Vec<FieldPlan<'a>>,
    value: Option<FieldPlan<'a>>,
    codings: Vec<(&'static str, usize, &'a str)>,
    at: Columns,
    /// Label (file column, or canonical column for constants) per schema index.
    labels: Vec<&'a str>,
}

/// The position of header field `name` (mapped for `target`), or an error
/// that names the file but not the header, which in a file without a header
/// line is a patient's record. A near spelling of the mapped name is named.
fn header_index(text: &TextTable, name: &str, target: &str, ctx: &RowContext) -> Result<usize> {
    text.header.iter().position(|h| h == name).ok_or_else(|| {
        let near = text
            .header
            .iter()
            .filter(|h| strsim::jaro_winkler(&h.to_lowercase(), &name.to_lowercase()) >= 0.9)
            .max_by(|a, b| strsim::jaro_winkler(a, name).total_cmp(&strsim::jaro_winkler(b, name)))
            .map(|h| format!(" (a header field is spelled '{h}')"))
            .unwrap_or_default();
        WardError::Extract {
            path: ctx.path.to_path_buf(),
            line: Some(1),
            message: format!(
                "mapping names column '{name}' (for {target}) but none of the {} header fields has that name{near}; \
                 check that the file starts with a header line and that the mapping's delimiter is right",
                text.header.len()
            ),
        }
    })
}

/// The fields whose values are computed from cells (`concat`, `regex`),
/// in the order their columns follow the file's own.
fn derived_specs(fm: &FileMapping) -> Vec<(&'static str, &FieldSpec)> {
    fm.fields
        .iter()
        .map(|(n, s)| (*n, s))
        .chain(fm.value.iter().map(|s| ("value", s)))
        .filter(|(_, s)| {
            matches!(
                s.source,
                ValueSource::Concat { .. } | ValueSource::Extract { .. }
            )
        })
        .collect()
}

/// The computed column of a `concat` or `regex` field, one cell per row.
fn derive(
    text: &TextTable,
    target: &str,
    spec: &FieldSpec,
    ctx: &RowContext,
) -> Result<Vec<Option<String>>> {
    let rows = text.lines.len();
    let trimmed =
        |col: usize, row: usize| text.cell(col, row).map(str::trim).filter(|c| !c.is_empty());
    Ok(match &spec.source {
        ValueSource::Concat { columns, separator } => {
            let at = columns
                .iter()
                .map(|c| header_index(text, c, target, ctx))
                .collect::<Result<Vec<_>>>()?;
            (0..rows)
                .map(|row| {
                    let parts: Vec<&str> = at.iter().filter_map(|c| trimmed(*c, row)).collect();
                    (!parts.is_empty()).then(|| parts.join(separator))
                })
                .collect()
        }
        ValueSource::Extract {
            column,
            regex,
            group,
        } => {
            let at = header_index(text, column, target, ctx)?;
            let regex = regex::Regex::new(regex).expect("checked when the mapping was loaded");
            (0..rows)
                .map(|row| {
                    let cell = text.cell(at, row)?;
                    let part = regex.captures(cell)?.get(*group)?.as_str().trim();
                    (!part.is_empty()).then(|| part.to_string())
                })
                .collect()
        }
        ValueSource::Column(_) | ValueSource::Constant(_) => Vec::new(),
    })
}

/// `derived`: [`derived_specs`] of `fm`, whose computed columns follow the
/// file's in that order.
fn plan<'a>(
    text: &TextTable,
    fm: &'a FileMapping,
    derived: &[(&'static str, &'a FieldSpec)],
    ctx: &RowContext,
) -> Result<Plan<'a>> {
    let table = fm.table;
    let columns = table.columns();
    let find = |name: &str, target: &str| header_index(text, name, target, ctx);
    let field = |target: &'static str, spec: &'a FieldSpec| -> Result<FieldPlan<'a>> {
        let index = table.columns().iter().position(|c| c.name == target);
        let kind = index.map_or(Kind::Text, |i| columns[i].kind);
        let computed = || {
            let k = derived
                .iter()
                .position(|(_, s)| std::ptr::eq(*s, spec))
                .expect("a computed field");
            Input::Column(text.header.len() + k)
        };
        let (input, label) = match &spec.source {
            ValueSource::Column(c) => (Input::Column(find(c, target)?), c.as_str()),
            ValueSource::Constant(v) => (Input::Constant(v.as_str()), target),
            ValueSource::Extract { column, .. } => (computed(), column.as_str()),
            ValueSource::Concat { .. } => (computed(), target),
        };
        let formats = match (&spec.formats, kind) {
            (Some(f), _) => f.as_slice(),
            (None, Kind::Timestamp) => fm.datetime_formats.as_slice(),
            (None, _) => fm.date_formats.as_slice(),
        };
        Ok(FieldPlan {
            target: index.unwrap_or(usize::MAX),
            kind,
            spec,
            input,
            label,
            formats,
            us_postal: fm.us_postal_codes,
        })
    };
    let mut fields = Vec::new();
    for (name, spec) in &fm.fields {
        fields.push(field(name, spec)?);
    }
    let value = fm
        .value
        .as_ref()
        .map(|spec| field("value", spec))
        .transpose()?;
    let mut codings = Vec::new();
    for c in &fm.codings {
        let system =
            normalize::code_system(&c.system).expect("checked when the mapping was loaded");
        codings.push((system, find(&c.column, "codings")?, c.column.as_str()));
    }
    Ok(finish_plan(table, fields, value, codings))
}

fn finish_plan<'a>(
    table: Table,
    fields: Vec<FieldPlan<'a>>,
    value: Option<FieldPlan<'a>>,
    codings: Vec<(&'static str, usize, &'a str)>,
) -> Plan<'a> {
    let columns = table.columns();
    let ix = |name: &str| columns.iter().position(|c| c.name == name);
    let mut labels: Vec<&'a str> = columns.iter().map(|c| c.name).collect();
    for f in &fields {
        labels[f.target] = f.label;
    }
    if let (Some(v), Some(i)) = (&value, ix("value_num")) {
        labels[i] = v.label;
    }
    let at = Columns {
        patient_id: ix("source_patient_id").expect("every table has source_patient_id"),
        birth_date: ix("birth_date"),
        birth_date_partial: ix("birth_date_partial"),
        code_system: ix("code_system"),
        code: ix("code"),
        value_code_system: ix("value_code_system"),
        codings: columns.iter().position(|c| c.kind == Kind::Codings),
        value_num: ix("value_num"),
        value_text: ix("value_text"),
        unit: ix("unit"),
        original_unit: ix("original_unit"),
        events: table
            .event_columns()
            .iter()
            .map(|n| (ix(n).expect("event column"), *n))
            .collect(),
        period: table
            .period_columns()
            .map(|(s, e)| (ix(s).expect("period start"), ix(e).expect("period end"))),
    };
    Plan {
        table,
        fields,
        value,
        codings,
        at,
        labels,
    }
}

/// Text rows to map, whatever they were read from.
pub(crate) struct RowInput<'a> {
    /// One vector of cells per input column (`None` when empty).
    pub cols: Vec<Vec<Option<&'a str>>>,
    /// The line (or entry index) each row came from.
    pub lines: &'a [u64],
    /// Per row, the line of an earlier identical row, when the reader found
    /// them; else rows are compared within `cols`.
    pub duplicate_of: Option<&'a [Option<u64>]>,
    /// Per row, codings beyond the mapped ones: (system as written, code).
    pub extra_codings: Option<&'a [Vec<(String, String)>]>,
    /// The raw record of a row, for its reject.
    pub raw: &'a (dyn Fn(usize) -> String + Sync),
    /// Records refused before mapping.
    pub structural: &'a [StructuralReject],
}

/// Maps, validates and converts every well-formed row of `text`; rows that
/// fail any rule become rejects (structural rejects of the reader included).
/// `patient_ids` as in [`map_input`].
pub fn map_rows(
    text: &TextTable,
    fm: &FileMapping,
    ctx: &RowContext,
    patient_ids: &mut PatientIds,
) -> Result<MappedFile> {
    with_rows(text, fm, ctx, |input, plan| {
        map_input(input, plan, ctx, patient_ids)
    })?
}

/// Registers the patient ids of `text`'s rows in `patient_ids` (with their
/// line, the first of an id wins) without mapping them: the rows a load
/// of the same file mapped before, which later rows' ids must not repeat.
pub fn note_patient_ids(
    text: &TextTable,
    fm: &FileMapping,
    ctx: &RowContext,
    patient_ids: &mut PatientIds,
) -> Result<()> {
    with_rows(text, fm, ctx, |input, plan| {
        patient_ids_seen(input, plan, patient_ids);
    })
}

/// `then` of `text`'s rows (with the fields `fm` derives) and `fm`'s plan.
fn with_rows<R>(
    text: &TextTable,
    fm: &FileMapping,
    ctx: &RowContext,
    then: impl FnOnce(&RowInput, &Plan) -> R,
) -> Result<R> {
    let derived = derived_specs(fm);
    let plan = plan(text, fm, &derived, ctx)?;
    let computed = derived
        .iter()
        .map(|(target, spec)| derive(text, target, spec, ctx))
        .collect::<Result<Vec<_>>>()?;
    let mut cols = text.text_columns();
    cols.extend(
        computed
            .iter()
            .map(|c| c.iter().map(Option::as_deref).collect()),
    );
    let raw = |row: usize| raw_json(text, row);
    let input = RowInput {
        cols,
        lines: &text.lines,
        duplicate_of: Some(&text.duplicate_of),
        extra_codings: None,
        raw: &raw,
        structural: &text.rejects,
    };
    Ok(then(&input, &plan))
}

/// A plan for input whose columns are the table's own columns, in schema
/// order, each filled verbatim (FHIR): `specs` and `labels` have one entry
/// per table column.
pub(crate) fn canonical_plan<'a>(
    table: Table,
    specs: &'a [FieldSpec],
    labels: &'a [&'a str],
    formats: &'a [DateFormat],
) -> Plan<'a> {
    let columns = table.columns();
    let fields = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.mappable && c.kind != Kind::Codings)
        .map(|(i, c)| FieldPlan {
            target: i,
            kind: c.kind,
            spec: &specs[i],
            input: Input::Column(i),
            label: labels[i],
            formats,
            us_postal: true,
        })
        .collect();
    finish_plan(table, fields, None, Vec::new())
}

/// A file's patient ids met so far, with the line of the first.
pub(crate) type PatientIds = HashMap<String, u64, ahash::RandomState>;

/// Maps every row of `input` with `plan`; see [`map_rows`]. For patients,
/// `patient_ids` holds the ids already met in the same file (with their
/// line): the first record of an id wins, a later one is refused as
/// `duplicate_patient_id`, so a person's facts are never copied onto two
/// patients. New ids are added.
pub(crate) fn map_input(
    input: &RowInput,
    plan: &Plan,
    ctx: &RowContext,
    patient_ids: &mut PatientIds,
) -> Result<MappedFile> {
    let n = input.lines.len();
    let earlier = Earlier {
        row: match input.duplicate_of {
            Some(d) => d.to_vec(),
            None => duplicates(&input.cols, input.lines),
        },
        patient_id: patient_ids_seen(input, plan, patient_ids),
    };
    let chunks: Vec<Chunk> = (0..n)
        .step_by(CHUNK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| map_chunk(input, plan, ctx, &earlier, start..(start + CHUNK).min(n)))
        .collect::<Result<_>>()?;

    let (mut batches, mut flagged) = (Vec::new(), BTreeMap::new());
    let mut rejects: Vec<RejectRow> = input
        .structural
        .iter()
        .map(|r| RejectRow {
            line: r.line,
            table: None,
            column: None,
            rule: r.rule,
            message: r.message.clone(),
            errors: format!("*: {}", r.rule),
            raw: r.raw.clone(),
        })
        .collect();
    for (b, r, f) in chunks {
        batches.extend(b);
        rejects.extend(r);
        for (k, n) in f {
            *flagged.entry(format!("{k}: {UNRECOGNIZED}")).or_default() += n;
        }
    }
    rejects.sort_by_key(|r| r.line);
    Ok(MappedFile {
        batches,
        rejects,
        flagged,
    })
}

/// Per row, the line of an earlier row it repeats.
struct Earlier {
    /// An identical row.
    row: Vec<Option<u64>>,
    /// A patient with the same id (patient files only).
    patient_id: Vec<Option<u64>>,
}

/// For each row of a patient file, the line of an earlier patient with the
/// same id (in this file or, through `patient_ids`, an earlier one); all
/// `None` for other tables. Registers the new ids.
fn patient_ids_seen(
    input: &RowInput,
    plan: &Plan,
    patient_ids: &mut PatientIds,
) -> Vec<Option<u64>> {
    let n = input.lines.len();
    let id_field = plan
        .fields
        .iter()
        .find(|f| f.target == plan.at.patient_id)
        .filter(|_| plan.table == Table::Patient);
    let Some(f) = id_field else {
        return vec![None; n];
    };
    (0..n)
        .map(|row| {
            let id = resolve(f.spec, raw_of(&input.cols, row, f.input))
                .ok()
                .flatten()?;
            match patient_ids.entry(id.to_string()) {
                Entry::Occupied(first) => Some(*first.get()),
                Entry::Vacant(v) => {
                    v.insert(input.lines[row]);
                    None
                }
            }
        })
        .collect()
}

/// One chunk's accepted rows, rejects, and flagged values per column label
/// (the `column: rule` keys are built when the chunks are merged, not per
/// row).
type Chunk<'p> = (Vec<RecordBatch>, Vec<RejectRow>, BTreeMap<&'p str, u64>);

/// Maps the rows `rows` of `input` into one batch and their rejects.
fn map_chunk<'p>(
    input: &RowInput<'p>,
    plan: &Plan<'p>,
    ctx: &RowContext,
    earlier: &Earlier,
    rows: std::ops::Range<usize>,
) -> Result<Chunk<'p>> {
    let mut out = Builders::new(plan.table, rows.len());
    let mut rejects = Vec::new();
    let mut mapped = MappedRow::new(plan.table);
    let mut flagged = BTreeMap::<&str, u64>::new();
    for row in rows {
        mapped.clear();
        if let Some(first) = earlier.row[row] {
            mapped.violations.push(Violation {
                column: "*",
                rule: "duplicate_row",
                message: format!("exact duplicate of line {first}"),
            });
        }
        if let Some(first) = earlier.patient_id[row] {
            mapped.violations.push(Violation {
                column: plan.labels[plan.at.patient_id],
                rule: "duplicate_patient_id",
                message: format!(
                    "source_patient_id: the same id as the patient on line {first}, which is kept"
                ),
            });
        }
        let extra = input.extra_codings.map(|e| e[row].as_slice());
        map_row(&input.cols, row, plan, ctx, extra, &mut mapped);
        if mapped.violations.is_empty() {
            out.append(ctx, input.lines[row], &mapped.cells, &mapped.codings);
            for column in &mapped.flags {
                *flagged.entry(*column).or_default() += 1;
            }
        } else {
            rejects.push(reject_row(input, plan.table, row, &mapped.violations));
        }
    }
    let batch = out.finish(plan.table, ctx)?;
    Ok((
        vec![batch]
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .collect(),
        rejects,
        flagged,
    ))
}

fn reject_row(input: &RowInput, table: Table, row: usize, v: &[Violation]) -> RejectRow {
    RejectRow {
        line: input.lines[row],
        table: Some(table),
        column: Some(v[0].column.to_string()).filter(|c| c != "*"),
        rule: v[0].rule,
        message: v[0].message.clone(),
        errors: v
            .iter()
            .map(|v| format!("{}: {}", v.column, v.rule))
            .collect::<Vec<_>>()
            .join("; "),
        raw: (input.raw)(row),
    }
}

/// For each row, the line of an earlier identical row, if any. Rows are
/// hashed in parallel; equal hashes are confirmed by comparing the fields,
/// so a hash collision can never reject a row.
fn duplicates(cols: &[Vec<Option<&str>>], lines: &[u64]) -> Vec<Option<u64>> {
    let n = lines.len();
    let state = ahash::RandomState::with_seeds(0x5741_5244, 1, 2, 3);
    let hashes: Vec<u64> = (0..n)
        .into_par_iter()
        .map(|row| {
            let mut h = state.build_hasher();
            cols.iter().for_each(|c| c[row].hash(&mut h));
            h.finish()
        })
        .collect();
    let same = |a: usize, b: usize| cols.iter().all(|c| c[a] == c[b]);
    let mut first: HashMap<u64, usize, ahash::RandomState> =
        HashMap::with_capacity_and_hasher(n, state.clone());
    let mut collided: HashMap<u64, Vec<usize>> = HashMap::new();
    (0..n)
        .map(|row| match first.entry(hashes[row]) {
            Entry::Vacant(v) => {
                v.insert(row);
                None
            }
            Entry::Occupied(o) if same(*o.get(), row) => Some(lines[*o.get()]),
            Entry::Occupied(_) => {
                let others = collided.entry(hashes[row]).or_default();
                match others.iter().find(|&&o| same(o, row)) {
                    Some(&o) => Some(lines[o]),
                    None => {
                        others.push(row);
                        None
                    }
                }
            }
        })
        .collect()
}

fn raw_of<'a>(cols: &[Vec<Option<&'a str>>], row: usize, input: Input<'a>) -> Option<&'a str> {
    match input {
        Input::Column(c) => cols[c][row],
        Input::Constant(v) => Some(v),
    }
}

/// Applies `map` and `default` to a raw cell.
fn resolve<'a>(
    spec: &'a FieldSpec,
    raw: Option<&'a str>,
) -> std::result::Result<Option<&'a str>, ()> {
    let raw = raw.map(normalize::trim).filter(|s| !s.is_empty());
    let out = match (&spec.map, raw) {
        (_, None) => spec.default.as_deref(),
        (Some(map), Some(v)) => match map.get(v) {
            Some(m) => Some(m.as_str()),
            None if spec.keep_unmapped => Some(v),
            None => Some(spec.default.as_deref().ok_or(())?),
        },
        (None, Some(v)) => Some(v),
    };
    Ok(out.map(normalize::trim).filter(|s| !s.is_empty()))
}

type ParseResult<'a> = std::result::Result<Cell<'a>, (&'static str, String)>;

fn vocab<'a>(v: Option<&'static str>, target: &str, expected: &str) -> ParseResult<'a> {
    v.map(|s| Cell::Str(Cow::Borrowed(s))).ok_or((
        "invalid_value",
        format!("{target}: not recognised (expected {expected}); add a 'map' to the mapping"),
    ))
}

/// The rule of a flagged value (see [`MappedFile::flagged`]).
pub const UNRECOGNIZED: &str = "unrecognized_value";

/// One row being mapped: its canonical cells and what went wrong. Reused
/// across the rows of a chunk.
struct MappedRow<'a> {
    /// One cell per column of the table, in schema order.
    cells: Vec<Cell<'a>>,
    /// (system, code) of every coding of the row, the primary one first.
    codings: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    violations: Vec<Violation<'a>>,
    /// Labels of the columns whose value was kept as `unknown` (or empty).
    flags: Vec<&'a str>,
    /// Per column: it already has a violation (no limit on the width).
    failed: Vec<bool>,
}

impl<'a> MappedRow<'a> {
    fn new(table: Table) -> MappedRow<'a> {
        MappedRow {
            cells: vec![Cell::Null; table.columns().len()],
            codings: Vec::new(),
            violations: Vec::new(),
            flags: Vec::new(),
            failed: vec![false; table.columns().len()],
        }
    }

    /// Ready for the next row.
    fn clear(&mut self) {
        self.cells.iter_mut().for_each(|c| *c = Cell::Null);
        self.codings.clear();
        self.violations.clear();
        self.flags.clear();
        self.failed.fill(false);
    }

    /// Records a violation of column `target` (schema index).
    fn fail(&mut self, plan: &Plan<'a>, target: usize, rule: &'static str, message: String) {
        self.violations.push(Violation {
            column: plan.labels.get(target).copied().unwrap_or("*"),
            rule,
            message,
        });
        if let Some(failed) = self.failed.get_mut(target) {
            *failed = true;
        }
    }

    fn has_failed(&self, column: usize) -> bool {
        self.failed.get(column).copied().unwrap_or(false)
    }
}

/// Maps row `row` of `cols` into `out` (cleared by the caller): each field,
/// then the checks across fields.
fn map_row<'a>(
    cols: &[Vec<Option<&'a str>>],
    row: usize,
    plan: &Plan<'a>,
    ctx: &RowContext,
    extra: Option<&'a [(String, String)]>,
    out: &mut MappedRow<'a>,
) {
    for f in &plan.fields {
        map_field(f, raw_of(cols, row, f.input), plan, ctx, out);
    }
    observation_value(cols, row, plan, out);
    collect_codings(cols, row, plan, extra, out);
    canonical_lab_value(plan, out);
    check_required(plan, out);
    check_dates(plan, ctx, out);
}

/// Maps one field's raw value into its cell, or records why it cannot be.
fn map_field<'a>(
    f: &FieldPlan<'a>,
    raw: Option<&'a str>,
    plan: &Plan<'a>,
    ctx: &RowContext,
    out: &mut MappedRow<'a>,
) {
    let target = plan.table.columns()[f.target].name;
    let value = match resolve(f.spec, raw) {
        Ok(v) => v,
        Err(()) => {
            let message = format!(
                "{target}: value is not listed in the mapping's map and there is no default"
            );
            out.fail(plan, f.target, "unmapped_value", message);
            return;
        }
    };
    let Some(v) = value else {
        if f.kind == Kind::Sex {
            out.cells[f.target] = Cell::Str(Cow::Borrowed("unknown"));
        }
        return;
    };
    // A demographic value Ward cannot normalize is kept as `unknown`
    // (a state: left empty) and flagged, never a reason to refuse the
    // person and everything recorded about them.
    let demographic = match f.kind {
        Kind::Sex => Some((normalize::sex(v), Some("unknown"))),
        Kind::Race => Some((normalize::race(v), Some("unknown"))),
        Kind::Ethnicity => Some((normalize::ethnicity(v), Some("unknown"))),
        Kind::State => Some((normalize::state(v), None)),
        _ => None,
    };
    if let Some((normalized, fallback)) = demographic {
        out.cells[f.target] = normalized
            .or(fallback)
            .map_or(Cell::Null, |s| Cell::Str(Cow::Borrowed(s)));
        if normalized.is_none() {
            out.flags
                .push(plan.labels.get(f.target).copied().unwrap_or(target));
        }
        return;
    }
    if plan.table == Table::Patient && target == "birth_date" {
        patient_birth_date(f, v, plan, ctx, out);
        return;
    }
    match parse_value(f, v, target, &plan.at, &out.cells) {
        Ok(cell) => out.cells[f.target] = cell,
        Err((rule, message)) => out.fail(plan, f.target, rule, message),
    }
}

/// A patient's birth date. One Ward cannot use (unparseable, partial,
/// before 1900, after the as-of day) is left empty and flagged: the patient
/// is kept and linked on the rest of their record (with the year and month
/// it still shows, `birth_date_partial`), and measures that need an age
/// leave them out.
fn patient_birth_date<'a>(
    f: &FieldPlan<'a>,
    v: &'a str,
    plan: &Plan<'a>,
    ctx: &RowContext,
    out: &mut MappedRow<'a>,
) {
    let earliest = NaiveDate::from_ymd_opt(1900, 1, 1).expect("valid date");
    match normalize::date(v, f.formats).filter(|d| *d >= earliest && *d <= ctx.today) {
        Some(day) => out.cells[f.target] = Cell::Date(day),
        None => {
            out.flags
                .push(plan.labels.get(f.target).copied().unwrap_or("birth_date"));
            if let (Some(i), Some(partial)) = (
                plan.at.birth_date_partial,
                normalize::partial_date(v, earliest.year(), ctx.today.year()),
            ) {
                out.cells[i] = Cell::Str(Cow::Owned(partial));
            }
        }
    }
}

/// Parses and normalizes a non-empty value of column `target` by its kind
/// (demographics and birth dates are handled by the caller). A code is
/// checked against the row's code system, already in `cells`.
fn parse_value<'a>(
    f: &FieldPlan<'a>,
    v: &'a str,
    target: &str,
    at: &Columns,
    cells: &[Cell<'a>],
) -> ParseResult<'a> {
    let unparseable_date = || {
        (
            "unparseable_date",
            format!("{target}: does not match {}", formats_text(f.formats)),
        )
    };
    match f.kind {
        Kind::Id | Kind::Text => Ok(Cell::Str(Cow::Borrowed(v))),
        Kind::Date => normalize::date(v, f.formats)
            .map(Cell::Date)
            .ok_or_else(unparseable_date),
        Kind::Timestamp => normalize::timestamp(v, f.formats)
            .map(Cell::Ts)
            .ok_or_else(unparseable_date),
        Kind::Float => normalize::number(v)
            .map(Cell::F64)
            .ok_or_else(|| ("unparseable_number", format!("{target}: not a number"))),
        Kind::EncounterClass => vocab(
            normalize::encounter_class(v),
            target,
            "ambulatory, emergency, inpatient, virtual, other",
        ),
        Kind::PostalCode => Ok(Cell::Str(Cow::Owned(normalize::postal_code(
            v,
            f.us_postal,
        )))),
        Kind::CodeSystem => normalize::code_system(v)
            .map(|s| Cell::Str(Cow::Borrowed(s)))
            .ok_or_else(|| {
                (
                    "unknown_code_system",
                    format!("{target}: not a known code system"),
                )
            }),
        Kind::Code => {
            let system_ix = if target == "value_code" {
                at.value_code_system
            } else {
                at.code_system
            };
            match system_ix.and_then(|i| cells[i].str()) {
                Some(system) => normalize::code(system, v)
                    .map(Cell::Str)
                    .map_err(|rule| (rule, format!("{target}: not a valid {system} code"))),
                // The code system failed or is missing: reported there.
                None => Ok(Cell::Str(Cow::Borrowed(v))),
            }
        }
        Kind::Unit => Ok(Cell::Str(Cow::Borrowed(normalize::unit(v)))),
        Kind::Token => Ok(Cell::Str(normalize::token(v))),
        Kind::Bool => match v.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" => Ok(Cell::Bool(true)),
            "false" | "no" | "n" | "0" => Ok(Cell::Bool(false)),
            _ => Err(("invalid_value", format!("{target}: not true or false"))),
        },
        Kind::Sex | Kind::Race | Kind::Ethnicity | Kind::State => {
            unreachable!("demographics are handled by map_field")
        }
        Kind::Codings | Kind::Line => unreachable!("not mappable"),
    }
}

/// Observation `value`: a number when it parses, text otherwise.
fn observation_value<'a>(
    cols: &[Vec<Option<&'a str>>],
    row: usize,
    plan: &Plan<'a>,
    out: &mut MappedRow<'a>,
) {
    let at = &plan.at;
    if let (Some(f), Some(num), Some(text)) = (&plan.value, at.value_num, at.value_text)
        && let Ok(Some(v)) = resolve(f.spec, raw_of(cols, row, f.input))
    {
        match normalize::number(v) {
            Some(x) => out.cells[num] = Cell::F64(x),
            None => out.cells[text] = Cell::Str(Cow::Borrowed(v)),
        }
    }
}

/// All codings: the primary one, then the mapping's extra columns, then
/// `extra` (FHIR). A row coded only by those gets the first as its primary
/// code.
fn collect_codings<'a>(
    cols: &[Vec<Option<&'a str>>],
    row: usize,
    plan: &Plan<'a>,
    extra: Option<&'a [(String, String)]>,
    out: &mut MappedRow<'a>,
) {
    let at = &plan.at;
    let (Some(_), Some(system_ix), Some(code_ix)) = (at.codings, at.code_system, at.code) else {
        return;
    };
    if let (Cell::Str(s), Cell::Str(c)) = (&out.cells[system_ix], &out.cells[code_ix]) {
        out.codings.push((s.clone(), c.clone()));
    }
    for (system, col, label) in &plan.codings {
        if let Some(raw) = cols[*col][row] {
            match normalize::code(system, raw) {
                Ok(code) => out.codings.push((Cow::Borrowed(*system), code)),
                Err(rule) => out.violations.push(Violation {
                    column: label,
                    rule,
                    message: format!("codings: not a valid {system} code"),
                }),
            }
        }
    }
    for (system, code) in extra.into_iter().flatten() {
        match normalize::code_system(system) {
            Some(short) => match normalize::code(short, code) {
                Ok(code) => out.codings.push((Cow::Borrowed(short), code)),
                Err(rule) => out.violations.push(Violation {
                    column: "codings",
                    rule,
                    message: format!("codings: not a valid {short} code"),
                }),
            },
            // A system Ward does not know: kept as written, not checked.
            None => out
                .codings
                .push((Cow::Borrowed(system.as_str()), Cow::Borrowed(code.as_str()))),
        }
    }
    let required = plan.table.columns()[code_ix].required;
    if out.cells[code_ix].str().is_none() && !out.has_failed(code_ix) && required {
        // A row coded only by extra codings: the first one is primary.
        if let Some((s, c)) = out.codings.first() {
            out.cells[system_ix] = Cell::Str(s.clone());
            out.cells[code_ix] = Cell::Str(c.clone());
        }
    }
}

/// Lab values in canonical units, within plausible ranges.
fn canonical_lab_value<'a>(plan: &Plan<'a>, out: &mut MappedRow<'a>) {
    let at = &plan.at;
    if let (Some(num), Some(unit_ix), Some(system_ix), Some(code_ix)) =
        (at.value_num, at.unit, at.code_system, at.code)
        && let Cell::F64(v) = out.cells[num]
        && out.cells[system_ix].str() == Some("loinc")
        && let Some(code) = out.cells[code_ix].str()
    {
        match normalize::lab_value(code, v, out.cells[unit_ix].str()) {
            Ok((value, unit)) => {
                out.cells[num] = Cell::F64(value);
                if let Some(u) = unit {
                    let reported =
                        std::mem::replace(&mut out.cells[unit_ix], Cell::Str(Cow::Borrowed(u)));
                    if let (Some(o), Some(r)) = (at.original_unit, reported.str())
                        && normalize::unit(r) != u
                    {
                        out.cells[o] = Cell::Str(Cow::Owned(normalize::unit(r).to_string()));
                    }
                }
            }
            Err((rule, message)) => out.fail(plan, num, rule, format!("value_num: {message}")),
        }
    }
}

/// Required values: missing, and not already failed for another reason.
fn check_required<'a>(plan: &Plan<'a>, out: &mut MappedRow<'a>) {
    for (i, c) in plan.table.columns().iter().enumerate() {
        if c.required && c.mappable && !out.has_failed(i) && matches!(out.cells[i], Cell::Null) {
            let message = format!("{}: required value is missing", c.name);
            out.fail(plan, i, "required", message);
        }
    }
}

/// Dates: not in the future, not before birth (the row's own, or its
/// patient's, who must be known), ends not before starts.
fn check_dates<'a>(plan: &Plan<'a>, ctx: &RowContext, out: &mut MappedRow<'a>) {
    let (at, table, columns) = (&plan.at, plan.table, plan.table.columns());
    let birth = match at.birth_date {
        Some(b) => out.cells[b].day(),
        None => match (ctx.patients, out.cells[at.patient_id].str()) {
            (Some(patients), Some(id)) => match patients.get(id) {
                Some(b) => *b,
                None => {
                    let message =
                        "source_patient_id: no accepted patient of this source has this id".into();
                    out.fail(plan, at.patient_id, "unknown_patient", message);
                    None
                }
            },
            _ => None,
        },
    };
    for &(i, name) in &at.events {
        let Some(day) = out.cells[i].day() else {
            continue;
        };
        if day > ctx.today && !table.may_be_future(name) {
            let message = format!("{name}: after {}", ctx.today);
            out.fail(plan, i, "future_date", message);
        } else if birth.is_some_and(|b| day < b) {
            let message = format!("{name}: before the patient's birth date");
            out.fail(plan, i, "before_birth", message);
        }
    }
    if let Some((s, e)) = at.period
        && let (Some(a), Some(b)) = (out.cells[s].time(), out.cells[e].time())
        && b < a
    {
        let message = format!("{}: before {}", columns[e].name, columns[s].name);
        out.fail(plan, e, "end_before_start", message);
    }
}

fn formats_text(formats: &[DateFormat]) -> String {
    formats
        .iter()
        .map(DateFormat::as_str)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The record as a JSON object keyed by header name.
fn raw_json(text: &TextTable, row: usize) -> String {
    let mut obj = serde_json::Map::new();
    for (c, name) in text.header.iter().enumerate() {
        let v = text.cell(c, row);
        obj.insert(
            name.clone(),
            v.map_or(serde_json::Value::Null, |s| s.into()),
        );
    }
    serde_json::Value::Object(obj).to_string()
}

/// Typed Arrow builders for one chunk of one table.
struct Builders(Vec<Box<dyn ArrayBuilder>>);

impl Builders {
    fn new(table: Table, capacity: usize) -> Builders {
        Builders(
            table
                .columns()
                .iter()
                .map(|c| -> Box<dyn ArrayBuilder> {
                    match c.kind.data_type() {
                        DataType::Utf8 => {
                            Box::new(StringBuilder::with_capacity(capacity, capacity * 8))
                        }
                        DataType::Date32 => Box::new(Date32Builder::with_capacity(capacity)),
                        DataType::Timestamp(..) => {
                            Box::new(TimestampMicrosecondBuilder::with_capacity(capacity))
                        }
                        DataType::Float64 => Box::new(Float64Builder::with_capacity(capacity)),
                        DataType::Boolean => Box::new(BooleanBuilder::with_capacity(capacity)),
                        DataType::UInt64 => Box::new(UInt64Builder::with_capacity(capacity)),
                        DataType::List(_) => Box::new(ListBuilder::new(
                            StructBuilder::from_fields(coding_fields(), capacity),
                        )),
                        other => unreachable!("no builder for {other}"),
                    }
                })
                .collect(),
        )
    }

    fn append(
        &mut self,
        ctx: &RowContext,
        line: u64,
        cells: &[Cell],
        codings: &[(Cow<str>, Cow<str>)],
    ) {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
        let n = self.0.len();
        for (i, b) in self.0.iter_mut().enumerate() {
            let any = b.as_any_mut();
            if i == 0 {
                downcast::<StringBuilder>(any).append_value(ctx.source);
            } else if i == n - 2 {
                downcast::<StringBuilder>(any).append_value(ctx.file);
            } else if i == n - 1 {
                downcast::<UInt64Builder>(any).append_value(line);
            } else if let Some(b) = any.downcast_mut::<StringBuilder>() {
                b.append_option(cells[i].str());
            } else if let Some(b) = any.downcast_mut::<Date32Builder>() {
                b.append_option(cells[i].day().map(|d| (d - epoch).num_days() as i32));
            } else if let Some(b) = any.downcast_mut::<TimestampMicrosecondBuilder>() {
                b.append_option(cells[i].time().map(|t| t.and_utc().timestamp_micros()));
            } else if let Some(b) = any.downcast_mut::<BooleanBuilder>() {
                b.append_option(match cells[i] {
                    Cell::Bool(v) => Some(v),
                    _ => None,
                });
            } else if let Some(b) = any.downcast_mut::<Float64Builder>() {
                b.append_option(match cells[i] {
                    Cell::F64(v) => Some(v),
                    _ => None,
                });
            } else {
                let b = downcast::<ListBuilder<StructBuilder>>(any);
                let values = b.values();
                for (system, code) in codings {
                    values
                        .field_builder::<StringBuilder>(0)
                        .expect("system field")
                        .append_value(system);
                    values
                        .field_builder::<StringBuilder>(1)
                        .expect("code field")
                        .append_value(code);
                    values.append(true);
                }
                b.append(true);
            }
        }
    }

    fn finish(self, table: Table, ctx: &RowContext) -> Result<RecordBatch> {
        let arrays: Vec<ArrayRef> = self.0.into_iter().map(|mut b| b.finish()).collect();
        RecordBatch::try_new(table.schema(), arrays)
            .map_err(|e| WardError::data("building canonical rows", ctx.path, e))
    }
}

fn downcast<T: 'static>(any: &mut dyn std::any::Any) -> &mut T {
    any.downcast_mut::<T>().expect("builder matches the schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-column violation marks have no width limit (a bit mask
    /// of 64 columns would overflow on a wider table) and reset per row.
    #[test]
    fn violation_marks_are_per_column_and_reset_per_row() {
        let mut row = MappedRow::new(Table::Observation);
        let last = Table::Observation.columns().len() - 1;
        assert!(!row.has_failed(0) && !row.has_failed(last + 100));
        row.failed[last] = true;
        assert!(row.has_failed(last) && !row.has_failed(last - 1));
        row.clear();
        assert!(!row.has_failed(last));
    }
}
