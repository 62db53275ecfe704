#!/usr/bin/env python3
"""Generates the hand-written CMS125 (Breast Cancer Screening, FHIR 0.4.000)
test deck: one folder per case with bundle.json and MeasureReport.json, and
README.txt. Expected populations come from the measure's CQL, read by hand.

Run from anywhere: python3 generate.py  (writes beside this file; stdlib only).
"""

import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURE = "https://madie.cms.gov/Measure/CMS125FHIRBreastCancerScreening"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
US_CORE_SEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex"
FEMALE_SEX = "248152002"
MALE_SEX = "248153007"


def ts(day, time="09:00:00"):
    return f"{day}T{time}.000+00:00"


def cc(system, code, display=None):
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return {"coding": [c]}


class Case:
    def __init__(self, slug, name, pops, birth="1971-06-15", gender="female",
                 sex=FEMALE_SEX, encounter=True):
        self.slug, self.name, self.pops = slug, name, pops
        self.pid = f"cms125-{slug}"
        self.n = 0
        patient = {
            "resourceType": "Patient", "id": self.pid,
            "meta": {"profile": ["http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-patient"]},
            "extension": [],
            "identifier": [{"system": "http://hospital.smarthealthit.org", "value": self.pid}],
            "name": [{"family": "CMS125", "given": [slug]}],
            "gender": gender, "birthDate": birth,
        }
        if sex:
            patient["extension"].append({"url": US_CORE_SEX, "valueCode": sex})
        self.resources = [patient]
        if encounter:
            self.encounter(CPT, "99213")  # Office Visit

    def rid(self, kind):
        self.n += 1
        return f"{self.pid}-{kind}-{self.n}"

    def subject(self):
        return {"reference": f"Patient/{self.pid}"}

    def add(self, r):
        self.resources.append(r)
        return r

    def encounter(self, system, code, start=ts("2026-03-10"), end=ts("2026-03-10", "09:30:00"),
                  status="finished", klass="AMB", discharge=None):
        r = {"resourceType": "Encounter", "id": self.rid("enc"), "status": status,
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
             "type": [cc(system, code)], "subject": self.subject(),
             "period": {"start": start, "end": end}}
        if discharge:
            r["hospitalization"] = {"dischargeDisposition": cc(SNOMED, discharge)}
        return self.add(r)

    def observation(self, system, code, when=None, period=None, status="final",
                    category="imaging", value=None):
        r = {"resourceType": "Observation", "id": self.rid("obs"), "status": status,
             "code": cc(system, code), "subject": self.subject()}
        if category:
            r["category"] = [cc(OBS_CAT, category)]
        if period:
            r["effectivePeriod"] = {"start": period[0], "end": period[1]}
        else:
            r["effectiveDateTime"] = when
        if value:
            r["valueCodeableConcept"] = cc(*value)
        return self.add(r)

    def mammogram(self, when=ts("2026-05-04"), code="24606-6", **kw):
        return self.observation(LOINC, code, when=when, **kw)

    def condition(self, system, code, onset, category="problem-list-item", clinical="active",
                  verification="confirmed", abatement=None, body_site=None):
        r = {"resourceType": "Condition", "id": self.rid("cond"),
             "clinicalStatus": cc(COND_CLIN, clinical),
             "category": [cc(COND_CAT, category)],
             "code": cc(system, code), "subject": self.subject(), "onsetDateTime": onset}
        if verification:
            r["verificationStatus"] = cc(COND_VER, verification)
        if abatement:
            r["abatementDateTime"] = abatement
        if body_site:
            r["bodySite"] = [cc(SNOMED, body_site)]
        return self.add(r)

    def procedure(self, system, code, when=None, period=None, status="completed"):
        r = {"resourceType": "Procedure", "id": self.rid("proc"), "status": status,
             "code": cc(system, code), "subject": self.subject()}
        if period:
            r["performedPeriod"] = {"start": period[0], "end": period[1]}
        else:
            r["performedDateTime"] = when
        return self.add(r)

    def service_request(self, system, code, authored, status="active", intent="order"):
        return self.add({"resourceType": "ServiceRequest", "id": self.rid("sr"), "status": status,
                         "intent": intent, "code": cc(system, code), "subject": self.subject(),
                         "authoredOn": authored})

    def device_request(self, code, authored):
        return self.add({"resourceType": "DeviceRequest", "id": self.rid("dr"), "status": "active",
                         "intent": "order", "codeCodeableConcept": cc(SNOMED, code),
                         "subject": self.subject(), "authoredOn": authored})

    def medication_request(self, code, authored, start, end):
        return self.add({"resourceType": "MedicationRequest", "id": self.rid("med"),
                         "status": "active", "intent": "order",
                         "medicationCodeableConcept": cc(RXNORM, code),
                         "subject": self.subject(), "authoredOn": authored,
                         "dosageInstruction": [{"timing": {"repeat": {
                             "boundsPeriod": {"start": start, "end": end}}}}]})

    def write(self):
        folder = os.path.join(HERE, self.slug)
        os.makedirs(folder)
        bundle = {"resourceType": "Bundle", "id": self.pid, "type": "collection",
                  "entry": [{"fullUrl": f"https://madie.cms.gov/{r['resourceType']}/{r['id']}",
                             "resource": r} for r in self.resources]}
        ip, den, dx, num = self.pops
        codes = [("initial-population", ip), ("denominator", den),
                 ("denominator-exclusion", dx), ("numerator", num)]
        report = {
            "resourceType": "MeasureReport", "status": "complete", "type": "individual",
            "measure": MEASURE,
            "extension": [{"url": "http://hl7.org/fhir/us/cqfmeasures/StructureDefinition/cqfm-testCaseDescription",
                           "valueMarkdown": self.name}],
            "period": {"start": "2026-01-01", "end": "2026-12-31"},
            "group": [{"id": "Group_1", "population": [
                {"code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/measure-population",
                                      "code": c}]}, "count": n} for c, n in codes]}],
        }
        for name, doc in (("bundle.json", bundle), ("MeasureReport.json", report)):
            with open(os.path.join(folder, name), "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")


