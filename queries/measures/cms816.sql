-- CMS816 Hospital Harm - Severe Hypoglycemia (eCQM FHIR CMS816FHIRHHHypo
-- 0.3.000), encounter basis: one row per inpatient encounter of the initial
-- population. Follows the measure's CQL and what it includes: CQMCommon
-- 4.1.000 (hospitalizationWithObservation) and QICoreCommon 4.0.000
-- (effective.earliest(), effective.toInterval()). Timings are at the
-- precision of the data (minutes), not day level, except where the
-- measurement period is compared ("ends during day of").
--
-- Shared views used: encounter_done (qicore-2025: encounters with status
-- finished, one row per value-set coding) and observation_final (base.sql:
-- status final / amended / corrected). Ward conventions: a missing status
-- counts as the done status, a missing encounter end makes the encounter a
-- single moment, a glucose result without a unit is taken as mg/dL (a
-- result in another unit never compares with mg/dL, as in CQL), and an
-- Observation without effective[x] is timed by its `issued` (ingest).
--
-- Medication timing: an administration's start is `medication.start_time`
-- when the source records the time (FHIR effective[x] with a time); a
-- source with only a date gives the earliest and the latest instant the
-- start may be (start_lo, start_hi: the whole day of start_date), and a
-- timing counts when it can hold.
WITH
-- "Qualifying Encounter": finished inpatient encounters of adults (age at the
-- day the encounter starts) ending during the measurement period.
qualifying_encounter AS (
  SELECT DISTINCT e.person_id, concat(e.source, '/', e.source_encounter_id) AS encounter_id,
         e.start_time, coalesce(e.end_time, e.start_time) AS end_time,
         age_years(pt.birth_date, CAST(e.start_time AS DATE)) AS age
  FROM encounter_done e
  JOIN patient pt ON pt.person_id = e.person_id
  CROSS JOIN period p
  WHERE e.valueset = '2.16.840.1.113883.3.666.5.307'             -- Encounter Inpatient
    AND age_years(pt.birth_date, CAST(e.start_time AS DATE)) >= 18
    AND coalesce(e.end_time, e.start_time) >= p.start_ts
    AND coalesce(e.end_time, e.start_time) < p.end_ts
),
-- CQMCommon.hospitalizationWithObservation(): the last finished observation
-- stay ending 1 hour or less on or before the admission, then the last
-- finished ED visit ending 1 hour or less on or before the start of that
-- stay (or of the admission), extend the hospitalization back to their start.
observation_services AS (
  SELECT DISTINCT e.person_id, e.start_time, coalesce(e.end_time, e.start_time) AS end_time
  FROM encounter_done e
  WHERE e.valueset = '2.16.840.1.113762.1.4.1111.143'            -- Observation Services
),
emergency_department_visit AS (
  SELECT DISTINCT e.person_id, e.start_time, coalesce(e.end_time, e.start_time) AS end_time
  FROM encounter_done e
  WHERE e.valueset = '2.16.840.1.113883.3.117.1.7.1.292'         -- Emergency Department Visit
),
visit_start AS (   -- VisitStart: Coalesce(start of ObsVisit.period, start of Visit.period)
  SELECT q.*, coalesce(o.start_time, q.start_time) AS visit_start
  FROM qualifying_encounter q
  LEFT JOIN (
    SELECT q.encounter_id, o.start_time,
           row_number() OVER (PARTITION BY q.encounter_id
                              ORDER BY o.end_time DESC, o.start_time ASC) AS rn
    FROM qualifying_encounter q
    JOIN observation_services o ON o.person_id = q.person_id
    WHERE o.end_time >= q.start_time - INTERVAL '1 hour' AND o.end_time <= q.start_time
  ) o ON o.encounter_id = q.encounter_id AND o.rn = 1
),
hospitalization AS (   -- Interval[Coalesce(start of EDVisit.period, VisitStart), end of Visit.period]
  SELECT v.person_id, v.encounter_id, v.age, v.start_time AS admission_time,
         coalesce(ed.start_time, v.visit_start) AS hospitalization_start,
         v.end_time AS hospitalization_end
  FROM visit_start v
  LEFT JOIN (
    SELECT v.encounter_id, d.start_time,
           row_number() OVER (PARTITION BY v.encounter_id
                              ORDER BY d.end_time DESC, d.start_time ASC) AS rn
    FROM visit_start v
    JOIN emergency_department_visit d ON d.person_id = v.person_id
    WHERE d.end_time >= v.visit_start - INTERVAL '1 hour' AND d.end_time <= v.visit_start
  ) ed ON ed.encounter_id = v.encounter_id AND ed.rn = 1
),
-- "Hypoglycemic Medication Administration": completed administrations of a
-- medication of the value set; start of effective.toInterval() as the
-- range [start_lo, start_hi] of instants it may be (see the header).
hypoglycemic_medication_administration AS (
  SELECT DISTINCT m.person_id, m.start_date,
         coalesce(m.start_time, CAST(m.start_date AS TIMESTAMP)) AS start_lo,
         coalesce(m.start_time,
                  CAST(m.start_date AS TIMESTAMP) + INTERVAL '1 day' - INTERVAL '1 microsecond') AS start_hi
  FROM medication_vs m
  WHERE m.valueset = '2.16.840.1.113762.1.4.1196.393'            -- Hypoglycemics Severe Hypoglycemia
    AND m.resource_type = 'medicationadministration'
    AND coalesce(m.status, 'completed') = 'completed'
),
-- "Encounter With Hypoglycemic Medication Administration" = "Initial
-- Population" = "Denominator": an administration starts during the
-- hospitalization.
denominator AS (
  SELECT h.person_id, h.encounter_id, h.age, h.admission_time,
         h.hospitalization_start, h.hospitalization_end,
         min(m.start_date) AS first_hypoglycemic_medication_date
  FROM hospitalization h
  JOIN hypoglycemic_medication_administration m ON m.person_id = h.person_id
  WHERE m.start_hi >= h.hospitalization_start
    AND m.start_lo <= h.hospitalization_end
  GROUP BY h.person_id, h.encounter_id, h.age, h.admission_time,
           h.hospitalization_start, h.hospitalization_end
),
-- ["LaboratoryResultObservation": "Glucose Lab Test Mass Per Volume"] with a
-- final result, at effective.earliest(); one row per observation.
glucose_test AS (
  SELECT DISTINCT o.person_id,
         concat(o.source, '/', o.source_file, ':', CAST(o.source_line AS VARCHAR), '/', o.code) AS test_id,
         o.effective_time AS test_time,
         CASE WHEN o.unit IS NULL OR o.unit = 'mg/dL' THEN o.value_num END AS value_mg_dl
  FROM valueset_code v   -- (the small side first: the hash join builds on it)
  JOIN observation_final o ON v.valueset = '2.16.840.1.113762.1.4.1248.34'  -- Glucose Lab Test Mass Per Volume
    AND v.code_system = o.coding_system AND v.code = o.coding_code
),
-- "Glucose Test With Result Less Than 40": during the hospitalization of a
-- denominator encounter, with a hypoglycemic administration starting 24 hours
-- or less before or on the test.
glucose_test_less_than_40 AS (
  SELECT DISTINCT g.person_id, g.test_id, g.test_time, g.value_mg_dl
  FROM glucose_test g
  WHERE g.value_mg_dl < 40
    AND EXISTS (SELECT 1 FROM denominator d
                WHERE d.person_id = g.person_id
                  AND g.test_time >= d.hospitalization_start AND g.test_time <= d.hospitalization_end)
    AND EXISTS (SELECT 1 FROM hypoglycemic_medication_administration m
                WHERE m.person_id = g.person_id
                  AND m.start_hi >= g.test_time - INTERVAL '24 hours'
                  AND m.start_lo <= g.test_time)
),
-- "Low Glucose Test Followed By Glucose Test Result Greater Than 80": another
-- final glucose result > 80 mg/dL 5 minutes or less after the low one (after
-- it, not at the same instant), both during the hospitalization of one
-- denominator encounter.
low_glucose_followed_by_result_above_80 AS (
  SELECT DISTINCT l.test_id
  FROM glucose_test_less_than_40 l
  JOIN glucose_test f ON f.person_id = l.person_id AND f.test_id <> l.test_id
  JOIN denominator d ON d.person_id = l.person_id
  WHERE f.value_mg_dl > 80
    AND f.test_time > l.test_time AND f.test_time <= l.test_time + INTERVAL '5 minutes'
    AND l.test_time >= d.hospitalization_start AND l.test_time <= d.hospitalization_end
    AND f.test_time >= d.hospitalization_start AND f.test_time <= d.hospitalization_end
),
-- "Severe Hypoglycemic Harm Event"
severe_hypoglycemic_harm_event AS (
  SELECT l.* FROM glucose_test_less_than_40 l
  WHERE l.test_id NOT IN (SELECT test_id FROM low_glucose_followed_by_result_above_80)
),
-- "Encounter With Severe Hypoglycemic Harm Event" = "Numerator"
harm AS (
  SELECT d.encounter_id, count(DISTINCT x.test_id) AS harm_events,
         min(x.test_time) AS first_harm_time, min(x.value_mg_dl) AS lowest_harm_glucose_mg_dl
  FROM denominator d
  JOIN severe_hypoglycemic_harm_event x ON x.person_id = d.person_id
  WHERE x.test_time >= d.hospitalization_start AND x.test_time <= d.hospitalization_end
  GROUP BY d.encounter_id
)
SELECT
  d.encounter_id,
  d.person_id,
  true AS initial_population,
  true AS denominator,
  false AS denominator_exclusion,
  h.encounter_id IS NOT NULL AS numerator,
  d.age,
  d.admission_time,
  d.hospitalization_start,
  d.hospitalization_end AS discharge_time,
  d.first_hypoglycemic_medication_date,
  coalesce(h.harm_events, 0) AS harm_events,
  h.first_harm_time,
  h.lowest_harm_glucose_mg_dl
FROM denominator d
LEFT JOIN harm h ON h.encounter_id = d.encounter_id
