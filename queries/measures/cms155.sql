-- CMS155 Weight Assessment and Counseling for Nutrition and Physical Activity
-- for Children/Adolescents (eCQM FHIR CMS155FHIRWeightAssessandCounselforKids
-- 0.3.000), three population groups, one row per person of the initial
-- population per group (`group_id`): `bmi` (Numerator 1: height, weight and
-- BMI documented), `nutrition` (Numerator 2), `physical-activity`
-- (Numerator 3). The groups share the initial population, denominator and
-- exclusions; `stratification_1` (age 3-11) and `stratification_2` (age
-- 12-17) are the measure's two strata. Criteria follow the measure's CQL at
-- day precision.
--
-- Library versions: the package includes Status 1.13.000 and Hospice
-- 6.15.000, older than the shared views of queries/lib/qicore-2025 (Status
-- 1.15, Hospice 6.18) and newer than qicore-2024 (Status 1.8, Hospice 6.12),
-- and matching neither, so their criteria are written here as CTEs; only the
-- library-independent views of queries/lib/base.sql (observation_final,
-- procedure_done) are used. What Status 1.13 / Hospice 6.15 do:
--   - an encounter took place when finished, arrived, triaged, in progress
--     or on leave (isEncounterPerformed; 1.15: finished only);
--   - the hospice assessment needs a final result but no category
--     (isAssessmentPerformed; Status 1.8 asked for `survey`);
--   - the hospice order has intent `order` only (1.15: the order family);
--   - hospice and pregnancy diagnoses have no verification filter (no
--     .verified(), added in Status 1.15 / Hospice 6.18).
--
-- Vital signs: the CQL retrieves the US Core profiles [USCoreBodyHeightProfile],
-- [USCoreBodyWeightProfile] and [USCoreBMIProfile] without a code; Ward keeps
-- no meta.profile, so an observation is of a profile when coded with the
-- profile's fixed LOINC code: body height 8302-2, body weight 29463-7, BMI
-- 39156-5. ("BMI Percentile in Measurement Period" retrieves the adult BMI
-- profile as the CQL is written, not the pediatric BMI-for-age percentile
-- profile, LOINC 59576-9.)
--
-- Ward conventions (queries/lib/base.sql): a missing status counts as the
-- "done" status, a missing end time makes a period a single moment.
WITH
person AS (
  SELECT pt.person_id, age_years(pt.birth_date, p.end_date) AS age
  FROM patient pt CROSS JOIN period p
),
-- Status 1.13 isEncounterPerformed, with the encounter's days.
encounter_performed AS (
  SELECT e.*, CAST(e.start_time AS DATE) AS start_day,
         CAST(coalesce(e.end_time, e.start_time) AS DATE) AS end_day
  FROM encounter_vs e
  WHERE coalesce(e.status, 'finished') IN ('finished', 'arrived', 'triaged', 'in-progress', 'onleave')
),
"Qualifying Encounters" AS (
  SELECT e.person_id, max(e.end_day) AS last_visit_date
  FROM encounter_performed e CROSS JOIN period p
  WHERE e.valueset IN (
      '2.16.840.1.113883.3.464.1003.101.12.1001',  -- Office Visit
      '2.16.840.1.113883.3.464.1003.101.12.1026',  -- Preventive Care Services Individual Counseling
      '2.16.840.1.113883.3.464.1003.101.12.1024',  -- Preventive Care, Established Office Visit, 0 to 17
      '2.16.840.1.113883.3.464.1003.101.12.1022',  -- Preventive Care Services, Initial Office Visit, 0 to 17
      '2.16.840.1.113883.3.464.1003.101.12.1027',  -- Preventive Care Services Group Counseling
      '2.16.840.1.113883.3.464.1003.101.12.1016',  -- Home Healthcare Services
      '2.16.840.1.113883.3.464.1003.101.12.1080')  -- Telephone Visits
    AND e.start_day >= p.start_date AND e.end_day <= p.end_date
  GROUP BY e.person_id
),
"Initial Population" AS (
  SELECT pe.person_id, pe.age, q.last_visit_date
  FROM person pe
  JOIN "Qualifying Encounters" q ON q.person_id = pe.person_id
  WHERE pe.age BETWEEN 3 AND 17
),
-- Hospice 6.15 "Has Hospice Services" (on Status 1.13).
"Has Hospice Services" AS (
  SELECT e.person_id FROM encounter_performed e CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.666.5.307'            -- Encounter Inpatient
    AND e.discharge_disposition IN ('428361000124107', '428371000124100') -- discharged for hospice care
    AND e.end_time IS NOT NULL AND CAST(e.end_time AS DATE) BETWEEN p.start_date AND p.end_date
  UNION
  SELECT e.person_id FROM encounter_performed e CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.464.1003.1003'        -- Hospice Encounter
    AND e.start_day <= p.end_date AND e.end_day >= p.start_date
  UNION
  SELECT o.person_id FROM observation_final o CROSS JOIN period p
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
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
),
"Pregnancy Diagnosis Which Overlaps Measurement Period" AS (
  SELECT DISTINCT c.person_id FROM condition_vs c CROSS JOIN period p
  WHERE c.valueset = '2.16.840.1.113883.3.526.3.378'             -- Pregnancy
    AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
),
-- Height, weight and BMI observations with a final result and a value,
-- effective within the period (Status 1.13 isObservationBodyHeight / ...).
vital_sign AS (
  SELECT o.person_id,
         CASE o.coding_code WHEN '8302-2' THEN 'height'
                            WHEN '29463-7' THEN 'weight'
                            WHEN '39156-5' THEN 'bmi' END AS kind,
         o.end_day
  FROM observation_final o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code IN ('8302-2', '29463-7', '39156-5')
    AND (o.value_num IS NOT NULL OR o.value_text IS NOT NULL OR o.value_code IS NOT NULL)
    AND o.start_day >= p.start_date AND o.end_day <= p.end_date
),
"BMI Percentile in Measurement Period" AS (
  SELECT person_id, max(end_day) AS last_date FROM vital_sign WHERE kind = 'bmi' GROUP BY person_id
),
"Height in Measurement Period" AS (
  SELECT person_id, max(end_day) AS last_date FROM vital_sign WHERE kind = 'height' GROUP BY person_id
),
"Weight in Measurement Period" AS (
  SELECT person_id, max(end_day) AS last_date FROM vital_sign WHERE kind = 'weight' GROUP BY person_id
),
-- Completed counseling procedures performed within the period
-- (Status 1.13 isInterventionPerformed).
counseling AS (
  SELECT r.person_id, r.valueset, max(r.end_day) AS last_date
  FROM procedure_done r CROSS JOIN period p
  WHERE r.valueset IN ('2.16.840.1.113883.3.464.1003.195.12.1003',   -- Counseling for Nutrition
                       '2.16.840.1.113883.3.464.1003.118.12.1035')   -- Counseling for Physical Activity
    AND r.start_day >= p.start_date AND r.end_day <= p.end_date
  GROUP BY r.person_id, r.valueset
),
"Numerator 2" AS (
  SELECT person_id, last_date FROM counseling WHERE valueset = '2.16.840.1.113883.3.464.1003.195.12.1003'
),
"Numerator 3" AS (
  SELECT person_id, last_date FROM counseling WHERE valueset = '2.16.840.1.113883.3.464.1003.118.12.1035'
),
-- The populations every group shares, and each numerator's evidence.
population AS (
  SELECT ip.person_id, ip.age, ip.last_visit_date,
         ip.age BETWEEN 3 AND 11 AS stratification_1,
         ip.age BETWEEN 12 AND 17 AS stratification_2,
         h.person_id IS NOT NULL AS hospice,
         pg.person_id IS NOT NULL AS pregnancy,
         bmi.last_date AS last_bmi_date,
         ht.last_date AS last_height_date,
         wt.last_date AS last_weight_date,
         n2.last_date AS last_nutrition_counseling_date,
         n3.last_date AS last_activity_counseling_date
  FROM "Initial Population" ip
  LEFT JOIN (SELECT DISTINCT person_id FROM "Has Hospice Services") h ON h.person_id = ip.person_id
  LEFT JOIN "Pregnancy Diagnosis Which Overlaps Measurement Period" pg ON pg.person_id = ip.person_id
  LEFT JOIN "BMI Percentile in Measurement Period" bmi ON bmi.person_id = ip.person_id
  LEFT JOIN "Height in Measurement Period" ht ON ht.person_id = ip.person_id
  LEFT JOIN "Weight in Measurement Period" wt ON wt.person_id = ip.person_id
  LEFT JOIN "Numerator 2" n2 ON n2.person_id = ip.person_id
  LEFT JOIN "Numerator 3" n3 ON n3.person_id = ip.person_id
),
-- One row per person per group: the group's numerator, what it lacks, and
-- the day its evidence was complete.
grouped AS (
  SELECT 'bmi' AS group_id, pp.*,
         last_bmi_date IS NOT NULL AND last_height_date IS NOT NULL
           AND last_weight_date IS NOT NULL AS numerator_met,
         nullif(concat_ws(' ',
                  CASE WHEN last_bmi_date IS NULL THEN 'bmi' END,
                  CASE WHEN last_height_date IS NULL THEN 'height' END,
                  CASE WHEN last_weight_date IS NULL THEN 'weight' END), '') AS missing,
         CASE WHEN last_bmi_date IS NOT NULL AND last_height_date IS NOT NULL AND last_weight_date IS NOT NULL
              THEN greatest(last_bmi_date, last_height_date, last_weight_date) END AS evidence_date
  FROM population pp
  UNION ALL
  SELECT 'nutrition' AS group_id, pp.*,
         last_nutrition_counseling_date IS NOT NULL AS numerator_met,
         CASE WHEN last_nutrition_counseling_date IS NULL THEN 'nutrition_counseling' END AS missing,
         last_nutrition_counseling_date AS evidence_date
  FROM population pp
  UNION ALL
  SELECT 'physical-activity' AS group_id, pp.*,
         last_activity_counseling_date IS NOT NULL AS numerator_met,
         CASE WHEN last_activity_counseling_date IS NULL THEN 'physical_activity_counseling' END AS missing,
         last_activity_counseling_date AS evidence_date
  FROM population pp
)
SELECT
  g.group_id,
  g.person_id,
  true AS initial_population,
  true AS denominator,
  g.hospice OR g.pregnancy AS denominator_exclusion,
  g.numerator_met AS numerator,
  g.stratification_1,
  g.stratification_2,
  g.age,
  g.last_visit_date,
  g.missing,
  g.evidence_date,
  CASE
    WHEN g.hospice THEN 'hospice'
    WHEN g.pregnancy THEN 'pregnancy'
  END AS exclusion_reason
FROM grouped g
