//! Measures: the engine's contract (scoring, errors), hand-written test
//! patients for CMS122 and CMS131 in the layout of an eCQM test deck (each
//! case's expected populations written from the measure specification, not
//! from Ward's output), the official CMS165 deck, and the measures on the
//! bundled sample.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde_json::{Value, json};
use ward::measure::Period;
use ward::measure::{self, conformance};
use ward::warehouse::Warehouse;

use crate::common::*;

const CPT: &str = "http://www.ama-assn.org/go/cpt";
const HCPCS: &str = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets";
const SNOMED: &str = "http://snomed.info/sct";
const ICD10: &str = "http://hl7.org/fhir/sid/icd-10-cm";
const LOINC: &str = "http://loinc.org";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";

fn queries() -> PathBuf {
    repo().join("queries")
}

fn period_2025() -> Period {
    Period {
        start: NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(),
        end: NaiveDate::from_ymd_opt(2025, 12, 31).unwrap(),
    }
}

fn concept(system: &str, code: &str) -> Value {
    json!({"coding": [{"system": system, "code": code}]})
}

/// One test patient: a Patient, its resources and the expected populations.
struct Case {
    name: String,
    id: String,
    resources: Vec<Value>,
    /// initial population, denominator exclusion, numerator
    expected: (u64, u64, u64),
}

impl Case {
    fn new(name: &str, birth: &str) -> Case {
        let id = format!(
            "p{:08x}",
            name.bytes()
                .fold(7u32, |h, b| h.wrapping_mul(31) ^ u32::from(b))
        );
        Case {
            name: name.into(),
            id: id.clone(),
            resources: vec![
                json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": birth}),
            ],
            expected: (0, 0, 0),
        }
    }

    fn with(mut self, mut resource: Value) -> Case {
        let n = self.resources.len();
        resource["id"] = json!(format!("{}-{n}", self.id));
        resource["subject"] = json!({"reference": format!("Patient/{}", self.id)});
        self.resources.push(resource);
        self
    }

