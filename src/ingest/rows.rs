//! Turning an extract's text rows into canonical rows: apply the mapping,
//! cast, normalize, validate, and build the Arrow batch of accepted rows plus
//! one reject per refused row.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{NaiveDate, NaiveDateTime};
use datafusion::arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, ListBuilder, RecordBatch, StringBuilder,
    StructBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use datafusion::arrow::datatypes::DataType;
use rayon::prelude::*;

use super::csv::TextTable;
use super::normalize;
use crate::error::{Result, WardError};
use crate::mapping::{FieldSpec, FileMapping, ValueSource};
use crate::schema::{Kind, Table, coding_fields};

/// What a file's rows are checked against.
pub struct RowContext<'a> {
    /// The extract, for error messages.
    pub path: &'a Path,
    pub source: &'a str,
    /// The file's name relative to the source's folder (stored as lineage).
    pub file: &'a str,
    /// Dates after this day are `future_date`.
    pub today: NaiveDate,
    /// Birth dates of the source's accepted patients, when the source
    /// delivers patients: facts of other patient ids are `unknown_patient`.
    pub patients: Option<&'a HashMap<String, NaiveDate>>,
}

/// One refused source record.
#[derive(Debug, Clone)]
pub struct RejectRow {
    pub line: u64,
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
    pub batch: RecordBatch,
    pub rejects: Vec<RejectRow>,
}

#[derive(Debug, Clone)]
enum Cell {
    Null,
    Str(String),
    Date(NaiveDate),
    Ts(NaiveDateTime),
    F64(f64),
    Codings(Vec<(String, String)>),
}

impl Cell {
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
}

struct Violation {
    column: String,
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
    formats: &'a [String],
}

struct Plan<'a> {
    table: Table,
    fields: Vec<FieldPlan<'a>>,
    value: Option<FieldPlan<'a>>,
    codings: Vec<(&'static str, usize, &'a str)>,
}

impl Plan<'_> {
    fn index(&self, name: &str) -> usize {
        self.table
            .columns()
            .iter()
            .position(|c| c.name == name)
            .expect("column of the table")
    }
    fn label(&self, target: usize) -> String {
        self.fields
            .iter()
            .chain(self.value.iter())
            .find(|f| f.target == target)
            .map_or_else(
                || self.table.columns()[target].name.to_string(),
                |f| f.label.to_string(),
            )
    }
}

fn plan<'a>(text: &TextTable, fm: &'a FileMapping, ctx: &RowContext) -> Result<Plan<'a>> {
    let table = fm.table;
    let find = |name: &str, target: &str| -> Result<usize> {
        text.header.iter().position(|h| h == name).ok_or_else(|| WardError::Extract {
            path: ctx.path.to_path_buf(),
            line: Some(1),
            message: format!(
                "mapping names column '{name}' (for {target}) but the header has no such column; header: {}",
                text.header.join(", ")
            ),
        })
    };
    let field = |target: &'static str, spec: &'a FieldSpec| -> Result<FieldPlan<'a>> {
        let index = table.columns().iter().position(|c| c.name == target);
        let kind = index.map_or(Kind::Text, |i| table.columns()[i].kind);
        let (input, label) = match &spec.source {
            ValueSource::Column(c) => (Input::Column(find(c, target)?), c.as_str()),
            ValueSource::Constant(v) => (Input::Constant(v.as_str()), target),
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
    Ok(Plan {
        table,
        fields,
        value,
        codings,
    })
}

/// Maps, validates and converts every well-formed row of `text`; rows that
/// fail any rule become rejects (structural rejects of the reader included).
pub fn map_rows(text: &TextTable, fm: &FileMapping, ctx: &RowContext) -> Result<MappedFile> {
    let plan = plan(text, fm, ctx)?;
    let n = text.lines.len();

    // Exact duplicates: a record identical to an earlier one in the file.
    let mut first_seen: HashMap<Vec<Option<&str>>, u64> = HashMap::with_capacity(n);
    let duplicate_of: Vec<Option<u64>> = (0..n)
        .map(|row| {
            let key: Vec<Option<&str>> =
                (0..text.header.len()).map(|c| text.cell(c, row)).collect();
            match first_seen.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(text.lines[row]);
                    None
                }
            }
        })
        .collect();

    let outcomes: Vec<std::result::Result<Vec<Cell>, Vec<Violation>>> = (0..n)
        .into_par_iter()
        .map(|row| {
            let mut violations = Vec::new();
            if let Some(first) = duplicate_of[row] {
                violations.push(Violation {
                    column: "*".into(),
                    rule: "duplicate_row",
                    message: format!("exact duplicate of line {first}"),
                });
            }
            let cells = map_row(text, row, &plan, ctx, &mut violations);
            if violations.is_empty() {
                Ok(cells)
            } else {
                Err(violations)
            }
        })
        .collect();

    let mut accepted: Vec<(u64, Vec<Cell>)> = Vec::with_capacity(n);
    let mut rejects: Vec<RejectRow> = text
        .rejects
        .iter()
        .map(|r| RejectRow {
            line: r.line,
            column: None,
            rule: r.rule,
            message: r.message.clone(),
            errors: format!("*: {}", r.rule),
            raw: r.raw.clone(),
        })
        .collect();
    for (row, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(cells) => accepted.push((text.lines[row], cells)),
            Err(v) => rejects.push(RejectRow {
                line: text.lines[row],
                column: Some(v[0].column.clone()).filter(|c| c != "*"),
                rule: v[0].rule,
                message: v[0].message.clone(),
                errors: v
                    .iter()
                    .map(|v| format!("{}: {}", v.column, v.rule))
                    .collect::<Vec<_>>()
                    .join("; "),
                raw: raw_json(text, row),
            }),
        }
    }
    rejects.sort_by_key(|r| r.line);
    let batch = build_batch(plan.table, ctx, &accepted)?;
    Ok(MappedFile { batch, rejects })
}

