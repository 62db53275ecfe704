-- Rows of `table` (those `rows` selects) sharing their `key` (columns) with
-- another row of the same source: every copy counts.
WITH k AS (
  SELECT source, COUNT(*) AS n
  FROM staging_{{table}}
  WHERE {{rows}}
  GROUP BY source, {{key}}
)
SELECT source,
       SUM(CASE WHEN n > 1 THEN n ELSE 0 END) AS violating,
       SUM(n) AS checked
FROM k
GROUP BY source
