-- CMS69 Preventive Care and Screening: Body Mass Index (BMI) Screening and
-- Follow-Up Plan (eCQM FHIR CMS69FHIRPCSBMIScreenAndFollowUp 0.3.000), one row
-- per person of the initial population. Criteria follow the measure's CQL,
-- definition by definition (CTEs are named after them), at day precision.
--
-- The measure includes Hospice 6.15.000, PalliativeCare 1.15.000 and Status
-- 1.13.000, older than the qicore-2025 shared views (6.18 / 1.18 / 1.15), so
-- its exclusions are CTEs here, not hospice_person / palliative_person. What
-- differs from those views:
--   - an encounter took place when finished, arrived, triaged, in progress or
--     on leave (Status 1.13 isEncounterPerformed), not only finished;
--   - the hospice order has intent `order` only (isInterventionOrder);
--   - diagnoses have no verification-status filter (no .verified());
--   - assessments need no category (Status 1.13 isAssessmentPerformed).
-- QICoreCommon 4.0.000 (isActive, prevalenceInterval, ...) is the version the
-- qicore-2025 set follows; the `condition` view's prevalence_start / _end are
-- its prevalenceInterval().
--
-- Ward data model notes:
--   - `reasons` holds every reason of a fact (statusReason, reasonCode and the
--     QI-Core notDoneReason / doNotPerformReason / reasonRefused extensions);
--     the CQL tests reasonCode for orders, procedures and MedicationNotRequested,
--     reasonRefused for ServiceNotRequested and notDoneReason for
--     ObservationCancelled: each is tested here against all the fact's reasons.
--   - a MedicationRequest is dated by `start_date` (dosage bounds start, else
--     authoredOn), standing in for authoredOn.
--   - [ServiceRequest] / [MedicationRequest] are the requests that are not
--     doNotPerform; [ServiceNotRequested] / [MedicationNotRequested] those
--     that are. The follow-up orders have no status or intent test (the CQL
--     has none).
--   - the QI-Core profiles retrieved are read from the data: [USCoreBMIProfile]
--     is a standalone BMI Observation with the category vital-signs,
--     [ConditionProblemsHealthConcerns] a condition categorized
--     problem-list-item or health-concern, [ConditionEncounterDiagnosis] one
--     categorized encounter-diagnosis.
-- Ward conventions: a missing status counts as the "done" status, a missing
-- end time makes a period a single moment, a missing category or clinical
-- status does not exclude a fact.
WITH
-- "Qualifying Encounter During Day Of Measurement Period": a finished,
-- non-virtual encounter to evaluate BMI within the period, with the
-- patient's age at its start ("AgeInYearsAt").
qualifying_encounter AS (
  SELECT DISTINCT e.person_id, CAST(e.start_time AS DATE) AS start_day,
         age_years(pt.birth_date, CAST(e.start_time AS DATE)) AS age
  FROM encounter_vs e
  JOIN patient pt ON pt.person_id = e.person_id
  CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.600.1.1751'             -- Encounter to Evaluate BMI
    AND coalesce(e.status, 'finished') = 'finished'
    AND e.encounter_class <> 'virtual'
    AND e.start_time >= p.start_ts AND coalesce(e.end_time, e.start_time) < p.end_ts
),
-- "Initial Population": such an encounter at age 18 or older.
initial_population AS (
  SELECT person_id, max(age) AS age, min(start_day) AS first_encounter_date,
         max(start_day) AS last_encounter_date
  FROM qualifying_encounter
  WHERE age >= 18
  GROUP BY person_id
),

-- Conditions of the QI-Core profiles the CQL retrieves: a condition is a
-- ConditionProblemsHealthConcerns when a category is problem-list-item or
-- health-concern, a ConditionEncounterDiagnosis when one is
-- encounter-diagnosis (a condition without category is either).
condition_profiled AS (
  SELECT c.*,
         cats IS NULL OR array_has(cats, 'problem-list-item') AS problem_list_item,
         cats IS NULL OR array_has(cats, 'health-concern') AS health_concern,
         cats IS NULL OR array_has(cats, 'problem-list-item') OR array_has(cats, 'health-concern')
           OR array_has(cats, 'encounter-diagnosis') AS problem_or_diagnosis
  FROM (SELECT *, string_to_array(coalesce(categories, category), ' ') AS cats FROM condition_vs) c
),

