//! The warehouse on disk: its layout, atomic publication of files, and the
//! ingest state that makes re-runs idempotent.
//!
//! ```text
//! <warehouse>/staging/<table>/source=<name>/<batch>.parquet   accepted rows
//! <warehouse>/rejects/<name>/<batch>.parquet                  rejected rows with reasons
//! <warehouse>/state/ingest.json                               which input produced which batch
//! <warehouse>/.tmp/                                           files being written
//! <warehouse>/runs/<run_id>/{core,marts,reports,research}/     a run's outputs (see `runs`)
//! <warehouse>/runs/CURRENT                                     the last published run
//! ```
//!
//! Every file is written under `.tmp/` and renamed into place, so a reader
//! never sees a half-written file; the state file is replaced the same way,
//! after the batches it lists, and batches it no longer lists are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::{
    EnabledStatistics, WriterProperties, WriterPropertiesBuilder,
};
use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Result, WardError};
use crate::schema::{Kind, Table};

/// Version of the ingest state format and of ingest's rules: bumping it
/// reloads every file on the next run.
pub const INGEST_VERSION: u32 = 5;

/// Paths and file operations of one warehouse.
///
/// Staging, rejects and the ingest state live at the root and are shared by
/// every run. The derived outputs (`core/`, `marts/`, `reports/`,
/// `research/`) live under the *output directory*: a run's own directory
/// (`runs/<run_id>/`, see [`crate::runs`]) for `ward run`, the root itself
/// (the working copy) for the stage commands and library callers.
#[derive(Debug, Clone)]
pub struct Warehouse {
    root: PathBuf,
    out: PathBuf,
    /// Readers ignore the linked core tables of `out` and read staging.
    unlinked: bool,
    /// Its Parquet files are handed out ([`Warehouse::for_export`]).
    export: bool,
}

