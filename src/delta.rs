//! Person-level incremental nights: which persons' core rows differ
//! between the current run and tonight ([`touched`]), and tonight's core
//! restricted to those persons ([`restrict`]). A stage whose results are
//! per person (the measures) computes them over the restricted core and
//! keeps the current run's results for everyone else
//! ([`Touched::mask`] says which rows to drop).
//!
//! A person is known by a 64-bit hash of their id, and a person's rows in
//! a table by the wrapping sum of their rows' 64-bit hashes (a multiset
//! hash: a table rebuilt in another order compares equal). Where hashes
//! collide, the error is on the side of recomputing: two persons whose ids
//! share a hash are touched together, and the same test that selects a
//! person for recomputing drops their previous results. The one miss — a
//! changed person whose row sums collide — has odds of 2⁻⁶⁴.
//!
//! A core file written as a file of the current run with only some
//! persons' rows changed (the person table linkage takes but for the
//! persons whose records changed, a part without its relinked persons'
//! rows) says so in its footer ([`derived_from`]): those persons are
//! touched, and neither file is read.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;

use crate::error::{BoxError, Result, WardError};
use crate::schema::Table;

/// The column every core table names its person by.
const PERSON: &str = "person_id";

/// The persons whose core rows changed since the current run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    keys: HashSet<u64>,
    /// Of `keys`, the persons whose only change is to these columns of
    /// their person row (no row of theirs added, removed or changed in any
    /// other table), when the person table's footer says so (see
    /// [`changed_columns`]).
    person_columns: HashMap<u64, Arc<BTreeSet<String>>>,
    /// The ids of `keys` (two for two persons of one hash), where every
    /// touched person's is known: a core file is then restricted to them
    /// reading only the row groups whose statistics can hold them.
    ids: HashMap<u64, Vec<String>>,
    /// Persons in tonight's core (`core/person.parquet` rows).
    pub persons: u64,
}

impl Touched {
    /// The touched persons a reader of `columns` of the person table (and
    /// of every other core table) sees changed: a person whose only change
    /// is to other columns of their person row is left out.
    pub fn seen_by(&self, columns: &BTreeSet<String>) -> Touched {
        let seen = |k: &u64| {
            self.person_columns
                .get(k)
                .is_none_or(|changed| !changed.is_disjoint(columns))
        };
        let keys: HashSet<u64> = self.keys.iter().copied().filter(seen).collect();
        let of_keys = |k: &&u64| keys.contains(*k);
        Touched {
            person_columns: self
                .person_columns
                .iter()
                .filter(|(k, _)| of_keys(k))
                .map(|(k, c)| (*k, c.clone()))
                .collect(),
            ids: (self.ids.iter())
                .filter(|(k, _)| of_keys(k))
                .map(|(k, i)| (*k, i.clone()))
                .collect(),
            keys,
            persons: self.persons,
        }
    }

    /// The touched persons' ids, when every one is known.
    fn known_ids(&self) -> Option<BTreeSet<String>> {
        (self.ids.len() == self.keys.len()).then(|| self.ids.values().flatten().cloned().collect())
    }

    /// Whether some touched person changed only in columns of their
    /// person row (so [`Touched::seen_by`] may leave them out).
    pub fn has_person_only_changes(&self) -> bool {
        !self.person_columns.is_empty()
    }

    /// How many persons (by id hash) changed: added, removed or with any
    /// row added, removed or different in any core table.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the person with this id is touched.
    pub fn contains(&self, person_id: &str) -> bool {
        self.keys.contains(&key(person_id))
    }

    /// Per row of `batch`, whether its `person_id` is touched (a row
    /// without one is: it cannot be told apart).
    pub fn mask(&self, batch: &RecordBatch) -> std::result::Result<BooleanArray, BoxError> {
        let persons = person_ids(batch)?;
        let persons = persons.as_string::<i32>();
        Ok((0..persons.len())
            .map(|i| Some(persons.is_null(i) || self.contains(persons.value(i))))
            .collect())
    }
}

/// The hashes are computed within one process and compared within it, so
/// fixed seeds need only be fixed, not secret.
fn hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x7761_7264_5f64_656c,
        0x7461_5f70_6572_736f,
        0x6e5f_6b65_795f_3031,
        0x726f_775f_6861_7368,
    )
}

