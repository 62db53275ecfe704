-- Report strata per person: one row per provider that knows the person
-- (a person seen by two providers counts in both providers' strata), with
-- the age band at the end of the period, sex, race, ethnicity, state,
-- 3-digit ZIP and payer. A person without a birth date has age band
-- 'unknown'. Stratum labels are published even where counts are
-- suppressed, so none is free text: a state that is not a two-letter code,
-- a ZIP that is not 5 or 9 digits and a payer outside the categories below
-- are 'other'.
CREATE VIEW person_strata AS
SELECT person_id, provider,
       coalesce(age_band(age), 'unknown') AS age_band,
       coalesce(p_sex, 'unknown') AS sex,
       coalesce(p_race, 'unknown') AS race,
       coalesce(p_ethnicity, 'unknown') AS ethnicity,
       CASE
         WHEN p_state IS NULL THEN 'unknown'
         WHEN regexp_like(p_state, '^[A-Z]{2}$') THEN p_state
         ELSE 'other'
       END AS state,
       CASE
         WHEN p_postal_code IS NULL THEN 'unknown'
         WHEN regexp_like(p_postal_code, '^[0-9]{5}(-?[0-9]{4})?$') THEN substr(p_postal_code, 1, 3)
         ELSE 'other'
       END AS zip3,
       CASE
         WHEN p_payer IS NULL OR trim(p_payer) = '' THEN 'unknown'
         WHEN lower(p_payer) LIKE '%medicare%' THEN 'medicare'
         WHEN lower(p_payer) LIKE '%medicaid%' OR lower(p_payer) LIKE '%chip%' THEN 'medicaid'
         WHEN lower(p_payer) LIKE '%tricare%' OR lower(p_payer) LIKE '%veteran%'
           OR lower(p_payer) LIKE '%military%' THEN 'military'
         WHEN lower(p_payer) LIKE '%self%' OR lower(p_payer) LIKE '%uninsured%'
           OR lower(p_payer) IN ('none', 'no insurance', 'cash') THEN 'self-pay'
         WHEN lower(p_payer) LIKE '%commercial%' OR lower(p_payer) LIKE '%private%'
           OR lower(p_payer) LIKE '%employer%' OR lower(p_payer) LIKE '%hmo%'
           OR lower(p_payer) LIKE '%ppo%' THEN 'commercial'
         ELSE 'other'
       END AS payer
FROM (
  SELECT pt.person_id, unnest(pt.sources) AS provider,
         age_years(pt.birth_date, p.end_date) AS age,
         pt.sex AS p_sex, pt.race AS p_race, pt.ethnicity AS p_ethnicity,
         pt.state AS p_state, pt.postal_code AS p_postal_code, pt.payer AS p_payer
  FROM patient pt CROSS JOIN period p
);