-- Hospice 6.15 "Has Hospice Services" (Status 1.13 filters).
encounter_performed AS (
  SELECT *, CAST(start_time AS DATE) AS start_day,
         CAST(coalesce(end_time, start_time) AS DATE) AS end_day
  FROM encounter_vs
  WHERE coalesce(status, 'finished') IN ('finished', 'arrived', 'triaged', 'in-progress', 'onleave')
),
has_hospice_services AS (
  SELECT e.person_id FROM encounter_performed e CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.666.5.307'              -- Encounter Inpatient
    AND e.discharge_disposition IN ('428361000124107', '428371000124100') -- discharged for hospice care
    AND e.end_time IS NOT NULL AND CAST(e.end_time AS DATE) BETWEEN p.start_date AND p.end_date
  UNION
  SELECT e.person_id FROM encounter_performed e CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.464.1003.1003'          -- Hospice Encounter
    AND e.start_day <= p.end_date AND e.end_day >= p.start_date
  UNION
  SELECT o.person_id FROM observation_final o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code = '45755-6'    -- Hospice care [MDS]
    AND o.value_code = '373066001'                                 -- Yes
    AND o.start_day <= p.end_date AND o.end_day >= p.start_date
  UNION
  SELECT s.person_id FROM service_request_vs s CROSS JOIN period p
  WHERE s.valueset = '2.16.840.1.113883.3.526.3.1584'              -- Hospice Care Ambulatory
    AND coalesce(s.status, 'active') IN ('active', 'completed')
    AND coalesce(s.intent, 'order') = 'order'
    AND s.authored_time >= p.start_ts AND s.authored_time < p.end_ts
  UNION
  SELECT r.person_id FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset = '2.16.840.1.113883.3.526.3.1584'              -- Hospice Care Ambulatory
    AND r.start_day <= p.end_date AND r.end_day >= p.start_date
  UNION
  SELECT c.person_id FROM condition_profiled c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.1165'           -- Hospice Diagnosis
    AND c.problem_or_diagnosis
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
),
-- PalliativeCare 1.15 "Has Palliative Care in the Measurement Period".
has_palliative_care AS (
  SELECT o.person_id FROM observation_final o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code = '71007-9'    -- FACIT-Pal
    AND o.start_day <= p.end_date AND o.end_day >= p.start_date
  UNION
  SELECT c.person_id FROM condition_profiled c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.1167'           -- Palliative Care Diagnosis
    AND c.problem_or_diagnosis
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
  UNION
  SELECT e.person_id FROM encounter_performed e CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.464.1003.101.12.1090'    -- Palliative Care Encounter
    AND e.start_day <= p.end_date AND e.end_day >= p.start_date
  UNION
  SELECT r.person_id FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset = '2.16.840.1.113883.3.464.1003.198.12.1135'    -- Palliative Care Intervention
    AND r.start_day <= p.end_date AND r.end_day >= p.start_date
),
-- "Is Pregnant During Day Of Measurement Period": an active pregnancy
-- diagnosis overlapping the period, for a patient with a qualifying encounter.
is_pregnant AS (
  SELECT DISTINCT c.person_id FROM condition_profiled c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.600.1.1623'              -- Pregnancy or Other Related Diagnoses
    AND c.problem_or_diagnosis
    AND coalesce(c.clinical_status, 'active') = 'active'
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
    AND c.person_id IN (SELECT person_id FROM qualifying_encounter)
),

-- "BMI During Measurement Period": final BMI results above 0 kg/m2 whose
-- effective time lies within the period. [USCoreBMIProfile] is a vital-sign
-- Observation of its own: US Core fixes its code and the category
-- vital-signs (a BMI component of a panel is not one).
bmi AS (
  SELECT o.person_id, o.value_num, o.end_day AS day
  FROM observation_final o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code = '39156-5'    -- Body mass index (BMI) [Ratio]
    AND o.panel_id IS NULL
    AND array_has(string_to_array(coalesce(o.categories, o.category, 'vital-signs'), ' '), 'vital-signs')
    AND o.value_num > 0 AND coalesce(o.unit, 'kg/m2') = 'kg/m2'
    AND o.effective_time >= p.start_ts AND coalesce(o.effective_end, o.effective_time) < p.end_ts
),
-- "Documented Low BMI" (< 18.5), "Documented High BMI" (>= 25) and the
-- normal ones, with the most recent BMI for the analyst.
bmi_summary AS (
  SELECT person_id,
         bool_or(value_num < 18.5) AS low,
         bool_or(value_num >= 25) AS high,
         bool_or(value_num >= 18.5 AND value_num < 25) AS normal,
         max(day) AS last_bmi_date
  FROM bmi GROUP BY person_id
),
last_bmi AS (
  SELECT b.person_id, max(b.value_num) AS last_bmi
  FROM bmi b JOIN bmi_summary s ON s.person_id = b.person_id AND s.last_bmi_date = b.day
  GROUP BY b.person_id
),

