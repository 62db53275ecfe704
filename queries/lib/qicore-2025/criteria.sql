-- Shared eCQM criteria of the 2025 QI-Core eCQMs (CMS122 0.5.000, CMS165
-- 0.5.000 and their package year), as views of person_id (one row per
-- person who meets them) for the session's measurement period, at day
-- precision. Written against the libraries those measures include:
--   Status 1.15.000, Hospice 6.18.000, PalliativeCare 1.18.000,
--   AdvancedIllnessandFrailty 1.27.000, QICoreCommon 4.0.000.
-- A measure loads this set with `library = "qicore-2025"` in its TOML.
--
-- Ward conventions for data that FHIR would carry but CSV extracts often do
-- not: a missing status counts as the "done" status (finished / final /
-- completed / active), a missing end time makes a period a single moment,
-- a missing category or verification status does not exclude a fact.
-- `categories` holds every category code of a FHIR resource (space-
-- separated); CSV sources map one `category`.

-- Encounters that took place, with their days.
CREATE VIEW encounter_done AS
SELECT *, CAST(start_time AS DATE) AS start_day,
       CAST(coalesce(end_time, start_time) AS DATE) AS end_day
FROM encounter_vs
WHERE coalesce(status, 'finished') = 'finished';

-- AdultOutpatientEncounters."Qualifying Encounters" (4.19.000): a
-- finished encounter of these value sets whose period lies within (the days
-- of) the measurement period. CMS125, CMS130 and CMS165 read it; CMS122
-- and CMS131 define their own lists.
CREATE VIEW adult_outpatient_person AS
SELECT DISTINCT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset IN (
    '2.16.840.1.113883.3.464.1003.101.12.1001',  -- Office Visit
    '2.16.840.1.113883.3.526.3.1240',            -- Annual Wellness Visit
    '2.16.840.1.113883.3.464.1003.101.12.1025',  -- Preventive Care Established Office Visit, 18+
    '2.16.840.1.113883.3.464.1003.101.12.1023',  -- Preventive Care Initial Office Visit, 18+
    '2.16.840.1.113883.3.464.1003.101.12.1016',  -- Home Healthcare Services
    '2.16.840.1.113883.3.464.1003.101.12.1089',  -- Virtual Encounter
    '2.16.840.1.113883.3.464.1003.101.12.1080')  -- Telephone Visits
  AND e.start_day >= p.start_date AND e.end_day <= p.end_date;

-- Hospice care in any part of the period (Hospice."Has Hospice Services").
CREATE VIEW hospice_person AS
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.666.5.307'            -- Encounter Inpatient
  AND e.discharge_disposition IN ('428361000124107', '428371000124100') -- discharged for hospice care
  AND e.end_time IS NOT NULL AND CAST(e.end_time AS DATE) BETWEEN p.start_date AND p.end_date
UNION
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.464.1003.1003'        -- Hospice Encounter
  AND e.start_day <= p.end_date AND e.end_day >= p.start_date
UNION
SELECT o.person_id FROM observation_final o CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code = '45755-6'  -- Hospice care [MDS]
  AND o.value_code = '373066001'                               -- Yes
  AND o.start_day <= p.end_date AND o.end_day >= p.start_date
UNION
SELECT s.person_id FROM service_request_vs s CROSS JOIN period p
WHERE s.valueset = '2.16.840.1.113883.3.526.3.1584'            -- Hospice Care Ambulatory
  AND coalesce(s.status, 'active') IN ('active', 'completed')
  AND coalesce(s.intent, 'order') IN ('order', 'original-order', 'reflex-order', 'filler-order', 'instance-order')
  AND s.authored_time >= p.start_ts AND s.authored_time < p.end_ts
UNION
SELECT r.person_id FROM procedure_done r CROSS JOIN period p
WHERE r.valueset = '2.16.840.1.113883.3.526.3.1584'            -- Hospice Care Ambulatory
  AND r.start_day <= p.end_date AND r.end_day >= p.start_date
UNION
SELECT c.person_id FROM condition_verified c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.1165'         -- Hospice Diagnosis
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date;

-- Palliative care in any part of the period (PalliativeCare).
CREATE VIEW palliative_person AS
SELECT o.person_id FROM observation_final o CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code = '71007-9'  -- FACIT-Pal
  AND o.start_day <= p.end_date AND o.end_day >= p.start_date
UNION
SELECT c.person_id FROM condition_verified c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.1167'         -- Palliative Care Diagnosis
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
UNION
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.464.1003.101.12.1090'  -- Palliative Care Encounter
  AND e.start_day <= p.end_date AND e.end_day >= p.start_date
UNION
SELECT r.person_id FROM procedure_done r CROSS JOIN period p
WHERE r.valueset = '2.16.840.1.113883.3.464.1003.198.12.1135'  -- Palliative Care Intervention
  AND r.start_day <= p.end_date AND r.end_day >= p.start_date;