fn key(person_id: &str) -> u64 {
    hasher().hash_one(person_id.as_bytes())
}

/// The batch's `person_id` column as plain UTF-8.
fn person_ids(batch: &RecordBatch) -> std::result::Result<std::sync::Arc<dyn Array>, BoxError> {
    let column = batch
        .column_by_name(PERSON)
        .ok_or_else(|| format!("no {PERSON} column"))?;
    Ok(datafusion::arrow::compute::cast(column, &DataType::Utf8)?)
}

/// The files of each core table under `core`: `person.parquet`, then the
/// Parquet files of each fact table's folder (see
/// [`crate::link::build`]), as (path relative to `core`, files).
fn core_tables(core: &Path) -> Result<Vec<(PathBuf, Vec<PathBuf>)>> {
    let mut tables = vec![(
        PathBuf::from("person.parquet"),
        vec![core.join("person.parquet")],
    )];
    for table in Table::ALL.into_iter().filter(|t| *t != Table::Patient) {
        let files = crate::warehouse::parquet_files(&core.join(table.name()))?;
        tables.push((PathBuf::from(table.name()), files));
    }
    Ok(tables)
}

/// Footer key of a file written as another with only some persons' rows
/// changed: the other file's identity (see [`identity`]).
const DERIVED_FROM: &str = "ward.derived_from";
/// Footer key: those persons' ids, a JSON array.
const DERIVED_PERSONS: &str = "ward.derived_persons";
/// Footer key: per person of [`DERIVED_PERSONS`], which columns of their
/// row changed ([`ColumnChanges`], JSON); optional.
const DERIVED_COLUMNS: &str = "ward.derived_columns";
/// Past this many persons a file does not name them (its footer would be
/// read by every query): it is compared row by row.
const MAX_DERIVED_PERSONS: usize = 20_000;

/// A file's device, inode and size: what [`derived_from`] names it by. A
/// file of a kept run is never written again, so while it exists no other
/// file has its identity.
fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!("{}:{}:{}", m.dev(), m.ino(), m.size()))
}

/// The footer entries of a core file written as the file now at `from`
/// with only the rows of `persons` changed (removed, added or different);
/// none when `from` cannot be read or the persons are too many to name.
pub fn derived_from<'a>(
    from: &Path,
    persons: impl ExactSizeIterator<Item = &'a str>,
) -> Vec<datafusion::parquet::file::metadata::KeyValue> {
    use datafusion::parquet::file::metadata::KeyValue;
    if persons.len() > MAX_DERIVED_PERSONS {
        return Vec::new();
    }
    let Some(id) = identity(from) else {
        return Vec::new();
    };
    let persons: Vec<&str> = persons.collect();
    let persons = serde_json::to_string(&persons).expect("strings serialize");
    vec![
        KeyValue::new(DERIVED_FROM.to_string(), id),
        KeyValue::new(DERIVED_PERSONS.to_string(), persons),
    ]
}

/// The columns whose values changed, per person a footer names (in the
/// order of [`DERIVED_PERSONS`]): `of[i]` indexes `sets`, the distinct
/// column sets (a few, for thousands of persons); `None`: the person's row
/// was added or removed (every column).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ColumnChanges {
    sets: Vec<Vec<String>>,
    of: Vec<Option<u32>>,
}

/// The footer entry saying, per person of those [`derived_from`] was given
/// (in that order), which columns of their row changed (`None`: the row was
/// added or removed); see [`changed_columns`].
pub fn derived_columns(
    changes: &[Option<Vec<String>>],
) -> datafusion::parquet::file::metadata::KeyValue {
    let mut out = ColumnChanges::default();
    for change in changes {
        out.of.push(change.as_ref().map(
            |columns| match out.sets.iter().position(|s| s == columns) {
                Some(i) => i as u32,
                None => {
                    out.sets.push(columns.clone());
                    (out.sets.len() - 1) as u32
                }
            },
        ));
    }
    let json = serde_json::to_string(&out).expect("strings serialize");
    datafusion::parquet::file::metadata::KeyValue::new(DERIVED_COLUMNS.to_string(), json)
}

