-- Facts dated more than `grace_days` days after the patient's death (their
-- source's patient record); checked: the facts of patients who died.
WITH death AS (
  SELECT source, source_patient_id, MIN(deceased_date) AS deceased_date
  FROM staging_patient
  WHERE deceased_date IS NOT NULL
  GROUP BY source, source_patient_id
)
SELECT f.source,
       SUM(CASE WHEN f.event_date > d.deceased_date + INTERVAL '{{grace_days}} days'
                THEN 1 ELSE 0 END) AS violating,
       COUNT(*) AS checked
FROM dq_facts f
JOIN death d ON d.source = f.source AND d.source_patient_id = f.source_patient_id
GROUP BY f.source
