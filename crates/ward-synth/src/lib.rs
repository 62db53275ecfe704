//! `ward-synth` (`ward synth` with the `synth` feature): a synthetic
//! multi-provider population with ground truth, for Ward's tests and
//! benchmarks. It is a crate of its own so that the production library
//! and binary do not carry it.
//!
//! Persons are drawn independently (one ChaCha RNG per person, seeded from
//! the run seed and the person's index), so the output depends only on the
//! options, not on thread scheduling. Blocks of persons are generated in
//! parallel and written in order, so memory stays bounded by the window of
//! blocks in flight, not by the population size.
//!
//! Each person is seen by 1–4 providers; each provider writes the person in
//! its own layout (the sample mappings EMR-A and HIS-B) with its own ids and
//! its own noise (nicknames, typos, swapped day/month, missing SSN, moved
//! address, married-name change; twins share birth date, family name and
//! address). A configurable share of rows is deliberately bad, each with a
//! known rule, listed in `expected_rejects.csv`, so tests know exactly what
//! ingest must reject. Besides diabetes and blood pressure, each provider
//! writes the care the other eCQMs count (`care`: screenings, vital signs,
//! counseling, cancer screening, eye-exam letters, inpatient insulin).
//!
//! Output: one folder per provider, `mappings/`, `ward.toml`, `truth.csv`
//! ((source, source_patient_id) → person_id), `persons.csv` (the true
//! attributes of each person) and `expected_rejects.csv`.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use chrono::{Datelike, Duration, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// What can go wrong: a file that cannot be written, or options that
/// describe no population.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Options(String),
}

/// The result type of this crate.
pub type Result<T, E = SynthError> = std::result::Result<T, E>;

/// Milligrams of glucose per millimole (its molar mass, 180.16 g/mol, over
/// ten): the factor between mg/dL and mmol/L that Ward's ingest also uses.
pub const GLUCOSE_MG_PER_MMOL: f64 = 18.016;

mod care;

/// The sample mappings, embedded so that `ward synth` works anywhere.
pub const EMR_A_MAPPING: &str = include_str!("../../../sample_data/mappings/emr_a.toml");
/// See [`EMR_A_MAPPING`].
pub const HIS_B_MAPPING: &str = include_str!("../../../sample_data/mappings/hospital_b.toml");

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub patients: u64,
    pub providers: usize,
    pub seed: u64,
    pub out: PathBuf,
    /// Share of rows written deliberately bad (0 to 0.5).
    pub bad_rate: f64,
    /// The calendar year of the measurement period; data spans it and the
    /// year before.
    pub year: i32,
    /// Also the noise that broke linkage on unseen data: given and family
    /// names swapped (1.5 % of records), a given name cut to its initial
    /// (1.5 %), no birth date (1 %), street suffixes spelled out (10 %) and
    /// within-provider duplicate registrations (2 %: a second patient id for
    /// the same person, with a typo, in `truth.csv`) and SSNs written
    /// without dashes or with spaces (15 %). Off: the classic noise only.
    pub hard_noise: bool,
}

/// What was generated.
#[derive(Debug, Clone, Default)]
pub struct SynthReport {
    pub persons: u64,
    /// (source, source_patient_id) records, i.e. rows of `truth.csv`.
    pub source_patients: u64,
    /// Data rows written, bad ones included.
    pub rows: u64,
    pub expected_rejects: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Clinic,
    Hospital,
    Endo,
    /// A reference laboratory: patients and lab results only.
    Lab,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Comma CSV, US dates, HbA1c in %.
    EmrA,
    /// Pipe CSV with BOM and CRLF, ISO dates, HbA1c in mmol/mol.
    HisB,
    /// FHIR bulk export: Patient.ndjson and Observation.ndjson.
    FhirNdjson,
}

/// File (table) slots of a provider, in write order.
const PATIENTS: usize = 0;
const ENCOUNTERS: usize = 1;
const CONDITIONS: usize = 2;
const OBSERVATIONS: usize = 3;
const MEDICATIONS: usize = 4;
const PROCEDURES: usize = 5;
/// Questionnaire and exam findings (EMR-A): depression screenings, macular exams.
const ASSESSMENTS: usize = 6;
/// Orders for referrals and follow-up (EMR-A).
const REFERRALS: usize = 7;
/// Findings sent to another clinician (EMR-A).
const LETTERS: usize = 8;
/// Problem-list entries not tied to a visit (EMR-A).
const PROBLEM_LIST: usize = 9;
/// The medication administration record of inpatient stays (HIS-B).
const ADMINISTRATIONS: usize = 10;
/// Number of file slots.
const SLOTS: usize = 11;

/// One provider's rows of one block, per file slot.
type Files = [Vec<Row>; SLOTS];

impl Layout {
    fn files(self) -> [&'static str; SLOTS] {
        match self {
            Layout::EmrA => [
                "patients.csv",
                "visits.csv",
                "problems.csv",
                "results.csv",
                "medications.csv",
                "procedures.csv",
                "assessments.csv",
                "referrals.csv",
                "letters.csv",
                "problem_list.csv",
                "",
            ],
            Layout::FhirNdjson => [
                "Patient.ndjson",
                "",
                "",
                "Observation.ndjson",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
            ],
            Layout::HisB => [
                "pat_demo.csv",
                "enc.csv",
                "dx.csv",
                "lab.csv",
                "med.csv",
                "proc.csv",
                "",
                "",
                "",
                "",
                "mar.csv",
            ],
        }
    }
    fn headers(self) -> [&'static str; SLOTS] {
        match self {
            Layout::FhirNdjson => [""; SLOTS],
            Layout::EmrA => [
                "PatientID,MRN,FirstName,LastName,DOB,Sex,Race,Ethnicity,Street,City,State,Zip,Phone,Email,SSN,Insurance",
                "VisitID,PatientID,VisitDate,VisitType,CPT,Status",
                "PatientID,VisitID,ICD10,Description,OnsetDate,ResolvedDate,Status",
                "ResultID,PatientID,VisitID,ResultDate,LOINC,TestName,Result,Units",
                "PatientID,RxNorm,DrugName,StartDate,StopDate,Status",
                "PatientID,VisitID,ProcDate,CodeSystem,Code,Description",
                "AssessmentID,PatientID,VisitID,AssessedAt,Category,LOINC,Name,Score,Finding",
                "ReferralID,PatientID,VisitID,OrderedAt,SNOMED,Description,Status",
                "LetterID,PatientID,VisitID,SentAt,SNOMED,Status",
                "PatientID,ICD10,Description,OnsetDate,Status",
                "",
            ],
            Layout::HisB => [
                "PAT_ID|MRN_NO|PAT_FIRST|PAT_LAST|BIRTH_DT|GENDER_CD|RACE_CD|ETHNIC_CD|ADDR1|CITY|ST|ZIP|PHONE_NO",
                "ENC_ID|PAT_ID|ADMIT_TS|DISCH_TS|ENC_TYPE|DISCH_DISP|ENC_CODE",
                "PAT_ID|ENC_ID|DX_CODE|SNOMED_CD|DX_DT",
                "PAT_ID|ENC_ID|COLLECT_TS|LOINC_CD|RESULT_VAL|RESULT_UNIT",
                "PAT_ID|ENC_ID|RXCUI|MED_NAME|START_DT|END_DT|ORDER_STATUS",
                "PAT_ID|ENC_ID|PROC_TS|CODE_TYPE|PROC_CODE",
                "",
                "",
                "",
                "",
                "MAR_ID|PAT_ID|ENC_ID|ADMIN_TS|RXCUI|MED_NAME|ADMIN_STATUS",
            ],
        }
    }
    fn delimiter(self) -> u8 {
        match self {
            Layout::EmrA | Layout::FhirNdjson => b',',
            Layout::HisB => b'|',
        }
    }
    fn line_end(self) -> &'static [u8] {
        match self {
            Layout::EmrA | Layout::FhirNdjson => b"\n",
            Layout::HisB => b"\r\n",
        }
    }
    /// The source entry of the generated ward.toml.
    fn source_config(self, name: &str) -> String {
        let csv = |mapping: &str| {
            format!("format = \"csv\"\npath = \"{name}/*.csv\"\nmapping = \"mappings/{mapping}\"\n")
        };
        match self {
            Layout::EmrA => csv("emr_a.toml"),
            Layout::HisB => csv("hospital_b.toml"),
            Layout::FhirNdjson => format!("format = \"fhir-ndjson\"\npath = \"{name}\"\n"),
        }
    }
}

#[derive(Debug, Clone)]
struct Provider {
    name: String,
    kind: Kind,
    layout: Layout,
    /// Two-letter id prefix, unique per provider.
    prefix: String,
}

