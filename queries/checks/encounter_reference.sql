-- Facts naming an encounter that the source's encounters do not hold (for
-- the sources that deliver encounters).
-- (`delivering` is DISTINCT on purpose: a semi-join on the few source names
-- against every encounter row would compare each fact with all of them.)
WITH encounter AS (
  SELECT source, source_encounter_id
  FROM staging_encounter
  GROUP BY source, source_encounter_id
),
delivering AS (
  SELECT DISTINCT source FROM staging_encounter
)
SELECT f.source,
       SUM(CASE WHEN e.source_encounter_id IS NULL THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM dq_facts f
JOIN delivering d ON d.source = f.source
LEFT JOIN encounter e
  ON e.source = f.source AND e.source_encounter_id = f.source_encounter_id
WHERE f.source_encounter_id IS NOT NULL
GROUP BY f.source