IN, OUT = (1, 1, 0, 0), (0, 0, 0, 0)
NUM, DENEX = (1, 1, 0, 1), (1, 1, 1, 0)
cases = []


def case(*args, **kw):
    c = Case(*args, **kw)
    cases.append(c)
    return c


# --- Initial population: age, sex, qualifying encounter -------------------
case("num-pass-screening-mammogram-in-period",
     "55 yo woman, office visit, screening mammogram in the period", NUM).mammogram()
case("num-fail-no-mammogram", "55 yo woman, office visit, no mammogram", IN)
case("ipp-pass-age-42-on-last-day-of-period",
     "turns 42 on the last day of the period (born 1984-12-31), mammogram", NUM,
     birth="1984-12-31").mammogram()
case("ipp-fail-age-41-at-end-of-period",
     "turns 42 the day after the period (born 1985-01-01): 41 at its end", OUT,
     birth="1985-01-01").mammogram()
case("ipp-pass-age-74-born-first-day-of-period",
     "turns 74 on the first day of the period (born 1952-01-01): 74 at its end", NUM,
     birth="1952-01-01").mammogram()
case("ipp-fail-age-75-on-last-day-of-period",
     "turns 75 on the last day of the period (born 1951-12-31)", OUT,
     birth="1951-12-31").mammogram()
case("ipp-fail-male", "man (gender male, sex 248153007) with visit and mammogram", OUT,
     gender="male", sex=MALE_SEX).mammogram()
case("ipp-fail-sex-extension-male-gender-female",
     "gender female but US Core sex extension male (248153007): Patient.sex is not "
     "248152002", OUT, sex=MALE_SEX).mammogram()
case("ipp-fail-no-qualifying-encounter", "mammogram but no encounter", OUT,
     encounter=False).mammogram()
c = case("ipp-fail-encounter-cancelled", "office visit cancelled (not finished)", OUT,
         encounter=False)
c.encounter(CPT, "99213", status="cancelled")
c.mammogram()
c = case("ipp-fail-encounter-ends-after-period",
         "office visit 2026-12-31 23:00 to 2027-01-01 01:00 (not during the period)", OUT,
         encounter=False)
c.encounter(CPT, "99213", ts("2026-12-31", "23:00:00"), ts("2027-01-01", "01:00:00"))
c.mammogram()
c = case("ipp-fail-encounter-starts-before-period",
         "office visit 2025-12-31 23:00 to 2026-01-01 01:00 (not during the period)", OUT,
         encounter=False)
c.encounter(CPT, "99213", ts("2025-12-31", "23:00:00"), ts("2026-01-01", "01:00:00"))
c.mammogram()
c = case("ipp-pass-encounter-first-day", "office visit on 2026-01-01 only", IN,
         encounter=False)
c.encounter(CPT, "99213", ts("2026-01-01", "08:00:00"), ts("2026-01-01", "08:30:00"))
c = case("ipp-pass-encounter-last-day", "office visit on 2026-12-31 only", IN,
         encounter=False)
