-- Records of `tables` that ingest refused under one of `rules`, of every
-- record of those tables read from the source (accepted + refused).
-- `tables`: a list, or a query of dq_rows' table names. FHIR rejects are
-- kept per file (table 'fhir-ndjson' or 'fhir-bundle'), so only a query
-- such as "SELECT table_name FROM dq_rows" counts them.
SELECT r.source,
       COALESCE(x.refused, 0) AS violating,
       r.accepted + r.rejected AS checked
FROM (SELECT source, SUM(accepted) AS accepted, SUM(rejected) AS rejected
      FROM dq_rows WHERE table_name IN ({{tables}}) GROUP BY source) r
LEFT JOIN (SELECT source, COUNT(*) AS refused
           FROM rejects WHERE "table" IN ({{tables}}) AND rule IN ({{rules}})
           GROUP BY source) x
  ON x.source = r.source
