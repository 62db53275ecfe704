-- Report strata per person: one row per provider that knows the person
-- (a person seen by two providers counts in both providers' strata), with
-- the age band at the end of the period, sex, race, ethnicity, state,
-- 3-digit ZIP and payer (as the providers name it, lower-cased). A person
-- without a birth date has age band 'unknown'.
CREATE VIEW person_strata AS
SELECT person_id, provider,
       CASE
         WHEN age IS NULL THEN 'unknown'
         WHEN age < 18 THEN '0-17'
         WHEN age < 45 THEN '18-44'
         WHEN age < 65 THEN '45-64'
         WHEN age < 75 THEN '65-74'
         ELSE '75+'
       END AS age_band,
       coalesce(p_sex, 'unknown') AS sex,
       coalesce(p_race, 'unknown') AS race,
       coalesce(p_ethnicity, 'unknown') AS ethnicity,
       coalesce(p_state, 'unknown') AS state,
       coalesce(substr(p_postal_code, 1, 3), 'unknown') AS zip3,
       coalesce(nullif(lower(trim(p_payer)), ''), 'unknown') AS payer
FROM (
  SELECT pt.person_id, unnest(pt.sources) AS provider,
         age_years(pt.birth_date, p.end_date) AS age,
         pt.sex AS p_sex, pt.race AS p_race, pt.ethnicity AS p_ethnicity,
         pt.state AS p_state, pt.postal_code AS p_postal_code, pt.payer AS p_payer
  FROM patient pt CROSS JOIN period p
);
