//! The canonical model: one Arrow schema per table, defined once here.
//!
//! Every table starts with `source` (the provider's name) and ends with the
//! lineage columns `source_file` and `source_line`, so that any row in the
//! warehouse can be traced back to the line of the extract it came from.
//! Coded facts carry their primary coding in `code_system`/`code` and *all*
//! their codings (the primary one included) in `codings`, a list of
//! `{system, code}` structs, so a value set can match any of them.
//!
//! Times are `Timestamp(Microsecond, None)`: the wall-clock time as the
//! provider recorded it (a UTC offset, when present, is dropped), because
//! measures reason about the calendar day of care at the provider.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// What a column holds: its Arrow type and how ingest parses and normalizes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An identifier, kept verbatim (trimmed).
    Id,
    /// Free text, kept verbatim (trimmed).
    Text,
    /// A calendar date (`Date32`).
    Date,
    /// A date and time without zone (`Timestamp(µs)`).
    Timestamp,
    /// A number (`Float64`).
    Float,
    /// `female | male | other | unknown`.
    Sex,
    /// `ambulatory | emergency | inpatient | virtual | other`.
    EncounterClass,
    /// OMB race category (see [`crate::normalize`]).
    Race,
    /// OMB ethnicity category.
    Ethnicity,
    /// US state or territory as its two-letter USPS code.
    State,
    /// Postal code; US ZIP codes reduced to their 5 digits.
    PostalCode,
    /// Short code-system name (`loinc`, `snomed`, `icd10cm`, ...).
    CodeSystem,
    /// A code of the row's `code_system`, checked and normalized against it.
    Code,
    /// A UCUM unit.
    Unit,
    /// A lowercase status or category token (`active`, `final`, ...).
    Token,
    /// All codings of the row: `List<Struct<system, code>>`.
    Codings,
    /// Line number in the source file (`UInt64`).
    Line,
    /// `true | false` (`Boolean`).
    Bool,
}

impl Kind {
    /// The Arrow type that stores this kind.
    pub fn data_type(self) -> DataType {
        match self {
            Kind::Date => DataType::Date32,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::Float => DataType::Float64,
            Kind::Line => DataType::UInt64,
            Kind::Bool => DataType::Boolean,
            Kind::Codings => DataType::List(Arc::new(Field::new(
                "item",
                DataType::Struct(coding_fields()),
                true,
            ))),
            _ => DataType::Utf8,
        }
    }
}

/// The fields of one coding: `system` (short name) and `code`.
pub fn coding_fields() -> Fields {
    Fields::from(vec![
        Field::new("system", DataType::Utf8, false),
        Field::new("code", DataType::Utf8, false),
    ])
}

/// One column of a canonical table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
    /// A row without a value here is rejected (`required` rule).
    pub required: bool,
    /// Whether a mapping may fill it (lineage columns are filled by Ward).
    pub mappable: bool,
}

impl Column {
    /// Whether it identifies a record or a patient (an [`Kind::Id`] named
    /// `*_id`, or `mrn`): a value nearly unique per row, unlike identifiers
    /// such as `source` that name a few things.
    pub fn identifies_a_record(&self) -> bool {
        self.kind == Kind::Id && (self.name.ends_with("_id") || self.name == "mrn")
    }

    /// Whether its values are new on nearly every row: a record's
    /// identifier ([`Column::identifies_a_record`]) or its line. A Parquet
    /// dictionary for such a column is all its values again: hashed, and
    /// then dropped once it outgrows its page (see [`without_dictionary`]).
    pub fn nearly_unique(&self) -> bool {
        self.identifies_a_record() || self.kind == Kind::Line
    }
}

