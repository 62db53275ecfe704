-- Pairs of results of one patient at one time (`first` and `second`, LOINC
-- codes) where `violates` holds of their values `a` and `b`.
WITH pair AS (
  SELECT source, source_patient_id, effective_time,
         MAX(CASE WHEN code = '{{first}}' THEN value_num END) AS a,
         MAX(CASE WHEN code = '{{second}}' THEN value_num END) AS b
  FROM staging_observation
  WHERE code_system = 'loinc' AND code IN ('{{first}}', '{{second}}')
  GROUP BY source, source_patient_id, effective_time
)
SELECT source,
       SUM(CASE WHEN {{violates}} THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM pair
WHERE a IS NOT NULL AND b IS NOT NULL
GROUP BY source
