"""Output shards: where each input shard's answers go, written under a temporary name, renamed when complete.

`plan_outputs` maps every input shard to one output file. With one input file and an `--output`
ending in .jsonl or .parquet, the output is that file; otherwise `--output` is a folder and each
input shard `a/b.csv` (relative to the input folder) becomes `a/b.jsonl` (or `.parquet`) in it.

`ShardWriter` appends output records to a staging file `NAME.partial` (JSON lines, whatever the
output format) and says how many bytes are committed after each `write` (flushed and fsynced).
A resumed run reopens the staging file cut back to the committed length the progress file
holds, so bytes written after the last commit (a run killed mid-write) are dropped, never
duplicated. `finish` makes the final file: JSONL by renaming the staging file, Parquet by
streaming it into `NAME.parquet.tmp` in row groups of `PARQUET_ROWS` and renaming that; so a
final name only ever holds a complete shard. Memory: one row group while converting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from .readers import Shard

OUTPUT_FORMATS = ("jsonl", "parquet")
OUTPUT_EXT = {"jsonl": ".jsonl", "parquet": ".parquet"}
PARQUET_ROWS = 4096


def output_format_of(output: str | Path, forced: str | None) -> str:
    if forced is not None:
        if forced not in OUTPUT_FORMATS:
            raise InputError(f"--output-format {forced!r}: expected jsonl or parquet")
        return forced
    suffix = Path(output).suffix.lower()
    return "parquet" if suffix == ".parquet" else "jsonl"


def plan_outputs(
    shards: list[Shard], input_root: str | Path, output: str | Path, output_format: str
) -> tuple[bool, dict[str, Path]]:
    """(single_file, {shard key: final output path})."""
    output, input_root = Path(output), Path(input_root)
    ext = OUTPUT_EXT[output_format]
    if len(shards) == 1 and input_root.is_file() and output.suffix.lower() in (".jsonl", ".parquet"):
        if output.suffix.lower() != ext:
            raise InputError(
                f"--output {output}: the extension says {output.suffix[1:]}, --output-format says {output_format}"
            )
        return True, {shards[0].key: output}
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: a file; for a folder of input shards --output names a folder")
    targets: dict[str, Path] = {}
    for s in shards:
        rel = s.path.relative_to(input_root) if input_root.is_dir() else Path(s.path.name)
        targets[s.key] = output / rel.with_suffix(ext)
    final = [str(p) for p in targets.values()]
    if len(set(final)) != len(final):
        raise InputError(f"--input {input_root}: two input files map to one output name (same name, other extension)")
    return False, targets


def output_schema(names: list[str] | None):
    """The Arrow schema of output records: answers a struct of the field names, or a list."""
    import pyarrow as pa

    answers = pa.struct([(n, pa.string()) for n in names]) if names is not None else pa.list_(pa.string())
    usage = pa.struct([(k, pa.int64()) for k in ("document_tokens", "prompt_tokens", "output_tokens")])
    error = pa.struct([("kind", pa.string()), ("message", pa.string())])
    return pa.schema(
        [("id", pa.string()), ("answers", answers), ("usage", usage), ("truncated_from", pa.int64()), ("error", error)]
    )


def to_table(records: list[dict], names: list[str] | None):
    import pyarrow as pa

    return pa.Table.from_pylist(records, schema=output_schema(names))


def staging_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    def __init__(self, final: Path, output_format: str, names: list[str] | None, committed_bytes: int = 0):
        self.final, self.format, self.names = Path(final), output_format, names
        self.staging = staging_path(self.final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if committed_bytes and not self.staging.exists():
            raise InputError(
                f"{self.staging} is missing but the progress file says {committed_bytes} bytes of it were written: "
                "the output folder was changed; start again with --overwrite"
            )
        self.file = open(self.staging, "ab" if committed_bytes else "wb")
        self.file.truncate(committed_bytes)
        self.file.seek(committed_bytes)
        self.bytes = committed_bytes

    def write(self, records: list[dict]) -> int:
        """Append records, flush them to disk; returns the committed length."""
        if records:
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
            self.file.write(data)
            self.bytes += len(data)
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.bytes

    def finish(self) -> None:
        self.file.close()
        if self.format == "jsonl":
            os.replace(self.staging, self.final)
        else:
            tmp = self.final.with_name(self.final.name + ".tmp")
            convert_to_parquet(self.staging, tmp, self.names)
            os.replace(tmp, self.final)
            self.staging.unlink()
        fsync_folder(self.final.parent)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def convert_to_parquet(jsonl: Path, out: Path, names: list[str] | None) -> None:
    import pyarrow.parquet as pq

    schema = output_schema(names)
    with pq.ParquetWriter(out, schema) as writer, jsonl.open("rb") as f:
        chunk: list[dict] = []
        for line in f:
            chunk.append(json.loads(line))
            if len(chunk) >= PARQUET_ROWS:
                writer.write_table(to_table(chunk, names))
                chunk = []
        if chunk:
            writer.write_table(to_table(chunk, names))


def read_output(path: str | Path) -> list[dict]:
    """Every output record of an output file or folder, in shard then record order (for tests,
    the speed script and small outputs: this one loads them all). Top-level nulls (which Parquet
    and Ray's JSON writer add for absent keys, and the null id of an unreadable line) are
    dropped, so every output format reads back alike."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.suffix in (".jsonl", ".parquet", ".json") and not p.name.startswith(("_", "."))
        )
    )
    rows = []
    for p in files:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(p).to_pylist()
        else:
            with p.open(encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if v is not None} for r in rows]
