//! Pipeline configuration (`ward.toml`): where the warehouse is, the
//! measurement period, and the sources to load.
//!
//! Relative paths are resolved against the directory of the config file.
//! Unknown keys and bad values are [`WardError::Config`] errors naming the
//! file, line, column and key.

use std::ops::Range;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::deid::{DeidConfig, KeySource};
use crate::error::{Result, WardError};
use crate::ingest::{SourceConfig, SourceFormat};
use crate::measure::Period;
use crate::tomlfile::{config_error, line_col, load_toml};

/// A checked pipeline configuration.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The config file this was read from.
    pub path: PathBuf,
    /// Root of the warehouse (`staging/`, `rejects/`, `state/`, ...).
    pub warehouse: PathBuf,
    /// The group every warehouse file and directory belongs to
    /// (`warehouse_group`, checked to exist): read access for its members.
    /// `None`: the group the files get by default.
    pub warehouse_group: Option<u32>,
    /// The measurement period measures are computed for, when set.
    pub measurement_period: Option<Period>,
    /// Dates after this day are rejected as being in the future; `None`
    /// means the day the run starts.
    pub as_of: Option<NaiveDate>,
    /// Directory of measure SQL, metadata and value sets (`queries = ...`);
    /// `None` lets the caller choose (the binary uses the bundled `queries/`).
    pub queries: Option<PathBuf>,
    /// Linkage settings (`[link]`).
    pub link: crate::link::LinkOptions,
    /// Published counts from 1 to this minus one are suppressed
    /// (`[report] min_cell_size`, default 11).
    pub min_cell_size: u64,
    /// Run directories kept under `runs/` (`[runs] keep`, default 7); the
    /// current run is always kept.
    pub keep_runs: usize,
    /// Data-quality gates of `ward run` (`[gates]`).
    pub gates: crate::runs::Gates,
    /// The providers to load, in config order.
    pub sources: Vec<SourceConfig>,
    /// De-identification settings (`[deid]`).
    pub deid: DeidConfig,
    /// Data-quality drift settings (`[dq]`).
    pub dq: crate::dq::DqOptions,
    /// The research endpoint, `ward serve` (`[serve]`).
    pub serve: crate::serve::ServeConfig,
    /// Where SQL stages run (`[engine]`): locally, or on a Ballista cluster.
    pub engine: crate::cluster::Engine,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    warehouse: Spanned<String>,
    warehouse_group: Option<Spanned<String>>,
    measurement_period: Option<Spanned<RawPeriod>>,
    queries: Option<Spanned<String>>,
    #[serde(default)]
    ingest: RawIngest,
    link: Option<Spanned<RawLink>>,
    report: Option<Spanned<RawReport>>,
    runs: Option<Spanned<RawRuns>>,
    gates: Option<Spanned<RawGates>>,
    dq: Option<Spanned<RawDq>>,
    deid: Option<Spanned<RawDeid>>,
    serve: Option<Spanned<RawServe>>,
    engine: Option<Spanned<RawEngine>>,
    sources: Option<Spanned<Vec<RawSource>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServe {
    listen: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    insecure: Option<bool>,
    tokens: Option<String>,
    audit_log: Option<String>,
    max_concurrent: Option<usize>,
    max_queued: Option<usize>,
    memory_limit: Option<String>,
    timeout: Option<String>,
    min_cell: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    kind: String,
    scheduler: Option<String>,
    partitions: Option<usize>,
    scratch: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDq {
    drift_tolerance_pct: Option<f64>,
    drift_runs: Option<usize>,
    min_new_rows: Option<u64>,
    #[serde(default)]
    checks: std::collections::BTreeMap<String, crate::dq::CheckOverride>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeid {
    key_file: Option<Spanned<String>>,
    key_env: Option<Spanned<String>>,
    demo_key: Option<Spanned<bool>>,
    mode: Option<crate::deid::DeidMode>,
    k: Option<Spanned<u64>>,
    suppress_small_classes: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeriod {
    #[serde(deserialize_with = "de_date")]
    start: NaiveDate,
    #[serde(deserialize_with = "de_date")]
    end: NaiveDate,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    min_cell_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuns {
    keep: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    max_reject_rate: Option<f64>,
    warn_reject_rate: Option<f64>,
    max_row_drop: Option<f64>,
    warn_row_drop: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    threshold: Option<f64>,
    within_source: Option<bool>,
    within_source_threshold: Option<f64>,
    #[serde(alias = "twins_guard")]
    household: Option<bool>,
    review_threshold: Option<f64>,
    labels: Option<Spanned<String>>,
    blocking: Option<Spanned<Vec<Spanned<RawBlocking>>>>,
    comparison: Option<Vec<Spanned<RawComparison>>>,
    u_pairs: Option<usize>,
    seed: Option<u64>,
    refit_growth: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComparison {
    column: String,
    levels: Vec<String>,
    term_frequency: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlocking {
    name: String,
    on: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    #[serde(default, deserialize_with = "de_opt_date")]
    as_of: Option<NaiveDate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    format: SourceFormat,
    path: Spanned<String>,
    mapping: Option<Spanned<String>>,
    #[serde(default)]
    nightly: bool,
}

impl PipelineConfig {
    /// Reads and checks a pipeline config file.
    pub fn load(path: &Path) -> Result<PipelineConfig> {
        let (raw, text): (RawConfig, String) = load_toml(path)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let file = ConfigFile {
            path,
            text: &text,
            base: &base,
        };
        let measurement_period = raw.measurement_period.map(|p| file.period(p)).transpose()?;
        let sources = file.sources(raw.sources)?;
        let link = match raw.link {
            Some(l) => file.link(l)?,
            None => crate::link::LinkOptions::default(),
        };
        let min_cell_size = match raw.report {
            Some(r) => file.at_least_one(
                r.span(),
                r.into_inner().min_cell_size,
                "report.min_cell_size",
            )?,
            None => None,
        };
        let keep_runs = match raw.runs {
            Some(r) => file.at_least_one(r.span(), r.into_inner().keep, "runs.keep")?,
            None => None,
        };
        let gates = match raw.gates {
            Some(g) => file.gates(g)?,
            None => crate::runs::Gates::default(),
        };
        let mut dq = crate::dq::DqOptions::default();
        if let Some(d) = raw.dq {
            let span = d.span();
            let d = d.into_inner();
            if let Some(t) = d.drift_tolerance_pct {
                if !(0.0..=100.0).contains(&t) {
                    return Err(file.err(
                        span,
                        "dq.drift_tolerance_pct",
                        "percentage points from 0 to 100".into(),
                    ));
                }
                dq.drift_tolerance_pct = t;
            }
            if let Some(n) = file.at_least_one(span.clone(), d.drift_runs, "dq.drift_runs")? {
                dq.drift_runs = n;
            }
            if let Some(n) = d.min_new_rows {
                dq.min_new_rows = n;
            }
            for (id, o) in &d.checks {
                if o.threshold_pct.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
                    return Err(file.err(
                        span.clone(),
                        &format!("dq.checks.{id}.threshold_pct"),
                        "a percentage from 0 to 100".into(),
                    ));
                }
            }
            dq.overrides = d.checks;
        }
        let deid = deid_config(path, &text, &base, raw.deid)?;
        let warehouse = base.join(raw.warehouse.get_ref());
        if warehouse.exists() && !warehouse.is_dir() {
            return Err(file.err(
                raw.warehouse.span(),
                "warehouse",
                format!("{} exists and is not a directory", warehouse.display()),
            ));
        }
        let warehouse_group = raw
            .warehouse_group
            .map(|g| file.warehouse_group(g))
            .transpose()?;
        let queries = raw.queries.map(|q| file.queries(q)).transpose()?;
        let serve = file.serve(raw.serve, &warehouse)?;
        let engine = file.engine(raw.engine, &warehouse)?;

        Ok(PipelineConfig {
            path: path.to_path_buf(),
            warehouse,
            warehouse_group,
            measurement_period,
            as_of: raw.ingest.as_of,
            queries,
            link,
            min_cell_size: min_cell_size.unwrap_or(11),
            keep_runs: keep_runs.unwrap_or(7),
            gates,
            sources,
            deid,
            dq,
            serve,
            engine,
        })
    }
}

/// The config file being checked: errors name it, the line and column of a
/// span in its text, and the key; relative paths resolve against `base`.
struct ConfigFile<'a> {
    path: &'a Path,
    text: &'a str,
    base: &'a Path,
}

impl ConfigFile<'_> {
    fn err(&self, span: Range<usize>, key: &str, message: String) -> WardError {
        config_error(self.path, self.text, Some(span), Some(key), message)
    }

    /// `measurement_period`: start on or before end.
    fn period(&self, p: Spanned<RawPeriod>) -> Result<Period> {
        let span = p.span();
        let p = p.into_inner();
        if p.start > p.end {
            return Err(self.err(span, "measurement_period", "start is after end".into()));
        }
        Ok(Period {
            start: p.start,
            end: p.end,
        })
    }

    /// A count that must be at least 1 when given.
    fn at_least_one<N: PartialOrd + From<u8>>(
        &self,
        span: Range<usize>,
        value: Option<N>,
        key: &str,
    ) -> Result<Option<N>> {
        match value {
            Some(n) if n < N::from(1) => Err(self.err(span, key, "must be at least 1".into())),
            other => Ok(other),
        }
    }

    /// `[engine]`: `kind = "local"` (no other key), or `kind = "ballista"`
    /// with a `scheduler` address and optional `partitions` and `scratch`.
    fn engine(
        &self,
        raw: Option<Spanned<RawEngine>>,
        warehouse: &Path,
    ) -> Result<crate::cluster::Engine> {
        use crate::cluster::{ClusterConfig, Engine};
        let Some(raw) = raw else {
            return Ok(Engine::Local);
        };
        let span = raw.span();
        let r = raw.into_inner();
        let err = |key: &str, message: String| self.err(span.clone(), key, message);
        match r.kind.as_str() {
            "local" => {
                if r.scheduler.is_some() || r.partitions.is_some() || r.scratch.is_some() {
                    return Err(err(
                        "engine.kind",
                        "scheduler, partitions and scratch are for kind = \"ballista\"".into(),
                    ));
                }
                Ok(Engine::Local)
            }
            "ballista" => {
                let scheduler = r.scheduler.ok_or_else(|| {
                    err(
                        "engine.scheduler",
                        "kind = \"ballista\" needs the scheduler's address, df://host:50050".into(),
                    )
                })?;
                ClusterConfig::scheduler_url(&scheduler).map_err(|m| err("engine.scheduler", m))?;
                let partitions = self
                    .at_least_one(span.clone(), r.partitions, "engine.partitions")?
                    .unwrap_or(16);
                let scratch = match r.scratch {
                    Some(dir) => self.base.join(dir),
                    None => warehouse.join(".tmp").join("engine"),
                };
                Ok(Engine::Ballista(ClusterConfig {
                    scheduler,
                    partitions,
                    scratch,
                }))
            }
            other => Err(err(
                "engine.kind",
                format!("`{other}` is not an engine: \"local\" or \"ballista\""),
            )),
        }
    }

    /// `[serve]`: every key optional (see [`crate::serve::ServeConfig`]);
    /// TLS needs both files, or `insecure = true` says plaintext is meant.
    fn serve(
        &self,
        raw: Option<Spanned<RawServe>>,
        warehouse: &Path,
    ) -> Result<crate::serve::ServeConfig> {
        let mut c = crate::serve::ServeConfig::defaults(warehouse);
        let Some(raw) = raw else {
            return Ok(c);
        };
        let span = raw.span();
        let r = raw.into_inner();
        let err = |key: &str, message: String| self.err(span.clone(), key, message);
        if let Some(listen) = r.listen {
            c.listen = listen.parse().map_err(|_| {
                err(
                    "serve.listen",
                    format!("`{listen}` is not an address such as 127.0.0.1:32010"),
                )
            })?;
        }
        c.tls = match (r.tls_cert, r.tls_key) {
            (Some(cert), Some(key)) => Some((self.base.join(cert), self.base.join(key))),
            (None, None) => None,
            _ => {
                return Err(err(
                    "serve.tls_cert",
                    "tls_cert and tls_key go together".into(),
                ));
            }
        };
        c.insecure = r.insecure.unwrap_or(false);
        if c.insecure && c.tls.is_some() {
            return Err(err(
                "serve.insecure",
                "insecure = true with a TLS certificate: choose one".into(),
            ));
        }
        if let Some(t) = r.tokens {
            c.tokens = self.base.join(t);
        }
        if let Some(a) = r.audit_log {
            c.audit_log = self.base.join(a);
        }
        if let Some(n) =
            self.at_least_one(span.clone(), r.max_concurrent, "serve.max_concurrent")?
        {
            c.max_concurrent = n;
        }
        if let Some(n) = r.max_queued {
            c.max_queued = n;
        }
        if let Some(m) = r.memory_limit {
            c.memory_limit =
                crate::query::parse_size(&m).map_err(|e| err("serve.memory_limit", e))?;
        }
        if let Some(t) = r.timeout {
            c.timeout = crate::query::parse_duration(&t).map_err(|e| err("serve.timeout", e))?;
        }
        c.min_cell = r.min_cell;
        Ok(c)
    }

    /// `[[sources]]`: at least one, names usable as directory names and
    /// unique, a mapping exactly for CSV sources.
    fn sources(&self, raw: Option<Spanned<Vec<RawSource>>>) -> Result<Vec<SourceConfig>> {
        let raw_sources = match raw {
            Some(s) if !s.get_ref().is_empty() => s.into_inner(),
            other => {
                return Err(config_error(
                    self.path,
                    self.text,
                    other.map(|s| s.span()),
                    Some("sources"),
                    "at least one [[sources]] entry is required".into(),
                ));
            }
        };
        let mut sources: Vec<SourceConfig> = Vec::new();
        for s in raw_sources {
            // A repeated name was valid the first time: same error order as
            // checking validity first.
            let name = s.name.get_ref();
            if sources.iter().any(|o| o.name == *name) {
                return Err(self.err(
                    s.name.span(),
                    "sources.name",
                    format!("duplicate source name '{name}'"),
                ));
            }
            sources.push(self.source(s)?);
        }
        Ok(sources)
    }

    /// One `[[sources]]` entry.
    fn source(&self, s: RawSource) -> Result<SourceConfig> {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(self.err(
                s.name.span(),
                "sources.name",
                "source names use only a-z, 0-9, '_' and '-' (they name directories)".into(),
            ));
        }
        let mapping = match (s.format, &s.mapping) {
            (SourceFormat::Csv, Some(m)) => Some(self.base.join(m.get_ref())),
            (SourceFormat::Csv, None) => {
                return Err(self.err(
                    s.name.span(),
                    "sources.mapping",
                    format!("source '{name}' has format csv and needs a mapping file"),
                ));
            }
            (_, Some(m)) => {
                return Err(self.err(
                    m.span(),
                    "sources.mapping",
                    format!("source '{name}' is FHIR, which needs no mapping"),
                ));
            }
            (_, None) => None,
        };
        let mut pattern = self.base.join(s.path.get_ref());
        if pattern.is_dir() {
            pattern = pattern.join(match s.format {
                SourceFormat::Csv => "*",
                SourceFormat::FhirNdjson => "*.ndjson",
                SourceFormat::FhirBundle => "*.json",
            });
        }
        Ok(SourceConfig {
            name,
            format: s.format,
            pattern: pattern.to_string_lossy().into_owned(),
            mapping,
            nightly: s.nightly,
        })
    }

    /// `[link]`: thresholds in their ranges, then comparisons, blocking
    /// rules and labels.
    fn link(&self, l: Spanned<RawLink>) -> Result<crate::link::LinkOptions> {
        let mut link = crate::link::LinkOptions::default();
        let span = l.span();
        let l = l.into_inner();
        if let Some(t) = l.threshold {
            if !(0.5..1.0).contains(&t) {
                return Err(self.err(
                    span,
                    "link.threshold",
                    "the match probability threshold must be at least 0.5 and below 1".into(),
                ));
            }
            link.threshold = t;
        }
        if let Some(t) = l.within_source_threshold {
            if !(link.threshold..1.0).contains(&t) {
                return Err(self.err(
                    span,
                    "link.within_source_threshold",
                    "must be at least link.threshold and below 1".into(),
                ));
            }
            link.within_source_threshold = Some(t);
        }
        if l.within_source == Some(false) {
            link.within_source_threshold = None;
        } else if link
            .within_source_threshold
            .is_some_and(|t| t < link.threshold)
        {
            link.within_source_threshold = Some(link.threshold);
        }
        link.household = l.household.unwrap_or(link.household);
        self.comparisons(&mut link, l.comparison.unwrap_or_default())?;
        if let Some(t) = l.review_threshold {
            if !(0.0..=link.threshold).contains(&t) {
                return Err(self.err(
                    span,
                    "link.review_threshold",
                    "must be between 0 and link.threshold".into(),
                ));
            }
            link.review_threshold = t;
        }
        if let Some(rules) = l.blocking {
            link.blocking = self.blocking(rules)?;
        }
        if let Some(labels) = l.labels {
            let file = self.base.join(labels.get_ref());
            if !file.is_file() {
                return Err(self.err(
                    labels.span(),
                    "link.labels",
                    format!("{} is not a file", file.display()),
                ));
            }
            link.labels = Some(file);
        }
        link.u_pairs = l.u_pairs.unwrap_or(link.u_pairs);
        link.seed = l.seed.unwrap_or(link.seed);
        if let Some(g) = l.refit_growth {
            if !(g >= 0.0 && g.is_finite()) {
                return Err(self.err(
                    span,
                    "link.refit_growth",
                    "must be a share of 0 or more (0.1 = 10 %)".into(),
                ));
            }
            link.refit_growth = g;
        }
        Ok(link)
    }

    /// `[[link.comparison]]`: each replaces the default comparison of its
    /// column (`levels = []` drops the column), once per column.
    fn comparisons(
        &self,
        link: &mut crate::link::LinkOptions,
        declared: Vec<Spanned<RawComparison>>,
    ) -> Result<()> {
        use crate::link::model::{Column, Comparison};
        let mut seen = std::collections::BTreeSet::new();
        for c in declared {
            let span = c.span();
            let RawComparison {
                column,
                levels,
                term_frequency,
            } = c.into_inner();
            let bad = |m: String| self.err(span.clone(), "link.comparison", m);
            let col = Column::parse(&column).ok_or_else(|| {
                bad(format!(
                    "'{column}' is not a compared column (columns: {})",
                    Column::ALL.map(Column::name).join(", ")
                ))
            })?;
            if !seen.insert(column.clone()) {
                return Err(bad(format!("{column} is declared twice")));
            }
            let at = link.comparisons.iter().position(|c| c.column == col);
            if levels.is_empty() {
                // Not compared at all.
                if let Some(at) = at {
                    link.comparisons.remove(at);
                }
                continue;
            }
            let tf = term_frequency
                .unwrap_or_else(|| at.is_some_and(|i| link.comparisons[i].term_frequency));
            let levels: Vec<&str> = levels.iter().map(String::as_str).collect();
            let comparison =
                Comparison::new(col, &levels, tf).map_err(|m| bad(format!("{column}: {m}")))?;
            match at {
                Some(i) => link.comparisons[i] = comparison,
                None => link.comparisons.push(comparison),
            }
        }
        Ok(())
    }

    /// `[[link.blocking]]`: 1 to the maximum of rules, each named once, each
    /// one SQL expression.
    fn blocking(&self, rules: Spanned<Vec<Spanned<RawBlocking>>>) -> Result<Vec<(String, String)>> {
        let (span, rules) = (rules.span(), rules.into_inner());
        if rules.is_empty() || rules.len() > crate::link::MAX_BLOCKING_RULES {
            return Err(self.err(
                span,
                "link.blocking",
                format!(
                    "give 1 to {} [[link.blocking]] rules",
                    crate::link::MAX_BLOCKING_RULES
                ),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut blocking = Vec::with_capacity(rules.len());
        for rule in rules {
            let span = rule.span();
            let RawBlocking { name, on } = rule.into_inner();
            if name.trim().is_empty() || !names.insert(name.clone()) {
                return Err(self.err(
                    span,
                    "link.blocking.name",
                    "every rule needs a name of its own".into(),
                ));
            }
            crate::link::check_blocking_rule(&on).map_err(|m| {
                self.err(
                    span.clone(),
                    "link.blocking.on",
                    format!("rule '{name}': {m}"),
                )
            })?;
            blocking.push((name, on));
        }
        Ok(blocking)
    }

    /// `[gates]`: shares between 0 and 1, warnings at or below failures.
    fn gates(&self, g: Spanned<RawGates>) -> Result<crate::runs::Gates> {
        let mut gates = crate::runs::Gates::default();
        let span = g.span();
        let g = g.into_inner();
        for (key, value, slot) in [
            (
                "gates.max_reject_rate",
                g.max_reject_rate,
                &mut gates.max_reject_rate,
            ),
            (
                "gates.warn_reject_rate",
                g.warn_reject_rate,
                &mut gates.warn_reject_rate,
            ),
            (
                "gates.max_row_drop",
                g.max_row_drop,
                &mut gates.max_row_drop,
            ),
            (
                "gates.warn_row_drop",
                g.warn_row_drop,
                &mut gates.warn_row_drop,
            ),
        ] {
            if let Some(v) = value {
                if !(0.0..=1.0).contains(&v) {
                    return Err(self.err(
                        span.clone(),
                        key,
                        "a share between 0 and 1 (0.05 = 5 %)".into(),
                    ));
                }
                *slot = v;
            }
        }
        if gates.warn_reject_rate > gates.max_reject_rate
            || gates.warn_row_drop > gates.max_row_drop
        {
            return Err(self.err(
                span,
                "gates",
                "a warning threshold is above its failure threshold".into(),
            ));
        }
        Ok(gates)
    }

    /// `warehouse_group`: a group that exists here (Unix only).
    fn warehouse_group(&self, g: Spanned<String>) -> Result<u32> {
        #[cfg(unix)]
        return crate::warehouse::group_id(g.get_ref()).ok_or_else(|| {
            self.err(
                g.span(),
                "warehouse_group",
                format!("no group '{}' on this system", g.get_ref()),
            )
        });
        #[cfg(not(unix))]
        Err(self.err(g.span(), "warehouse_group", "only on Unix systems".into()))
    }

    /// `queries`: a directory with a `measures/` folder.
    fn queries(&self, q: Spanned<String>) -> Result<PathBuf> {
        let dir = self.base.join(q.get_ref());
        if !dir.join("measures").is_dir() {
            return Err(self.err(
                q.span(),
                "queries",
                format!("{} has no measures/ directory", dir.display()),
            ));
        }
        Ok(dir)
    }
}

/// Checks `[deid]`: at most one key source, `k` at least 2.
fn deid_config(
    path: &Path,
    text: &str,
    base: &Path,
    raw: Option<Spanned<RawDeid>>,
) -> Result<DeidConfig> {
    let mut cfg = DeidConfig {
        config_path: path.to_path_buf(),
        ..DeidConfig::default()
    };
    let Some(raw) = raw else {
        return Ok(cfg);
    };
    let raw = raw.into_inner();
    let err = |span: Range<usize>, key: &str, message: &str| {
        config_error(path, text, Some(span), Some(key), message.to_string())
    };
    let mut sources = Vec::new();
    if let Some(f) = &raw.key_file {
        sources.push((f.span(), KeySource::File(base.join(f.get_ref()))));
    }
    if let Some(e) = &raw.key_env {
        if e.get_ref().is_empty() {
            return Err(err(e.span(), "deid.key_env", "names no variable"));
        }
        sources.push((e.span(), KeySource::Env(e.get_ref().clone())));
    }
    if let Some(d) = raw.demo_key.as_ref().filter(|d| *d.get_ref()) {
        sources.push((d.span(), KeySource::Demo));
    }
    if sources.len() > 1 {
        return Err(err(
            sources[1].0.clone(),
            "deid",
            "set only one of key_file, key_env and demo_key",
        ));
    }
    if let Some((span, key)) = sources.pop() {
        cfg.key_line = Some(line_col(text, span.start).0);
        cfg.key = key;
    }
    if let Some(mode) = raw.mode {
        cfg.mode = mode;
    }
    if let Some(k) = raw.k {
        if *k.get_ref() < 2 {
            return Err(err(k.span(), "deid.k", "must be at least 2"));
        }
        cfg.k = *k.get_ref();
    }
    cfg.suppress_small_classes = raw.suppress_small_classes.unwrap_or(false);
    Ok(cfg)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DateValue {
    Native(toml::value::Datetime),
    Text(String),
}

fn to_date<E: serde::de::Error>(v: DateValue) -> std::result::Result<NaiveDate, E> {
    let text = match v {
        DateValue::Native(d) => match (d.date, d.time) {
            (Some(date), None) => {
                return NaiveDate::from_ymd_opt(
                    date.year as i32,
                    date.month as u32,
                    date.day as u32,
                )
                .ok_or_else(|| E::custom("invalid date"));
            }
            _ => return Err(E::custom("expected a date (YYYY-MM-DD) without time")),
        },
        DateValue::Text(s) => s,
    };
    NaiveDate::parse_from_str(&text, "%Y-%m-%d")
        .map_err(|_| E::custom(format!("'{text}' is not a date (YYYY-MM-DD)")))
}

fn de_date<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<NaiveDate, D::Error> {
    to_date(DateValue::deserialize(d)?)
}

fn de_opt_date<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<NaiveDate>, D::Error> {
    Option::<DateValue>::deserialize(d)?
        .map(to_date)
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;

    /// `GOOD` with `[section]` set to `body` fails to load with a config
    /// error containing `needle`.
    fn assert_section_error(dir: &Path, section: &str, body: &str, needle: &str) {
        let text = format!("{GOOD}\n[{section}]\n{body}\n");
        match PipelineConfig::load(&write(dir, "ward.toml", &text)).unwrap_err() {
            WardError::Config { message, .. } => {
                assert!(message.contains(needle), "{body}: {message}")
            }
            other => panic!("{body}: unexpected {other}"),
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = r#"
warehouse = "wh"
measurement_period = { start = 2025-01-01, end = "2025-12-31" }

[ingest]
as_of = 2026-01-15

[[sources]]
name = "clinic"
format = "csv"
path = "data/*.csv"
mapping = "map.toml"
"#;

    #[test]
    fn loads_and_resolves_paths_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "ward.toml", GOOD);
        let c = PipelineConfig::load(&p).unwrap();
        assert_eq!(c.warehouse, dir.path().join("wh"));
        assert_eq!(
            c.measurement_period.unwrap().end,
            NaiveDate::from_ymd_opt(2025, 12, 31).unwrap()
        );
        assert_eq!(c.as_of, NaiveDate::from_ymd_opt(2026, 1, 15));
        assert_eq!(c.sources[0].mapping, Some(dir.path().join("map.toml")));
        assert!(c.sources[0].pattern.ends_with("data/*.csv"));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "ward.toml",
            &GOOD.replace("format = \"csv\"", "format = \"csv\"\nfromat = 1"),
        );
        let e = PipelineConfig::load(&p).unwrap_err();
        match &e {
            WardError::Config {
                line, key, message, ..
            } => {
                assert_eq!(*line, Some(11), "{e}");
                assert_eq!(key.as_deref(), Some("fromat"));
                assert!(message.contains("unknown field"), "{message}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().contains("ward.toml:11:"), "{e}");
    }

    #[test]
    fn bad_values_are_located() {
        let dir = tempfile::tempdir().unwrap();
        for (text, line, needle) in [
            (GOOD.replace("\"csv\"", "\"xls\""), 10, "unknown variant"),
            (
                GOOD.replace("2025-12-31", "2024-12-31"),
                3,
                "start is after end",
            ),
            (GOOD.replace("\"clinic\"", "\"Clinic A\""), 9, "a-z"),
            (
                GOOD.replace("as_of = 2026-01-15", "as_of = \"15/01/2026\""),
                6,
                "not a date",
            ),
            ("warehouse = \"wh\"\n[[sources]\n".to_string(), 2, ""),
        ] {
            let p = write(dir.path(), "ward.toml", &text);
            match PipelineConfig::load(&p).unwrap_err() {
                WardError::Config {
                    line: l, message, ..
                } => {
                    assert_eq!(l, Some(line), "{message}");
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn the_serve_section_defaults_resolves_and_locates_mistakes() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "ward.toml", GOOD);
        let c = PipelineConfig::load(&p).unwrap().serve;
        assert_eq!(c.listen.to_string(), "127.0.0.1:32010");
        assert!(c.tls.is_none() && !c.insecure);
        assert_eq!(c.tokens, dir.path().join("wh/serve/tokens.json"));
        let text = format!(
            "{GOOD}\n[serve]\nlisten = \"0.0.0.0:9000\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
             max_concurrent = 2\nmemory_limit = \"1G\"\ntimeout = \"90s\"\nmin_cell = 11\n"
        );
        let c = PipelineConfig::load(&write(dir.path(), "ward.toml", &text))
            .unwrap()
            .serve;
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(
            c.tls,
            Some((dir.path().join("c.pem"), dir.path().join("k.pem")))
        );
        assert_eq!((c.max_concurrent, c.memory_limit), (2, 1 << 30));
        assert_eq!((c.timeout.as_secs(), c.min_cell), (90, Some(11)));
        for (serve, needle) in [
            ("listen = \"localhost\"", "not an address"),
            ("tls_cert = \"c.pem\"", "go together"),
            (
                "insecure = true\ntls_cert = \"c\"\ntls_key = \"k\"",
                "choose one",
            ),
            ("max_concurrent = 0", "at least 1"),
            ("memory_limit = \"lots\"", "not a size"),
            ("timeout = \"0s\"", "at least one second"),
            ("port = 1", "unknown field"),
        ] {
            assert_section_error(dir.path(), "serve", serve, needle);
        }
    }

    #[test]
    fn the_engine_section_defaults_resolves_and_locates_mistakes() {
        use crate::cluster::{ClusterConfig, Engine};
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "ward.toml", GOOD);
        assert_eq!(PipelineConfig::load(&p).unwrap().engine, Engine::Local);
        let text = format!("{GOOD}\n[engine]\nkind = \"ballista\"\nscheduler = \"df://s:7\"\n");
        let c = PipelineConfig::load(&write(dir.path(), "ward.toml", &text)).unwrap();
        assert_eq!(
            c.engine,
            Engine::Ballista(ClusterConfig {
                scheduler: "df://s:7".into(),
                partitions: 16,
                scratch: dir.path().join("wh/.tmp/engine"),
            })
        );
        for (engine, needle) in [
            ("kind = \"spark\"", "not an engine"),
            ("kind = \"ballista\"", "needs the scheduler"),
            ("kind = \"ballista\"\nscheduler = \"s:1\"", "df://host"),
            (
                "kind = \"ballista\"\nscheduler = \"df://s\"\npartitions = 0",
                "at least 1",
            ),
            ("kind = \"local\"\nscheduler = \"df://s\"", "for kind"),
            ("kind = \"local\"\nhost = 1", "unknown field"),
        ] {
            assert_section_error(dir.path(), "engine", engine, needle);
        }
    }

    #[test]
    fn missing_sources_and_mapping_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "ward.toml", "warehouse = \"wh\"\n");
        assert!(PipelineConfig::load(&p).unwrap_err().is_config_error());
        let p = write(
            dir.path(),
            "ward.toml",
            &GOOD.replace("mapping = \"map.toml\"", ""),
        );
        let e = PipelineConfig::load(&p).unwrap_err();
        assert!(e.to_string().contains("needs a mapping"), "{e}");
    }

    #[test]
    fn glob_matching_nothing_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "ward.toml", GOOD);
        let c = PipelineConfig::load(&p).unwrap();
        let e = c.sources[0].input_files().unwrap_err();
        assert!(matches!(e, WardError::NoInput { .. }));
        assert!(e.to_string().contains("clinic"), "{e}");
    }

    #[test]
    fn globs_do_not_follow_directory_symlinks_or_leave_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let data = root.join("data");
        fs::create_dir_all(data.join("sub")).unwrap();
        fs::write(data.join("a.csv"), "x").unwrap();
        fs::write(data.join("sub/b.csv"), "x").unwrap();
        fs::create_dir_all(root.join("other")).unwrap();
        fs::write(root.join("other/secret.csv"), "x").unwrap();
        std::os::unix::fs::symlink(&data, data.join("sub/loop")).unwrap(); // a cycle
        std::os::unix::fs::symlink(root.join("other/secret.csv"), data.join("c.csv")).unwrap();
        std::os::unix::fs::symlink(root.join("nowhere"), data.join("dangling.csv")).unwrap();
        let source = SourceConfig {
            name: "s".into(),
            format: SourceFormat::Csv,
            pattern: format!("{}/**/*.csv", data.display()),
            mapping: None,
            nightly: false,
        };
        let (files, ignored) = source.input_files().unwrap();
        assert_eq!(files, [data.join("a.csv"), data.join("sub/b.csv")]);
        let reasons: BTreeMap<PathBuf, &str> = ignored.into_iter().collect();
        assert_eq!(
            reasons[&data.join("c.csv")],
            "outside the source's directory"
        );
        assert_eq!(reasons[&data.join("dangling.csv")], "not a regular file");
        assert!(
            reasons
                .iter()
                .filter(|(p, _)| p.starts_with(data.join("sub/loop")))
                .all(|(_, r)| *r == "reached through a directory symlink")
        );
    }
}