fn raw_of<'x>(text: &'x TextTable, row: usize, input: Input<'x>) -> Option<&'x str> {
    match input {
        Input::Column(c) => text.cell(c, row),
        Input::Constant(v) => Some(v),
    }
}

/// Applies `map` and `default` to a raw cell.
fn resolve<'x>(
    spec: &'x FieldSpec,
    raw: Option<&'x str>,
) -> std::result::Result<Option<&'x str>, ()> {
    let raw = raw.map(str::trim).filter(|s| !s.is_empty());
    let out = match (&spec.map, raw) {
        (_, None) => spec.default.as_deref(),
        (Some(map), Some(v)) => match map.get(v) {
            Some(m) => Some(m.as_str()),
            None if spec.keep_unmapped => Some(v),
            None => Some(spec.default.as_deref().ok_or(())?),
        },
        (None, Some(v)) => Some(v),
    };
    Ok(out.map(str::trim).filter(|s| !s.is_empty()))
}

fn map_row(
    text: &TextTable,
    row: usize,
    plan: &Plan,
    ctx: &RowContext,
    violations: &mut Vec<Violation>,
) -> Vec<Cell> {
    let table = plan.table;
    let columns = table.columns();
    let mut cells = vec![Cell::Null; columns.len()];
    let mut failed = vec![false; columns.len()];
    let fail =
        |violations: &mut Vec<Violation>, column: &str, rule: &'static str, message: String| {
            violations.push(Violation {
                column: column.to_string(),
                rule,
                message,
            });
        };

    for f in &plan.fields {
        let target = columns[f.target].name;
        let value = match resolve(f.spec, raw_of(text, row, f.input)) {
            Ok(v) => v,
            Err(()) => {
                fail(
                    violations,
                    f.label,
                    "unmapped_value",
                    format!(
                        "{target}: value is not listed in the mapping's map and there is no default"
                    ),
                );
                failed[f.target] = true;
                continue;
            }
        };
        let Some(v) = value else {
            if f.kind == Kind::Sex {
                cells[f.target] = Cell::Str("unknown".into());
            }
            continue;
        };
        let parsed = match f.kind {
            Kind::Id | Kind::Text => Ok(Cell::Str(v.to_string())),
            Kind::Date => normalize::date(v, f.formats).map(Cell::Date).ok_or((
                "unparseable_date",
                format!("{target}: does not match {}", f.formats.join(" or ")),
            )),
            Kind::Timestamp => normalize::timestamp(v, f.formats).map(Cell::Ts).ok_or((
                "unparseable_date",
                format!("{target}: does not match {}", f.formats.join(" or ")),
            )),
            Kind::Float => normalize::number(v)
                .map(Cell::F64)
                .ok_or(("unparseable_number", format!("{target}: not a number"))),
            Kind::Sex => vocab(normalize::sex(v), target, "female, male, other, unknown"),
            Kind::EncounterClass => vocab(
                normalize::encounter_class(v),
                target,
                "ambulatory, emergency, inpatient, virtual, other",
            ),
            Kind::Race => vocab(normalize::race(v), target, "an OMB race category"),
            Kind::Ethnicity => vocab(normalize::ethnicity(v), target, "an OMB ethnicity category"),
            Kind::State => Ok(Cell::Str(
                normalize::state(v).map_or_else(|| v.to_string(), str::to_string),
            )),
            Kind::PostalCode => Ok(Cell::Str(normalize::postal_code(v))),
            Kind::CodeSystem => normalize::code_system(v)
                .map(|s| Cell::Str(s.to_string()))
                .ok_or((
                    "unknown_code_system",
                    format!("{target}: not a known code system"),
                )),
            Kind::Code => {
                let system_col = if target == "value_code" {
                    "value_code_system"
                } else {
                    "code_system"
                };
                match cells[plan.index(system_col)].str() {
                    Some(system) => normalize::code(system, v)
                        .map(Cell::Str)
                        .map_err(|rule| (rule, format!("{target}: not a valid {system} code"))),
                    // The code system failed or is missing: reported there.
                    None => Ok(Cell::Str(v.to_string())),
                }
            }
            Kind::Unit => Ok(Cell::Str(normalize::unit(v))),
            Kind::Token => Ok(Cell::Str(normalize::token(v))),
            Kind::Codings | Kind::Line => unreachable!("not mappable"),
        };
        match parsed {
            Ok(cell) => cells[f.target] = cell,
            Err((rule, message)) => {
                fail(violations, f.label, rule, message);
                failed[f.target] = true;
            }
        }
    }

    // Observation `value`: a number when it parses, text otherwise.
    if let Some(f) = &plan.value
        && let Ok(Some(v)) = resolve(f.spec, raw_of(text, row, f.input))
    {
        match normalize::number(v) {
            Some(x) => cells[plan.index("value_num")] = Cell::F64(x),
            None => cells[plan.index("value_text")] = Cell::Str(v.to_string()),
        }
    }

    // All codings: the primary one, then the mapping's extra columns.
    if let Some(codings_ix) = columns.iter().position(|c| c.kind == Kind::Codings) {
        let mut codings = Vec::new();
        if let (Some(s), Some(c)) = (
            cells[plan.index("code_system")].str(),
            cells[plan.index("code")].str(),
        ) {
            codings.push((s.to_string(), c.to_string()));
        }
        for (system, col, label) in &plan.codings {
            if let Some(raw) = text.cell(*col, row) {
                match normalize::code(system, raw) {
                    Ok(code) => codings.push((system.to_string(), code)),
                    Err(rule) => fail(
                        violations,
                        label,
                        rule,
                        format!("codings: not a valid {system} code"),
                    ),
                }
            }
        }
        let code_ix = plan.index("code");
        if cells[code_ix].str().is_none() && !failed[code_ix] && columns[code_ix].required {
            // A row coded only by extra codings: the first one is primary.
            if let Some((s, c)) = codings.first() {
                cells[plan.index("code_system")] = Cell::Str(s.clone());
                cells[code_ix] = Cell::Str(c.clone());
            }
        }
        cells[codings_ix] = Cell::Codings(codings);
    }

    // Lab values in canonical units, within plausible ranges.
    if table == Table::Observation
        && let Cell::F64(v) = cells[plan.index("value_num")]
        && cells[plan.index("code_system")].str() == Some("loinc")
        && let Some(code) = cells[plan.index("code")].str()
    {
        let unit_ix = plan.index("unit");
        match normalize::lab_value(code, v, cells[unit_ix].str()) {
            Ok((value, unit)) => {
                cells[plan.index("value_num")] = Cell::F64(value);
                if let Some(u) = unit {
                    cells[unit_ix] = Cell::Str(u);
                }
            }
            Err((rule, message)) => {
                let ix = plan.index("value_num");
                let label = plan
                    .value
                    .as_ref()
                    .map_or_else(|| plan.label(ix), |f| f.label.to_string());
                fail(violations, &label, rule, format!("value_num: {message}"));
            }
        }
    }

    // Required values.
    for (i, c) in columns.iter().enumerate() {
        if c.required && c.mappable && !failed[i] && matches!(cells[i], Cell::Null) {
            fail(
                violations,
                &plan.label(i),
                "required",
                format!("{}: required value is missing", c.name),
            );
        }
    }

    // Dates: not in the future, not before birth, ends not before starts.
    let birth = if table == Table::Patient {
        let b = cells[plan.index("birth_date")].day();
        if let Some(b) = b {
            if b > ctx.today {
                fail(
                    violations,
                    &plan.label(plan.index("birth_date")),
                    "future_date",
                    format!("birth_date: after {}", ctx.today),
                );
            } else if b < NaiveDate::from_ymd_opt(1900, 1, 1).expect("valid date") {
                fail(
                    violations,
                    &plan.label(plan.index("birth_date")),
                    "implausible_value",
                    "birth_date: before 1900".into(),
                );
            }
        }
        b
    } else {
        match (ctx.patients, cells[plan.index("source_patient_id")].str()) {
            (Some(patients), Some(id)) => match patients.get(id) {
                Some(b) => Some(*b),
                None => {
                    fail(
                        violations,
                        &plan.label(plan.index("source_patient_id")),
                        "unknown_patient",
                        "source_patient_id: no accepted patient of this source has this id".into(),
                    );
                    None
                }
            },
            _ => None,
        }
    };
    for name in table.event_columns() {
        let i = plan.index(name);
        let Some(day) = cells[i].day() else { continue };
        if day > ctx.today {
            fail(
                violations,
                &plan.label(i),
                "future_date",
                format!("{name}: after {}", ctx.today),
            );
        } else if birth.is_some_and(|b| day < b) {
            fail(
                violations,
                &plan.label(i),
                "before_birth",
                format!("{name}: before the patient's birth date"),
            );
        }
    }
    if let Some((start, end)) = table.period_columns() {
        let (s, e) = (plan.index(start), plan.index(end));
        if let (Some(a), Some(b)) = (cell_time(&cells[s]), cell_time(&cells[e]))
            && b < a
        {
            fail(
                violations,
                &plan.label(e),
                "end_before_start",
                format!("{end}: before {start}"),
            );
        }
    }
    cells
}

