"""Small helpers for CSV rows (the plot CSVs that `dvc plots` reads)."""

from __future__ import annotations

import csv
import io


def to_csv(rows: list[dict]) -> str:
    """Rows of dicts as CSV text, columns in the first row's order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