/// The columns of `names` that get no Parquet dictionary when Ward writes
/// a file of them: those nearly unique per row in any table
/// ([`Column::nearly_unique`]), and `person_id` when `person_ids_repeat`
/// is false (a file with a row per person or per record in no person
/// order; in a table sorted by person, in small row groups, a person's
/// rows share the dictionary entry).
///
/// Writing without them costs nothing in size: Parquet writers fall back
/// to plain values once a dictionary outgrows its page (1 MB), which a
/// column of 256k identifiers does within a row group.
pub fn without_dictionary<'a>(
    names: impl IntoIterator<Item = &'a str>,
    person_ids_repeat: bool,
) -> impl Iterator<Item = &'a str> {
    names.into_iter().filter(move |name| {
        (*name == "person_id" && !person_ids_repeat)
            || Table::ALL
                .iter()
                .flat_map(|t| t.columns())
                .any(|c| c.name == *name && c.nearly_unique())
    })
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        required: false,
        mappable: true,
    }
}

const fn req(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        required: true,
        mappable: true,
    }
}

const SOURCE: Column = Column {
    name: "source",
    kind: Kind::Id,
    required: true,
    mappable: false,
};
const SOURCE_FILE: Column = Column {
    name: "source_file",
    kind: Kind::Text,
    required: true,
    mappable: false,
};
/// What a patient's unusable birth date still says (`YYYY` or `YYYY-MM`),
/// kept for linkage; filled by ingest, not by mappings.
const BIRTH_DATE_PARTIAL: Column = Column {
    name: "birth_date_partial",
    kind: Kind::Text,
    required: false,
    mappable: false,
};
/// The unit a lab result was reported in when ingest converted its value to
/// Ward's unit for the test (HbA1c mmol/mol → %, glucose mmol/L → mg/dL);
/// empty when the value is as reported. Filled by ingest, not by mappings:
/// the data-quality checks count conversions with it.
const ORIGINAL_UNIT: Column = Column {
    name: "original_unit",
    kind: Kind::Unit,
    required: false,
    mappable: false,
};
const SOURCE_LINE: Column = Column {
    name: "source_line",
    kind: Kind::Line,
    required: true,
    mappable: false,
};

/// The canonical tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Patient,
    Encounter,
    Condition,
    Observation,
    Medication,
    Procedure,
    ServiceRequest,
    Device,
    Coverage,
    Communication,
}

impl Table {
    /// All tables, patients first (facts are validated against patients).
    pub const ALL: [Table; 10] = [
        Table::Patient,
        Table::Encounter,
        Table::Condition,
        Table::Observation,
        Table::Medication,
        Table::Procedure,
        Table::ServiceRequest,
        Table::Device,
        Table::Coverage,
        Table::Communication,
    ];

