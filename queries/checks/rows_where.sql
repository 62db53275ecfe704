-- Of a table's staged rows that `rows` selects, those where `violates` holds.
-- Parameters: table, rows (a condition), violates (a condition).
SELECT source,
       SUM(CASE WHEN {{violates}} THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM staging_{{table}}
WHERE {{rows}}
GROUP BY source
