-- CMS130 Colorectal Cancer Screening (eCQM FHIR CMS130FHIRColorectalCancerScreening
-- 0.4.000), one row per person of the initial population. Criteria follow the
-- measure's CQL at day precision ("during day of"), definition by definition.
-- The measure includes AdultOutpatientEncounters 4.19.000, Status 1.15.000,
-- Hospice 6.18.000, PalliativeCare 1.18.000, AdvancedIllnessandFrailty
-- 1.27.000 and QICoreCommon 4.0.000: the versions queries/lib/qicore-2025/
-- follows, so hospice, palliative care, frailty / advanced illness and
-- nursing-home criteria come from its `exclusion_criteria` view.
--
-- Ward conventions (as in the shared views): a missing status counts as the
-- "done" status, a missing end time makes a period a single moment, a missing
-- verification status or category does not exclude a fact, an Observation
-- without effective[x] is dated by `issued`.
-- The measure's stratifications (ages 46-49, 50-75) are the stratification_*
-- columns, declared as [[stratifier]] in cms130.toml.
WITH
person AS (
  SELECT pt.person_id, age_years(pt.birth_date, p.end_date) AS age
  FROM patient pt CROSS JOIN period p
),
-- "Malignant Neoplasm": a verified colorectal cancer diagnosis (problem list
-- or encounter diagnosis) whose prevalence starts on or before the day the
-- period ends (abated or not).
malignant_neoplasm AS (
  SELECT DISTINCT c.person_id FROM condition_verified c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.108.12.1001'  -- Malignant Neoplasm of Colon
    AND c.prevalence_start <= p.end_date
),
-- "Total Colectomy Performed": a completed total colectomy ending on or
-- before the day the period ends.
total_colectomy_performed AS (
  SELECT DISTINCT r.person_id FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset = '2.16.840.1.113883.3.464.1003.198.12.1019'  -- Total Colectomy
    AND r.end_day <= p.end_date
),
-- Observations of the screening value sets with a final status, on the day
-- their effective time ends (effective.latest() / effective.toInterval() ends).
screening_observation AS (
  SELECT DISTINCT o.person_id, o.source, o.source_file, o.source_line, o.valueset,
         CAST(coalesce(o.effective_end, o.effective_time) AS DATE) AS day,
         o.value_num IS NOT NULL OR o.value_text IS NOT NULL OR o.value_code IS NOT NULL AS has_value,
         array_has(string_to_array(coalesce(o.categories, o.category, 'imaging'), ' '), 'imaging') AS imaging
  FROM observation_vs o
  WHERE o.valueset IN ('2.16.840.1.113883.3.464.1003.198.12.1011',   -- Fecal Occult Blood Test (FOBT)
                       '2.16.840.1.113883.3.464.1003.108.12.1039',   -- sDNA FIT Test
                       '2.16.840.1.113883.3.464.1003.108.12.1038')   -- CT Colonography
    AND coalesce(o.status, 'final') IN ('final', 'amended', 'corrected')
),
-- Each numerator route with its own look-back, ending with the period.
screening AS (
  -- "Fecal Occult Blood Test Performed": a laboratory result with a value,
  -- in the measurement period.
  SELECT s.person_id, 'fobt' AS test, s.day FROM screening_observation s CROSS JOIN period p
  WHERE s.valueset = '2.16.840.1.113883.3.464.1003.198.12.1011' AND s.has_value
    AND s.day BETWEEN p.start_date AND p.end_date
  UNION ALL
  -- "Stool DNA with FIT Test Performed": with a value, in the period or the
  -- 2 years before.
  SELECT s.person_id, 'sdna_fit', s.day FROM screening_observation s CROSS JOIN period p
  WHERE s.valueset = '2.16.840.1.113883.3.464.1003.108.12.1039' AND s.has_value
    AND s.day BETWEEN CAST(p.start_date - INTERVAL '2 years' AS DATE) AND p.end_date
  UNION ALL
  -- "CT Colonography Performed": a diagnostic study (imaging category), in
  -- the period or the 4 years before; no value needed.
  SELECT s.person_id, 'ct_colonography', s.day FROM screening_observation s CROSS JOIN period p
  WHERE s.valueset = '2.16.840.1.113883.3.464.1003.108.12.1038' AND s.imaging
    AND s.day BETWEEN CAST(p.start_date - INTERVAL '4 years' AS DATE) AND p.end_date
  UNION ALL
  -- "Flexible Sigmoidoscopy Performed": in the period or the 4 years before.
  SELECT r.person_id, 'flexible_sigmoidoscopy', r.end_day FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset = '2.16.840.1.113883.3.464.1003.198.12.1010'
    AND r.end_day BETWEEN CAST(p.start_date - INTERVAL '4 years' AS DATE) AND p.end_date
  UNION ALL
  -- "Colonoscopy Performed": in the period or the 9 years before.
  SELECT r.person_id, 'colonoscopy', r.end_day FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset = '2.16.840.1.113883.3.464.1003.108.12.1020'
    AND r.end_day BETWEEN CAST(p.start_date - INTERVAL '9 years' AS DATE) AND p.end_date
),
last_screening AS (   -- the most recent qualifying screening (a detail for analysts)
  SELECT person_id, day, test FROM (
    SELECT s.*, row_number() OVER (PARTITION BY s.person_id ORDER BY s.day DESC, s.test) AS k
    FROM screening s
  ) WHERE k = 1
),
flags AS (
  SELECT pe.person_id, pe.age, x.hospice, x.palliative,
         mn.person_id IS NOT NULL AS colorectal_cancer,
         tc.person_id IS NOT NULL AS total_colectomy,
         pe.age >= 66 AND x.frailty AND x.advanced_illness_or_dementia_medication AS frailty,
         pe.age >= 66 AND x.nursing_home AS nursing_home
  FROM person pe
  JOIN adult_outpatient_person qe ON qe.person_id = pe.person_id
  JOIN exclusion_criteria x ON x.person_id = pe.person_id
  LEFT JOIN malignant_neoplasm mn ON mn.person_id = pe.person_id
  LEFT JOIN total_colectomy_performed tc ON tc.person_id = pe.person_id
  WHERE pe.age BETWEEN 46 AND 75
)
SELECT
  f.person_id,
  true AS initial_population,
  true AS denominator,
  f.hospice OR f.colorectal_cancer OR f.total_colectomy OR f.frailty OR f.nursing_home
    OR f.palliative AS denominator_exclusion,
  s.person_id IS NOT NULL AS numerator,
  f.age,
  f.age BETWEEN 46 AND 49 AS stratification_1,   -- "Stratification 1": 46-49
  f.age BETWEEN 50 AND 75 AS stratification_2,   -- "Stratification 2": 50-75
  s.day AS last_screening_date,
  s.test AS last_screening_test,
  CASE
    WHEN f.hospice THEN 'hospice'
    WHEN f.colorectal_cancer THEN 'colorectal_cancer'
    WHEN f.total_colectomy THEN 'total_colectomy'
    WHEN f.frailty THEN 'frailty_with_advanced_illness'
    WHEN f.nursing_home THEN 'nursing_home'
    WHEN f.palliative THEN 'palliative_care'
  END AS exclusion_reason
FROM flags f
LEFT JOIN last_screening s ON s.person_id = f.person_id