    /// The table's snake_case name, as used in paths and SQL.
    pub fn name(self) -> &'static str {
        match self {
            Table::Patient => "patient",
            Table::Encounter => "encounter",
            Table::Condition => "condition",
            Table::Observation => "observation",
            Table::Medication => "medication",
            Table::Procedure => "procedure",
            Table::ServiceRequest => "service_request",
            Table::Device => "device",
            Table::Coverage => "coverage",
            Table::Communication => "communication",
        }
    }

    /// Parses a table name.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The table's columns in schema order.
    pub fn columns(self) -> &'static [Column] {
        match self {
            Table::Patient => &PATIENT,
            Table::Encounter => &ENCOUNTER,
            Table::Condition => &CONDITION,
            Table::Observation => &OBSERVATION,
            Table::Medication => &MEDICATION,
            Table::Procedure => &PROCEDURE,
            Table::ServiceRequest => &SERVICE_REQUEST,
            Table::Device => &DEVICE,
            Table::Coverage => &COVERAGE,
            Table::Communication => &COMMUNICATION,
        }
    }

    /// Looks a column up by name.
    pub fn column(self, name: &str) -> Option<&'static Column> {
        self.columns().iter().find(|c| c.name == name)
    }

    /// The date or time columns that must not lie in the future nor precede
    /// the patient's birth.
    pub fn event_columns(self) -> &'static [&'static str] {
        match self {
            Table::Patient => &["birth_date", "deceased_date"],
            Table::Encounter => &["start_time", "end_time"],
            Table::Condition => &["onset_date", "abatement_date", "recorded_date"],
            Table::Observation => &["effective_time"],
            Table::Medication => &["start_date", "end_date"],
            Table::Procedure => &["performed_time", "performed_end_time"],
            Table::ServiceRequest => &["authored_time"],
            Table::Device => &["event_time"],
            Table::Coverage => &[],
            Table::Communication => &["sent_time", "received_time"],
        }
    }

    /// Whether an event column may lie after the data's as-of day: a
    /// medication's end is when the supply runs out (often computed from
    /// the days supplied), planned rather than recorded, so a current long
    /// prescription ends in the future.
    pub fn may_be_future(self, column: &str) -> bool {
        matches!((self, column), (Table::Medication, "end_date"))
    }

    /// The start and end columns of the fact's period, when it has one.
    pub fn period_columns(self) -> Option<(&'static str, &'static str)> {
        match self {
            Table::Patient | Table::Device => None,
            Table::Observation => Some(("effective_time", "effective_end")),
            Table::ServiceRequest => Some(("occurrence_start", "occurrence_end")),
            Table::Coverage => Some(("start_date", "end_date")),
            Table::Communication => Some(("sent_time", "received_time")),
            Table::Encounter => Some(("start_time", "end_time")),
            Table::Condition => Some(("onset_date", "abatement_date")),
            Table::Medication => Some(("start_date", "end_date")),
            Table::Procedure => Some(("performed_time", "performed_end_time")),
        }
    }

    /// The table's Arrow schema.
    pub fn schema(self) -> SchemaRef {
        static SCHEMAS: LazyLock<Vec<SchemaRef>> = LazyLock::new(|| {
            Table::ALL
                .iter()
                .map(|t| {
                    Arc::new(Schema::new(
                        t.columns()
                            .iter()
                            .map(|c| Field::new(c.name, c.kind.data_type(), !c.required))
                            .collect::<Vec<_>>(),
                    ))
                })
                .collect()
        });
        SCHEMAS[self as usize].clone()
    }
}

const PATIENT: [Column; 21] = [
    SOURCE,
    req("source_patient_id", Kind::Id),
    col("mrn", Kind::Id),
    col("given_name", Kind::Text),
    col("family_name", Kind::Text),
    col("birth_date", Kind::Date),
    BIRTH_DATE_PARTIAL,
    req("sex", Kind::Sex),
    col("race", Kind::Race),
    col("ethnicity", Kind::Ethnicity),
    col("address_line", Kind::Text),
    col("city", Kind::Text),
    col("state", Kind::State),
    col("postal_code", Kind::PostalCode),
    col("phone", Kind::Text),
    col("email", Kind::Text),
    col("ssn", Kind::Text),
    col("deceased_date", Kind::Date),
    col("payer", Kind::Text),
    SOURCE_FILE,
    SOURCE_LINE,
];

