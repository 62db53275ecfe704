-- CMS2 Preventive Care and Screening: Screening for Depression and Follow-Up
-- Plan (eCQM FHIR CMS2FHIRPCSDepressionScreenAndFollowUp 0.4.001), one row per
-- person of the initial population. Criteria follow the measure's CQL
-- definition by definition (CTEs are named after them), at the precision the
-- CQL states: day precision for "day of" phrases, full precision for "start
-- of follow-up performed during the encounter". The measure includes only
-- QICoreCommon 4.0.000 (prevalenceInterval, toInterval) and
-- CumulativeMedicationDuration 6.0.000 (medicationRequestPeriod, computed by
-- ingest into medication.start_date / end_date); it uses no shared
-- exclusion (hospice, palliative care, frailty), so of queries/lib/qicore-2025
-- only `encounter_done` (status 'finished', with its days) is reused.
--
-- Reading of the CQL timing phrases (as the CQL-to-ELM translator expands them):
--   "S.effective 14 days or less on or before day of start of E.period":
--       the day S's effective time ends lies in [E start day - 14, E start day];
--   "S.effective starts 14 days or less on or before day of start of E":
--       the same with the day S starts;
--   "F.authoredOn 2 days or less on or after day of end of E.period":
--       the authored day lies in [E end day, E end day + 2];
--   "M.medicationRequestPeriod() overlaps after day of E.period": the
--       medication period starts on or before E's end day and ends after it.
--
-- Ward conventions: a missing status counts as the "done" status (finished /
-- final), a missing end time makes a period a single moment, a condition
-- without a category counts as a problem-list item. A refused order
-- (doNotPerform = true: QI-Core 6 MedicationNotRequested /
-- ServiceNotRequested) is not a follow-up.
WITH
-- "Patient Age ... at Start of Measurement Period"
person AS (
  SELECT pt.person_id, age_years(pt.birth_date, p.start_date) AS age
  FROM patient pt CROSS JOIN period p
),
-- "Qualifying Encounter During Measurement Period": finished encounters whose
-- type is in Encounter to Screen for Depression, Physical Therapy Evaluation
-- or Telephone Visits, with their whole period during the measurement period.
qualifying_encounter AS (
  SELECT DISTINCT e.person_id, e.source, e.source_file, e.source_line,
         e.start_time, coalesce(e.end_time, e.start_time) AS end_time, e.start_day, e.end_day
  FROM encounter_done e CROSS JOIN period p
  WHERE e.valueset IN (
      '2.16.840.1.113883.3.600.1916',              -- Encounter to Screen for Depression
      '2.16.840.1.113883.3.526.3.1022',            -- Physical Therapy Evaluation
      '2.16.840.1.113883.3.464.1003.101.12.1080')  -- Telephone Visits
    AND e.start_day >= p.start_date AND e.end_day <= p.end_date
),
-- "History of Bipolar Diagnosis Before Qualifying Encounter": a problem-list
-- or health-concern Bipolar Disorder whose prevalence interval starts (its
-- onset) before the day a qualifying encounter starts. The CQL applies no
-- clinical or verification status filter here.
bipolar_history AS (
  SELECT c.person_id, min(c.prevalence_start) AS onset_date
  FROM condition_vs c
  JOIN qualifying_encounter q ON q.person_id = c.person_id
  WHERE c.valueset = '2.16.840.1.113883.3.67.1.101.1.128'      -- Bipolar Disorder
    AND (array_has(string_to_array(coalesce(c.categories, c.category, 'problem-list-item'), ' '),
                   'problem-list-item')
         OR array_has(string_to_array(coalesce(c.categories, c.category, 'problem-list-item'), ' '),
                      'health-concern'))
    AND c.prevalence_start < q.start_day
  GROUP BY c.person_id
),
-- Depression screening assessments (ObservationScreeningAssessment) with a
-- final or corrected result that has a value; `kind` tells the adolescent
-- (LOINC 73831-0) from the adult (LOINC 73832-8) assessment. The code is the
-- Observation's own, not a component's (FHIR component rows carry their
-- Observation's id as panel_id).
screening AS (
  SELECT DISTINCT o.person_id,
         CASE o.coding_code WHEN '73831-0' THEN 'adolescent' ELSE 'adult' END AS kind,
         o.source_file, o.source_line,
         o.effective_time AS start_time,
         CAST(o.effective_time AS DATE) AS start_day,
         CAST(coalesce(o.effective_end, o.effective_time) AS DATE) AS end_day,
         o.value_code_system, o.value_code
  FROM observation_coding o
  WHERE o.coding_system = 'loinc' AND o.coding_code IN ('73831-0', '73832-8')
    AND coalesce(o.status, 'final') IN ('final', 'corrected')
    AND NOT coalesce(o.panel_id = o.source_observation_id, false)
    AND (o.value_num IS NOT NULL OR o.value_text IS NOT NULL OR o.value_code IS NOT NULL)
),
-- The screenings that end 14 days or less on or before the day a qualifying
-- encounter starts: "Has Adolescent / Adult Depression Screening", and the
-- candidates of "Most Recent Adolescent / Adult Depression Screening".
encounter_screening AS (
  SELECT DISTINCT s.* FROM screening s
  JOIN qualifying_encounter q ON q.person_id = s.person_id
  WHERE s.end_day BETWEEN CAST(q.start_day - INTERVAL '14 days' AS DATE) AND q.start_day
),
-- "Most Recent Adolescent / Adult Depression Screening": the last of them
-- sorted by the start of their effective time.
most_recent_screening AS (
  SELECT * FROM (
    SELECT s.*, row_number() OVER (PARTITION BY s.person_id, s.kind
                                   ORDER BY s.start_time DESC, s.source_file DESC, s.source_line DESC) AS k
    FROM encounter_screening s
  ) WHERE k = 1
),
-- The most recent screening when positive ("value ~ Depression screening
-- positive (finding)").
most_recent_positive AS (
  SELECT * FROM most_recent_screening
  WHERE value_code_system = 'snomed' AND value_code = '428181000124104'
),
-- "Follow Up Intervention for Positive Adolescent / Adult Depression
-- Screening": (1) active or completed medication orders of the age group's
-- depression medications whose period overlaps after the day of a qualifying
-- encounter that the positive most recent screening starts 14 days or less
-- on or before; (2) active or completed referrals; (3) completed follow-up
-- procedures. Each with the start of its performance (procedures) or its
-- authored day (orders). A MedicationRequest's authoredOn is not flattened:
-- medication.start_date (dosage bounds start, else authoredOn) stands for it.
follow_up AS (
  SELECT DISTINCT m.person_id, r.kind, CAST(NULL AS TIMESTAMP) AS performed_start,
         m.start_date AS authored_day
  FROM medication_vs m
  JOIN most_recent_positive r ON r.person_id = m.person_id
   AND m.valueset = CASE r.kind WHEN 'adolescent' THEN '2.16.840.1.113883.3.526.3.1567'  -- Adolescent Depression Medications
                                ELSE '2.16.840.1.113883.3.526.3.1566' END                -- Adult Depression Medications
  JOIN qualifying_encounter q ON q.person_id = m.person_id
  WHERE coalesce(m.resource_type, 'medicationrequest') = 'medicationrequest'
    AND coalesce(m.status, 'active') IN ('active', 'completed')
    AND coalesce(m.intent, 'order') IN ('order', 'original-order', 'reflex-order', 'filler-order', 'instance-order')
    AND NOT coalesce(m.do_not_perform, false)
    AND r.start_day BETWEEN CAST(q.start_day - INTERVAL '14 days' AS DATE) AND q.start_day
    AND m.start_date <= q.end_day AND m.end_date > q.end_day        -- overlaps after day of
  UNION ALL
  SELECT DISTINCT s.person_id,
         CASE s.valueset WHEN '2.16.840.1.113883.3.526.3.1570' THEN 'adolescent' ELSE 'adult' END,
         CAST(NULL AS TIMESTAMP), CAST(s.authored_time AS DATE)
  FROM service_request_vs s
  WHERE s.valueset IN ('2.16.840.1.113883.3.526.3.1570',   -- Referral for Adolescent Depression
                       '2.16.840.1.113883.3.526.3.1571')   -- Referral for Adult Depression
    AND coalesce(s.status, 'active') IN ('active', 'completed')
    AND NOT coalesce(s.do_not_perform, false)
  UNION ALL
  SELECT DISTINCT r.person_id,
         CASE r.valueset WHEN '2.16.840.1.113883.3.526.3.1569' THEN 'adolescent' ELSE 'adult' END,
         r.performed_time, CAST(NULL AS DATE)
  FROM procedure_vs r
  WHERE r.valueset IN ('2.16.840.1.113883.3.526.3.1569',   -- Follow Up for Adolescent Depression
                       '2.16.840.1.113883.3.526.3.1568')   -- Follow Up for Adult Depression
    AND coalesce(r.status, 'completed') = 'completed'
),
-- "Most Recent Adolescent / Adult Depression Screening Positive and Follow Up
-- Provided": a qualifying encounter that the positive most recent screening
-- starts 14 days or less on or before, with a follow-up performed during the
-- encounter or ordered on the day it ends or up to 2 days after, the
-- follow-up falling in the measurement period.
positive_with_follow_up AS (
  SELECT r.person_id, r.kind, min(coalesce(CAST(f.performed_start AS DATE), f.authored_day)) AS follow_up_date
  FROM most_recent_positive r
  JOIN follow_up f ON f.person_id = r.person_id AND f.kind = r.kind
  JOIN qualifying_encounter q ON q.person_id = r.person_id
  CROSS JOIN period p
  WHERE r.start_day BETWEEN CAST(q.start_day - INTERVAL '14 days' AS DATE) AND q.start_day
    AND ((f.performed_start >= q.start_time AND f.performed_start <= q.end_time)
         OR f.authored_day BETWEEN q.end_day AND CAST(q.end_day + INTERVAL '2 days' AS DATE))
    AND coalesce(CAST(f.performed_start AS DATE), f.authored_day) BETWEEN p.start_date AND p.end_date
  GROUP BY r.person_id, r.kind
),
-- ObservationCancelled depression screenings (status 'cancelled') with their
-- not-done reasons and the day they were issued (effective[x] else issued).
screening_not_done AS (
  SELECT person_id, kind, issued_day,
         split_part(reason_, '|', 1) AS reason_system,
         substr(reason_, strpos(reason_, '|') + 1) AS reason_code
  FROM (
    SELECT o.person_id,
           CASE o.coding_code WHEN '73831-0' THEN 'adolescent' ELSE 'adult' END AS kind,
           CAST(o.effective_time AS DATE) AS issued_day,
           unnest(string_to_array(o.reasons, ' ')) AS reason_
    FROM observation_coding o
    WHERE o.coding_system = 'loinc' AND o.coding_code IN ('73831-0', '73832-8')
      AND o.status = 'cancelled' AND o.reasons IS NOT NULL
      AND NOT coalesce(o.panel_id = o.source_observation_id, false)
  )
),
-- "Medical or Patient Reason for Not Screening Adolescent / Adult for
-- Depression": declined (SNOMED 720834000) or a Medical Reason, issued
-- during the day of a qualifying encounter.
reason_not_screened AS (
  SELECT n.person_id, n.kind,
         max(CASE WHEN n.reason_system = 'snomed' AND n.reason_code = '720834000'
                  THEN 'patient_declined' ELSE 'medical_reason' END) AS reason
  FROM screening_not_done n
  JOIN qualifying_encounter q ON q.person_id = n.person_id
  LEFT JOIN valueset_code v ON v.valueset = '2.16.840.1.113883.3.526.3.1007'   -- Medical Reason
    AND v.code_system = n.reason_system AND v.code = n.reason_code
  WHERE ((n.reason_system = 'snomed' AND n.reason_code = '720834000') OR v.code IS NOT NULL)
    AND n.issued_day BETWEEN q.start_day AND q.end_day
  GROUP BY n.person_id, n.kind
),
-- Per person and screening kind: has a screening, the most recent one's day
-- and result, and whether a positive one was followed up.
screening_status AS (
  SELECT ms.person_id, ms.kind, ms.start_day AS screening_date,
         CASE WHEN ms.value_code_system = 'snomed' AND ms.value_code = '428171000124102' THEN 'negative'
              WHEN ms.value_code_system = 'snomed' AND ms.value_code = '428181000124104' THEN 'positive'
              ELSE 'other' END AS result,
         pf.person_id IS NOT NULL AS followed_up,
         pf.follow_up_date
  FROM most_recent_screening ms
  LEFT JOIN positive_with_follow_up pf ON pf.person_id = ms.person_id AND pf.kind = ms.kind
),
flags AS (
  SELECT pe.person_id, pe.age,
         bp.person_id IS NOT NULL AS bipolar,
         bp.onset_date AS bipolar_onset_date,
         sa.screening_date AS adolescent_screening_date, sa.result AS adolescent_result,
         coalesce(sa.result = 'negative', false) AS adolescent_negative,
         coalesce(sa.followed_up, false) AS adolescent_positive_followed_up,
         sd.screening_date AS adult_screening_date, sd.result AS adult_result,
         coalesce(sd.result = 'negative', false) AS adult_negative,
         coalesce(sd.followed_up, false) AS adult_positive_followed_up,
         coalesce(sa.follow_up_date, sd.follow_up_date) AS follow_up_date,
         ra.reason AS adolescent_not_screened_reason,
         rd.reason AS adult_not_screened_reason
  FROM person pe
  LEFT JOIN bipolar_history bp ON bp.person_id = pe.person_id
  LEFT JOIN screening_status sa ON sa.person_id = pe.person_id AND sa.kind = 'adolescent'
  LEFT JOIN screening_status sd ON sd.person_id = pe.person_id AND sd.kind = 'adult'
  LEFT JOIN reason_not_screened ra ON ra.person_id = pe.person_id AND ra.kind = 'adolescent'
  LEFT JOIN reason_not_screened rd ON rd.person_id = pe.person_id AND rd.kind = 'adult'
  WHERE pe.age >= 12
    AND pe.person_id IN (SELECT person_id FROM qualifying_encounter)
)
SELECT
  f.person_id,
  true AS initial_population,
  true AS denominator,
  f.bipolar AS denominator_exclusion,
  -- "Numerator": the age-appropriate screening(s): adolescent at 12-16,
  -- either at 17, adult at 18 and older.
  (f.age <= 17 AND (f.adolescent_negative OR f.adolescent_positive_followed_up))
    OR (f.age >= 17 AND (f.adult_negative OR f.adult_positive_followed_up)) AS numerator,
  -- "Denominator Exceptions": a reason for not screening with that tool, and
  -- no screening with it (of any age).
  (f.adolescent_not_screened_reason IS NOT NULL AND f.adolescent_screening_date IS NULL)
    OR (f.adult_not_screened_reason IS NOT NULL AND f.adult_screening_date IS NULL) AS denominator_exception,
  f.age,
  f.adolescent_screening_date,
  f.adolescent_result,
  f.adult_screening_date,
  f.adult_result,
  greatest(f.adolescent_screening_date, f.adult_screening_date) AS last_screening_date,
  coalesce(
    ((f.age <= 17 AND f.adolescent_result = 'positive' AND NOT f.adolescent_positive_followed_up)
      OR (f.age >= 17 AND f.adult_result = 'positive' AND NOT f.adult_positive_followed_up))
    AND NOT ((f.age <= 17 AND (f.adolescent_negative OR f.adolescent_positive_followed_up))
             OR (f.age >= 17 AND (f.adult_negative OR f.adult_positive_followed_up))),
    false) AS positive_without_follow_up,
  f.follow_up_date,
  CASE WHEN f.bipolar THEN 'bipolar_disorder_before_encounter' END AS exclusion_reason,
  CASE
    WHEN f.adolescent_not_screened_reason IS NOT NULL AND f.adolescent_screening_date IS NULL
      THEN f.adolescent_not_screened_reason
    WHEN f.adult_not_screened_reason IS NOT NULL AND f.adult_screening_date IS NULL
      THEN f.adult_not_screened_reason
  END AS exception_reason
FROM flags f
