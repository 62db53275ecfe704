-- Glycemic control bands among adults with diagnosed diabetes: the lowest
-- result of the most recent day with a result; a band per person.
WITH last_result AS (
  SELECT person_id, day, min(value_num) AS value_num FROM (
    SELECT r.*, max(r.day) OVER (PARTITION BY r.person_id) AS last_day FROM hba1c_result r
  ) WHERE day = last_day AND value_num IS NOT NULL
  GROUP BY person_id, day
)
SELECT
  a.person_id,
  true AS initial_population,
  true AS denominator,
  false AS denominator_exclusion,
  coalesce(l.value_num < 8.0, false) AS numerator,
  a.age,
  l.day AS last_result_date,
  l.value_num AS last_result_pct,
  CASE
    WHEN l.value_num IS NULL THEN 'untested'
    WHEN l.value_num < 7.0 THEN '<7'
    WHEN l.value_num < 8.0 THEN '7-8'
    WHEN l.value_num <= 9.0 THEN '8-9'
    ELSE '>9'
  END AS band
FROM adult_in_care a
JOIN diabetes_person d ON d.person_id = a.person_id
LEFT JOIN last_result l ON l.person_id = a.person_id