    fn encounter(self, system: &str, code: &str, start: &str, end: &str, status: &str) -> Case {
        self.with(json!({"resourceType": "Encounter", "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [concept(system, code)], "period": {"start": start, "end": end}}))
    }

    /// A finished office visit in the period (CPT 99213).
    fn office_visit(self) -> Case {
        self.encounter(
            CPT,
            "99213",
            "2025-03-10T09:00:00",
            "2025-03-10T09:30:00",
            "finished",
        )
    }

    fn condition(self, system: &str, code: &str, onset: &str, extra: Value) -> Case {
        let mut c = json!({"resourceType": "Condition",
            "category": [concept("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis")],
            "clinicalStatus": concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
            "code": concept(system, code), "onsetDateTime": onset});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        self.with(c)
    }

    /// Type 2 diabetes (E11.9), active since 2019.
    fn diabetes(self) -> Case {
        self.condition(ICD10, "E11.9", "2019-05-01", json!({}))
    }

    fn observation(self, code: Value, effective: &str, extra: Value) -> Case {
        let mut o = json!({"resourceType": "Observation", "status": "final",
            "code": code, "effectiveDateTime": effective});
        for (k, v) in extra.as_object().unwrap() {
            o[k] = v.clone();
        }
        self.with(o)
    }

    fn hba1c(self, loinc: &str, value: Option<f64>, effective: &str, status: &str) -> Case {
        let extra = match value {
            Some(v) => {
                json!({"status": status, "valueQuantity": {"value": v, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}})
            }
            None => json!({"status": status}),
        };
        self.observation(concept(LOINC, loinc), effective, extra)
    }

    fn expect(mut self, ip: u64, denex: u64, num: u64) -> Case {
        self.expected = (ip, denex, num);
        self
    }
}

/// Writes cases as an eCQM test deck: one folder per case holding a Bundle
/// with the expected individual MeasureReport, and README.txt naming them.
/// Every other case is written as separate resource files instead, named
/// in README.txt by the short `<folder> = <name>` form (both occur in
/// exports).
fn write_deck(dir: &Path, measure_url: &str, cases: &[Case]) {
    let mut readme = String::from("Test cases\n");
    for (i, case) in cases.iter().enumerate() {
        let folder = dir.join(&case.id);
        fs::create_dir_all(&folder).unwrap();
        let (ip, denex, num) = case.expected;
        let population = |code: &str, count: u64| json!({"code": concept("http://terminology.hl7.org/CodeSystem/measure-population", code), "count": count});
        let report = json!({"resourceType": "MeasureReport", "status": "complete", "type": "individual",
            "measure": measure_url, "period": {"start": "2025-01-01", "end": "2025-12-31"},
            "group": [{"population": [
                population("initial-population", ip),
                population("denominator", ip),
                population("denominator-exclusion", denex),
                population("numerator", num)]}]});
        let entries: Vec<Value> = case
            .resources
            .iter()
            .chain(std::iter::once(&report))
            .map(|r| json!({"fullUrl": format!("http://example.org/{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap_or("report")), "resource": r}))
            .collect();
        if i % 2 == 1 {
            for (n, r) in case
                .resources
                .iter()
                .chain(std::iter::once(&report))
                .enumerate()
            {
                let name = format!("{}-{n}.json", r["resourceType"].as_str().unwrap());
                fs::write(folder.join(name), serde_json::to_vec_pretty(r).unwrap()).unwrap();
            }
            readme.push_str(&format!("{} = {}\n", case.id, case.name));
            continue;
        }
        let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
        fs::write(
            folder.join("bundle.json"),
            serde_json::to_vec_pretty(&bundle).unwrap(),
        )
        .unwrap();
        readme.push_str(&format!("Case # {} - {} = {}\n", i + 1, case.id, case.name));
    }
    fs::write(dir.join("README.txt"), readme).unwrap();
}

fn check_deck(measure_id: &str, cases: Vec<Case>) {
    let names: std::collections::BTreeSet<_> = cases.iter().map(|c| c.id.clone()).collect();
    assert_eq!(names.len(), cases.len(), "case names must be distinct");
    let tmp = tempfile::tempdir().unwrap();
    let deck = tmp.path().join("deck");
    write_deck(&deck, "urn:test", &cases);
    let outcome = check_conformance(&deck, measure_id, cases.len(), &[]);
    for c in &outcome.cases {
        assert!(
            c.rejects.is_empty(),
            "{}: resources rejected {:?}",
            c.name,
            c.rejects
        );
    }
}

#[test]
fn cms122_hand_written_patients() {
    let a1c = |name: &str| Case::new(name, "1970-06-15").office_visit().diabetes();
    let old = |name: &str| Case::new(name, "1955-03-01").office_visit().diabetes();
    let cases = vec![
        // Initial population: age at the end of the period, visit, diagnosis.
        Case::new("IPFail Age17", "2008-01-01").office_visit().diabetes().expect(0, 0, 0),
        Case::new("IPPass Age18OnLastDay", "2007-12-31").office_visit().diabetes().expect(1, 0, 1),
        Case::new("IPPass Age75", "1950-01-01").office_visit().diabetes().expect(1, 0, 1),
        Case::new("IPFail Age76OnLastDay", "1949-12-31").office_visit().diabetes().expect(0, 0, 0),
        Case::new("IPFail OnlyEmergencyVisit", "1970-06-15")
            .encounter(CPT, "99283", "2025-03-10T09:00:00", "2025-03-10T12:00:00", "finished")
            .diabetes()
            .expect(0, 0, 0),
        Case::new("IPFail VisitCancelled", "1970-06-15")
            .encounter(CPT, "99213", "2025-03-10T09:00:00", "2025-03-10T09:30:00", "cancelled")
            .diabetes()
            .expect(0, 0, 0),
        Case::new("IPFail VisitBeforePeriod", "1970-06-15")
            .encounter(CPT, "99213", "2024-12-31T09:00:00", "2024-12-31T09:30:00", "finished")
            .diabetes()
            .expect(0, 0, 0),
        Case::new("IPPass NutritionTherapyVisit", "1970-06-15")
            .encounter(CPT, "97802", "2025-05-01T09:00:00", "2025-05-01T09:30:00", "finished")
            .diabetes()
            .expect(1, 0, 1),
        Case::new("IPFail DiabetesRefuted", "1970-06-15")
            .office_visit()
            .condition(ICD10, "E11.9", "2019-05-01", json!({"verificationStatus": concept("http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted")}))
            .expect(0, 0, 0),
        Case::new("IPFail DiabetesResolvedBeforePeriod", "1970-06-15")
            .office_visit()
            .condition(ICD10, "E11.9", "2019-05-01", json!({
                "clinicalStatus": concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved"),
                "abatementDateTime": "2024-06-01"}))
            .expect(0, 0, 0),
        Case::new("IPPass DiabetesEncounterDiagnosisAmongCategories", "1970-06-15")
            .office_visit()
            .condition(ICD10, "E11.9", "2019-05-01", json!({"category": [
                concept("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item"),
                concept("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis")]}))
            .expect(1, 0, 1),
        Case::new("IPFail DiabetesOnProblemListOnly", "1970-06-15")
            .office_visit()
            .condition(ICD10, "E11.9", "2019-05-01", json!({"category": [concept("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")]}))
            .expect(0, 0, 0),
        // Numerator: the most recent assessment in the period.
        a1c("NUMERPass HbA1c9.1").hba1c("4548-4", Some(9.1), "2025-06-01", "final").expect(1, 0, 1),
        a1c("NUMERFail HbA1c9.0").hba1c("4548-4", Some(9.0), "2025-06-01", "final").expect(1, 0, 0),
        a1c("NUMERPass HbA1cWithoutResult").hba1c("4548-4", None, "2025-06-01", "final").expect(1, 0, 1),
        a1c("NUMERPass GMI9.5").hba1c("97506-0", Some(9.5), "2025-06-01", "final").expect(1, 0, 1),
        a1c("NUMERFail GMI7.0").hba1c("97506-0", Some(7.0), "2025-06-01", "final").expect(1, 0, 0),
        a1c("NUMERFail TwoOnLastDayLowest8.5")
            .hba1c("4548-4", Some(9.5), "2025-11-03T08:00:00", "final")
            .hba1c("4548-4", Some(8.5), "2025-11-03T15:00:00", "final")
            .expect(1, 0, 0),
        a1c("NUMERPass LastDayHigherThanEarlier")
            .hba1c("4548-4", Some(7.0), "2025-02-01", "final")
            .hba1c("4548-4", Some(9.4), "2025-10-01", "final")
            .expect(1, 0, 1),
        a1c("NUMERFail LaterResultControlled")
            .hba1c("4548-4", Some(9.4), "2025-02-01", "final")
            .hba1c("4548-4", Some(7.0), "2025-10-01", "final")
            .expect(1, 0, 0),
        a1c("NUMERPass ResultDayBeforePeriod").hba1c("4548-4", Some(6.0), "2024-12-31T23:00:00", "final").expect(1, 0, 1),
        a1c("NUMERPass ResultDayAfterPeriod").hba1c("4548-4", Some(6.0), "2026-01-01T00:30:00", "final").expect(1, 0, 1),
        a1c("NUMERFail ResultLastDayOfPeriod").hba1c("4548-4", Some(6.0), "2025-12-31T23:30:00", "final").expect(1, 0, 0),
        a1c("NUMERPass OnlyPreliminaryResult").hba1c("4548-4", Some(6.0), "2025-06-01", "preliminary").expect(1, 0, 1),
        a1c("NUMERPass NoAssessment").expect(1, 0, 1),
        // "without result" is `value is null`: a coded or text result on
        // the most recent day is chosen first (not a quantity: sorts
        // first) and is neither without result nor above 9 %.
        a1c("NUMERFail MostRecentCodedResult")
            .hba1c("4548-4", Some(10.0), "2025-05-01", "final")
            .observation(concept(LOINC, "4548-4"), "2025-09-01", json!({"valueCodeableConcept": concept(SNOMED, "260385009")}))
            .expect(1, 0, 0),
        a1c("NUMERFail MostRecentTextResult")
            .hba1c("4548-4", Some(10.0), "2025-05-01", "final")
            .observation(concept(LOINC, "4548-4"), "2025-09-01", json!({"valueString": "see scanned report"}))
            .expect(1, 0, 0),
        a1c("NUMERFail CodedResultBesideHighResultSameDay")
            .hba1c("4548-4", Some(9.5), "2025-09-01T08:00:00", "final")
            .observation(concept(LOINC, "4548-4"), "2025-09-01T09:00:00", json!({"valueCodeableConcept": concept(SNOMED, "260385009")}))
            .expect(1, 0, 0),
        // Exclusions.
        a1c("DENEXPass HospiceEncounter")
            .encounter(HCPCS, "G9473", "2025-08-01T09:00:00", "2025-08-01T10:00:00", "finished")
            .expect(1, 1, 0),
        a1c("DENEXPass DischargedToHospice")
            .with(json!({"resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                "type": [concept(SNOMED, "32485007")],
                "period": {"start": "2025-09-01T09:00:00", "end": "2025-09-05T10:00:00"},
                "hospitalization": {"dischargeDisposition": concept(SNOMED, "428361000124107")}}))
            .expect(1, 1, 0),
        a1c("DENEXPass HospiceAssessmentYes")
            .observation(concept(LOINC, "45755-6"), "2025-04-01", json!({"valueCodeableConcept": concept(SNOMED, "373066001")}))
            .expect(1, 1, 0),
        a1c("DENEXFail HospiceAssessmentNo")
            .observation(concept(LOINC, "45755-6"), "2025-04-01", json!({"valueCodeableConcept": concept(SNOMED, "373067005")}))
            .expect(1, 0, 1),
        a1c("DENEXPass PalliativeCareEncounter")
            .encounter(HCPCS, "M1017", "2025-08-01T09:00:00", "2025-08-01T10:00:00", "finished")
            .expect(1, 1, 0),
        old("DENEXPass Age70InNursingHome")
            .observation(concept(LOINC, "71802-3"), "2025-02-01", json!({"valueCodeableConcept": concept(SNOMED, "160734000")}))
            .expect(1, 1, 0),
        Case::new("DENEXFail Age60InNursingHome", "1965-03-01")
            .office_visit()
            .diabetes()
            .observation(concept(LOINC, "71802-3"), "2025-02-01", json!({"valueCodeableConcept": concept(SNOMED, "160734000")}))
            .expect(1, 0, 1),
        old("DENEXFail Age70LeftNursingHome")
            .observation(concept(LOINC, "71802-3"), "2025-02-01", json!({"valueCodeableConcept": concept(SNOMED, "160734000")}))
            .observation(concept(LOINC, "71802-3"), "2025-07-01", json!({"valueCodeableConcept": concept(SNOMED, "32911000")}))
            .expect(1, 0, 1),
        old("DENEXPass Age70FrailtyDeviceAndAdvancedIllness")
            .with(json!({"resourceType": "DeviceRequest", "status": "active", "intent": "order",
                "codeCodeableConcept": concept(SNOMED, "1255320005"), "authoredOn": "2025-05-01"}))
            .condition(ICD10, "G30.9", "2024-03-01", json!({}))
            .expect(1, 1, 0),
        // AdvancedIllnessandFrailty 1.27 has no doNotPerform test (1.16 had).
        old("DENEXPass Age70FrailtyDeviceDoNotPerform")
            .with(json!({"resourceType": "DeviceRequest", "status": "active", "intent": "order", "doNotPerform": true,
                "codeCodeableConcept": concept(SNOMED, "1255320005"), "authoredOn": "2025-05-01"}))
            .condition(ICD10, "G30.9", "2024-03-01", json!({}))
            .expect(1, 1, 0),
        a1c("DENEXFail HospiceDiagnosisRefuted")
            .condition(SNOMED, "170935008", "2025-02-01", json!({"verificationStatus": concept("http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted")}))
            .expect(1, 0, 1),
        old("DENEXPass Age70FrailtyDiagnosisAndDementiaMedication")
            .condition(ICD10, "L89.000", "2025-01-15", json!({}))
            .with(json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                "medicationCodeableConcept": concept(RXNORM, "1100184"), "authoredOn": "2024-11-01",
                "dispenseRequest": {"expectedSupplyDuration": {"value": 90, "unit": "days", "code": "d"}}}))
            .expect(1, 1, 0),
        old("DENEXFail Age70FrailtyOnly").condition(ICD10, "L89.000", "2025-01-15", json!({})).expect(1, 0, 1),
        old("DENEXFail Age70AdvancedIllnessThreeYearsAgo")
            .condition(ICD10, "L89.000", "2025-01-15", json!({}))
            .condition(ICD10, "G30.9", "2022-03-01", json!({}))
            .expect(1, 0, 1),
    ];
    check_deck("CMS122", cases);
}

#[test]
fn cms131_hand_written_patients() {
    let exam = |c: Case, date: &str| {
        c.observation(concept(SNOMED, "252779009"), date, json!({"category": [concept("http://terminology.hl7.org/CodeSystem/observation-category", "exam")]}))
    };
    let dm = |name: &str| Case::new(name, "1970-06-15").office_visit().diabetes();
    let retinopathy = |c: Case| c.condition(ICD10, "E11.319", "2023-01-10", json!({}));
    let old = |name: &str| Case::new(name, "1955-03-01").office_visit().diabetes();
    let survey = concept(
        "http://terminology.hl7.org/CodeSystem/observation-category",
        "survey",
    );
    let cases = vec![
        Case::new("IPFail Age76", "1949-06-01").office_visit().diabetes().expect(0, 0, 0),
        Case::new("IPFail NoDiabetes", "1970-06-15").office_visit().expect(0, 0, 0),
        Case::new("IPPass OphthalmologicalServicesVisit", "1970-06-15")
            .encounter(CPT, "92012", "2025-04-01T09:00:00", "2025-04-01T09:40:00", "finished")
            .diabetes()
            .expect(1, 0, 0),
        Case::new("IPPass ProblemListDiabetes", "1970-06-15")
            .office_visit()
            .condition(ICD10, "E11.9", "2019-05-01", json!({"category": [concept("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")]}))
            .expect(1, 0, 0),
        exam(dm("NUMERPass ExamInPeriod"), "2025-07-01").expect(1, 0, 1),
        exam(dm("NUMERPass NoRetinopathyExamYearBefore"), "2024-03-01").expect(1, 0, 1),
        exam(dm("NUMERFail NoRetinopathyExamTwoYearsBefore"), "2023-12-31").expect(1, 0, 0),
        exam(retinopathy(dm("NUMERPass RetinopathyExamInPeriod")), "2025-07-01").expect(1, 0, 1),
        exam(retinopathy(dm("NUMERFail RetinopathyExamYearBefore")), "2024-03-01").expect(1, 0, 0),
        exam(dm("NUMERFail ExamAfterPeriod"), "2026-01-02").expect(1, 0, 0),
        dm("NUMERFail NoExam").expect(1, 0, 0),
        dm("NUMERFail ExamNotAnExamCategory")
            .observation(concept(SNOMED, "252779009"), "2025-07-01", json!({"category": [concept("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")]}))
            .expect(1, 0, 0),
        dm("NUMERPass ExamRecordedAsProcedure")
            .with(json!({"resourceType": "Procedure", "status": "completed", "code": concept(SNOMED, "722161008"), "performedDateTime": "2025-09-09"}))
            .expect(1, 0, 1),
        exam(dm("DENEXPass Hospice"), "2025-07-01")
            .encounter(HCPCS, "G9473", "2025-08-01T09:00:00", "2025-08-01T10:00:00", "finished")
            .expect(1, 1, 0),
        // The 2024 libraries (Status 1.8, Hospice 6.12, AIF 1.16).
        dm("NUMERPass ExamAmongOtherCategories")
            .observation(concept(SNOMED, "252779009"), "2025-07-01", json!({"category": [
                concept("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory"),
                concept("http://terminology.hl7.org/CodeSystem/observation-category", "exam")]}))
            .expect(1, 0, 1),
        Case::new("IPPass VisitArrived", "1970-06-15")
            .encounter(CPT, "99213", "2025-03-10T09:00:00", "2025-03-10T09:30:00", "arrived")
            .diabetes()
            .expect(1, 0, 0),
        Case::new("IPFail VisitCancelled", "1970-06-15")
            .encounter(CPT, "99213", "2025-03-10T09:00:00", "2025-03-10T09:30:00", "cancelled")
            .diabetes()
            .expect(0, 0, 0),
        dm("DENEXPass HospiceAssessmentSurvey")
            .observation(concept(LOINC, "45755-6"), "2025-04-01", json!({"valueCodeableConcept": concept(SNOMED, "373066001"),
                "category": [survey.clone()]}))
            .expect(1, 1, 0),
        dm("DENEXFail HospiceAssessmentNotASurvey")
            .observation(concept(LOINC, "45755-6"), "2025-04-01", json!({"valueCodeableConcept": concept(SNOMED, "373066001"),
                "category": [concept("http://terminology.hl7.org/CodeSystem/observation-category", "exam")]}))
            .expect(1, 0, 0),
        dm("DENEXPass HospiceDiagnosisRefuted")
            .condition(SNOMED, "170935008", "2025-02-01", json!({"verificationStatus": concept("http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted")}))
            .expect(1, 1, 0),
        old("DENEXPass Age70FrailtyDeviceAndAdvancedIllness")
            .with(json!({"resourceType": "DeviceRequest", "status": "active", "intent": "order",
                "codeCodeableConcept": concept(SNOMED, "1255320005"), "authoredOn": "2025-05-01"}))
            .condition(ICD10, "G30.9", "2024-03-01", json!({}))
            .expect(1, 1, 0),
        old("DENEXFail Age70FrailtyDeviceDoNotPerform")
            .with(json!({"resourceType": "DeviceRequest", "status": "active", "intent": "order", "doNotPerform": true,
                "codeCodeableConcept": concept(SNOMED, "1255320005"), "authoredOn": "2025-05-01"}))
            .condition(ICD10, "G30.9", "2024-03-01", json!({}))
            .expect(1, 0, 0),
        old("DENEXFail Age70FrailtyDeviceOriginalOrder")
            .with(json!({"resourceType": "DeviceRequest", "status": "active", "intent": "original-order",
                "codeCodeableConcept": concept(SNOMED, "1255320005"), "authoredOn": "2025-05-01"}))
            .condition(ICD10, "G30.9", "2024-03-01", json!({}))
            .expect(1, 0, 0),
    ];
    check_deck("CMS131", cases);
}

/// Runs a measure on a deck and fails naming every failing case and scope;
/// each of `exercised` must be both met and missed by some case (a deck of
/// zeros proves little).
fn check_conformance(
    deck: &Path,
    id: &str,
    cases: usize,
    exercised: &[&str],
) -> conformance::Conformance {
    let tmp = tempfile::tempdir().unwrap();
    let defs = measure::catalog(&queries()).unwrap();
    let def = measure::select(&defs, &[id.into()]).unwrap()[0];
    let outcome = conformance::run(deck, def, &queries(), tmp.path()).unwrap();
    assert_eq!(
        outcome.cases.len(),
        cases,
        "{id}: cases in {}",
        deck.display()
    );
    let failed: Vec<String> = outcome
        .cases
        .iter()
        .flat_map(|c| {
            c.scopes.iter().filter(|s| !s.passed()).map(|s| {
                format!(
                    "{} [{}]: expected {:?}, computed {:?}, rejects {:?}",
                    c.name, s.label, s.expected, s.actual, c.rejects
                )
            })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{id} failing cases:\n{}",
        failed.join("\n")
    );
    for population in exercised {
        let expected = |n: u64| {
            outcome.cases.iter().any(|c| {
                c.scopes
                    .iter()
                    .any(|s| s.expected.get(*population) == Some(&n))
            })
        };
        assert!(
            expected(1) && expected(0),
            "{id}: {population} is met and missed"
        );
    }
    outcome
}

#[test]
fn cms165_official_test_deck_passes() {
    if let Some(deck) = shared_data("ecqm/CMS165/tests") {
        check_conformance(&deck, "CMS165", 68, &["initial_population", "numerator"]);
    }
}

#[test]
fn cms2_official_test_deck_passes() {
    if let Some(deck) = shared_data("ecqm/CMS2/tests") {
        check_conformance(&deck, "CMS2", 36, &["initial_population", "numerator"]);
    }
}

#[test]
fn cms69_official_test_deck_passes() {
    if let Some(deck) = shared_data("ecqm/CMS69/tests") {
        check_conformance(&deck, "CMS69", 62, &["initial_population", "numerator"]);
    }
}

/// Three population groups, each with two age strata.
#[test]
fn cms155_official_test_deck_passes() {
    if let Some(deck) = shared_data("ecqm/CMS155/tests") {
        // The deck tests the hospice exclusion only: every numerator is 0.
        check_conformance(&deck, "CMS155", 10, &["denominator_exclusion"]);
    }
}

/// Encounter-based: a case's populations count its inpatient encounters.
#[test]
fn cms816_official_test_deck_passes() {
    if let Some(deck) = shared_data("ecqm/CMS816/tests") {
        check_conformance(&deck, "CMS816", 27, &["initial_population", "numerator"]);
    }
}

/// The hand-written decks of tests/decks/<measure id>/ (cases written from
/// the measure's CQL, in the layout of an official deck).
#[test]
fn hand_written_decks_pass() {
    let dir = repo().join("tests/decks");
    let mut decks: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    decks.sort();
    assert!(decks.len() >= 3, "decks in {}", dir.display());
    for deck in decks {
        let id = deck.file_name().unwrap().to_string_lossy().into_owned();
        let cases = fs::read_dir(&deck)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count();
        assert!(cases >= 20, "{id}: only {cases} cases");
        check_conformance(&deck, &id, cases, &["initial_population", "numerator"]);
    }
}

/// The harness notices a broken measure: without its palliative-care
/// exclusion, exactly the deck's palliative-care cases fail.
#[test]
fn conformance_detects_a_broken_measure() {
    let Some(deck) = shared_data("ecqm/CMS165/tests") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("queries");
    copy_dir(&queries(), &broken);
    let sql = broken.join("measures/cms165.sql");
    let text = fs::read_to_string(&sql).unwrap();
    assert!(text.contains("OR f.palliative"));
    fs::write(&sql, text.replace("OR f.palliative", "")).unwrap();
    let defs = measure::catalog(&broken).unwrap();
    let def = measure::select(&defs, &["CMS165".into()]).unwrap()[0];
    let outcome = conformance::run(&deck, def, &broken, &tmp.path().join("scratch")).unwrap();
    let failed: Vec<&str> = outcome
        .cases
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.name.as_str())
        .collect();
    assert!(!failed.is_empty());
    assert!(
        failed.iter().all(|n| n.contains("Palliative")),
        "{failed:?}"
    );
}

/// Ratio and continuous-variable scoring: their population rules, scores,
/// strata and MeasureReport populations, over literal rows.
#[test]
fn ratio_and_continuous_variable_scoring() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("queries");
    copy_dir(&queries().join("valuesets"), &q.join("valuesets"));
    fs::create_dir_all(q.join("measures")).unwrap();
    let meta = |id: &str, scoring: &str, extra: &str| {
        format!(
            "id = \"{id}\"\ntitle = \"{id}\"\nsteward = \"test\"\nscoring = \"{scoring}\"\n\
             improvement = \"decrease\"\ndescription = \"toy\"\n{extra}"
        )
    };
    fs::write(q.join("measures/ratio.toml"), meta("RATIO", "ratio", "")).unwrap();
    // person, ip, den, denex, num, numex
    fs::write(
        q.join("measures/ratio.sql"),
        "SELECT * FROM (VALUES \
           ('a', true, true, false, true, false), \
           ('b', true, true, true, true, false), \
           ('c', true, false, false, true, true), \
           ('d', true, true, false, false, true), \
           ('e', true, true, NULL, NULL, NULL)) \
         AS t(person_id, initial_population, denominator, denominator_exclusion, numerator, numerator_exclusion)",
    )
    .unwrap();
    fs::write(
        q.join("measures/cv.toml"),
        meta(
            "CV",
            "continuous-variable",
            "[observation]\naggregate = \"median\"\nunit = \"min\"\n\
             [[stratifier]]\nid = \"site\"\ncolumn = \"site\"\n",
        ),
    )
    .unwrap();
    // person, ip, mp, mpe, observation, site
    fs::write(
        q.join("measures/cv.sql"),
        "SELECT * FROM (VALUES \
           ('a', true, true, false, 10, 'x'), \
           ('b', true, true, false, 50, 'x'), \
           ('c', true, true, true, 1000, 'y'), \
           ('d', true, false, false, 500, 'y'), \
           ('e', true, true, false, 40, 'y')) \
         AS t(person_id, initial_population, measure_population, measure_population_exclusion, \
              measure_observation, site)",
    )
    .unwrap();
    let defs = measure::catalog(&q).unwrap();
    let wh = Warehouse::new(tmp.path().join("wh"));
    let all: Vec<&measure::MeasureDef> = defs.iter().collect();
    let results = measure::run(&wh, &q, &all, period_2025()).unwrap();
    let (cv, ratio) = (&results[0], &results[1]);

    // Ratio slots: ip, den, denex, numex, num. The numerator belongs to the
    // initial population, not the denominator; an exclusion of one is not
    // one of the other.
    let m = ratio.memberships();
    assert_eq!(m["a"], [true, true, false, false, true]);
    assert_eq!(
        m["b"],
        [true, true, true, false, true],
        "excluded from the denominator only"
    );
    assert_eq!(
        m["c"],
        [true, false, false, true, true],
        "numerator outside the denominator"
    );
    assert_eq!(
        m["d"],
        [true, true, false, false, false],
        "no numerator, nothing to exclude"
    );
    assert_eq!(m["e"], [true, true, false, false, false], "NULL is false");
    // (numerator 3 - 1 excluded) / (denominator 4 - 1 excluded)
    assert_eq!(ratio.score, Some(2.0 / 3.0));
    assert_eq!(ratio.def.format_score(ratio.score), "0.667");

    // Continuous variable: observations of the measure population, not
    // excluded; the median of 10, 50 and 40.
    let m = cv.members();
    let observed: Vec<(&str, Option<f64>)> = m
        .iter()
        .map(|m| (m.subject.as_str(), m.observation))
        .collect();
    assert_eq!(
        observed,
        [
            ("a", Some(10.0)),
            ("b", Some(50.0)),
            ("c", None),
            ("d", None),
            ("e", Some(40.0))
        ]
    );
    let c = cv.counts;
    assert_eq!(
        (c.initial_population, c.denominator, c.denominator_exclusion),
        (5, 4, 1)
    );
    assert_eq!(cv.score, Some(40.0));
    assert_eq!(cv.def.format_score(cv.score), "median 40.0 min");
    let strata: Vec<(&str, Option<f64>)> = cv
        .strata
        .iter()
        .map(|s| (s.value.as_str(), s.score))
        .collect();
    assert_eq!(strata, [("x", Some(30.0)), ("y", Some(40.0))]);

    // The summary's rate is the score; the MeasureReport names the
    // scoring's populations.
    let cells = ward::report::summarize(&results, &[], 1);
    let overall = |key: &str| {
        cells
            .iter()
            .find(|c| c.measure == key && c.dimension == "overall")
            .unwrap()
    };
    assert_eq!(overall("CV").rate, Some(40.0));
    assert_eq!(overall("RATIO").rate, Some(2.0 / 3.0));
    assert_eq!(
        overall("RATIO").ci_low,
        None,
        "no Wilson interval for a ratio"
    );
    let report = serde_json::to_value(ward::report::fhir::measure_report(
        &[cv],
        &cells,
        chrono::Utc::now(),
    ))
    .unwrap();
    let group = &report["group"][0];
    let codes: Vec<(&str, u64)> = group["population"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["code"]["coding"][0]["code"].as_str().unwrap(),
                p["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("initial-population", 5),
            ("measure-population", 4),
            ("measure-population-exclusion", 1),
            ("measure-observation", 3)
        ]
    );
    assert_eq!(group["measureScore"], json!({"value": 40.0, "unit": "min"}));

    // A continuous variable needs its aggregate.
    fs::write(
        q.join("measures/cv.toml"),
        meta("CV", "continuous-variable", ""),
    )
    .unwrap();
    let err = measure::catalog(&q).unwrap_err().to_string();
    assert!(
        err.contains("cv.toml") && err.contains("[observation]"),
        "{err}"
    );
}

/// A toy measure over literal rows: proportion scoring is applied once, by
/// Ward, whatever the query says.
#[test]
fn scoring_cascades_populations_and_treats_null_as_false() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("queries");
    copy_dir(&queries().join("valuesets"), &q.join("valuesets"));
    fs::create_dir_all(q.join("measures")).unwrap();
    fs::write(
        q.join("measures/toy.toml"),
        "id = \"TOY\"\ntitle = \"Toy\"\nsteward = \"test\"\nscoring = \"proportion\"\nimprovement = \"increase\"\ndescription = \"toy\"\n",
    )
    .unwrap();
    // person, ip, den, denex, denexcep, num
    fs::write(
        q.join("measures/toy.sql"),
        "SELECT * FROM (VALUES \
           ('a', true, true, false, false, true), \
           ('b', true, true, true, false, true), \
           ('c', true, false, true, true, true), \
           ('d', true, true, false, true, true), \
           ('e', true, true, false, true, false), \
           ('f', true, true, NULL, NULL, NULL), \
           ('g', false, true, false, false, true)) \
         AS t(person_id, initial_population, denominator, denominator_exclusion, denominator_exception, numerator)",
    )
    .unwrap();
    let defs = measure::catalog(&q).unwrap();
    let wh = Warehouse::new(tmp.path().join("wh"));
    let results = measure::run(&wh, &q, &[&defs[0]], period_2025()).unwrap();
    let m = results[0].memberships();
    // ip, den, denex, denexcep, num
    assert_eq!(m["a"], [true, true, false, false, true]);
    assert_eq!(
        m["b"],
        [true, true, true, false, false],
        "excluded: not in numerator"
    );
    assert_eq!(
        m["c"],
        [true, false, false, false, false],
        "not in denominator: nothing else"
    );
    assert_eq!(
        m["d"],
        [true, true, false, false, true],
        "numerator wins over exception"
    );
    assert_eq!(m["e"], [true, true, false, true, false]);
    assert_eq!(m["f"], [true, true, false, false, false], "NULL is false");
    assert!(
        !m.contains_key("g"),
        "outside the initial population: no row"
    );
    let c = results[0].counts;
    assert_eq!(
        (
            c.initial_population,
            c.denominator,
            c.denominator_exclusion,
            c.denominator_exception,
            c.numerator
        ),
        (6, 5, 1, 1, 2)
    );
    assert_eq!(c.rate(measure::Scoring::Proportion), Some(2.0 / 3.0));
    assert_eq!(results[0].score, Some(2.0 / 3.0));

    // Broken queries fail with the file named.
    fs::write(
        q.join("measures/toy.sql"),
        "SELECT 'a' AS person_id, true AS initial_population",
    )
    .unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("toy.sql") && err.contains("'denominator'"),
        "{err}"
    );
    fs::write(
        q.join("measures/toy.sql"),
        "SELECT * FROM (VALUES ('a', true, true, false, true), ('a', true, true, false, false)) \
         AS t(person_id, initial_population, denominator, denominator_exclusion, numerator)",
    )
    .unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(err.contains("one row per subject"), "{err}");
    fs::write(q.join("measures/toy.sql"), "SELEC nothing").unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(err.contains("toy.sql"), "{err}");
}

/// Groups, a measure-defined stratifier and the encounter basis: one result
/// per group, counts of encounters (not persons), strata per group, and a
/// MeasureReport with one group per population group.
#[test]
fn groups_strata_and_encounter_basis() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("queries");
    copy_dir(&queries().join("valuesets"), &q.join("valuesets"));
    fs::create_dir_all(q.join("measures")).unwrap();
    fs::write(
        q.join("measures/toy.toml"),
        "id = \"TOY\"\ntitle = \"Toy\"\nsteward = \"test\"\nscoring = \"proportion\"\n\
         improvement = \"decrease\"\ndescription = \"toy\"\nbasis = \"encounter\"\n\
         care_gap = \"review the stay\"\n\
         [[group]]\nid = \"a\"\ntitle = \"First\"\n\
         [[group]]\nid = \"b\"\ntitle = \"Second\"\ncare_gap = \"other action\"\n\
         [[stratifier]]\nid = \"Adults\"\ncolumn = \"adult\"\n",
    )
    .unwrap();
    // Person p1 has two encounters, p2 one; group b holds one row.
    let toy = "SELECT * FROM (VALUES \
           ('a', 'e1', 'p1', true, true, false, true, true), \
           ('a', 'e2', 'p1', true, true, false, false, true), \
           ('a', 'e3', 'p2', true, true, true, true, false), \
           ('b', 'e1', 'p1', true, true, false, true, NULL)) \
         AS t(group_id, encounter_id, person_id, initial_population, denominator, \
              denominator_exclusion, numerator, adult)";
    fs::write(q.join("measures/toy.sql"), toy).unwrap();
    let defs = measure::catalog(&q).unwrap();
    let wh = Warehouse::new(tmp.path().join("wh"));
    let results = measure::run(&wh, &q, &[&defs[0]], period_2025()).unwrap();
    let keys: Vec<String> = results.iter().map(|r| r.key()).collect();
    assert_eq!(keys, ["TOY.a", "TOY.b"]);
    let (a, b) = (&results[0], &results[1]);
    assert_eq!(a.title(), "Toy — First");
    assert_eq!(
        (a.care_gap(), b.care_gap()),
        (Some("review the stay"), Some("other action"))
    );
    let c = a.counts;
    assert_eq!(
        (
            c.initial_population,
            c.denominator,
            c.denominator_exclusion,
            c.numerator
        ),
        (3, 3, 1, 1),
        "encounters are counted, not persons"
    );
    assert_eq!(a.memberships()["e2"], [true, true, false, false, false]);
    assert_eq!(b.counts.initial_population, 1);
    let adults: Vec<(String, u64, u64)> = a
        .strata
        .iter()
        .map(|s| {
            (
                s.value.clone(),
                s.counts.initial_population,
                s.counts.numerator,
            )
        })
        .collect();
    assert_eq!(adults, [("false".into(), 1, 0), ("true".into(), 2, 1)]);
    assert_eq!(
        b.strata[0].value, "false",
        "a NULL boolean stratum is false"
    );

    // The summary reports the measure's stratifier as a dimension of each
    // group, and the MeasureReport has one group per population group.
    let cells = ward::report::summarize(&results, &[], 0);
    assert!(cells.iter().any(|c| c.measure == "TOY.a"
        && c.dimension == "Adults"
        && c.stratum == "true"
        && c.initial_population == Some(2)));
    let date = chrono::Utc::now();
    let report = ward::report::fhir::measure_report(&[a, b], &cells, date);
    assert_eq!(report.group.len(), 2);
    assert_eq!(report.group[1].id.as_deref(), Some("TOY.b"));
    assert!(
        report.group[0]
            .stratifier
            .iter()
            .any(|s| s.code[0].text.as_deref() == Some("Adults"))
    );

    // A group the measure does not define, and two rows for one encounter
    // of a group, are errors naming the file.
    fs::write(
        q.join("measures/toy.sql"),
        toy.replace("('b', 'e1'", "('c', 'e1'"),
    )
    .unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(err.contains("toy.sql") && err.contains("'c'"), "{err}");
    fs::write(q.join("measures/toy.sql"), toy.replace("'e2'", "'e1'")).unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one row per subject") && err.contains("group 'a'"),
        "{err}"
    );
    fs::write(
        q.join("measures/toy.sql"),
        format!(
            "SELECT group_id, encounter_id, person_id, initial_population, denominator, \
                 denominator_exclusion, numerator, map([1], [2]) AS adult FROM ({toy})"
        ),
    )
    .unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(err.contains("stratifier column 'adult'"), "{err}");
    fs::write(q.join("measures/toy.sql"), toy.replace("group_id,", "grp,")).unwrap();
    let err = measure::run(&wh, &q, &[&defs[0]], period_2025())
        .unwrap_err()
        .to_string();
    assert!(err.contains("'group_id'"), "{err}");
}

