//! FHIR R4 ingest: bulk-export NDJSON (one resource per line) and Bundles
//! (transaction, collection, searchset) into the canonical tables.
//!
//! Each resource is flattened into text values for its table's canonical
//! columns (every coding of every CodeableConcept kept), then mapped and
//! validated exactly like a CSV row (`rows::map_input`), so dates, codes,
//! units and plausibility follow the same rules. A resource is the unit of
//! acceptance: an Observation panel becomes one row per component plus the
//! panel row, and if any of them fails, the whole resource is rejected.
//! Resource types Ward does not load are counted as skipped.
//!
//! Resources are read as `serde_json_borrow` values, which borrow their
//! strings from the line instead of copying each into its own allocation;
//! in an object that repeats a property name (which FHIR JSON forbids),
//! the first is read.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::path::Path;

use datafusion::arrow::array::{BooleanArray, RecordBatch, UInt64Array};
use datafusion::arrow::compute::filter_record_batch;
use rayon::prelude::*;
use serde_json_borrow::Value;

use super::rows::{self, MappedFile, RejectRow, RowContext, RowInput};
use crate::error::{Result, WardError};
use crate::mapping::{FieldSpec, ValueSource};
use crate::normalize::DateFormat;
use crate::schema::Table;

/// NDJSON lines parsed per parallel chunk: memory follows the chunk, not the file.
const NDJSON_CHUNK: usize = 20_000;

/// What one FHIR file produced, besides the accepted rows handed to the
/// caller's sink as they are mapped.
#[derive(Default)]
pub struct FhirFile {
    /// Resources accepted (a resource may fill several rows).
    pub accepted: u64,
    /// One per rejected resource (or unreadable line).
    pub rejects: Vec<RejectRow>,
    /// Resources (NDJSON lines, Bundle entries) read.
    pub read: u64,
    /// Resources of types Ward does not load, per type.
    pub skipped: BTreeMap<String, u64>,
    /// Values kept as `unknown` or empty, per `element: rule` (see
    /// [`super::rows::MappedFile::flagged`]).
    pub flagged: BTreeMap<String, u64>,
}

/// Flattened rows of one table, before mapping.
#[derive(Default)]
struct TableRows {
    values: Vec<Vec<Option<String>>>,
    codings: Vec<Vec<(String, String)>>,
    lines: Vec<u64>,
    raw: Vec<usize>,
}

/// Everything read from a file before mapping.
#[derive(Default)]
struct Flat<'a> {
    tables: BTreeMap<Table, TableRows>,
    /// Raw resource JSON, indexed by `TableRows::raw` (an NDJSON line's is
    /// borrowed from the line).
    raw: Vec<Cow<'a, str>>,
    rejects: Vec<RejectRow>,
    skipped: BTreeMap<String, u64>,
    read: u64,
}

/// One resource flattened into rows of a table.
struct Row {
    table: Table,
    values: Vec<Option<String>>,
    codings: Vec<(String, String)>,
}

impl Row {
    fn new(table: Table) -> Row {
        Row {
            table,
            values: vec![None; table.columns().len()],
            codings: Vec::new(),
        }
    }
    fn set(&mut self, column: &str, value: Option<String>) {
        let i = self
            .table
            .columns()
            .iter()
            .position(|c| c.name == column)
            .unwrap_or_else(|| panic!("{} has no column {column}", self.table.name()));
        self.values[i] = value;
    }
    /// Sets `code_system`/`code` from the first coding of a known system
    /// (else the first coding) and keeps the others as further codings.
    fn set_code(&mut self, codings: Vec<(String, String)>) {
        let primary = codings
            .iter()
            .position(|(s, _)| crate::normalize::code_system(s).is_some())
            .or(if codings.is_empty() { None } else { Some(0) });
        if let Some(p) = primary {
            let mut codings = codings;
            let (s, c) = codings.remove(p);
            self.set("code_system", Some(s));
            self.set("code", Some(c));
            self.codings = codings;
        }
    }
}

/// Why a resource could not be flattened.
struct Refusal {
    path: &'static str,
    rule: &'static str,
    message: String,
}

fn refuse(path: &'static str, rule: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        path,
        rule,
        message: message.into(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) if !s.trim().is_empty() => Some(s.to_string()),
        // Formatted as serde_json formats it.
        Value::Number(n) => Some(serde_json::Number::from(*n).to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every (system, code) of a CodeableConcept, or of a list of them.
fn codings(v: &Value) -> Vec<(String, String)> {
    let one = |cc: &Value| -> Vec<(String, String)> {
        cc.get("coding")
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c.get("system").as_str()?.to_string(), text(c.get("code"))?)))
            .collect()
    };
    match v {
        Value::Array(list) => list.iter().flat_map(one).collect(),
        _ => one(v),
    }
}

fn first_code(v: &Value) -> Option<String> {
    codings(v).into_iter().next().map(|(_, c)| c)
}

/// Every code of `v` (a CodeableConcept or a list of them), space-separated.
fn all_codes(v: &Value) -> Option<String> {
    let codes: Vec<String> = codings(v)
        .into_iter()
        .map(|(_, c)| c.replace(' ', "_"))
        .collect();
    (!codes.is_empty()).then(|| codes.join(" "))
}

/// `<base>DateTime`, `<base>Period.start`, `<base>Instant` or `<base>Date`.
fn choice_time(r: &Value, base: &str) -> (Option<String>, Option<String>) {
    for suffix in ["DateTime", "Instant", "Date"] {
        if let Some(t) = text(r.get(format!("{base}{suffix}").as_str())) {
            return (Some(t), None);
        }
    }
    let period = format!("{base}Period");
    let p = r.get(period.as_str());
    (text(p.get("start")), text(p.get("end")))
}

