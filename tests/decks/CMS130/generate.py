#!/usr/bin/env python3
"""Generates the hand-written CMS130 (Colorectal Cancer Screening, FHIR 0.4.000)
test deck: one folder per case with bundle.json and MeasureReport.json, plus
README.txt. Expected populations come from the measure's CQL (measurement
period 2026-01-01..2026-12-31). Run from anywhere: python3 generate.py"""

import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURE = "https://madie.cms.gov/Measure/CMS130FHIRColorectalCancerScreening"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"

# Qualifying encounter codes
OFFICE = (CPT, "99213")
AWV = (HCPCS, "G0438")
VIRTUAL = (CPT, "98970")

# Screening codes
FOBT = (LOINC, "2335-8")
SDNA = (LOINC, "77354-9")
CT_COLONOGRAPHY = (LOINC, "60515-4")
SIGMOIDOSCOPY = (CPT, "45330")
COLONOSCOPY = (CPT, "45378")

# Exclusion codes
COLON_CANCER_ICD = (ICD10, "C18.0")
COLON_CANCER_SCT = (SNOMED, "363406005")
TOTAL_COLECTOMY = (CPT, "44150")
HOSPICE_ENCOUNTER = (HCPCS, "G9473")
INPATIENT = (SNOMED, "183452005")
HOSPICE_AMBULATORY = (CPT, "99377")
HOSPICE_DIAGNOSIS = (SNOMED, "170935008")
PALLIATIVE_ENCOUNTER = (HCPCS, "M1017")
PALLIATIVE_INTERVENTION = (SNOMED, "103735009")
FACIT_PAL = (LOINC, "71007-9")
HOSPICE_MDS = (LOINC, "45755-6")
YES = (SNOMED, "373066001")
FRAILTY_DEVICE = (SNOMED, "1255320005")   # wheeled walker
FRAILTY_DIAGNOSIS = (ICD10, "L89.001")
ADVANCED_ILLNESS = (ICD10, "A81.00")
DEMENTIA_MED = (RXNORM, "1100184")
HOUSING_STATUS = (LOINC, "71802-3")
LIVES_IN_NURSING_HOME = (SNOMED, "160734000")
LIVES_AT_HOME = (SNOMED, "160943002")     # lives with family (not a nursing home)

DEFAULT_BIRTH = "1966-05-15"   # 60 at the end of 2026


def cc(code, display=None):
    coding = {"system": code[0], "code": code[1]}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