/// Per person of `persons`, the columns whose values differ between their
/// row in `before` and in `after` (batches of one schema, one row per
/// person, keyed by `person_id`); `None` for a person with a row on one
/// side only.
pub fn changed_columns(
    persons: &[&str],
    before: &RecordBatch,
    after: &RecordBatch,
) -> std::result::Result<Vec<Option<Vec<String>>>, BoxError> {
    let rows_of = |batch: &RecordBatch| -> std::result::Result<HashMap<String, usize>, BoxError> {
        let ids = person_ids(batch)?;
        let ids = ids.as_string::<i32>();
        Ok((0..ids.len())
            .filter(|i| ids.is_valid(*i))
            .map(|i| (ids.value(i).to_string(), i))
            .collect())
    };
    let (old, new) = (rows_of(before)?, rows_of(after)?);
    let schema = after.schema();
    // Each column's values as comparable bytes, on both sides.
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let converter = RowConverter::new(vec![SortField::new(field.data_type().clone())])?;
        let a = converter.convert_columns(&[before.column(i).clone()])?;
        let b = converter.convert_columns(&[after.column(i).clone()])?;
        columns.push((field.name().clone(), a, b));
    }
    Ok(persons
        .iter()
        .map(|p| {
            let (i, j) = (old.get(*p)?, new.get(*p)?);
            Some(
                columns
                    .iter()
                    .filter(|(_, a, b)| a.row(*i) != b.row(*j))
                    .map(|(name, _, _)| name.clone())
                    .collect(),
            )
        })
        .collect())
}

/// What a file's footer says it was derived from: the identity of that
/// file, the persons whose rows changed and, when it says so, which
/// columns of each (see [`ColumnChanges`]; ignored when it does not match
/// the persons).
fn derivation(
    footer: &ParquetRecordBatchReaderBuilder<std::fs::File>,
) -> Option<(String, Vec<String>, Option<PersonColumns>)> {
    let entries = footer.metadata().file_metadata().key_value_metadata()?;
    let get = |key: &str| {
        entries
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
    };
    let persons: Vec<String> = serde_json::from_str(&get(DERIVED_PERSONS)?).ok()?;
    let columns = get(DERIVED_COLUMNS)
        .and_then(|json| serde_json::from_str::<ColumnChanges>(&json).ok())
        .filter(|c| c.of.len() == persons.len())
        .and_then(|c| {
            let sets: Vec<Arc<BTreeSet<String>>> = c
                .sets
                .into_iter()
                .map(|s| Arc::new(s.into_iter().collect()))
                .collect();
            c.of.iter()
                .map(|i| match i {
                    Some(i) => sets.get(*i as usize).cloned().map(Some),
                    None => Some(None),
                })
                .collect::<Option<Vec<_>>>()
        });
    Some((get(DERIVED_FROM)?, persons, columns))
}

/// Per person a footer names, the columns of their row that changed
/// (`None`: every column).
pub type PersonColumns = Vec<Option<Arc<BTreeSet<String>>>>;

/// A core file written as another with only some persons' rows changed
/// (see [`derived_from`]).
pub struct Derived {
    /// The file it was written as.
    pub from: PathBuf,
    pub file: PathBuf,
    /// The persons whose rows changed.
    pub persons: Vec<String>,
    /// Per person of `persons`, which columns of their row changed, when
    /// the footer says so.
    pub columns: Option<PersonColumns>,
}

/// Of the files `added` to a core table since the files `gone` went, those
/// whose footer says they were written as one of `gone` with only some
/// persons' rows changed, with it; then the added and gone files no pair
/// holds.
pub fn pair_derived(
    added: Vec<PathBuf>,
    gone: Vec<PathBuf>,
) -> Result<(Vec<Derived>, Vec<PathBuf>, Vec<PathBuf>)> {
    let mut gone: Vec<(Option<String>, PathBuf)> =
        gone.into_iter().map(|f| (identity(&f), f)).collect();
    let (mut pairs, mut came) = (Vec::new(), Vec::new());
    for file in added {
        let from = derivation(&reader(&file)?).and_then(|(from, persons, columns)| {
            let at = gone.iter().position(|(id, _)| id.as_ref() == Some(&from))?;
            Some((at, persons, columns))
        });
        match from {
            Some((at, persons, columns)) => pairs.push(Derived {
                from: gone.swap_remove(at).1,
                file,
                persons,
                columns,
            }),
            None => came.push(file),
        }
    }
    Ok((pairs, came, gone.into_iter().map(|(_, f)| f).collect()))
}