fn providers(k: usize) -> Vec<Provider> {
    const CLINICS: [&str; 5] = [
        "northside_clinic",
        "riverside_clinic",
        "hillcrest_clinic",
        "oakwood_clinic",
        "harbor_clinic",
    ];
    const HOSPITALS: [&str; 3] = ["st_marys_hospital", "general_hospital", "mercy_hospital"];
    const ENDOS: [&str; 2] = ["lakeside_endo", "valley_endo"];
    const LABS: [&str; 2] = ["regional_lab", "metro_lab"];
    let (mut c, mut h, mut e, mut l) = (0, 0, 0, 0);
    (0..k)
        .map(|i| {
            let kind = [Kind::Clinic, Kind::Hospital, Kind::Endo, Kind::Lab][i % 4];
            let (list, n): (&[&str], &mut usize) = match kind {
                Kind::Clinic => (&CLINICS, &mut c),
                Kind::Hospital => (&HOSPITALS, &mut h),
                Kind::Endo => (&ENDOS, &mut e),
                Kind::Lab => (&LABS, &mut l),
            };
            let name = match list.get(*n) {
                Some(name) => name.to_string(),
                None => format!("{}_{}", list[*n % list.len()], *n / list.len() + 1),
            };
            *n += 1;
            let layout = match kind {
                Kind::Hospital => Layout::HisB,
                Kind::Lab => Layout::FhirNdjson,
                Kind::Clinic | Kind::Endo => Layout::EmrA,
            };
            let prefix = format!(
                "{}{}",
                (b'A' + (i / 26) as u8) as char,
                (b'A' + (i % 26) as u8) as char
            );
            Provider {
                name,
                kind,
                layout,
                prefix,
            }
        })
        .collect()
}

/// Names drawn with their frequency in the 1990 US Census (see
/// `data/census1990/README.md`): 1 % of people are Smiths, and a long tail
/// of rare names, so a large population has realistic same-name collisions.
struct Names {
    names: Vec<&'static str>,
    /// Cumulative weights, one per name.
    cumulative: Vec<u32>,
}

impl Names {
    /// Parses `Name,weight` lines.
    fn parse(text: &'static str) -> Names {
        let mut names = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0;
        for (name, weight) in text.lines().filter_map(|l| l.split_once(',')) {
            total += weight.trim().parse::<u32>().unwrap_or(1);
            names.push(name);
            cumulative.push(total);
        }
        Names { names, cumulative }
    }

    fn pick(&self, r: &mut impl Rng) -> &'static str {
        let x = r.random_range(0..self.cumulative.last().copied().unwrap_or(1));
        self.names[self.cumulative.partition_point(|&c| c <= x)]
    }
}

static FEMALE: LazyLock<Names> =
    LazyLock::new(|| Names::parse(include_str!("../data/census1990/female.csv")));
static MALE: LazyLock<Names> =
    LazyLock::new(|| Names::parse(include_str!("../data/census1990/male.csv")));
static SURNAMES: LazyLock<Names> =
    LazyLock::new(|| Names::parse(include_str!("../data/census1990/surnames.csv")));

const NICKNAMES: [(&str, &str); 16] = [
    ("Elizabeth", "Liz"),
    ("Margaret", "Peggy"),
    ("Patricia", "Pat"),
    ("Jennifer", "Jen"),
    ("Susan", "Sue"),
    ("Robert", "Bob"),
    ("William", "Bill"),
    ("Richard", "Dick"),
    ("Joseph", "Joe"),
    ("Thomas", "Tom"),
    ("Michael", "Mike"),
    ("James", "Jim"),
    ("Charles", "Chuck"),
    ("Christopher", "Chris"),
    ("Daniel", "Dan"),
    ("Anthony", "Tony"),
];
const STREETS: [&str; 12] = [
    "Oak",
    "Maple",
    "Pine",
    "Cedar",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
    "Main",
    "Church",
    "River",
];
const SUFFIXES: [&str; 4] = ["St", "Ave", "Rd", "Ln"];
/// (city, state, ZIP3) spread over several states.
const PLACES: [(&str, &str, &str); 14] = [
    ("Springfield", "MA", "011"),
    ("Worcester", "MA", "016"),
    ("Hartford", "CT", "061"),
    ("Albany", "NY", "122"),
    ("Buffalo", "NY", "142"),
    ("Philadelphia", "PA", "191"),
    ("Baltimore", "MD", "212"),
    ("Atlanta", "GA", "303"),
    ("Memphis", "TN", "381"),
    ("Chicago", "IL", "606"),
    ("Houston", "TX", "770"),
    ("Denver", "CO", "802"),
    ("Phoenix", "AZ", "850"),
    ("Fresno", "CA", "937"),
];
/// (race token written by EMR-A, CDC code written by HIS-B, cumulative share).
const RACES: [(&str, &str, f64); 6] = [
    ("White", "2106-3", 0.62),
    ("Black", "2054-5", 0.75),
    ("Asian", "2028-9", 0.81),
    ("American Indian", "1002-5", 0.82),
    ("Pacific Islander", "2076-8", 0.83),
    ("Other", "2131-1", 1.0),
];

/// The true attributes of one person.
#[derive(Debug, Clone)]
struct Person {
    id: u64,
    female: bool,
    given: &'static str,
    family: String,
    birth: NaiveDate,
    race: usize,
    hispanic: bool,
    street: String,
    place: usize,
    zip: String,
    phone: String,
    ssn: String,
    diabetic: bool,
    hypertensive: bool,
    /// Mean HbA1c (%) of a diabetic.
    a1c_mean: f64,
    /// A diabetic without any HbA1c test in the measurement period.
    untested: bool,
    eye_exam: bool,
}

fn rng_for(seed: u64, person: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ person.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(stream);
    r
}

fn normal(r: &mut impl Rng, mean: f64, sd: f64) -> f64 {
    // Box–Muller.
    let u1: f64 = r.random_range(f64::EPSILON..1.0);
    let u2: f64 = r.random();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn pick<T: Copy>(r: &mut impl Rng, items: &[T]) -> T {
    items[r.random_range(0..items.len())]
}

/// Birth date, family name and address: shared by twins.
fn household(seed: u64, p: u64, year: i32) -> (NaiveDate, String, String, usize, String) {
    let mut r = rng_for(seed, p, 1);
    let age = match r.random::<f64>() {
        x if x < 0.22 => r.random_range(0..18),
        x if x < 0.60 => r.random_range(18..45),
        x if x < 0.85 => r.random_range(45..65),
        _ => r.random_range(65..95),
    };
    let end = NaiveDate::from_ymd_opt(year, 12, 31).expect("valid date");
    let birth = end - Duration::days(age * 365 + r.random_range(0..365));
    let family = SURNAMES.pick(&mut r).to_string();
    let street = format!(
        "{} {} {}",
        r.random_range(1..9999),
        pick(&mut r, &STREETS),
        pick(&mut r, &SUFFIXES)
    );
    let place = r.random_range(0..PLACES.len());
    let zip = format!("{}{:02}", PLACES[place].2, r.random_range(1..99));
    (birth, family, street, place, zip)
}

fn person(seed: u64, p: u64, year: i32) -> Person {
    // Every 200th person is the twin of the one before.
    let twin = p % 200 == 1;
    let (birth, family, street, place, zip) = household(seed, if twin { p - 1 } else { p }, year);
    let mut r = rng_for(seed, p, 2);
    let female = r.random_bool(0.5);
    let names = if female { &FEMALE } else { &MALE };
    let mut given = names.pick(&mut r);
    // Parents do not give twins one name.
    if twin {
        let sibling = person(seed, p - 1, year).given;
        while given == sibling {
            given = names.pick(&mut r);
        }
    }
    let age = year - birth.year();
    let u: f64 = r.random();
    let race = RACES
        .iter()
        .position(|(_, _, cum)| u < *cum)
        .unwrap_or(RACES.len() - 1);
    let (p_dm, p_htn) = match age {
        ..18 => (0.003, 0.01),
        18..45 => (0.04, 0.12),
        45..65 => (0.14, 0.35),
        _ => (0.24, 0.60),
    };
    let diabetic = r.random_bool(p_dm);
    Person {
        id: p,
        female,
        given,
        family,
        birth,
        race,
        hispanic: r.random_bool(0.19),
        street,
        place,
        zip,
        phone: format!(
            "{}-555-{:04}",
            r.random_range(201..989),
            r.random_range(0..10000)
        ),
        ssn: format!(
            "9{:02}-{:02}-{:04}",
            r.random_range(0..100),
            r.random_range(1..100),
            r.random_range(1..10000)
        ),
        diabetic,
        hypertensive: r.random_bool(p_htn),
        a1c_mean: normal(&mut r, 7.5, 1.45).clamp(5.2, 14.0),
        untested: diabetic && r.random_bool(0.10),
        eye_exam: diabetic && r.random_bool(0.55),
    }
}

/// One row to write, possibly deliberately bad.
struct Row {
    fields: Vec<String>,
    /// The rule ingest must reject it with.
    reject: Option<&'static str>,
}

fn row(fields: Vec<String>) -> Row {
    Row {
        fields,
        reject: None,
    }
}

/// Encodes a row as CSV with the layout's delimiter and line end.
fn encode(out: &mut Vec<u8>, fields: &[String], layout: Layout) -> u64 {
    if layout == Layout::FhirNdjson {
        // One resource (or one deliberately broken line) per line.
        out.extend_from_slice(fields[0].as_bytes());
        out.push(b'\n');
        return 1;
    }
    let d = layout.delimiter();
    let mut lines = 1;
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(d);
        }
        if f.bytes()
            .any(|b| b == d || b == b'"' || b == b'\n' || b == b'\r')
        {
            out.push(b'"');
            out.extend_from_slice(f.replace('"', "\"\"").as_bytes());
            out.push(b'"');
            lines += f.bytes().filter(|b| *b == b'\n').count() as u64;
        } else {
            out.extend_from_slice(f.as_bytes());
        }
    }
    out.extend_from_slice(layout.line_end());
    lines
}