const ENCOUNTER: [Column; 14] = [
    SOURCE,
    req("source_encounter_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    req("encounter_class", Kind::EncounterClass),
    col("status", Kind::Token),
    col("code_system", Kind::CodeSystem),
    col("code", Kind::Code),
    col("codings", Kind::Codings),
    req("start_time", Kind::Timestamp),
    col("end_time", Kind::Timestamp),
    col("discharge_disposition", Kind::Token),
    col("facility", Kind::Text),
    SOURCE_FILE,
    SOURCE_LINE,
];

const CONDITION: [Column; 18] = [
    SOURCE,
    col("source_condition_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("source_encounter_id", Kind::Id),
    col("category", Kind::Token),
    // Every category code (FHIR: of every coding of every category),
    // space-separated: queries test "any category" with it.
    col("categories", Kind::Text),
    col("clinical_status", Kind::Token),
    col("verification_status", Kind::Token),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    req("onset_date", Kind::Date),
    col("abatement_date", Kind::Date),
    col("recorded_date", Kind::Date),
    col("description", Kind::Text),
    // Where on the body (FHIR bodySite), as space-separated `system|code`.
    col("body_sites", Kind::Text),
    SOURCE_FILE,
    SOURCE_LINE,
];

const OBSERVATION: [Column; 23] = [
    SOURCE,
    col("source_observation_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("source_encounter_id", Kind::Id),
    col("status", Kind::Token),
    col("category", Kind::Token),
    // Every category code (FHIR: of every coding of every category),
    // space-separated: queries test "any category" with it.
    col("categories", Kind::Text),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    // Why the fact was (not) done: FHIR statusReason, reasonCode and the
    // QI-Core notDoneReason / doNotPerformReason / reasonRefused extensions,
    // as space-separated `system|code` (short system names where known).
    col("reasons", Kind::Text),
    col("value_num", Kind::Float),
    col("unit", Kind::Unit),
    ORIGINAL_UNIT,
    col("value_text", Kind::Text),
    col("value_code_system", Kind::CodeSystem),
    col("value_code", Kind::Id),
    req("effective_time", Kind::Timestamp),
    col("effective_end", Kind::Timestamp),
    col("description", Kind::Text),
    col("panel_id", Kind::Id),
    SOURCE_FILE,
    SOURCE_LINE,
];

const MEDICATION: [Column; 18] = [
    SOURCE,
    col("source_medication_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("source_encounter_id", Kind::Id),
    col("status", Kind::Token),
    col("intent", Kind::Token),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    // Why the fact was (not) done: FHIR statusReason, reasonCode and the
    // QI-Core notDoneReason / doNotPerformReason / reasonRefused extensions,
    // as space-separated `system|code` (short system names where known).
    col("reasons", Kind::Text),
    req("start_date", Kind::Date),
    col("end_date", Kind::Date),
    // The start's time of day, when the source records one (an
    // administration's effective time): hospital measures time it against
    // lab results to the minute.
    col("start_time", Kind::Timestamp),
    col("description", Kind::Text),
    col("resource_type", Kind::Token),
    col("do_not_perform", Kind::Bool),
    SOURCE_FILE,
    SOURCE_LINE,
];

const PROCEDURE: [Column; 14] = [
    SOURCE,
    col("source_procedure_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("source_encounter_id", Kind::Id),
    col("status", Kind::Token),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    // Why the fact was (not) done: FHIR statusReason, reasonCode and the
    // QI-Core notDoneReason / doNotPerformReason / reasonRefused extensions,
    // as space-separated `system|code` (short system names where known).
    col("reasons", Kind::Text),
    req("performed_time", Kind::Timestamp),
    col("performed_end_time", Kind::Timestamp),
    col("description", Kind::Text),
    SOURCE_FILE,
    SOURCE_LINE,
];

const SERVICE_REQUEST: [Column; 18] = [
    SOURCE,
    col("source_service_request_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("source_encounter_id", Kind::Id),
    col("status", Kind::Token),
    col("intent", Kind::Token),
    col("do_not_perform", Kind::Bool),
    col("category", Kind::Token),
    // Every category code (FHIR: of every coding of every category),
    // space-separated: queries test "any category" with it.
    col("categories", Kind::Text),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    // Why the fact was (not) done: FHIR statusReason, reasonCode and the
    // QI-Core notDoneReason / doNotPerformReason / reasonRefused extensions,
    // as space-separated `system|code` (short system names where known).
    col("reasons", Kind::Text),
    req("authored_time", Kind::Timestamp),
    col("occurrence_start", Kind::Timestamp),
    col("occurrence_end", Kind::Timestamp),
    SOURCE_FILE,
    SOURCE_LINE,
];

/// DeviceRequest and DeviceUseStatement (see `resource_type`).
const DEVICE: [Column; 13] = [
    SOURCE,
    col("source_device_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("resource_type", Kind::Token),
    col("status", Kind::Token),
    col("intent", Kind::Token),
    col("do_not_perform", Kind::Bool),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    req("event_time", Kind::Timestamp),
    SOURCE_FILE,
    SOURCE_LINE,
];

const COVERAGE: [Column; 11] = [
    SOURCE,
    col("source_coverage_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("status", Kind::Token),
    col("payer_type_system", Kind::CodeSystem),
    col("payer_type_code", Kind::Id),
    col("start_date", Kind::Date),
    col("end_date", Kind::Date),
    col("payor", Kind::Text),
    SOURCE_FILE,
    SOURCE_LINE,
];

/// Communication (QI-Core Communication and CommunicationNotDone): what was
/// communicated is its category, coded like the other facts.
const COMMUNICATION: [Column; 13] = [
    SOURCE,
    col("source_communication_id", Kind::Id),
    req("source_patient_id", Kind::Id),
    col("source_encounter_id", Kind::Id),
    col("status", Kind::Token),
    req("code_system", Kind::CodeSystem),
    req("code", Kind::Code),
    col("codings", Kind::Codings),
    col("reasons", Kind::Text),
    req("sent_time", Kind::Timestamp),
    col("received_time", Kind::Timestamp),
    SOURCE_FILE,
    SOURCE_LINE,
];

/// Schema of `rejects/<source>/…parquet`: one row per rejected source record.
/// `rule`/`column`/`message` describe the first failure, `errors` lists all of
/// them (`column: rule` separated by `; `), `raw` holds the record's fields as
/// a JSON object keyed by header name (or the raw line when it could not be
/// split into fields).
pub fn rejects_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("source_file", DataType::Utf8, false),
            Field::new("line", DataType::UInt64, false),
            Field::new("table", DataType::Utf8, false),
            Field::new("column", DataType::Utf8, true),
            Field::new("rule", DataType::Utf8, false),
            Field::new("message", DataType::Utf8, false),
            Field::new("errors", DataType::Utf8, false),
            Field::new("raw", DataType::Utf8, false),
        ]))
    });
    SCHEMA.clone()
}

/// Schema of the value-set table (`queries/valuesets/*.csv`): all text, so
/// that codes such as `44054006` or `0DJ08ZZ` are never read as numbers.
pub fn valueset_code_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(
            [
                "valueset",
                "name",
                "version",
                "code_system",
                "code",
                "display",
            ]
            .map(|n| Field::new(n, DataType::Utf8, n == "display"))
            .to_vec(),
        ))
    });
    SCHEMA.clone()
}

