-- The source's patient records whose person no other source reports.
WITH person AS (
  SELECT person_id, COUNT(DISTINCT source) AS sources
  FROM person_link
  GROUP BY person_id
)
SELECT l.source,
       SUM(CASE WHEN p.sources = 1 THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM person_link l
JOIN person p ON p.person_id = l.person_id
GROUP BY l.source
