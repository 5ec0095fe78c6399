"""Appending benchmark rows to bench/results/<name>.csv: the one CSV writer every bench script uses.

A new file gets a header from the first row's keys; later runs append below it, so a CSV collects
measurements across machines and versions (each row carries its device and versions); a row with a new
column extends the header, the older rows left blank in it.
"""

import csv
from pathlib import Path


def append_rows(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
            header = list(old[0]) if old else fields
        extra = [k for k in fields if k not in header]
        if extra:  # a new column: rewrite the file once with it, old rows left blank there
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header + extra)
                writer.writeheader()
                writer.writerows(old)
        fields = header + extra
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