/// The period a MedicationRequest covers, as the eCQM
/// CumulativeMedicationDuration library computes it: it starts at the dosage
/// bounds' start, else authoredOn, else the dispense validity start; it ends
/// after the days supplied (expected supply duration times one plus the
/// refills), else at the bounds' end, else it is unknown (`None`).
fn medication_request_period(r: &Value) -> (Option<String>, Option<String>) {
    let bounds = r
        .get("dosageInstruction")
        .get(0)
        .get("timing")
        .get("repeat")
        .get("boundsPeriod");
    let dispense = r.get("dispenseRequest");
    let start = text(bounds.get("start"))
        .or_else(|| text(r.get("authoredOn")))
        .or_else(|| text(dispense.get("validityPeriod").get("start")));
    let supply = dispense.get("expectedSupplyDuration");
    let days_per_unit = match supply.get("code").as_str().or(supply.get("unit").as_str()) {
        Some("d" | "day" | "days") => Some(1.0),
        Some("wk" | "week" | "weeks") => Some(7.0),
        Some("mo" | "month" | "months") => Some(30.0),
        Some("a" | "year" | "years") => Some(365.0),
        _ => None,
    };
    let refills = dispense
        .get("numberOfRepeatsAllowed")
        .as_f64()
        .unwrap_or(0.0);
    let days = supply
        .get("value")
        .as_f64()
        .zip(days_per_unit)
        .map(|(v, per)| v * per * (1.0 + refills));
    let first_day = start
        .as_deref()
        .and_then(|s| s.get(..10))
        .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
    // Checked: an absurd supply (1e18 days) is no date, never a panic.
    let supplied_end = match (first_day, days) {
        (Some(first), Some(days)) if days >= 1.0 => first
            .checked_add_days(chrono::Days::new(days as u64 - 1))
            .map(|d| d.to_string()),
        _ => None,
    };
    let end = supplied_end.or_else(|| text(bounds.get("end")));
    (start, end)
}

/// Resolves a Reference to the referenced resource's id: `urn:uuid:` via
/// the Bundle's fullUrls, `Type/id` (also inside an absolute URL) directly.
fn reference(
    v: &Value,
    urls: &HashMap<String, String>,
) -> std::result::Result<Option<String>, String> {
    let Some(r) = v.get("reference").as_str() else {
        return Ok(None);
    };
    if let Some(id) = urls.get(r) {
        return Ok(Some(id.clone()));
    }
    if r.starts_with("urn:") {
        return Err("the reference is not an entry of this Bundle".into());
    }
    let parts: Vec<&str> = r.split('/').collect();
    let id = match parts.iter().position(|p| *p == "_history") {
        Some(h) if h >= 1 => parts[h - 1],
        _ => parts.last().copied().unwrap_or(""),
    };
    Ok(Some(id.to_string()).filter(|s| !s.is_empty()))
}

fn subject(
    r: &Value,
    urls: &HashMap<String, String>,
    field: &'static str,
) -> std::result::Result<String, Refusal> {
    match reference(r.get(field), urls) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(refuse(
            field,
            "missing_subject",
            format!("{field}: no patient reference"),
        )),
        Err(m) => Err(refuse(
            field,
            "unresolved_reference",
            format!("{field}: {m}"),
        )),
    }
}

fn extension<'a>(r: &'a Value<'a>, url: &str) -> Option<&'a Value<'a>> {
    r.get("extension")
        .as_array()?
        .iter()
        .find(|e| e.get("url").as_str() == Some(url))
}

/// doNotPerform as an element (R4 requests) or as the R5 modifier extension.
fn do_not_perform(r: &Value) -> Option<String> {
    text(r.get("doNotPerform")).or_else(|| {
        r.get("modifierExtension")
            .as_array()?
            .iter()
            .find(|e| {
                e.get("url")
                    .as_str()
                    .is_some_and(|u| u.ends_with("doNotPerform"))
            })
            .and_then(|e| text(e.get("valueBoolean")))
    })
}

/// Why a fact was or was not done, as space-separated `system|code` (short
/// system names where Ward knows the system): `statusReason`, every
/// `reasonCode`, and the QI-Core `notDoneReason`, `doNotPerformReason` and
/// `reasonRefused` extensions.
fn reasons(r: &Value) -> Option<String> {
    let mut codes = codings(r.get("statusReason"));
    codes.extend(codings(r.get("reasonCode")));
    for e in r.get("extension").as_array().into_iter().flatten() {
        let url = e.get("url").as_str().unwrap_or_default();
        if ["notDoneReason", "doNotPerformReason", "reasonRefused"]
            .iter()
            .any(|n| url.ends_with(n))
        {
            codes.extend(codings(e.get("valueCodeableConcept")));
        }
    }
    coded_tokens(codes)
}

/// Codings as space-separated `system|code` (short system names where
/// Ward knows the system).
fn coded_tokens(codes: Vec<(String, String)>) -> Option<String> {
    let tokens: Vec<String> = codes
        .into_iter()
        .map(|(system, code)| {
            let system = crate::normalize::code_system(&system).map_or(system, str::to_string);
            format!("{system}|{code}").replace(' ', "_")
        })
        .collect();
    (!tokens.is_empty()).then(|| tokens.join(" "))
}

/// A resource's rows; `Ok(None)` for types Ward does not load.
type Flattened = std::result::Result<Option<Vec<Row>>, Refusal>;

fn resource_type<'a>(r: &'a Value<'a>) -> &'a str {
    r.get("resourceType").as_str().unwrap_or("?")
}

