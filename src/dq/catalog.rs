//! The check catalogue: `queries/checks/*.toml`, each naming a SQL template
//! (`<name>.sql` beside it, or `sql = "..."`) and listing its instances.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, WardError};
use crate::schema::Table;
use crate::tomlfile::{file_error as config, load_toml};

/// The Kahn et al. (2016) harmonized data-quality categories, as used by
/// OHDSI's Data Quality Dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Values follow the formats, vocabularies and relations the model asks for.
    Conformance,
    /// Values are present where the data should have them.
    Completeness,
    /// Values are believable (ranges, time order, uniqueness).
    Plausibility,
}

impl Category {
    /// Every category, in the order the scorecard shows them.
    pub const ALL: [Category; 3] = [
        Category::Conformance,
        Category::Completeness,
        Category::Plausibility,
    ];

    /// The category's name, as in the check files and outputs.
    pub fn name(self) -> &'static str {
        match self {
            Category::Conformance => "conformance",
            Category::Completeness => "completeness",
            Category::Plausibility => "plausibility",
        }
    }
}

/// Kahn subcategories: conformance is value, relational or computational;
/// plausibility is uniqueness, atemporal or temporal; completeness has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subcategory {
    Value,
    Relational,
    Computational,
    Uniqueness,
    Atemporal,
    Temporal,
}

impl Subcategory {
    /// The subcategory's name, as in the check files and outputs.
    pub fn name(self) -> &'static str {
        match self {
            Subcategory::Value => "value",
            Subcategory::Relational => "relational",
            Subcategory::Computational => "computational",
            Subcategory::Uniqueness => "uniqueness",
            Subcategory::Atemporal => "atemporal",
            Subcategory::Temporal => "temporal",
        }
    }

    fn belongs_to(self) -> Category {
        match self {
            Subcategory::Value | Subcategory::Relational | Subcategory::Computational => {
                Category::Conformance
            }
            Subcategory::Uniqueness | Subcategory::Atemporal | Subcategory::Temporal => {
                Category::Plausibility
            }
        }
    }
}

/// What a check's failure does to the night.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Above its threshold on any source, the night fails (a gate).
    Fail,
    /// Above its threshold: a warning in the run and the report.
    Warn,
    /// Above its threshold: shown, nothing more (a figure to watch for drift).
    Info,
}

impl Severity {
    /// The severity's name, as in the check files and outputs.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Fail => "fail",
            Severity::Warn => "warn",
            Severity::Info => "info",
        }
    }
}

/// One check instance, its SQL rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Unique over the catalogue: `[a-z0-9_]+`.
    pub id: String,
    pub category: Category,
    pub subcategory: Option<Subcategory>,
    /// The table checked (`None`: several, e.g. every fact table).
    pub table: Option<Table>,
    pub column: Option<String>,
    pub description: String,
    pub severity: Severity,
    /// The share of checked rows, in %, that may violate the check.
    pub threshold_pct: f64,
    /// Overrides the run's drift tolerance (percentage points).
    pub drift_tolerance_pct: Option<f64>,
    /// The query: one row per source with `source`, `violating`, `checked`.
    pub sql: String,
    /// Each row is counted on its own (its own columns, the source's
    /// layout; never other rows or the person links): the counts of any
    /// split of the rows add up, so a night that only adds rows adds
    /// tonight's counts to the earlier ones instead of counting again.
    pub per_row: bool,
    /// The tables the query reads, through the views (`staging_<table>`,
    /// `rejects`, `person_link`, `dq_layout`): known once [`validate`]d;
    /// `None` counts as reading everything.
    ///
    /// [`validate`]: super::validate
    pub reads: Option<BTreeSet<String>>,
    /// The TOML file that declares the check.
    pub file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    description: Option<String>,
    sql: Option<String>,
    category: Category,
    subcategory: Option<Subcategory>,
    severity: Option<Severity>,
    threshold_pct: Option<f64>,
    drift_tolerance_pct: Option<f64>,
    /// Whether the file's `sql` counts each row on its own (see
    /// [`Check::per_row`]): said of the template, so it holds for the
    /// instances that use the file's template, not those naming their own.
    per_row: Option<bool>,
    /// Default parameters of every instance.
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    #[serde(default)]
    check: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    id: String,
    sql: Option<String>,
    description: Option<String>,
    table: Option<String>,
    column: Option<String>,
    subcategory: Option<Subcategory>,
    severity: Option<Severity>,
    threshold_pct: Option<f64>,
    drift_tolerance_pct: Option<f64>,
    per_row: Option<bool>,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
}

