"""Appending benchmark rows to bench/results/<name>.csv: the one CSV writer every bench script uses.

A new file gets a header from the first row's keys; later runs append below it, so a CSV collects
measurements across machines and versions (each row carries its device and versions).
"""

import csv
from pathlib import Path


def append_rows(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
