"""Small corpora for the `pidec run` tests: records of varied length, in JSONL, CSV and Parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

WORDS = "user wants a cheap hotel in the north with free parking and wifi for two nights from friday".split()
FIELDS = [
    {"name": "area", "prompt": "hotel area", "max_new_tokens": 3},
    {"name": "price", "prompt": "hotel price range"},
    {"name": "parking", "prompt": "hotel parking", "max_new_tokens": 2},
]


def document(i: int) -> str:
    n = 4 + (i * 7) % 23  # 4..26 words: lengths vary, all under a 40-token limit
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" ref {i}."


def records(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"doc-{i}", "document": document(i)} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "document"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 16) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_fields(path: Path, fields=FIELDS) -> Path:
    path.write_text(json.dumps(fields))
    return path