/// Rows generated for one block of persons: per provider, per file.
struct Block {
    rows: Vec<Files>,
    truth: Vec<(usize, String, u64)>,
    persons: Vec<Person>,
}

struct Ctx<'a> {
    opts: &'a SynthOptions,
    providers: &'a [Provider],
}

impl Ctx<'_> {
    /// A draw of the hard noise with probability `p`; false, without
    /// drawing, when the hard noise is off (the classic output stays the
    /// same for a seed).
    fn hard(&self, r: &mut impl Rng, p: f64) -> bool {
        self.opts.hard_noise && r.random_bool(p)
    }
    fn date(&self, d: NaiveDate, layout: Layout) -> String {
        match layout {
            Layout::EmrA => d.format("%m/%d/%Y").to_string(),
            Layout::HisB | Layout::FhirNdjson => d.format("%Y-%m-%d").to_string(),
        }
    }
    fn time(&self, d: NaiveDate, minutes: i64, layout: Layout) -> String {
        let t = d.and_hms_opt(0, 0, 0).expect("midnight") + Duration::minutes(minutes);
        match layout {
            Layout::EmrA => t.format("%m/%d/%Y %H:%M").to_string(),
            Layout::HisB | Layout::FhirNdjson => t.format("%Y-%m-%dT%H:%M:%S").to_string(),
        }
    }
}

fn block(ctx: &Ctx, start: u64, end: u64) -> Block {
    let k = ctx.providers.len();
    let mut b = Block {
        rows: (0..k).map(|_| Default::default()).collect(),
        truth: Vec::new(),
        persons: Vec::with_capacity((end - start) as usize),
    };
    for p in start..end {
        let person = person(ctx.opts.seed, p, ctx.opts.year);
        let mut r = rng_for(ctx.opts.seed, p, 3);
        // 1–4 providers, distinct; endocrinology only for diabetics.
        let wanted = match r.random::<f64>() {
            x if x < 0.55 => 1,
            x if x < 0.85 => 2,
            x if x < 0.97 => 3,
            _ => 4,
        }
        .min(k);
        let mut chosen: Vec<usize> = Vec::with_capacity(wanted);
        for _ in 0..wanted * 8 {
            if chosen.len() == wanted {
                break;
            }
            let i = r.random_range(0..k);
            if chosen.contains(&i)
                || (ctx.providers[i].kind == Kind::Endo && !person.diabetic && k > 1)
            {
                continue;
            }
            chosen.push(i);
        }
        if chosen.is_empty() {
            chosen.push(r.random_range(0..k));
        }
        for pi in chosen {
            let ids = if ctx.providers[pi].layout == Layout::FhirNdjson {
                vec![lab_records(ctx, &person, pi, &mut r, &mut b.rows[pi])]
            } else {
                person_records(ctx, &person, pi, &mut r, &mut b.rows[pi])
            };
            for spid in ids {
                b.truth.push((pi, spid, p));
            }
        }
        b.persons.push(person);
    }
    b
}

/// Writes one person's records at one CSV provider (FHIR laboratories go
/// through `lab_records`); returns the provider's patient ids (two for a
/// duplicate registration, the first holding the facts).
fn person_records(
    ctx: &Ctx,
    p: &Person,
    pi: usize,
    r: &mut ChaCha8Rng,
    files: &mut Files,
) -> Vec<String> {
    let prov = &ctx.providers[pi];
    let spid = format!("{}{:07}", prov.prefix, p.id + 1);
    let demographics = demographics(ctx, p, r);
    let fields = patient_fields(ctx, p, prov, &spid, demographics, r);
    let (fate, duplicate_id) = write_patient(ctx, &spid, fields, prov.layout, r, files);

    let mut facts: Files = Default::default();
    let visits = visit_records(ctx, p, prov, &spid, r, &mut facts);
    if p.eye_exam && prov.kind != Kind::Hospital {
        eye_exam(ctx, &spid, prov.layout, r, &mut facts);
    }

    // Preventive and hospital care draw from their own stream, so adding
    // them left every other row of a seed as it was.
    let mut c = rng_for(ctx.opts.seed, p.id, 16 + pi as u64);
    let care = care::records(ctx, p, pi, &spid, &visits, &mut c);
    emit_facts(ctx, facts, fate, prov.layout, r, files);
    emit_facts(ctx, care, fate, prov.layout, &mut c, files);
    std::iter::once(spid).chain(duplicate_id).collect()
}

/// A person as one provider recorded them: the true attributes with this
/// provider's noise.
struct Demographics {
    given: String,
    family: String,
    birth: NaiveDate,
    /// The provider recorded no birth date (hard noise).
    no_birth: bool,
    street: String,
    place: usize,
    zip: String,
}

impl Demographics {
    /// The birth date as the layout writes it; empty when not recorded.
    fn birth_text(&self, ctx: &Ctx, layout: Layout) -> String {
        if self.no_birth {
            String::new()
        } else if layout == Layout::EmrA {
            ctx.date(self.birth, layout)
        } else {
            self.birth.format("%Y%m%d").to_string()
        }
    }
}

/// Draws one provider's noise on the person's name, birth date and address:
/// the classic noise, then (when asked for) the hard noise.
fn demographics(ctx: &Ctx, p: &Person, r: &mut ChaCha8Rng) -> Demographics {
    let year = ctx.opts.year;
    let mut given = p.given.to_string();
    if r.random_bool(0.08)
        && let Some((_, nick)) = NICKNAMES.iter().find(|(full, _)| *full == p.given)
    {
        given = nick.to_string();
    } else if r.random_bool(0.02) {
        given = typo(r, &given);
    }
    let mut family = p.family.clone();
    let age = year - p.birth.year();
    if p.female && (20..60).contains(&age) && r.random_bool(0.05) {
        family = SURNAMES.pick(r).to_string(); // married-name change
    } else if r.random_bool(0.04) {
        family = typo(r, &family);
    }
    let mut birth = p.birth;
    // (Only for people born before the data window: a swap must not move a
    // birth after one of their visits.)
    if r.random_bool(0.015)
        && birth.year() < year - 1
        && birth.day() <= 12
        && birth.day() != birth.month()
        && let Some(swapped) = NaiveDate::from_ymd_opt(birth.year(), birth.day(), birth.month())
    {
        birth = swapped;
    }
    let (mut street, mut place, mut zip) = (p.street.clone(), p.place, p.zip.clone());
    if r.random_bool(0.10) {
        street = format!(
            "{} {} {}",
            r.random_range(1..9999),
            pick(r, &STREETS),
            pick(r, &SUFFIXES)
        );
        place = r.random_range(0..PLACES.len());
        zip = format!("{}{:02}", PLACES[place].2, r.random_range(1..99));
    }
    if ctx.hard(r, 0.015) {
        std::mem::swap(&mut given, &mut family);
    } else if ctx.hard(r, 0.015) {
        given = given.chars().take(1).collect();
    }
    let no_birth = ctx.hard(r, 0.01);
    if ctx.hard(r, 0.10) {
        street = spell_out_suffix(street);
    }
    Demographics {
        given,
        family,
        birth,
        no_birth,
        street,
        place,
        zip,
    }
}

/// The street with its abbreviated suffix spelled out ("Oak St" → "Oak Street").
fn spell_out_suffix(street: String) -> String {
    for (short, long) in [
        (" St", " Street"),
        (" Ave", " Avenue"),
        (" Rd", " Road"),
        (" Ln", " Lane"),
    ] {
        if let Some(stem) = street.strip_suffix(short) {
            return format!("{stem}{long}");
        }
    }
    street
}