/// Flattens one resource; `Ok(None)` for types Ward does not load.
fn flatten(
    r: &Value,
    urls: &HashMap<String, String>,
    medications: &HashMap<String, Vec<(String, String)>>,
) -> Flattened {
    let Some(rtype) = r.get("resourceType").as_str() else {
        return Err(refuse(
            "resourceType",
            "missing_resource_type",
            "resourceType: missing",
        ));
    };
    let id = text(r.get("id"));
    let encounter = reference(r.get("encounter"), urls).ok().flatten();
    let row = match rtype {
        "Patient" => patient_row(r, id),
        "Encounter" => encounter_row(r, id, urls)?,
        "Condition" => condition_row(r, id, encounter, urls)?,
        "Observation" => return observation_rows(r, id, encounter, urls).map(Some),
        "MedicationRequest" | "MedicationStatement" | "MedicationAdministration" => {
            medication_row(r, rtype, id, encounter, urls, medications)?
        }
        "Procedure" => procedure_row(r, id, encounter, urls)?,
        "ServiceRequest" => service_request_row(r, id, encounter, urls)?,
        "DeviceRequest" | "DeviceUseStatement" => device_row(r, rtype, id, urls)?,
        "Communication" => communication_row(r, id, encounter, urls)?,
        "Coverage" => coverage_row(r, id, urls)?,
        _ => return Ok(None),
    };
    Ok(Some(vec![row]))
}

/// The canonical table a resource type is loaded into (`None`: not loaded).
fn resource_table(rtype: &str) -> Option<Table> {
    Some(match rtype {
        "Patient" => Table::Patient,
        "Encounter" => Table::Encounter,
        "Condition" => Table::Condition,
        "Observation" => Table::Observation,
        "MedicationRequest" | "MedicationStatement" | "MedicationAdministration" => {
            Table::Medication
        }
        "Procedure" => Table::Procedure,
        "ServiceRequest" => Table::ServiceRequest,
        "DeviceRequest" | "DeviceUseStatement" => Table::Device,
        "Communication" => Table::Communication,
        "Coverage" => Table::Coverage,
        _ => return None,
    })
}

/// A Patient: identifiers, official name, birth date, sex, race and
/// ethnicity (US Core), first address, phone and email.
fn patient_row(r: &Value, id: Option<String>) -> Row {
    let mut p = Row::new(Table::Patient);
    p.set("source_patient_id", id);
    let ids = r.get("identifier").as_array().unwrap_or_default();
    let ident = |pred: &dyn Fn(&Value) -> bool| {
        ids.iter()
            .find(|i| pred(i))
            .and_then(|i| text(i.get("value")))
    };
    p.set(
        "mrn",
        ident(&|i| first_code(i.get("type")).as_deref() == Some("MR")),
    );
    p.set(
        "ssn",
        ident(&|i| {
            i.get("system").as_str() == Some("http://hl7.org/fhir/sid/us-ssn")
                || first_code(i.get("type")).as_deref() == Some("SS")
        }),
    );
    let names = r.get("name").as_array().unwrap_or_default();
    let name = names
        .iter()
        .find(|n| n.get("use").as_str() == Some("official"))
        .or(names.first());
    if let Some(n) = name {
        p.set("given_name", text(n.get("given").get(0)));
        p.set("family_name", text(n.get("family")));
    }
    p.set("birth_date", text(r.get("birthDate")));
    p.set("sex", patient_sex(r));
    let omb = |url: &str| {
        extension(r, url)?
            .get("extension")
            .as_array()?
            .iter()
            .find(|e| e.get("url").as_str() == Some("ombCategory"))
            .and_then(|e| text(e.get("valueCoding").get("code")))
    };
    p.set(
        "race",
        omb("http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"),
    );
    p.set(
        "ethnicity",
        omb("http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"),
    );
    let address = r.get("address").get(0);
    p.set("address_line", text(address.get("line").get(0)));
    p.set("city", text(address.get("city")));
    p.set("state", text(address.get("state")));
    p.set("postal_code", text(address.get("postalCode")));
    let telecom = |system: &str| {
        r.get("telecom")
            .as_array()?
            .iter()
            .find(|t| t.get("system").as_str() == Some(system))
            .and_then(|t| text(t.get("value")))
    };
    p.set("phone", telecom("phone"));
    p.set("email", telecom("email"));
    p.set("deceased_date", text(r.get("deceasedDateTime")));
    p
}

/// The US Core sex extension (QI-Core `Patient.sex`, what eCQMs test) when
/// present, else the administrative gender.
fn patient_sex(r: &Value) -> Option<String> {
    let sex = extension(
        r,
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex",
    )
    .and_then(|e| text(e.get("valueCode")).or_else(|| text(e.get("valueCoding").get("code"))))
    .and_then(|code| match code.as_str() {
        "248152002" | "F" => Some("female".to_string()),
        "248153007" | "M" => Some("male".to_string()),
        _ => None,
    });
    sex.or_else(|| text(r.get("gender")))
}

/// An Encounter: class, type, period, discharge disposition, facility.
fn encounter_row(
    r: &Value,
    id: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut e = Row::new(Table::Encounter);
    e.set("source_encounter_id", id);
    e.set("source_patient_id", Some(subject(r, urls, "subject")?));
    e.set("encounter_class", text(r.get("class").get("code")));
    e.set("status", text(r.get("status")));
    e.set_code(codings(r.get("type")));
    e.set("start_time", text(r.get("period").get("start")));
    e.set("end_time", text(r.get("period").get("end")));
    e.set(
        "discharge_disposition",
        first_code(r.get("hospitalization").get("dischargeDisposition")),
    );
    e.set(
        "facility",
        text(r.get("serviceProvider").get("display"))
            .or_else(|| text(r.get("serviceProvider").get("reference"))),
    );
    Ok(e)
}