impl Warehouse {
    /// A warehouse whose outputs are written at its root (the working copy).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Warehouse {
            out: root.clone(),
            root,
            unlinked: false,
            export: false,
        }
    }

    /// A warehouse at `root` for files handed out (the research tables):
    /// compressed for size ([`parquet_properties`]).
    pub fn for_export(root: impl Into<PathBuf>) -> Self {
        Warehouse {
            export: true,
            ..Warehouse::new(root)
        }
    }

    /// The same warehouse with derived outputs written under `out`.
    pub fn with_output(&self, out: impl Into<PathBuf>) -> Self {
        Warehouse {
            root: self.root.clone(),
            out: out.into(),
            unlinked: self.unlinked,
            export: self.export,
        }
    }

    /// The same warehouse read as unlinked staging: measures ignore any
    /// linked core tables and count every provider record as a person
    /// (see [`crate::reads`]).
    pub fn unlinked(self) -> Self {
        Warehouse {
            unlinked: true,
            ..self
        }
    }

    /// Whether readers use linked core tables (when present under `out`).
    pub fn reads_core(&self) -> bool {
        !self.unlinked
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where derived outputs go: `core/`, `marts/`, `reports/`, `research/`.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// `staging/<table>/source=<source>` (hive-style, so query engines see a
    /// `source` partition column).
    pub fn staging_dir(&self, table: Table, source: &str) -> PathBuf {
        self.staging_table_dir(table)
            .join(format!("source={source}"))
    }

    /// `staging/<table>`: every source's staged rows of a table.
    pub fn staging_table_dir(&self, table: Table) -> PathBuf {
        self.root.join("staging").join(table.name())
    }

    /// `rejects/<source>`.
    pub fn rejects_dir(&self, source: &str) -> PathBuf {
        self.root.join("rejects").join(source)
    }

    /// The ingest state file.
    pub fn state_path(&self) -> PathBuf {
        self.root.join("state").join("ingest.json")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// Path of a warehouse file relative to the root, as stored in the state.
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/")
    }

    /// Writes record batches as one Parquet file, atomically.
    pub fn write_parquet(
        &self,
        path: &Path,
        schema: SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        self.write_held(path, schema, batches, ROW_GROUP, false, Vec::new())
    }

    /// [`Warehouse::write_parquet`] of a table sorted by person, in row
    /// groups of `rows` rows: its `person_id` column keeps a dictionary
    /// (see [`crate::schema::without_dictionary`]).
    pub fn write_person_sorted(
        &self,
        path: &Path,
        schema: SchemaRef,
        batches: &[RecordBatch],
        rows: usize,
    ) -> Result<()> {
        self.write_held(path, schema, batches, rows, true, Vec::new())
    }

    /// [`Warehouse::write_parquet`] with `note` in the file's footer
    /// (key-value metadata).
    pub fn write_parquet_noted(
        &self,
        path: &Path,
        schema: SchemaRef,
        batches: &[RecordBatch],
        note: Vec<KeyValue>,
    ) -> Result<()> {
        self.write_held(path, schema, batches, ROW_GROUP, false, note)
    }

    /// Writes batches already in memory as one Parquet file, atomically, in
    /// row groups of `rows` rows: each group's columns are encoded at once
    /// (on the rayon pool), into the bytes one `ArrowWriter` writing them
    /// column after column gives. (A million-row table is otherwise
    /// encoded on one core while the other waits.) No dictionary for the
    /// columns nearly unique per row ([`crate::schema::without_dictionary`]).
    fn write_held(
        &self,
        path: &Path,
        schema: SchemaRef,
        batches: &[RecordBatch],
        rows: usize,
        person_ids_repeat: bool,
        note: Vec<KeyValue>,
    ) -> Result<()> {
        let names = schema.fields().iter().map(|f| f.name().as_str());
        let props = without_dictionaries(parquet_properties(self.export), names, person_ids_repeat)
            .set_max_row_group_row_count(Some(rows))
            .build();
        let tmp = self.tmp_path(path);
        let file = fs::File::create(&tmp).map_err(|e| WardError::io("cannot create", &tmp, e))?;
        match write_groups(file, schema, props, batches, rows.max(1), note) {
            Ok(()) => self.publish_file(&tmp, path),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(WardError::data("writing parquet", path, e))
            }
        }
    }

    /// A Parquet file at `path` for the staged rows of `table`, written
    /// batch by batch under `.tmp/` and published by
    /// [`ParquetFile::finish`]; dropped unfinished, it leaves nothing
    /// behind.
    /// No column statistics for record identifiers, free text (names,
    /// addresses, notes) and postal codes: compared for equality or by
    /// pattern, if at all, in rows in no order, so their minimum and maximum
    /// prune nothing. Codes, systems, units, vocabularies, dates and
    /// numbers, which checks and measures on unlinked staging filter on,
    /// keep theirs. (At 1M persons statistics for every column cost ingest
    /// 7 % of its CPU; without any, the dq stage lost 1.3–3 s a night.) No
    /// dictionary for the identifiers and lines, new on every row
    /// ([`crate::schema::without_dictionary`]). The patient's id keeps its
    /// page statistics: extracts are commonly written patient by patient,
    /// and then a few patients' rows (persons built again) are found in a
    /// few pages.
    pub fn staging_writer(&self, path: &Path, table: Table) -> Result<ParquetFile> {
        let names = table.columns().iter().map(|c| c.name);
        let mut props = without_dictionaries(parquet_properties(self.export), names, true);
        for c in table.columns() {
            let no_order = c.identifies_a_record() && c.name != "source_patient_id";
            if no_order || matches!(c.kind, Kind::Text | Kind::PostalCode) {
                props = props.set_column_statistics_enabled(c.name.into(), EnabledStatistics::None);
            }
        }
        self.parquet_writer_with(path, table.schema(), props.build())
    }

    fn parquet_writer_with(
        &self,
        path: &Path,
        schema: SchemaRef,
        props: WriterProperties,
    ) -> Result<ParquetFile> {
        let tmp = self.tmp_path(path);
        let file = fs::File::create(&tmp).map_err(|e| WardError::io("cannot create", &tmp, e))?;
        let writer = ArrowWriter::try_new(file, schema, Some(props))
            .map_err(|e| WardError::data("writing parquet", path, BoxError::from(e)))?;
        Ok(ParquetFile {
            warehouse: self.clone(),
            path: path.to_path_buf(),
            tmp,
            writer: Some(writer),
        })
    }

    /// Writes the Parquet file at `path` anew (a new file in its place: a
    /// run that hard-linked the old one keeps it) with, of its row groups
    /// `groups`, only the rows `keep` selects; its other row groups are
    /// copied as they are encoded (pages, statistics, page index), not
    /// decoded, so the cost is that of the groups named. `note` replaces
    /// the footer's entries. Returns the rows removed.
    pub fn filter_row_groups(
        &self,
        path: &Path,
        groups: &BTreeSet<usize>,
        keep: impl Fn(&RecordBatch) -> std::result::Result<BooleanArray, BoxError>,
        note: Vec<KeyValue>,
    ) -> Result<u64> {
        let tmp = self.tmp_path(path);
        match filter_row_groups(path, &tmp, groups, keep, note, self.export) {
            Ok(removed) => {
                self.publish_file(&tmp, path)?;
                Ok(removed)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(WardError::data("rewriting parquet", path, e))
            }
        }
    }

    /// Writes a file under `.tmp/`, syncs it and renames it to `path`.
    pub fn publish(
        &self,
        path: &Path,
        write: impl FnOnce(&mut fs::File) -> Result<()>,
    ) -> Result<()> {
        let tmp = self.tmp_path(path);
        let mut file =
            fs::File::create(&tmp).map_err(|e| WardError::io("cannot create", &tmp, e))?;
        write(&mut file)?;
        drop(file);
        self.publish_file(&tmp, path)
    }

    /// [`Warehouse::publish`] of `bytes`.
    pub fn publish_bytes(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.publish(path, |file| {
            file.write_all(bytes)
                .map_err(|e| WardError::io("cannot write", path, e))
        })
    }

    /// A scratch directory under `.tmp/` for a stage's intermediate files,
    /// removed when dropped; named `<prefix><random>`.
    pub fn scratch_dir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let parent = self.tmp_dir();
        fs::create_dir_all(&parent).map_err(|e| WardError::io("cannot create", &parent, e))?;
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .map_err(|e| WardError::io("cannot create a scratch directory in", &parent, e))
    }

    /// A path under `.tmp/` (created) to write the future `path` to; see
    /// [`Warehouse::publish_file`]. Unique within the process, so threads
    /// may write files of the same name (to different directories) at once.
    pub fn tmp_path(&self, path: &Path) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp_dir = self.tmp_dir();
        // A failure to create it surfaces when the file is created.
        let _ = fs::create_dir_all(&tmp_dir);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tmp_dir.join(format!("{}-{n}-{name}", std::process::id()))
    }

    /// Replaces the directory `dir` by `tmp` (written under `.tmp/`): the old
    /// directory is moved aside, the new one renamed into place, the old
    /// one removed.
    pub fn publish_dir(&self, tmp: &Path, dir: &Path) -> Result<()> {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(|e| WardError::io("cannot create", parent, e))?;
        }
        let old = tmp.with_extension("old");
        if dir.exists() {
            fs::rename(dir, &old).map_err(|e| WardError::io("cannot move aside", dir, e))?;
        }
        fs::rename(tmp, dir).map_err(|e| WardError::io("cannot publish", dir, e))?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| WardError::io("cannot remove", &old, e))?;
        }
        Ok(())
    }

    /// Syncs a file written under `.tmp/` and renames it to `path`.
    pub fn publish_file(&self, tmp: &Path, path: &Path) -> Result<()> {
        fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| WardError::io("cannot sync", tmp, e))?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| WardError::io("cannot create", parent, e))?;
        }
        fs::rename(tmp, path).map_err(|e| WardError::io("cannot publish", path, e))
    }

    /// Reads the ingest state; an absent file is an empty state.
    pub fn load_state(&self) -> Result<IngestState> {
        let path = self.state_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(IngestState::default()),
            Err(e) => return Err(WardError::io("cannot read", &path, e)),
        };
        let state: IngestState = serde_json::from_str(&text).map_err(|e| WardError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.version != INGEST_VERSION {
            // Rules changed: forget everything so that every file is reloaded.
            return Ok(IngestState {
                superseded: state.all_outputs(),
                ..IngestState::default()
            });
        }
        Ok(state)
    }

    /// Replaces the ingest state atomically.
    pub fn save_state(&self, state: &IngestState) -> Result<()> {
        let path = self.state_path();
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        self.publish(&path, |f| {
            f.write_all(&json)
                .map_err(|e| WardError::io("cannot write", &path, e))
        })
    }

    /// Removes what a crashed run may have left: temporary files, and Parquet
    /// files under `staging/` and `rejects/` that the state does not list.
    /// Returns how many files were removed.
    pub fn remove_unlisted(&self, state: &IngestState) -> Result<usize> {
        let listed: BTreeSet<String> = state.all_outputs().into_iter().collect();
        let mut removed = 0;
        let tmp = self.tmp_dir();
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| WardError::io("cannot remove", &tmp, e))?;
        }
        for top in ["staging", "rejects"] {
            for file in parquet_files(&self.root.join(top))? {
                if !listed.contains(&self.relative(&file)) {
                    fs::remove_file(&file).map_err(|e| WardError::io("cannot remove", &file, e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes warehouse files by relative path, ignoring ones already gone.
    pub fn remove(&self, relative: &[String]) -> Result<()> {
        for r in relative {
            let p = self.root.join(r);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(WardError::io("cannot remove", &p, e)),
            }
        }
        Ok(())
    }
}

/// A Parquet file being written (see [`Warehouse::staging_writer`]).
pub struct ParquetFile {
    warehouse: Warehouse,
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once finished.
    writer: Option<ArrowWriter<fs::File>>,
}

impl ParquetFile {
    /// Appends a batch (buffered up to a row group).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let writer = self.writer.as_mut().expect("written before finish");
        writer
            .write(batch)
            .map_err(|e| WardError::data("writing parquet", &self.path, BoxError::from(e)))
    }

    /// Closes the file, syncs it and renames it into place.
    pub fn finish(mut self) -> Result<()> {
        let writer = self.writer.take().expect("finished once");
        writer
            .close()
            .map_err(|e| WardError::data("writing parquet", &self.path, BoxError::from(e)))?;
        self.warehouse.publish_file(&self.tmp, &self.path)
    }

    /// Where the file is published.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ParquetFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            // Unfinished (the load failed): the partial file is not needed.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The id of group `name` (a group name, or a numeric id), or `None` when
/// the system has no such group.
#[cfg(unix)]
pub fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes only into `group` and `buffer`, whose sizes
    // are passed, and sets `found` to `&group` or null.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(group.gr_gid)
}

/// Gives the warehouse tree to group `gid`: every file and directory under
/// `root` (created if missing) gets that group, and every directory the
/// set-group-id bit, so what Ward creates later inherits the group. With the
/// binary's umask (027) the group may read, never write. Returns how many
/// entries were changed.
#[cfg(unix)]
pub fn apply_group(root: &Path, gid: u32) -> Result<u64> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    fs::create_dir_all(root).map_err(|e| WardError::io("cannot create", root, e))?;
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        // Never follow a symlink out of the warehouse.
        let meta =
            fs::symlink_metadata(&path).map_err(|e| WardError::io("cannot read", &path, e))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mut touched = false;
        if meta.gid() != gid {
            std::os::unix::fs::chown(&path, None, Some(gid))
                .map_err(|e| WardError::io("cannot change the group of", &path, e))?;
            touched = true;
        }
        if meta.is_dir() {
            let mode = meta.permissions().mode();
            if mode & 0o2000 == 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o2000))
                    .map_err(|e| WardError::io("cannot set the group bit of", &path, e))?;
                touched = true;
            }
            for entry in fs::read_dir(&path).map_err(|e| WardError::io("cannot list", &path, e))? {
                stack.push(
                    entry
                        .map_err(|e| WardError::io("cannot list", &path, e))?
                        .path(),
                );
            }
        }
        changed += u64::from(touched);
    }
    Ok(changed)
}