-- [ConditionProblemsHealthConcerns: "Overweight or Obese"] and
-- [ConditionProblemsHealthConcerns: "Underweight"], with their prevalence and
-- QICoreCommon's isProblemListItem / isHealthConcern / isActive.
weight_diagnosis AS (
  SELECT c.person_id, c.valueset, c.prevalence_start, c.prevalence_end,
         c.problem_list_item, c.health_concern,
         coalesce(c.clinical_status, 'active') IN ('active', 'recurrence', 'relapse') AS active
  FROM condition_profiled c
  WHERE c.valueset IN ('2.16.840.1.113762.1.4.1047.502',           -- Overweight or Obese
                       '2.16.840.1.113883.3.526.3.1563')           -- Underweight
    AND (c.problem_list_item OR c.health_concern)
),
-- Follow-up orders: service requests and medication requests of the
-- follow-up, referral and medication value sets, with the value sets their
-- reasons are in. authored_day is authoredOn.
request_reason AS (
  SELECT 'service_request' AS tbl, source, source_file, source_line,
         array_agg(DISTINCT reason_valueset) AS reason_vs
  FROM service_request_reason_vs GROUP BY source, source_file, source_line
  UNION ALL
  SELECT 'medication', source, source_file, source_line, array_agg(DISTINCT reason_valueset)
  FROM medication_reason_vs GROUP BY source, source_file, source_line
),
follow_up_request AS (
  SELECT q.*, coalesce(array_has(r.reason_vs, '2.16.840.1.113762.1.4.1047.502'), false) AS reason_overweight,
         coalesce(array_has(r.reason_vs, '2.16.840.1.113883.3.526.3.1563'), false) AS reason_underweight,
         coalesce(array_has(r.reason_vs, '2.16.840.1.113883.3.526.3.1007'), false) AS reason_medical
  FROM (
    SELECT 'service_request' AS tbl, s.source, s.source_file, s.source_line, s.person_id, s.valueset,
           s.status, coalesce(s.do_not_perform, false) AS do_not_perform,
           CAST(s.authored_time AS DATE) AS authored_day
    FROM service_request_vs s
    WHERE s.valueset IN ('2.16.840.1.113883.3.600.1.1525',          -- Follow Up for Above Normal BMI
                         '2.16.840.1.113883.3.600.1.1528',          -- Follow Up for Below Normal BMI
                         '2.16.840.1.113883.3.600.1.1527')          -- Referrals Where Weight Assessment May Occur
    UNION ALL
    SELECT 'medication', m.source, m.source_file, m.source_line, m.person_id, m.valueset,
           m.status, coalesce(m.do_not_perform, false), m.start_date
    FROM medication_vs m
    WHERE m.valueset IN ('2.16.840.1.113883.3.526.3.1561',          -- Medications for Above Normal BMI
                         '2.16.840.1.113883.3.526.3.1562')          -- Medications for Below Normal BMI
      AND coalesce(m.resource_type, 'medicationrequest') = 'medicationrequest'
  ) q
  LEFT JOIN request_reason r
    ON r.tbl = q.tbl AND r.source = q.source
   AND r.source_file = q.source_file AND r.source_line = q.source_line
),
-- Follow-up procedures of either value set, with the value sets of their
-- reasons. As in the CQL, only the low-BMI procedure for underweight as the
-- reason tests the status (completed); the others take any status.
follow_up_procedure AS (
  SELECT r.person_id, r.valueset, r.status,
         CAST(r.performed_time AS DATE) AS start_day,
         CAST(coalesce(r.performed_end_time, r.performed_time) AS DATE) AS end_day,
         coalesce(array_has(x.reason_vs, '2.16.840.1.113762.1.4.1047.502'), false) AS reason_overweight,
         coalesce(array_has(x.reason_vs, '2.16.840.1.113883.3.526.3.1563'), false) AS reason_underweight
  FROM procedure_vs r
  LEFT JOIN (SELECT source, source_file, source_line, array_agg(DISTINCT reason_valueset) AS reason_vs
             FROM procedure_reason_vs GROUP BY source, source_file, source_line) x
    ON x.source = r.source AND x.source_file = r.source_file AND x.source_line = r.source_line
  WHERE r.valueset IN ('2.16.840.1.113883.3.600.1.1525',            -- Follow Up for Above Normal BMI
                       '2.16.840.1.113883.3.600.1.1528')            -- Follow Up for Below Normal BMI
),

