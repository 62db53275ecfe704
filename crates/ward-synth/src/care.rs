//! Preventive and hospital care in the generated records: what the eCQMs
//! beyond diabetes look for, written the way each layout records it.
//!
//! - Clinics (EMR-A): depression screenings at visits from age 12, with a
//!   referral after most positive ones (CMS2); adult BMIs, overweight on the
//!   problem list and dietitian referrals (CMS69); children's height,
//!   weight, BMI and nutrition / activity counseling (CMS155); mammograms
//!   (CMS125); colonoscopies and FIT results (CMS130).
//! - Clinics and endocrinologists (EMR-A): for diabetics with retinopathy,
//!   an ophthalmology visit with a macular exam and, usually, a letter
//!   with the findings to the diabetes doctor (CMS142).
//! - Hospitals (HIS-B): inpatient stays with insulin administrations, the
//!   glucose checks around them and an occasional severe low (CMS816).
//!
//! Rates are plausible, not calibrated to any registry: the point is that
//! every population path of the measures occurs in a large population.

use chrono::{Datelike, Duration, NaiveDate};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{
    ADMINISTRATIONS, ASSESSMENTS, CONDITIONS, Ctx, ENCOUNTERS, Files, Kind, LETTERS, OBSERVATIONS,
    PROBLEM_LIST, PROCEDURES, Person, REFERRALS, normal, pick, rng_for, row,
};

/// One encounter written for the person at a provider.
pub(super) struct Visit {
    pub id: String,
    pub day: NaiveDate,
    /// Minutes after midnight the visit starts.
    pub start_min: i64,
    /// Length of a hospital encounter (0 for a clinic visit, which records
    /// only its start).
    pub minutes: i64,
    /// HIS-B encounter type (IMP, EMER, AMB); AMB for clinics.
    pub class: &'static str,
}

/// What the person's care looks like, the same at every provider.
struct Health {
    /// Adult body-mass index (kg/m²).
    bmi: f64,
    /// Screens positive for depression.
    depressed: bool,
    /// Has regular screening mammograms (women from 40).
    mammograms: bool,
    /// Had a colonoscopy (from 45); else maybe a yearly FIT.
    colonoscopy: bool,
    fit: bool,
    /// A diabetic with an eye exam whose retina shows retinopathy.
    retinopathy: bool,
    macular_edema: bool,
}

fn health(ctx: &Ctx, p: &Person) -> Health {
    let mut r = rng_for(ctx.opts.seed, p.id, 4);
    let age = ctx.opts.year - p.birth.year();
    let colonoscopy = age >= 45 && r.random_bool(0.55);
    Health {
        bmi: normal(&mut r, 28.5, 5.5).clamp(16.0, 55.0),
        depressed: r.random_bool(0.09),
        mammograms: p.female && age >= 40 && r.random_bool(0.7),
        colonoscopy,
        fit: age >= 45 && !colonoscopy && r.random_bool(0.3),
        retinopathy: p.eye_exam && r.random_bool(0.3),
        macular_edema: r.random_bool(0.2),
    }
}

/// Whole years from `birth` to `day`.
fn age_on(birth: NaiveDate, day: NaiveDate) -> i32 {
    day.year() - birth.year() - i32::from((day.month(), day.day()) < (birth.month(), birth.day()))
}

/// The care rows of one person at one provider, drawn from `r`.
pub(super) fn records(
    ctx: &Ctx,
    p: &Person,
    pi: usize,
    spid: &str,
    visits: &[Visit],
    r: &mut ChaCha8Rng,
) -> Files {
    let mut out = Rows {
        ctx,
        p,
        spid,
        prefix: &ctx.providers[pi].prefix,
        files: Default::default(),
    };
    let h = health(ctx, p);
    match ctx.providers[pi].kind {
        Kind::Clinic => {
            out.preventive(&h, visits, r);
            out.retinopathy(&h, r);
        }
        Kind::Endo => out.retinopathy(&h, r),
        Kind::Hospital => out.inpatient(visits, r),
        Kind::Lab => {}
    }
    out.files
}

/// Row writers of one person at one provider.
struct Rows<'a> {
    ctx: &'a Ctx<'a>,
    p: &'a Person,
    spid: &'a str,
    prefix: &'a str,
    files: Files,
}