/// The fields of the person's patient row in the provider's layout.
fn patient_fields(
    ctx: &Ctx,
    p: &Person,
    prov: &Provider,
    spid: &str,
    d: Demographics,
    r: &mut ChaCha8Rng,
) -> Vec<String> {
    let phone = if r.random_bool(0.2) {
        String::new()
    } else {
        p.phone.clone()
    };
    let mrn = format!("{}{}", &prov.prefix[..1], 100_000 + p.id * 7 % 900_000);
    let birth = d.birth_text(ctx, prov.layout);
    let (city, state, _) = PLACES[d.place];
    match prov.layout {
        Layout::EmrA => {
            let email = if r.random_bool(0.4) {
                String::new()
            } else {
                format!(
                    "{}.{}{}@example.org",
                    d.given.to_lowercase(),
                    d.family.to_lowercase(),
                    p.id % 100
                )
            };
            let ssn = emr_a_ssn(ctx, p, r);
            let age = ctx.opts.year - p.birth.year();
            let insurance = if age >= 65 {
                "Medicare"
            } else if r.random_bool(0.2) {
                "Medicaid"
            } else {
                "Commercial"
            };
            vec![
                spid.into(),
                mrn,
                d.given,
                d.family,
                birth,
                if p.female { "F" } else { "M" }.into(),
                RACES[p.race].0.into(),
                if p.hispanic {
                    "Hispanic"
                } else {
                    "Not Hispanic"
                }
                .into(),
                d.street,
                city.into(),
                state.into(),
                d.zip,
                phone,
                email,
                ssn,
                insurance.into(),
            ]
        }
        Layout::HisB | Layout::FhirNdjson => vec![
            spid.into(),
            mrn,
            d.given.to_uppercase(),
            d.family.to_uppercase(),
            birth,
            if p.female { "2" } else { "1" }.into(),
            RACES[p.race].1.into(),
            if p.hispanic { "2135-2" } else { "2186-5" }.into(),
            d.street.to_uppercase(),
            city.to_uppercase(),
            state.into(),
            format!("{}-{:04}", d.zip, r.random_range(0..10000)),
            phone.replace('-', ""),
        ],
    }
}

/// The SSN as EMR-A records it: often missing, sometimes (hard noise)
/// without dashes or with spaces.
fn emr_a_ssn(ctx: &Ctx, p: &Person, r: &mut ChaCha8Rng) -> String {
    if r.random_bool(0.35) {
        String::new()
    } else if ctx.hard(r, 0.15) {
        // Other shapes of the same identifier.
        if r.random_bool(0.5) {
            p.ssn.replace('-', "")
        } else {
            p.ssn.replace('-', " ")
        }
    } else {
        p.ssn.clone()
    }
}

/// What became of a person's patient row at a provider, which decides what
/// becomes of their facts there.
#[derive(Debug, Clone, Copy)]
struct PatientFate {
    /// The patient row is rejected: every fact is rejected with it
    /// (`unknown_patient`).
    orphaned: bool,
    /// The patient is kept without a usable birth date (flagged): the facts
    /// are left clean, there being nothing to check them against.
    garbled_birth: bool,
}

/// Writes the patient row, maybe deliberately bad, and maybe a duplicate
/// registration after it; returns the row's fate and the duplicate's id.
fn write_patient(
    ctx: &Ctx,
    spid: &str,
    fields: Vec<String>,
    layout: Layout,
    r: &mut ChaCha8Rng,
    files: &mut Files,
) -> (PatientFate, Option<String>) {
    // A duplicate registration: the same person under a second id, the
    // given name mistyped, no facts of its own.
    let duplicate = ctx.hard(r, 0.02).then(|| {
        let mut fields = fields.clone();
        fields[0] = format!("{spid}D");
        fields[1] = format!("{}D", fields[1]);
        fields[2] = typo(r, &fields[2]);
        row(fields)
    });
    let mut patient = row(fields);
    let patient_rule = maybe_bad_patient(ctx, r, &mut patient, layout);
    files[PATIENTS].push(patient);
    if patient_rule == Some("duplicate_row") {
        let first = &files[PATIENTS][files[PATIENTS].len() - 1];
        let copy = Row {
            fields: first.fields.clone(),
            reject: Some("duplicate_row"),
        };
        files[PATIENTS].last_mut().expect("just pushed").reject = None;
        files[PATIENTS].push(copy);
    }
    // A birth date Ward cannot use keeps the patient (flagged, without a
    // birth date); any other bad patient row is rejected and takes all the
    // person's facts here with it.
    let garbled_birth = matches!(patient_rule, Some("unparseable_date" | "future_date"));
    if garbled_birth {
        files[PATIENTS].last_mut().expect("just pushed").reject = None;
    }
    let orphaned = matches!(patient_rule, Some(rule) if rule != "duplicate_row") && !garbled_birth;
    let duplicate_id = duplicate.map(|row| {
        let id = row.fields[0].clone();
        files[PATIENTS].push(row);
        id
    });
    (
        PatientFate {
            orphaned,
            garbled_birth,
        },
        duplicate_id,
    )
}

/// Writes the person's visits at a CSV provider into `facts`, with what
/// happens at them (vital signs, labs; diagnoses and medications at the
/// first); returns the visits for the care records.
fn visit_records(
    ctx: &Ctx,
    p: &Person,
    prov: &Provider,
    spid: &str,
    r: &mut ChaCha8Rng,
    facts: &mut Files,
) -> Vec<care::Visit> {
    let year = ctx.opts.year;
    let first_day = NaiveDate::from_ymd_opt(year - 1, 1, 1)
        .expect("valid date")
        .max(p.birth + Duration::days(1));
    let last_day = NaiveDate::from_ymd_opt(year, 12, 31).expect("valid date");
    let span = (last_day - first_day).num_days().max(1);
    let n_visits = match prov.kind {
        Kind::Clinic => r.random_range(1..=4),
        Kind::Endo => r.random_range(2..=4),
        Kind::Hospital => r.random_range(1..=2),
        Kind::Lab => unreachable!("laboratories are written by lab_records"),
    };
    let mut visits = Vec::with_capacity(n_visits);
    for v in 0..n_visits {
        let mut day = first_day + Duration::days(r.random_range(0..=span));
        if p.untested && day.year() == year {
            day = NaiveDate::from_ymd_opt(year - 1, day.month(), day.day().min(28))
                .expect("valid")
                .max(first_day);
        }
        let start_min = r.random_range(7 * 60..18 * 60);
        let eid = format!("{}E{:08}{}", prov.prefix, p.id + 1, v);
        let class = match prov.kind {
            Kind::Hospital => pick(r, &["EMER", "EMER", "IMP", "AMB"]),
            _ => "AMB",
        };
        let visit = care::Visit {
            id: eid,
            day,
            start_min,
            minutes: 0,
            class,
        };
        let (fields, minutes) = encounter_fields(ctx, prov.layout, spid, &visit, r);
        facts[ENCOUNTERS].push(row(fields));
        let mut rows = VisitRows {
            ctx,
            p,
            layout: prov.layout,
            spid,
            eid: &visit.id,
            day,
            at: ctx.time(day, start_min + 20, prov.layout),
            facts,
        };
        rows.vitals_and_labs(prov.kind, r);
        if v == 0 {
            rows.diagnoses(r);
            rows.medications(r);
        }
        visits.push(care::Visit { minutes, ..visit });
    }
    visits
}

/// The encounter row of a visit, and the visit's length in minutes (0 for
/// EMR-A, which records only the start).
fn encounter_fields(
    ctx: &Ctx,
    layout: Layout,
    spid: &str,
    visit: &care::Visit,
    r: &mut ChaCha8Rng,
) -> (Vec<String>, i64) {
    let (day, start_min, class) = (visit.day, visit.start_min, visit.class);
    match layout {
        Layout::EmrA => (
            vec![
                visit.id.clone(),
                spid.into(),
                ctx.time(day, start_min, layout),
                if r.random_bool(0.1) {
                    "Telehealth"
                } else {
                    "Office Visit"
                }
                .into(),
                pick(r, &["99213", "99214", "99203", "99396"]).into(),
                "completed".into(),
            ],
            0,
        ),
        Layout::HisB | Layout::FhirNdjson => {
            let stay = if class == "IMP" {
                r.random_range(1440..7200)
            } else {
                r.random_range(60..600)
            };
            let code = match class {
                "IMP" => "32485007", // Hospital admission
                "EMER" => "4525004", // Emergency department patient visit
                _ => "185345009",    // Encounter for symptom
            };
            (
                vec![
                    visit.id.clone(),
                    spid.into(),
                    ctx.time(day, start_min, layout),
                    ctx.time(day, start_min + stay, layout),
                    class.into(),
                    pick(r, &["home", "home", "skilled-nursing", "hospice"]).into(),
                    code.into(),
                ],
                stay,
            )
        }
    }
}

/// Row writers of one visit of a person at a CSV provider.
struct VisitRows<'a> {
    ctx: &'a Ctx<'a>,
    p: &'a Person,
    layout: Layout,
    spid: &'a str,
    eid: &'a str,
    day: NaiveDate,
    /// When results are taken: 20 minutes into the visit.
    at: String,
    facts: &'a mut Files,
}