/// The index of the top-level column `column` among a file's leaf columns.
fn column_index(
    metadata: &datafusion::parquet::file::metadata::ParquetMetaData,
    column: &str,
) -> Option<usize> {
    metadata
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.name() == column)
}

/// The row groups of a file (`metadata`: its footer) whose statistics'
/// range of the text column `column` holds one of `values`, or that have
/// no such statistics (every group, if there is no such column): the only
/// groups that can hold one of them.
pub fn groups_in_range(
    metadata: &datafusion::parquet::file::metadata::ParquetMetaData,
    column: &str,
    values: &BTreeSet<String>,
) -> Vec<usize> {
    let groups = 0..metadata.num_row_groups();
    let Some(at) = column_index(metadata, column) else {
        return groups.collect();
    };
    groups
        .filter(|&g| {
            let stats = metadata.row_group(g).column(at).statistics();
            fn bound(b: Option<&[u8]>) -> Option<&str> {
                b.and_then(|b| std::str::from_utf8(b).ok())
            }
            match stats.map(|s| (bound(s.min_bytes_opt()), bound(s.max_bytes_opt()))) {
                Some((Some(min), Some(max))) if min <= max => values
                    .range::<str, _>((
                        std::ops::Bound::Included(min),
                        std::ops::Bound::Included(max),
                    ))
                    .next()
                    .is_some(),
                _ => true,
            }
        })
        .collect()
}

