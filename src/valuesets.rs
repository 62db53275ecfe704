//! Value sets as data: converts FHIR ValueSet resources (VSAC expansions, as
//! published with the eCQMs) into one CSV file per value set under
//! `queries/valuesets/`, so measures can match codes with SQL and the project
//! needs no terminology server.
//!
//! Each file is named `<OID>.csv` and holds
//! `valueset,name,version,code_system,code,display`; a directory of them is
//! one table, read with [`crate::schema::valueset_code_schema`]. Code systems get Ward's short names (see
//! [`crate::normalize::code_system`]); systems Ward does not know
//! keep their URI.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, WardError};
use crate::normalize;
use crate::schema::valueset_code_schema;

/// One value set, ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueSet {
    /// The OID, e.g. `2.16.840.1.113883.3.464.1003.103.12.1001`.
    pub oid: String,
    pub name: String,
    pub version: String,
    /// (code system, code, display), sorted and without duplicates.
    pub codes: Vec<(String, String, String)>,
    /// The file it was read from.
    pub from: PathBuf,
}

/// What a conversion did.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    pub written: Vec<ValueSet>,
    /// Value sets read more than once: (OID, version kept, version dropped).
    pub superseded: Vec<(String, String, String)>,
    /// Value sets with neither an expansion nor enumerated concepts.
    pub not_expanded: Vec<String>,
}

/// Reads ValueSet resources (files, or directories searched recursively for
/// `*.json`; Bundles are searched for ValueSet entries) and writes one CSV
/// per value set into `out`. When an OID is read twice, the later version
/// is kept.
pub fn convert(inputs: &[PathBuf], out: &Path) -> Result<ConvertReport> {
    let mut files = Vec::new();
    for input in inputs {
        collect_json(input, &mut files)?;
    }
    files.sort();
    let mut report = ConvertReport::default();
    let mut sets: BTreeMap<String, ValueSet> = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file).map_err(|e| WardError::io("cannot read", file, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| WardError::Extract {
            path: file.clone(),
            line: Some(e.line() as u64),
            message: format!("not JSON: {e}"),
        })?;
        let resources: Vec<&Value> = match json["resourceType"].as_str() {
            Some("ValueSet") => vec![&json],
            Some("Bundle") => json["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| &e["resource"])
                .filter(|r| r["resourceType"] == "ValueSet")
                .collect(),
            _ => continue,
        };
        for r in resources {
            let vs = match parse(r, file) {
                Some(vs) => vs,
                None => {
                    report
                        .not_expanded
                        .push(oid_of(r).unwrap_or_else(|| file.display().to_string()));
                    continue;
                }
            };
            match sets.get(&vs.oid) {
                Some(old) if old.version >= vs.version => {
                    if old.version != vs.version {
                        report.superseded.push((
                            vs.oid.clone(),
                            old.version.clone(),
                            vs.version.clone(),
                        ));
                    }
                }
                Some(old) => {
                    report.superseded.push((
                        vs.oid.clone(),
                        vs.version.clone(),
                        old.version.clone(),
                    ));
                    sets.insert(vs.oid.clone(), vs);
                }
                None => {
                    sets.insert(vs.oid.clone(), vs);
                }
            }
        }
    }
    fs::create_dir_all(out).map_err(|e| WardError::io("cannot create", out, e))?;
    let schema = valueset_code_schema();
    let header: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    for vs in sets.values() {
        let path = out.join(format!("{}.csv", vs.oid));
        let mut w = csv::Writer::from_path(&path).map_err(|e| csv_error(&path, e))?;
        w.write_record(&header).map_err(|e| csv_error(&path, e))?;
        for (system, code, display) in &vs.codes {
            w.write_record([&vs.oid, &vs.name, &vs.version, system, code, display])
                .map_err(|e| csv_error(&path, e))?;
        }
        w.flush()
            .map_err(|e| WardError::io("cannot write", &path, e))?;
    }
    report.written = sets.into_values().collect();
    Ok(report)
}

fn csv_error(path: &Path, e: csv::Error) -> WardError {
    WardError::data("writing value set", path, e)
}