-- "High BMI Interventions Ordered" (start: authoredOn): for overweight or
-- obesity as the reason, or on an active overweight / obese problem or
-- health concern starting on or before the order's day.
high_bmi_interventions_ordered AS (
  SELECT q.person_id, q.authored_day AS start_day FROM follow_up_request q
  WHERE q.valueset IN ('2.16.840.1.113883.3.600.1.1525', '2.16.840.1.113883.3.600.1.1527',
                       '2.16.840.1.113883.3.526.3.1561')
    AND NOT q.do_not_perform AND q.reason_overweight
  UNION
  SELECT q.person_id, q.authored_day FROM follow_up_request q
  JOIN weight_diagnosis c ON c.person_id = q.person_id
  WHERE q.valueset IN ('2.16.840.1.113883.3.600.1.1525', '2.16.840.1.113883.3.600.1.1527',
                       '2.16.840.1.113883.3.526.3.1561')
    AND NOT q.do_not_perform
    AND c.valueset = '2.16.840.1.113762.1.4.1047.502'
    AND c.active
    AND c.prevalence_start <= q.authored_day
),
-- "High BMI Interventions Performed" (start: performed): for overweight or
-- obesity as the reason, or during an overweight / obese diagnosis.
high_bmi_interventions_performed AS (
  SELECT r.person_id, r.start_day FROM follow_up_procedure r
  WHERE r.valueset = '2.16.840.1.113883.3.600.1.1525' AND r.reason_overweight
  UNION
  SELECT r.person_id, r.start_day FROM follow_up_procedure r
  JOIN weight_diagnosis c ON c.person_id = r.person_id
  WHERE r.valueset = '2.16.840.1.113883.3.600.1.1525'
    AND c.valueset = '2.16.840.1.113762.1.4.1047.502'
    AND c.prevalence_start <= r.start_day
    AND c.prevalence_end >= r.start_day
),
-- "Low BMI Interventions Ordered": for underweight as the reason, or in the
-- period on an active underweight health concern starting on or before the
-- order's day.
low_bmi_interventions_ordered AS (
  SELECT q.person_id, q.authored_day AS start_day FROM follow_up_request q
  WHERE q.valueset IN ('2.16.840.1.113883.3.600.1.1528', '2.16.840.1.113883.3.600.1.1527',
                       '2.16.840.1.113883.3.526.3.1562')
    AND NOT q.do_not_perform AND q.reason_underweight
  UNION
  SELECT q.person_id, q.authored_day FROM follow_up_request q
  JOIN weight_diagnosis c ON c.person_id = q.person_id
  CROSS JOIN period p
  WHERE q.valueset IN ('2.16.840.1.113883.3.600.1.1528', '2.16.840.1.113883.3.600.1.1527',
                       '2.16.840.1.113883.3.526.3.1562')
    AND NOT q.do_not_perform
    AND c.valueset = '2.16.840.1.113883.3.526.3.1563'
    AND c.health_concern AND c.active
    AND c.prevalence_start <= q.authored_day
    AND q.authored_day BETWEEN p.start_date AND p.end_date
),
-- "Low BMI Interventions Performed": completed, for underweight as the
-- reason; or within the period during an active underweight health concern.
low_bmi_interventions_performed AS (
  SELECT r.person_id, r.start_day FROM follow_up_procedure r
  WHERE r.valueset = '2.16.840.1.113883.3.600.1.1528'
    AND r.reason_underweight AND coalesce(r.status, 'completed') = 'completed'
  UNION
  SELECT r.person_id, r.start_day FROM follow_up_procedure r
  JOIN weight_diagnosis c ON c.person_id = r.person_id
  CROSS JOIN period p
  WHERE r.valueset = '2.16.840.1.113883.3.600.1.1528'
    AND c.valueset = '2.16.840.1.113883.3.526.3.1563'
    AND c.health_concern AND c.active
    AND c.prevalence_start <= r.start_day
    AND r.start_day >= p.start_date AND r.end_day <= p.end_date
    AND c.prevalence_end >= r.start_day
),
-- "High BMI And Follow Up Provided" / "Low BMI And Follow Up Provided": a
-- documented high (low) BMI and an intervention starting in the period.
high_bmi_and_follow_up AS (
  SELECT DISTINCT i.person_id
  FROM (SELECT * FROM high_bmi_interventions_ordered
        UNION ALL SELECT * FROM high_bmi_interventions_performed) i
  JOIN bmi_summary b ON b.person_id = i.person_id AND b.high
  CROSS JOIN period p
  WHERE i.start_day BETWEEN p.start_date AND p.end_date
),
low_bmi_and_follow_up AS (
  SELECT DISTINCT i.person_id
  FROM (SELECT * FROM low_bmi_interventions_ordered
        UNION ALL SELECT * FROM low_bmi_interventions_performed) i
  JOIN bmi_summary b ON b.person_id = i.person_id AND b.low
  CROSS JOIN period p
  WHERE i.start_day BETWEEN p.start_date AND p.end_date
),

