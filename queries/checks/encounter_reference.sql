-- Facts naming an encounter that the source's encounters do not hold (for
-- the sources that deliver encounters).
WITH encounter AS (
  SELECT DISTINCT source, source_encounter_id FROM staging_encounter
)
SELECT f.source,
       SUM(CASE WHEN e.source_encounter_id IS NULL THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM dq_facts f
LEFT JOIN encounter e
  ON e.source = f.source AND e.source_encounter_id = f.source_encounter_id
WHERE f.source_encounter_id IS NOT NULL
  AND f.source IN (SELECT source FROM encounter)
GROUP BY f.source
