#!/usr/bin/env python3
"""Writes the hand-written CMS142 test deck (MADiE layout) beside this script.

CMS142FHIRDRCommunicationWithPhysicianManagingDiabetes 0.2.000, measurement
period 2026-01-01..2026-12-31. One folder per case with bundle.json (a
collection Bundle: the Patient and the case's QI-Core resources) and
MeasureReport.json (the expected populations, read from the CQL), and
README.txt listing the cases. Run: python3 generate.py
"""
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURE = "https://madie.cms.gov/Measure/CMS142FHIRDRCommunicationWithPhysicianManagingDiabetes"

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# Codes of the measure's value sets.
OFFICE_VISIT = (CPT, "99213")                    # Office Visit
OPHTHALMOLOGICAL = (CPT, "92004")                # Ophthalmological Services
CONSULTATION = (CPT, "99243")                    # Outpatient Consultation
LONG_TERM_CARE = (SNOMED, "209099002")           # Care Services in Long-Term Residential Facility
NURSING_FACILITY = (CPT, "99304")                # Nursing Facility Visit
DIABETIC_RETINOPATHY = (ICD10, "E11.319")        # Diabetic Retinopathy
DIABETIC_RETINOPATHY_SCT = (SNOMED, "193349004") # Diabetic Retinopathy (SNOMED CT)
DIABETES_NO_RETINOPATHY = (ICD10, "E11.9")       # not Diabetic Retinopathy
MACULAR_EXAM = (LOINC, "32451-7")                # Macular Exam
SEVERITY = (SNOMED, "312903003")                 # Level of Severity of Retinopathy Findings
EDEMA_ABSENT = (SNOMED, "428341000124108")       # Macular edema absent (situation)
EDEMA_PRESENT = (SNOMED, "37231002")             # Macular Edema Findings Present
SEVERITY_AND_EDEMA = (SNOMED, "399872003")       # in both Level of Severity and Edema Present
OTHER_FINDING = (SNOMED, "386661006")             # in none of the communication value sets
MEDICAL_REASON = (SNOMED, "183932001")           # Medical Reason
PATIENT_REASON = (SNOMED, "182890002")           # Patient Reason
OTHER_REASON = (SNOMED, "410543007")             # in neither reason value set
EXAM_VALUE = (SNOMED, "428341000124108")         # exam result (any value)

COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"

DAY = "2026-03-10"


def cc(code, display=None):
    system, value = code
    c = {"system": system, "code": value}
    if display:
        c["display"] = display
    return {"coding": [c]}


