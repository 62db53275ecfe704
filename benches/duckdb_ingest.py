#!/usr/bin/env python3
"""Ward's ingest, done by DuckDB: every extract of a Ward config to Parquet.

usage: duckdb_ingest.py CONFIG OUT_DIR [--threads N]

CONFIG is a Ward pipeline config (ward.toml; `ward synth` writes one beside
its extracts). For every `[[sources]]` entry, every file its `path` names
is loaded the way `ward ingest` stages it, as far as a COPY can:

- CSV: read as text with the mapping's delimiter (`read_csv`, header,
  every column VARCHAR; rows with too many or too few fields skipped,
  where Ward rejects them with a reason), then one SELECT that applies the mapping's
  `[files.fields]` of the file's `[[files]]` entry: a column by name; a
  constant (`{ value = ... }`); a code map (`{ column, map, keep_unmapped }`,
  as a CASE); dates and times parsed with the mapping's formats
  (`date_format`, `datetime_format`, a field's own `format`; ISO when none),
  numbers cast to DOUBLE (TRY_ casts: an unparsable value becomes NULL,
  where Ward rejects the row with a reason); plus the source name and the
  line number, as Ward's staged rows carry them.
- FHIR NDJSON: `read_json` with its schema inference, the resources as
  nested structs, not flattened to Ward's canonical columns.

Each file's result is written to OUT_DIR/<source>/<file>.parquet with
LZ4_RAW, as Ward writes its staged Parquet. What DuckDB does not do here that Ward
does: the checks behind reject rows (required fields, code systems, value
ranges, dates in the future, duplicate ids), reject files, FHIR flattening,
unit conversion, content hashes for re-runs, the manifest. So this is a
lower bound on the work, and the ratio `ward ingest` / this is an upper
bound on Ward's overhead.

Prints the wall time, the rows written and this process's peak RSS.
"""
import argparse
import fnmatch
import pathlib
import resource
import shutil
import sys
import time
import tomllib

import duckdb

DATE_FIELDS = {
    "birth_date", "deceased_date", "onset_date", "abatement_date",
    "recorded_date", "start_date", "end_date",
}
FLOAT_FIELDS = {"value_num"}


def is_time(field):
    return field.endswith("_time") or field in {
        "effective_end", "occurrence_start", "occurrence_end"}


def q(name):
    return '"' + name.replace('"', '""') + '"'


def lit(value):
    return "'" + str(value).replace("'", "''") + "'"


def formats(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    return "[" + ", ".join(lit(f) for f in value) + "]"


def typed(field, expr, csv, own_format):
    """The expression that gives `field` its canonical type."""
    if field in DATE_FIELDS:
        fmt = formats(own_format or csv.get("date_format"))
        if fmt is None:
            return f"TRY_CAST({expr} AS DATE)"
        return f"CAST(try_strptime({expr}, {fmt}) AS DATE)"
    if is_time(field):
        fmt = formats(own_format or csv.get("datetime_format"))
        if fmt is None:
            return f"TRY_CAST({expr} AS TIMESTAMP)"
        return f"try_strptime({expr}, {fmt})"
    if field in FLOAT_FIELDS:
        return f"TRY_CAST({expr} AS DOUBLE)"
    return expr


def select_list(fields, csv):
    out = []
    for field, spec in fields.items():
        if isinstance(spec, str):
            expr = typed(field, q(spec), csv, None)
        elif "value" in spec and "column" not in spec:
            expr = lit(spec["value"])
        else:
            col = q(spec["column"])
            if "map" in spec:
                whens = " ".join(
                    f"WHEN {lit(k)} THEN {lit(v)}" for k, v in spec["map"].items())
                other = col if spec.get("keep_unmapped") else "NULL"
                col = f"CASE {col} {whens} ELSE {other} END"
            expr = typed(field, col, csv, spec.get("format"))
        if field == "value":
            # Ward's `value` splits into a number or a text value.
            out.append(f"TRY_CAST({expr} AS DOUBLE) AS value_num")
            out.append(f"{expr} AS value_text")
        else:
            out.append(f"{expr} AS {q(field)}")
    return out


def source_files(base, source):
    path = base / source["path"]
    if source["format"] == "fhir-ndjson":
        return sorted(path.glob("*.ndjson")) if path.is_dir() else [path]
    return sorted(path.parent.glob(path.name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    config_path = pathlib.Path(args.config).resolve()
    base = config_path.parent
    config = tomllib.loads(config_path.read_text())
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    con = duckdb.connect()
    if args.threads:
        con.execute(f"SET threads = {args.threads}")
    started = time.perf_counter()
    rows = files = 0
    for source in config["sources"]:
        (out / source["name"]).mkdir()
        mapping = None
        if source["format"] == "csv":
            mapping = tomllib.loads((base / source["mapping"]).read_text())
        for file in source_files(base, source):
            target = out / source["name"] / (file.stem + ".parquet")
            if mapping is None:
                sql = f"SELECT * FROM read_json({lit(file)}, format = 'newline_delimited', ignore_errors = true)"
            else:
                entry = next((f for f in mapping["files"]
                              if fnmatch.fnmatch(file.name, f["match"])), None)
                if entry is None:
                    continue
                csv = mapping.get("csv", {})
                cols = select_list(entry["fields"], csv)
                cols.append(f"{lit(source['name'])} AS source")
                # The header is line 1; Ward's staged `line` is the file's line.
                cols.append("CAST(row_number() OVER () + 1 AS UBIGINT) AS line")
                reader = (f"read_csv({lit(file)}, delim = {lit(csv.get('delimiter', ','))}, "
                          "header = true, all_varchar = true, quote = '\"', escape = '\"', "
                          "ignore_errors = true)")
                sql = f"SELECT {', '.join(cols)} FROM {reader}"
            con.execute(f"COPY ({sql}) TO {lit(target)} (FORMAT parquet, COMPRESSION lz4_raw)")
            rows += con.execute(
                f"SELECT count(*) FROM read_parquet({lit(target)})").fetchone()[0]
            files += 1
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"duckdb ingest: {files} files, {rows} rows, {seconds:.1f} s, peak {peak} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
