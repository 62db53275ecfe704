//! CSV mappings: per-provider TOML files that say, without code, how each of
//! the provider's files becomes rows of a canonical table.
//!
//! ```toml
//! [csv]
//! delimiter = ","
//! date_format = "%m/%d/%Y"          # default "iso"
//! datetime_format = "%m/%d/%Y %H:%M" # default "iso"
//!
//! [[files]]
//! match = "patients*.csv"            # glob on the file name
//! table = "patient"
//! [files.fields]
//! source_patient_id = "PatientID"    # a column of the file
//! birth_date = { column = "DOB", format = "%Y%m%d" }
//! sex = { column = "Sex", map = { "1" = "male", "2" = "female" }, default = "unknown" }
//! code_system = { value = "loinc" }  # a constant
//! address_line = { concat = ["StreetNo", "Street"] }             # joined by " "
//! state = { column = "ADDRESS", regex = '\b([A-Z]{2}) \d{5}', group = 1 }  # a part
//! ```
//!
//! The README's mapping reference documents every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::error::Result;
#[cfg(test)]
use crate::error::WardError;
use crate::normalize::{self, DateFormat};
use crate::schema::{Kind, Table};
use crate::tomlfile::{config_error, load_toml};

/// Character encoding of a provider's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// UTF-8 (a leading byte-order mark is ignored). Rows with invalid bytes
    /// are rejected (`invalid_utf8`).
    #[default]
    #[serde(alias = "utf8")]
    Utf8,
    /// ISO-8859-1 / Latin-1: every byte is one character.
    #[serde(alias = "iso-8859-1")]
    Latin1,
}

/// A checked CSV mapping.
#[derive(Debug, Clone)]
pub struct CsvMapping {
    pub path: PathBuf,
    /// SHA-256 of the mapping file: a changed mapping reloads its files.
    pub hash: String,
    pub delimiter: u8,
    pub quote: u8,
    pub encoding: Encoding,
    pub files: Vec<FileMapping>,
}

/// How one kind of file maps to a table.
#[derive(Debug, Clone)]
pub struct FileMapping {
    /// The glob as written, e.g. `labs_*.csv`.
    pub pattern: String,
    matcher: glob::Pattern,
    pub table: Table,
    /// Target column → how to fill it, in the table's column order.
    pub fields: Vec<(&'static str, FieldSpec)>,
    /// Observation only: a result column read as `value_num` when it is a
    /// number and as `value_text` otherwise.
    pub value: Option<FieldSpec>,
    /// Further codings of the row besides `code_system`/`code`.
    pub codings: Vec<CodingSpec>,
    /// Formats tried in order for date columns (`iso` or chrono strftime).
    pub date_formats: Vec<DateFormat>,
    /// Formats tried in order for timestamp columns.
    pub datetime_formats: Vec<DateFormat>,
    /// Postal codes are read as US ZIPs (`[csv] postal_codes = "us"`, the
    /// default), else kept as written (`"as_written"`).
    pub us_postal_codes: bool,
}

impl FileMapping {
    /// Whether this entry handles a file with this name.
    pub fn matches(&self, file_name: &str) -> bool {
        self.matcher.matches(file_name)
    }

    /// The file columns this entry reads (to check them against the header).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .map(|(_, f)| f)
            .chain(self.value.iter())
            .flat_map(|f| match &f.source {
                ValueSource::Column(c) | ValueSource::Extract { column: c, .. } => {
                    vec![c.as_str()]
                }
                ValueSource::Concat { columns, .. } => columns.iter().map(String::as_str).collect(),
                ValueSource::Constant(_) => Vec::new(),
            })
            .chain(self.codings.iter().map(|c| c.column.as_str()))
    }
}

/// Where a field's raw value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// A column of the file, by header name.
    Column(String),
    /// The same value on every row.
    Constant(String),
    /// The non-empty cells of several columns, trimmed and joined by
    /// `separator` (street number + street); empty when all are.
    Concat {
        columns: Vec<String>,
        separator: String,
    },
    /// Capture group `group` of `regex` in a column's cell (a part of a
    /// composite column such as `"12 Main St Boston MA 02110"`), trimmed;
    /// empty when the regex does not match.
    Extract {
        column: String,
        regex: String,
        group: usize,
    },
}