/// Reads every `queries/checks/*.toml`, sorted by check id. Each file names
/// a category (and default severity, threshold, template and parameters)
/// and lists its `[[check]]` instances; an instance's SQL template
/// (`sql = "name.sql"` beside the file, else `<file>.sql`) is rendered with
/// `{{table}}`, `{{column}}` and its parameters (the file's `[params]`,
/// then the instance's). A mistake — an unknown
/// table or column, a placeholder without a value, a parameter the template
/// does not use, a duplicate id — is a config error naming the file.
pub fn catalog(queries: &Path) -> Result<Vec<Check>> {
    let dir = queries.join("checks");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WardError::io("cannot read", &dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| WardError::io("cannot read", &dir, e))?
            .path();
        if path.extension().is_some_and(|x| x == "toml") {
            files.push(path);
        }
    }
    files.sort();
    let mut checks: Vec<Check> = Vec::new();
    let mut seen = BTreeSet::new();
    for path in files {
        for check in load_file(&path)? {
            if !seen.insert(check.id.clone()) {
                return Err(config(
                    &path,
                    format!("check id '{}' is used twice", check.id),
                ));
            }
            checks.push(check);
        }
    }
    checks.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(checks)
}

fn load_file(path: &Path) -> Result<Vec<Check>> {
    let (raw, _): (RawFile, String) = load_toml(path)?;
    if raw.check.is_empty() {
        return Err(config(path, "no [[check]] listed".into()));
    }
    let mut templates: BTreeMap<PathBuf, String> = BTreeMap::new();
    raw.check
        .into_iter()
        .map(|c| {
            let at = |m: String| config(path, format!("check '{}': {m}", c.id));
            let plain = !c.id.is_empty()
                && c.id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !plain {
                return Err(at("an id is lowercase letters, digits and '_'".into()));
            }
            let subcategory = c.subcategory.or(raw.subcategory);
            if let Some(s) = subcategory
                && s.belongs_to() != raw.category
            {
                return Err(at(format!(
                    "subcategory '{}' is not one of {}",
                    s.name(),
                    raw.category.name()
                )));
            }
            let table = c
                .table
                .as_deref()
                .map(|t| Table::from_name(t).ok_or_else(|| at(format!("no table '{t}'"))))
                .transpose()?;
            if let (Some(t), Some(col)) = (table, &c.column)
                && t.column(col).is_none()
            {
                return Err(at(format!("table '{}' has no column '{col}'", t.name())));
            }
            let threshold_pct = c
                .threshold_pct
                .or(raw.threshold_pct)
                .ok_or_else(|| at("no threshold_pct (here or for the file)".into()))?;
            for (key, v) in [
                ("threshold_pct", Some(threshold_pct)),
                (
                    "drift_tolerance_pct",
                    c.drift_tolerance_pct.or(raw.drift_tolerance_pct),
                ),
            ] {
                if v.is_some_and(|v| !(0.0..=100.0).contains(&v)) {
                    return Err(at(format!("{key} is a percentage from 0 to 100")));
                }
            }
            let sql_path = match c.sql.as_ref().or(raw.sql.as_ref()) {
                Some(name) => path.with_file_name(name),
                None => path.with_extension("sql"),
            };
            if !templates.contains_key(&sql_path) {
                let text = std::fs::read_to_string(&sql_path)
                    .map_err(|e| at(format!("cannot read {}: {e}", sql_path.display())))?;
                templates.insert(sql_path.clone(), text);
            }
            let own: BTreeSet<String> = c.params.keys().cloned().collect();
            let mut params = raw.params.clone();
            params.extend(c.params);
            let mut values: BTreeMap<String, String> = BTreeMap::new();
            for (k, v) in &params {
                values.insert(
                    k.clone(),
                    sql_value(v).map_err(|m| at(format!("{k}: {m}")))?,
                );
            }
            if let Some(t) = table {
                values.insert("table".into(), t.name().into());
            }
            if let Some(col) = &c.column {
                values.insert("column".into(), col.clone());
            }
            let sql = render(&templates[&sql_path], &values, &own).map_err(at)?;
            let per_row = c
                .per_row
                .unwrap_or(c.sql.is_none() && raw.per_row == Some(true));
            Ok(Check {
                description: c
                    .description
                    .or(raw.description.clone())
                    .unwrap_or_default(),
                severity: c.severity.or(raw.severity).unwrap_or(Severity::Warn),
                drift_tolerance_pct: c.drift_tolerance_pct.or(raw.drift_tolerance_pct),
                id: c.id,
                category: raw.category,
                subcategory,
                table,
                column: c.column,
                threshold_pct,
                sql,
                per_row,
                reads: None,
                file: path.to_path_buf(),
            })
        })
        .collect()
}

