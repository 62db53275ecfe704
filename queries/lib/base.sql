-- Views every library set and Ward's own metrics build on, the same in
-- every QI-Core package year: loaded first, before the measure's
-- queries/lib/<library>/ (see README, "What the SQL can use").
--
-- Ward conventions for data that FHIR would carry but CSV extracts often do
-- not: a missing status counts as the "done" status (final / completed), a
-- missing end time makes a period a single moment, a missing verification
-- status does not exclude a fact.

-- Diagnoses that are not refuted or entered in error (Status.verified() since
-- Status 1.15; the 2024 libraries do not filter diagnoses by it).
CREATE VIEW condition_verified AS
SELECT * FROM condition_vs
WHERE verification_status IS NULL
   OR verification_status IN ('confirmed', 'unconfirmed', 'provisional', 'differential');

-- Observations with a final result (assessments, laboratory tests, exams),
-- with the day their effective time ends ("effective.latest()").
CREATE VIEW observation_final AS
SELECT *, CAST(effective_time AS DATE) AS start_day,
       CAST(coalesce(effective_end, effective_time) AS DATE) AS end_day
FROM observation_coding
WHERE coalesce(status, 'final') IN ('final', 'amended', 'corrected');

CREATE VIEW procedure_done AS
SELECT *, CAST(performed_time AS DATE) AS start_day,
       CAST(coalesce(performed_end_time, performed_time) AS DATE) AS end_day
FROM procedure_vs
WHERE coalesce(status, 'completed') = 'completed';
