-- Rows of `table` (those `rows` selects) without a value in `column`, for
-- the sources whose layout fills that column: a source that never sends it
-- is not asked for it (no data), one that stops sending it is caught.
SELECT t.source,
       SUM(CASE WHEN t.{{column}} IS NULL THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM staging_{{table}} t
WHERE ({{rows}})
  AND t.source IN (SELECT source FROM dq_layout
                   WHERE table_name = '{{table}}' AND column_name = '{{column}}')
GROUP BY t.source