/// A parameter as SQL text: a string as written (a name or an expression),
/// a number as itself, a list as comma-separated SQL literals (strings
/// quoted) for `IN (...)`.
fn sql_value(v: &toml::Value) -> std::result::Result<String, String> {
    let literal = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(format!("'{}'", s.replace('\'', "''"))),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        _ => Err("a list holds strings or numbers".to_string()),
    };
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(if *b { "TRUE" } else { "FALSE" }.into()),
        toml::Value::Array(a) if !a.is_empty() => Ok(a
            .iter()
            .map(literal)
            .collect::<std::result::Result<Vec<_>, _>>()?
            .join(", ")),
        toml::Value::Array(_) => Err("an empty list".into()),
        _ => Err("a string, number, boolean or list".into()),
    }
}

/// Replaces every `{{name}}` of `template`; every placeholder needs a
/// value and every parameter of the instance itself (`own`; the file's
/// defaults serve several templates) must be used.
fn render(
    template: &str,
    values: &BTreeMap<String, String>,
    own: &BTreeSet<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut used = BTreeSet::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "the template has a '{{' without '}}'".to_string())?;
        let name = after[..end].trim();
        let value = values.get(name).ok_or_else(|| {
            format!("the template's {{{{{name}}}}} has no value (set it in [check.params])")
        })?;
        out.push_str(value);
        used.insert(name.to_string());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if let Some(unused) = own.iter().find(|k| !used.contains(k.as_str())) {
        return Err(format!("parameter '{unused}' is not used by the template"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join("checks")).unwrap();
        std::fs::write(dir.join("checks").join(name), text).unwrap();
    }

    #[test]
    fn instances_render_their_template() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "range.sql",
            "SELECT source, 0 AS violating, COUNT(*) AS checked FROM staging_{{table}} \
             WHERE code IN ({{codes}}) AND {{column}} > {{ high }} GROUP BY source",
        );
        write(
            dir.path(),
            "range.toml",
            r#"category = "plausibility"
subcategory = "atemporal"
threshold_pct = 1
[[check]]
id = "bmi_range"
table = "observation"
column = "value_num"
severity = "fail"
params = { codes = ["39156-5", "it's"], high = 100 }
"#,
        );
        let checks = catalog(dir.path()).unwrap();
        assert_eq!(checks.len(), 1);
        let c = &checks[0];
        assert_eq!(c.severity, Severity::Fail);
        assert_eq!(c.table, Some(Table::Observation));
        assert_eq!(
            c.sql,
            "SELECT source, 0 AS violating, COUNT(*) AS checked FROM staging_observation \
             WHERE code IN ('39156-5', 'it''s') AND value_num > 100 GROUP BY source"
        );
    }

    #[test]
    fn mistakes_name_the_file_and_check() {
        let cases = [
            ("id = \"x\"\ntable = \"nope\"", "no table 'nope'"),
            (
                "id = \"x\"\ntable = \"patient\"\ncolumn = \"code\"",
                "no column 'code'",
            ),
            ("id = \"x\"\nparams = { extra = 1 }", "'extra' is not used"),
            ("id = \"X-1\"", "lowercase"),
            (
                "id = \"x\"\nsubcategory = \"temporal\"",
                "not one of conformance",
            ),
            ("id = \"x\"\nthreshold_pct = 150", "percentage"),
        ];
        for (check, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "c.sql", "SELECT 1");
            write(
                dir.path(),
                "c.toml",
                &format!("category = \"conformance\"\nthreshold_pct = 1\n[[check]]\n{check}\n"),
            );
            let e = catalog(dir.path()).unwrap_err().to_string();
            assert!(e.contains("c.toml") && e.contains(expected), "{check}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c.sql", "SELECT {{missing}}");
        write(
            dir.path(),
            "c.toml",
            "category = \"completeness\"\nthreshold_pct = 1\n[[check]]\nid = \"x\"\n",
        );
        let e = catalog(dir.path()).unwrap_err().to_string();
        assert!(e.contains("{{missing}} has no value"), "{e}");
        write(
            dir.path(),
            "d.toml",
            "sql = \"c.sql\"\ncategory = \"completeness\"\nthreshold_pct = 1\n[[check]]\nid = \"x\"\nparams = { missing = 1 }\n",
        );
        write(
            dir.path(),
            "c.toml",
            "category = \"completeness\"\nthreshold_pct = 1\n[[check]]\nid = \"x\"\nparams = { missing = 1 }\n",
        );
        let e = catalog(dir.path()).unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }
}