/// A Condition: its statuses, onset (else when recorded) and abatement.
fn condition_row(
    r: &Value,
    id: Option<String>,
    encounter: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut c = Row::new(Table::Condition);
    c.set("source_condition_id", id);
    c.set("source_patient_id", Some(subject(r, urls, "subject")?));
    c.set("source_encounter_id", encounter);
    c.set("category", first_code(r.get("category")));
    c.set("categories", all_codes(r.get("category")));
    c.set("clinical_status", first_code(r.get("clinicalStatus")));
    c.set(
        "verification_status",
        first_code(r.get("verificationStatus")),
    );
    c.set_code(codings(r.get("code")));
    let (onset, _) = choice_time(r, "onset");
    let recorded = text(r.get("recordedDate"));
    c.set("onset_date", onset.or_else(|| recorded.clone()));
    let (abatement, abatement_end) = choice_time(r, "abatement");
    c.set("abatement_date", abatement_end.or(abatement));
    c.set("recorded_date", recorded);
    c.set("description", text(r.get("code").get("text")));
    c.set("body_sites", coded_tokens(codings(r.get("bodySite"))));
    Ok(c)
}

/// An Observation: one row, plus one per component (a panel), each with
/// its own code and value.
fn observation_rows(
    r: &Value,
    id: Option<String>,
    encounter: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Vec<Row>, Refusal> {
    let patient = subject(r, urls, "subject")?;
    let (effective, effective_end) = choice_time(r, "effective");
    let effective = effective.or_else(|| text(r.get("issued")));
    let base = |codes: Vec<(String, String)>, value_of: &Value| {
        let mut o = Row::new(Table::Observation);
        o.set("source_observation_id", id.clone());
        o.set("source_patient_id", Some(patient.clone()));
        o.set("source_encounter_id", encounter.clone());
        o.set("status", text(r.get("status")));
        o.set("category", first_code(r.get("category")));
        o.set("categories", all_codes(r.get("category")));
        o.set_code(codes);
        o.set("effective_time", effective.clone());
        o.set("effective_end", effective_end.clone());
        o.set("description", text(r.get("code").get("text")));
        o.set("reasons", reasons(r));
        set_observation_value(&mut o, value_of);
        o
    };
    let mut rows = vec![base(codings(r.get("code")), r)];
    for component in r.get("component").as_array().into_iter().flatten() {
        let mut o = base(codings(component.get("code")), component);
        o.set("panel_id", id.clone());
        o.set("description", text(component.get("code").get("text")));
        rows.push(o);
    }
    Ok(rows)
}

/// The `value[x]` of an Observation or of one of its components.
fn set_observation_value(o: &mut Row, value_of: &Value) {
    let q = value_of.get("valueQuantity");
    o.set(
        "value_num",
        text(q.get("value")).or_else(|| text(value_of.get("valueInteger"))),
    );
    o.set("unit", text(q.get("unit")).or_else(|| text(q.get("code"))));
    o.set(
        "value_text",
        text(value_of.get("valueString")).or_else(|| text(value_of.get("valueBoolean"))),
    );
    if let Some((s, c)) = codings(value_of.get("valueCodeableConcept"))
        .into_iter()
        .next()
    {
        o.set("value_code_system", Some(s));
        o.set("value_code", Some(c));
    }
}

/// A MedicationRequest, -Statement or -Administration; a referenced
/// Medication's codes come from `medications`.
fn medication_row(
    r: &Value,
    rtype: &str,
    id: Option<String>,
    encounter: Option<String>,
    urls: &HashMap<String, String>,
    medications: &HashMap<String, Vec<(String, String)>>,
) -> std::result::Result<Row, Refusal> {
    let mut m = Row::new(Table::Medication);
    m.set("source_medication_id", id);
    m.set("source_patient_id", Some(subject(r, urls, "subject")?));
    m.set(
        "source_encounter_id",
        encounter.or_else(|| reference(r.get("context"), urls).ok().flatten()),
    );
    m.set("status", text(r.get("status")));
    m.set("intent", text(r.get("intent")));
    m.set("do_not_perform", do_not_perform(r));
    m.set("reasons", reasons(r));
    let med_ref = r.get("medicationReference");
    let codes = match reference(med_ref, urls) {
        Ok(Some(med)) => medications
            .get(&med)
            .or_else(|| {
                med_ref
                    .get("reference")
                    .as_str()
                    .and_then(|u| medications.get(u))
            })
            .cloned()
            .unwrap_or_default(),
        _ => codings(r.get("medicationCodeableConcept")),
    };
    m.set_code(codes);
    m.set(
        "description",
        text(r.get("medicationCodeableConcept").get("text")),
    );
    let (start, end) = if rtype == "MedicationRequest" {
        medication_request_period(r)
    } else {
        choice_time(r, "effective")
    };
    m.set(
        "start_time",
        start.as_ref().filter(|s| s.contains('T')).cloned(),
    );
    m.set("start_date", start);
    m.set("end_date", end);
    m.set("resource_type", Some(rtype.to_ascii_lowercase()));
    Ok(m)
}

/// A Procedure: when performed, and why (not).
fn procedure_row(
    r: &Value,
    id: Option<String>,
    encounter: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut p = Row::new(Table::Procedure);
    p.set("source_procedure_id", id);
    p.set("source_patient_id", Some(subject(r, urls, "subject")?));
    p.set("source_encounter_id", encounter);
    p.set("status", text(r.get("status")));
    p.set_code(codings(r.get("code")));
    let (start, end) = choice_time(r, "performed");
    p.set("performed_time", start);
    p.set("performed_end_time", end);
    p.set("description", text(r.get("code").get("text")));
    p.set("reasons", reasons(r));
    Ok(p)
}

/// A ServiceRequest (an order or referral): when authored, when it is for.
fn service_request_row(
    r: &Value,
    id: Option<String>,
    encounter: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut s = Row::new(Table::ServiceRequest);
    s.set("source_service_request_id", id);
    s.set("source_patient_id", Some(subject(r, urls, "subject")?));
    s.set("source_encounter_id", encounter);
    s.set("status", text(r.get("status")));
    s.set("intent", text(r.get("intent")));
    s.set("do_not_perform", do_not_perform(r));
    s.set("category", first_code(r.get("category")));
    s.set("categories", all_codes(r.get("category")));
    s.set_code(codings(r.get("code")));
    s.set("reasons", reasons(r));
    s.set("authored_time", text(r.get("authoredOn")));
    let (start, end) = choice_time(r, "occurrence");
    s.set("occurrence_start", start);
    s.set("occurrence_end", end);
    Ok(s)
}

/// A DeviceRequest or DeviceUseStatement, dated by when it was authored
/// (else its timing, else when recorded).
fn device_row(
    r: &Value,
    rtype: &str,
    id: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut d = Row::new(Table::Device);
    d.set("source_device_id", id);
    d.set("source_patient_id", Some(subject(r, urls, "subject")?));
    d.set("resource_type", Some(rtype.to_ascii_lowercase()));
    d.set("status", text(r.get("status")));
    d.set("intent", text(r.get("intent")));
    d.set("do_not_perform", do_not_perform(r));
    d.set_code(
        codings(r.get("codeCodeableConcept"))
            .into_iter()
            .chain(codings(r.get("code")))
            .collect(),
    );
    let (timing, _) = choice_time(r, "timing");
    d.set(
        "event_time",
        text(r.get("authoredOn"))
            .or(timing)
            .or_else(|| text(r.get("recordedOn"))),
    );
    Ok(d)
}

/// A Communication: what was communicated, and when sent (or recorded as
/// not sent).
fn communication_row(
    r: &Value,
    id: Option<String>,
    encounter: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut c = Row::new(Table::Communication);
    c.set("source_communication_id", id);
    c.set("source_patient_id", Some(subject(r, urls, "subject")?));
    c.set("source_encounter_id", encounter);
    c.set("status", text(r.get("status")));
    // What was communicated: the category (QI-Core), else the topic.
    let mut codes = codings(r.get("category"));
    codes.extend(codings(r.get("topic")));
    c.set_code(codes);
    c.set("reasons", reasons(r));
    // A communication not done has no `sent`: it is dated by when
    // that was recorded.
    let recorded = extension(
        r,
        "http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-recorded",
    )
    .and_then(|e| text(e.get("valueDateTime")));
    c.set(
        "sent_time",
        text(r.get("sent"))
            .or(recorded)
            .or_else(|| text(r.get("received"))),
    );
    c.set("received_time", text(r.get("received")));
    Ok(c)
}

/// A Coverage of its beneficiary: payer type, period, payor.
fn coverage_row(
    r: &Value,
    id: Option<String>,
    urls: &HashMap<String, String>,
) -> std::result::Result<Row, Refusal> {
    let mut c = Row::new(Table::Coverage);
    c.set("source_coverage_id", id);
    c.set("source_patient_id", Some(subject(r, urls, "beneficiary")?));
    c.set("status", text(r.get("status")));
    if let Some((s, code)) = codings(r.get("type")).into_iter().next() {
        c.set("payer_type_system", Some(s));
        c.set("payer_type_code", Some(code));
    }
    c.set("start_date", text(r.get("period").get("start")));
    c.set("end_date", text(r.get("period").get("end")));
    c.set(
        "payor",
        text(r.get("payor").get(0).get("display"))
            .or_else(|| text(r.get("payor").get(0).get("reference"))),
    );
    Ok(c)
}

impl<'a> Flat<'a> {
    /// Adds one resource; `raw` is its text, kept for a reject.
    fn add(
        &mut self,
        line: u64,
        r: &Value,
        raw: impl FnOnce() -> Cow<'a, str>,
        urls: &HashMap<String, String>,
        meds: &HashMap<String, Vec<(String, String)>>,
    ) {
        self.push(line, resource_type(r), flatten(r, urls, meds), raw);
    }

    /// Adds one flattened resource.
    fn push(
        &mut self,
        line: u64,
        resource_type: &str,
        flattened: Flattened,
        raw: impl FnOnce() -> Cow<'a, str>,
    ) {
        self.read += 1;
        match flattened {
            Ok(None) => {
                *self.skipped.entry(resource_type.to_string()).or_default() += 1;
            }
            Ok(Some(rows)) => {
                self.raw.push(raw());
                let raw = self.raw.len() - 1;
                for row in rows {
                    let t = self.tables.entry(row.table).or_default();
                    t.values.push(row.values);
                    t.codings.push(row.codings);
                    t.lines.push(line);
                    t.raw.push(raw);
                }
            }
            Err(refusal) => self.reject(
                line,
                resource_table(resource_type),
                Some(refusal.path),
                refusal.rule,
                refusal.message,
                raw().into_owned(),
            ),
        }
    }

    fn reject(
        &mut self,
        line: u64,
        table: Option<Table>,
        column: Option<&str>,
        rule: &'static str,
        message: String,
        raw: String,
    ) {
        self.rejects.push(RejectRow {
            line,
            table,
            column: column.map(str::to_string),
            rule,
            errors: format!("{}: {rule}", column.unwrap_or("*")),
            message,
            raw,
        });
    }
}

/// Medication resources of a file, by id, for medicationReference.
fn medications<'a>(
    resources: impl Iterator<Item = (&'a Value<'a>, Option<&'a str>)>,
) -> HashMap<String, Vec<(String, String)>> {
    let mut out = HashMap::new();
    for (r, full_url) in resources {
        if r.get("resourceType").as_str() == Some("Medication") {
            let codes = codings(r.get("code"));
            if let Some(id) = text(r.get("id")) {
                out.insert(id, codes.clone());
            }
            if let Some(u) = full_url {
                out.insert(u.to_string(), codes);
            }
        }
    }
    out
}

/// Reads a Bundle file. Entries are numbered from 1 in place of lines.
fn read_bundle(path: &Path, bytes: &[u8]) -> Result<Flat<'static>> {
    // The Bundle is read as serde_json's (owned) value, as its resources may
    // be completed (an id, a subject) before they are flattened.
    let mut bundle: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| WardError::Extract {
            path: path.to_path_buf(),
            line: Some(e.line() as u64),
            message: format!("not JSON: {e}"),
        })?;
    if bundle["resourceType"] != "Bundle" {
        return Err(WardError::Extract {
            path: path.to_path_buf(),
            line: None,
            message: "not a FHIR Bundle (resourceType is not \"Bundle\")".into(),
        });
    }
    // Taken out of the Bundle, not copied: the entries are all of it.
    let entries = match bundle.get_mut("entry").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let resources: Vec<Value> = entries
        .iter()
        .map(|e| Value::from(&e["resource"]))
        .collect();
    let mut urls = HashMap::new();
    for (e, r) in entries.iter().zip(&resources) {
        if let (Some(full), Some(t)) = (e["fullUrl"].as_str(), r.get("resourceType").as_str()) {
            let id = text(r.get("id"))
                .unwrap_or_else(|| full.rsplit(':').next().unwrap_or(full).to_string());
            urls.insert(full.to_string(), id.clone());
            urls.insert(format!("{t}/{id}"), id);
        }
    }
    let meds = medications(
        resources
            .iter()
            .zip(&entries)
            .map(|(r, e)| (r, e["fullUrl"].as_str())),
    );
    // A bundle of one patient's record (a test case, `Patient/$everything`)
    // may leave `subject` out of its resources: they are that patient's.
    let patients: Vec<&Value> = resources
        .iter()
        .filter(|r| r.get("resourceType").as_str() == Some("Patient"))
        .collect();
    let sole_patient = match patients.as_slice() {
        [p] => text(p.get("id")),
        _ => None,
    };
    let mut assigned = 0;
    let mut flat = Flat::default();
    for (i, e) in entries.iter().enumerate() {
        let r = &e["resource"];
        let mut r = r.clone();
        if r["id"].is_null()
            && let Some(id) = e["fullUrl"].as_str().and_then(|u| urls.get(u))
        {
            r["id"] = serde_json::Value::String(id.clone());
        }
        if let Some(patient) = &sole_patient
            && r["subject"].is_null()
            && r["resourceType"] != "Patient"
            && r["resourceType"] != "Coverage"
        {
            r["subject"] = serde_json::json!({ "reference": format!("Patient/{patient}") });
            assigned += 1;
        }
        flat.add(
            i as u64 + 1,
            &Value::from(&r),
            || r.to_string().into(),
            &urls,
            &meds,
        );
    }
    if assigned > 0 {
        tracing::info!(
            file = %path.display(),
            resources = assigned,
            "resources without a subject assigned to the bundle's only Patient"
        );
    }
    Ok(flat)
}