/// The row groups of the Parquet file `path` where its text column `column`
/// holds one of `values` (every group, if it has no such column): groups
/// whose statistics' range holds none of them are not read.
pub fn groups_holding(
    path: &Path,
    column: &str,
    values: &BTreeSet<String>,
) -> Result<BTreeSet<usize>> {
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::{
        ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    };
    let err = |e: datafusion::parquet::errors::ParquetError| {
        WardError::data("finding rows in a parquet file", path, e)
    };
    let open = |file: &fs::File| {
        file.try_clone()
            .map_err(|e| WardError::io("cannot open", path, e))
    };
    let file = fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    // The footer read once, for every group read.
    let footer = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(err)?;
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(open(&file)?, footer.clone());
    let Some(at) = column_index(builder.metadata(), column) else {
        return Ok((0..builder.metadata().num_row_groups()).collect());
    };
    let candidates = groups_in_range(builder.metadata(), column, values);
    let mut holding = BTreeSet::new();
    let mask = ProjectionMask::leaves(builder.parquet_schema(), [at]);
    for g in candidates {
        let reader =
            ParquetRecordBatchReaderBuilder::new_with_metadata(open(&file)?, footer.clone())
                .with_row_groups(vec![g])
                .with_projection(mask.clone())
                .build()
                .map_err(err)?;
        for batch in reader {
            use datafusion::arrow::array::AsArray;
            let ids = batch
                .and_then(|b| {
                    datafusion::arrow::compute::cast(
                        b.column(0),
                        &datafusion::arrow::datatypes::DataType::Utf8,
                    )
                })
                .map_err(|e| WardError::data("finding rows in a parquet file", path, e))?;
            if ids
                .as_string::<i32>()
                .iter()
                .flatten()
                .any(|id| values.contains(id))
            {
                holding.insert(g);
                break;
            }
        }
    }
    Ok(holding)
}

/// [`Warehouse::filter_row_groups`], written to `tmp`.
fn filter_row_groups(
    path: &Path,
    tmp: &Path,
    groups: &BTreeSet<usize>,
    keep: impl Fn(&RecordBatch) -> std::result::Result<BooleanArray, BoxError>,
    note: Vec<KeyValue>,
    export: bool,
) -> std::result::Result<u64, BoxError> {
    use datafusion::arrow::compute::filter_record_batch;
    use datafusion::parquet::arrow::arrow_reader::{
        ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    };
    use datafusion::parquet::arrow::arrow_writer::{ArrowWriterOptions, compute_leaves};
    use datafusion::parquet::column::writer::ColumnCloseResult;
    use datafusion::parquet::file::metadata::PageIndexPolicy;
    use datafusion::parquet::file::page_index::column_index::ColumnIndexMetaData;
    let file = fs::File::open(path)?;
    // The footer (with the page index the copied groups keep) read once.
    let footer = ArrowReaderMetadata::load(
        &file,
        ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional),
    )?;
    let metadata = footer.metadata().clone();
    // Its columns, not the old footer's entries.
    let schema = std::sync::Arc::new(datafusion::arrow::datatypes::Schema::new(
        footer.schema().fields().clone(),
    ));
    let descr = metadata.file_metadata().schema_descr();
    // The copied column chunks keep their encoding: the new file's Parquet
    // schema is the old one's. The rewritten groups are encoded as the
    // file's writer encoded them (the tables filtered are sorted by person).
    let names = schema.fields().iter().map(|f| f.name().as_str());
    let props = without_dictionaries(parquet_properties(export), names, true)
        .set_key_value_metadata(Some(note))
        .build();
    let options = ArrowWriterOptions::new()
        .with_properties(props)
        .with_parquet_schema(descr.clone());
    let (mut writer, factory) =
        ArrowWriter::try_new_with_options(fs::File::create(tmp)?, schema.clone(), options)?
            .into_serialized_writer()?;
    let mut removed = 0;
    for (g, group) in metadata.row_groups().iter().enumerate() {
        if !groups.contains(&g) {
            let mut out = writer.next_row_group()?;
            for (c, column) in group.columns().iter().enumerate() {
                let column_index = metadata
                    .column_index()
                    .map(|i| i[g][c].clone())
                    .filter(|i| !matches!(i, ColumnIndexMetaData::NONE));
                out.append_column(
                    &file,
                    ColumnCloseResult {
                        bytes_written: column.compressed_size() as u64,
                        rows_written: group.num_rows() as u64,
                        metadata: column.clone(),
                        bloom_filter: None,
                        column_index,
                        offset_index: metadata.offset_index().map(|i| i[g][c].clone()),
                    },
                )?;
            }
            out.close()?;
            continue;
        }
        let mut columns = factory.create_column_writers(writer.flushed_row_groups().len())?;
        let mut kept = 0;
        let batches =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file.try_clone()?, footer.clone())
                .with_row_groups(vec![g])
                .build()?;
        for batch in batches {
            let batch = batch?;
            let rows = batch.num_rows();
            let batch = filter_record_batch(&batch, &keep(&batch)?)?;
            removed += (rows - batch.num_rows()) as u64;
            kept += batch.num_rows();
            let mut writers = columns.iter_mut();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                for leaf in compute_leaves(field, column)? {
                    writers
                        .next()
                        .ok_or("more leaf columns than the file's")?
                        .write(&leaf)?;
                }
            }
        }
        if kept > 0 {
            let mut out = writer.next_row_group()?;
            for column in columns {
                column.close()?.append_to_row_group(&mut out)?;
            }
            out.close()?;
        }
    }
    writer.close()?;
    Ok(removed)
}

/// Every record batch of one Parquet file; `context` names what is read
/// in errors ("reading person links").
pub fn read_parquet(path: &Path, context: &'static str) -> Result<Vec<RecordBatch>> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err = |source: BoxError| WardError::data(context, path, source);
    let file = fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(e.into()))?
        .map(|b| b.map_err(|e| err(e.into())))
        .collect()
}

