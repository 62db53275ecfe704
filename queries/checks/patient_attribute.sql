-- Facts whose patient (the source's own patient record) has `missing`.
WITH patient AS (
  SELECT source, source_patient_id,
         MAX(CASE WHEN {{missing}} THEN 1 ELSE 0 END) AS missing
  FROM staging_patient
  GROUP BY source, source_patient_id
)
SELECT f.source,
       SUM(p.missing) AS violating,
       COUNT(*) AS checked
FROM dq_facts f
JOIN patient p ON p.source = f.source AND p.source_patient_id = f.source_patient_id
GROUP BY f.source