class Case:
    def __init__(self, slug, name, pid):
        self.slug, self.name, self.pid = slug, name, pid
        self.birth = "1960-05-15"
        self.resources = []
        self.n = 0

    def _id(self, kind):
        self.n += 1
        return f"{self.pid}-{kind}-{self.n}"

    def subject(self):
        return {"reference": f"Patient/{self.pid}"}

    def encounter(self, start=f"{DAY}T09:00:00", end=f"{DAY}T10:00:00", code=OFFICE_VISIT,
                  status="finished", klass="AMB"):
        r = {"resourceType": "Encounter", "id": self._id("enc"),
             "meta": {"profile": ["http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-encounter"]},
             "status": status,
             "class": {"system": ACT, "code": klass},
             "type": [cc(code)], "subject": self.subject(),
             "period": {"start": start, "end": end}}
        self.resources.append(r)
        return r

    def condition(self, code=DIABETIC_RETINOPATHY, onset="2025-06-01", clinical="active",
                  verification="confirmed", category="encounter-diagnosis", abatement=None):
        r = {"resourceType": "Condition", "id": self._id("cond"),
             "clinicalStatus": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": clinical}]},
             "category": [{"coding": [{"system": COND_CAT, "code": category}]}],
             "code": cc(code), "subject": self.subject(), "onsetDateTime": onset}
        if verification:
            r["verificationStatus"] = {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]}
        if abatement:
            r["abatementDateTime"] = abatement
        self.resources.append(r)
        return r

    def exam(self, when=f"{DAY}T09:30:00", status="final", value=True, code=MACULAR_EXAM):
        r = {"resourceType": "Observation", "id": self._id("obs"), "status": status,
             "category": [{"coding": [{"system": OBS_CAT, "code": "exam"}]}],
             "code": cc(code), "subject": self.subject(), "effectiveDateTime": when}
        if value:
            r["valueCodeableConcept"] = cc(EXAM_VALUE)
        self.resources.append(r)
        return r

    def communication(self, code, sent=f"{DAY}T11:00:00", status="completed"):
        r = {"resourceType": "Communication", "id": self._id("com"),
             "meta": {"profile": ["http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-communication"]},
             "status": status, "category": [cc(code)], "subject": self.subject(),
             "sent": sent,
             "recipient": [{"reference": "Practitioner/pcp-1"}]}
        self.resources.append(r)
        return r

    def not_communicated(self, code, reason, sent=f"{DAY}T09:45:00"):
        r = {"resourceType": "Communication", "id": self._id("comnd"),
             "meta": {"profile": ["http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-communicationnotdone"]},
             "status": "not-done", "statusReason": cc(reason),
             "category": [cc(code)], "subject": self.subject(), "sent": sent}
        self.resources.append(r)
        return r

    def communicate_all(self, sent=f"{DAY}T11:00:00", edema=EDEMA_ABSENT):
        self.communication(SEVERITY, sent)
        self.communication(edema, sent)

    def write(self, ip, denom, numer, excep):
        folder = os.path.join(HERE, self.slug)
        os.makedirs(folder, exist_ok=True)
        patient = {"resourceType": "Patient", "id": self.pid,
                   "meta": {"profile": ["http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-patient"]},
                   "name": [{"family": "Test", "given": [self.slug]}],
                   "gender": "female", "birthDate": self.birth}
        bundle = {"resourceType": "Bundle", "id": f"{self.pid}-bundle", "type": "collection",
                  "entry": [{"resource": r} for r in [patient] + self.resources]}
        with open(os.path.join(folder, "bundle.json"), "w") as f:
            json.dump(bundle, f, indent=1)
            f.write("\n")

        def pop(code, count):
            return {"code": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/measure-population", "code": code}]},
                "count": count}
        report = {"resourceType": "MeasureReport", "status": "complete", "type": "individual",
                  "measure": MEASURE,
                  "extension": [{
                      "url": "http://hl7.org/fhir/us/cqfmeasures/StructureDefinition/cqfm-testCaseDescription",
                      "valueMarkdown": self.name}],
                  "period": {"start": "2026-01-01", "end": "2026-12-31"},
                  "group": [{"id": "Group_1", "population": [
                      pop("initial-population", ip), pop("denominator", denom),
                      pop("numerator", numer), pop("denominator-exception", excep)]}]}
        with open(os.path.join(folder, "MeasureReport.json"), "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


CASES = []


def case(slug, name, expected):
    """Decorator: builds the case with the standard patient, then writes it."""
    def wrap(build):
        c = Case(slug, name, f"cms142-{len(CASES) + 1:02d}")
        build(c)
        CASES.append((c, expected))
        return build
    return wrap


def full(c, **enc):
    """The standard record: a DR encounter, its diagnosis and a macular exam."""
    e = c.encounter(**enc)
    c.condition()
    c.exam()
    return e


# ---- Numerator ---------------------------------------------------------
@case("numer-severity-edema-absent", "Numerator: office visit with DR, macular exam, severity and absence of macular edema communicated", (1, 1, 1, 0))
def _(c):
    full(c)
    c.communicate_all(edema=EDEMA_ABSENT)


@case("numer-severity-edema-present", "Numerator: severity and presence of macular edema communicated", (1, 1, 1, 0))
def _(c):
    full(c)
    c.communicate_all(edema=EDEMA_PRESENT)


@case("numer-one-communication-in-both-value-sets", "Numerator: one communication coded in both Level of Severity and Macular Edema Findings Present", (1, 1, 1, 0))
def _(c):
    full(c)
    c.communication(SEVERITY_AND_EDEMA)


@case("numer-fail-severity-only", "Numerator miss: severity communicated, no macular edema finding communicated", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communication(SEVERITY)


@case("numer-fail-edema-only", "Numerator miss: absence and presence of macular edema communicated, no severity", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communication(EDEMA_ABSENT)
    c.communication(EDEMA_PRESENT)


@case("numer-fail-wrong-category", "Numerator miss: severity communicated, edema communication coded outside the value sets", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communication(SEVERITY)
    c.communication(OTHER_FINDING)


@case("numer-fail-not-completed", "Numerator miss: edema communication in-progress (status not completed)", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communication(SEVERITY)
    c.communication(EDEMA_ABSENT, status="in-progress")


@case("numer-fail-sent-before-encounter", "Numerator miss: severity sent on the encounter day before the encounter starts", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communication(SEVERITY, sent=f"{DAY}T08:00:00")
    c.communication(EDEMA_ABSENT)


@case("numer-fail-sent-at-encounter-start", "Numerator miss: severity sent at the exact encounter start (not after)", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communication(SEVERITY, sent=f"{DAY}T09:00:00")
    c.communication(EDEMA_ABSENT)


@case("numer-sent-one-second-after-start", "Numerator: communications sent one second after the encounter start", (1, 1, 1, 0))
def _(c):
    full(c)
    c.communicate_all(sent=f"{DAY}T09:00:01")


@case("numer-sent-last-day-of-period", "Numerator: communications sent on the last day of the measurement period", (1, 1, 1, 0))
def _(c):
    full(c)
    c.communicate_all(sent="2026-12-31T23:00:00")


@case("numer-fail-sent-after-period", "Numerator miss: communications sent the day after the measurement period", (1, 1, 0, 0))
def _(c):
    full(c)
    c.communicate_all(sent="2027-01-01T08:00:00")


@case("numer-sent-after-earlier-encounter", "Numerator: two DR encounters, exam in the second, communications between them (after the first's start)", (1, 1, 1, 0))
def _(c):
    c.encounter(start="2026-02-01T09:00:00", end="2026-02-01T10:00:00")
    c.encounter(start="2026-05-01T09:00:00", end="2026-05-01T10:00:00")
    c.condition()
    c.exam(when="2026-05-01T09:30:00")
    c.communicate_all(sent="2026-03-01T09:00:00")


# ---- Initial population: age -------------------------------------------
@case("ip-age-18-on-first-day", "IP: turns 18 on the first day of the period, numerator met", (1, 1, 1, 0))
def _(c):
    c.birth = "2008-01-01"
    full(c)
    c.communicate_all()


@case("ip-fail-age-18-on-second-day", "IP miss: 17 on the first day (turns 18 on 2026-01-02)", (0, 0, 0, 0))
def _(c):
    c.birth = "2008-01-02"
    full(c)
    c.communicate_all()


@case("ip-age-90", "IP: 90 years old (no upper age limit), numerator met", (1, 1, 1, 0))
def _(c):
    c.birth = "1935-06-01"
    full(c)
    c.communicate_all()


# ---- Initial population: encounter ------------------------------------
@case("ip-ophthalmological-services", "IP: Ophthalmological Services encounter, numerator met", (1, 1, 1, 0))
def _(c):
    full(c, code=OPHTHALMOLOGICAL)
    c.communicate_all()


@case("ip-outpatient-consultation", "IP: Outpatient Consultation encounter, numerator met", (1, 1, 1, 0))
def _(c):
    full(c, code=CONSULTATION)
    c.communicate_all()


@case("ip-long-term-residential-care", "IP: Care Services in Long-Term Residential Facility encounter, numerator met", (1, 1, 1, 0))
def _(c):
    full(c, code=LONG_TERM_CARE)
    c.communicate_all()


@case("ip-nursing-facility-visit", "IP: Nursing Facility Visit encounter, numerator met", (1, 1, 1, 0))
def _(c):
    full(c, code=NURSING_FACILITY)
    c.communicate_all()


@case("ip-fail-virtual-encounter", "IP miss: office visit with class virtual (VR)", (0, 0, 0, 0))
def _(c):
    full(c, klass="VR")
    c.communicate_all()


@case("ip-fail-encounter-in-progress", "IP miss: office visit in-progress (status not finished)", (0, 0, 0, 0))
def _(c):
    full(c, status="in-progress")
    c.communicate_all()


@case("ip-fail-no-encounter", "IP miss: DR diagnosis, exam and communications but no qualifying encounter", (0, 0, 0, 0))
def _(c):
    c.condition()
    c.exam()
    c.communicate_all()


@case("ip-encounter-first-day", "IP: encounter on the first day of the period, numerator met", (1, 1, 1, 0))
def _(c):
    c.encounter(start="2026-01-01T08:00:00", end="2026-01-01T09:00:00")
    c.condition()
    c.exam(when="2026-01-01T08:30:00")
    c.communicate_all(sent="2026-01-01T10:00:00")


@case("ip-fail-encounter-day-before-period", "IP miss: encounter on 2025-12-31", (0, 0, 0, 0))
def _(c):
    c.encounter(start="2025-12-31T08:00:00", end="2025-12-31T09:00:00")
    c.condition()
    c.exam(when="2025-12-31T08:30:00")
    c.communicate_all(sent="2026-01-02T10:00:00")


@case("ip-fail-encounter-spans-period-start", "IP miss: encounter from 2025-12-31 23:00 to 2026-01-01 01:00 (not during the period)", (0, 0, 0, 0))
def _(c):
    c.encounter(start="2025-12-31T23:00:00", end="2026-01-01T01:00:00")
    c.condition()
    c.exam(when="2026-01-01T00:30:00")
    c.communicate_all(sent="2026-01-02T10:00:00")


@case("ip-encounter-last-day", "IP: encounter on the last day of the period, numerator met", (1, 1, 1, 0))
def _(c):
    c.encounter(start="2026-12-31T08:00:00", end="2026-12-31T09:00:00")
    c.condition()
    c.exam(when="2026-12-31T08:30:00")
    c.communicate_all(sent="2026-12-31T10:00:00")


@case("ip-fail-encounter-ends-after-period", "IP miss: encounter from 2026-12-31 23:00 to 2027-01-01 01:00", (0, 0, 0, 0))
def _(c):
    c.encounter(start="2026-12-31T23:00:00", end="2027-01-01T01:00:00")
    c.condition()
    c.exam(when="2026-12-31T23:30:00")
    c.communicate_all(sent="2026-12-31T23:45:00")


# ---- Initial population: diabetic retinopathy -------------------------
@case("ip-problem-list-item", "IP: DR as a problem-list item, numerator met", (1, 1, 1, 0))
def _(c):
    c.encounter()
    c.condition(category="problem-list-item")
    c.exam()
    c.communicate_all()


@case("ip-health-concern-recurrence", "IP: DR as a health concern with clinical status recurrence", (1, 1, 0, 0))
def _(c):
    c.encounter()
    c.condition(category="health-concern", clinical="recurrence")
    c.exam()


@case("ip-snomed-diagnosis", "IP: DR coded in SNOMED CT as a problem-list item, numerator met", (1, 1, 1, 0))
def _(c):
    c.encounter()
    c.condition(code=DIABETIC_RETINOPATHY_SCT, category="problem-list-item")
    c.exam()
    c.communicate_all()


@case("ip-condition-onset-on-encounter-day", "IP: DR onset later on the encounter's day (overlaps day of the encounter)", (1, 1, 1, 0))
def _(c):
    c.encounter()
    c.condition(onset=f"{DAY}T15:00:00")
    c.exam()
    c.communicate_all(sent=f"{DAY}T16:00:00")


@case("ip-fail-condition-onset-after-encounter", "IP miss: DR onset the day after the encounter", (0, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition(onset="2026-03-11")
    c.exam()
    c.communicate_all()


@case("ip-fail-condition-resolved", "IP miss: DR resolved after the encounter (clinical status not active)", (0, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition(clinical="resolved", abatement="2026-06-01")
    c.exam()
    c.communicate_all()


@case("ip-fail-condition-unconfirmed", "IP miss: DR verification status unconfirmed", (0, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition(verification="unconfirmed")
    c.exam()
    c.communicate_all()


@case("ip-fail-condition-refuted", "IP miss: DR verification status refuted", (0, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition(verification="refuted")
    c.exam()
    c.communicate_all()


@case("ip-condition-provisional", "IP: DR verification status provisional (only unconfirmed, refuted and entered-in-error are excluded)", (1, 1, 0, 0))
def _(c):
    c.encounter()
    c.condition(verification="provisional")
    c.exam()


@case("ip-fail-diabetes-without-retinopathy", "IP miss: diabetes without retinopathy (E11.9)", (0, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition(code=DIABETES_NO_RETINOPATHY)
    c.exam()
    c.communicate_all()


# ---- Denominator -------------------------------------------------------
@case("denom-fail-no-exam", "Denominator miss: DR encounter, no macular exam; communications do not count", (1, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition()
    c.communicate_all()


@case("denom-fail-exam-without-result", "Denominator miss: macular exam without a value", (1, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition()
    c.exam(value=False)
    c.communicate_all()


@case("denom-fail-exam-cancelled", "Denominator miss: macular exam cancelled", (1, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition()
    c.exam(status="cancelled")
    c.communicate_all()


@case("denom-exam-preliminary", "Denominator: preliminary macular exam, numerator met", (1, 1, 1, 0))
def _(c):
    c.encounter()
    c.condition()
    c.exam(status="preliminary")
    c.communicate_all()


@case("denom-exam-at-encounter-end", "Denominator: macular exam at the exact end of the encounter", (1, 1, 0, 0))
def _(c):
    c.encounter()
    c.condition()
    c.exam(when=f"{DAY}T10:00:00")


@case("denom-fail-exam-after-encounter", "Denominator miss: macular exam the same day, 30 minutes after the encounter ended", (1, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition()
    c.exam(when=f"{DAY}T10:30:00")
    c.communicate_all()


# ---- Denominator exceptions --------------------------------------------
@case("denexcep-medical-reason-severity", "Exception: severity not communicated for a medical reason during the encounter", (1, 1, 0, 1))
def _(c):
    full(c)
    c.not_communicated(SEVERITY, MEDICAL_REASON)
    c.communication(EDEMA_ABSENT)


@case("denexcep-patient-reason-edema-absent", "Exception: absence of macular edema not communicated for a patient reason", (1, 1, 0, 1))
def _(c):
    full(c)
    c.communication(SEVERITY)
    c.not_communicated(EDEMA_ABSENT, PATIENT_REASON)


@case("denexcep-medical-reason-edema-present", "Exception: presence of macular edema not communicated for a medical reason", (1, 1, 0, 1))
def _(c):
    full(c)
    c.not_communicated(EDEMA_PRESENT, MEDICAL_REASON)


@case("denexcep-fail-other-reason", "Exception miss: severity not communicated, reason in neither value set", (1, 1, 0, 0))
def _(c):
    full(c)
    c.not_communicated(SEVERITY, OTHER_REASON)


@case("denexcep-fail-after-encounter", "Exception miss: not-done communication dated the day after the encounter", (1, 1, 0, 0))
def _(c):
    full(c)
    c.not_communicated(SEVERITY, MEDICAL_REASON, sent="2026-03-11T09:00:00")


@case("denexcep-at-encounter-start", "Exception: not-done communication dated at the exact encounter start (during, closed)", (1, 1, 0, 1))
def _(c):
    full(c)
    c.not_communicated(SEVERITY, PATIENT_REASON, sent=f"{DAY}T09:00:00")


@case("denexcep-numerator-met", "Exception not counted: numerator met (and a not-done communication with a medical reason)", (1, 1, 1, 0))
def _(c):
    full(c)
    c.communicate_all()
    c.not_communicated(EDEMA_PRESENT, MEDICAL_REASON)


@case("denexcep-fail-no-exam", "Exception not counted: not in the denominator (no macular exam)", (1, 0, 0, 0))
def _(c):
    c.encounter()
    c.condition()
    c.not_communicated(SEVERITY, MEDICAL_REASON)


def main():
    for entry in os.listdir(HERE):
        path = os.path.join(HERE, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
    lines = []
    for c, (ip, denom, numer, excep) in CASES:
        c.write(ip, denom, numer, excep)
        lines.append(f"{c.slug} = {c.name}")
    with open(os.path.join(HERE, "README.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(CASES)} cases")


if __name__ == "__main__":
    main()