/// Rows per row group of the Parquet files Ward writes whole (the person
/// table, links, marts, research tables): a reader splits a file by row
/// groups, so a file of a million rows (the person table at 1M persons)
/// in one group is read by one thread. Staged files keep the writer's
/// default (1 Mi rows).
pub const ROW_GROUP: usize = 256 * 1024;

/// Writes `batches` into `file` (see [`Warehouse::write_held`]): the
/// batches sliced into row groups of `rows` rows, each group's leaf
/// columns encoded in parallel and appended in order.
fn write_groups(
    file: fs::File,
    schema: SchemaRef,
    props: WriterProperties,
    batches: &[RecordBatch],
    rows: usize,
    note: Vec<KeyValue>,
) -> std::result::Result<(), BoxError> {
    use datafusion::parquet::arrow::arrow_writer::{ArrowColumnChunk, compute_leaves};
    use rayon::prelude::*;
    // The writer the file would have (its schema in the footer included),
    // taken apart to encode the columns of a group in parallel.
    let (mut writer, columns) =
        ArrowWriter::try_new(file, schema.clone(), Some(props))?.into_serialized_writer()?;
    let mut group: Vec<RecordBatch> = Vec::new();
    let mut held = 0;
    let mut write_group = |group: &mut Vec<RecordBatch>| -> std::result::Result<(), BoxError> {
        // Per batch, its leaf columns in the order of the column writers.
        let mut leaves = Vec::with_capacity(group.len());
        for b in group.drain(..) {
            // A leaf for every column writer, or an error (never an index
            // out of bounds below).
            if b.num_columns() != schema.fields().len() {
                return Err(format!(
                    "a batch of {} columns for a file of {}",
                    b.num_columns(),
                    schema.fields().len()
                )
                .into());
            }
            let mut of_batch = Vec::new();
            for (field, column) in schema.fields().iter().zip(b.columns()) {
                of_batch.extend(compute_leaves(field, column)?);
            }
            leaves.push(of_batch);
        }
        let index = writer.flushed_row_groups().len();
        let chunks = columns
            .create_column_writers(index)?
            .into_par_iter()
            .enumerate()
            .map(|(leaf, mut column)| {
                for of_batch in &leaves {
                    column.write(&of_batch[leaf])?;
                }
                column.close()
            })
            .collect::<std::result::Result<Vec<ArrowColumnChunk>, _>>()?;
        let mut row_group = writer.next_row_group()?;
        for chunk in chunks {
            chunk.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        Ok(())
    };
    for b in batches {
        let mut at = 0;
        while at < b.num_rows() {
            let take = (rows - held).min(b.num_rows() - at);
            group.push(b.slice(at, take));
            (held, at) = (held + take, at + take);
            if held == rows {
                write_group(&mut group)?;
                held = 0;
            }
        }
    }
    if held > 0 {
        write_group(&mut group)?;
    }
    for kv in note {
        writer.append_key_value_metadata(kv);
    }
    writer.close()?;
    Ok(())
}

/// Ward's Parquet files, and who wrote them. What Ward writes for itself
/// (staging, core tables, links, marts), read back every night, is LZ4:
/// at 1M persons a night after 1 % new patients took 7 % less time than
/// with zstd level 1, for files half again as large (core 296 -> 442 MB).
/// Files handed out (`export`: the research tables) are zstd level 1,
/// about half the size.
fn parquet_properties(export: bool) -> WriterPropertiesBuilder {
    let compression = match export {
        true => Compression::ZSTD(ZstdLevel::try_new(1).expect("valid zstd level")),
        false => Compression::LZ4_RAW,
    };
    WriterProperties::builder()
        .set_compression(compression)
        .set_created_by(format!("ward {}", env!("CARGO_PKG_VERSION")))
}

/// `props` without a dictionary for the columns of `names` nearly unique
/// per row (see [`crate::schema::without_dictionary`]).
fn without_dictionaries<'a>(
    mut props: WriterPropertiesBuilder,
    names: impl IntoIterator<Item = &'a str>,
    person_ids_repeat: bool,
) -> WriterPropertiesBuilder {
    for name in crate::schema::without_dictionary(names, person_ids_repeat) {
        props = props.set_column_dictionary_enabled(name.into(), false);
    }
    props
}

/// A file as [`sha256_file`] knows it: device, inode, size and
/// modification time (seconds, nanoseconds).
type Identity = (u64, u64, u64, i64, i64);

/// The hashes of the files this process hashed (or was told of by
/// [`remember_hashes`]), by the identity each file had when hashed.
static HASHED: std::sync::Mutex<BTreeMap<Identity, String>> =
    std::sync::Mutex::new(BTreeMap::new());

/// A file's identity, when it was last modified a while ago (see
/// [`settled`]): while it is the same, so is its content.
fn identity(m: &fs::Metadata) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    settled(nanos(m.mtime(), m.mtime_nsec()))
        .then(|| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// A file's SHA-256 (hex) and size in bytes, read as a stream.
///
/// A file hashed before, unchanged since (same device, inode, size and
/// modification time), is not read again: a night hashes each file it
/// takes from the current run (hard-linked) when it takes it, and again
/// when it lists its own outputs; the hashes of a published run's files
/// are kept for the next night ([`known_hashes`], [`remember_hashes`]).
/// Only files last modified a while before they were hashed are
/// remembered: a file rewritten in place within the file system's
/// timestamp granularity keeps its modification time (as git's index
/// treats "racily clean" files).
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    use sha2::Digest;
    let mut file = fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    let identity = file.metadata().ok().as_ref().and_then(identity);
    let known = |id: &Identity| HASHED.lock().ok()?.get(id).cloned();
    if let Some(id) = identity
        && let Some(sha) = known(&id)
    {
        return Ok((sha, id.2));
    }
    let mut hasher = sha2::Sha256::new();
    let bytes =
        std::io::copy(&mut file, &mut hasher).map_err(|e| WardError::io("cannot read", path, e))?;
    let sha = hex::encode(hasher.finalize());
    if let (Some(id), Ok(mut hashed)) = (identity, HASHED.lock()) {
        hashed.insert(id, sha.clone());
    }
    Ok((sha, bytes))
}

