-- Possible undiagnosed diabetes: tested adults without a diagnosis whose
-- highest HbA1c in the period reaches the diagnostic threshold.
WITH tested AS (
  SELECT person_id, max(value_num) AS max_pct, max(day) AS last_result_date
  FROM hba1c_result WHERE value_num IS NOT NULL
  GROUP BY person_id
)
SELECT
  a.person_id,
  true AS initial_population,
  true AS denominator,
  false AS denominator_exclusion,
  t.max_pct >= 6.5 AS numerator,
  a.age,
  t.max_pct AS highest_result_pct,
  t.last_result_date
FROM adult_in_care a
JOIN tested t ON t.person_id = a.person_id
LEFT JOIN diabetes_person d ON d.person_id = a.person_id
WHERE d.person_id IS NULL
