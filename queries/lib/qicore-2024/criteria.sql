-- Shared eCQM criteria of the 2024 QI-Core eCQMs (CMS131 DiabetesEyeExamFHIR
-- 0.0.002 and its package year), as views of person_id for the session's
-- measurement period, at day precision. Written against the libraries
-- that measure includes:
--   Status 1.8.000, Hospice 6.12.000, PalliativeCare 1.11.000,
--   AdvancedIllnessandFrailty 1.16.000, QICoreCommon 2.1.000.
-- What differs from qicore-2025/criteria.sql:
--   - an encounter took place when finished, arrived, triaged, in progress
--     or on leave (Status 1.8 isEncounterPerformed);
--   - assessments (hospice MDS, FACIT-Pal, medical equipment used, housing
--     status) need the category `survey` (isAssessmentPerformed);
--   - diagnoses have no verification filter (no .verified());
--   - orders and active medications have intent `order` only;
--   - only the frailty device order tests doNotPerform (the hospice order's
--     and dementia medication's tests are commented out, CQLIT-447).
-- A measure loads this set with `library = "qicore-2024"` in its TOML.
--
-- Ward conventions as in qicore-2025/criteria.sql: a missing status counts
-- as the "done" status, a missing end time makes a period a single moment,
-- a missing category or verification status does not exclude a fact.

-- Encounters that took place, with their days.
CREATE VIEW encounter_done AS
SELECT *, CAST(start_time AS DATE) AS start_day,
       CAST(coalesce(end_time, start_time) AS DATE) AS end_day
FROM encounter_vs
WHERE coalesce(status, 'finished') IN ('finished', 'arrived', 'triaged', 'in-progress', 'onleave');

-- Assessments (Status 1.8 isAssessmentPerformed): final results with the
-- category survey among their categories.
CREATE VIEW assessment_done AS
SELECT * FROM observation_final
WHERE array_has(string_to_array(coalesce(categories, category, 'survey'), ' '), 'survey');

-- Hospice care in any part of the period (Hospice."Has Hospice Services").
CREATE VIEW hospice_person AS
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.666.5.307'            -- Encounter Inpatient
  AND e.discharge_disposition IN ('428361000124107', '428371000124100') -- discharged for hospice care
  AND e.end_time IS NOT NULL AND CAST(e.end_time AS DATE) BETWEEN p.start_date AND p.end_date
UNION
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.464.1003.1003'        -- Hospice Encounter
  AND e.start_day <= p.end_date AND e.end_day >= p.start_date
UNION
SELECT o.person_id FROM assessment_done o CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code = '45755-6'  -- Hospice care [MDS]
  AND o.value_code = '373066001'                               -- Yes
  AND o.start_day <= p.end_date AND o.end_day >= p.start_date
UNION
SELECT s.person_id FROM service_request_vs s CROSS JOIN period p
WHERE s.valueset = '2.16.840.1.113883.3.526.3.1584'            -- Hospice Care Ambulatory
  AND coalesce(s.status, 'active') IN ('active', 'completed')
  AND coalesce(s.intent, 'order') = 'order'
  AND s.authored_time >= p.start_ts AND s.authored_time < p.end_ts
UNION
SELECT r.person_id FROM procedure_done r CROSS JOIN period p
WHERE r.valueset = '2.16.840.1.113883.3.526.3.1584'            -- Hospice Care Ambulatory
  AND r.start_day <= p.end_date AND r.end_day >= p.start_date
UNION
SELECT c.person_id FROM condition_vs c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.1165'         -- Hospice Diagnosis
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date;

-- Palliative care in any part of the period (PalliativeCare).
CREATE VIEW palliative_person AS
SELECT o.person_id FROM assessment_done o CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code = '71007-9'  -- FACIT-Pal
  AND o.start_day <= p.end_date AND o.end_day >= p.start_date
UNION
SELECT c.person_id FROM condition_vs c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.1167'         -- Palliative Care Diagnosis
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
UNION
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.464.1003.101.12.1090'  -- Palliative Care Encounter
  AND e.start_day <= p.end_date AND e.end_day >= p.start_date
UNION
SELECT r.person_id FROM procedure_done r CROSS JOIN period p
WHERE r.valueset = '2.16.840.1.113883.3.464.1003.198.12.1135'  -- Palliative Care Intervention
  AND r.start_day <= p.end_date AND r.end_day >= p.start_date;

-- An indication of frailty in any part of the period
-- (AdvancedIllnessandFrailty."Has Criteria Indicating Frailty").
CREATE VIEW frailty_person AS
SELECT d.person_id FROM device_vs d CROSS JOIN period p
WHERE d.valueset = '2.16.840.1.113883.3.464.1003.118.12.1300'  -- Frailty Device (ordered)
  AND coalesce(d.resource_type, 'devicerequest') = 'devicerequest'
  AND coalesce(d.status, 'active') IN ('active', 'completed')
  AND coalesce(d.intent, 'order') = 'order'
  AND d.do_not_perform IS NOT TRUE
  AND d.event_time >= p.start_ts AND d.event_time < p.end_ts
UNION
SELECT o.person_id FROM assessment_done o
JOIN valueset_code v ON v.valueset = '2.16.840.1.113883.3.464.1003.118.12.1300'
  AND v.code_system = o.value_code_system AND v.code = o.value_code
CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code = '98181-1'  -- Medical equipment used
  AND o.end_day BETWEEN p.start_date AND p.end_date
UNION
SELECT c.person_id FROM condition_vs c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.113.12.1074'  -- Frailty Diagnosis
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
UNION
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.464.1003.101.12.1088'  -- Frailty Encounter
  AND e.start_day <= p.end_date AND e.end_day >= p.start_date
UNION
SELECT o.person_id FROM observation_vs o CROSS JOIN period p
WHERE o.valueset = '2.16.840.1.113883.3.464.1003.113.12.1075'  -- Frailty Symptom
  AND coalesce(o.status, 'final') IN ('preliminary', 'final', 'amended', 'corrected')
  AND CAST(o.effective_time AS DATE) <= p.end_date
  AND CAST(coalesce(o.effective_end, o.effective_time) AS DATE) >= p.start_date;

-- Advanced illness diagnosed in the period or the year before.
CREATE VIEW advanced_illness_person AS
SELECT DISTINCT c.person_id FROM condition_vs c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.110.12.1082'  -- Advanced Illness
  AND c.prevalence_start BETWEEN CAST(p.start_date - INTERVAL '1 year' AS DATE) AND p.end_date;

-- Dementia medication active in the period or the year before. A request
-- whose duration is unknown counts for its first day.
CREATE VIEW dementia_medication_person AS
SELECT DISTINCT m.person_id FROM medication_vs m CROSS JOIN period p
WHERE m.valueset = '2.16.840.1.113883.3.464.1003.196.12.1510'  -- Dementia Medications
  AND coalesce(m.resource_type, 'medicationrequest') = 'medicationrequest'
  AND coalesce(m.status, 'active') = 'active'
  AND coalesce(m.intent, 'order') = 'order'
  AND m.start_date <= p.end_date
  AND coalesce(m.end_date, m.start_date) >= CAST(p.start_date - INTERVAL '1 year' AS DATE);

-- Living long term in a nursing home: the most recent housing-status
-- assessment on or before the end of the period says so.
CREATE VIEW nursing_home_person AS
SELECT person_id FROM (
  SELECT o.person_id, o.value_code,
         row_number() OVER (PARTITION BY o.person_id
                            ORDER BY o.end_day DESC, o.effective_time DESC, o.source_file, o.source_line DESC) AS k
  FROM assessment_done o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code = '71802-3'  -- Housing status
    AND o.end_day <= p.end_date
) WHERE k = 1 AND value_code = '160734000';                     -- Lives in nursing home

-- The exclusion criteria per person, without the age conditions each
-- measure puts on them.
CREATE VIEW exclusion_criteria AS
SELECT pt.person_id,
       h.person_id IS NOT NULL AS hospice,
       pc.person_id IS NOT NULL AS palliative,
       nh.person_id IS NOT NULL AS nursing_home,
       fr.person_id IS NOT NULL AS frailty,
       ai.person_id IS NOT NULL OR dm.person_id IS NOT NULL AS advanced_illness_or_dementia_medication
FROM patient pt
LEFT JOIN hospice_person h ON h.person_id = pt.person_id
LEFT JOIN palliative_person pc ON pc.person_id = pt.person_id
LEFT JOIN nursing_home_person nh ON nh.person_id = pt.person_id
LEFT JOIN frailty_person fr ON fr.person_id = pt.person_id
LEFT JOIN advanced_illness_person ai ON ai.person_id = pt.person_id
LEFT JOIN dementia_medication_person dm ON dm.person_id = pt.person_id;