/// A file's SHA-256 as [`sha256_file`] took it, with the identity the
/// file had then: kept beside the runs, it spares the next process
/// reading the file again while the file keeps that identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownHash {
    /// Where the file was (for people reading the list; not compared).
    pub path: String,
    pub device: u64,
    pub inode: u64,
    pub bytes: u64,
    pub modified_s: i64,
    pub modified_ns: i64,
    pub sha256: String,
}

/// Of the files `names` under `dir`, those whose hash this process took
/// (or was told of) while they had the identity they have now.
pub fn known_hashes<'a>(dir: &Path, names: impl IntoIterator<Item = &'a str>) -> Vec<KnownHash> {
    let Ok(hashed) = HASHED.lock() else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter_map(|name| {
            let id = identity(&fs::metadata(dir.join(name)).ok()?)?;
            let sha256 = hashed.get(&id)?.clone();
            let (device, inode, bytes, modified_s, modified_ns) = id;
            Some(KnownHash {
                path: name.to_string(),
                device,
                inode,
                bytes,
                modified_s,
                modified_ns,
                sha256,
            })
        })
        .collect()
}

/// Tells [`sha256_file`] the hashes `known` (see [`known_hashes`]): a file
/// with one of their identities is not read to be hashed.
pub fn remember_hashes(known: &[KnownHash]) {
    if let Ok(mut hashed) = HASHED.lock() {
        for k in known {
            let id = (k.device, k.inode, k.bytes, k.modified_s, k.modified_ns);
            hashed.insert(id, k.sha256.clone());
        }
    }
}

/// All `*.parquet` files under a directory, recursively, sorted.
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| WardError::io("cannot list", &d, e))? {
            let entry = entry.map_err(|e| WardError::io("cannot list", &d, e))?;
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The rows of the Parquet file `path`, from its footer.
pub fn parquet_rows(path: &Path) -> Result<u64> {
    let file = fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| WardError::data("reading", path, e))?;
    Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
}

/// What has been loaded into staging, per source and input file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IngestState {
    pub version: u32,
    pub sources: BTreeMap<String, BTreeMap<String, FileState>>,
    /// Outputs of a state from an older version, to delete once replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<String>,
}

impl Default for IngestState {
    fn default() -> Self {
        IngestState {
            version: INGEST_VERSION,
            sources: BTreeMap::new(),
            superseded: Vec::new(),
        }
    }
}

impl IngestState {
    /// What the state recorded of the file `file` of source `source`.
    pub fn file(&self, source: &str, file: &str) -> Option<&FileState> {
        self.sources.get(source)?.get(file)
    }

    /// Every warehouse file the state lists (relative paths).
    pub fn all_outputs(&self) -> Vec<String> {
        self.sources
            .values()
            .flat_map(|files| files.values())
            .flat_map(|f| f.outputs.iter().cloned())
            .collect()
    }
}

/// What the file system says of a file, to tell it unchanged without
/// reading it: its inode, size, and modification and status-change times
/// (nanoseconds). Any write, truncation, rename over it or change of
/// links or permissions changes one of them; the status-change time
/// cannot be set by a user.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileStat {
    pub inode: u64,
    pub bytes: u64,
    pub modified_ns: i128,
    pub changed_ns: i128,
}

impl FileStat {
    /// The file's stat, when it was last changed a while ago: a file
    /// changed within the file system's timestamp granularity of being
    /// read could change again with the same times (git's "racily clean"
    /// files), so it is not told unchanged by them.
    pub fn of_settled(path: &Path) -> Option<FileStat> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        let stat = FileStat {
            inode: m.ino(),
            bytes: m.size(),
            modified_ns: nanos(m.mtime(), m.mtime_nsec()),
            changed_ns: nanos(m.ctime(), m.ctime_nsec()),
        };
        settled(stat.modified_ns.max(stat.changed_ns)).then_some(stat)
    }
}

/// A file time (seconds and nanoseconds since the epoch) in nanoseconds.
fn nanos(seconds: i64, nanoseconds: i64) -> i128 {
    i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds)
}

/// Whether a file last changed at `changed_ns` (see [`nanos`]) changed
/// longer ago than its file system's timestamp granularity, so that a
/// change now would give it another time: over two seconds ago (FAT's
/// granularity, the coarsest), or, for a time with a fraction of a second
/// (a file system that keeps them: at worst every 10 ms, Linux's coarse
/// clock at 100 Hz), over a tenth of a second ago.
fn settled(changed_ns: i128) -> bool {
    let margin: i128 = match changed_ns % 1_000_000_000 {
        0 => 2_000_000_000,
        _ => 100_000_000,
    };
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .is_ok_and(|now| now.as_nanos() as i128 - changed_ns > margin)
}

/// One input file's load: what it was, what it produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileState {
    pub sha256: String,
    /// The file's stat when it was hashed (see [`FileStat::of_settled`]):
    /// while it is the same, the file is not read again to be hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<FileStat>,
    /// The file's size when loaded (CSV files; states written before Ward
    /// recorded it: none). A file that grew by appended records is
    /// recognised by its first `bytes` having the recorded SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub mapping_sha256: String,
    /// For fact files: fingerprint of the source's patient files the rows
    /// were checked against; when it changes the file is checked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients_fingerprint: Option<String>,
    pub table: String,
    pub batch_id: String,
    /// Warehouse-relative paths of the Parquet files written.
    pub outputs: Vec<String>,
    pub rows_read: u64,
    pub rows_accepted: u64,
    pub rows_rejected: u64,
    /// FHIR resources of types Ward does not load.
    #[serde(default)]
    pub rows_skipped: u64,
    /// Skipped FHIR resources per resource type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_by_type: BTreeMap<String, u64>,
    /// Rejected rows per rule (states written before this field: empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejects_by_rule: BTreeMap<String, u64>,
    /// Values kept as `unknown` or empty, per `column: rule`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values_flagged: BTreeMap<String, u64>,
    /// When it was loaded (UTC, RFC 3339).
    pub loaded_at: String,
}