/// The persons whose rows differ between the core tables under `previous`
/// (the current run's `core/`) and under `core` (tonight's); `None` when
/// they cannot be compared row for row (a table's columns changed, or a
/// core has no `person.parquet`), so that everything is recomputed. A
/// table whose files are the current run's own (hard-linked, as a build
/// that took the table leaves them) is not read; of one appended to, only
/// the added files are.
pub fn touched(previous: &Path, core: &Path) -> Result<Option<Touched>> {
    if !previous.join("person.parquet").is_file() || !core.join("person.parquet").is_file() {
        return Ok(None);
    }
    let (before, after) = (core_tables(previous)?, core_tables(core)?);
    // Files the two share (hard-linked: taken) hold the same rows in both;
    // a person changed where the rows of the files only one of them has
    // differ (an appended table: the persons of the added rows; a table
    // built anew: every file). Those files' row groups are hashed all at
    // once, whatever their table, so that both cores are busy.
    let (mut tables, mut groups, mut derived) = (0, Vec::new(), Vec::new());
    let mut ids: HashMap<u64, Vec<String>> = HashMap::new();
    let mut name = |id: &str| {
        let known = ids.entry(key(id)).or_default();
        if !known.iter().any(|k| k == id) {
            known.push(id.to_string());
        }
    };
    // Persons whose person row alone changed, and in which columns.
    let mut person_columns: HashMap<u64, Arc<BTreeSet<String>>> = HashMap::new();
    for ((rel, old), (_, new)) in before.iter().zip(&after) {
        let (removed, added) = file_diff(old, new);
        if removed.is_empty() && added.is_empty() {
            continue;
        }
        let schema = match (old.first(), new.first()) {
            (Some(a), Some(b)) => {
                let schema = file_schema(b)?;
                if file_schema(a)? != schema {
                    tracing::info!(table = %rel.display(), "core columns changed: every person is recomputed");
                    return Ok(None);
                }
                schema
            }
            (a, b) => match a.or(b) {
                Some(f) => file_schema(f)?,
                None => continue,
            },
        };
        let columns_differ = |footer: &ParquetRecordBatchReaderBuilder<std::fs::File>| {
            let differ = footer.schema().fields() != schema.fields();
            if differ {
                tracing::info!(table = %rel.display(), "core columns changed: every person is recomputed");
            }
            differ
        };
        // The files that came say which of those that went they are,
        // but for some persons' rows: theirs are touched, neither is read.
        let (pairs, added, removed) = pair_derived(added, removed)?;
        for d in &pairs {
            if columns_differ(&reader(&d.file)?) {
                return Ok(None);
            }
        }
        let person_table = rel == Path::new("person.parquet");
        for d in &pairs {
            for (i, p) in d.persons.iter().enumerate() {
                name(p);
                let columns = d.columns.as_ref().and_then(|c| c[i].clone());
                match columns.filter(|_| person_table) {
                    Some(columns) => {
                        // Two persons of one hash: the columns of both.
                        let known = person_columns.entry(key(p)).or_default();
                        Arc::make_mut(known).extend(columns.iter().cloned());
                    }
                    None => derived.push(key(p)),
                }
            }
        }
        for (came, files) in [(false, removed), (true, added)] {
            for file in files {
                // Its footer read once: its columns, then its groups.
                let footer = reader(&file)?;
                if columns_differ(&footer) {
                    return Ok(None);
                }
                for group in 0..footer.metadata().num_row_groups() {
                    groups.push((tables, came, file.clone(), group));
                }
            }
        }
        tables += 1;
    }
    let parts: Vec<(usize, bool, GroupSums)> = groups
        .into_par_iter()
        .map(|(table, came, file, group)| Ok((table, came, group_sums(&file, group)?)))
        .collect::<Result<_>>()?;
    // Per table, the sums of the rows gone and of those that came.
    let mut sums: Vec<[HashMap<u64, u64>; 2]> = vec![Default::default(); tables];
    for (table, came, part) in parts {
        let side = &mut sums[table][usize::from(came)];
        for (k, (s, id)) in part {
            let sum = side.entry(k).or_insert(0);
            *sum = sum.wrapping_add(s);
            if let Some(id) = id {
                name(&id);
            }
        }
    }
    let mut keys: HashSet<u64> = derived.into_iter().collect();
    for [gone, came] in &sums {
        keys.extend(
            gone.iter()
                .filter(|(k, s)| came.get(k) != Some(s))
                .map(|(k, _)| *k),
        );
        keys.extend(
            came.iter()
                .filter(|(k, s)| gone.get(k) != Some(s))
                .map(|(k, _)| *k),
        );
    }
    // A person whose rows changed elsewhere too is touched whatever is read.
    person_columns.retain(|k, _| !keys.contains(k));
    keys.extend(person_columns.keys().copied());
    ids.retain(|k, _| keys.contains(k));
    let persons = crate::warehouse::parquet_rows(&core.join("person.parquet"))?;
    Ok(Some(Touched {
        keys,
        person_columns,
        ids,
        persons,
    }))
}

