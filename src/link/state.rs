//! What linkage keeps between runs, next to the links in `core/`: the
//! fitted model, a fingerprint of every record it linked, and every scored
//! pair that could matter (at or above the review threshold). With them a
//! night whose patient records only grew blocks and scores the new records
//! alone — against every record — and clusters the kept pairs with the new
//! ones; a full rebuild with the same model gives the same pairs, so the
//! same persons.
//!
//! ```text
//! core/link_state.json       the model (m, u, prior, household level, value frequencies),
//!                            what it holds for, candidate pairs per rule   (owner only)
//! core/link_records.parquet  source, source_patient_id, hash of the staged record
//! core/link_pairs.parquet    a, b (rows of link_records), weight, rule, household
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use compact_str::CompactString;
use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray, UInt8Array,
    UInt32Array, UInt64Array,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Schema, UInt8Type, UInt32Type, UInt64Type,
};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::model::{ModelParams, Rec};
use super::{Considered, LinkOptions};
use crate::error::{BoxError, Result, WardError};
use crate::warehouse::Warehouse;

/// The files, under `core/`.
pub const FILES: [&str; 3] = [
    "link_state.json",
    "link_records.parquet",
    "link_pairs.parquet",
];

/// Raised when what is kept changes meaning.
pub(super) const VERSION: u32 = 3;

/// The kept model and what it was fitted on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub version: u32,
    /// What the model and the pairs hold for ([`key`]): another key, and
    /// they are not used.
    pub key: String,
    /// Records the model was fitted on.
    pub fitted_records: u64,
    /// Candidate pairs per blocking rule among the kept records (a pair
    /// counts for the first rule that found it).
    pub pairs_by_rule: BTreeMap<String, u64>,
    pub model: ModelParams,
}