impl VisitRows<'_> {
    /// A result row (results.csv, lab.csv).
    fn obs(&mut self, code: &str, name: &str, value: String, unit: &str) {
        let n = self.facts[OBSERVATIONS].len();
        let fields = match self.layout {
            Layout::EmrA => vec![
                format!("{}R{n}", self.eid),
                self.spid.into(),
                self.eid.into(),
                self.at.clone(),
                code.into(),
                name.into(),
                value,
                unit.into(),
            ],
            Layout::HisB | Layout::FhirNdjson => vec![
                self.spid.into(),
                self.eid.into(),
                self.at.clone(),
                code.into(),
                value,
                unit.into(),
            ],
        };
        self.facts[OBSERVATIONS].push(row(fields));
    }

    /// Blood pressure of adults, HbA1c and, for diabetics, glucose.
    fn vitals_and_labs(&mut self, kind: Kind, r: &mut ChaCha8Rng) {
        let p = self.p;
        let adult = self.day.year() - p.birth.year() >= 18;
        let bp_prob = if kind == Kind::Hospital { 1.0 } else { 0.9 };
        if adult && r.random_bool(bp_prob) {
            self.blood_pressure(r);
        }
        let a1c_prob = match (p.diabetic, kind) {
            (true, Kind::Endo) => 0.9,
            (true, Kind::Clinic) => 0.6,
            (true, Kind::Hospital) => 0.4,
            (false, _) if adult => 0.08,
            _ => 0.0,
        };
        if r.random_bool(a1c_prob) {
            self.a1c(r);
        }
        if p.diabetic && r.random_bool(0.3) {
            self.glucose(r);
        }
    }

    /// A systolic and a diastolic reading, higher for the hypertensive.
    fn blood_pressure(&mut self, r: &mut ChaCha8Rng) {
        let (s, d) = if self.p.hypertensive {
            (normal(r, 138.0, 14.0), normal(r, 86.0, 9.0))
        } else {
            (normal(r, 118.0, 10.0), normal(r, 76.0, 7.0))
        };
        let unit = if self.layout == Layout::EmrA {
            "mmHg"
        } else {
            "mm[Hg]"
        };
        let systolic = format!("{}", s.round().clamp(80.0, 240.0));
        self.obs("8480-6", "Systolic blood pressure", systolic, unit);
        let diastolic = format!("{}", d.round().clamp(40.0, 140.0));
        self.obs("8462-4", "Diastolic blood pressure", diastolic, unit);
    }

    /// An HbA1c around the person's mean: in % (EMR-A) or mmol/mol (HIS-B).
    fn a1c(&mut self, r: &mut ChaCha8Rng) {
        let pct = if self.p.diabetic {
            normal(r, self.p.a1c_mean, 0.4)
        } else {
            normal(r, 5.4, 0.35)
        }
        .clamp(4.0, 15.0);
        match self.layout {
            Layout::EmrA => self.obs("4548-4", "Hemoglobin A1c", format!("{:.1}", pct), "%"),
            Layout::HisB | Layout::FhirNdjson => self.obs(
                "59261-8",
                "Hemoglobin A1c IFCC",
                format!("{:.0}", (pct - 2.152) / 0.09148),
                "mmol/mol",
            ),
        }
    }

    /// A glucose: in mg/dL (EMR-A) or mmol/L (HIS-B).
    fn glucose(&mut self, r: &mut ChaCha8Rng) {
        let mg_dl = normal(r, 8.0 * GLUCOSE_MG_PER_MMOL, 40.0).clamp(60.0, 450.0);
        match self.layout {
            Layout::EmrA => self.obs("2345-7", "Glucose", format!("{mg_dl:.0}"), "mg/dL"),
            Layout::HisB | Layout::FhirNdjson => self.obs(
                "2345-7",
                "Glucose",
                format!("{:.1}", mg_dl / GLUCOSE_MG_PER_MMOL),
                "mmol/L",
            ),
        }
    }

    /// A problem row (problems.csv, dx.csv) with an onset up to
    /// `years_before` the visit.
    fn diagnose(
        &mut self,
        code: &str,
        icd_hisb: &str,
        snomed: &str,
        name: &str,
        years_before: i64,
        r: &mut ChaCha8Rng,
    ) {
        let onset = (self.day - Duration::days(r.random_range(0..=years_before * 365)))
            .max(self.p.birth + Duration::days(1));
        let mut description = name.to_string();
        if r.random_bool(0.03) {
            description.push_str("\nfollow-up advised");
        }
        let fields = match self.layout {
            Layout::EmrA => vec![
                self.spid.into(),
                self.eid.into(),
                code.into(),
                description,
                self.ctx.date(onset, self.layout),
                String::new(),
                "active".into(),
            ],
            Layout::HisB | Layout::FhirNdjson => vec![
                self.spid.into(),
                self.eid.into(),
                icd_hisb.into(),
                snomed.into(),
                self.ctx.date(onset, self.layout),
            ],
        };
        self.facts[CONDITIONS].push(row(fields));
    }

    /// Diabetes and hypertension, as most of the people who have them are
    /// diagnosed.
    fn diagnoses(&mut self, r: &mut ChaCha8Rng) {
        if self.p.diabetic && r.random_bool(0.92) {
            let (icd, undotted) = pick(
                r,
                &[
                    ("E11.9", "E119"),
                    ("E11.65", "E1165"),
                    ("E11.9", "E119"),
                    ("E10.9", "E109"),
                ],
            );
            let snomed = if icd.starts_with("E10") {
                "46635009"
            } else {
                "44054006"
            };
            self.diagnose(icd, undotted, snomed, "Diabetes mellitus", 10, r);
        }
        if self.p.hypertensive && r.random_bool(0.9) {
            self.diagnose("I10", "I10", "38341003", "Essential hypertension", 15, r);
        }
    }

    /// A medication row (medications.csv, med.csv), started up to about
    /// four years before the visit.
    fn med(&mut self, code: &str, name: &str, r: &mut ChaCha8Rng) {
        let start = (self.day - Duration::days(r.random_range(0..1500)))
            .max(self.p.birth + Duration::days(1));
        let start = self.ctx.date(start, self.layout);
        let fields = match self.layout {
            Layout::EmrA => vec![
                self.spid.into(),
                code.into(),
                name.into(),
                start,
                String::new(),
                "active".into(),
            ],
            Layout::HisB | Layout::FhirNdjson => vec![
                self.spid.into(),
                self.eid.into(),
                code.into(),
                name.into(),
                start,
                String::new(),
                "active".into(),
            ],
        };
        self.facts[MEDICATIONS].push(row(fields));
    }

    /// Metformin and insulin for diabetics, lisinopril for the hypertensive.
    fn medications(&mut self, r: &mut ChaCha8Rng) {
        if self.p.diabetic && r.random_bool(0.7) {
            let name = "metformin 500 MG Extended Release Oral Tablet";
            self.med("860975", name, r);
        }
        if self.p.diabetic && r.random_bool(0.2) {
            let name = "insulin glargine 100 UNT/ML Injectable Solution";
            self.med("311041", name, r);
        }
        if self.p.hypertensive && r.random_bool(0.6) {
            self.med("314076", "lisinopril 10 MG Oral Tablet", r);
        }
    }
}

/// A diabetic's eye exam in the measurement period, as a procedure row.
fn eye_exam(ctx: &Ctx, spid: &str, layout: Layout, r: &mut ChaCha8Rng, facts: &mut Files) {
    let day = NaiveDate::from_ymd_opt(
        ctx.opts.year,
        r.random_range(1..=12),
        r.random_range(1..=28),
    )
    .expect("valid date");
    // Coded as EMRs code the exam itself (SNOMED CT, in the eCQM "Retinal
    // or Dilated Eye Exam" value set), sometimes with the CPT II report code.
    let (system, code, name) = pick(
        r,
        &[
            ("SNOMED", "722161008", "Diabetic retinal eye exam"),
            ("SNOMED", "314971001", "Camera fundoscopy"),
            ("SNOMED", "410453006", "Binocular indirect ophthalmoscopy"),
            ("CPT", "2022F", "Dilated retinal eye exam, interpreted"),
        ],
    );
    facts[PROCEDURES].push(row(vec![
        spid.into(),
        String::new(),
        ctx.date(day, layout),
        system.into(),
        code.into(),
        name.into(),
    ]));
}

/// Moves a person's fact rows into the provider's files: rejected with an
/// orphaned patient, left clean with a garbled birth date, else maybe
/// deliberately bad (a bad duplicate is written twice).
fn emit_facts(
    ctx: &Ctx,
    facts: Files,
    fate: PatientFate,
    layout: Layout,
    r: &mut ChaCha8Rng,
    files: &mut Files,
) {
    for (slot, rows) in facts.into_iter().enumerate().skip(1) {
        for mut fact in rows {
            if fate.orphaned || fate.garbled_birth {
                // Facts of a patient without a usable birth date are left
                // clean (nothing to check them against).
                fact.reject = fate.orphaned.then_some("unknown_patient");
                files[slot].push(fact);
                continue;
            }
            let rule = maybe_bad_fact(ctx, r, &mut fact, slot, layout);
            let duplicate = rule == Some("duplicate_row");
            if duplicate {
                fact.reject = None;
            }
            let copy = duplicate.then(|| Row {
                fields: fact.fields.clone(),
                reject: Some("duplicate_row"),
            });
            files[slot].push(fact);
            files[slot].extend(copy);
        }
    }
}