/// The files of `old` that `new` does not have and those of `new` that
/// `old` does not have, by device and inode (a file taken is hard-linked;
/// one whose metadata cannot be read counts as not shared).
pub(crate) fn file_diff(old: &[PathBuf], new: &[PathBuf]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &PathBuf| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ids = |files: &[PathBuf]| -> HashSet<(u64, u64)> { files.iter().filter_map(id).collect() };
    let (old_ids, new_ids) = (ids(old), ids(new));
    let only = |files: &[PathBuf], other: &HashSet<(u64, u64)>| -> Vec<PathBuf> {
        files
            .iter()
            .filter(|f| id(f).is_none_or(|i| !other.contains(&i)))
            .cloned()
            .collect()
    };
    (only(old, &new_ids), only(new, &old_ids))
}

fn reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| WardError::data("comparing core rows", path, e))
}

/// A file's columns (without the footer's metadata, which differs from
/// file to file: see [`derived_from`]).
fn file_schema(path: &Path) -> Result<SchemaRef> {
    Ok(std::sync::Arc::new(
        datafusion::arrow::datatypes::Schema::new(reader(path)?.schema().fields().clone()),
    ))
}

/// Per person (by id hash): the sum of their rows' hashes, and their id
/// (none for the rows without one).
type GroupSums = HashMap<u64, (u64, Option<String>)>;

/// The per-person sums of the row hashes of one row group of a file.
fn group_sums(path: &Path, group: usize) -> Result<GroupSums> {
    let err = |e: BoxError| WardError::data("comparing core rows", path, e);
    let reader = reader(path)?.with_row_groups(vec![group]);
    let converter = RowConverter::new(
        reader
            .schema()
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )
    .map_err(|e| err(e.into()))?;
    let hasher = hasher();
    let mut sums: GroupSums = HashMap::new();
    for batch in reader.build().map_err(|e| err(e.into()))? {
        let batch = batch.map_err(|e| err(e.into()))?;
        let rows = converter
            .convert_columns(batch.columns())
            .map_err(|e| err(e.into()))?;
        let persons = person_ids(&batch).map_err(err)?;
        let persons = persons.as_string::<i32>();
        for (i, row) in rows.iter().enumerate() {
            let id = persons.is_valid(i).then(|| persons.value(i));
            let (sum, _) = sums
                .entry(id.map_or(0, key))
                .or_insert_with(|| (0, id.map(str::to_string)));
            *sum = sum.wrapping_add(hasher.hash_one(row.as_ref()));
        }
    }
    Ok(sums)
}

/// Writes tonight's core tables under `core` to `out`, same layout, with
/// the rows of the `touched` persons only (uncompressed: a scratch copy
/// read once).
pub fn restrict(core: &Path, touched: &Touched, out: &Path) -> Result<()> {
    let files: Vec<(PathBuf, PathBuf)> = core_tables(core)?
        .into_iter()
        .flat_map(|(_, files)| files)
        .map(|f| {
            let rel = f.strip_prefix(core).unwrap_or(&f).to_path_buf();
            (f, out.join(rel))
        })
        .collect();
    let ids = touched.known_ids();
    let touched = std::sync::Arc::new(touched.clone());
    files
        .par_iter()
        .try_for_each(|(from, to)| restrict_file(from, &touched, ids.as_ref(), to))
}