/// What a kept state is good for: the running code (`code`, an identity of
/// the executable: another build fits anew) and the settings that shape the
/// model and decide which pairs are kept.
pub fn key(opts: &LinkOptions, code: &str) -> String {
    let mut h = Sha256::new();
    let parts = [
        ("code", code.to_string()),
        ("link state", VERSION.to_string()),
        ("comparisons", format!("{:?}", opts.comparisons)),
        ("household", opts.household.to_string()),
        ("blocking", format!("{:?}", opts.blocking)),
        ("u_pairs", opts.u_pairs.to_string()),
        ("seed", opts.seed.to_string()),
        ("kept from", kept_from(opts).to_string()),
    ];
    for (label, value) in parts {
        for bytes in [label.as_bytes(), value.as_bytes()] {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
    }
    hex::encode(h.finalize())
}

/// The probability from which a scored pair is kept: every pair that can
/// be linked or listed for review.
pub fn kept_from(opts: &LinkOptions) -> f64 {
    opts.review_threshold.min(opts.threshold)
}

/// A hash of each staged patient record (every column linkage reads: what
/// blocking and comparison see, and what the person table is made of), in
/// the records' (source, id) order.
pub(super) fn record_hashes(staged: &super::Staged) -> Result<Vec<u64>> {
    use datafusion::arrow::row::{RowConverter, SortField};
    let Some(first) = staged.batches.first() else {
        return Ok(Vec::new());
    };
    let err = |e: datafusion::arrow::error::ArrowError| {
        WardError::data("hashing patient records", Path::new("staging/patient"), e)
    };
    let fields: Vec<SortField> = first
        .schema()
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    // Each batch's rows hashed as read, then put in the records' order.
    let per_batch = staged
        .batches
        .par_iter()
        .map(|b| {
            let rows = RowConverter::new(fields.clone())
                .and_then(|c| c.convert_columns(b.columns()))
                .map_err(err)?;
            Ok(rows
                .iter()
                .map(|row| twox_hash::XxHash3_64::oneshot(row.as_ref()))
                .collect::<Vec<u64>>())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((0..staged.rows.len())
        .into_par_iter()
        .map(|i| {
            let (b, r) = staged.rows.at(i);
            per_batch[b][r]
        })
        .collect())
}

/// A kept linkage: the model, the records it linked (in their order then)
/// and their scored pairs.
pub struct Kept {
    pub saved: Saved,
    keys: Vec<(CompactString, CompactString)>,
    hashes: Vec<u64>,
    pairs: Vec<Considered>,
}

/// Reads the state in `core` when it holds for `key`; `Ok(None)` when there
/// is none or it is another configuration's or code's.
pub fn load(core: &Path, key: &str) -> Result<Option<Kept>> {
    let path = core.join(FILES[0]);
    if !FILES.iter().all(|f| core.join(f).is_file()) {
        return Ok(None);
    }
    let text = std::fs::read(&path).map_err(|e| WardError::io("cannot read", &path, e))?;
    let saved: Saved = serde_json::from_slice(&text)
        .map_err(|e| WardError::data("reading the linkage state", &path, e))?;
    if saved.version != VERSION || saved.key != key {
        return Ok(None);
    }
    let path = core.join(FILES[1]);
    let err = |path: &Path, e: String| WardError::data("reading the linkage state", path, e);
    let mut keys = Vec::new();
    let mut hashes = Vec::new();
    for b in crate::warehouse::read_parquet(&path, "reading the linkage state")? {
        let text =
            |i: usize| crate::engine::text(b.column(i)).map_err(|e| err(&path, e.to_string()));
        let (source, id) = (text(0)?, text(1)?);
        let hash = b
            .column(2)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| err(&path, "column hash is not UInt64".into()))?;
        for i in 0..b.num_rows() {
            keys.push((source.value(i).into(), id.value(i).into()));
        }
        hashes.extend(hash.values().iter().copied());
    }
    let path = core.join(FILES[2]);
    let mut pairs = Vec::new();
    for b in crate::warehouse::read_parquet(&path, "reading the linkage state")? {
        let bad = || err(&path, "unexpected columns".into());
        let a = b
            .column(0)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(bad)?;
        let x = b
            .column(1)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(bad)?;
        let w = b
            .column(2)
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(bad)?;
        let rule = b
            .column(3)
            .as_primitive_opt::<UInt8Type>()
            .ok_or_else(bad)?;
        let household = b.column(4).as_boolean_opt().ok_or_else(bad)?;
        for i in 0..b.num_rows() {
            let (a, x) = (a.value(i), x.value(i));
            if a.max(x) as usize >= keys.len() {
                return Err(err(
                    &path,
                    format!("pair {i} names a record that is not kept"),
                ));
            }
            pairs.push((w.value(i), a, x, rule.value(i), household.value(i)));
        }
    }
    Ok(Some(Kept {
        saved,
        keys,
        hashes,
        pairs,
    }))
}

impl Kept {
    /// Whether the kept records are `links`' records, in their order (the
    /// state and the links written by one linkage).
    pub fn same_records(&self, links: &[super::PersonLink]) -> bool {
        self.keys.len() == links.len()
            && self
                .keys
                .iter()
                .zip(links)
                .all(|(k, l)| k.0 == l.source && k.1 == l.source_patient_id)
    }

    /// The kept pairs in tonight's numbering of `recs`, the records that
    /// are new, and each record's index among the kept ones, when every
    /// kept record is still there unchanged; `None` when one was changed
    /// or removed (its pairs are gone: every record is blocked again).
    pub fn carry(&self, recs: &[Rec], hashes: &[u64]) -> Option<Carried> {
        fn key(k: &(CompactString, CompactString)) -> (&str, &str) {
            (&k.0, &k.1)
        }
        let (of, gone, unique) = super::match_keys(recs, &self.keys, key);
        // Every kept record matched, one to one.
        let matched = of.iter().flatten().count();
        if !unique || !gone.is_empty() || matched != self.keys.len() {
            return None;
        }
        // Each kept record's index tonight.
        let mut now = vec![0u32; self.keys.len()];
        for (i, j) in of.iter().enumerate() {
            if let Some(j) = j {
                if hashes[i] != self.hashes[*j as usize] {
                    return None;
                }
                now[*j as usize] = i as u32;
            }
        }
        let pairs = self
            .pairs
            .iter()
            .map(|&(w, a, b, rule, household)| {
                let (a, b) = (now[a as usize], now[b as usize]);
                (w, a.min(b), a.max(b), rule, household)
            })
            .collect();
        let new = (0..recs.len() as u32)
            .filter(|i| of[*i as usize].is_none())
            .collect();
        Some((pairs, new, of))
    }
}

/// What [`Kept::carry`] gives: the kept pairs, the new records, each
/// record's index among the kept ones.
pub type Carried = (Vec<Considered>, Vec<u32>, Vec<Option<u32>>);

/// Writes the state: `saved`, the records with their hashes and the
/// scored pairs (`a`, `b` index `recs`).
pub fn save(
    warehouse: &Warehouse,
    saved: &Saved,
    recs: &[Rec],
    hashes: &[u64],
    pairs: &[Considered],
) -> Result<()> {
    let core = warehouse.out().join("core");
    std::fs::create_dir_all(&core).map_err(|e| WardError::io("cannot create", &core, e))?;
    let path = core.join(FILES[0]);
    let json = serde_json::to_vec(saved)
        .map_err(|e| WardError::data("writing the linkage state", &path, e))?;
    warehouse.publish(&path, |mut file| {
        crate::warehouse::owner_only(0o600, &path, |p| file.set_permissions(p))?;
        std::io::Write::write_all(&mut file, &json)
            .map_err(|e| WardError::io("cannot write", &path, e))
    })?;
    let engine = |e: datafusion::arrow::error::ArrowError| {
        WardError::data("writing the linkage state", &core, BoxError::from(e))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("source_patient_id", DataType::Utf8, false),
        Field::new("hash", DataType::UInt64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            recs.iter()
                .map(|r| Some(r.source.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            recs.iter()
                .map(|r| Some(r.source_patient_id.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(UInt64Array::from(hashes.to_vec())),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(engine)?;
    warehouse.write_parquet(&core.join(FILES[1]), schema, &[batch])?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("a", DataType::UInt32, false),
        Field::new("b", DataType::UInt32, false),
        Field::new("weight", DataType::Float64, false),
        Field::new("rule", DataType::UInt8, false),
        Field::new("household", DataType::Boolean, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(pairs.iter().map(|p| p.1).collect::<UInt32Array>()),
        Arc::new(pairs.iter().map(|p| p.2).collect::<UInt32Array>()),
        Arc::new(pairs.iter().map(|p| p.0).collect::<Float64Array>()),
        Arc::new(pairs.iter().map(|p| p.3).collect::<UInt8Array>()),
        Arc::new(pairs.iter().map(|p| Some(p.4)).collect::<BooleanArray>()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(engine)?;
    warehouse.write_parquet(&core.join(FILES[2]), schema, &[batch])
}