c.encounter(CPT, "99213", ts("2026-12-31", "16:00:00"), ts("2026-12-31", "16:30:00"))
for slug, name, system, code in [
    ("ipp-pass-annual-wellness-visit", "Annual Wellness Visit (HCPCS G0439)", HCPCS, "G0439"),
    ("ipp-pass-preventive-established", "Preventive Care Established Office Visit (99396)", CPT, "99396"),
    ("ipp-pass-preventive-initial", "Preventive Care Initial Office Visit (99386)", CPT, "99386"),
    ("ipp-pass-home-healthcare", "Home Healthcare Services (99342)", CPT, "99342"),
    ("ipp-pass-virtual-encounter", "Virtual Encounter (98970)", CPT, "98970"),
    ("ipp-pass-telephone-visit", "Telephone Visit (98966)", CPT, "98966"),
]:
    c = case(slug, f"{name} as the only encounter, mammogram", NUM, encounter=False)
    c.encounter(system, code)
    c.mammogram()
c = case("ipp-fail-emergency-visit-only",
         "ED visit (99283, not a qualifying encounter) as the only encounter", OUT,
         encounter=False)
c.encounter(CPT, "99283", klass="EMER")
c.mammogram()

# --- Numerator: look-back window, status, category -------------------------
case("num-pass-mammogram-oct-1-two-years-prior",
     "mammogram on 2024-10-01 (first day of the look-back)", NUM).mammogram(ts("2024-10-01", "08:00:00"))
case("num-fail-mammogram-sep-30-two-years-prior",
     "mammogram on 2024-09-30 (day before the look-back)", IN).mammogram(ts("2024-09-30", "15:00:00"))
case("num-pass-mammogram-last-day-of-period",
     "mammogram on 2026-12-31 23:00", NUM).mammogram(ts("2026-12-31", "23:00:00"))
case("num-fail-mammogram-after-period",
     "mammogram on 2027-01-01 (after the period)", IN).mammogram(ts("2027-01-01", "09:00:00"))
case("num-pass-mammogram-period-ends-oct-1",
     "mammogram effectivePeriod 2024-09-30 to 2024-10-01: ends in the look-back", NUM
     ).mammogram(period=(ts("2024-09-30", "22:00:00"), ts("2024-10-01", "01:00:00")))
case("num-fail-mammogram-period-ends-after-period",
     "mammogram effectivePeriod 2026-12-31 to 2027-01-01: ends after the period", IN
     ).mammogram(period=(ts("2026-12-31", "22:00:00"), ts("2027-01-01", "01:00:00")))
case("num-pass-diagnostic-mammogram-amended",
     "bilateral diagnostic mammogram (26346-7), status amended", NUM
     ).mammogram(code="26346-7", status="amended")
case("num-pass-status-corrected", "mammogram with status corrected", NUM).mammogram(status="corrected")
case("num-fail-status-preliminary", "mammogram with status preliminary", IN).mammogram(status="preliminary")
case("num-fail-status-cancelled", "mammogram with status cancelled", IN).mammogram(status="cancelled")
case("num-fail-category-laboratory",
     "mammogram with category laboratory, not imaging", IN).mammogram(category="laboratory")

# --- Denominator exclusions: hospice ----------------------------------------
c = case("denex-hospice-inpatient-discharge-home",
         "inpatient stay ending in the period, discharged home for hospice care", DENEX)
c.encounter(SNOMED, "32485007", ts("2026-06-01"), ts("2026-06-05"), klass="IMP",
            discharge="428361000124107")
c = case("denex-fail-hospice-discharge-before-period",
         "inpatient stay discharged to hospice facility ending 2025-12-31", IN)
c.encounter(SNOMED, "32485007", ts("2025-12-20"), ts("2025-12-31", "10:00:00"), klass="IMP",
            discharge="428371000124100")
c = case("denex-hospice-encounter-overlaps-period",
         "hospice encounter 2025-12-15 to 2026-01-01 (overlaps the period)", DENEX)
c.encounter(SNOMED, "183920000", ts("2025-12-15"), ts("2026-01-01", "10:00:00"))
case("denex-hospice-assessment-yes", "Hospice care [MDS] assessment answered Yes in the period",
     DENEX).observation(LOINC, "45755-6", when=ts("2026-04-01"), category="survey",
                        value=(SNOMED, "373066001"))
case("denex-hospice-order", "hospice care ordered (ServiceRequest) in the period",
     DENEX).service_request(SNOMED, "385763009", ts("2026-08-01"))
case("denex-hospice-procedure", "hospice care procedure performed in the period",
     DENEX).procedure(SNOMED, "385763009", when=ts("2026-08-01"))