#[test]
fn catalog_reports_bad_metadata_with_its_location() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("queries");
    fs::create_dir_all(q.join("measures")).unwrap();
    let meta = "id = \"X\"\ntitle = \"X\"\nsteward = \"s\"\nscoring = \"proportion\"\nimprovement = \"increase\"\ndescription = \"d\"\n";
    fs::write(
        q.join("measures/x.toml"),
        format!("{meta}colour = \"red\"\n"),
    )
    .unwrap();
    fs::write(q.join("measures/x.sql"), "SELECT 1").unwrap();
    let err = measure::catalog(&q).unwrap_err();
    assert!(err.is_config_error());
    assert!(err.to_string().contains("x.toml:7"), "{err}");
    fs::write(
        q.join("measures/x.toml"),
        meta.replace("increase", "sideways"),
    )
    .unwrap();
    assert!(
        measure::catalog(&q)
            .unwrap_err()
            .to_string()
            .contains("x.toml:5")
    );
    fs::write(q.join("measures/x.toml"), meta).unwrap();
    fs::remove_file(q.join("measures/x.sql")).unwrap();
    assert!(
        measure::catalog(&q)
            .unwrap_err()
            .to_string()
            .contains("x.sql not found")
    );
    fs::write(q.join("measures/x.sql"), "SELECT 1").unwrap();
    // A library must be a folder of queries/lib, named plainly.
    for library in ["qicore-2023", "../measures", ""] {
        fs::write(
            q.join("measures/x.toml"),
            format!("{meta}library = \"{library}\"\n"),
        )
        .unwrap();
        let err = measure::catalog(&q).unwrap_err();
        assert!(
            err.is_config_error() && err.to_string().contains("is not a folder of"),
            "{err}"
        );
    }
    fs::create_dir_all(q.join("lib/qicore-2023")).unwrap();
    fs::write(
        q.join("measures/x.toml"),
        format!("{meta}library = \"qicore-2023\"\n"),
    )
    .unwrap();
    assert_eq!(measure::catalog(&q).unwrap()[0].library(), "qicore-2023");
    fs::write(q.join("measures/x.toml"), meta).unwrap();
    let defs = measure::catalog(&q).unwrap();
    assert_eq!(defs[0].library(), measure::DEFAULT_LIBRARY);
    let err = measure::select(&defs, &["CMS999".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown measure 'CMS999'") && err.contains("known: X"),
        "{err}"
    );
}

