"""Input shards and their records: JSONL, CSV and Parquet, streamed, never loaded whole.

An input is a file or a folder of files (a sharded corpus; every file with a known extension,
sorted by path, hidden and `_`-prefixed files skipped). Each file is one shard. `read_shard`
yields one `RawRecord` per record in file order with its 0-based offset in the shard, from a
given offset on (a resumed run skips what is done: JSONL and CSV re-read the skipped lines
without decoding them, Parquet skips whole row groups).

A record that cannot be read (a malformed JSONL line, a line that is not UTF-8, a JSON value
that is not an object) is yielded with its error instead of data, naming the file and line, so
that the run counts it and goes on. A JSONL offset counts non-blank lines; a CSV offset counts
data rows (the header is not one); a Parquet offset counts rows.

Memory: one line (JSONL, CSV) or one Parquet batch of `PARQUET_BATCH` rows at a time.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

FORMATS = ("jsonl", "csv", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
PARQUET_BATCH = 1024


@dataclass(frozen=True)
class Shard:
    path: Path
    format: str
    key: str  # the path relative to the input folder (the file's name for a single file)


@dataclass
class RawRecord:
    offset: int  # 0-based position in its shard
    where: str  # "file:line" or "file:row N", for messages
    data: dict | None = None
    error: tuple[str, str] | None = None  # (kind, message) when the record could not be read


def format_of(path: Path, forced: str | None = None) -> str | None:
    if forced is not None:
        if forced not in FORMATS:
            raise InputError(f"--input-format {forced!r}: expected one of {', '.join(FORMATS)}")
        return forced
    return EXTENSIONS.get(path.suffix.lower())


def find_shards(path: str | Path, input_format: str | None = None) -> list[Shard]:
    """The shards of an input file or folder, in path order; an input with none is an error."""
    path = Path(path)
    if input_format is not None:
        format_of(path, input_format)
    if path.is_file():
        fmt = format_of(path, input_format)
        if fmt is None:
            raise InputError(
                f"--input {path}: unknown extension {path.suffix!r} (expected .jsonl, .csv, .parquet); "
                "pass --input-format"
            )
        return [Shard(path, fmt, path.name)]
    if not path.is_dir():
        raise InputError(f"--input {path}: no such file or folder")
    shards = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if not p.is_file() or any(part.startswith((".", "_")) for part in rel):
            continue
        fmt = input_format or EXTENSIONS.get(p.suffix.lower())
        if fmt is not None:
            shards.append(Shard(p, fmt, str(p.relative_to(path))))
    if not shards:
        raise InputError(f"--input {path}: a folder with no .jsonl, .csv or .parquet files")
    return shards


def count_records(shard: Shard) -> int:
    """How many records the shard holds (exact for Parquet and JSONL; CSV counts data lines, an
    estimate when a quoted value spans lines). Streams the file once."""
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(shard.path).metadata.num_rows
    with shard.path.open("rb") as f:
        n = sum(1 for line in f if line.strip())
    return n if shard.format == "jsonl" else max(0, n - 1)


def count_input_records(shards: list[Shard], limit: int | None = None) -> int:
    """How many records a run over `shards` reads: every shard's `count_records`, capped at `limit`."""
    total = sum(count_records(s) for s in shards)
    return total if limit is None else min(total, limit)


def read_shard(shard: Shard, start: int = 0) -> Iterator[RawRecord]:
    if shard.format == "jsonl":
        return _read_jsonl(shard.path, start)
    if shard.format == "csv":
        return _read_csv(shard.path, start)
    return _read_parquet(shard.path, start)


def parse_line(line: bytes | str, offset: int, where: str) -> RawRecord:
    """One JSONL line -> its record, or its error naming `where` (the file and line)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return RawRecord(offset, where, error=("malformed_line", f"{where}: not UTF-8 text ({e.reason})"))
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return RawRecord(offset, where, error=("malformed_line", f"{where}: invalid JSON ({e.msg}, column {e.colno})"))
    if not isinstance(obj, dict):
        return RawRecord(
            offset, where, error=("malformed_line", f"{where}: expected a JSON object, got {type(obj).__name__}")
        )
    return RawRecord(offset, where, data=obj)


def _read_jsonl(path: Path, start: int) -> Iterator[RawRecord]:
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if offset >= start:
                yield parse_line(raw, offset, f"{path}:{n}")
            offset += 1


def _read_csv(path: Path, start: int) -> Iterator[RawRecord]:
    with path.open("rb") as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8", errors="strict", newline="")
        try:
            reader = csv.DictReader(text)
            offset = 0
            for row in reader:
                if offset >= start:
                    where = f"{path}:{reader.line_num}"
                    if None in row:  # more values than header columns
                        columns = len(reader.fieldnames)
                        message = f"{where}: {columns + len(row[None])} values for {columns} columns"
                        yield RawRecord(offset, where, error=("malformed_line", message))
                    else:
                        yield RawRecord(offset, where, data={k: v for k, v in row.items() if v is not None})
                offset += 1
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason}); CSV input must be UTF-8") from None
        except csv.Error as e:
            raise InputError(f"{path}: malformed CSV ({e})") from None


def _read_parquet(path: Path, start: int) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    skipped, groups = 0, []
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        if skipped + rows <= start:
            skipped += rows
        else:
            groups.append(g)
    offset = skipped
    if not groups:
        return
    for batch in f.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups):
        for row in batch.to_pylist():
            if offset >= start:
                yield RawRecord(offset, f"{path}:row {offset + 1}", data=row)
            offset += 1