/// Parses and flattens one chunk of NDJSON lines (line number, bytes) in parallel.
fn flatten_ndjson(chunk: &[(u64, Vec<u8>)]) -> Flat<'_> {
    let parsed: Vec<std::result::Result<Value, String>> = chunk
        .par_iter()
        .map(|(_, l)| serde_json::from_slice::<Value>(l).map_err(|e| e.to_string()))
        .collect();
    let meds = medications(
        parsed
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| (r, None))),
    );
    let no_urls = HashMap::new();
    let flattened: Vec<Option<Flattened>> = parsed
        .par_iter()
        .map(|r| r.as_ref().ok().map(|r| flatten(r, &no_urls, &meds)))
        .collect();
    let mut flat = Flat::default();
    for (((line, bytes), r), f) in chunk.iter().zip(&parsed).zip(flattened) {
        let raw = || String::from_utf8_lossy(bytes);
        match (r, f) {
            (Ok(r), Some(f)) => flat.push(*line, resource_type(r), f, raw),
            (Err(e), _) => {
                flat.read += 1;
                let raw: String = raw().chars().take(2000).collect();
                flat.reject(
                    *line,
                    None,
                    None,
                    "not_json",
                    format!("not a JSON resource: {e}"),
                    raw,
                );
            }
            (Ok(_), None) => unreachable!("every parsed resource is flattened"),
        }
    }
    flat
}

