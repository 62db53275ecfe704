-- The source's patient records whose person no other source reports: a
-- person whose records' lowest and highest source are the same is that
-- source's alone (grouping the links once, by person, without a join back
-- to them or a distinct count: the cheapest form of this check at 1M).
WITH person AS (
  SELECT MIN(source) AS lo, MAX(source) AS hi, COUNT(*) AS records
  FROM person_link
  GROUP BY person_id
)
SELECT source, SUM(violating) AS violating, SUM(checked) AS checked
FROM (
  SELECT lo AS source, records AS violating, 0 AS checked FROM person WHERE lo = hi
  UNION ALL
  SELECT source, 0 AS violating, COUNT(*) AS checked FROM person_link GROUP BY source
) counted
GROUP BY source
