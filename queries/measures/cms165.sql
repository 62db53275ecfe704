-- CMS165 Controlling High Blood Pressure (eCQM FHIR 0.5.000), one row per
-- person of the initial population. Criteria follow the measure's CQL at day
-- precision; shared exclusions come from queries/lib/qicore-2025/.
WITH
person AS (
  SELECT pt.person_id, age_years(pt.birth_date, p.end_date) AS age
  FROM patient pt CROSS JOIN period p
),
hypertension AS (   -- Essential Hypertension overlapping the first six months
  SELECT DISTINCT c.person_id FROM condition_verified c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.104.12.1011'
    AND c.prevalence_start < CAST(p.start_date + INTERVAL '6 months' AS DATE)
    AND c.prevalence_end >= p.start_date
),
renal_or_pregnancy AS (
  SELECT DISTINCT c.person_id FROM condition_verified c CROSS JOIN period p
  WHERE c.valueset IN (
      '2.16.840.1.113883.3.526.3.378',             -- Pregnancy
      '2.16.840.1.113883.3.526.3.353',             -- End Stage Renal Disease
      '2.16.840.1.113883.3.464.1003.109.12.1029',  -- Kidney Transplant Recipient
      '2.16.840.1.113883.3.526.3.1002')            -- Chronic Kidney Disease, Stage 5
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
),
esrd_procedure AS (   -- kidney transplant or dialysis ending on or before the period's end
  SELECT DISTINCT r.person_id FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset IN ('2.16.840.1.113883.3.464.1003.109.12.1012',   -- Kidney Transplant
                       '2.16.840.1.113883.3.464.1003.109.12.1013')   -- Dialysis Services
    AND r.end_day <= p.end_date
),
esrd_encounter AS (
  SELECT DISTINCT e.person_id FROM encounter_done e CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.464.1003.109.12.1014'      -- ESRD Monthly Outpatient Services
    AND e.start_day <= p.end_date
),
-- Blood pressure readings: systolic / diastolic results (components of a
-- blood pressure panel, or standalone results in CSV extracts), on the day
-- their effective time ends.
reading AS (
  SELECT o.person_id, o.source, o.source_encounter_id, o.coding_code AS code,
         o.value_num, o.end_day AS day
  FROM observation_final o
  WHERE o.coding_system = 'loinc' AND o.coding_code IN ('8480-6', '8462-4')
),
-- A reading qualifies unless taken on a day of an inpatient stay or an
-- emergency visit, or when its own encounter is an outpatient one (the CQL
-- union of both), and it is in the measurement period.
acute_day AS (
  SELECT DISTINCT e.person_id, e.start_day, e.end_day FROM encounter_done e
  WHERE e.valueset IN ('2.16.840.1.113883.3.666.5.307',              -- Encounter Inpatient
                       '2.16.840.1.113883.3.464.1003.101.12.1010')   -- ED Evaluation and Management Visit
),
qualifying_reading AS (
  SELECT r.* FROM reading r CROSS JOIN period p
  LEFT JOIN encounter own
    ON own.source = r.source AND own.source_encounter_id = r.source_encounter_id
  WHERE r.day BETWEEN p.start_date AND p.end_date
    AND (NOT EXISTS (SELECT 1 FROM acute_day a
                     WHERE a.person_id = r.person_id AND r.day BETWEEN a.start_day AND a.end_day)
         OR (own.encounter_class IS NOT NULL AND own.encounter_class NOT IN ('emergency', 'inpatient')))
),
bp_day AS (   -- the most recent day with both a systolic and a diastolic reading
  SELECT person_id, max(day) AS day FROM (
    SELECT person_id, day FROM qualifying_reading WHERE code = '8480-6'
    INTERSECT
    SELECT person_id, day FROM qualifying_reading WHERE code = '8462-4'
  ) GROUP BY person_id
),
last_bp AS (   -- the lowest systolic and diastolic of that day; a reading without a value fails
  SELECT q.person_id, d.day,
         min(CASE WHEN q.code = '8480-6' THEN q.value_num END) AS systolic,
         min(CASE WHEN q.code = '8462-4' THEN q.value_num END) AS diastolic,
         bool_or(q.value_num IS NULL) AS missing_value
  FROM qualifying_reading q JOIN bp_day d ON d.person_id = q.person_id AND d.day = q.day
  GROUP BY q.person_id, d.day
),
flags AS (
  SELECT pe.person_id, pe.age, x.hospice, x.palliative,
         rp.person_id IS NOT NULL AS renal_or_pregnancy,
         ep.person_id IS NOT NULL AS esrd_procedure,
         ee.person_id IS NOT NULL AS esrd_encounter,
         pe.age >= 66 AND x.nursing_home AS nursing_home,
         x.frailty AND (pe.age >= 81 OR (pe.age >= 66 AND x.advanced_illness_or_dementia_medication)) AS frailty
  FROM person pe
  JOIN hypertension ht ON ht.person_id = pe.person_id
  JOIN adult_outpatient_person qe ON qe.person_id = pe.person_id
  JOIN exclusion_criteria x ON x.person_id = pe.person_id
  LEFT JOIN renal_or_pregnancy rp ON rp.person_id = pe.person_id
  LEFT JOIN esrd_procedure ep ON ep.person_id = pe.person_id
  LEFT JOIN esrd_encounter ee ON ee.person_id = pe.person_id
  WHERE pe.age BETWEEN 18 AND 85
)
SELECT
  f.person_id,
  true AS initial_population,
  true AS denominator,
  f.hospice OR f.palliative OR f.renal_or_pregnancy OR f.esrd_procedure OR f.esrd_encounter
    OR f.nursing_home OR f.frailty AS denominator_exclusion,
  coalesce(NOT b.missing_value AND b.systolic < 140 AND b.diastolic < 90, false) AS numerator,
  f.age,
  b.day AS last_bp_date,
  b.systolic AS last_systolic,
  b.diastolic AS last_diastolic,
  CASE
    WHEN f.hospice THEN 'hospice'
    WHEN f.palliative THEN 'palliative_care'
    WHEN f.renal_or_pregnancy THEN 'pregnancy_or_renal_diagnosis'
    WHEN f.esrd_procedure THEN 'esrd_procedure'
    WHEN f.esrd_encounter THEN 'esrd_encounter'
    WHEN f.nursing_home THEN 'nursing_home'
    WHEN f.frailty THEN 'frailty_with_advanced_illness_or_age'
  END AS exclusion_reason
FROM flags f
LEFT JOIN last_bp b ON b.person_id = f.person_id
