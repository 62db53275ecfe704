-- CMS131 Diabetes: Eye Exam (eCQM FHIR DiabetesEyeExamFHIR 0.0.002), one row
-- per person of the initial population. Criteria follow the measure's CQL at
-- day precision; shared exclusions come from queries/lib/qicore-2024/ (the
-- measure is of the 2024 package: Status 1.8, Hospice 6.12, ...).
--
-- Ward extension: besides exam Observations, a completed Procedure coded in
-- the "Retinal or Dilated Eye Exam" value set counts as the exam (CSV EMR
-- extracts record eye exams as procedures).
WITH
person AS (
  SELECT pt.person_id, age_years(pt.birth_date, p.end_date) AS age
  FROM patient pt CROSS JOIN period p
),
diabetes AS (
  SELECT DISTINCT c.person_id FROM condition_vs c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.464.1003.103.12.1001'
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
),
retinopathy AS (
  SELECT DISTINCT c.person_id FROM condition_vs c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.526.3.327'     -- Diabetic Retinopathy
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
      '2.16.840.1.113883.3.526.3.1285',            -- Ophthalmological Services
      '2.16.840.1.113883.3.464.1003.101.12.1080')  -- Telephone Visits
    AND e.start_day >= p.start_date AND e.end_day <= p.end_date
),
eye_exam AS (   -- retinal or dilated eye exams with their days
  SELECT o.person_id, CAST(o.effective_time AS DATE) AS start_day,
         CAST(coalesce(o.effective_end, o.effective_time) AS DATE) AS end_day
  FROM observation_vs o
  WHERE o.valueset = '2.16.840.1.113883.3.464.1003.115.12.1088'
    AND coalesce(o.status, 'final') IN ('final', 'amended', 'corrected')
    AND array_has(string_to_array(coalesce(o.categories, o.category, 'exam'), ' '), 'exam')
  UNION ALL
  SELECT r.person_id, r.start_day, r.end_day FROM procedure_done r
  WHERE r.valueset = '2.16.840.1.113883.3.464.1003.115.12.1088'
),
last_exam AS (
  SELECT x.person_id,
         max(CASE WHEN x.start_day >= p.start_date THEN x.end_day END) AS in_period,
         max(x.end_day) AS in_period_or_year_prior
  FROM eye_exam x CROSS JOIN period p
  WHERE x.start_day >= CAST(p.start_date - INTERVAL '1 year' AS DATE) AND x.end_day <= p.end_date
  GROUP BY x.person_id
),
flags AS (
  SELECT pe.person_id, pe.age,
         r.person_id IS NOT NULL AS retinopathy,
         x.hospice, x.palliative,
         pe.age >= 66 AND x.nursing_home AS nursing_home,
         pe.age >= 66 AND x.frailty AND x.advanced_illness_or_dementia_medication AS frailty
  FROM person pe
  JOIN diabetes d ON d.person_id = pe.person_id
  JOIN qualifying_encounter qe ON qe.person_id = pe.person_id
  JOIN exclusion_criteria x ON x.person_id = pe.person_id
  LEFT JOIN retinopathy r ON r.person_id = pe.person_id
  WHERE pe.age BETWEEN 18 AND 75
)
SELECT
  f.person_id,
  true AS initial_population,
  true AS denominator,
  f.hospice OR f.palliative OR f.nursing_home OR f.frailty AS denominator_exclusion,
  CASE WHEN f.retinopathy THEN x.in_period IS NOT NULL
       ELSE x.in_period_or_year_prior IS NOT NULL END AS numerator,
  f.age,
  f.retinopathy,
  CASE WHEN f.retinopathy THEN x.in_period ELSE x.in_period_or_year_prior END AS last_exam_date,
  CASE
    WHEN f.hospice THEN 'hospice'
    WHEN f.palliative THEN 'palliative_care'
    WHEN f.nursing_home THEN 'nursing_home'
    WHEN f.frailty THEN 'frailty_with_advanced_illness'
  END AS exclusion_reason
FROM flags f
LEFT JOIN last_exam x ON x.person_id = f.person_id
