-- Diabetic cohort with the last HbA1c in the measurement period: the
-- benchmark workload until the CMS122 measure (issue #5) exists. Runs
-- unchanged on DataFusion (Ward) and DuckDB; {period_start} and
-- {period_end_exclusive} are substituted by each runner. A person is
-- (source, source_patient_id) until linkage exists.
WITH diabetics AS (
    SELECT DISTINCT source, source_patient_id
    FROM condition
    WHERE (code_system = 'icd10cm' AND (code LIKE 'E10%' OR code LIKE 'E11%' OR code LIKE 'E13%'))
       OR (code_system = 'snomed' AND code IN ('44054006', '46635009', '73211009'))
),
a1c AS (
    SELECT source, source_patient_id, effective_time, value_num,
           row_number() OVER (PARTITION BY source, source_patient_id
                              ORDER BY effective_time DESC, value_num ASC) AS rn
    FROM observation
    WHERE code IN ('4548-4', '17856-6', '4549-2', '59261-8')
      AND effective_time >= TIMESTAMP '{period_start} 00:00:00'
      AND effective_time < TIMESTAMP '{period_end_exclusive} 00:00:00'
),
cohort AS (
    SELECT d.source, d.source_patient_id, a.effective_time AS last_time, a.value_num AS last_value
    FROM diabetics d
    LEFT JOIN a1c a
      ON a.source = d.source AND a.source_patient_id = d.source_patient_id AND a.rn = 1
)
SELECT count(*) AS diabetics,
       count(last_value) AS tested,
       sum(CASE WHEN last_value > 9 THEN 1 ELSE 0 END) AS above_9,
       sum(CASE WHEN last_value IS NULL THEN 1 ELSE 0 END) AS untested
FROM cohort