/// A list of texts (`sources`).
fn text_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// Schema of `core/person_link.parquet`.
pub fn person_link_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("source_patient_id", DataType::Utf8, false),
        Field::new("person_id", DataType::Utf8, false),
        Field::new("match_weight", DataType::Float64, true),
        Field::new("rule", DataType::Utf8, true),
    ]))
}

/// Schema of `core/person.parquet`: one row per person with the most
/// frequent value of each demographic among the person's records (ties: the
/// first record in source order) and the list of sources.
pub fn person_schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Utf8, false),
        text("given_name"),
        text("family_name"),
        Field::new("birth_date", DataType::Date32, true),
        text("sex"),
        text("race"),
        text("ethnicity"),
        text("state"),
        text("postal_code"),
        Field::new("deceased_date", DataType::Date32, true),
        text("payer"),
        Field::new("sources", text_list(), false),
        Field::new("records", DataType::UInt32, false),
    ]))
}

/// Schema of `summary.parquet`.
pub fn summary_schema() -> SchemaRef {
    let count = |n: &str| Field::new(n, DataType::UInt64, true);
    let float = |n: &str| Field::new(n, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("measure", DataType::Utf8, false),
        Field::new("dimension", DataType::Utf8, false),
        Field::new("stratum", DataType::Utf8, false),
        count("initial_population"),
        count("denominator"),
        count("denominator_exclusion"),
        count("denominator_exception"),
        count("numerator"),
        float("rate"),
        float("ci_low"),
        float("ci_high"),
        Field::new("suppressed", DataType::Boolean, false),
        float("age_std_rate"),
        float("age_std_ci_low"),
        float("age_std_ci_high"),
    ]))
}

