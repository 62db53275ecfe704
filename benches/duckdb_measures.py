#!/usr/bin/env python3
"""Ward's own measure SQL on DuckDB, checked against Ward's marts.

usage: duckdb_measures.py RUN_DIR [QUERIES_DIR] [OUT_DIR]
                          [--period-start 2025-01-01 --period-end 2025-12-31]
                          [--threads N] [--materialize parquet|table|view]

RUN_DIR is a published Ward run (`<warehouse>/runs/<run_id>`): its `core/`
(person.parquet and one folder of Parquet files per fact table) is what
`ward measure` read, and `marts/measure_patient/<KEY>.parquet` (KEY = measure
id, or `<id>.<group>` for a measure with groups) is what it wrote.
QUERIES_DIR defaults to the `queries/` beside this script; OUT_DIR to a new
temporary directory (printed), where the DuckDB results go, in the same
layout (`measure_patient/<KEY>.parquet`).

What it runs is Ward's session (src/measure/session.rs), rebuilt on DuckDB:
the core tables as `core_*` views, the views of every table (`patient`,
`condition` with prevalence_start / prevalence_end, `<table>_coding`,
`<table>_vs`, `<table>_reason`, `<table>_reason_vs`), `valueset_code`,
`period`, `age_years` and `age_band` (as macros); then, like Ward's
`Shared`, every `<table>_vs` / `<table>_reason_vs` that any `.sql` under
QUERIES_DIR names is written once to Parquet partitioned by value set and
read back in the view's place (`--materialize table` keeps them as DuckDB
tables instead, `view` leaves them views); then `queries/lib/*.sql` in
Ward's load order (`-- requires:` lines, else by name), then per measure
the `queries/lib/<library>/` its TOML names (default qicore-2025), the
measure's SQL, and Ward's scoring step (src/measure/mod.rs `scoring_sql`:
NULL as false, the population cascade, ids as text, rows where the initial
population holds, ordered by group and subject), written per group.

Ward also writes the `<table>_coding` views named twice or more (sorted by
code, `Shared`) and computes a measure's repeated grouping/window CTEs once
(src/measure/cte.rs): those are Ward's own physical choices for DataFusion,
not ported here; DuckDB plans codings itself and materializes repeated CTEs
on its own.

The SQL files are read as they are; the few places where DuckDB needs
another spelling are the text substitutions in SUBSTITUTIONS and the macros
of SHIMS below, each documented, so the port follows queries/ as it changes.

The check compares, for every measure (and group), the subjects and their
populations with Ward's mart (and reports, for information, the other
columns that differ); it exits 1 if any population differs.

Timings: "setup" is the views, value-set memberships and library views;
each measure's seconds are its SQL, scoring and Parquet write; "total" is
all of it (the comparison with the marts is not timed). They compare with
`ward measure`: its wall time (benches/measures.sh, /usr/bin/time) likewise
includes its session set-up, the one-off value-set memberships of `Shared`
and the marts, and its per-measure "measure finished" log lines time the
measure's query and scoring (not the mart write). Ward's stage also writes
reports and care gaps, which this does not. Peak RSS is this process's
(DuckDB runs in it).
"""
import argparse
import pathlib
import re
import resource
import shutil
import sys
import tempfile
import time
import tomllib

import duckdb

# Table::ALL of src/schema.rs (patient first), in Ward's order.
TABLES = ["patient", "encounter", "condition", "observation", "medication", "procedure",
          "service_request", "device", "coverage", "communication"]

# session.rs PREVALENCE_END, verbatim.
PREVALENCE_END = (
    "CASE WHEN clinical_status IS NULL OR clinical_status IN ('active', 'recurrence', 'relapse') "
    "THEN coalesce(abatement_date, DATE '9999-12-31') ELSE abatement_date END")

# Functions Ward registers (session.rs) or DataFusion has, as DuckDB macros.
SHIMS = [
    # age_years_udf: completed years (CQL AgeInYearsAt), NULL for NULL.
    "CREATE MACRO age_years(birth, at_date) AS CAST(year(at_date) - year(birth) - CASE "
    "WHEN month(at_date) * 100 + day(at_date) < month(birth) * 100 + day(birth) THEN 1 ELSE 0 END "
    "AS INTEGER)",
    # age_band_udf / age_band(): the report's age bands, NULL for NULL.
    "CREATE MACRO age_band(age) AS CASE WHEN age IS NULL THEN NULL "
    "WHEN age < 18 THEN '0-17' WHEN age < 45 THEN '18-44' WHEN age < 65 THEN '45-64' "
    "WHEN age < 75 THEN '65-74' ELSE '75+' END",
    # DataFusion's regexp_like(s, re) (true when re matches anywhere in s;
    # queries/lib/strata.sql) is DuckDB's regexp_matches.
    "CREATE MACRO regexp_like(s, pattern) AS regexp_matches(s, pattern)",
]