fn collect_json(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        for entry in fs::read_dir(path).map_err(|e| WardError::io("cannot list", path, e))? {
            let entry = entry.map_err(|e| WardError::io("cannot list", path, e))?;
            collect_json(&entry.path(), out)?;
        }
    } else if path.extension().is_some_and(|x| x == "json") {
        out.push(path.to_path_buf());
    } else if !path.exists() {
        return Err(WardError::io(
            "cannot read",
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    Ok(())
}

/// The OID of a ValueSet: its `urn:oid:` identifier, else the last segment of its URL.
fn oid_of(r: &Value) -> Option<String> {
    let from_identifier = r["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|i| {
            i["value"]
                .as_str()
                .and_then(|v| v.strip_prefix("urn:oid:"))
                .map(str::to_string)
        });
    from_identifier.or_else(|| {
        r["url"]
            .as_str()
            .and_then(|u| u.rsplit('/').next())
            .map(str::to_string)
    })
}

/// Short system name, or the URI when Ward does not know the system.
fn system_name(uri: &str) -> String {
    normalize::code_system(uri).map_or_else(|| uri.to_string(), str::to_string)
}

fn parse(r: &Value, from: &Path) -> Option<ValueSet> {
    let oid = oid_of(r)?;
    let mut codes: Vec<(String, String, String)> = Vec::new();
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    match r["expansion"]["contains"].as_array() {
        Some(contains) => {
            for c in contains {
                codes.push((
                    system_name(c["system"].as_str()?),
                    text(&c["code"]),
                    text(&c["display"]),
                ));
            }
        }
        None => {
            // No expansion: an enumerated compose is still complete.
            let includes = r["compose"]["include"].as_array()?;
            for inc in includes {
                if inc.get("filter").is_some() || inc.get("valueSet").is_some() {
                    return None;
                }
                let system = system_name(inc["system"].as_str()?);
                for c in inc["concept"].as_array()? {
                    codes.push((system.clone(), text(&c["code"]), text(&c["display"])));
                }
            }
        }
    }
    codes.sort();
    codes.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    Some(ValueSet {
        oid,
        name: text(&r["name"]),
        version: text(&r["version"]),
        codes,
        from: from.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(oid: &str, version: &str, body: &str) -> String {
        format!(
            r#"{{"resourceType":"ValueSet","url":"http://cts.nlm.nih.gov/fhir/ValueSet/{oid}",
               "identifier":[{{"system":"urn:ietf:rfc:3986","value":"urn:oid:{oid}"}}],
               "name":"Diabetes","version":"{version}",{body}}}"#
        )
    }

    #[test]
    fn expansions_compose_bundles_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::create_dir_all(input.join("old")).unwrap();
        let expansion = r#""expansion":{"contains":[
            {"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"E11.9","display":"T2DM"},
            {"system":"http://snomed.info/sct","code":"44054006","display":"Diabetes type 2"},
            {"system":"http://snomed.info/sct","code":"44054006","display":"again"},
            {"system":"https://nahdo.org/sopt","code":"59","display":"Other"}]}"#;
        fs::write(input.join("a.json"), vs("1.2.3", "20250101", expansion)).unwrap();
        fs::write(
            input.join("old/a.json"),
            vs("1.2.3", "20240101", r#""expansion":{"contains":[]}"#),
        )
        .unwrap();
        let compose = r#""compose":{"include":[{"system":"http://loinc.org","concept":[{"code":"4548-4","display":"HbA1c"}]}]}"#;
        let bundle = format!(
            r#"{{"resourceType":"Bundle","entry":[{{"resource":{}}},{{"resource":{{"resourceType":"Library"}}}}]}}"#,
            vs("4.5.6", "1", compose)
        );
        fs::write(input.join("bundle.json"), bundle).unwrap();
        let filtered = r#""compose":{"include":[{"system":"http://snomed.info/sct","filter":[{"property":"concept","op":"is-a","value":"73211009"}]}]}"#;
        fs::write(input.join("intensional.json"), vs("7.8.9", "1", filtered)).unwrap();
        fs::write(input.join("notes.txt"), "ignored").unwrap();

        let out = dir.path().join("out");
        let report = convert(&[input], &out).unwrap();
        assert_eq!(report.written.len(), 2);
        assert_eq!(
            report.superseded,
            [(
                "1.2.3".to_string(),
                "20250101".to_string(),
                "20240101".to_string()
            )]
        );
        assert_eq!(report.not_expanded, ["7.8.9"]);
        let text = fs::read_to_string(out.join("1.2.3.csv")).unwrap();
        assert_eq!(
            text,
            "valueset,name,version,code_system,code,display\n\
             1.2.3,Diabetes,20250101,icd10cm,E11.9,T2DM\n\
             1.2.3,Diabetes,20250101,snomed,44054006,Diabetes type 2\n\
             1.2.3,Diabetes,20250101,sopt,59,Other\n"
        );
        assert!(
            fs::read_to_string(out.join("4.5.6.csv"))
                .unwrap()
                .contains("loinc,4548-4,HbA1c")
        );
    }

    #[test]
    fn missing_input_and_bad_json_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(convert(&[dir.path().join("nope")], dir.path()).is_err());
        fs::write(dir.path().join("bad.json"), "{\n  \"resourceType\": ").unwrap();
        let e = convert(&[dir.path().to_path_buf()], &dir.path().join("o")).unwrap_err();
        assert!(e.to_string().contains("bad.json:2"), "{e}");
    }
}