/// Schema of `research/person.parquet`: dates as years (HIPAA Safe
/// Harbor), or whole shifted dates (`shifted_dates`, a limited data set).
pub fn research_person_schema(shifted_dates: bool) -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, true);
    let date = |n: &str| match shifted_dates {
        false => Field::new(format!("{n}_year"), DataType::Int32, true),
        true => Field::new(format!("{n}_date"), DataType::Date32, true),
    };
    Arc::new(Schema::new(vec![
        Field::new("research_id", DataType::Utf8, false),
        text("sex"),
        text("race"),
        text("ethnicity"),
        Field::new("age", DataType::Int32, true),
        text("age_band"),
        date("birth"),
        text("state"),
        text("zip3"),
        date("deceased"),
        Field::new("sources", text_list(), true),
        Field::new("records", DataType::UInt32, true),
    ]))
}

/// `dq_layout` of the data-quality checks: the canonical columns each
/// source's layout fills.
pub fn dq_layout_schema() -> SchemaRef {
    Arc::new(Schema::new(
        ["source", "table_name", "column_name"]
            .map(|n| Field::new(n, DataType::Utf8, false))
            .to_vec(),
    ))
}

/// Schema of `reports/<run_id>/dq.parquet`: one row per check and source.
pub fn dq_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let text = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
        let float = |n: &str, null: bool| Field::new(n, DataType::Float64, null);
        Arc::new(Schema::new(vec![
            text("check", false),
            text("category", false),
            text("subcategory", true),
            text("table", true),
            text("column", true),
            text("source", false),
            text("severity", false),
            float("threshold_pct", false),
            Field::new("violating", DataType::UInt64, false),
            Field::new("checked", DataType::UInt64, false),
            float("rate_pct", true),
            Field::new("new_violating", DataType::UInt64, false),
            Field::new("new_checked", DataType::UInt64, false),
            float("new_rate_pct", true),
            text("status", false),
            float("baseline_pct", true),
            float("drift_tolerance_pct", false),
            Field::new("drift", DataType::Boolean, false),
        ]))
    });
    SCHEMA.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_lines_get_no_dictionary_person_ids_only_where_they_do_not_repeat() {
        let names = [
            "source_patient_id",
            "source_observation_id",
            "mrn",
            "source_line",
            "person_id",
            "source",
            "code",
            "effective_time",
            "value_num",
        ];
        let off = |repeat| without_dictionary(names, repeat).collect::<Vec<_>>();
        assert_eq!(
            off(true),
            [
                "source_patient_id",
                "source_observation_id",
                "mrn",
                "source_line"
            ]
        );
        assert_eq!(
            off(false),
            [
                "source_patient_id",
                "source_observation_id",
                "mrn",
                "source_line",
                "person_id"
            ]
        );
    }

    #[test]
    fn every_table_has_lineage_and_unique_columns() {
        for t in Table::ALL {
            let schema = t.schema();
            assert_eq!(schema.field(0).name(), "source", "{}", t.name());
            let n = schema.fields().len();
            assert_eq!(schema.field(n - 2).name(), "source_file");
            assert_eq!(schema.field(n - 1).name(), "source_line");
            let mut names: Vec<_> = t.columns().iter().map(|c| c.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n, "duplicate column in {}", t.name());
            assert_eq!(Table::from_name(t.name()), Some(t));
            for e in t.event_columns() {
                let c = t.column(e).expect("event column exists");
                assert!(matches!(c.kind, Kind::Date | Kind::Timestamp));
            }
        }
    }

    #[test]
    fn coded_tables_carry_all_codings() {
        for t in Table::ALL.iter().filter(|t| t.column("code").is_some()) {
            let f = t.schema().field_with_name("codings").unwrap().clone();
            match f.data_type() {
                DataType::List(item) => match item.data_type() {
                    DataType::Struct(fields) => {
                        assert_eq!(fields.len(), 2);
                        assert_eq!(fields[0].name(), "system");
                    }
                    other => panic!("unexpected {other}"),
                },
                other => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn required_columns_are_not_nullable() {
        let s = Table::Observation.schema();
        assert!(!s.field_with_name("effective_time").unwrap().is_nullable());
        assert!(s.field_with_name("value_num").unwrap().is_nullable());
    }
}