/// How one canonical column is filled.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    pub source: ValueSource,
    /// Date/time formats for this field, overriding the file's.
    pub formats: Option<Vec<DateFormat>>,
    /// Raw value → canonical value (matched after trimming).
    pub map: Option<BTreeMap<String, String>>,
    /// Used when the cell is empty, or (with `map`) holds an unlisted value.
    pub default: Option<String>,
    /// With `map`: values the map does not list pass through unchanged
    /// (instead of taking `default` or being rejected as `unmapped_value`).
    pub keep_unmapped: bool,
}

/// An extra coding read from a column, with a fixed system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodingSpec {
    pub system: String,
    pub column: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    #[serde(default)]
    csv: RawCsv,
    files: Spanned<Vec<RawFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCsv {
    #[serde(default = "comma")]
    delimiter: Spanned<String>,
    #[serde(default = "dquote")]
    quote: Spanned<String>,
    #[serde(default)]
    encoding: Encoding,
    #[serde(default)]
    date_format: Option<Formats>,
    #[serde(default)]
    datetime_format: Option<Formats>,
    #[serde(default)]
    postal_codes: PostalCodes,
}

/// How a provider writes postal codes (`[csv] postal_codes`).
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum PostalCodes {
    /// US ZIPs: `12345-6789` → `12345`, a 4-digit code padded with a 0.
    #[default]
    Us,
    /// Kept as written (trimmed, upper-cased).
    AsWritten,
}

impl Default for RawCsv {
    fn default() -> Self {
        RawCsv {
            delimiter: comma(),
            quote: dquote(),
            encoding: Encoding::Utf8,
            date_format: None,
            datetime_format: None,
            postal_codes: PostalCodes::Us,
        }
    }
}

fn comma() -> Spanned<String> {
    Spanned::new(0..0, ",".into())
}
fn dquote() -> Spanned<String> {
    Spanned::new(0..0, "\"".into())
}

/// One format or a list of formats tried in order.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Formats {
    One(String),
    Many(Vec<String>),
}

impl Formats {
    fn into_vec(self) -> Vec<String> {
        match self {
            Formats::One(s) => vec![s],
            Formats::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(rename = "match")]
    pattern: Spanned<String>,
    table: Spanned<String>,
    fields: BTreeMap<Spanned<String>, RawField>,
    #[serde(default)]
    codings: Vec<Spanned<CodingSpec>>,
    #[serde(default)]
    date_format: Option<Formats>,
    #[serde(default)]
    datetime_format: Option<Formats>,
}

/// A field written either as a column name or as a table.
struct RawField(DetailedField);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetailedField {
    column: Option<String>,
    value: Option<String>,
    concat: Option<Vec<String>>,
    separator: Option<String>,
    regex: Option<String>,
    group: Option<usize>,
    format: Option<Formats>,
    map: Option<BTreeMap<String, String>>,
    default: Option<String>,
    #[serde(default)]
    keep_unmapped: bool,
}

impl<'de> Deserialize<'de> for RawField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name or a table { column [regex, group] | value | concat [separator], format, map, default, keep_unmapped }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<RawField, E> {
                Ok(RawField(DetailedField {
                    column: Some(v.to_string()),
                    value: None,
                    concat: None,
                    separator: None,
                    regex: None,
                    group: None,
                    format: None,
                    map: None,
                    default: None,
                    keep_unmapped: false,
                }))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<RawField, A::Error> {
                DetailedField::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawField)
            }
        }
        d.deserialize_any(V)
    }
}

