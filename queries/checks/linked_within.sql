-- The source's patient records that linkage joined to another record of
-- the same source: the same person registered twice.
WITH per_source AS (
  SELECT source, person_id, COUNT(*) AS records
  FROM person_link
  GROUP BY source, person_id
)
SELECT source,
       SUM(CASE WHEN records > 1 THEN records ELSE 0 END) AS violating,
       SUM(records) AS checked
FROM per_source
GROUP BY source