impl Rows<'_> {
    fn year(&self) -> i32 {
        self.ctx.opts.year
    }
    /// First day of the data window: the year before the period, or birth.
    fn first_day(&self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year() - 1, 1, 1)
            .expect("valid date")
            .max(self.p.birth + Duration::days(1))
    }
    fn last_day(&self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year(), 12, 31).expect("valid date")
    }
    fn day_between(&self, r: &mut ChaCha8Rng, from: NaiveDate, to: NaiveDate) -> NaiveDate {
        from + Duration::days(r.random_range(0..=(to - from).num_days().max(0)))
    }
    fn time(&self, day: NaiveDate, minutes: i64) -> String {
        self.ctx.time(day, minutes, super::Layout::EmrA)
    }
    fn id(&self, slot: usize, tag: &str) -> String {
        format!(
            "{}{tag}{:08}-{}",
            self.prefix,
            self.p.id + 1,
            self.files[slot].len()
        )
    }

    /// A results.csv row (EMR-A).
    fn result(
        &mut self,
        visit: &str,
        at: String,
        loinc: &str,
        name: &str,
        value: String,
        unit: &str,
    ) {
        let id = self.id(OBSERVATIONS, "C");
        self.files[OBSERVATIONS].push(row(vec![
            id,
            self.spid.into(),
            visit.into(),
            at,
            loinc.into(),
            name.into(),
            value,
            unit.into(),
        ]));
    }
    /// An assessments.csv row: a questionnaire score or an exam finding.
    #[allow(clippy::too_many_arguments)]
    fn assessment(
        &mut self,
        visit: &str,
        at: String,
        category: &str,
        loinc: &str,
        name: &str,
        score: String,
        finding: &str,
    ) {
        let id = self.id(ASSESSMENTS, "Q");
        self.files[ASSESSMENTS].push(row(vec![
            id,
            self.spid.into(),
            visit.into(),
            at,
            category.into(),
            loinc.into(),
            name.into(),
            score,
            finding.into(),
        ]));
    }
    fn referral(&mut self, visit: &str, at: String, snomed: &str, description: &str) {
        let id = self.id(REFERRALS, "F");
        self.files[REFERRALS].push(row(vec![
            id,
            self.spid.into(),
            visit.into(),
            at,
            snomed.into(),
            description.into(),
            "ordered".into(),
        ]));
    }
    fn procedure(&mut self, visit: &str, day: NaiveDate, system: &str, code: &str, name: &str) {
        let date = self.ctx.date(day, super::Layout::EmrA);
        self.files[PROCEDURES].push(row(vec![
            self.spid.into(),
            visit.into(),
            date,
            system.into(),
            code.into(),
            name.into(),
        ]));
    }

    /// Screenings, vital signs, counseling and cancer screening at a clinic.
    fn preventive(&mut self, h: &Health, visits: &[Visit], r: &mut ChaCha8Rng) {
        let mut on_problem_list = false;
        for v in visits {
            let age = age_on(self.p.birth, v.day);
            let at = self.time(v.day, v.start_min);
            if age >= 12 && r.random_bool(0.55) {
                let (loinc, name) = if age < 18 {
                    ("73831-0", "Adolescent depression screening assessment")
                } else {
                    ("73832-8", "Adult depression screening assessment")
                };
                let positive = h.depressed && r.random_bool(0.8);
                let score = if positive {
                    r.random_range(10..=27)
                } else {
                    r.random_range(0..=9)
                };
                let finding = if positive {
                    "428181000124104" // Depression screening positive
                } else {
                    "428171000124102" // Depression screening negative
                };
                self.assessment(
                    &v.id,
                    at.clone(),
                    "survey",
                    loinc,
                    name,
                    score.to_string(),
                    finding,
                );
                if positive && r.random_bool(0.65) {
                    let (code, name) = pick(
                        r,
                        &[
                            ("306226009", "Referral to mental health counseling service"),
                            ("183524004", "Referral to psychiatry service"),
                        ],
                    );
                    self.referral(&v.id, at.clone(), code, name);
                }
            }
            if age >= 18 && r.random_bool(0.75) {
                let bmi = (h.bmi + normal(r, 0.0, 0.6)).clamp(14.0, 60.0);
                self.result(
                    &v.id,
                    at.clone(),
                    "39156-5",
                    "Body mass index",
                    format!("{bmi:.1}"),
                    "kg/m2",
                );
                if bmi >= 25.0 {
                    if !on_problem_list && r.random_bool(0.6) {
                        on_problem_list = true;
                        let onset = (v.day - Duration::days(r.random_range(0..700)))
                            .max(self.p.birth + Duration::days(1));
                        let (icd, name) = if bmi >= 30.0 {
                            ("E66.9", "Obesity, unspecified")
                        } else {
                            ("E66.3", "Overweight")
                        };
                        let date = self.ctx.date(onset, super::Layout::EmrA);
                        self.files[PROBLEM_LIST].push(row(vec![
                            self.spid.into(),
                            icd.into(),
                            name.into(),
                            date,
                            "active".into(),
                        ]));
                    }
                    if r.random_bool(0.45) {
                        self.referral(&v.id, at.clone(), "103699006", "Referral to dietitian");
                    }
                }
            }
            if (3..18).contains(&age) && r.random_bool(0.7) {
                let height = (75.0 + 6.0 * f64::from(age) + normal(r, 0.0, 6.0)).clamp(80.0, 200.0);
                let bmi = normal(r, 15.5 + 0.35 * f64::from(age - 3), 2.5).clamp(11.0, 40.0);
                let weight = bmi * (height / 100.0).powi(2);
                for (loinc, name, value, unit) in [
                    ("8302-2", "Body height", format!("{height:.1}"), "cm"),
                    ("29463-7", "Body weight", format!("{weight:.1}"), "kg"),
                    ("39156-5", "Body mass index", format!("{bmi:.1}"), "kg/m2"),
                ] {
                    self.result(&v.id, at.clone(), loinc, name, value, unit);
                }
                if r.random_bool(0.45) {
                    self.procedure(&v.id, v.day, "SNOMED", "11816003", "Diet education");
                }
                if r.random_bool(0.35) {
                    self.procedure(&v.id, v.day, "SNOMED", "304507003", "Exercise education");
                }
            }
        }
        let (first, last) = (self.first_day(), self.last_day());
        if h.mammograms && r.random_bool(0.85) {
            let day = self.day_between(r, first, last);
            let at = self.time(day, r.random_range(8 * 60..16 * 60));
            self.result("", at, "24606-6", "MG Breast Screening", String::new(), "");
        }
        if h.colonoscopy && r.random_bool(0.8) {
            let day = self.day_between(r, first, last);
            self.procedure("", day, "CPT", "45378", "Colonoscopy, flexible; diagnostic");
        }
        if h.fit && r.random_bool(0.8) {
            let start = NaiveDate::from_ymd_opt(self.year(), 1, 1).expect("valid date");
            let day = self.day_between(r, start.max(first), last);
            let at = self.time(day, r.random_range(8 * 60..16 * 60));
            let value = r.random_range(0..150).to_string();
            self.result(
                "",
                at,
                "58453-2",
                "Hemoglobin.gastrointestinal.lower [Mass/volume] in Stool by Immunoassay",
                value,
                "ng/mL",
            );
        }
    }

    /// An ophthalmology visit of a diabetic with retinopathy: the diagnosis,
    /// the macular exam and (usually) a letter to the diabetes doctor.
    fn retinopathy(&mut self, h: &Health, r: &mut ChaCha8Rng) {
        if !h.retinopathy || !r.random_bool(0.8) {
            return;
        }
        let year = self.year();
        let start = NaiveDate::from_ymd_opt(year, 1, 1)
            .expect("valid date")
            .max(self.first_day());
        let end = NaiveDate::from_ymd_opt(year, 12, 10).expect("valid date");
        if start > end {
            return; // born too late in the year for a visit and its letter
        }
        let day = self.day_between(r, start, end);
        let start_min = r.random_range(8 * 60..16 * 60);
        let at = self.time(day, start_min);
        let visit = format!("{}E{:08}X", self.prefix, self.p.id + 1);
        self.files[ENCOUNTERS].push(row(vec![
            visit.clone(),
            self.spid.into(),
            at.clone(),
            "Office Visit".into(),
            "92014".into(), // Ophthalmological services, established patient
            "completed".into(),
        ]));
        let (icd, name, edema_code) = if h.macular_edema {
            (
                "E11.3213",
                "Type 2 diabetes mellitus with mild nonproliferative diabetic retinopathy with macular edema, bilateral",
                "37231002", // Macular retinal edema
            )
        } else {
            (
                "E11.3293",
                "Type 2 diabetes mellitus with mild nonproliferative diabetic retinopathy without macular edema, bilateral",
                "428341000124108", // Macular edema absent
            )
        };
        let onset =
            (day - Duration::days(r.random_range(0..400))).max(self.p.birth + Duration::days(1));
        let onset = self.ctx.date(onset, super::Layout::EmrA);
        self.files[CONDITIONS].push(row(vec![
            self.spid.into(),
            visit.clone(),
            icd.into(),
            name.into(),
            onset,
            String::new(),
            "active".into(),
        ]));
        self.assessment(
            &visit,
            at,
            "exam",
            "32451-7",
            "Physical findings of Macula",
            String::new(),
            edema_code,
        );
        if r.random_bool(0.7) {
            let sent = (day + Duration::days(r.random_range(1..=14))).min(self.last_day());
            let sent = self.time(sent, 10 * 60);
            // Mild nonproliferative retinopathy due to type 2 diabetes, and
            // the macular edema finding.
            for code in ["138911000119106", edema_code] {
                let id = self.id(LETTERS, "L");
                self.files[LETTERS].push(row(vec![
                    id,
                    self.spid.into(),
                    visit.clone(),
                    sent.clone(),
                    code.into(),
                    "completed".into(),
                ]));
            }
        }
    }

    /// Insulin and glucose checks during inpatient stays (HIS-B).
    fn inpatient(&mut self, visits: &[Visit], r: &mut ChaCha8Rng) {
        let hisb = super::Layout::HisB;
        for v in visits.iter().filter(|v| v.class == "IMP") {
            let insulin = if self.p.diabetic {
                r.random_bool(0.85)
            } else {
                r.random_bool(0.1) // stress hyperglycemia
            };
            if !insulin {
                continue;
            }
            let mean = if self.p.diabetic { 9.5 } else { 7.5 };
            let discharge = v.start_min + v.minutes;
            let glucose = |rows: &mut Files, at: i64, mmol: f64| {
                rows[OBSERVATIONS].push(row(vec![
                    self.spid.into(),
                    v.id.clone(),
                    self.ctx.time(v.day, at, hisb),
                    "2345-7".into(),
                    format!("{mmol:.1}"),
                    "mmol/L".into(),
                ]));
            };
            let mut doses = Vec::new();
            let mut t = v.start_min + 120;
            while t < discharge - 30 {
                glucose(
                    &mut self.files,
                    t - 10,
                    normal(r, mean, 2.5).clamp(3.5, 22.0),
                );
                let (code, name) = pick(
                    r,
                    &[
                        ("1652639", "3 ML insulin lispro 100 UNT/ML Pen Injector"),
                        ("1604539", "1.5 ML insulin glargine 300 UNT/ML Pen Injector"),
                    ],
                );
                let given = r.random_bool(0.95);
                self.files[ADMINISTRATIONS].push(row(vec![
                    format!("{}M{}", v.id, self.files[ADMINISTRATIONS].len()),
                    self.spid.into(),
                    v.id.clone(),
                    self.ctx.time(v.day, t, hisb),
                    code.into(),
                    name.into(),
                    if given { "given" } else { "held" }.into(),
                ]));
                if given {
                    doses.push(t);
                }
                t += r.random_range(240..480);
            }
            // A severe low within a day of a dose; now and then a recheck
            // minutes later shows the first reading was wrong.
            if !doses.is_empty() && r.random_bool(0.05) {
                let low = pick(r, &doses) + r.random_range(60..1200);
                if low < discharge {
                    glucose(&mut self.files, low, r.random_range(1.6..2.2));
                    if r.random_bool(0.25) {
                        glucose(&mut self.files, low + 3, r.random_range(4.6..6.5));
                    }
                }
            }
        }
    }
}