class Case:
    def __init__(self, slug, name, birth=DEFAULT_BIRTH, gender="female"):
        self.slug = slug
        self.name = name
        self.pid = "cms130-" + slug
        self.n = 0
        self.resources = [{
            "resourceType": "Patient",
            "id": self.pid,
            "name": [{"use": "official", "family": "Test", "given": [slug]}],
            "gender": gender,
            "birthDate": birth,
        }]

    def rid(self, kind):
        self.n += 1
        return f"{self.pid}-{kind}-{self.n}"

    def subject(self):
        return {"reference": "Patient/" + self.pid}

    def encounter(self, code=OFFICE, start="2026-03-10T09:00:00Z", end="2026-03-10T09:30:00Z",
                  status="finished", klass="AMB", discharge=None):
        r = {
            "resourceType": "Encounter", "id": self.rid("enc"), "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
            "type": [cc(code)], "subject": self.subject(),
            "period": {"start": start, "end": end},
        }
        if discharge:
            r["hospitalization"] = {"dischargeDisposition": cc((SNOMED, discharge))}
        self.resources.append(r)
        return self

    def observation(self, code, effective=None, period=None, status="final", category="laboratory",
                    value=None, issued=None):
        r = {
            "resourceType": "Observation", "id": self.rid("obs"), "status": status,
            "code": cc(code), "subject": self.subject(),
        }
        if category:
            r["category"] = [cc((OBS_CAT, category))]
        if effective:
            r["effectiveDateTime"] = effective
        if period:
            r["effectivePeriod"] = {"start": period[0], "end": period[1]}
        if issued:
            r["issued"] = issued
        if value is not None:
            if isinstance(value, tuple):
                r["valueCodeableConcept"] = cc(value)
            elif isinstance(value, (int, float)):
                r["valueQuantity"] = {"value": value, "unit": "ng/mL",
                                      "system": "http://unitsofmeasure.org", "code": "ng/mL"}
            else:
                r["valueString"] = value
        self.resources.append(r)
        return self

    def procedure(self, code, performed=None, period=None, status="completed"):
        r = {
            "resourceType": "Procedure", "id": self.rid("proc"), "status": status,
            "code": cc(code), "subject": self.subject(),
        }
        if performed:
            r["performedDateTime"] = performed
        if period:
            r["performedPeriod"] = {"start": period[0], "end": period[1]}
        self.resources.append(r)
        return self

    def condition(self, code, onset, abatement=None, clinical="active", verification="confirmed",
                  category="encounter-diagnosis"):
        r = {
            "resourceType": "Condition", "id": self.rid("cond"),
            "category": [cc((COND_CAT, category))],
            "code": cc(code), "subject": self.subject(),
            "onsetDateTime": onset, "recordedDate": onset,
        }
        if clinical:
            r["clinicalStatus"] = cc((COND_CLIN, clinical))
        if verification:
            r["verificationStatus"] = cc((COND_VER, verification))
        if abatement:
            r["abatementDateTime"] = abatement
        self.resources.append(r)
        return self

    def service_request(self, code, authored, status="active", intent="order"):
        self.resources.append({
            "resourceType": "ServiceRequest", "id": self.rid("sr"), "status": status,
            "intent": intent, "code": cc(code), "subject": self.subject(), "authoredOn": authored,
        })
        return self

    def device_request(self, code, authored, status="active", intent="order"):
        self.resources.append({
            "resourceType": "DeviceRequest", "id": self.rid("dr"), "status": status,
            "intent": intent, "codeCodeableConcept": cc(code), "subject": self.subject(),
            "authoredOn": authored,
        })
        return self

    def medication_request(self, code, authored, status="active", intent="order", days=30):
        self.resources.append({
            "resourceType": "MedicationRequest", "id": self.rid("mr"), "status": status,
            "intent": intent, "medicationCodeableConcept": cc(code), "subject": self.subject(),
            "authoredOn": authored,
            "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                                   "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}],
            "dispenseRequest": {"quantity": {"value": days, "unit": "tablet"},
                                "expectedSupplyDuration": {"value": days, "unit": "days",
                                                           "system": "http://unitsofmeasure.org",
                                                           "code": "d"}},
        })
        return self

    def write(self, ip, den, denex, num):
        folder = os.path.join(HERE, self.slug)
        os.makedirs(folder, exist_ok=True)
        bundle = {"resourceType": "Bundle", "id": self.pid + "-bundle", "type": "collection",
                  "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in self.resources]}

        def pop(code, count):
            return {"code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/measure-population",
                                         "code": code}]}, "count": count}

        report = {
            "resourceType": "MeasureReport", "status": "complete", "type": "individual",
            "measure": MEASURE,
            "extension": [{"url": "http://hl7.org/fhir/us/cqfmeasures/StructureDefinition/cqfm-testCaseDescription",
                           "valueMarkdown": self.name}],
            "period": {"start": "2026-01-01", "end": "2026-12-31"},
            "group": [{"id": "Group_1", "population": [
                pop("initial-population", ip), pop("denominator", den),
                pop("denominator-exclusion", denex), pop("numerator", num)]}],
        }
        with open(os.path.join(folder, "bundle.json"), "w") as f:
            json.dump(bundle, f, indent=2)
            f.write("\n")
        with open(os.path.join(folder, "MeasureReport.json"), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


CASES = []


def case(slug, name, expect, birth=DEFAULT_BIRTH, gender="female", visit=True):
    """expect = (ip, den, denex, num); `visit` adds a default office visit in the period."""
    c = Case(slug, name, birth, gender)
    if visit:
        c.encounter()
    CASES.append((c, expect))
    return c


IN = (1, 1, 0, 0)      # initial population, not screened
NUM = (1, 1, 0, 1)     # screened
DENEX = (1, 1, 1, 0)   # excluded
OUT = (0, 0, 0, 0)     # not in the initial population

# ---- Initial population: age and qualifying encounter --------------------
case("ip-age46-born-last-day", "IP: turns 46 on the last day of the period (born 1980-12-31), office visit, no screening",
     IN, birth="1980-12-31")
case("ip-miss-age45", "IP miss: 45 at the end of the period (born 1981-01-01)", OUT, birth="1981-01-01")
case("ip-age75", "IP: 75 at the end of the period (born 1951-01-01, turns 76 the day after)", IN, birth="1951-01-01",
     gender="male")
case("ip-miss-age76", "IP miss: turns 76 on the last day of the period (born 1950-12-31)", OUT, birth="1950-12-31")
case("ip-miss-encounter-day-before-period", "IP miss: only office visit on 2025-12-31", OUT, visit=False) \
    .encounter(start="2025-12-31T10:00:00Z", end="2025-12-31T10:30:00Z")
case("ip-encounter-first-day", "IP: only office visit on the first day of the period", IN, visit=False) \
    .encounter(start="2026-01-01T10:00:00Z", end="2026-01-01T10:30:00Z")
case("ip-encounter-last-day", "IP: only office visit on the last day of the period", IN, visit=False) \
    .encounter(start="2026-12-31T10:00:00Z", end="2026-12-31T10:30:00Z")
case("ip-miss-encounter-crosses-period-start", "IP miss: visit starting 2025-12-31 and ending 2026-01-01 (not during the period)",
     OUT, visit=False).encounter(start="2025-12-31T14:00:00Z", end="2026-01-01T14:00:00Z")
case("ip-miss-encounter-cancelled", "IP miss: office visit in the period with status cancelled", OUT, visit=False) \
    .encounter(status="cancelled")
case("ip-virtual-encounter", "IP: virtual encounter (CPT 98970) in the period", IN, visit=False) \
    .encounter(code=VIRTUAL, klass="VR")
case("ip-annual-wellness-visit", "IP: annual wellness visit (HCPCS G0438) in the period", IN, visit=False) \
    .encounter(code=AWV)

# ---- Numerator: each test with its look-back ------------------------------
case("num-fobt-in-period", "NUM: FOBT (2335-8) with a result in the period", NUM) \
    .observation(FOBT, effective="2026-06-01T10:00:00Z", value=(SNOMED, "260385009"))
case("num-fobt-first-day-period-end", "NUM: FOBT whose effective period ends on the first day of the period",
     NUM).observation(FOBT, period=("2025-12-30T10:00:00Z", "2026-01-01T10:00:00Z"), value=(SNOMED, "260385009"))
case("num-miss-fobt-day-before-period", "NUM miss: FOBT with a result on 2025-12-31", IN) \
    .observation(FOBT, effective="2025-12-31T10:00:00Z", value=(SNOMED, "260385009"))
case("num-miss-fobt-no-value", "NUM miss: FOBT in the period without a result value", IN) \
    .observation(FOBT, effective="2026-06-01T10:00:00Z")
case("num-miss-fobt-preliminary", "NUM miss: FOBT in the period with a result, status preliminary", IN) \
    .observation(FOBT, effective="2026-06-01T10:00:00Z", status="preliminary", value=(SNOMED, "260385009"))
case("num-fobt-amended-quantity", "NUM: FOBT with a quantity result, status amended, on the last day of the period",
     NUM).observation((LOINC, "29771-3"), effective="2026-12-31T10:00:00Z", status="amended", value=12)
case("num-sdna-fit-two-years-edge", "NUM: stool DNA with FIT test (77354-9) on 2024-01-01 (start of 2-year look-back)",
     NUM).observation(SDNA, effective="2024-01-01T10:00:00Z", value=(SNOMED, "260385009"))
case("num-miss-sdna-fit-too-old", "NUM miss: stool DNA with FIT test on 2023-12-31", IN) \
    .observation(SDNA, effective="2023-12-31T10:00:00Z", value=(SNOMED, "260385009"))
case("num-sigmoidoscopy-four-years-edge", "NUM: flexible sigmoidoscopy (45330) on 2022-01-01 (start of 4-year look-back)",
     NUM).procedure(SIGMOIDOSCOPY, performed="2022-01-01T10:00:00Z")
case("num-miss-sigmoidoscopy-too-old", "NUM miss: flexible sigmoidoscopy on 2021-12-31", IN) \
    .procedure(SIGMOIDOSCOPY, performed="2021-12-31T10:00:00Z")
case("num-ct-colonography-four-years-edge", "NUM: CT colonography (60515-4, imaging) on 2022-01-01, no value needed",
     NUM).observation(CT_COLONOGRAPHY, effective="2022-01-01T10:00:00Z", category="imaging")
case("num-miss-ct-colonography-too-old", "NUM miss: CT colonography (imaging) on 2021-12-31", IN) \
    .observation(CT_COLONOGRAPHY, effective="2021-12-31T10:00:00Z", category="imaging")
case("num-miss-ct-colonography-not-imaging", "NUM miss: CT colonography in the period with category laboratory, not imaging",
     IN).observation(CT_COLONOGRAPHY, effective="2026-04-01T10:00:00Z", category="laboratory")
case("num-colonoscopy-nine-years-edge", "NUM: colonoscopy (45378) on 2017-01-01 (start of 9-year look-back)", NUM) \
    .procedure(COLONOSCOPY, performed="2017-01-01T10:00:00Z")
case("num-colonoscopy-period-ends-at-edge", "NUM: colonoscopy performed 2016-12-31 to 2017-01-01 (ends in the look-back)",
     NUM).procedure(COLONOSCOPY, period=("2016-12-31T12:00:00Z", "2017-01-01T12:00:00Z"))
case("num-miss-colonoscopy-too-old", "NUM miss: colonoscopy on 2016-12-31", IN) \
    .procedure(COLONOSCOPY, performed="2016-12-31T10:00:00Z")
case("num-miss-colonoscopy-not-completed", "NUM miss: colonoscopy in the period with status not-done", IN) \
    .procedure(COLONOSCOPY, performed="2026-05-01T10:00:00Z", status="not-done")

# ---- Denominator exclusions -----------------------------------------------
case("denex-hospice-encounter", "DENEX: hospice encounter (G9473) overlapping the period", DENEX) \
    .encounter(code=HOSPICE_ENCOUNTER, start="2025-12-20T10:00:00Z", end="2026-01-01T10:00:00Z")
case("denex-hospice-inpatient-discharge", "DENEX: inpatient stay ending in the period, discharged home for hospice care",
     DENEX).encounter(code=INPATIENT, klass="IMP", start="2026-02-01T10:00:00Z", end="2026-02-05T10:00:00Z",
                      discharge="428361000124107")
case("denex-hospice-assessment", "DENEX: hospice care [MDS] assessment answered yes in the period", DENEX) \
    .observation(HOSPICE_MDS, effective="2026-09-01T10:00:00Z", category="survey", value=YES)
case("denex-hospice-order", "DENEX: hospice care ambulatory order (99377) authored in the period", DENEX) \
    .service_request(HOSPICE_AMBULATORY, authored="2026-10-01T10:00:00Z")
case("denex-hospice-procedure", "DENEX: hospice care ambulatory performed (99377) in the period", DENEX) \
    .procedure(HOSPICE_AMBULATORY, performed="2026-10-01T10:00:00Z")
case("denex-hospice-diagnosis", "DENEX: hospice diagnosis (170935008) active in the period", DENEX) \
    .condition(HOSPICE_DIAGNOSIS, onset="2026-11-01T10:00:00Z", category="problem-list-item")
case("denex-colorectal-cancer-history", "DENEX: colorectal cancer (C18.0) diagnosed 2010, resolved 2012 (past history)",
     DENEX).condition(COLON_CANCER_ICD, onset="2010-03-01T10:00:00Z", abatement="2012-03-01T10:00:00Z",
                      clinical="resolved", category="problem-list-item")
case("denex-colorectal-cancer-last-day", "DENEX: colorectal cancer (SNOMED) with onset on the last day of the period",
     DENEX).condition(COLON_CANCER_SCT, onset="2026-12-31T10:00:00Z")
case("denex-miss-colorectal-cancer-after-period", "DENEX miss: colorectal cancer with onset 2027-01-01", IN) \
    .condition(COLON_CANCER_ICD, onset="2027-01-01T10:00:00Z")
case("denex-miss-colorectal-cancer-refuted", "DENEX miss: colorectal cancer diagnosis refuted", IN) \
    .condition(COLON_CANCER_ICD, onset="2020-01-01T10:00:00Z", verification="refuted")
case("denex-total-colectomy", "DENEX: total colectomy (44150) in 2005", DENEX) \
    .procedure(TOTAL_COLECTOMY, performed="2005-06-01T10:00:00Z")
case("denex-total-colectomy-last-day", "DENEX: total colectomy on the last day of the period, with a colonoscopy",
     DENEX).procedure(TOTAL_COLECTOMY, performed="2026-12-31T10:00:00Z") \
    .procedure(COLONOSCOPY, performed="2026-03-01T10:00:00Z")
case("denex-miss-total-colectomy-after-period", "DENEX miss: total colectomy on 2027-01-01", IN) \
    .procedure(TOTAL_COLECTOMY, performed="2027-01-01T10:00:00Z")
case("denex-frailty-advanced-illness-age66", "DENEX: 66 (born 1960-12-31), frailty diagnosis in the period, advanced "
     "illness with onset 2025-01-01 (year before)", DENEX, birth="1960-12-31") \
    .condition(FRAILTY_DIAGNOSIS, onset="2026-04-01T10:00:00Z") \
    .condition(ADVANCED_ILLNESS, onset="2025-01-01T10:00:00Z")
case("denex-miss-frailty-advanced-illness-age65", "DENEX miss: 65 (born 1961-01-01) with frailty and advanced illness",
     IN, birth="1961-01-01").condition(FRAILTY_DIAGNOSIS, onset="2026-04-01T10:00:00Z") \
    .condition(ADVANCED_ILLNESS, onset="2026-02-01T10:00:00Z")
case("denex-frailty-device-dementia-medication", "DENEX: 70, frailty device order (walker) in the period and active "
     "dementia medication order in the period", DENEX, birth="1956-03-03") \
    .device_request(FRAILTY_DEVICE, authored="2026-03-01T10:00:00Z") \
    .medication_request(DEMENTIA_MED, authored="2026-03-01T10:00:00Z")
case("denex-miss-frailty-only", "DENEX miss: 70 with a frailty diagnosis but no advanced illness or dementia medication",
     IN, birth="1956-03-03").condition(FRAILTY_DIAGNOSIS, onset="2026-04-01T10:00:00Z")
case("denex-nursing-home-age66", "DENEX: 66, housing status 'lives in nursing home' before the period", DENEX,
     birth="1960-12-31").observation(HOUSING_STATUS, effective="2025-06-01T10:00:00Z", category="survey",
                                     value=LIVES_IN_NURSING_HOME)
case("denex-miss-nursing-home-superseded", "DENEX miss: 70, lives in nursing home in 2025, later housing status "
     "(2026) not a nursing home", IN, birth="1956-03-03") \
    .observation(HOUSING_STATUS, effective="2025-06-01T10:00:00Z", category="survey", value=LIVES_IN_NURSING_HOME) \
    .observation(HOUSING_STATUS, effective="2026-06-01T10:00:00Z", category="survey", value=LIVES_AT_HOME)
case("denex-miss-nursing-home-age65", "DENEX miss: 65 (born 1961-01-01), lives in nursing home", IN,
     birth="1961-01-01").observation(HOUSING_STATUS, effective="2026-06-01T10:00:00Z", category="survey",
                                     value=LIVES_IN_NURSING_HOME)
case("denex-palliative-encounter", "DENEX: palliative care encounter (M1017) in the period", DENEX) \
    .encounter(code=PALLIATIVE_ENCOUNTER, start="2026-08-01T10:00:00Z", end="2026-08-01T11:00:00Z")
case("denex-palliative-assessment", "DENEX: FACIT-Pal assessment (71007-9) in the period", DENEX) \
    .observation(FACIT_PAL, effective="2026-08-01T10:00:00Z", category="survey", value=40)
case("denex-palliative-intervention-with-fobt", "DENEX: palliative care intervention in the period, FOBT done too "
     "(excluded, not in numerator)", DENEX) \
    .procedure(PALLIATIVE_INTERVENTION, performed="2026-08-01T10:00:00Z") \
    .observation(FOBT, effective="2026-06-01T10:00:00Z", value=(SNOMED, "260385009"))


def main():
    for entry in os.listdir(HERE):
        path = os.path.join(HERE, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
    slugs = set()
    lines = []
    for c, expect in CASES:
        assert c.slug not in slugs, c.slug
        slugs.add(c.slug)
        c.write(*expect)
        lines.append(f"{c.slug} = {c.name}")
    with open(os.path.join(HERE, "README.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(CASES)} cases written")


if __name__ == "__main__":
    main()
