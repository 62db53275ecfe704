-- CMS142 Diabetic Retinopathy: Communication with the Physician Managing
-- Ongoing Diabetes Care (eCQM FHIR CMS142FHIRDRCommunicationWithPhysician-
-- ManagingDiabetes 0.2.000, QI-Core 6.0.0), one row per person of the initial
-- population. Criteria follow the measure's CQL definition by definition;
-- the measure includes only QICoreCommon 4.0.000 (isActive,
-- prevalenceInterval), the version queries/lib/qicore-2025 follows, and uses
-- none of the shared exclusion views (it has no denominator exclusions): only
-- encounter_done is reused.
--
-- Precision: "during day of" compares days, as the CQL; "during" the
-- encounter's period and "after start of" it compare times (wall clock, as
-- Ward stores them). Ward conventions: a missing end time makes a period a
-- single moment; a missing encounter status counts as finished, a missing
-- observation status as final, a missing communication status as completed,
-- a missing clinical status as active, a missing condition category as any.
WITH
person AS (   -- AgeInYearsAt(date from start of "Measurement Period") >= 18
  SELECT pt.person_id, age_years(pt.birth_date, p.start_date) AS age
  FROM patient pt CROSS JOIN period p
),
-- "Qualifying Encounter During Day of Measurement Period": finished, not
-- virtual, the whole period during day of the measurement period.
qualifying_encounter AS (
  SELECT DISTINCT e.person_id, e.source, e.source_file, e.source_line,
         e.start_time, coalesce(e.end_time, e.start_time) AS end_time,
         e.start_day, e.end_day
  FROM encounter_done e CROSS JOIN period p
  WHERE e.valueset IN (
      '2.16.840.1.113883.3.464.1003.101.12.1001',  -- Office Visit
      '2.16.840.1.113883.3.526.3.1285',            -- Ophthalmological Services
      '2.16.840.1.113883.3.464.1003.101.12.1008',  -- Outpatient Consultation
      '2.16.840.1.113883.3.464.1003.101.12.1014',  -- Care Services in Long-Term Residential Facility
      '2.16.840.1.113883.3.464.1003.101.12.1012')  -- Nursing Facility Visit
    AND coalesce(e.encounter_class, '') <> 'virtual'   -- class !~ "virtual" (ActCode VR)
    AND e.start_day >= p.start_date AND e.end_day <= p.end_date
),
-- Diabetic retinopathy as a problem-list item, health concern or encounter
-- diagnosis: active (isActive()), and neither unconfirmed, refuted nor
-- entered in error.
diabetic_retinopathy AS (
  SELECT DISTINCT c.person_id, c.prevalence_start, c.prevalence_end
  FROM condition_vs c
  WHERE c.valueset = '2.16.840.1.113883.3.526.3.327'   -- Diabetic Retinopathy
    AND (c.categories IS NULL AND c.category IS NULL
         OR array_has(string_to_array(coalesce(c.categories, c.category), ' '), 'problem-list-item')
         OR array_has(string_to_array(coalesce(c.categories, c.category), ' '), 'health-concern')
         OR array_has(string_to_array(coalesce(c.categories, c.category), ' '), 'encounter-diagnosis'))
    AND coalesce(c.clinical_status, 'active') IN ('active', 'recurrence', 'relapse')
    AND (c.verification_status IS NULL
         OR c.verification_status NOT IN ('unconfirmed', 'refuted', 'entered-in-error'))
),
-- "Diabetic Retinopathy Encounter": a qualifying encounter whose days the
-- condition's prevalence interval overlaps.
diabetic_retinopathy_encounter AS (
  SELECT DISTINCT q.person_id, q.source_file, q.source_line,
         q.start_time, q.end_time, q.start_day, q.end_day
  FROM qualifying_encounter q
  JOIN diabetic_retinopathy d ON d.person_id = q.person_id
  WHERE d.prevalence_start <= q.end_day AND d.prevalence_end >= q.start_day
),
-- "Macular Exam Performed": a macular exam with a result, final, amended,
-- corrected or preliminary, its effective time during a diabetic
-- retinopathy encounter's period.
macular_exam_performed AS (
  SELECT o.person_id, min(CAST(o.effective_time AS DATE)) AS exam_date
  FROM observation_vs o
  JOIN diabetic_retinopathy_encounter e ON e.person_id = o.person_id
  WHERE o.valueset = '2.16.840.1.113883.3.526.3.1251'   -- Macular Exam
    AND coalesce(o.status, 'final') IN ('final', 'amended', 'corrected', 'preliminary')
    AND (o.value_num IS NOT NULL OR o.value_text IS NOT NULL OR o.value_code IS NOT NULL)
    AND o.effective_time >= e.start_time
    AND coalesce(o.effective_end, o.effective_time) <= e.end_time
  GROUP BY o.person_id
),
-- Completed communications of the findings, sent after the start of a
-- diabetic retinopathy encounter and during day of the measurement period;
-- one row per kind of finding.
communicated AS (
  SELECT c.person_id,
         CASE c.valueset
           WHEN '2.16.840.1.113883.3.526.3.1283' THEN 'severity'
           WHEN '2.16.840.1.113883.3.526.2.1391' THEN 'edema_absent'
           ELSE 'edema_present' END AS finding,
         min(CAST(c.sent_time AS DATE)) AS sent_date
  FROM communication_vs c
  JOIN diabetic_retinopathy_encounter e ON e.person_id = c.person_id
  CROSS JOIN period p
  WHERE c.valueset IN (
      '2.16.840.1.113883.3.526.3.1283',   -- Level of Severity of Retinopathy Findings
      '2.16.840.1.113883.3.526.2.1391',   -- Macular edema absent (situation)
      '2.16.840.1.113883.3.526.3.1320')   -- Macular Edema Findings Present
    AND coalesce(c.status, 'completed') = 'completed'
    AND c.sent_time > e.start_time
    AND c.sent_time >= p.start_ts AND c.sent_time < p.end_ts
  GROUP BY 1, 2
),
-- "Medical or Patient Reason for Not Communicating ..." (the three
-- CommunicationNotDone definitions): a communication of the findings not
-- done for a medical or patient reason, sent (Ward: or recorded) during a
-- diabetic retinopathy encounter's period. QI-Core's CommunicationNotDone
-- profile fixes the status to not-done, so one in progress, stopped or
-- entered in error is no exception; a CSV source without a status is taken
-- at its reason (and a completed communication is in the numerator first).
not_communicated AS (
  SELECT c.person_id,
         min(CASE WHEN r.reason_valueset = '2.16.840.1.113883.3.526.3.1007'
                  THEN 'medical_reason' ELSE 'patient_reason' END) AS reason
  FROM communication_vs c
  JOIN communication_reason_vs r
    ON r.source = c.source AND r.source_file = c.source_file AND r.source_line = c.source_line
  JOIN diabetic_retinopathy_encounter e ON e.person_id = c.person_id
  WHERE c.valueset IN (
      '2.16.840.1.113883.3.526.3.1283',   -- Level of Severity of Retinopathy Findings
      '2.16.840.1.113883.3.526.2.1391',   -- Macular edema absent (situation)
      '2.16.840.1.113883.3.526.3.1320')   -- Macular Edema Findings Present
    AND r.reason_valueset IN ('2.16.840.1.113883.3.526.3.1007',   -- Medical Reason
                              '2.16.840.1.113883.3.526.3.1008')   -- Patient Reason
    AND (c.status IS NULL OR c.status = 'not-done')
    AND c.sent_time >= e.start_time AND c.sent_time <= e.end_time
  GROUP BY c.person_id
),
initial_population AS (
  SELECT pe.person_id, pe.age, min(e.start_day) AS first_encounter_date
  FROM person pe
  JOIN diabetic_retinopathy_encounter e ON e.person_id = pe.person_id
  WHERE pe.age >= 18
  GROUP BY pe.person_id, pe.age
),
findings AS (
  SELECT person_id,
         max(CASE WHEN finding = 'severity' THEN sent_date END) AS severity_sent_date,
         max(CASE WHEN finding <> 'severity' THEN sent_date END) AS edema_sent_date,
         bool_or(finding = 'edema_absent') AS edema_absent,
         bool_or(finding = 'edema_present') AS edema_present
  FROM communicated GROUP BY person_id
)
SELECT
  ip.person_id,
  true AS initial_population,
  mx.person_id IS NOT NULL AS denominator,
  false AS denominator_exclusion,
  f.severity_sent_date IS NOT NULL AND f.edema_sent_date IS NOT NULL AS numerator,
  nc.person_id IS NOT NULL AS denominator_exception,
  ip.age,
  ip.first_encounter_date,
  mx.exam_date AS macular_exam_date,
  f.severity_sent_date,
  f.edema_sent_date,
  CASE WHEN f.edema_present THEN 'present' WHEN f.edema_absent THEN 'absent' END AS macular_edema_communicated,
  nc.reason AS exception_reason
FROM initial_population ip
LEFT JOIN macular_exam_performed mx ON mx.person_id = ip.person_id
LEFT JOIN findings f ON f.person_id = ip.person_id
LEFT JOIN not_communicated nc ON nc.person_id = ip.person_id
