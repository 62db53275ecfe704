-- Building blocks of Ward's population metrics (not eCQM definitions).
-- requires: base.sql

-- Persons with a diagnosis of diabetes (eCQM "Diabetes" value set, any
-- category, not refuted) overlapping the period.
CREATE VIEW diabetes_person AS
SELECT DISTINCT c.person_id FROM condition_verified c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.103.12.1001'
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date;

-- Final HbA1c results in % in the period: the eCQM "HbA1c Laboratory Test"
-- value set, the glucose management indicator and IFCC HbA1c (LOINC
-- 59261-8, converted to % at ingest). (A UNION of the two ways a code
-- qualifies, not one join with OR: each branch then reads only the
-- codings of its codes.)
CREATE VIEW hba1c_result AS
SELECT o.person_id, o.source, o.source_file, o.source_line, o.end_day AS day, o.value_num
FROM observation_final o
JOIN valueset_code v ON v.valueset = '2.16.840.1.113883.3.464.1003.198.12.1013'
  AND v.code_system = o.coding_system AND v.code = o.coding_code
CROSS JOIN period p
WHERE o.end_day BETWEEN p.start_date AND p.end_date
UNION
SELECT o.person_id, o.source, o.source_file, o.source_line, o.end_day AS day, o.value_num
FROM observation_final o CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code IN ('97506-0', '59261-8')
  AND o.end_day BETWEEN p.start_date AND p.end_date;

-- Adults (18 or older at the end of the period, alive at its start) seen in
-- the period: any encounter that took place.
CREATE VIEW adult_in_care AS
SELECT DISTINCT pt.person_id, age_years(pt.birth_date, p.end_date) AS age
FROM patient pt CROSS JOIN period p
JOIN encounter e ON e.person_id = pt.person_id
WHERE age_years(pt.birth_date, p.end_date) >= 18
  AND (pt.deceased_date IS NULL OR pt.deceased_date >= p.start_date)
  AND coalesce(e.status, 'finished') = 'finished'
  AND e.start_time >= p.start_ts AND e.start_time < p.end_ts;