/// A reference laboratory's records of one person, as FHIR NDJSON lines:
/// the Patient and HbA1c / glucose Observations. Returns the patient id.
fn lab_records(ctx: &Ctx, p: &Person, pi: usize, r: &mut ChaCha8Rng, files: &mut Files) -> String {
    let prov = &ctx.providers[pi];
    let year = ctx.opts.year;
    let spid = format!("{}{:07}", prov.prefix, p.id + 1);
    let fate = write_lab_patient(ctx, lab_patient(p, &spid), r, files);

    let adult = year - p.birth.year() >= 18;
    let tests = match (p.diabetic, adult) {
        (true, _) => r.random_range(1..=3),
        (false, true) if r.random_bool(0.1) => 1,
        _ => 0,
    };
    let first_day = NaiveDate::from_ymd_opt(year - 1, 1, 1)
        .expect("valid date")
        .max(p.birth + Duration::days(1));
    let last_day = NaiveDate::from_ymd_opt(if p.untested { year - 1 } else { year }, 12, 31)
        .expect("valid date");
    for n in 0..tests {
        if last_day <= first_day {
            break;
        }
        let day = first_day + Duration::days(r.random_range(0..(last_day - first_day).num_days()));
        let (mut obs, glucose) = lab_observation(p, &spid, n, day, r);
        if fate.orphaned || fate.garbled_birth {
            files[OBSERVATIONS].push(Row {
                fields: vec![obs.to_string()],
                reject: fate.orphaned.then_some("unknown_patient"),
            });
            continue;
        }
        let rule = maybe_bad_lab_observation(ctx, r, &mut obs, glucose);
        let text = if rule == Some("not_json") {
            format!("{{\"resourceType\": \"Observation\", \"id\": \"{spid}-o{n}\"")
        } else {
            obs.to_string()
        };
        if rule == Some("duplicate_row") {
            files[OBSERVATIONS].push(row(vec![text.clone()]));
        }
        files[OBSERVATIONS].push(Row {
            fields: vec![text],
            reject: rule,
        });
    }
    spid
}

/// The person's FHIR Patient resource at a laboratory (no noise).
fn lab_patient(p: &Person, spid: &str) -> serde_json::Value {
    let (city, state, _) = PLACES[p.place];
    serde_json::json!({
        "resourceType": "Patient",
        "id": spid,
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                        "value": format!("L{}", 500_000 + p.id)}],
        "name": [{"use": "official", "family": p.family, "given": [p.given]}],
        "gender": if p.female { "female" } else { "male" },
        "birthDate": p.birth.to_string(),
        "address": [{"line": [p.street], "city": city, "state": state, "postalCode": p.zip}],
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
             "extension": [{"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": RACES[p.race].1}}]},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
             "extension": [{"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                                  "code": if p.hispanic { "2135-2" } else { "2186-5" }}}]}
        ]
    })
}

/// Writes the laboratory's Patient line, maybe deliberately bad (a missing
/// or unusable birth date keeps the patient, flagged); returns its fate.
fn write_lab_patient(
    ctx: &Ctx,
    mut patient: serde_json::Value,
    r: &mut ChaCha8Rng,
    files: &mut Files,
) -> PatientFate {
    let mut patient_rule = None;
    if r.random_bool(ctx.opts.bad_rate) {
        let rule = pick(r, &["unparseable_date", "required", "duplicate_row"]);
        match rule {
            "unparseable_date" => patient["birthDate"] = serde_json::json!("1970-13-45"),
            "required" => patient
                .as_object_mut()
                .expect("object")
                .remove("birthDate")
                .map(drop)
                .unwrap_or(()),
            _ => {}
        }
        patient_rule = Some(rule);
    }
    let line = patient.to_string();
    let garbled_birth = matches!(patient_rule, Some("unparseable_date" | "required"));
    if garbled_birth {
        patient_rule = None;
    }
    match patient_rule {
        Some("duplicate_row") => {
            files[PATIENTS].push(row(vec![line.clone()]));
            files[PATIENTS].push(Row {
                fields: vec![line],
                reject: Some("duplicate_row"),
            });
        }
        rule => files[PATIENTS].push(Row {
            fields: vec![line],
            reject: rule,
        }),
    }
    PatientFate {
        orphaned: matches!(patient_rule, Some(rule) if rule != "duplicate_row"),
        garbled_birth,
    }
}

/// The `n`th laboratory Observation of the person, on `day`: a glucose
/// (some diabetics) or an HbA1c. Returns it and whether it is a glucose.
fn lab_observation(
    p: &Person,
    spid: &str,
    n: u32,
    day: NaiveDate,
    r: &mut ChaCha8Rng,
) -> (serde_json::Value, bool) {
    let glucose = p.diabetic && r.random_bool(0.3);
    let (code, value, unit) = if glucose {
        (
            "2345-7",
            format!(
                "{:.0}",
                normal(r, 8.0 * GLUCOSE_MG_PER_MMOL, 40.0).clamp(60.0, 450.0)
            ),
            "mg/dL",
        )
    } else {
        let pct = if p.diabetic {
            normal(r, p.a1c_mean, 0.4)
        } else {
            normal(r, 5.4, 0.35)
        }
        .clamp(4.0, 15.0);
        ("4548-4", format!("{pct:.1}"), "%")
    };
    let obs = serde_json::json!({
        "resourceType": "Observation",
        "id": format!("{spid}-o{n}"),
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{spid}")},
        "effectiveDateTime": format!("{day}T08:{:02}:00Z", r.random_range(0..60)),
        "valueQuantity": {"value": value.parse::<f64>().expect("number"), "unit": unit, "system": "http://unitsofmeasure.org"}
    });
    (obs, glucose)
}

/// Maybe corrupts a laboratory Observation; returns the rule it must be
/// rejected with (`not_json` and `duplicate_row` are left to the writer).
fn maybe_bad_lab_observation(
    ctx: &Ctx,
    r: &mut ChaCha8Rng,
    obs: &mut serde_json::Value,
    glucose: bool,
) -> Option<&'static str> {
    use serde_json::json;
    if !r.random_bool(ctx.opts.bad_rate) {
        return None;
    }
    let chosen = pick(
        r,
        &[
            "not_json",
            "missing_subject",
            "unknown_patient",
            "unparseable_date",
            "implausible_value",
            "malformed_code",
            "duplicate_row",
        ],
    );
    match chosen {
        "missing_subject" => drop(obs.as_object_mut().expect("object").remove("subject")),
        "unknown_patient" => {
            obs["subject"]["reference"] =
                json!(format!("Patient/ZZ{}", r.random_range(0..u32::MAX)))
        }
        "unparseable_date" => obs["effectiveDateTime"] = json!(format!("{}-31-31", ctx.opts.year)),
        "implausible_value" => {
            obs["valueQuantity"]["value"] = json!(if glucose { 5000.0 } else { 25.0 })
        }
        "malformed_code" => {
            obs["code"]["coding"][0]["code"] = json!(if glucose { "2345-6" } else { "4548-3" })
        }
        _ => {}
    }
    Some(chosen)
}

fn typo(r: &mut impl Rng, s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    if chars.len() < 3 {
        return s.to_string();
    }
    let i = r.random_range(1..chars.len() - 1);
    match r.random_range(0..3) {
        0 => chars.swap(i, i + 1),
        1 => {
            chars.remove(i);
        }
        _ => chars[i] = (b'a' + r.random_range(0..26u8)) as char,
    }
    chars.into_iter().collect()
}

/// Maybe corrupts a patient row; returns the rule it must be rejected with.
fn maybe_bad_patient(
    ctx: &Ctx,
    r: &mut impl Rng,
    row: &mut Row,
    layout: Layout,
) -> Option<&'static str> {
    if !r.random_bool(ctx.opts.bad_rate) {
        return None;
    }
    let rule = pick(
        r,
        &[
            "unparseable_date",
            "future_date",
            "wrong_field_count",
            "duplicate_row",
            "required",
        ],
    );
    match rule {
        "unparseable_date" => row.fields[4] = "31/31/1970".into(),
        "future_date" => {
            row.fields[4] = if layout == Layout::EmrA {
                "01/01/2099".into()
            } else {
                "20990101".into()
            }
        }
        "wrong_field_count" => row.fields.push("surplus".into()),
        "required" => row.fields[0] = String::new(),
        _ => {}
    }
    row.reject = Some(rule);
    Some(rule)
}