-- "Medical Reason For Not Documenting A Follow Up Plan For Low Or High BMI":
-- a follow-up, referral or medication not requested for a medical reason,
-- on the day a qualifying encounter starts.
medical_reason_no_follow_up AS (
  SELECT DISTINCT q.person_id FROM follow_up_request q
  JOIN qualifying_encounter e ON e.person_id = q.person_id AND e.start_day = q.authored_day
  WHERE q.do_not_perform
    AND coalesce(q.status, 'completed') = 'completed'
    AND q.reason_medical
),
-- "Medical Reason Or Patient Reason For Not Performing BMI Exam": a BMI
-- cancelled for a medical reason or declined by the patient, on the day a
-- qualifying encounter starts.
no_bmi_exam AS (
  SELECT DISTINCT o.person_id FROM observation_coding o
  JOIN observation_reason_vs r
    ON r.source = o.source AND r.source_file = o.source_file AND r.source_line = o.source_line
   AND r.code_system = o.code_system AND r.code = o.code
  JOIN qualifying_encounter e
    ON e.person_id = o.person_id
   AND e.start_day = CAST(coalesce(o.effective_end, o.effective_time) AS DATE)
  WHERE o.coding_system = 'loinc' AND o.coding_code = '39156-5'
    AND o.status = 'cancelled'
    AND r.reason_valueset IN ('2.16.840.1.113883.3.526.3.1582',    -- Patient Declined
                              '2.16.840.1.113883.3.526.3.1007')    -- Medical Reason
)
SELECT
  ip.person_id,
  true AS initial_population,
  true AS denominator,
  h.person_id IS NOT NULL OR pc.person_id IS NOT NULL OR pr.person_id IS NOT NULL
    AS denominator_exclusion,
  hf.person_id IS NOT NULL OR lf.person_id IS NOT NULL
    OR coalesce(b.normal AND NOT b.high AND NOT b.low, false) AS numerator,
  mr.person_id IS NOT NULL OR nb.person_id IS NOT NULL AS denominator_exception,
  ip.age,
  ip.first_encounter_date,
  ip.last_encounter_date,
  b.last_bmi_date,
  lb.last_bmi,
  CASE
    WHEN b.person_id IS NULL THEN 'no_bmi'
    WHEN b.high AND b.low THEN 'high_and_low'
    WHEN b.high THEN 'high'
    WHEN b.low THEN 'low'
    ELSE 'normal'
  END AS bmi_status,
  hf.person_id IS NOT NULL OR lf.person_id IS NOT NULL AS follow_up_provided,
  CASE
    WHEN h.person_id IS NOT NULL THEN 'hospice'
    WHEN pc.person_id IS NOT NULL THEN 'palliative_care'
    WHEN pr.person_id IS NOT NULL THEN 'pregnancy'
  END AS exclusion_reason,
  CASE
    WHEN mr.person_id IS NOT NULL THEN 'medical_reason_no_follow_up'
    WHEN nb.person_id IS NOT NULL THEN 'bmi_not_performed_medical_or_patient_reason'
  END AS exception_reason
FROM initial_population ip
LEFT JOIN (SELECT DISTINCT person_id FROM has_hospice_services) h ON h.person_id = ip.person_id
LEFT JOIN (SELECT DISTINCT person_id FROM has_palliative_care) pc ON pc.person_id = ip.person_id
LEFT JOIN is_pregnant pr ON pr.person_id = ip.person_id
LEFT JOIN bmi_summary b ON b.person_id = ip.person_id
LEFT JOIN last_bmi lb ON lb.person_id = ip.person_id
LEFT JOIN high_bmi_and_follow_up hf ON hf.person_id = ip.person_id
LEFT JOIN low_bmi_and_follow_up lf ON lf.person_id = ip.person_id
LEFT JOIN medical_reason_no_follow_up mr ON mr.person_id = ip.person_id
LEFT JOIN no_bmi_exam nb ON nb.person_id = ip.person_id