/// FHIR paths shown as the "column" of rejects, per canonical column.
fn fhir_label(column: &'static str) -> &'static str {
    match column {
        "source_patient_id" => "subject",
        "birth_date" => "birthDate",
        "sex" => "gender",
        "encounter_class" => "class",
        "start_time" | "end_time" => "period",
        "code" | "code_system" => "code",
        "onset_date" => "onset[x]",
        "abatement_date" => "abatement[x]",
        "effective_time" | "effective_end" => "effective[x]",
        "value_num" | "unit" => "valueQuantity",
        "start_date" | "end_date" => {
            "authoredOn|dosageInstruction|dispenseRequest|effective[x]|period"
        }
        "performed_time" | "performed_end_time" => "performed[x]",
        "authored_time" => "authoredOn",
        "event_time" => "authoredOn|timing[x]",
        other => other,
    }
}

/// Which patients a file's facts must belong to (`unknown_patient`).
#[derive(Clone, Copy)]
pub enum PatientCheck<'a> {
    /// The source's accepted patients (NDJSON facts).
    Against(&'a super::PatientLookup),
    /// The file's own accepted patients (a Bundle is self-contained).
    Own,
    /// No check (patient files, or a source without patients).
    Off,
}

/// Where accepted rows go as they are mapped: (table, batch), in file order.
pub type Sink<'s> = dyn FnMut(Table, RecordBatch) -> Result<()> + 's;

/// Maps one Bundle file; its facts are checked against its own patients.
pub fn load_bundle(
    path: &Path,
    bytes: &[u8],
    ctx: &RowContext,
    sink: &mut Sink,
) -> Result<FhirFile> {
    let flat = read_bundle(path, bytes)?;
    let mut out = FhirFile::default();
    let mut ids = rows::PatientIds::default();
    map_flat(path, flat, ctx, PatientCheck::Own, &mut out, sink, &mut ids)?;
    out.rejects.sort_by_key(|r| r.line);
    Ok(out)
}

/// Maps one NDJSON export file, reading, parsing and mapping it in chunks of
/// lines, so memory follows the chunk, not the file.
pub fn load_ndjson(
    path: &Path,
    reader: impl BufRead,
    ctx: &RowContext,
    check: PatientCheck,
    sink: &mut Sink,
) -> Result<FhirFile> {
    load_ndjson_in_chunks(path, reader, ctx, check, sink, NDJSON_CHUNK, MAX_LINE)
}

/// The longest NDJSON line read: a longer one (a file that is not NDJSON,
/// a whole JSON document on one line) is refused once this much of it is
/// read, only its start kept, and reading resumes on the next line. A
/// chunk of lines also ends once it holds this many bytes.
const MAX_LINE: usize = 64 << 20;

fn load_ndjson_in_chunks(
    path: &Path,
    mut reader: impl BufRead,
    ctx: &RowContext,
    check: PatientCheck,
    sink: &mut Sink,
    chunk_lines: usize,
    max_line: usize,
) -> Result<FhirFile> {
    let mut out = FhirFile::default();
    let mut line = 0u64;
    let mut patient_ids = rows::PatientIds::default();
    loop {
        let mut chunk = Vec::with_capacity(chunk_lines.min(NDJSON_CHUNK));
        let mut held = 0;
        while chunk.len() < chunk_lines && held < max_line {
            let next = next_line(&mut reader, max_line)
                .map_err(|e| WardError::io("cannot read", path, e))?;
            let mut bytes = match next {
                NdjsonLine::End => break,
                NdjsonLine::Line(bytes) => bytes,
                NdjsonLine::TooLong(start) => {
                    line += 1;
                    out.read += 1;
                    out.rejects.push(rows::RejectRow {
                        line,
                        table: None,
                        column: None,
                        rule: "malformed_record",
                        message: format!(
                            "the line runs past {max_line} bytes: not read as a resource; \
                             reading resumed on the next line"
                        ),
                        errors: "*: malformed_record".into(),
                        raw: String::from_utf8_lossy(&start).into_owned(),
                    });
                    continue;
                }
            };
            line += 1;
            if line == 1 && bytes.starts_with(b"\xEF\xBB\xBF") {
                bytes.drain(..3); // a byte-order mark, as CSV files may carry
            }
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                held += bytes.len();
                chunk.push((line, bytes));
            }
        }
        if chunk.is_empty() {
            break;
        }
        map_flat(
            path,
            flatten_ndjson(&chunk),
            ctx,
            check,
            &mut out,
            sink,
            &mut patient_ids,
        )?;
    }
    out.rejects.sort_by_key(|r| r.line);
    Ok(out)
}

