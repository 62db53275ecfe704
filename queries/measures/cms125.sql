-- CMS125 Breast Cancer Screening (eCQM FHIR CMS125FHIRBreastCancerScreening
-- 0.4.000), one row per person of the initial population. Criteria follow
-- the measure's CQL at day precision, definition by definition; shared
-- exclusions come from queries/lib/qicore-2025/ (the measure includes the
-- same library versions those views follow: Status 1.15.000, Hospice
-- 6.18.000, PalliativeCare 1.18.000, AdvancedIllnessandFrailty 1.27.000,
-- QICoreCommon 4.0.000; AdultOutpatientEncounters 4.19.000 as CMS165).
--
-- Data-model notes:
-- - "Patient.sex = '248152002'" (the US Core sex extension) is
--   `patient.sex = 'female'`: Ward reads the extension, else Patient.gender.
-- - "Unilateral Mastectomy, Unspecified Laterality" diagnoses count for a
--   side through their bodySite (`body_sites`, `system|code` tokens).
WITH
person AS (
  SELECT pt.person_id, pt.sex, age_years(pt.birth_date, p.end_date) AS age
  FROM patient pt CROSS JOIN period p
),
initial_population AS (
  SELECT pe.person_id, pe.age FROM person pe
  WHERE pe.age BETWEEN 42 AND 74
    AND pe.sex = 'female'
    AND EXISTS (SELECT 1 FROM adult_outpatient_person qe WHERE qe.person_id = pe.person_id)
),
-- Mastectomy diagnoses (encounter diagnoses or problems, verified) whose
-- prevalence starts on or before the end of the period, by side.
mastectomy_diagnosis AS (
  SELECT c.person_id,
         CASE c.valueset
           WHEN '2.16.840.1.113883.3.464.1003.198.12.1070' THEN 'right'      -- Status Post Right Mastectomy
           WHEN '2.16.840.1.113883.3.464.1003.198.12.1069' THEN 'left'       -- Status Post Left Mastectomy
           WHEN '2.16.840.1.113883.3.464.1003.198.12.1068' THEN 'bilateral'  -- History of bilateral mastectomy
         END AS side
  FROM condition_verified c CROSS JOIN period p
  WHERE c.valueset IN ('2.16.840.1.113883.3.464.1003.198.12.1070',
                       '2.16.840.1.113883.3.464.1003.198.12.1069',
                       '2.16.840.1.113883.3.464.1003.198.12.1068')
    AND c.prevalence_start <= p.end_date
  UNION ALL
  -- "Unilateral Mastectomy, Unspecified Laterality" with a bodySite ~ Right
  -- (SNOMED 24028007) or Left (7771000).
  SELECT c.person_id,
         CASE WHEN array_has(string_to_array(c.body_sites, ' '), 'snomed|24028007') THEN 'right'
              ELSE 'left' END AS side
  FROM condition_verified c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.198.12.1071'
    AND c.prevalence_start <= p.end_date
    AND (array_has(string_to_array(c.body_sites, ' '), 'snomed|24028007')
         OR array_has(string_to_array(c.body_sites, ' '), 'snomed|7771000'))
),
-- Completed mastectomy procedures ending on or before the end of the period.
mastectomy_procedure AS (
  SELECT r.person_id,
         CASE r.valueset
           WHEN '2.16.840.1.113883.3.464.1003.198.12.1134' THEN 'right'      -- Unilateral Mastectomy Right
           WHEN '2.16.840.1.113883.3.464.1003.198.12.1133' THEN 'left'       -- Unilateral Mastectomy Left
           WHEN '2.16.840.1.113883.3.464.1003.198.12.1005' THEN 'bilateral'  -- Bilateral Mastectomy
         END AS side
  FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset IN ('2.16.840.1.113883.3.464.1003.198.12.1134',
                       '2.16.840.1.113883.3.464.1003.198.12.1133',
                       '2.16.840.1.113883.3.464.1003.198.12.1005')
    AND r.end_day <= p.end_date
),
mastectomy AS (
  SELECT person_id,
         bool_or(side = 'right') AS right_side,
         bool_or(side = 'left') AS left_side,
         bool_or(side = 'bilateral') AS bilateral
  FROM (SELECT * FROM mastectomy_diagnosis UNION ALL SELECT * FROM mastectomy_procedure)
  GROUP BY person_id
),
-- "Numerator": a mammogram (final, amended or corrected; imaging category)
-- whose effective time ends during the day of October 1 two years before
-- the period through the period's end.
mammogram AS (
  SELECT o.person_id,
         max(CAST(coalesce(o.effective_end, o.effective_time) AS DATE)) AS last_day
  FROM observation_vs o CROSS JOIN period p
  WHERE o.valueset = '2.16.840.1.113883.3.464.1003.108.12.1018'   -- Mammography
    AND coalesce(o.status, 'final') IN ('final', 'amended', 'corrected')
    AND array_has(string_to_array(coalesce(o.categories, o.category, 'imaging'), ' '), 'imaging')
    AND CAST(coalesce(o.effective_end, o.effective_time) AS DATE)
        BETWEEN make_date(CAST(date_part('year', p.start_date) AS INT) - 2, 10, 1) AND p.end_date
  GROUP BY o.person_id
),
flags AS (
  SELECT ip.person_id, ip.age, x.hospice, x.palliative,
         coalesce(m.right_side AND m.left_side, false) AS right_and_left_mastectomy,
         coalesce(m.bilateral, false) AS bilateral_mastectomy,
         ip.age >= 66 AND x.frailty AND x.advanced_illness_or_dementia_medication AS frailty,
         ip.age >= 66 AND x.nursing_home AS nursing_home
  FROM initial_population ip
  JOIN exclusion_criteria x ON x.person_id = ip.person_id
  LEFT JOIN mastectomy m ON m.person_id = ip.person_id
)
SELECT
  f.person_id,
  true AS initial_population,
  true AS denominator,
  f.hospice OR f.right_and_left_mastectomy OR f.bilateral_mastectomy
    OR f.frailty OR f.nursing_home OR f.palliative AS denominator_exclusion,
  mg.person_id IS NOT NULL AS numerator,
  f.age,
  f.age BETWEEN 42 AND 51 AS stratification_1,   -- "Stratification 1": 42-51
  f.age BETWEEN 52 AND 74 AS stratification_2,   -- "Stratification 2": 52-74
  mg.last_day AS last_mammogram_date,
  CASE
    WHEN f.hospice THEN 'hospice'
    WHEN f.bilateral_mastectomy THEN 'bilateral_mastectomy'
    WHEN f.right_and_left_mastectomy THEN 'right_and_left_mastectomy'
    WHEN f.frailty THEN 'frailty_with_advanced_illness'
    WHEN f.nursing_home THEN 'nursing_home'
    WHEN f.palliative THEN 'palliative_care'
  END AS exclusion_reason
FROM flags f
LEFT JOIN mammogram mg ON mg.person_id = f.person_id