fn cell_time(c: &Cell) -> Option<NaiveDateTime> {
    match c {
        Cell::Ts(t) => Some(*t),
        Cell::Date(d) => d.and_hms_opt(0, 0, 0),
        _ => None,
    }
}

fn vocab(
    v: Option<&'static str>,
    target: &str,
    expected: &str,
) -> std::result::Result<Cell, (&'static str, String)> {
    v.map(|s| Cell::Str(s.to_string())).ok_or((
        "invalid_value",
        format!("{target}: not recognised (expected {expected}); add a 'map' to the mapping"),
    ))
}

/// The record as a JSON object keyed by header name.
fn raw_json(text: &TextTable, row: usize) -> String {
    let mut obj = serde_json::Map::new();
    for (c, name) in text.header.iter().enumerate() {
        let v = text.frame.columns()[c].str().ok().and_then(|s| s.get(row));
        obj.insert(
            name.clone(),
            v.map_or(serde_json::Value::Null, |s| s.into()),
        );
    }
    serde_json::Value::Object(obj).to_string()
}

fn build_batch(table: Table, ctx: &RowContext, rows: &[(u64, Vec<Cell>)]) -> Result<RecordBatch> {
    let schema = table.schema();
    let n = rows.len();
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, col) in table.columns().iter().enumerate() {
        let array: ArrayRef = match (col.name, col.kind.data_type()) {
            ("source", _) => Arc::new(
                std::iter::repeat_n(Some(ctx.source), n)
                    .collect::<datafusion::arrow::array::StringArray>(),
            ),
            ("source_file", _) => Arc::new(
                std::iter::repeat_n(Some(ctx.file), n)
                    .collect::<datafusion::arrow::array::StringArray>(),
            ),
            ("source_line", _) => {
                let mut b = UInt64Builder::with_capacity(n);
                rows.iter().for_each(|(line, _)| b.append_value(*line));
                Arc::new(b.finish())
            }
            (_, DataType::Utf8) => {
                let mut b = StringBuilder::with_capacity(n, n * 8);
                rows.iter().for_each(|(_, c)| b.append_option(c[i].str()));
                Arc::new(b.finish())
            }
            (_, DataType::Date32) => {
                let mut b = Date32Builder::with_capacity(n);
                for (_, c) in rows {
                    b.append_option(c[i].day().map(|d| (d - epoch).num_days() as i32));
                }
                Arc::new(b.finish())
            }
            (_, DataType::Timestamp(..)) => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(n);
                for (_, c) in rows {
                    b.append_option(cell_time(&c[i]).map(|t| t.and_utc().timestamp_micros()));
                }
                Arc::new(b.finish())
            }
            (_, DataType::Float64) => {
                let mut b = Float64Builder::with_capacity(n);
                for (_, c) in rows {
                    b.append_option(match c[i] {
                        Cell::F64(v) => Some(v),
                        _ => None,
                    });
                }
                Arc::new(b.finish())
            }
            (_, DataType::List(_)) => {
                let mut b = ListBuilder::new(StructBuilder::from_fields(coding_fields(), n));
                for (_, c) in rows {
                    if let Cell::Codings(list) = &c[i] {
                        let values = b.values();
                        for (system, code) in list {
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
                    }
                    b.append(true);
                }
                Arc::new(b.finish())
            }
            (name, other) => unreachable!("column {name} of type {other} has no builder"),
        };
        arrays.push(array);
    }
    RecordBatch::try_new(schema, arrays).map_err(|e| WardError::Data {
        context: "building canonical rows",
        path: ctx.path.to_path_buf(),
        message: e.to_string(),
    })
}