/// One line of an NDJSON file, read by [`next_line`].
enum NdjsonLine {
    End,
    /// Its bytes, without the line feed.
    Line(Vec<u8>),
    /// A line past the longest read: its first 2,000 bytes.
    TooLong(Vec<u8>),
}

/// Reads the next line of at most `max` bytes; a longer one is passed over
/// to its end, only its start kept.
fn next_line(reader: &mut impl BufRead, max: usize) -> std::io::Result<NdjsonLine> {
    let mut bytes = Vec::new();
    let n = std::io::Read::take(&mut *reader, max as u64 + 1).read_until(b'\n', &mut bytes)?;
    if n == 0 {
        return Ok(NdjsonLine::End);
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        return Ok(NdjsonLine::Line(bytes));
    }
    if bytes.len() <= max {
        return Ok(NdjsonLine::Line(bytes)); // the last line, with no line feed
    }
    loop {
        let available = reader.fill_buf()?;
        let Some(end) = available.iter().position(|b| *b == b'\n') else {
            let n = available.len();
            reader.consume(n);
            if n == 0 {
                break;
            }
            continue;
        };
        reader.consume(end + 1);
        break;
    }
    bytes.truncate(2000);
    bytes.shrink_to_fit();
    Ok(NdjsonLine::TooLong(bytes))
}

/// Maps flattened resources (whole resources: none continues in a later
/// call) into `out`; accepted rows go to `sink`.
fn map_flat(
    path: &Path,
    mut flat: Flat,
    ctx: &RowContext,
    check: PatientCheck,
    out: &mut FhirFile,
    sink: &mut Sink,
    patient_ids: &mut rows::PatientIds,
) -> Result<()> {
    let formats = [DateFormat::new("iso").expect("iso")];
    out.rejects.append(&mut flat.rejects);
    out.read += flat.read;
    for (t, n) in std::mem::take(&mut flat.skipped) {
        *out.skipped.entry(t).or_default() += n;
    }
    let mut own_patients = super::PatientLookup::default();
    let mut accepted_lines = BTreeSet::new();
    let raw = &flat.raw;
    for (table, rows) in std::mem::take(&mut flat.tables) {
        let columns = table.columns();
        let specs: Vec<FieldSpec> = columns
            .iter()
            .map(|c| FieldSpec {
                source: ValueSource::Column(c.name.to_string()),
                formats: None,
                map: None,
                default: None,
                keep_unmapped: false,
            })
            .collect();
        let labels: Vec<&str> = columns.iter().map(|c| fhir_label(c.name)).collect();
        let plan = rows::canonical_plan(table, &specs, &labels, &formats);
        let cols: Vec<Vec<Option<&str>>> = (0..columns.len())
            .map(|i| rows.values.iter().map(|v| v[i].as_deref()).collect())
            .collect();
        let raw_of = |row: usize| raw[rows.raw[row]].to_string();
        let input = RowInput {
            cols,
            lines: &rows.lines,
            duplicate_of: None,
            extra_codings: Some(&rows.codings),
            raw: &raw_of,
            structural: &[],
        };
        let lookup = match (table, check) {
            (Table::Patient, _) | (_, PatientCheck::Off) => None,
            (_, PatientCheck::Against(p)) => Some(p),
            (_, PatientCheck::Own) => Some(&own_patients),
        };
        let row_ctx = RowContext {
            path: ctx.path,
            source: ctx.source,
            file: ctx.file,
            today: ctx.today,
            patients: lookup,
        };
        let MappedFile {
            batches,
            rejects,
            flagged,
        } = rows::map_input(&input, &plan, &row_ctx, patient_ids)?;
        for (k, n) in flagged {
            *out.flagged.entry(k).or_default() += n;
        }
        // A resource is accepted whole or not at all.
        let rejected: BTreeSet<u64> = rejects.iter().map(|r| r.line).collect();
        for b in batches {
            let lines = source_lines(&b);
            let keep: BooleanArray = lines
                .iter()
                .map(|l| Some(!l.is_some_and(|l| rejected.contains(&l))))
                .collect();
            let b = filter_record_batch(&b, &keep)
                .map_err(|e| WardError::data("dropping rows of rejected resources", path, e))?;
            if table == Table::Patient {
                super::add_birth_dates(&b, &mut own_patients);
            }
            if b.num_rows() > 0 {
                accepted_lines.extend(source_lines(&b).values().iter().copied());
                sink(table, b)?;
            }
        }
        let mut seen = BTreeSet::new();
        out.rejects
            .extend(rejects.into_iter().filter(|r| seen.insert(r.line)));
    }
    out.accepted += accepted_lines.len() as u64;
    Ok(())
}