impl FileState {
    /// The outputs of the file's last load, `<batch_id>.parquet`: all of
    /// them but those of an earlier load its records were appended to.
    pub fn latest_outputs(&self) -> impl Iterator<Item = &str> {
        let name = format!("{}.parquet", self.batch_id);
        self.outputs
            .iter()
            .map(String::as_str)
            .filter(move |o| o.rsplit('/').next() == Some(name.as_str()))
    }
}

/// Restricts a file or directory to its owner with `set` (Unix mode bits;
/// nothing elsewhere).
pub(crate) fn owner_only(
    bits: u32,
    path: &Path,
    set: impl FnOnce(std::fs::Permissions) -> std::io::Result<()>,
) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        set(std::fs::Permissions::from_mode(bits))
            .map_err(|e| WardError::io("cannot restrict permissions of", path, e))?;
    }
    #[cfg(not(unix))]
    let _ = (bits, path, set);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    /// Columns encoded in parallel make the bytes one writer encoding them
    /// in turn makes: text, numbers with nulls and a list column, batches
    /// that straddle the row groups, and a note in the footer.
    #[test]
    fn columns_encoded_at_once_write_the_file_one_writer_writes() {
        use datafusion::arrow::array::{ListBuilder, StringArray, StringBuilder};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int32, true),
            Field::new(
                "sources",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
        ]));
        let batch = |from: i32, to: i32| {
            let mut lists = ListBuilder::new(StringBuilder::new());
            for i in from..to {
                match i % 3 {
                    0 => lists.append_null(),
                    k => {
                        for s in 0..k {
                            lists.values().append_value(format!("s{}", (i + s) % 7));
                        }
                        lists.append(true);
                    }
                }
            }
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(
                        (from..to).map(|i| format!("p{i:06}")),
                    )),
                    Arc::new(Int32Array::from_iter(
                        (from..to).map(|i| (i % 5 != 0).then_some(i)),
                    )),
                    Arc::new(lists.finish()),
                ],
            )
            .unwrap()
        };
        let batches = [batch(0, 700), batch(700, 701), batch(701, 2500)];
        let note = vec![KeyValue::new("ward.test".into(), "noted".to_string())];
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::new(dir.path());
        let at_once = dir.path().join("at_once.parquet");
        wh.write_held(&at_once, schema.clone(), &batches, 1000, true, note.clone())
            .unwrap();
        let props = parquet_properties(false)
            .set_max_row_group_row_count(Some(1000))
            .build();
        let in_turn = dir.path().join("in_turn.parquet");
        let file = fs::File::create(&in_turn).unwrap();
        let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).unwrap();
        for b in &batches {
            writer.write(b).unwrap();
        }
        for kv in note {
            writer.append_key_value_metadata(kv);
        }
        writer.close().unwrap();
        // A batch that does not fit the file is an error, and leaves no file.
        let short = RecordBatch::try_new(
            Arc::new(Schema::new(vec![schema.field(0).clone()])),
            vec![batches[0].column(0).clone()],
        )
        .unwrap();
        let bad = dir.path().join("bad.parquet");
        assert!(
            wh.write_held(&bad, schema.clone(), &[short], 1000, true, Vec::new())
                .is_err()
        );
        assert!(!bad.exists());
        let (a, b) = (fs::read(&at_once).unwrap(), fs::read(&in_turn).unwrap());
        assert!(a == b, "{} and {} bytes differ", a.len(), b.len());
        let reader =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                fs::File::open(&at_once).unwrap(),
            )
            .unwrap();
        let groups = reader.metadata().row_groups().iter().map(|g| g.num_rows());
        assert_eq!(groups.collect::<Vec<_>>(), [1000, 1000, 500]);
    }

    /// A file Ward writes whole is split into row groups a reader can share
    /// out; ROW_GROUP rows and one more make two.
    #[test]
    fn a_file_written_whole_has_row_groups_of_row_group_rows() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::new(dir.path());
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let rows = Int32Array::from_iter_values(0..(ROW_GROUP as i32 + 1));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(rows)]).unwrap();
        let path = dir.path().join("core/person.parquet");
        wh.write_parquet(&path, schema, &[batch]).unwrap();
        let file = fs::File::open(&path).unwrap();
        let reader =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                file,
            )
            .unwrap();
        let groups: Vec<i64> = reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(groups, [ROW_GROUP as i64, 1]);
    }

    /// Only the row groups named are decoded and filtered; the others keep
    /// their bytes and a page index a reader can seek with, and a group
    /// left without rows is dropped.
    #[test]
    fn filtering_row_groups_copies_the_others_as_encoded() {
        use datafusion::arrow::array::{Array, StringArray};
        use datafusion::parquet::arrow::arrow_reader::{
            ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
        };
        use datafusion::parquet::file::metadata::PageIndexPolicy;
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::new(dir.path());
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("value", DataType::Int32, true),
        ]));
        let path = dir.path().join("core/observation/part-00000.parquet");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let props = parquet_properties(false)
            .set_max_row_group_row_count(Some(4))
            .set_key_value_metadata(Some(vec![KeyValue::new("old".into(), "x".to_string())]))
            .build();
        let mut w = ArrowWriter::try_new(
            fs::File::create(&path).unwrap(),
            schema.clone(),
            Some(props),
        )
        .unwrap();
        let ids: Vec<String> = (0..12).map(|i| format!("p{:02}", i / 2)).collect();
        let values = Int32Array::from_iter((0..12).map(|i| (i != 3).then_some(i)));
        w.write(
            &RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(StringArray::from(ids.clone())), Arc::new(values)],
            )
            .unwrap(),
        )
        .unwrap();
        w.close().unwrap();
        let footer = |path: &Path| {
            ParquetRecordBatchReaderBuilder::try_new_with_options(
                fs::File::open(path).unwrap(),
                ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required),
            )
            .unwrap()
        };
        // The groups whose statistics can hold some ids (p00-p01, p02-p03,
        // p04-p05): without the column, every group.
        let in_range = |column: &str, ids: &[&str]| {
            let ids = ids.iter().map(|i| i.to_string()).collect();
            groups_in_range(footer(&path).metadata(), column, &ids)
        };
        assert_eq!(in_range("person_id", &["p03"]), [1]);
        assert_eq!(in_range("person_id", &["p00", "p05", "p99"]), [0, 2]);
        assert_eq!(in_range("person_id", &["p99"]), Vec::<usize>::new());
        assert_eq!(in_range("no_such_column", &["p03"]), [0, 1, 2]);
        let chunk = |path: &Path, group: usize, column: usize| {
            let meta = footer(path)
                .metadata()
                .row_group(group)
                .column(column)
                .clone();
            let start = meta
                .dictionary_page_offset()
                .unwrap_or(meta.data_page_offset()) as usize;
            fs::read(path).unwrap()[start..start + meta.compressed_size() as usize].to_vec()
        };
        let before: Vec<Vec<u8>> = (0..2).map(|c| chunk(&path, 2, c)).collect();
        // Person p05's rows (10, 11) are in group 2, p02's (4, 5) in 1.
        let without = |persons: &'static [&'static str]| {
            move |b: &RecordBatch| -> std::result::Result<BooleanArray, BoxError> {
                let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                Ok(ids
                    .iter()
                    .map(|id| Some(!persons.contains(&id.unwrap())))
                    .collect())
            }
        };
        let note = vec![KeyValue::new("note".into(), "y".to_string())];
        let removed = wh
            .filter_row_groups(&path, &BTreeSet::from([1]), without(&["p02"]), note)
            .unwrap();
        assert_eq!(removed, 2);
        let read = footer(&path);
        let groups: Vec<i64> = read
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(groups, [4, 2, 4]);
        let entries = read
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap();
        assert!(entries.iter().any(|kv| kv.key == "note"));
        assert!(!entries.iter().any(|kv| kv.key == "old"));
        assert_eq!(
            (0..2).map(|c| chunk(&path, 2, c)).collect::<Vec<_>>(),
            before
        );
        // The copied group's page index still locates its pages: read only
        // the last row through it.
        let last = read
            .with_row_selection(RowSelection::from(vec![
                RowSelector::skip(9),
                RowSelector::select(1),
            ]))
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            last.column(1)
                .as_any()
                .downcast_ref::<Int32Array>()
                .unwrap()
                .value(0),
            11
        );
        // Every row but p02's, in order, nulls kept.
        let rows: Vec<(String, Option<i32>)> = read_parquet(&path, "test")
            .unwrap()
            .iter()
            .flat_map(|b| {
                let ids = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone();
                let v = b
                    .column(1)
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .unwrap()
                    .clone();
                (0..b.num_rows())
                    .map(|i| {
                        (
                            ids.value(i).to_string(),
                            (!v.is_null(i)).then(|| v.value(i)),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let expected: Vec<(String, Option<i32>)> = (0..12)
            .filter(|i| !(4..6).contains(i))
            .map(|i| (ids[i as usize].clone(), (i != 3).then_some(i)))
            .collect();
        assert_eq!(rows, expected);
        // A group left empty is dropped.
        let removed = wh
            .filter_row_groups(
                &path,
                &BTreeSet::from([2]),
                without(&["p04", "p05"]),
                Vec::new(),
            )
            .unwrap();
        assert_eq!(removed, 4);
        assert_eq!(parquet_rows(&path).unwrap(), 6);
        assert_eq!(footer(&path).metadata().num_row_groups(), 2);
    }

    #[test]
    fn parquet_is_published_atomically_and_unlisted_files_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::new(dir.path());
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![1, 2]))])
                .unwrap();
        let path = wh.staging_dir(Table::Patient, "a").join("b1.parquet");
        wh.write_parquet(&path, schema, &[batch]).unwrap();
        assert!(path.exists());
        assert!(
            fs::read_dir(dir.path().join(".tmp"))
                .unwrap()
                .next()
                .is_none()
        );

        let mut state = IngestState::default();
        assert_eq!(wh.remove_unlisted(&state).unwrap(), 1);
        assert!(!path.exists());

        let path2 = wh.rejects_dir("a").join("b2.parquet");
        fs::create_dir_all(path2.parent().unwrap()).unwrap();
        fs::write(&path2, b"x").unwrap();
        state.sources.entry("a".into()).or_default().insert(
            "f.csv".into(),
            FileState {
                sha256: "s".into(),
                stat: None,
                bytes: None,
                mapping_sha256: "m".into(),
                patients_fingerprint: None,
                table: "patient".into(),
                batch_id: "b2".into(),
                outputs: vec![wh.relative(&path2)],
                rows_read: 1,
                rows_accepted: 0,
                rows_rejected: 1,
                rows_skipped: 0,
                skipped_by_type: BTreeMap::new(),
                rejects_by_rule: BTreeMap::from([("required".into(), 1)]),
                values_flagged: BTreeMap::new(),
                loaded_at: "t".into(),
            },
        );
        assert_eq!(wh.remove_unlisted(&state).unwrap(), 0);
        wh.save_state(&state).unwrap();
        assert_eq!(wh.load_state().unwrap(), state);
    }
}
