"""`pidec run` on one machine: a corpus streamed through the model in bounded windows, resumable.

The loop, for each input shard in path order:

1. read a window of `window` records (windows start at multiples of `window` in the shard, so
   a resumed run cuts the same windows, hence the same batches, as an uninterrupted one);
2. `extract.prepare` them (bad records become error records here and are counted);
3. cut the window's jobs into token-budgeted batches, sorted by length (`extract.batches`) and
   hand them to the workers (this process, or N processes: `workers`);
4. when every batch of the oldest window is back, write its records in input order to the
   shard's staging file, fsync, and commit the window in the progress file;
5. at the end of a shard, rename its staging file to the final name.

Memory: at most two windows of records per worker are held (read, in decoding, or waiting to be
written), whatever the corpus size. A run killed at any point loses at most the windows not yet
committed, and the next run with the same command redoes exactly those (`progress`).

`--on-error fail` stops at the first error record, after committing the windows before it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import checkpoint
from ..errors import InputError
from . import progress as prog
from .extract import Job, Options, PromptCounter, batches, prepare
from .fields import Questions
from .readers import Shard, count_input_records, find_shards, read_shard
from .report import Display, format_summary, summary, write_summary
from .workers import InProcess, ModelSpec, Pool
from .writers import ShardWriter, output_format_of, plan_outputs, staging_path

ON_ERROR = ("continue", "fail")
DEFAULT_WINDOW = 256


class RecordError(InputError):
    """--on-error fail: the first record that could not be processed."""


@dataclass
class _Window:
    shard: Shard
    start: int
    entries: list  # Job | error record, then output records
    outstanding: int = 0
    batches: dict = field(default_factory=dict)  # batch number -> window positions


@dataclass
class _Finish:
    shard: Shard


def fingerprint(spec: ModelSpec, questions: Questions, options: Options, shards, output_format, limit) -> dict:
    return {
        "model": prog.model_identity(checkpoint.resolve(spec.path)),
        "questions": questions.to_dict(),
        "options": options.to_dict(),
        "runtime": {"dtype": spec.dtype, "quantize": spec.quantize, "max_input_length": spec.max_input_length}
        | ({"template": asdict(spec.template)} if spec.template is not None else {}),
        "shards": [s.key for s in shards],
        "output_format": output_format,
        "limit": limit,
    }


def _check(workers, window, limit, on_error):
    for name, value in (("--workers", workers), ("--window", window), ("--limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if on_error not in ON_ERROR:
        raise InputError(f"--on-error {on_error!r}: expected continue or fail")


def run(
    spec: ModelSpec,
    input: str | Path,
    output: str | Path,
    questions: Questions,
    options: Options,
    input_format: str | None = None,
    output_format: str | None = None,
    workers: int = 1,
    limit: int | None = None,
    window: int = DEFAULT_WINDOW,
    on_error: str = "continue",
    resume: bool = False,
    overwrite: bool = False,
    display: str = "auto",
    log_every: float = 10.0,
    json_summary: str | Path | None = None,
) -> dict:
    """Answer every record of `input` into `output`; returns the summary (see `report.summary`)."""
    t0 = time.perf_counter()
    _check(workers, window, limit, on_error)
    shards = find_shards(input, input_format)
    out_format = output_format_of(output, output_format)
    single, targets = plan_outputs(shards, input, output, out_format)
    state = prog.Progress.open(
        prog.progress_path(output, single),
        fingerprint(spec, questions, options, shards, out_format, limit),
        targets,
        resume=resume,
        overwrite=overwrite,
    )
    total = count_input_records(shards, limit) if display != "off" else None
    engine = InProcess(spec) if workers == 1 else Pool(spec, workers)
    shown = Display(total, state.counts["records"], display, log_every)
    loop = _Loop(engine, state, targets, questions, options, out_format, on_error, shown)
    try:
        loop.run(_items(shards, state, window, limit))
    finally:
        engine.close()
        loop.close()
        shown.close()
    extra = {"output": str(output), "resumed": state.resumed, "workers": workers, "engine": "local"}
    extra["malloc"] = engine.malloc
    result = summary(state.counts, time.perf_counter() - t0, loop.records, loop.tokens, **extra)
    return write_summary(result, json_summary)


def _items(shards: list[Shard], state: prog.Progress, window: int, limit: int | None):
    """Windows of raw records and end-of-shard markers, from where the progress file says."""
    before = 0  # records of the input before this shard (for --limit)
    for s in shards:
        st = state.shard(s.key)
        if st["complete"]:
            before += st["done"]
            continue
        offset = st["done"]
        if limit is not None and before + offset >= limit and offset == 0:
            return  # the limit ended in an earlier shard: no output for this one
        if not st["finished"]:
            records = read_shard(s, offset)
            while limit is None or before + offset < limit:
                take = (offset // window + 1) * window - offset
                if limit is not None:
                    take = min(take, limit - before - offset)
                raws = list(itertools.islice(records, take))
                if raws:
                    yield s, offset, raws
                offset += len(raws)
                if len(raws) < take:
                    break
            records.close()
        yield _Finish(s)
        before += offset
        if limit is not None and before >= limit:
            return


class _Loop:
    def __init__(self, engine, state, targets, questions, options, out_format, on_error, shown):
        self.engine, self.state, self.targets = engine, state, targets
        self.questions, self.options, self.format, self.on_error, self.shown = (
            questions,
            options,
            out_format,
            on_error,
            shown,
        )
        self.count_prompts = PromptCounter(engine.tokenizer)
        self.names = questions.names()
        self.pending: deque = deque()
        self.windows: dict[int, _Window] = {}
        self.writers: dict[str, ShardWriter] = {}
        self.in_flight = 0
        self.max_in_flight = 0 if engine.workers == 1 else 2 * engine.workers
        self.records = self.tokens = 0
        self.ids = itertools.count()

    def run(self, items) -> None:
        for item in items:
            if isinstance(item, _Finish):
                self.pending.append(item)
            else:
                self.submit(*item)
            while self.in_flight > self.max_in_flight:
                self.collect()
            self.flush()
        while self.in_flight:
            self.collect()
        self.flush()

    def submit(self, shard: Shard, start: int, raws) -> None:
        entries = prepare(
            raws, self.questions, self.options, self.engine.tokenizer, self.engine.max_input_length, self.count_prompts
        )
        if self.on_error == "fail":
            self.fail_on(entries)
        w = _Window(shard, start, entries)
        wid = next(self.ids)
        self.pending.append(w)
        groups = batches([e for e in entries if isinstance(e, Job)], self.options.batch_tokens)
        if groups:
            self.windows[wid] = w
        for b, jobs in enumerate(groups):
            w.batches[b] = [j.index for j in jobs]
            w.outstanding += 1
            self.in_flight += 1
            self.engine.submit((wid, b), jobs, self.options)

    def fail_on(self, records) -> None:
        for r in records:
            if isinstance(r, dict) and "error" in r:
                raise RecordError(f"{r['error']['message']} [{r['error']['kind']}; --on-error fail stops here]")

    def collect(self) -> None:
        (wid, b), records = self.engine.next_result()
        self.in_flight -= 1
        w = self.windows[wid]
        for i, r in zip(w.batches.pop(b), records):
            w.entries[i] = r
        w.outstanding -= 1
        if w.outstanding == 0:
            del self.windows[wid]

    def writer(self, shard: Shard) -> ShardWriter:
        if shard.key not in self.writers:
            st = self.state.shard(shard.key)
            self.writers[shard.key] = ShardWriter(self.targets[shard.key], self.format, self.names, st["bytes"])
        return self.writers[shard.key]

    def flush(self) -> None:
        while self.pending and (isinstance(self.pending[0], _Finish) or self.pending[0].outstanding == 0):
            item = self.pending.popleft()
            if isinstance(item, _Finish):
                self.finish(item.shard)
                continue
            records = item.entries
            if self.on_error == "fail":
                self.fail_on(records)
            written = self.writer(item.shard).write(records)
            self.state.commit(item.shard.key, item.start + len(records), written, records)
            tokens = sum(r["usage"]["output_tokens"] for r in records if "usage" in r)
            self.records += len(records)
            self.tokens += tokens
            self.shown.update(len(records), tokens)

    def finish(self, shard: Shard) -> None:
        st = self.state.shard(shard.key)
        final = self.targets[shard.key]
        if st["finished"] and final.exists() and not staging_path(final).exists():
            self.state.mark(shard.key, complete=True)  # killed between the rename and its record
            return
        self.state.mark(shard.key, finished=True)
        self.writer(shard).finish()
        del self.writers[shard.key]
        self.state.mark(shard.key, complete=True)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def describe(result: dict) -> str:
    return format_summary(result)