-- An indication of frailty in any part of the period
-- (AdvancedIllnessandFrailty."Has Criteria Indicating Frailty"). Like the
-- hospice order and dementia medications, the device order has no
-- doNotPerform test in the 2025 libraries (QI-Core 6 carries refusals in
-- separate *NotRequested profiles).
CREATE VIEW frailty_person AS
SELECT d.person_id FROM device_vs d CROSS JOIN period p
WHERE d.valueset = '2.16.840.1.113883.3.464.1003.118.12.1300'  -- Frailty Device (ordered)
  AND coalesce(d.resource_type, 'devicerequest') = 'devicerequest'
  AND coalesce(d.status, 'active') IN ('active', 'completed')
  AND coalesce(d.intent, 'order') IN ('order', 'original-order', 'reflex-order', 'filler-order', 'instance-order')
  AND d.event_time >= p.start_ts AND d.event_time < p.end_ts
UNION
SELECT o.person_id FROM observation_final o
JOIN valueset_code v ON v.valueset = '2.16.840.1.113883.3.464.1003.118.12.1300'
  AND v.code_system = o.value_code_system AND v.code = o.value_code
CROSS JOIN period p
WHERE o.coding_system = 'loinc' AND o.coding_code = '98181-1'  -- Medical equipment used
  AND o.end_day BETWEEN p.start_date AND p.end_date
UNION
SELECT c.person_id FROM condition_verified c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.113.12.1074'  -- Frailty Diagnosis
  AND c.prevalence_start <= p.end_date AND c.prevalence_end >= p.start_date
UNION
SELECT e.person_id FROM encounter_done e CROSS JOIN period p
WHERE e.valueset = '2.16.840.1.113883.3.464.1003.101.12.1088'  -- Frailty Encounter
  AND e.start_day <= p.end_date AND e.end_day >= p.start_date
UNION
SELECT o.person_id FROM observation_vs o CROSS JOIN period p
WHERE o.valueset = '2.16.840.1.113883.3.464.1003.113.12.1075'  -- Frailty Symptom
  AND coalesce(o.status, 'final') IN ('preliminary', 'final', 'amended', 'corrected')
  AND CAST(o.effective_time AS DATE) <= p.end_date
  AND CAST(coalesce(o.effective_end, o.effective_time) AS DATE) >= p.start_date;

-- Advanced illness diagnosed in the period or the year before.
CREATE VIEW advanced_illness_person AS
SELECT DISTINCT c.person_id FROM condition_verified c CROSS JOIN period p
WHERE c.valueset = '2.16.840.1.113883.3.464.1003.110.12.1082'  -- Advanced Illness
  AND c.prevalence_start BETWEEN CAST(p.start_date - INTERVAL '1 year' AS DATE) AND p.end_date;

-- Dementia medication active in the period or the year before. A request
-- whose duration is unknown counts for its first day.
CREATE VIEW dementia_medication_person AS
SELECT DISTINCT m.person_id FROM medication_vs m CROSS JOIN period p
WHERE m.valueset = '2.16.840.1.113883.3.464.1003.196.12.1510'  -- Dementia Medications
  AND coalesce(m.resource_type, 'medicationrequest') = 'medicationrequest'
  AND coalesce(m.status, 'active') = 'active'
  AND coalesce(m.intent, 'order') IN ('order', 'original-order', 'reflex-order', 'filler-order', 'instance-order')
  AND m.start_date <= p.end_date
  AND coalesce(m.end_date, m.start_date) >= CAST(p.start_date - INTERVAL '1 year' AS DATE);

-- Living long term in a nursing home: the most recent housing-status
-- assessment on or before the end of the period says so.
CREATE VIEW nursing_home_person AS
SELECT person_id FROM (
  SELECT o.person_id, o.value_code,
         row_number() OVER (PARTITION BY o.person_id
                            ORDER BY o.end_day DESC, o.effective_time DESC, o.source_file, o.source_line DESC) AS k
  FROM observation_final o CROSS JOIN period p
  WHERE o.coding_system = 'loinc' AND o.coding_code = '71802-3'  -- Housing status
    AND o.end_day <= p.end_date
) WHERE k = 1 AND value_code = '160734000';                     -- Lives in nursing home

-- The exclusion criteria per person, without the age conditions each
-- measure puts on them.
CREATE VIEW exclusion_criteria AS
SELECT pt.person_id,
       h.person_id IS NOT NULL AS hospice,
       pc.person_id IS NOT NULL AS palliative,
       nh.person_id IS NOT NULL AS nursing_home,
       fr.person_id IS NOT NULL AS frailty,
       ai.person_id IS NOT NULL OR dm.person_id IS NOT NULL AS advanced_illness_or_dementia_medication
FROM patient pt
LEFT JOIN hospice_person h ON h.person_id = pt.person_id
LEFT JOIN palliative_person pc ON pc.person_id = pt.person_id
LEFT JOIN nursing_home_person nh ON nh.person_id = pt.person_id
LEFT JOIN frailty_person fr ON fr.person_id = pt.person_id
LEFT JOIN advanced_illness_person ai ON ai.person_id = pt.person_id
LEFT JOIN dementia_medication_person dm ON dm.person_id = pt.person_id;
