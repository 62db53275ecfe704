-- Records of `tables` that ingest refused under one of `rules`, of every
-- record of those tables read from the source (accepted + refused).
-- `tables`: a list, or a query of dq_rows' table names ("SELECT table_name
-- FROM dq_rows" also counts the FHIR lines that are no resource at all,
-- kept as table 'fhir-ndjson' or 'fhir-bundle').
SELECT r.source,
       COALESCE(x.refused, 0) AS violating,
       r.accepted + r.rejected AS checked
FROM (SELECT source, SUM(accepted) AS accepted, SUM(rejected) AS rejected
      FROM dq_rows WHERE table_name IN ({{tables}}) GROUP BY source) r
LEFT JOIN (SELECT source, COUNT(*) AS refused
           FROM rejects WHERE "table" IN ({{tables}}) AND rule IN ({{rules}})
           GROUP BY source) x
  ON x.source = r.source