/// Maybe corrupts a fact row; returns the rule it must be rejected with.
fn maybe_bad_fact(
    ctx: &Ctx,
    r: &mut impl Rng,
    row: &mut Row,
    slot: usize,
    layout: Layout,
) -> Option<&'static str> {
    if !r.random_bool(ctx.opts.bad_rate) {
        return None;
    }
    // Column of the patient id, the main date, and the code, per layout and file.
    let (pid, date, code): (usize, usize, Option<usize>) = match (layout, slot) {
        (Layout::EmrA, ENCOUNTERS) => (1, 2, None),
        (Layout::EmrA, CONDITIONS) => (0, 4, Some(2)),
        (Layout::EmrA, OBSERVATIONS) => (1, 3, Some(4)),
        (Layout::EmrA, MEDICATIONS) => (0, 3, Some(1)),
        (Layout::EmrA, PROCEDURES) => (0, 2, Some(4)),
        (Layout::HisB | Layout::FhirNdjson, ENCOUNTERS) => (1, 2, None),
        (Layout::HisB | Layout::FhirNdjson, CONDITIONS) => (0, 4, Some(2)),
        (Layout::HisB | Layout::FhirNdjson, OBSERVATIONS) => (0, 2, Some(3)),
        (Layout::HisB | Layout::FhirNdjson, MEDICATIONS) => (0, 4, Some(2)),
        (Layout::HisB | Layout::FhirNdjson, PROCEDURES) => (0, 2, Some(4)),
        (Layout::EmrA, ASSESSMENTS) => (1, 3, Some(5)),
        (Layout::EmrA, REFERRALS | LETTERS) => (1, 3, Some(4)),
        (Layout::EmrA, PROBLEM_LIST) => (0, 3, Some(1)),
        (Layout::HisB, ADMINISTRATIONS) => (1, 3, Some(4)),
        _ => unreachable!("fact slots of the layout only"),
    };
    let mut rules = vec![
        "unparseable_date",
        "future_date",
        "before_birth",
        "duplicate_row",
        "unknown_patient",
        "wrong_field_count",
    ];
    if code.is_some() && !(layout == Layout::HisB && slot == PROCEDURES) {
        rules.extend(["malformed_code", "required"]);
    }
    let value_col = match (layout, slot) {
        (Layout::EmrA, OBSERVATIONS) => Some(6),
        (Layout::HisB | Layout::FhirNdjson, OBSERVATIONS) => Some(4),
        _ => None,
    };
    if let Some(v) = value_col {
        // Only the results ingest checks for plausibility.
        if let Some(c) = code
            && ["8480-6", "8462-4", "59261-8", "4548-4", "2345-7"].contains(&row.fields[c].as_str())
            && !row.fields[v].is_empty()
        {
            rules.push("implausible_value");
        }
        if layout == Layout::EmrA {
            rules.push("unparseable_number");
        }
    }
    let rule = pick(r, &rules);
    let date_only = matches!(
        (layout, slot),
        (
            Layout::EmrA,
            CONDITIONS | MEDICATIONS | PROCEDURES | PROBLEM_LIST
        ) | (Layout::HisB | Layout::FhirNdjson, CONDITIONS | MEDICATIONS)
    );
    let fmt = |d: NaiveDate| -> String {
        match (layout, date_only) {
            (Layout::EmrA, true) => d.format("%m/%d/%Y").to_string(),
            (Layout::EmrA, false) => d.format("%m/%d/%Y 10:00").to_string(),
            (Layout::HisB | Layout::FhirNdjson, true) => d.format("%Y-%m-%d").to_string(),
            (Layout::HisB | Layout::FhirNdjson, false) => d.format("%Y-%m-%dT10:00:00").to_string(),
        }
    };
    match rule {
        "unparseable_date" => row.fields[date] = "2025-31-31x".into(),
        "future_date" => {
            row.fields[date] = fmt(NaiveDate::from_ymd_opt(2099, 1, 1).expect("valid"))
        }
        "before_birth" => {
            row.fields[date] = fmt(NaiveDate::from_ymd_opt(1901, 1, 1).expect("valid"));
            if layout == Layout::HisB && slot == ENCOUNTERS {
                row.fields[3] = fmt(NaiveDate::from_ymd_opt(1901, 1, 2).expect("valid"));
            }
        }
        "unknown_patient" => row.fields[pid] = format!("ZZ{}", r.random_range(0..u32::MAX)),
        "wrong_field_count" => row.fields.push("surplus".into()),
        "malformed_code" => {
            let c = code.expect("coded file");
            row.fields[c] = if slot == OBSERVATIONS {
                "4548-3".into()
            } else {
                "X".into()
            };
        }
        "required" => {
            let c = code.expect("coded file");
            row.fields[c] = String::new();
            if layout == Layout::HisB && slot == CONDITIONS {
                row.fields[3] = String::new(); // the SNOMED coding would stand in for it
            }
        }
        "implausible_value" => {
            let v = value_col.expect("observation");
            let c = code.expect("coded");
            row.fields[v] = match row.fields[c].as_str() {
                "8480-6" => "400".into(),
                "8462-4" => "250".into(),
                "59261-8" => "300".into(),
                "2345-7" => "5000".into(),
                _ => "25.0".into(),
            };
        }
        "unparseable_number" => row.fields[value_col.expect("observation")] = "n/a".into(),
        _ => {}
    }
    row.reject = Some(rule);
    Some(rule)
}

/// One open output file.
struct Out {
    writer: BufWriter<fs::File>,
    /// The line the next record starts on.
    line: u64,
    name: String,
}

/// The error of an I/O `action` on `path`, for `map_err`.
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SynthError {
    let path = path.to_path_buf();
    move |e| SynthError::Io {
        action,
        path: path.to_path_buf(),
        source: e,
    }
}

/// Generates the population described by `opts` under `opts.out`, calling
/// `progress` with the number of persons written as each block is done.
pub fn synth(opts: &SynthOptions, progress: &dyn Fn(u64)) -> Result<SynthReport> {
    check_options(opts)?;
    let providers = providers(opts.providers);
    let out = &opts.out;
    write_mappings(out)?;
    let mut config = config_header(opts);
    let mut outs: Vec<Vec<Option<Out>>> = Vec::new();
    for prov in &providers {
        config.push_str(&format!(
            "\n[[sources]]\nname = \"{}\"\n{}",
            prov.name,
            prov.layout.source_config(&prov.name)
        ));
        outs.push(open_provider_files(prov, out)?);
    }
    let config_path = out.join("ward.toml");
    fs::write(&config_path, config).map_err(io_error("cannot write", &config_path))?;
    let mut sidecars = Sidecars::create(out)?;

    const BLOCK: u64 = 2048;
    const WINDOW: u64 = 32;
    let ctx = Ctx {
        opts,
        providers: &providers,
    };
    let mut report = SynthReport {
        persons: opts.patients,
        ..Default::default()
    };
    let blocks = opts.patients.div_ceil(BLOCK);
    let mut buf = Vec::new();
    for window in (0..blocks).step_by(WINDOW as usize) {
        let generated: Vec<Block> = (window..(window + WINDOW).min(blocks))
            .into_par_iter()
            .map(|b| block(&ctx, b * BLOCK, ((b + 1) * BLOCK).min(opts.patients)))
            .collect();
        for b in generated {
            write_rows(
                &ctx,
                b.rows,
                &mut outs,
                &mut sidecars,
                &mut buf,
                &mut report,
            )?;
            sidecars.write_truth(&providers, &b.truth)?;
            report.source_patients += b.truth.len() as u64;
            sidecars.write_persons(&b.persons)?;
            progress(b.persons.len() as u64);
        }
    }
    for o in outs.iter_mut().flatten().flatten() {
        o.writer.flush().map_err(io_error("cannot write", out))?;
    }
    sidecars.flush()?;
    Ok(report)
}

/// Refuses options that describe no population.
fn check_options(opts: &SynthOptions) -> Result<()> {
    if opts.providers == 0 || opts.patients == 0 || !(0.0..=0.5).contains(&opts.bad_rate) {
        return Err(SynthError::Options(
            "synth needs patients ≥ 1, providers ≥ 1 and 0 ≤ bad-rate ≤ 0.5".into(),
        ));
    }
    Ok(())
}

/// Writes the sample mappings to `out/mappings/`.
fn write_mappings(out: &Path) -> Result<()> {
    fs::create_dir_all(out.join("mappings")).map_err(io_error("cannot create", out))?;
    for (name, text) in [
        ("emr_a.toml", EMR_A_MAPPING),
        ("hospital_b.toml", HIS_B_MAPPING),
    ] {
        let p = out.join("mappings").join(name);
        fs::write(&p, text).map_err(io_error("cannot write", &p))?;
    }
    Ok(())
}

