-- Diagnosed diabetes prevalence among adults seen in the period.
SELECT
  a.person_id,
  true AS initial_population,
  true AS denominator,
  false AS denominator_exclusion,
  d.person_id IS NOT NULL AS numerator,
  a.age
FROM adult_in_care a
LEFT JOIN diabetes_person d ON d.person_id = a.person_id
