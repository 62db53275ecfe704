"""A researcher's session with `ward serve` through the ADBC Flight SQL
driver (run by tests/it/serve.rs): usage `adbc_client.py URI TOKEN`.

Connects with the token, counts persons into a pyarrow table, lists the
tables the driver's catalog call finds, tries a COPY (must be refused with
Ward's message) and a wrong token (must be refused); prints what it found
as one JSON object for the Rust test to compare with `ward query`.
"""

import json
import sys

import adbc_driver_manager
import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions


def connect(uri, token):
    return flight_sql.connect(
        uri,
        db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"},
        autocommit=True,
    )


def main(uri, token):
    report = {}
    with connect(uri, token) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) AS n FROM person")
            report["persons"] = cur.fetch_arrow_table().column("n")[0].as_py()
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        report["tables"] = sorted(
            table["table_name"]
            for catalog in objects
            for schema in catalog["catalog_db_schemas"] or []
            for table in schema["db_schema_tables"] or []
        )
        try:
            with conn.cursor() as cur:
                cur.execute("COPY person TO '/tmp/ward-adbc-escape.csv'")
                cur.fetchall()
            report["refused"] = False
        except adbc_driver_manager.Error as e:
            report["refused"] = "query refused" in str(e)
    try:
        with connect(uri, "ward_wrong") as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchall()
        report["bad_token_refused"] = False
    except adbc_driver_manager.Error:
        report["bad_token_refused"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