# Text substitutions applied to every SQL text taken from queries/ before
# DuckDB runs it: (pattern, replacement, why). Everything else runs as
# written: DuckDB reads `coding_['system']` (struct field by name),
# `array_has`, `string_to_array`, `split_part`, `strpos`, `bool_or`,
# `make_date`, `concat_ws`, `DATE +/- INTERVAL` (a TIMESTAMP, always cast
# back to DATE in queries/) and `unnest` in a select list as DataFusion does.
SUBSTITUTIONS: list[tuple[str, str, str]] = []


def dialect(sql: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        sql = re.sub(pattern, replacement, sql)
    return sql


def sql_text(root: pathlib.Path) -> str:
    """session.rs sql_text: every .sql file under root, lower-cased."""
    return "".join(p.read_text().lower() + "\n" for p in sorted(root.rglob("*.sql")))


def load_order(folder: pathlib.Path) -> list[pathlib.Path]:
    """session.rs load_order: after the files a file's `-- requires:` lines
    name (same folder), otherwise by name; a missing or circular requirement
    is an error."""
    pending = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".sql"):
        requires = []
        for i, line in enumerate(file.read_text().splitlines(), 1):
            line = line.strip()
            if not line.startswith("-- requires:"):
                continue
            for name in re.split(r"[, ]", line[len("-- requires:"):]):
                if name and not (folder / name).is_file():
                    sys.exit(f"{file}:{i}: requires: {name} is not a file of {folder}")
                if name:
                    requires.append(name)
        pending.append((file, requires))
    ordered = []
    while pending:
        done = {p.name for p in ordered}
        i = next((i for i, (_, r) in enumerate(pending) if all(n in done for n in r)), None)
        if i is None:
            sys.exit("these files require each other: " + ", ".join(str(p) for p, _ in pending))
        ordered.append(pending.pop(i)[0])
    return ordered