case("denex-hospice-diagnosis", "hospice diagnosis active in the period",
     DENEX).condition(SNOMED, "170935008", ts("2026-02-01"))

# --- Denominator exclusions: mastectomy -------------------------------------
case("denex-bilateral-mastectomy-procedure", "bilateral mastectomy (22418005) in 2015",
     DENEX).procedure(SNOMED, "22418005", when=ts("2015-06-01"))
case("denex-bilateral-mastectomy-icd10pcs-last-day",
     "bilateral breast resection (ICD-10-PCS 0HTV0ZZ) on the last day of the period",
     DENEX).procedure(ICD10PCS, "0HTV0ZZ", when=ts("2026-12-31", "10:00:00"))
case("denex-fail-bilateral-mastectomy-after-period",
     "bilateral mastectomy on 2027-01-02 (after the period)", IN
     ).procedure(SNOMED, "22418005", when=ts("2027-01-02"))
case("denex-fail-bilateral-mastectomy-not-completed",
     "bilateral mastectomy procedure in progress (not completed)", IN
     ).procedure(SNOMED, "22418005", when=ts("2026-02-01"), status="in-progress")
case("denex-history-bilateral-mastectomy-diagnosis",
     "history of bilateral mastectomy (Z90.13) recorded 2018", DENEX
     ).condition(ICD10CM, "Z90.13", ts("2018-03-01"), category="encounter-diagnosis")
case("denex-fail-history-bilateral-mastectomy-refuted",
     "history of bilateral mastectomy, verification refuted", IN
     ).condition(ICD10CM, "Z90.13", ts("2018-03-01"), verification="refuted")
case("denex-fail-history-bilateral-mastectomy-after-period",
     "history of bilateral mastectomy with onset 2027-01-01", IN
     ).condition(ICD10CM, "Z90.13", ts("2027-01-01"))
c = case("denex-right-and-left-mastectomy-procedures",
         "right mastectomy (2010) and left mastectomy (2019) procedures", DENEX)
c.procedure(SNOMED, "429400009", when=ts("2010-04-01"))
c.procedure(SNOMED, "428571003", when=ts("2019-09-01"))
c = case("denex-right-diagnosis-left-procedure",
         "status post right mastectomy (Z90.11) and left mastectomy procedure", DENEX)
c.condition(ICD10CM, "Z90.11", ts("2012-01-15"), clinical="inactive")
c.procedure(ICD10PCS, "0HTU0ZZ", when=ts("2020-05-05"))
c = case("denex-right-procedure-left-diagnosis",
         "right mastectomy procedure and status post left mastectomy (429009003)", DENEX)
c.procedure(ICD10PCS, "0HTT0ZZ", when=ts("2016-05-05"))
c.condition(SNOMED, "429009003", ts("2021-07-01"), category="encounter-diagnosis")
c = case("denex-fail-right-mastectomy-only",
         "right mastectomy procedure and status post right mastectomy only", NUM)
c.procedure(SNOMED, "429400009", when=ts("2010-04-01"))
c.condition(ICD10CM, "Z90.11", ts("2010-04-02"))
c.mammogram()
c = case("denex-fail-left-mastectomy-second-side-after-period",
         "left mastectomy 2019 and right mastectomy procedure 2027-01-03 (after the period)", IN)
c.procedure(SNOMED, "428571003", when=ts("2019-09-01"))
c.procedure(SNOMED, "429400009", when=ts("2027-01-03"))
c = case("denex-unspecified-laterality-right-bodysite-and-left-procedure",
         "unilateral mastectomy of unspecified laterality (Z90.10) with bodySite Right, "
         "and a left mastectomy procedure", DENEX)
c.condition(ICD10CM, "Z90.10", ts("2014-02-01"), body_site="24028007")
c.procedure(SNOMED, "428571003", when=ts("2019-09-01"))
c = case("denex-fail-unspecified-laterality-no-bodysite-and-left-procedure",
         "unilateral mastectomy of unspecified laterality without bodySite, and a left "
         "mastectomy procedure", IN)
c.condition(ICD10CM, "Z90.10", ts("2014-02-01"))
c.procedure(SNOMED, "428571003", when=ts("2019-09-01"))

# --- Denominator exclusions: palliative care --------------------------------
case("denex-palliative-care-encounter", "palliative care encounter in the period",
     DENEX).encounter(SNOMED, "305284002", ts("2026-09-09"), ts("2026-09-09", "10:00:00"))
case("denex-palliative-care-diagnosis", "palliative care diagnosis (Z51.5) in the period",
     DENEX).condition(ICD10CM, "Z51.5", ts("2026-09-09"), category="encounter-diagnosis")