/// `run` on the sample: ingest, then every measure, one mart per measure
/// whose rows are the measure's initial population (never empty: the
/// generator writes what every shipped measure counts); a second run
/// writes the same results.
#[test]
fn run_on_the_sample_writes_every_measure() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let first = run_all(&config);
    let defs = measure::catalog(&queries()).unwrap();
    let results: usize = defs.iter().map(|d| d.groups.len().max(1)).sum();
    assert_eq!(
        first.measures.len(),
        results,
        "one result per measure group"
    );
    let marts = first.run_dir.join("marts/measure_patient");
    for r in &first.measures {
        let batches = read_parquet(&marts.join(format!("{}.parquet", r.key())));
        assert_eq!(
            rows(&batches) as u64,
            r.counts.initial_population,
            "{}",
            r.key()
        );
        assert!(
            r.counts.initial_population > 0,
            "{} has an empty population on the sample",
            r.key()
        );
        let ids = strings(&batches, "measure_id");
        assert!(ids.iter().all(|i| i.as_deref() == Some(r.def.id.as_str())));
        // Every row names the configured measurement period.
        let period = config.measurement_period.unwrap();
        let days = |column: &str| {
            primitives::<datafusion::arrow::datatypes::Date32Type>(&batches, column)
                .into_iter()
                .map(|d| d.and_then(datafusion::arrow::temporal_conversions::date32_to_datetime))
                .map(|d| d.map(|d| d.date()))
                .collect::<Vec<_>>()
        };
        assert!(
            days("period_start")
                .iter()
                .all(|d| *d == Some(period.start))
        );
        assert!(days("period_end").iter().all(|d| *d == Some(period.end)));
        // Linked persons, not provider records.
        let persons = strings(&batches, "person_id");
        assert!(
            persons
                .iter()
                .all(|p| p.as_deref().is_some_and(|p| p.starts_with('P')))
        );
    }
    // CMS122's numerator reasons agree with its detail columns.
    let cms122 = read_parquet(&marts.join("CMS122.parquet"));
    let num = strings(&cms122, "numerator_reason");
    let pct = f64s(&cms122, "last_result_pct");
    let ages = primitives::<datafusion::arrow::datatypes::Int32Type>(&cms122, "age");
    for ((reason, pct), age) in num.iter().zip(&pct).zip(&ages) {
        assert!((18..=75).contains(&age.unwrap()));
        match reason.as_deref() {
            Some("most_recent_above_9") => assert!(pct.unwrap() > 9.0),
            Some("no_assessment_in_period") => assert!(pct.is_none()),
            None => assert!(pct.unwrap() <= 9.0),
            other => panic!("unexpected reason {other:?}"),
        }
    }
    let control = first
        .measures
        .iter()
        .find(|r| r.def.id == "DM-CONTROL")
        .unwrap();
    assert_eq!(
        control.categories.values().sum::<u64>(),
        control.counts.denominator
    );

    let second = run_all(&config);
    assert_eq!(
        first.measures.iter().map(|r| r.counts).collect::<Vec<_>>(),
        second.measures.iter().map(|r| r.counts).collect::<Vec<_>>()
    );
    assert_eq!(
        snapshot(&marts),
        snapshot(&second.run_dir.join("marts/measure_patient")),
        "a second run writes the same marts"
    );
    assert!(first.measures.iter().all(|r| r.empty.is_none()));

    // A period before any data: every denominator is empty and says what
    // the data holds — the diabetics are there (at other dates), the
    // period has no encounter.
    let published = Warehouse::new(&config.warehouse).with_output(&second.run_dir);
    let all: Vec<&measure::MeasureDef> = defs.iter().collect();
    let before = Period {
        start: NaiveDate::from_ymd_opt(1990, 1, 1).unwrap(),
        end: NaiveDate::from_ymd_opt(1990, 12, 31).unwrap(),
    };
    for r in measure::run(&published, &queries(), &all, before).unwrap() {
        let empty = r
            .empty
            .unwrap_or_else(|| panic!("{}: no explanation", r.def.id));
        assert_eq!(empty.encounters_in_period, 0, "{}", r.def.id);
        assert!(empty.unmatched_encounter_codes.is_empty());
        if r.def.id == "CMS122" {
            // Its own value sets and those of the shared views it reads
            // (hospice, palliative care, frailty: in queries/lib only).
            let own = fs::read_to_string(queries().join("measures/cms122.sql"))
                .unwrap()
                .matches("'2.16.840.")
                .count();
            assert!(empty.valuesets > own, "{own} in the SQL: {empty:?}");
            let condition = empty
                .persons_by_table
                .iter()
                .find(|(t, _)| t == "condition");
            assert!(condition.is_some_and(|(_, n)| *n > 0), "{empty:?}");
        }
    }
}

