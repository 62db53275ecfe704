#!/usr/bin/env python3
"""Peer benchmark: Splink (DuckDB backend) links the same staged patient
records as `ward link`, with the same standardization, blocking rules,
comparison levels and threshold, and is scored against the same truth.

    splink_link.py WAREHOUSE TRUTH.csv [THRESHOLD]

Prints pairwise precision, recall, F1 and `link_seconds` (standardize,
train, predict, cluster; reading included).
"""
import sys
import time

import duckdb
import splink.comparison_library as cl
from splink import DuckDBAPI, Linker, SettingsCreator, block_on
from splink.blocking_rule_library import CustomRule

NICKNAMES = {
    "liz": "elizabeth", "beth": "elizabeth", "betty": "elizabeth", "eliza": "elizabeth",
    "peggy": "margaret", "maggie": "margaret", "meg": "margaret", "pat": "patricia",
    "patty": "patricia", "trish": "patricia", "jen": "jennifer", "jenny": "jennifer",
    "sue": "susan", "susie": "susan", "bob": "robert", "rob": "robert", "bobby": "robert",
    "bill": "william", "will": "william", "billy": "william", "liam": "william",
    "dick": "richard", "rick": "richard", "rich": "richard", "joe": "joseph", "joey": "joseph",
    "tom": "thomas", "tommy": "thomas", "mike": "michael", "mikey": "michael", "jim": "james",
    "jimmy": "james", "chuck": "charles", "charlie": "charles", "chris": "christopher",
    "dan": "daniel", "danny": "daniel", "tony": "anthony", "kate": "katherine",
    "kathy": "katherine", "katie": "katherine", "steve": "steven", "andy": "andrew",
    "drew": "andrew", "josh": "joshua", "dave": "david", "matt": "matthew", "nick": "nicholas",
}


def soundex(name):
    """American Soundex, as Ward's blocking key (DuckDB has none built in)."""
    if not name:
        return None
    letters = [c for c in name.lower() if c.isascii() and c.isalpha()]
    if not letters:
        return None
    codes = {**dict.fromkeys("bfpv", "1"), **dict.fromkeys("cgjkqsxz", "2"), **dict.fromkeys("dt", "3"),
             "l": "4", **dict.fromkeys("mn", "5"), "r": "6"}
    out, last = letters[0].upper(), codes.get(letters[0])
    for c in letters[1:]:
        k = codes.get(c)
        if k and k != last:
            out += k
            if len(out) == 4:
                break
        if c not in "hw":
            last = k
    return out.ljust(4, "0")