impl CsvMapping {
    /// Reads and checks a mapping file.
    pub fn load(path: &Path) -> Result<CsvMapping> {
        let (raw, text): (RawMapping, String) = load_toml(path)?;
        let err = |span: std::ops::Range<usize>, key: &str, message: String| {
            config_error(path, &text, Some(span), Some(key), message)
        };
        let single_byte = |s: &Spanned<String>, key: &str| -> Result<u8> {
            match s.get_ref().as_bytes() {
                [b'\n' | b'\r'] => Err(err(
                    s.span(),
                    key,
                    "cannot be a line break: records are lines".into(),
                )),
                [b] if b.is_ascii() => Ok(*b),
                _ => Err(err(
                    s.span(),
                    key,
                    "must be exactly one ASCII character".into(),
                )),
            }
        };
        let delimiter = single_byte(&raw.csv.delimiter, "delimiter")?;
        let quote = single_byte(&raw.csv.quote, "quote")?;
        if quote == delimiter {
            return Err(err(
                raw.csv.quote.span(),
                "quote",
                "cannot be the delimiter".into(),
            ));
        }
        let default_dates = raw
            .csv
            .date_format
            .map_or_else(|| vec!["iso".to_string()], Formats::into_vec);
        let default_times = raw
            .csv
            .datetime_format
            .map_or_else(|| vec!["iso".to_string()], Formats::into_vec);

        let files_span = raw.files.span();
        let raw_files = raw.files.into_inner();
        if raw_files.is_empty() {
            return Err(err(
                files_span,
                "files",
                "at least one [[files]] entry is required".into(),
            ));
        }
        let mut files = Vec::with_capacity(raw_files.len());
        for f in raw_files {
            let table = Table::from_name(f.table.get_ref()).ok_or_else(|| {
                err(
                    f.table.span(),
                    "table",
                    format!(
                        "unknown table '{}'; expected one of: {}",
                        f.table.get_ref(),
                        Table::ALL.map(Table::name).join(", ")
                    ),
                )
            })?;
            let matcher = glob::Pattern::new(f.pattern.get_ref())
                .map_err(|e| err(f.pattern.span(), "match", format!("bad glob: {e}")))?;
            let prepare = |formats: Vec<String>| -> Result<Vec<DateFormat>> {
                formats
                    .iter()
                    .map(|t| {
                        DateFormat::new(t).map_err(|m| err(f.pattern.span(), "date_format", m))
                    })
                    .collect()
            };
            let date_formats = prepare(
                f.date_format
                    .map_or_else(|| default_dates.clone(), Formats::into_vec),
            )?;
            let datetime_formats = prepare(
                f.datetime_format
                    .map_or_else(|| default_times.clone(), Formats::into_vec),
            )?;

            let mut fields: Vec<(&'static str, FieldSpec)> = Vec::new();
            let mut value = None;
            for (key, RawField(d)) in f.fields {
                let name = key.get_ref().as_str();
                let bad = |m: String| err(key.span(), name, m);
                let source = match (d.column, d.value, d.concat) {
                    (Some(column), None, None) => match d.regex {
                        Some(regex) => {
                            let compiled = regex::Regex::new(&regex).map_err(|e| {
                                bad(format!("'regex' is not a regular expression: {e}"))
                            })?;
                            let group = d.group.unwrap_or(1);
                            if group >= compiled.captures_len() {
                                return Err(bad(format!(
                                    "'group' {group}: the regex has {} capture group(s)",
                                    compiled.captures_len() - 1
                                )));
                            }
                            ValueSource::Extract {
                                column,
                                regex,
                                group,
                            }
                        }
                        None => ValueSource::Column(column),
                    },
                    (None, Some(v), None) => ValueSource::Constant(v),
                    (None, None, Some(columns)) if !columns.is_empty() => ValueSource::Concat {
                        columns,
                        separator: d.separator.clone().unwrap_or_else(|| " ".into()),
                    },
                    _ => {
                        return Err(bad(
                            "give exactly one of 'column', 'value' or 'concat' (a non-empty list)"
                                .into(),
                        ));
                    }
                };
                if d.group.is_some() && !matches!(source, ValueSource::Extract { .. }) {
                    return Err(bad("'group' goes with 'column' and 'regex'".into()));
                }
                if d.separator.is_some() && !matches!(source, ValueSource::Concat { .. }) {
                    return Err(bad("'separator' goes with 'concat'".into()));
                }
                let formats = match d.format {
                    Some(f) => Some(
                        f.into_vec()
                            .iter()
                            .map(|t| DateFormat::new(t).map_err(&bad))
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                };
                if d.keep_unmapped && (d.map.is_none() || d.default.is_some()) {
                    return Err(bad(
                        "'keep_unmapped' needs a 'map' and excludes 'default'".into()
                    ));
                }
                let spec = FieldSpec {
                    source,
                    formats,
                    map: d.map,
                    default: d.default,
                    keep_unmapped: d.keep_unmapped,
                };
                if name == "value" && table == Table::Observation {
                    value = Some(spec);
                    continue;
                }
                let column = table.column(name).filter(|c| c.mappable).ok_or_else(|| {
                    bad(format!(
                        "'{name}' is not a column of table '{}'; columns: {}",
                        table.name(),
                        mappable_names(table)
                    ))
                })?;
                if spec.formats.is_some() && !matches!(column.kind, Kind::Date | Kind::Timestamp) {
                    return Err(bad("'format' applies to date and time columns only".into()));
                }
                if column.kind == Kind::Codings {
                    return Err(bad("fill 'codings' with [[files.codings]] entries".into()));
                }
                fields.push((column.name, spec));
            }
            if value.is_some()
                && fields
                    .iter()
                    .any(|(n, _)| *n == "value_num" || *n == "value_text")
            {
                return Err(err(
                    f.pattern.span(),
                    "value",
                    "'value' fills value_num and value_text; do not map them as well".into(),
                ));
            }
            let mut codings = Vec::new();
            for c in f.codings {
                if normalize::code_system(&c.get_ref().system).is_none() {
                    return Err(err(
                        c.span(),
                        "codings.system",
                        format!("unknown code system '{}'", c.get_ref().system),
                    ));
                }
                codings.push(c.into_inner());
            }
            let order = |n: &str| table.columns().iter().position(|c| c.name == n);
            fields.sort_by_key(|(n, _)| order(n));
            for col in table.columns().iter().filter(|c| c.required && c.mappable) {
                let filled = fields.iter().any(|(n, _)| *n == col.name)
                    || (col.name == "code_system" && !codings.is_empty());
                if !filled {
                    return Err(err(
                        f.table.span(),
                        col.name,
                        format!(
                            "files matching '{}' map to '{}' but do not fill its required column '{}'",
                            f.pattern.get_ref(),
                            table.name(),
                            col.name
                        ),
                    ));
                }
            }
            files.push(FileMapping {
                pattern: f.pattern.into_inner(),
                matcher,
                table,
                fields,
                value,
                codings,
                date_formats,
                datetime_formats,
                us_postal_codes: raw.csv.postal_codes == PostalCodes::Us,
            });
        }

        Ok(CsvMapping {
            path: path.to_path_buf(),
            hash: hex::encode(Sha256::digest(text.as_bytes())),
            delimiter,
            quote,
            encoding: raw.csv.encoding,
            files,
        })
    }

    /// The first file entry whose `match` glob accepts this file name.
    pub fn entry_for(&self, file_name: &str) -> Option<&FileMapping> {
        self.files.iter().find(|f| f.matches(file_name))
    }
}

fn mappable_names(table: Table) -> String {
    let mut names: Vec<&str> = table
        .columns()
        .iter()
        .filter(|c| c.mappable && c.kind != Kind::Codings)
        .map(|c| c.name)
        .collect();
    if table == Table::Observation {
        names.push("value");
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[csv]
delimiter = "|"
date_format = ["%m/%d/%Y", "iso"]

[[files]]
match = "pat*.csv"
table = "patient"
[files.fields]
source_patient_id = "ID"
birth_date = { column = "DOB", format = "%Y%m%d" }
sex = { column = "Sex", map = { "1" = "male", "2" = "female" }, default = "unknown" }

[[files]]
match = "labs*.csv"
table = "observation"
codings = [{ system = "snomed", column = "SCT" }]
[files.fields]
source_patient_id = "ID"
code = "LOINC"
code_system = { value = "loinc" }
value = "Result"
effective_time = "When"
"#;

    fn load(text: &str) -> Result<CsvMapping> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, text).unwrap();
        CsvMapping::load(&p)
    }

    #[test]
    fn loads_a_mapping() {
        let m = load(GOOD).unwrap();
        assert_eq!(m.delimiter, b'|');
        let pat = m.entry_for("patients_2025.csv").unwrap();
        assert_eq!(pat.table, Table::Patient);
        let texts = |f: &[DateFormat]| {
            f.iter()
                .map(DateFormat::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(texts(&pat.date_formats), "%m/%d/%Y iso");
        let (name, dob) = &pat.fields[1];
        assert_eq!(*name, "birth_date");
        assert_eq!(texts(dob.formats.as_deref().unwrap()), "%Y%m%d");
        let labs = m.entry_for("labs.csv").unwrap();
        assert!(labs.value.is_some());
        assert_eq!(
            labs.columns().collect::<Vec<_>>(),
            ["ID", "LOINC", "When", "Result", "SCT"]
        );
        assert!(m.entry_for("claims.csv").is_none());
        assert_eq!(m.hash.len(), 64);
        assert!(
            pat.us_postal_codes,
            "US ZIPs unless the mapping says otherwise"
        );
        let m = load(&GOOD.replace("[csv]", "[csv]\npostal_codes = \"as_written\"")).unwrap();
        assert!(!m.entry_for("labs.csv").unwrap().us_postal_codes);
        let e = load(&GOOD.replace("[csv]", "[csv]\npostal_codes = \"uk\"")).unwrap_err();
        assert!(e.to_string().contains("as_written"), "{e}");
    }

    #[test]
    fn mistakes_are_located() {
        for (text, key, needle) in [
            (
                GOOD.replace("code = \"LOINC\"", "kode = \"LOINC\""),
                "kode",
                "not a column",
            ),
            (
                GOOD.replace("table = \"patient\"", "table = \"patients\""),
                "table",
                "unknown table",
            ),
            (
                GOOD.replace("delimiter = \"|\"", "delimiter = \"||\""),
                "delimiter",
                "one ASCII",
            ),
            (
                GOOD.replace("delimiter = \"|\"", "delimiter = \"\\n\""),
                "delimiter",
                "line break",
            ),
            (
                GOOD.replace("delimiter = \"|\"", "delimiter = \"\\\"\""),
                "quote",
                "cannot be the delimiter",
            ),
            (
                GOOD.replace("format = \"%Y%m%d\"", "format = \"%Q\""),
                "birth_date",
                "valid",
            ),
            (
                GOOD.replace("system = \"snomed\"", "system = \"snowmed\""),
                "codings.system",
                "unknown code system",
            ),
            (
                GOOD.replace("effective_time = \"When\"", ""),
                "effective_time",
                "required",
            ),
            (
                GOOD.replace(
                    "source_patient_id = \"ID\"\nbirth",
                    "source_patient_id = { column = \"ID\", value = \"x\" }\nbirth",
                ),
                "source_patient_id",
                "exactly one",
            ),
        ] {
            assert_config_error(&text, key, needle);
        }
    }

    /// Loading `text` fails on `key`, at a line, with a message holding `needle`.
    fn assert_config_error(text: &str, key: &str, needle: &str) {
        match load(text).unwrap_err() {
            WardError::Config {
                key: k,
                message,
                line,
                ..
            } => {
                assert_eq!(k.as_deref(), Some(key), "{message}");
                assert!(message.contains(needle), "{message}");
                assert!(line.is_some());
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn computed_fields_are_checked_when_loaded() {
        let with =
            |field: &str| GOOD.replace("sex = { column", &format!("{field}\nsex = {{ column"));
        let m = load(&with(
            r#"address_line = { concat = ["No", "Street"], separator = " " }
state = { column = "ADDRESS", regex = '\b([A-Z]{2}) \d{5}\b' }"#,
        ))
        .unwrap();
        let pat = m.entry_for("patients.csv").unwrap();
        assert_eq!(
            pat.columns().collect::<Vec<_>>(),
            ["ID", "DOB", "Sex", "No", "Street", "ADDRESS"]
        );
        for (field, key, needle) in [
            (
                r#"state = { column = "A", regex = "(" }"#,
                "state",
                "not a regular expression",
            ),
            (
                r#"state = { column = "A", regex = "([A-Z]{2})", group = 2 }"#,
                "state",
                "1 capture group",
            ),
            (r#"state = { concat = [] }"#, "state", "non-empty list"),
            (
                r#"state = { column = "A", separator = "-" }"#,
                "state",
                "'separator' goes with 'concat'",
            ),
            (
                r#"state = { concat = ["A"], group = 1 }"#,
                "state",
                "'group' goes with",
            ),
            (
                r#"state = { value = "MA", concat = ["A"] }"#,
                "state",
                "exactly one",
            ),
        ] {
            assert_config_error(&with(field), key, needle);
        }
    }

    #[test]
    fn unknown_field_option_is_rejected() {
        let e = load(&GOOD.replace("default = \"unknown\"", "defualt = \"unknown\"")).unwrap_err();
        assert!(e.to_string().contains("defualt"), "{e}");
    }
}