def columns(con, relation: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


def run_file(con, path: pathlib.Path, text: str | None = None):
    try:
        con.execute(dialect(path.read_text() if text is None else text))
    except duckdb.Error as e:
        sys.exit(f"{path}: {e}")


def user_views(con) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND NOT temporary").fetchall()}


class Measure:
    def __init__(self, toml: pathlib.Path):
        d = tomllib.loads(toml.read_text())
        self.id = d["id"]
        self.sql = toml.with_suffix(".sql")
        self.library = d.get("library", "qicore-2025")
        self.scoring = d.get("scoring", "proportion").replace("_", "-")
        self.subject = "encounter_id" if d.get("basis", "patient") == "encounter" else "person_id"
        self.groups = [g["id"] for g in d.get("group", [])]
        self.stratifiers = [s["column"] for s in d.get("stratifier", [])]

    def keys(self) -> list[tuple[str, str | None]]:
        if not self.groups:
            return [(self.id, None)]
        return [(f"{self.id}.{g}", g) for g in self.groups]

    def populations(self) -> list[str | None]:
        """mod.rs Scoring::columns."""
        return {
            "proportion": ["initial_population", "denominator", "denominator_exclusion",
                           "denominator_exception", "numerator"],
            "ratio": ["initial_population", "denominator", "denominator_exclusion",
                      "numerator_exclusion", "numerator"],
            "continuous-variable": ["initial_population", "measure_population",
                                    "measure_population_exclusion", None, None],
        }[self.scoring]

    def required(self) -> list[str]:
        """mod.rs Scoring::required, the subject, group_id, stratifiers."""
        base = {
            "proportion": ["initial_population", "denominator", "denominator_exclusion",
                           "numerator"],
            "ratio": ["initial_population", "denominator", "numerator"],
            "continuous-variable": ["initial_population", "measure_population",
                                    "measure_observation"],
        }[self.scoring]
        return (base + ["person_id", self.subject] + (["group_id"] if self.groups else [])
                + self.stratifiers)


OBSERVATION = "measure_observation"


def scoring_sql(m: Measure, schema: list[str], view: str) -> str:
    """A port of mod.rs scoring_sql, clause for clause."""
    cols = m.populations()
    flag = [f'coalesce(CAST("{c}" AS BOOLEAN), false)' if c and c in schema else "false"
            for c in cols]
    rules = {
        "proportion": ["c0", "c1", "c1 AND c2", "c1 AND NOT c2 AND NOT c4 AND c3",
                       "c1 AND NOT c2 AND c4"],
        "ratio": ["c0", "c1", "c1 AND c2", "c4 AND c3", "c4"],
        "continuous-variable": ["c0", "c1", "c1 AND c2", "false", "false"],
    }[m.scoring]
    scored = "".join(f', {r} AS "{c}"' for c, r in zip(cols, rules) if c)
    if m.scoring == "continuous-variable":
        obs_in = f', CAST("{OBSERVATION}" AS DOUBLE) AS obs'
        obs_out = f', CASE WHEN c1 AND NOT c2 THEN obs END AS "{OBSERVATION}"'
    else:
        obs_in = obs_out = ""
    ids = ["person_id", "encounter_id", "group_id"]
    returned = [c for c in ids if c in schema]
    id_columns = ", ".join(f'CAST("{c}" AS VARCHAR) AS "{c}"' for c in returned)
    details = "".join(f', "{n}"' for n in schema
                      if n not in ids and n not in cols and n != OBSERVATION)
    key = [c for c in ["group_id", m.subject] if c in returned]
    mid = m.id.replace("'", "''")
    return (
        f"WITH c AS (SELECT {id_columns}, {flag[0]} AS c0, {flag[1]} AS c1, {flag[2]} AS c2, "
        f"{flag[3]} AS c3, {flag[4]} AS c4{obs_in}{details} FROM {view} WHERE {flag[0]}) "
        f"SELECT '{mid}' AS measure_id, p.start_date AS period_start, p.end_date AS period_end, "
        + ", ".join(f'c."{c}"' for c in returned) + f"{scored}{obs_out}{details} "
        f"FROM c CROSS JOIN period p ORDER BY " + ", ".join(f'c."{c}"' for c in key))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=pathlib.Path)
    ap.add_argument("queries", type=pathlib.Path, nargs="?",
                    default=pathlib.Path(__file__).resolve().parent.parent / "queries")
    ap.add_argument("out", type=pathlib.Path, nargs="?")
    ap.add_argument("--period-start", default="2025-01-01")
    ap.add_argument("--period-end", default="2025-12-31")
    ap.add_argument("--threads", type=int, help="DuckDB threads (default: DuckDB's, all cores)")
    ap.add_argument("--materialize", choices=["parquet", "table", "view"], default="parquet",
                    help="value-set memberships: Parquet per value set as Ward (default), "
                         "DuckDB tables, or plain views")
    ap.add_argument("--measure", action="append", help="only these measure ids")
    a = ap.parse_args()
    core = a.run_dir / "core"
    marts = a.run_dir / "marts" / "measure_patient"
    out = a.out or pathlib.Path(tempfile.mkdtemp(prefix="duckdb-measures-"))
    (out / "measure_patient").mkdir(parents=True, exist_ok=True)
    measures = sorted((Measure(t) for t in (a.queries / "measures").glob("*.toml")),
                      key=lambda m: m.id)
    if a.measure:
        measures = [m for m in measures if m.id in a.measure]

    started = time.perf_counter()
    con = duckdb.connect()
    if a.threads:
        con.execute(f"SET threads = {a.threads}")
    threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]

    # install_base: value sets, period, functions, the views of every table.
    vs = a.queries / "valuesets"
    con.execute(
        f"CREATE TABLE valueset_code AS SELECT * FROM read_csv('{vs}/*.csv', header = true, "
        "delim = ',', quote = '\"', escape = '\"', "
        "columns = {'valueset': 'VARCHAR', 'name': 'VARCHAR', 'version': 'VARCHAR', "
        "'code_system': 'VARCHAR', 'code': 'VARCHAR', 'display': 'VARCHAR'})")
    con.execute(
        f"CREATE TABLE period AS SELECT DATE '{a.period_start}' AS start_date, "
        f"DATE '{a.period_end}' AS end_date, TIMESTAMP '{a.period_start}' AS start_ts, "
        f"CAST(DATE '{a.period_end}' + INTERVAL '1 day' AS TIMESTAMP) AS end_ts")
    for shim in SHIMS:
        con.execute(shim)
    con.execute(f"CREATE VIEW core_person AS SELECT * FROM read_parquet('{core}/person.parquet')")
    coded = {}
    for t in TABLES[1:]:
        con.execute(f"CREATE VIEW core_{t} AS SELECT * FROM "
                    f"read_parquet('{core}/{t}/**/*.parquet', hive_partitioning = false)")
        names = [c for c, _ in columns(con, f"core_{t}")]
        coded[t] = ("codings" in names, "reasons" in names)
    for t in TABLES:
        if t == "patient":
            con.execute("CREATE VIEW patient AS SELECT * FROM core_person")
            continue
        extra = (f", onset_date AS prevalence_start, {PREVALENCE_END} AS prevalence_end"
                 if t == "condition" else "")
        con.execute(f"CREATE VIEW {t} AS SELECT *{extra} FROM core_{t}")
        codings, reasons = coded[t]
        if codings:  # session.rs, verbatim
            con.execute(
                f"CREATE VIEW {t}_coding AS "
                f"SELECT *, coding_['system'] AS coding_system, coding_['code'] AS coding_code "
                f"FROM (SELECT *, unnest(codings) AS coding_ FROM {t})")
            con.execute(
                f"CREATE VIEW {t}_vs AS "
                f"SELECT f.*, v.valueset FROM valueset_code v JOIN {t}_coding f "
                f"ON v.code_system = f.coding_system AND v.code = f.coding_code")
        if reasons:
            con.execute(
                f"CREATE VIEW {t}_reason AS "
                f"SELECT *, split_part(reason_, '|', 1) AS reason_system, "
                f"substr(reason_, strpos(reason_, '|') + 1) AS reason_code "
                f"FROM (SELECT *, unnest(string_to_array(reasons, ' ')) AS reason_ FROM {t} "
                f"WHERE reasons IS NOT NULL)")
            con.execute(
                f"CREATE VIEW {t}_reason_vs AS "
                f"SELECT f.*, v.valueset AS reason_valueset FROM valueset_code v "
                f"JOIN {t}_reason f "
                f"ON v.code_system = f.reason_system AND v.code = f.reason_code")

    # Shared::install: every membership view the SQL of queries/ names,
    # written once, read back in the view's place.
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="measures-", dir=out))
    text = sql_text(a.queries)
    shared = []
    for t in TABLES[1:]:
        for has, view, column in ((coded[t][0], f"{t}_vs", "valueset"),
                                  (coded[t][1], f"{t}_reason_vs", "reason_valueset")):
            if has and view in text:
                shared.append((view, column))
    if a.materialize != "view":
        for view, column in shared:
            if a.materialize == "table":
                con.execute(f"CREATE TABLE {view}_m AS SELECT * FROM {view}")
                con.execute(f"DROP VIEW {view}")
                con.execute(f"ALTER TABLE {view}_m RENAME TO {view}")
                continue
            d = scratch / view
            con.execute(f"COPY (SELECT * FROM {view}) TO '{d}' "
                        f"(FORMAT parquet, PARTITION_BY ({column}))")
            if any(d.rglob("*.parquet")):
                source = (f"SELECT * FROM read_parquet('{d}/**/*.parquet', hive_partitioning = true, "
                          f"hive_types = {{'{column}': 'VARCHAR'}})")
            else:  # nothing to write: an empty table of the view's columns
                con.execute(f"CREATE TABLE {view}_empty AS SELECT * FROM {view} LIMIT 0")
                source = f"SELECT * FROM {view}_empty"
            con.execute(f"DROP VIEW {view}")
            con.execute(f"CREATE VIEW {view} AS {source}")

    # install_lib: queries/lib/*.sql, then per measure its library.
    for f in load_order(a.queries / "lib"):
        run_file(con, f)
    setup = time.perf_counter() - started

    library, library_views = None, set()
    timings = {}
    for m in measures:
        t0 = time.perf_counter()
        if m.library != library:
            for v in library_views:
                con.execute(f"DROP VIEW IF EXISTS {v}")
            before = user_views(con)
            folder = a.queries / "lib" / m.library
            if folder.is_dir():
                for f in load_order(folder):
                    run_file(con, f)
            library, library_views = m.library, user_views(con) - before
        t1 = time.perf_counter()
        setup += t1 - t0
        view = re.sub(r"[^a-z0-9]", "_", f"measure_raw_{m.id}".lower())
        body = m.sql.read_text().strip().rstrip(";")
        run_file(con, m.sql, f"CREATE OR REPLACE TEMP VIEW {view} AS\n{body}\n")
        schema = [c for c, _ in columns(con, view)]
        missing = [c for c in m.required() if c not in schema]
        if missing:
            sys.exit(f"{m.sql}: the query returns no column '{missing[0]}'")
        try:
            con.execute(f"CREATE OR REPLACE TEMP TABLE scored AS {scoring_sql(m, schema, view)}")
        except duckdb.Error as e:
            sys.exit(f"{m.sql} (scoring): {e}")
        for key, group in m.keys():
            where = f" WHERE group_id = '{group}'" if group else ""
            order = ", ".join(f'"{c}"' for c in ["group_id", m.subject]
                              if c in schema or c == m.subject)
            con.execute(f"COPY (SELECT * FROM scored{where} ORDER BY {order}) TO "
                        f"'{out / 'measure_patient' / (key + '.parquet')}' (FORMAT parquet)")
        con.execute(f"DROP VIEW {view}")
        timings[m.id] = time.perf_counter() - t1
    total = time.perf_counter() - started
    shutil.rmtree(scratch)

    # The check: subjects and populations against Ward's marts.
    print(f"DuckDB {duckdb.__version__}, {threads} threads, memberships: {a.materialize}; "
          f"results in {out}/measure_patient")
    print("value-set memberships shared: " + ", ".join(v for v, _ in shared))
    print(f"{'measure':<28} {'subjects':>8} {'duckdb s':>8}  identical")
    failed = 0
    for m in measures:
        for n, (key, group) in enumerate(m.keys()):
            ward, duck = marts / f"{key}.parquet", out / "measure_patient" / f"{key}.parquet"
            secs = f"{timings[m.id]:.3f}" if n == 0 else '"'
            if not ward.is_file():
                print(f"{key:<28} {'':>8} {secs:>8}  no: Ward wrote no {ward}")
                failed += 1
                continue
            wcols = [c for c, _ in columns(con, f"read_parquet('{ward}')")]
            dcols = [c for c, _ in columns(con, f"read_parquet('{duck}')")]
            subject = m.subject
            pops = [c for c in m.populations() if c] + ["person_id", "group_id"]
            compared = [c for c in pops if c in wcols or c in dcols]
            absent = [c for c in compared if c not in wcols or c not in dcols]
            subjects = con.execute(f"SELECT count(*) FROM read_parquet('{duck}')").fetchall()[0][0]
            cond = " OR ".join(f'w."{c}" IS DISTINCT FROM d."{c}"' for c in compared
                               if c not in absent and c != subject)
            diff = con.execute(
                f"SELECT coalesce(w.\"{subject}\", d.\"{subject}\") AS s FROM "
                f"read_parquet('{ward}') w FULL JOIN read_parquet('{duck}') d "
                f"ON w.\"{subject}\" = d.\"{subject}\" "
                f"WHERE w.\"{subject}\" IS NULL OR d.\"{subject}\" IS NULL"
                + (f" OR {cond}" if cond else "") + " ORDER BY s").fetchall()
            # Other columns (details), for information.
            others = [c for c in wcols if c in dcols and c not in compared and c != subject]
            detail = []
            for c in others:
                k = con.execute(
                    f"SELECT count(*) FROM read_parquet('{ward}') w JOIN read_parquet('{duck}') d "
                    f"ON w.\"{subject}\" = d.\"{subject}\" "
                    f"WHERE w.\"{c}\" IS DISTINCT FROM d.\"{c}\"").fetchall()[0][0]
                if k:
                    detail.append(f"{c} ({k})")
            if absent or diff:
                failed += 1
                what = f"no: {len(diff)} rows differ, e.g. {', '.join(r[0] for r in diff[:3])}"
                if absent:
                    what = f"no: column(s) {', '.join(absent)} in one side only; " + what
            else:
                what = "yes"
            if detail:
                what += "; other columns differ: " + ", ".join(detail)
            print(f"{key:<28} {subjects:>8} {secs:>8}  {what}")
    print(f"setup (views, value-set memberships, library views) {setup:.3f} s")
    print(f"total wall (setup + all measures + writes) {total:.3f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if failed:
        print(f"{failed} result(s) differ from Ward's marts")
        sys.exit(1)


if __name__ == "__main__":
    main()
