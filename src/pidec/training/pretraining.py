"""The examples of `pidec pretrain`: raw text turned into T5 span-corruption examples.

Text comes from files (`.txt`: every non-blank line; `.jsonl`: the `--text-field` of every
record; `.parquet`: that column), a file or a folder of them read in path order, or from a
task's training documents (`--task`). It is read one line or one record batch at a time,
tokenized without special tokens and, as T5 does, concatenated into one stream that is cut into
chunks of `span_corruption.lengths(...).tokens` tokens, so that every example fills the encoder
with no padding (a final chunk shorter than that is corrupted as it is, or dropped below
`MIN_TAIL` tokens). Chunk c is corrupted with a `random.Random` seeded by (seed, c): the same
examples in every epoch and after a resume. The token ids are held in memory (one int per token
in the examples), not the text.

Each example is one `TrainItem`: the corrupted input as the encoder row, one decoder row whose
prefix is the decoder start token and whose target is the sentinel-marked noise (with EOS). The
training loop then treats it as any other example: token-budget batches, the same loss.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

from .. import span_corruption, tasks
from ..data import DataReport
from ..errors import InputError
from ..layouts import TrainItem

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
MIN_TAIL = 8  # a last chunk with fewer text tokens is dropped (counted)


def text_files(path: str | Path) -> list[Path]:
    """The text files of `path` (a file, or a folder searched recursively), in path order."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--text {p}: no such file or folder")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"--text {p}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise InputError(f"--text {f}: expected a {', '.join(TEXT_SUFFIXES)} file")
    return files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_texts(path: Path, text_field: str, report: DataReport) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        report.read += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            got = "missing" if value is None else type(value).__name__
            raise InputError(
                f"{path}:{number}: the text field {text_field!r} must be a string ({got}); see --text-field"
            )
        if not value.strip():
            report.skipped["empty text"] += 1
            continue
        report.kept += 1
        yield value


def _parquet_texts(path: Path, text_field: str, report: DataReport) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow) ({e})") from None
    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise InputError(
            f"{path}: no column {text_field!r} (columns: {', '.join(f.schema_arrow.names)}); see --text-field"
        )
    for batch in f.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            report.read += 1
            if not isinstance(value, str) or not value.strip():
                report.skipped["empty text"] += 1
                continue
            report.kept += 1
            yield value


def _plain_texts(path: Path, report: DataReport) -> Iterator[str]:
    for _, line in _lines(path):
        if line.strip():
            report.read += 1
            report.kept += 1
            yield line.strip()


def read_texts(path: str | Path, text_field: str, report: DataReport) -> Iterator[str]:
    """Every text of the files under `path`, streamed, counted in `report`."""
    for f in text_files(path):
        if f.suffix == ".jsonl":
            yield from _jsonl_texts(f, text_field, report)
        elif f.suffix == ".parquet":
            yield from _parquet_texts(f, text_field, report)
        else:
            yield from _plain_texts(f, report)


def task_texts(task: str, data: str | None, report: DataReport) -> Iterator[str]:
    """The documents of a task's training split, each text once: a document that repeats one
    given before (a QA article asked many questions), or that the next document extends (a
    dialogue's history at one turn, which the next turn's history starts with), is skipped and
    counted, so that a dialogue is pre-trained on once, as its whole history."""
    given: set[bytes] = set()
    held: str | None = None
    for ex in tasks.get(task).load("train", data):
        report.read += 1
        doc = ex.document
        if held is not None and doc != held and doc.startswith(held):
            report.skipped["history the next document extends"] += 1
        elif held is not None:
            given.add(_digest(held))
            report.kept += 1
            yield held
        if _digest(doc) in given:  # held, just given, included
            report.skipped["repeated document"] += 1
            held = None
        else:
            held = doc
    if held is not None:
        report.kept += 1
        yield held


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def token_chunks(texts, tokenizer, size: int, report: DataReport) -> Iterator[list[int]]:
    """The texts' tokens concatenated and cut into chunks of `size` (the last may be shorter)."""
    buffer: list[int] = []
    for text in texts:
        buffer += tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(buffer) >= size:
            yield buffer[:size]
            buffer = buffer[size:]
    if len(buffer) >= MIN_TAIL:
        yield buffer
    elif buffer:
        report.skipped[f"tokens at the end (under {MIN_TAIL})"] += 1


def pretrain_items(
    texts,
    tokenizer,
    inputs_length: int,
    noise_density: float,
    mean_span_length: float,
    decoder_start: int,
    seed: int,
    report: DataReport,
) -> list[TrainItem]:
    """The span-corruption examples of `texts` for an encoder of `inputs_length` tokens."""
    shape = span_corruption.lengths(inputs_length, noise_density, mean_span_length)
    sentinels = span_corruption.sentinel_ids(tokenizer)
    eos = tokenizer.eos_token_id
    items = []
    for c, chunk in enumerate(token_chunks(texts, tokenizer, shape.tokens, report)):
        rng = random.Random(f"{seed}/span/{c}")
        mask = span_corruption.noise_mask(len(chunk), noise_density, mean_span_length, rng)
        inputs, targets = span_corruption.corrupt(chunk, mask, sentinels, eos)
        items.append(TrainItem(c, [inputs], [(0, [decoder_start], targets)], [""]))
    if not items:
        raise InputError(f"{report.source}: no text to pre-train on ({report.summary()})")
    return items
