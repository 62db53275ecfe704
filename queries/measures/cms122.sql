-- CMS122 Diabetes: Glycemic Status Assessment > 9% (eCQM FHIR 0.5.000), one
-- row per person of the initial population. Criteria follow the measure's CQL
-- at day precision; shared exclusions come from queries/lib/qicore-2025/.
WITH
person AS (
  SELECT pt.person_id, age_years(pt.birth_date, p.end_date) AS age
  FROM patient pt CROSS JOIN period p
),
diabetes AS (   -- an encounter diagnosis of diabetes overlapping the period
  SELECT DISTINCT c.person_id FROM condition_verified c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.103.12.1001'
    AND array_has(string_to_array(coalesce(c.categories, c.category, 'encounter-diagnosis'), ' '),
                  'encounter-diagnosis')
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
),
qualifying_encounter AS (
  SELECT DISTINCT e.person_id FROM encounter_done e CROSS JOIN period p
  WHERE e.valueset IN (
      '2.16.840.1.113883.3.464.1003.101.12.1001',  -- Office Visit
      '2.16.840.1.113883.3.526.3.1240',            -- Annual Wellness Visit
      '2.16.840.1.113883.3.464.1003.101.12.1025',  -- Preventive Care Established Office Visit, 18+
      '2.16.840.1.113883.3.464.1003.101.12.1023',  -- Preventive Care Initial Office Visit, 18+
      '2.16.840.1.113883.3.464.1003.101.12.1016',  -- Home Healthcare Services
      '2.16.840.1.113883.3.464.1003.1006',         -- Nutrition Services
      '2.16.840.1.113883.3.464.1003.101.12.1080')  -- Telephone Visits
    AND e.start_day >= p.start_date AND e.end_day <= p.end_date
  UNION
  SELECT DISTINCT e.person_id FROM encounter_coding e CROSS JOIN period p
  WHERE ((e.coding_system = 'cpt' AND e.coding_code IN ('97802', '97803', '97804'))
         OR (e.coding_system = 'hcpcs' AND e.coding_code IN ('G0270', 'G0271')))  -- medical nutrition therapy
    AND coalesce(e.status, 'finished') = 'finished'
    AND CAST(e.start_time AS DATE) >= p.start_date
    AND CAST(coalesce(e.end_time, e.start_time) AS DATE) <= p.end_date
),
-- HbA1c laboratory tests and glucose management indicators with a final
-- result, on the day their effective time ends, in the period.
-- (A UNION of the two ways a code qualifies, not one join with OR: each
-- branch then reads only the codings of its codes.)
assessment AS (
  SELECT o.person_id, o.source, o.source_file, o.source_line, o.coding_code AS code,
         o.value_num, o.value_text, o.value_code, o.end_day AS day
  FROM observation_final o
  JOIN valueset_code v ON v.valueset = '2.16.840.1.113883.3.464.1003.198.12.1013'  -- HbA1c Laboratory Test
    AND v.code_system = o.coding_system AND v.code = o.coding_code
  CROSS JOIN period p
  WHERE o.end_day BETWEEN p.start_date AND p.end_date
  UNION
  SELECT o.person_id, o.source, o.source_file, o.source_line, o.coding_code AS code,
         o.value_num, o.value_text, o.value_code, o.end_day AS day
  FROM observation_final o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code = '97506-0'  -- GMI
    AND o.end_day BETWEEN p.start_date AND p.end_date
),
-- The lowest result of the most recent day ("value as Quantity" sorted
-- ascending, nulls first): a result that is not a quantity is the one
-- chosen. Without any value it is "without result" (numerator); a coded
-- or text result is neither without result nor above 9 %.
last_assessment AS (
  SELECT person_id, day, min(value_num) AS value_num,
         bool_or(value_num IS NULL AND value_text IS NULL AND value_code IS NULL) AS missing_value,
         bool_or(value_num IS NULL) AS not_quantity
  FROM (
    SELECT a.*, max(a.day) OVER (PARTITION BY a.person_id) AS last_day FROM assessment a
  ) WHERE day = last_day
  GROUP BY person_id, day
),
flags AS (
  SELECT pe.person_id, pe.age, x.hospice, x.palliative,
         pe.age >= 66 AND x.nursing_home AS nursing_home,
         pe.age >= 66 AND x.frailty AND x.advanced_illness_or_dementia_medication AS frailty
  FROM person pe
  JOIN diabetes d ON d.person_id = pe.person_id
  JOIN qualifying_encounter qe ON qe.person_id = pe.person_id
  JOIN exclusion_criteria x ON x.person_id = pe.person_id
  WHERE pe.age BETWEEN 18 AND 75
)
SELECT
  f.person_id,
  true AS initial_population,
  true AS denominator,
  f.hospice OR f.palliative OR f.nursing_home OR f.frailty AS denominator_exclusion,
  a.person_id IS NULL OR a.missing_value OR (NOT a.not_quantity AND a.value_num > 9.0) AS numerator,
  f.age,
  a.day AS last_result_date,
  CASE WHEN NOT a.not_quantity THEN a.value_num END AS last_result_pct,
  CASE
    WHEN a.person_id IS NULL THEN 'no_assessment_in_period'
    WHEN a.missing_value THEN 'most_recent_without_result'
    WHEN NOT a.not_quantity AND a.value_num > 9.0 THEN 'most_recent_above_9'
  END AS numerator_reason,
  CASE
    WHEN f.hospice THEN 'hospice'
    WHEN f.palliative THEN 'palliative_care'
    WHEN f.nursing_home THEN 'nursing_home'
    WHEN f.frailty THEN 'frailty_with_advanced_illness'
  END AS exclusion_reason
FROM flags f
LEFT JOIN last_assessment a ON a.person_id = f.person_id