/// A run's value-set memberships (`<table>_vs`) and codings
/// (`<table>_coding`) are computed once and read back; what a measure sees
/// through them is what unnesting the facts' codings and joining them to
/// the value sets gives, whatever characters a value set's name holds, and
/// a filter on single codes finds the same facts.
#[test]
fn shared_value_set_membership_and_codings_are_the_views_they_replace() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ward::PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let run = run_all(&config);
    let q = tmp.path().join("q");
    copy_dir(&queries().join("valuesets"), &q.join("valuesets"));
    // The diabetes value set again, under a name with a slash, a space, an
    // equals and a percent sign (a path separator and escapes in a folder).
    let odd = "urn:x/odd set=%1";
    let diabetes = fs::read_to_string(
        queries().join("valuesets/2.16.840.1.113883.3.464.1003.103.12.1001.csv"),
    )
    .unwrap();
    fs::write(
        q.join("valuesets/odd.csv"),
        diabetes.replace("2.16.840.1.113883.3.464.1003.103.12.1001", odd),
    )
    .unwrap();
    // Its SNOMED codes, for criteria naming single codes.
    let codes = diabetes
        .lines()
        .map(|l| l.splitn(6, ',').collect::<Vec<_>>())
        .filter(|f| f.len() > 4 && f[3] == "snomed")
        .map(|f| format!("'{}'", f[4]))
        .collect::<Vec<_>>()
        .join(", ");
    fs::create_dir_all(q.join("measures")).unwrap();
    let toml = |id: &str| {
        format!(
            "id = \"{id}\"\ntitle = \"{id}\"\nsteward = \"test\"\nscoring = \"proportion\"\nimprovement = \"increase\"\ndescription = \"{id}\"\n"
        )
    };
    // Everyone with a condition; numerator: in the value set.
    let select = "SELECT p.person_id, true AS initial_population, true AS denominator, \
                  false AS denominator_exclusion, \
                  m.person_id IS NOT NULL AS numerator \
                  FROM (SELECT DISTINCT person_id FROM condition) p \
                  LEFT JOIN (SELECT DISTINCT person_id FROM member) m ON m.person_id = p.person_id";
    for (id, member) in [
        (
            "SHARED",
            format!("SELECT person_id FROM condition_vs WHERE valueset = '{odd}'"),
        ),
        (
            "JOINED",
            format!(
                "SELECT c.person_id FROM condition_coding c JOIN valueset_code v \
                 ON v.code_system = c.coding_system AND v.code = c.coding_code \
                 WHERE v.valueset = '{odd}'"
            ),
        ),
        (
            "UNNESTED",
            format!(
                "SELECT c.person_id FROM (SELECT person_id, unnest(codings) AS k FROM condition) c \
                 JOIN valueset_code v ON v.code_system = c.k['system'] AND v.code = c.k['code'] \
                 WHERE v.valueset = '{odd}'"
            ),
        ),
        (
            "CODED",
            format!(
                "SELECT person_id FROM condition_coding WHERE coding_system = 'snomed' AND coding_code IN ({codes})"
            ),
        ),
        (
            "CODED_UNNESTED",
            format!(
                "SELECT person_id FROM (SELECT person_id, unnest(codings) AS k FROM condition) \
                 WHERE k['system'] = 'snomed' AND k['code'] IN ({codes})"
            ),
        ),
    ] {
        let file = id.to_lowercase();
        fs::write(q.join(format!("measures/{file}.toml")), toml(id)).unwrap();
        fs::write(
            q.join(format!("measures/{file}.sql")),
            format!("WITH member AS ({member}) {select}"),
        )
        .unwrap();
    }
    let defs = measure::catalog(&q).unwrap();
    let all: Vec<&measure::MeasureDef> = defs.iter().collect();
    let wh = Warehouse::new(&config.warehouse).with_output(&run.run_dir);
    let results = measure::run(&wh, &q, &all, period_2025()).unwrap();
    let by_id = |id: &str| results.iter().find(|r| r.def.id == id).unwrap();
    let shared = by_id("SHARED");
    assert!(shared.counts.numerator > 0, "{:?}", shared.counts);
    assert!(shared.counts.numerator < shared.counts.denominator);
    for other in ["JOINED", "UNNESTED"] {
        assert_eq!(shared.memberships(), by_id(other).memberships(), "{other}");
    }
    let coded = by_id("CODED");
    assert!(coded.counts.numerator > 0, "{:?}", coded.counts);
    assert_eq!(coded.memberships(), by_id("CODED_UNNESTED").memberships());
    // The scratch copies are gone with the run.
    let tmp_dir = config.warehouse.join(".tmp");
    let left: Vec<_> = fs::read_dir(&tmp_dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// Which columns of the person table the measures read is told from their
/// plans (views inlined, CTEs included): the bundled measures read birth
/// dates but not names, record counts or providers; a measure reading the
/// providers reads `sources`; SQL that is not one statement cannot be told.
#[test]
fn the_person_columns_measures_read_are_told_from_their_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ward::PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let run = run_all(&config);
    let wh = Warehouse::new(&config.warehouse).with_output(&run.run_dir);
    let defs = measure::catalog(&queries()).unwrap();
    let all: Vec<&measure::MeasureDef> = defs.iter().collect();
    let read = measure::person_columns_read(&wh, &queries(), &all, period_2025()).unwrap();
    for column in ["person_id", "birth_date"] {
        assert!(read.contains(column), "{read:?}");
    }
    for column in ["given_name", "family_name", "records", "sources"] {
        assert!(!read.contains(column), "{read:?}");
    }

    let q = tmp.path().join("q");
    copy_dir(&queries(), &q);
    fs::write(
        q.join("measures/multi.toml"),
        "id = \"MULTI\"\ntitle = \"MULTI\"\nsteward = \"test\"\nscoring = \"proportion\"\n\
         improvement = \"increase\"\ndescription = \"seen by several providers\"\n",
    )
    .unwrap();
    let multi = |sql: &str| {
        fs::write(q.join("measures/multi.sql"), sql).unwrap();
        let defs = measure::catalog(&q).unwrap();
        let multi: Vec<&measure::MeasureDef> = defs.iter().filter(|d| d.id == "MULTI").collect();
        assert_eq!(multi.len(), 1);
        measure::person_columns_read(&wh, &q, &multi, period_2025())
    };
    let read = multi(
        "WITH seen AS (SELECT person_id, array_length(sources) > 1 AS many FROM patient) \
         SELECT person_id, true AS initial_population, true AS denominator, \
         false AS denominator_exclusion, many AS numerator FROM seen",
    );
    let expected = ["person_id", "sources"].map(String::from);
    assert_eq!(read, Some(expected.into_iter().collect()));
    assert_eq!(multi("SELECT 1; SELECT 2"), None);
}