/// The generated ward.toml up to its sources.
fn config_header(opts: &SynthOptions) -> String {
    format!(
        "# Generated by: ward synth --patients {} --providers {} --seed {} --bad-rate {} --year {}\n\
         warehouse = \"../warehouse\"\nmeasurement_period = {{ start = {y}-01-01, end = {y}-12-31 }}\n\n\
         [ingest]\nas_of = {}-01-31\n\n\
         [deid]\ndemo_key = true   # public demo key: sample data only; real data needs key_file or key_env\n",
        opts.patients,
        opts.providers,
        opts.seed,
        opts.bad_rate,
        opts.year,
        opts.year + 1,
        y = opts.year
    )
}

/// Creates the provider's folder and its files, per slot (None for slots
/// the layout has no file for), each with its BOM and header.
fn open_provider_files(prov: &Provider, out: &Path) -> Result<Vec<Option<Out>>> {
    let dir = out.join(&prov.name);
    fs::create_dir_all(&dir).map_err(io_error("cannot create", &dir))?;
    let mut files = Vec::new();
    for (name, header) in prov.layout.files().iter().zip(prov.layout.headers()) {
        if name.is_empty() {
            files.push(None);
            continue;
        }
        let path = dir.join(name);
        let write = |writer: &mut BufWriter<fs::File>, bytes: &[u8]| {
            writer
                .write_all(bytes)
                .map_err(io_error("cannot write", &path))
        };
        let mut writer = BufWriter::with_capacity(
            1 << 20,
            fs::File::create(&path).map_err(io_error("cannot create", &path))?,
        );
        if prov.layout == Layout::HisB {
            write(&mut writer, b"\xEF\xBB\xBF")?;
        }
        if !header.is_empty() {
            write(&mut writer, header.as_bytes())?;
            write(&mut writer, prov.layout.line_end())?;
        }
        files.push(Some(Out {
            writer,
            line: if header.is_empty() { 1 } else { 2 },
            name: name.to_string(),
        }));
    }
    Ok(files)
}

/// Writes one block's rows to the provider files, listing the bad ones in
/// `expected_rejects.csv`.
fn write_rows(
    ctx: &Ctx,
    rows: Vec<Files>,
    outs: &mut [Vec<Option<Out>>],
    sidecars: &mut Sidecars,
    buf: &mut Vec<u8>,
    report: &mut SynthReport,
) -> Result<()> {
    for (pi, files) in rows.into_iter().enumerate() {
        let layout = ctx.providers[pi].layout;
        for (slot, rows) in files.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let o = outs[pi][slot]
                .as_mut()
                .expect("rows only for the layout's files");
            buf.clear();
            for row in rows {
                if let Some(rule) = row.reject {
                    sidecars.write_reject(&ctx.providers[pi].name, o, rule)?;
                    report.expected_rejects += 1;
                }
                o.line += encode(buf, &row.fields, layout);
                report.rows += 1;
            }
            o.writer
                .write_all(buf)
                .map_err(io_error("cannot write", &ctx.opts.out))?;
        }
    }
    Ok(())
}

/// The ground-truth files beside the provider folders: `truth.csv`,
/// `persons.csv` and `expected_rejects.csv`.
struct Sidecars {
    truth: BufWriter<fs::File>,
    truth_path: PathBuf,
    persons: BufWriter<fs::File>,
    persons_path: PathBuf,
    rejects: BufWriter<fs::File>,
    rejects_path: PathBuf,
}

impl Sidecars {
    /// Creates the three files under `out`, each with its header.
    fn create(out: &Path) -> Result<Sidecars> {
        let write_csv = |path: &Path, header: &str| -> Result<BufWriter<fs::File>> {
            let file = fs::File::create(path).map_err(io_error("cannot create", path))?;
            let mut w = BufWriter::new(file);
            writeln!(w, "{header}").map_err(io_error("cannot write", path))?;
            Ok(w)
        };
        let truth_path = out.join("truth.csv");
        let persons_path = out.join("persons.csv");
        let rejects_path = out.join("expected_rejects.csv");
        Ok(Sidecars {
            truth: write_csv(&truth_path, "source,source_patient_id,person_id")?,
            persons: write_csv(
                &persons_path,
                "person_id,sex,birth_date,diabetic,hypertensive,untested_in_period,eye_exam_in_period",
            )?,
            rejects: write_csv(&rejects_path, "source,source_file,line,rule")?,
            truth_path,
            persons_path,
            rejects_path,
        })
    }

    /// Lists the row starting on `o`'s current line as one ingest must
    /// reject with `rule`.
    fn write_reject(&mut self, source: &str, o: &Out, rule: &str) -> Result<()> {
        writeln!(self.rejects, "{source},{},{},{rule}", o.name, o.line)
            .map_err(io_error("cannot write", &self.rejects_path))
    }

    /// (provider, source patient id, person id) rows of `truth.csv`.
    fn write_truth(
        &mut self,
        providers: &[Provider],
        truth: &[(usize, String, u64)],
    ) -> Result<()> {
        for (pi, spid, person) in truth {
            writeln!(self.truth, "{},{spid},{person}", providers[*pi].name)
                .map_err(io_error("cannot write", &self.truth_path))?;
        }
        Ok(())
    }

    /// The true attributes of each person, in `persons.csv`.
    fn write_persons(&mut self, persons: &[Person]) -> Result<()> {
        for p in persons {
            writeln!(
                self.persons,
                "{},{},{},{},{},{},{}",
                p.id,
                if p.female { "female" } else { "male" },
                p.birth,
                p.diabetic,
                p.hypertensive,
                p.untested,
                p.eye_exam
            )
            .map_err(io_error("cannot write", &self.persons_path))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        for (w, p) in [
            (&mut self.truth, &self.truth_path),
            (&mut self.persons, &self.persons_path),
            (&mut self.rejects, &self.rejects_path),
        ] {
            w.flush().map_err(io_error("cannot write", p))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_census_frequencies() {
        assert_eq!(SURNAMES.names.len(), 10_000);
        assert_eq!(FEMALE.names.len(), 4_275);
        assert_eq!(MALE.names.len(), 1_219);
        let mut r = ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<&str> = (0..100_000).map(|_| SURNAMES.pick(&mut r)).collect();
        let share = |name| draws.iter().filter(|d| **d == name).count() as f64 / 1e5;
        // Smith's share is its weight over the list's total (1.006 % of
        // the census, 1.4 % of the first 10,000 names' weight).
        let total: f64 = f64::from(*SURNAMES.cumulative.last().unwrap());
        assert!((share("Smith") - 1006.0 / total).abs() < 0.002);
        assert!(share("Smith") > share("Johnson"));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 5_000, "a long tail of rare names");
    }

    #[test]
    fn persons_are_deterministic_and_twins_share_a_household() {
        let a = person(7, 400, 2025);
        let b = person(7, 400, 2025);
        assert_eq!((a.given, &a.family, a.birth), (b.given, &b.family, b.birth));
        let twin = person(7, 401, 2025);
        for p in (1..40_000).step_by(200) {
            assert_ne!(person(7, p, 2025).given, person(7, p - 1, 2025).given);
        }
        assert_eq!(
            (twin.birth, &twin.family, &twin.street),
            (a.birth, &a.family, &a.street)
        );
        let other = person(8, 400, 2025);
        assert!((other.given, other.birth) != (a.given, a.birth));
    }

    #[test]
    fn prevalence_is_realistic() {
        let people: Vec<Person> = (0..20_000).map(|p| person(1, p, 2025)).collect();
        let adults: Vec<&Person> = people
            .iter()
            .filter(|p| 2025 - p.birth.year() >= 18)
            .collect();
        let dm = adults.iter().filter(|p| p.diabetic).count() as f64 / adults.len() as f64;
        assert!((0.09..0.14).contains(&dm), "adult diabetes prevalence {dm}");
        let old = adults.iter().filter(|p| 2025 - p.birth.year() >= 65);
        let (n, d) = old.fold((0, 0), |(n, d), p| (n + 1, d + p.diabetic as usize));
        assert!(d as f64 / n as f64 > dm, "prevalence rises with age");
        let diabetics: Vec<&&Person> = adults.iter().filter(|p| p.diabetic).collect();
        let poor =
            diabetics.iter().filter(|p| p.a1c_mean > 9.0).count() as f64 / diabetics.len() as f64;
        assert!((0.10..0.22).contains(&poor), "share above 9%: {poor}");
    }

    #[test]
    fn csv_encoding_quotes_and_counts_lines() {
        let mut out = Vec::new();
        let n = encode(
            &mut out,
            &["a".into(), "b,c".into(), "x\ny".into()],
            Layout::EmrA,
        );
        assert_eq!(
            (String::from_utf8(out).unwrap(), n),
            ("a,\"b,c\",\"x\ny\"\n".to_string(), 2)
        );
    }

    #[test]
    fn provider_names_are_unique() {
        let p = providers(12);
        let mut names: Vec<_> = p.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12);
        assert_eq!(p[1].layout, Layout::HisB);
    }
}
