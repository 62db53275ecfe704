-- BMI results that disagree by more than `tolerance` kg/m2 with the weight
-- (kg) and height (cm) measured the same day.
WITH day AS (
  SELECT source, source_patient_id, CAST(effective_time AS DATE) AS day,
         MAX(CASE WHEN code = '39156-5' AND unit = 'kg/m2' THEN value_num END) AS bmi,
         MAX(CASE WHEN code = '29463-7' AND unit = 'kg' THEN value_num END) AS kg,
         MAX(CASE WHEN code = '8302-2' AND unit = 'cm' THEN value_num END) AS cm
  FROM staging_observation
  WHERE code_system = 'loinc' AND code IN ('39156-5', '29463-7', '8302-2')
  GROUP BY source, source_patient_id, CAST(effective_time AS DATE)
)
SELECT source,
       SUM(CASE WHEN ABS(bmi - kg / ((cm / 100.0) * (cm / 100.0))) > {{tolerance}}
                THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM day
WHERE bmi IS NOT NULL AND kg IS NOT NULL AND cm > 0
GROUP BY source