/// A mapped batch's lineage column: the line (or entry) of each row.
fn source_lines(b: &RecordBatch) -> &UInt64Array {
    b.column_by_name("source_line")
        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
        .expect("lineage column")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_boundaries_do_not_change_the_result() {
        let ndjson = br#"{"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1950-01-01"}
{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"},"effectiveDateTime":"2025-01-01","code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},"component":[{"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":120,"unit":"mmHg"}}]}
not json

{"resourceType":"Claim","id":"c1"}
{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/p1"},"effectiveDateTime":"2025-01-02","code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},"valueQuantity":{"value":7.2,"unit":"%"}}
"#;
        let ctx = RowContext {
            path: Path::new("All.ndjson"),
            source: "s",
            file: "All.ndjson",
            today: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            patients: None,
        };
        let summary = |chunk: usize, max_line: usize| {
            let mut rows = BTreeMap::<Table, usize>::new();
            let mut sink = |t: Table, b: RecordBatch| {
                *rows.entry(t).or_default() += b.num_rows();
                Ok(())
            };
            let f = load_ndjson_in_chunks(
                ctx.path,
                &ndjson[..],
                &ctx,
                PatientCheck::Off,
                &mut sink,
                chunk,
                max_line,
            )
            .unwrap();
            let rejects: Vec<(u64, &str)> = f.rejects.iter().map(|r| (r.line, r.rule)).collect();
            (
                f.read,
                f.accepted,
                f.skipped.clone(),
                rows,
                format!("{rejects:?}"),
            )
        };
        let whole = summary(100, MAX_LINE);
        assert_eq!(whole.0, 5);
        assert_eq!(whole.1, 3);
        assert_eq!(whole.2, BTreeMap::from([("Claim".to_string(), 1)]));
        assert_eq!(
            whole.3,
            BTreeMap::from([(Table::Patient, 1), (Table::Observation, 3)])
        );
        assert_eq!(whole.4, r#"[(3, "not_json")]"#);
        for chunk in [1, 2, 3] {
            assert_eq!(summary(chunk, MAX_LINE), whole, "chunks of {chunk} lines");
        }
        // A line past the longest is refused unread, the rest read as before
        // (chunks also end by their bytes).
        // (The second line has 303 bytes, the last 217.)
        let (read, accepted, skipped, rows, rejects) = summary(100, 250);
        assert_eq!((read, accepted), (5, 2));
        assert_eq!(skipped, whole.2);
        assert_eq!(
            rows,
            BTreeMap::from([(Table::Patient, 1), (Table::Observation, 1)])
        );
        assert_eq!(rejects, r#"[(2, "malformed_record"), (3, "not_json")]"#);
        assert_eq!(summary(1, 250), summary(100, 250));
    }

    #[test]
    fn medication_request_period_follows_cumulative_medication_duration() {
        let period = |v: serde_json::Value| medication_request_period(&Value::from(&v));
        let days = serde_json::json!({"authoredOn": "2026-12-30T00:00:00.000+00:00",
            "dispenseRequest": {"expectedSupplyDuration": {"value": 90, "code": "d"}}});
        assert_eq!(
            period(days),
            (
                Some("2026-12-30T00:00:00.000+00:00".into()),
                Some("2027-03-29".into())
            )
        );
        let refills = serde_json::json!({"authoredOn": "2025-01-01",
            "dispenseRequest": {"numberOfRepeatsAllowed": 2,
                                "expectedSupplyDuration": {"value": 1, "unit": "week"}}});
        assert_eq!(period(refills).1.as_deref(), Some("2025-01-21"));
        let bounds = serde_json::json!({"authoredOn": "2025-01-01",
            "dosageInstruction": [{"timing": {"repeat": {"boundsPeriod": {"start": "2025-02-01", "end": "2025-03-01"}}}}]});
        assert_eq!(
            period(bounds),
            (Some("2025-02-01".into()), Some("2025-03-01".into()))
        );
        // Nothing to compute a duration from: the end is unknown.
        let bare = serde_json::json!({"authoredOn": "2025-01-01",
            "dispenseRequest": {"validityPeriod": {"end": "2025-12-31"}}});
        assert_eq!(period(bare), (Some("2025-01-01".into()), None));
    }
}