/// Copies the rows of `from` whose person is touched to `to`. The reader
/// decodes `person_id` first and the other columns only where it selects
/// rows (a core table is sorted by person: the touched persons' rows come
/// in runs, and pages without any are skipped). With `ids`, every touched
/// person's id, only the row groups that can hold them are read.
fn restrict_file(
    from: &Path,
    touched: &std::sync::Arc<Touched>,
    ids: Option<&BTreeSet<String>>,
    to: &Path,
) -> Result<()> {
    use datafusion::arrow::error::ArrowError;
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::{ArrowPredicateFn, RowFilter};
    let err = |e: BoxError| WardError::data("restricting the core to the touched persons", from, e);
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| WardError::io("cannot create", dir, e))?;
    }
    let file = std::fs::File::open(from).map_err(|e| WardError::io("cannot open", from, e))?;
    let mut reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.into()))?;
    // A core file is sorted by person: few groups hold a few persons.
    if let Some(ids) = ids {
        let groups = crate::warehouse::groups_in_range(reader.metadata(), PERSON, ids);
        reader = reader.with_row_groups(groups);
    }
    let person = ProjectionMask::columns(reader.parquet_schema(), [PERSON]);
    let touched = touched.clone();
    let predicate = ArrowPredicateFn::new(person, move |batch: RecordBatch| {
        touched.mask(&batch).map_err(ArrowError::ExternalError)
    });
    let reader = reader.with_row_filter(RowFilter::new(vec![Box::new(predicate)]));
    let sink = std::fs::File::create(to).map_err(|e| WardError::io("cannot create", to, e))?;
    let mut writer =
        ArrowWriter::try_new(sink, reader.schema().clone(), None).map_err(|e| err(e.into()))?;
    for batch in reader.build().map_err(|e| err(e.into()))? {
        let batch = batch.map_err(|e| err(e.into()))?;
        if batch.num_rows() > 0 {
            writer.write(&batch).map_err(|e| err(e.into()))?;
        }
    }
    writer.close().map_err(|e| err(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::parquet::file::metadata::KeyValue;
    use std::sync::Arc;

    fn write(path: &Path, rows: &[(&str, i64)]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new(PERSON, DataType::Utf8, false),
            Field::new("value", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap();
        // Two rows per row group: a file is compared group by group.
        let props = datafusion::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(2))
            .build();
        let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, Some(props))
            .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// [`write`], with footer entries.
    fn write_noted(path: &Path, rows: &[(&str, i64)], note: Vec<KeyValue>) {
        write(path, rows);
        let file = std::fs::File::open(path).unwrap();
        let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            batches[0].schema(),
            None,
        )
        .unwrap();
        for kv in note {
            w.append_key_value_metadata(kv);
        }
        for b in &batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
    }

    #[test]
    fn a_file_noted_as_derived_touches_its_noted_persons_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
        let people = [("a", 0), ("b", 0), ("c", 0)];
        write(&old.join("person.parquet"), &people);
        std::fs::create_dir_all(&new).unwrap();
        std::fs::hard_link(old.join("person.parquet"), new.join("person.parquet")).unwrap();
        let before = old.join("observation/part-0.parquet");
        write(&before, &[("a", 1), ("b", 1), ("c", 1)]);
        // Written as the old file but for b's rows, and saying so; c's row
        // differs too, unsaid: the note is what is read, not the rows.
        let note = derived_from(&before, ["b"].into_iter());
        assert_eq!(note.len(), 2);
        let after = new.join("observation/part-0.parquet");
        write_noted(&after, &[("a", 1), ("c", 9)], note);
        let t = touched(&old, &new).unwrap().expect("comparable");
        let names: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|p| t.contains(p))
            .collect();
        assert_eq!(names, ["b"]);

        // A note naming another file (not the one that went) is no note:
        // the rows are compared.
        let elsewhere = tmp.path().join("elsewhere.parquet");
        write(&elsewhere, &[("a", 1)]);
        write_noted(
            &after,
            &[("a", 1), ("c", 9)],
            derived_from(&elsewhere, ["b"].into_iter()),
        );
        let t = touched(&old, &new).unwrap().expect("comparable");
        let names: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|p| t.contains(p))
            .collect();
        assert_eq!(names, ["b", "c"]);

        // Too many persons to name: no note.
        let many: Vec<String> = (0..=MAX_DERIVED_PERSONS).map(|i| i.to_string()).collect();
        assert!(derived_from(&before, many.iter().map(String::as_str)).is_empty());
    }

    #[test]
    fn a_person_whose_person_row_alone_changed_is_touched_only_where_its_columns_are_read() {
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            datafusion::arrow::datatypes::Field::new(PERSON, DataType::Utf8, false),
            datafusion::arrow::datatypes::Field::new("value", DataType::Int64, false),
        ]));
        let batch = |rows: &[(&str, i64)]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                ],
            )
            .unwrap()
        };
        // Per person, the columns whose values differ; none for a person
        // on one side only.
        let (before, after) = (
            batch(&[("a", 0), ("b", 0), ("c", 0), ("e", 0)]),
            batch(&[("e", 0), ("b", 5), ("a", 0), ("d", 1)]),
        );
        let changes = changed_columns(&["a", "b", "c", "d", "e"], &before, &after).unwrap();
        let value = || Some(vec!["value".to_string()]);
        assert_eq!(changes, [Some(vec![]), value(), None, None, Some(vec![])]);

        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
        let was = old.join("person.parquet");
        write(&was, &[("a", 0), ("b", 0), ("c", 0), ("e", 0)]);
        // a's facts changed too; b's value changed; c was removed; e's
        // row is the same.
        write(&old.join("observation/part-0.parquet"), &[("a", 1)]);
        write(&new.join("observation/part-0.parquet"), &[("a", 2)]);
        let persons = ["a", "b", "c", "e"];
        let mut note = derived_from(&was, persons.into_iter());
        note.push(derived_columns(&[
            Some(vec![]),
            value(),
            None,
            Some(vec![]),
        ]));
        write_noted(
            &new.join("person.parquet"),
            &[("a", 0), ("b", 5), ("e", 0)],
            note,
        );
        let t = touched(&old, &new).unwrap().expect("comparable");
        let names = |t: &Touched| -> Vec<&str> {
            ["a", "b", "c", "e"]
                .into_iter()
                .filter(|p| t.contains(p))
                .collect()
        };
        assert_eq!(names(&t), ["a", "b", "c", "e"]);
        assert!(t.has_person_only_changes());
        let columns = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        // A reader of the person ids alone: b's and e's changes are not seen.
        assert_eq!(names(&t.seen_by(&columns(&[PERSON]))), ["a", "c"]);
        let of_value = t.seen_by(&columns(&[PERSON, "value"]));
        assert_eq!(names(&of_value), ["a", "b", "c"]);
        assert_eq!(of_value.persons, t.persons);

        // Without the columns in the footer, every noted person counts.
        write_noted(
            &new.join("person.parquet"),
            &[("a", 0), ("b", 5), ("e", 0)],
            derived_from(&was, persons.into_iter()),
        );
        let t = touched(&old, &new).unwrap().expect("comparable");
        assert!(!t.has_person_only_changes());
        assert_eq!(names(&t.seen_by(&columns(&[PERSON]))), ["a", "b", "c", "e"]);
    }

    fn persons(core: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for f in crate::warehouse::parquet_files(core).unwrap() {
            let file = std::fs::File::open(&f).unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                let p = person_ids(&b).unwrap();
                out.extend(p.as_string::<i32>().iter().map(|v| v.unwrap().to_string()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn touched_persons_are_those_whose_rows_differ_in_any_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
        let people = [("a", 0), ("b", 0), ("c", 0), ("d", 0)];
        write(&old.join("person.parquet"), &people[..3]);
        write(&new.join("person.parquet"), &people); // d is new
        // a: unchanged, rows in another order and file; b: a value
        // changed; c: a row removed; d: new.
        write(
            &old.join("observation/part-0.parquet"),
            &[("a", 1), ("a", 2), ("b", 1)],
        );
        write(
            &old.join("observation/part-1.parquet"),
            &[("c", 1), ("c", 2)],
        );
        write(
            &new.join("observation/part-0.parquet"),
            &[("b", 7), ("a", 2)],
        );
        write(
            &new.join("observation/part-1.parquet"),
            &[("a", 1), ("c", 2), ("d", 1)],
        );
        // The same file in both: not read (a broken file would fail).
        write(&old.join("condition/part-0.parquet"), &[("a", 1)]);
        std::fs::create_dir_all(new.join("condition")).unwrap();
        std::fs::hard_link(
            old.join("condition/part-0.parquet"),
            new.join("condition/part-0.parquet"),
        )
        .unwrap();

        let t = touched(&old, &new).unwrap().expect("comparable");
        let mut names: Vec<&str> = ["a", "b", "c", "d"]
            .into_iter()
            .filter(|p| t.contains(p))
            .collect();
        names.sort();
        assert_eq!(names, ["b", "c", "d"]);
        assert_eq!((t.len(), t.persons), (3, 4));
        assert!(touched(&old, &old).unwrap().unwrap().is_empty());

        let out = tmp.path().join("restricted");
        restrict(&new, &t, &out).unwrap();
        assert_eq!(persons(&out.join("observation")), ["b", "c", "d"]);
        assert_eq!(persons(&out.join("condition")), Vec::<String>::new());
        assert!(out.join("person.parquet").is_file());
        // The ids were known: only the row groups that can hold them were
        // read; not knowing them, every group is, to the same rows.
        assert_eq!(t.known_ids().unwrap().len(), 3);
        let unnamed = Touched {
            ids: HashMap::new(),
            ..t.clone()
        };
        assert_eq!(unnamed.known_ids(), None);
        let every = tmp.path().join("every-group");
        restrict(&new, &unnamed, &every).unwrap();
        for table in ["observation", "condition"] {
            assert_eq!(persons(&every.join(table)), persons(&out.join(table)));
        }

        // Columns that changed cannot be compared: everything recomputes.
        write(&new.join("person.parquet"), &people);
        let schema = Arc::new(Schema::new(vec![Field::new(PERSON, DataType::Utf8, true)]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec!["a"]))])
                .unwrap();
        let path = new.join("observation/part-1.parquet");
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        assert_eq!(touched(&old, &new).unwrap(), None);
    }

    #[test]
    fn an_appended_table_touches_the_persons_of_its_added_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
        write(&old.join("person.parquet"), &[("a", 0), ("b", 0), ("c", 0)]);
        write(
            &old.join("observation/part-0.parquet"),
            &[("a", 1), ("b", 1)],
        );
        for f in ["person.parquet", "observation/part-0.parquet"] {
            std::fs::create_dir_all(new.join(f).parent().unwrap()).unwrap();
            std::fs::hard_link(old.join(f), new.join(f)).unwrap();
        }
        write(
            &new.join("observation/part-x.parquet"),
            &[("b", 2), ("c", 1)],
        );
        let old_files = crate::warehouse::parquet_files(&old.join("observation")).unwrap();
        let new_files = crate::warehouse::parquet_files(&new.join("observation")).unwrap();
        assert_eq!(
            file_diff(&old_files, &new_files),
            (vec![], vec![new.join("observation/part-x.parquet")])
        );
        let t = touched(&old, &new).unwrap().expect("comparable");
        assert!(!t.contains("a") && t.contains("b") && t.contains("c"));
        assert_eq!(t.len(), 2);
    }

    /// A file written anew (a person's rows moved to a file of their own)
    /// touches only the persons whose rows differ.
    #[test]
    fn a_file_written_anew_touches_only_the_persons_whose_rows_differ() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
        write(&old.join("person.parquet"), &[("a", 0), ("b", 0), ("c", 0)]);
        write(
            &old.join("observation/part-0.parquet"),
            &[("a", 1), ("b", 1)],
        );
        write(&old.join("observation/part-1.parquet"), &[("c", 1)]);
        for f in ["person.parquet", "observation/part-1.parquet"] {
            std::fs::create_dir_all(new.join(f).parent().unwrap()).unwrap();
            std::fs::hard_link(old.join(f), new.join(f)).unwrap();
        }
        write(&new.join("observation/part-0.parquet"), &[("a", 1)]);
        write(
            &new.join("observation/part-x.parquet"),
            &[("b", 1), ("c", 2)],
        );
        let files = |dir: &Path| crate::warehouse::parquet_files(&dir.join("observation")).unwrap();
        assert_eq!(
            file_diff(&files(&old), &files(&new)),
            (
                vec![old.join("observation/part-0.parquet")],
                vec![
                    new.join("observation/part-0.parquet"),
                    new.join("observation/part-x.parquet")
                ]
            )
        );
        let t = touched(&old, &new).unwrap().expect("comparable");
        assert!(!t.contains("a") && !t.contains("b") && t.contains("c"));
        assert_eq!(t.len(), 1);
    }
}