def main():
    wh, truth = sys.argv[1], sys.argv[2]
    threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.9
    t = time.perf_counter()
    con = duckdb.connect()
    con.create_function("soundex", soundex, ["VARCHAR"], "VARCHAR")
    con.execute("CREATE TABLE nick(nick VARCHAR, full_name VARCHAR)")
    con.executemany("INSERT INTO nick VALUES (?, ?)", list(NICKNAMES.items()))
    clean = "nullif(trim(regexp_replace(lower(strip_accents({})), '[^a-z0-9]+', ' ', 'g')), '')"
    con.execute(f"""
        CREATE TABLE recs AS
        WITH p AS (
          SELECT row_number() OVER (ORDER BY source, source_patient_id) AS unique_id,
                 source, source_patient_id,
                 split_part({clean.format('given_name')}, ' ', 1) AS given0,
                 {clean.format('family_name')} AS family_name,
                 birth_date, nullif(sex, 'unknown') AS sex,
                 nullif(substr(regexp_replace(split_part(postal_code, '-', 1), '[^0-9]', '', 'g'), 1, 5), '') AS zip,
                 nullif(right(regexp_replace(phone, '[^0-9]', '', 'g'), 10), '') AS phone,
                 nullif(lower(trim(email)), '') AS email,
                 nullif(regexp_replace(ssn, '[^0-9]', '', 'g'), '') AS ssn,
                 {clean.format('address_line')} AS address
          FROM read_parquet('{wh}/staging/patient/*/*.parquet', hive_partitioning = false))
        SELECT p.* EXCLUDE (given0), coalesce(n.full_name, nullif(p.given0, '')) AS given_name,
               substr(p.family_name, 1, 1) AS family_initial,
               substr(coalesce(n.full_name, p.given0), 1, 1) AS given_initial,
               soundex(p.family_name) AS family_soundex, year(p.birth_date) AS birth_year,
               coalesce(n.full_name, nullif(p.given0, '')) || ' ' || p.family_name AS given_family
        FROM p LEFT JOIN nick n ON n.nick = p.given0""")
    db_api = DuckDBAPI(connection=con)
    df = db_api.register("recs")
    settings = SettingsCreator(
        link_type="dedupe_only",
        # Ward's ten default blocking rules (src/link/mod.rs BLOCKING_RULES).
        blocking_rules_to_generate_predictions=[
            block_on("birth_date", "family_initial"),
            block_on("birth_date", "given_initial"),
            block_on("ssn"),
            block_on("phone"),
            block_on("email"),
            block_on("given_name", "family_soundex", "birth_year"),
            CustomRule("l.given_name = r.given_name AND l.family_name = r.family_name"
                       " AND (l.birth_date IS NULL OR r.birth_date IS NULL)"),
            CustomRule("l.given_name = r.family_name AND l.family_name = r.given_name"),
            block_on("zip", "family_soundex"),
            block_on("address"),
        ],
        comparisons=[
            # Names compared together: exact, swapped between the fields,
            # Jaro-Winkler levels, term-frequency adjusted (Ward: given and
            # family levels with a swap level, TF adjusted).
            cl.ForenameSurnameComparison(
                "given_name", "family_name", jaro_winkler_thresholds=[0.92, 0.80],
                forename_surname_concat_col_name="given_family",
            ).configure(term_frequency_adjustments=True),
            cl.DateOfBirthComparison("birth_date", input_is_string=False),
            cl.ExactMatch("sex"),
            cl.ExactMatch("zip"),
            cl.ExactMatch("phone"),
            cl.ExactMatch("email"),
            cl.DamerauLevenshteinAtThresholds("ssn", [1]),
            cl.JaroWinklerAtThresholds("address", [0.90]),
        ],
        retain_intermediate_calculation_columns=False,
    )
    linker = Linker(df, settings, log_level=None)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("given_name", "family_name", "birth_date")], recall=0.9)
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("birth_date"))
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("given_name", "family_soundex", "birth_year"))
    pairs = linker.inference.predict(threshold_match_probability=threshold)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(pairs, threshold)
    con.execute(f"CREATE TABLE clusters AS SELECT unique_id, cluster_id FROM {clusters.physical_name}")
    secs = time.perf_counter() - t

    con.execute(f"CREATE TABLE truth AS SELECT * FROM read_csv('{truth}', all_varchar = true)")
    tp, pred, true = con.execute("""
        WITH j AS (SELECT r.unique_id, c.cluster_id, t.person_id
                   FROM recs r JOIN clusters c USING (unique_id)
                   JOIN truth t USING (source, source_patient_id)),
        pairs(n) AS (SELECT 1)
        SELECT (SELECT sum(n * (n - 1) / 2) FROM (SELECT count(*) n FROM j GROUP BY cluster_id, person_id)),
               (SELECT sum(n * (n - 1) / 2) FROM (SELECT count(*) n FROM j GROUP BY cluster_id)),
               -- every truth record, as Ward's --evaluate (rejected ones
               -- are persons of their own)
               (SELECT sum(n * (n - 1) / 2) FROM (SELECT count(*) n FROM truth GROUP BY person_id))
    """).fetchone()
    precision, recall = tp / pred, tp / true
    print(f"splink {__import__('splink').__version__}: precision {precision:.4f}, recall {recall:.4f}, "
          f"F1 {2 * precision * recall / (precision + recall):.4f} "
          f"({int(true)} true pairs, {int(pred)} predicted, {int(tp)} correct)")
    print(f"link_seconds {secs:.3f}")


if __name__ == "__main__":
    main()