case("denex-palliative-care-intervention", "palliative care intervention performed in the period",
     DENEX).procedure(SNOMED, "103735009", when=ts("2026-10-10"))
case("denex-palliative-facit-pal-assessment", "FACIT-Pal assessment in the period",
     DENEX).observation(LOINC, "71007-9", when=ts("2026-10-10"), category="survey")
case("denex-fail-palliative-encounter-next-year",
     "palliative care encounter on 2027-01-01 (after the period)", IN
     ).encounter(SNOMED, "305284002", ts("2027-01-01"), ts("2027-01-01", "10:00:00"))

# --- Denominator exclusions: frailty and advanced illness, nursing home -----
c = case("denex-age66-frailty-device-and-advanced-illness",
         "66 at the end of the period (born 1960-12-31), wheelchair ordered, Alzheimer's in "
         "the year before", DENEX, birth="1960-12-31")
c.device_request("183240000", ts("2026-04-04"))
c.condition(ICD10CM, "G30.9", ts("2025-03-01"), category="encounter-diagnosis")
c = case("denex-fail-age65-frailty-and-advanced-illness",
         "65 at the end of the period (born 1961-01-01) with frailty and advanced illness", IN,
         birth="1961-01-01")
c.device_request("183240000", ts("2026-04-04"))
c.condition(ICD10CM, "G30.9", ts("2025-03-01"), category="encounter-diagnosis")
c = case("denex-frailty-encounter-and-dementia-medication",
         "70 yo, frailty encounter (99509) and active donepezil order", DENEX, birth="1956-02-02")
c.encounter(CPT, "99509", ts("2026-05-05"), ts("2026-05-05", "10:00:00"), klass="HH")
c.medication_request("1100184", ts("2025-11-01"), ts("2025-11-01"), ts("2026-04-30"))
c = case("denex-frailty-symptom-and-advanced-illness-start-of-lookback",
         "70 yo, frailty symptom (R54) in the period, Parkinson's with onset 2025-01-01", DENEX,
         birth="1956-02-02")
c.observation(ICD10CM, "R54", when=ts("2026-02-02"), category=None)
c.condition(ICD10CM, "G20", ts("2025-01-01", "00:00:00"), category="encounter-diagnosis")
c = case("denex-fail-advanced-illness-before-lookback",
         "70 yo, frailty diagnosis in the period, advanced illness onset 2024-12-31", IN,
         birth="1956-02-02")
c.condition(ICD10CM, "L89.000", ts("2026-02-02"))
c.condition(ICD10CM, "G20", ts("2024-12-31"), category="encounter-diagnosis")
c = case("denex-medical-equipment-wheelchair-and-advanced-illness",
         "70 yo, Medical equipment used = wheelchair, advanced illness in the period", DENEX,
         birth="1956-02-02")
c.observation(LOINC, "98181-1", when=ts("2026-03-03"), category="survey",
              value=(SNOMED, "183240000"))
c.condition(ICD10CM, "G30.9", ts("2026-01-15"), category="encounter-diagnosis")
c = case("denex-fail-frailty-without-advanced-illness",
         "70 yo with a frailty diagnosis only, mammogram", NUM, birth="1956-02-02")
c.condition(ICD10CM, "L89.000", ts("2026-02-02"))
c.mammogram()
c = case("denex-nursing-home-age66", "66 yo, latest housing status: lives in nursing home",
         DENEX, birth="1960-06-30")
c.observation(LOINC, "71802-3", when=ts("2026-07-01"), category="survey",
              value=(SNOMED, "160734000"))
c = case("denex-fail-nursing-home-age65", "65 yo living in a nursing home", IN,
         birth="1961-03-01")
c.observation(LOINC, "71802-3", when=ts("2026-07-01"), category="survey",
              value=(SNOMED, "160734000"))
c = case("denex-fail-nursing-home-not-latest",
         "70 yo, nursing home in 2025 but latest housing status (2026) is another answer", IN,
         birth="1956-02-02")
c.observation(LOINC, "71802-3", when=ts("2025-07-01"), category="survey",
              value=(SNOMED, "160734000"))
c.observation(LOINC, "71802-3", when=ts("2026-07-01"), category="survey",
              value=(SNOMED, "105529008"))


def main():
    for entry in os.listdir(HERE):
        path = os.path.join(HERE, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
    slugs = [c.slug for c in cases]
    assert len(slugs) == len(set(slugs)), "duplicate case folder"
    for c in cases:
        c.write()
    with open(os.path.join(HERE, "README.txt"), "w") as f:
        for c in cases:
            f.write(f"{c.slug} = {c.name}\n")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
