"""The same bulk extraction on Ray Data, for a corpus one machine cannot get through in time.

    import ray, pidec.bulk.ray as pray
    ds = ray.data.read_parquet("s3://bucket/corpus/")
    out = pray.extract(ds, model="/shared/ckpt", fields=[{"name": "area", "prompt": "hotel area"}], actors=8)
    out.write_parquet("s3://bucket/answers/")

`extract` is `map_batches` with `Extractor`, a callable class that Ray instantiates once per
actor: it loads the model once and answers each batch of rows with the code the local runner
uses (`extract.prepare`, `extract.batches`, `extract.decode`), so a record gets the same output
record on Ray as with `pidec run`. Rows in, Arrow tables of output records out (the schema of
`writers.output_schema`). Ray schedules the actors (`actors` replicas, `actor_cpus` or
`actor_gpus` each) and moves the data; pidec writes no scheduler of its own.

`run` is `pidec run --engine ray`: `ray.data.read_text` (JSONL, parsed in the actor so a
malformed line is a counted error record, named by file: Ray does not give line numbers),
`read_csv` (column types inferred by Arrow) or `read_parquet` -> `extract` -> `write_json` or
a Parquet sink that keeps row order (`parquet_sink`) into an output folder, with the order of
records kept, read in blocks of about one actor call (`block_bytes`) and written in files of at
least FILE_ROWS records. It starts a local Ray when none is running and `address` is None, else joins
the cluster at `address`. A Ray run is not resumable record by record (Ray Data has no
checkpoint of a pipeline): a failed run is started again with --overwrite.

Ray and pyarrow are imported inside the functions, so pidec imports without the `ray` extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from .. import allocator
from ..errors import InputError
from .extract import Job, Options, PromptCounter, batches, decode, prepare
from .fields import Questions
from .fields import questions as make_questions
from .progress import add_counts, empty_counts
from .readers import RawRecord, count_input_records, find_shards, parse_line
from .report import summary, write_summary
from .workers import ModelSpec
from .writers import output_format_of, to_table

INSTALL = "pip install 'pidec[ray]'  (Ray Data and pyarrow)"
TEXT_COLUMN, PATH_COLUMN = "text", "path"
MAX_BATCH_SIZE = 256  # rows per actor call that `run` picks at most
TYPICAL_DOC_TOKENS = 512  # the document length `run` assumes when it sizes calls to fill a batch
CALLS_PER_ACTOR = 8  # `run` cuts each actor's share of a small corpus into about this many calls
ACTORS_PER_READER = 8  # `run` reads (and writes) with one task at a time per this many actors: each
# task runs in a Ray worker process of its own, and on a small machine starting one per input
# shard costs more CPU than the reading it does (a reader keeps up with far more actors)
NICENESS = "RAY_worker_niceness"  # read by each Ray worker process when it starts
IDLE_KILL = "idle_worker_killing_time_threshold_ms"  # Ray's setting: how long an idle worker may wait
FILE_ROWS = 1024  # output records `run` writes to a file at least (Ray's hint; the last file may have fewer):
# its blocks are about one actor call each (see block_bytes), too small to be a file apiece
KEEP_IDLE_WORKERS_MS = 3_600_000  # a local Ray of `run` keeps its idle workers this long (see local_system_config)


class RecordError(InputError):
    """--on-error fail on Ray: the first record that could not be processed."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise InputError(f"--engine ray needs Ray Data: {INSTALL} ({e})") from None
    return ray


class Extractor:
    """One Ray actor: the model loaded once, each batch of rows answered as the local runner does."""

    def __init__(self, spec: ModelSpec, questions: Questions, options: Options, on_error: str = "continue"):
        self.model = spec.load()
        self.questions, self.options, self.on_error = questions, options, on_error
        self.count_prompts = PromptCounter(self.model.tokenizer)

    def _raws(self, rows: list[dict]) -> list[RawRecord]:
        raws = []
        for i, row in enumerate(rows):
            if TEXT_COLUMN in row and PATH_COLUMN in row and len(row) == 2:  # a JSONL line from read_text
                if row[TEXT_COLUMN].strip():
                    raws.append(parse_line(row[TEXT_COLUMN], i, str(row[PATH_COLUMN])))
            else:
                raws.append(RawRecord(i, f"row {row.get(self.options.id_field)!s}", data=row))
        return raws

    def __call__(self, table):
        entries = prepare(
            self._raws(table.to_pylist()),
            self.questions,
            self.options,
            self.model.tokenizer,
            self.model.config.max_input_length,
            self.count_prompts,
        )
        for jobs in batches([e for e in entries if isinstance(e, Job)], self.options.batch_tokens):
            for job, record in zip(jobs, decode(self.model, jobs, self.options)):
                entries[job.index] = record
        if self.on_error == "fail":
            for r in entries:
                if "error" in r:
                    raise RecordError(f"{r['error']['message']} [{r['error']['kind']}; --on-error fail stops here]")
        return to_table(entries, self.questions.names())


def extract(
    dataset,
    model: str | ModelSpec,
    fields=None,
    prompts: list[str] | None = None,
    *,
    options: Options | None = None,
    questions: Questions | None = None,
    actors: int = 1,
    actor_cpus: float | None = None,
    actor_gpus: float | None = None,
    batch_size: int = 256,
    on_error: str = "continue",
    env: dict[str, str] | None = None,
    **option_values,
):
    """A Ray Dataset of output records (one per input row, see `pidec.bulk.extract`) for a
    Dataset of records (`id`, `document` and, without fields or prompts, `prompts`).

    model: a checkpoint folder every actor can read (shared storage), or a `ModelSpec`.
    fields: a fields file path, or a list of {name, prompt, max_new_tokens, num_beams}.
    options / option_values: `extract.Options` (layout, num_beams, max_new_tokens, truncate,
    id_field, document_field, batch_tokens). batch_size: rows per actor call (small blocks are
    bundled up to it; a larger block goes to one actor whole, cut into calls there, so a corpus
    spreads over the actors by its blocks: read it in blocks of about one call, as `run` does
    with `DataContext.target_max_block_size` and `block_bytes`). env: environment variables each
    actor starts with (default `actor_env`; {} for none: a Ray whose workers have them already)."""
    ray = _import_ray()
    if questions is None and isinstance(fields, (str, Path)):
        questions = make_questions(fields_file=fields)
    elif questions is None:
        questions = make_questions(fields=fields, prompts=prompts)
    options = options or Options(**option_values)
    for name, value in (("actors", actors), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if actor_cpus is not None and actor_gpus is not None:
        raise InputError("give actor_cpus or actor_gpus, not both")
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model))
    if actor_gpus:
        spec = replace(spec, device="cuda" if spec.device == "cpu" else spec.device)
    cpus = actor_cpus if actor_cpus is not None else (0 if actor_gpus else 1)
    if not spec.threads and cpus >= 1:
        spec = replace(spec, threads=int(cpus))
    return dataset.map_batches(
        Extractor,
        fn_constructor_args=(spec, questions, options, on_error),
        batch_size=batch_size,
        batch_format="pyarrow",
        # one call at a time per actor: a call waiting behind another on a busy actor while
        # the other actor idles would be the run's tail (calls are long: whole batches)
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        **actor_options(spec, cpus, actor_gpus, env),
    )


def actor_options(spec: ModelSpec, cpus: float, gpus: float | None, env: dict[str, str] | None = None) -> dict:
    """Ray's options for each actor of `extract`: its CPUs and GPUs, and `env` (default:
    `actor_env(spec)`) as the environment it starts with, where there is one."""
    opts = {"num_cpus": cpus, "num_gpus": gpus or None}
    env = actor_env(spec, gpus) if env is None else env
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def actor_env(spec: ModelSpec, gpus: float | None = None) -> dict[str, str]:
    """The environment an actor needs for `spec` (with `gpus` GPUs each): for `--malloc keep` on
    the CPU, one malloc heap (`allocator.one_heap_environment`), since Ray Data runs an actor's
    calls on a thread of its thread pool, not the main thread. It must be there when the process
    starts: a local Ray that `run` starts passes it to every worker (`ray_session`); elsewhere
    each actor is given it as a runtime_env, which costs a worker process of its own (about 1.5 s
    more to start two actors on 2 cores than with Ray's pre-started workers)."""
    on_cpu = spec.device == "cpu" and not gpus
    return allocator.one_heap_environment() if spec.malloc == "keep" and on_cpu else {}


def read(shards, readers: int = 1) -> object:
    """One Ray Dataset over the input shards, in path order, read by at most `readers` tasks at
    a time. Reading takes no CPU slot (`num_cpus=0`): it is light I/O, and actors that hold
    every slot must not starve it."""
    ray = _import_ray()
    formats = {s.format for s in shards}
    if len(formats) > 1:
        raise InputError("--engine ray: an input folder mixes formats; give one format per run")
    (fmt,) = formats
    paths = [str(s.path) for s in shards]
    if fmt == "jsonl":
        return ray.data.read_text(paths, include_paths=True, drop_empty_lines=True, num_cpus=0, concurrency=readers)
    if fmt == "csv":
        return ray.data.read_csv(paths, num_cpus=0, concurrency=readers)
    return ray.data.read_parquet(paths, num_cpus=0, concurrency=readers)


def parquet_sink(path: str, min_rows_per_file: int | None = None):
    """A Parquet datasink that keeps row order inside each file. Ray's own `write_parquet`
    hands a write task's blocks to `pyarrow.dataset.write_dataset` with threads and no
    `preserve_order`, which can swap them within a file; this sink writes the task's blocks
    concatenated in order (Ray's block-based file sink does that) with `pyarrow.parquet`."""
    _import_ray()
    import pyarrow.parquet as pq
    from ray.data.datasource import BlockBasedFileDatasink

    class OrderedParquetSink(BlockBasedFileDatasink):
        def __init__(self, folder: str):
            super().__init__(folder, file_format="parquet", min_rows_per_file=min_rows_per_file)

        def write_block_to_file(self, block, file):
            pq.write_table(block.to_arrow(), file)

    return OrderedParquetSink(path)


def readers_for(actors: int) -> int:
    """Read (and write) tasks `run` lets Ray run at a time: one per ACTORS_PER_READER actors."""
    return -(-actors // ACTORS_PER_READER)


def share_per_call(
    shards, actors: int, limit: int | None, batch_tokens: int = Options.batch_tokens, total: int | None = None
) -> int:
    """Rows per actor call for `run`: an eighth of each actor's share of the corpus
    (CALLS_PER_ACTOR), at most MAX_BATCH_SIZE, and at least one decoding batch's worth of
    documents (`batch_tokens` over TYPICAL_DOC_TOKENS) unless that is more than an actor's whole
    share. Input blocks are bundled up to this many rows per call, so a small corpus in a few
    shards still reaches every actor, a large one is cut into calls of MAX_BATCH_SIZE, the actors
    end within about one small call of each other, and no call decodes its documents in smaller
    batches than `pidec run --workers` would (4 documents a batch instead of 8 cost 13% at dst's
    shape). `total`: the records the run reads, when already counted."""
    total = count_input_records(shards, limit) if total is None else total
    per = -(-total // (CALLS_PER_ACTOR * actors))
    full_batch = max(1, batch_tokens // TYPICAL_DOC_TOKENS)
    per = max(per, min(full_batch, -(-total // actors)))
    return max(1, min(MAX_BATCH_SIZE, per))


def block_bytes(shards, records: int, rows: int) -> int | None:
    """The input bytes of about `rows` records of `shards` (which hold `records` in all): the
    block size `run` asks Ray Data to read in, so that a block is about one actor call.

    An actor takes a whole block at a time (`batch_size` only bundles blocks smaller than a
    call, and cuts a larger one into calls inside the same task), and Ray reads a text file in
    blocks of its own size: 14 blocks of about 290 records for a 15 MB JSONL file of 4,096
    (Ray 2.60), so 10 actors would do that corpus in two rounds of 290 records, 6 of them idle
    in the second, where `run`'s calls of 52 keep all 10 busy to within one call.
    Compressed input (Parquet) is larger once read: its blocks come out smaller than a call
    and are bundled back up to one. None for an empty input."""
    if records < 1:
        return None
    size = sum(s.path.stat().st_size for s in shards)
    return max(1, size * rows // records)


def data_settings(shards, records: int, batch_size: int) -> dict:
    """The DataContext settings of a `run` (see `data_context`): the records kept in order, and
    blocks of about one call (`block_bytes`) where the input has records, never larger than the
    blocks Ray would make (128 MiB by default: calls of large documents)."""
    settings = {"execution_options.preserve_order": True}
    if (block := block_bytes(shards, records, batch_size)) is not None:
        ray_own = _import_ray().data.DataContext.get_current().target_max_block_size
        settings["target_max_block_size"] = min(block, ray_own) if ray_own else block
    return settings


@contextlib.contextmanager
def data_context(**settings):
    """Ray Data's current DataContext with `settings` (attributes, or `execution_options.NAME`)
    inside the block, put back as they were after it."""
    ctx = _import_ray().data.DataContext.get_current()
    saved = {}
    for name, value in settings.items():
        owner, attr = (ctx.execution_options, name.split(".", 1)[1]) if "." in name else (ctx, name)
        saved[name] = (owner, attr, getattr(owner, attr))
        setattr(owner, attr, value)
    try:
        yield ctx
    finally:
        for owner, attr, value in saved.values():
            setattr(owner, attr, value)


def count_output(folder: Path) -> dict:
    """Counts of an output folder written by `run` (streamed; Parquet reads its error column)."""
    counts = empty_counts()
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            f = pq.ParquetFile(p)
            for batch in f.iter_batches(columns=["id", "usage", "truncated_from", "error"]):
                add_counts(counts, [{k: v for k, v in r.items() if v is not None} for r in batch.to_pylist()])
        elif p.suffix == ".json":
            with p.open(encoding="utf-8") as f:
                rows = (json.loads(line) for line in f if line.strip())
                for r in rows:
                    add_counts(counts, [{k: v for k, v in r.items() if v is not None}])
    return counts


def run(
    spec: ModelSpec,
    input,
    output,
    questions: Questions,
    options: Options,
    input_format: str | None = None,
    output_format: str | None = None,
    address: str | None = None,
    actors: int = 1,
    actor_cpus: float | None = None,
    actor_gpus: float | None = None,
    limit: int | None = None,
    on_error: str = "continue",
    overwrite: bool = False,
    json_summary=None,
    batch_size: int | None = None,
    file_rows: int | None = FILE_ROWS,
) -> dict:
    """`pidec run --engine ray`: read -> extract -> write into the folder `output`, about
    `file_rows` records a file at least."""
    ray = _import_ray()
    t0 = time.perf_counter()
    shards = find_shards(input, input_format)
    records = count_input_records(shards)
    if batch_size is None:
        total = records if limit is None else min(records, limit)
        batch_size = share_per_call(shards, actors, limit, options.batch_tokens, total=total)
    settings = data_settings(shards, records, batch_size)
    out_format = output_format_of(output, output_format)
    output = empty_output_folder(output, overwrite)
    env = actor_env(spec, actor_gpus) if address is None else {}
    with ray_session(ray, address, worker_env=env) as workers_have_env, data_context(**settings):
        readers = readers_for(actors)
        ds = read(shards, readers)
        if limit is not None:
            ds = ds.limit(limit)
        out = extract(
            ds,
            spec,
            options=options,
            questions=questions,
            actors=actors,
            actor_cpus=actor_cpus,
            actor_gpus=actor_gpus,
            batch_size=batch_size,
            on_error=on_error,
            env={} if workers_have_env else None,
        )
        write(out, output, out_format, readers, file_rows)
    return _run_summary(output, time.perf_counter() - t0, actors, spec.malloc, json_summary)


def _run_summary(output: Path, seconds: float, actors: int, malloc: str, json_summary) -> dict:
    """The summary of a finished `run`, counted from its output folder (Ray keeps no counts),
    written to `json_summary` when one is named."""
    counts = count_output(output)
    extra = {"output": str(output), "resumed": False, "actors": actors, "engine": "ray"}
    extra["malloc"] = f"--malloc {malloc}, applied in each actor"
    return write_summary(summary(counts, seconds, counts["records"], counts["output_tokens"], **extra), json_summary)


def empty_output_folder(output, overwrite: bool) -> Path:
    """`output` as a folder that is new or empty (emptied with `overwrite`); an InputError for a
    file name or a folder holding an earlier run's files."""
    output = Path(output)
    if output.suffix.lower() in (".jsonl", ".parquet", ".json"):
        raise InputError(f"--engine ray: --output {output} must be a folder (Ray writes several files)")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise InputError(f"--output {output} is not empty: write to a new folder, or pass --overwrite")
        shutil.rmtree(output)
    return output


def local_system_config() -> dict:
    """Ray settings for a local Ray that `run` starts (and stops) itself: idle workers are kept
    for KEEP_IDLE_WORKERS_MS, unless the environment sets that threshold. Ray kills a worker
    that has been idle for 1 s once the node has more workers than CPUs, and the actors hold
    every CPU: the worker that ran the read task would go, and each later write task would
    start a fresh Python worker (importing Ray: 1-3 s of CPU) beside the decoding actors, the
    last one after they have finished, on the run's critical path."""
    if os.environ.get(f"RAY_{IDLE_KILL}"):
        return {}
    return {IDLE_KILL: KEEP_IDLE_WORKERS_MS}


@contextlib.contextmanager
def ray_session(ray, address: str | None, worker_env: dict[str, str] | None = None, **init_args):
    """Inside the block Ray runs: the one already started, else one started here (joining
    `address`, or a local one, see below) and shut down after, its autoscaler monitor first
    (`stop_autoscaler_monitor`). Without `address` Ray joins a cluster named by RAY_ADDRESS or
    started on this machine with `ray start`, as it is. init_args go to `ray.init` (tests:
    num_cpus, the node's address).

    A local Ray started here runs its workers at nice 0 (Ray's default is 15; here they do all
    the work) with `worker_env` in their environment (a variable already set is left as it is),
    and keeps its idle workers (`local_system_config`). The block is given True when the workers
    have `worker_env` (a local Ray started here), else False."""
    if ray.is_initialized():
        yield False
        return
    init_args.update(address=address, include_dashboard=False, log_to_driver=False)
    started_here = False
    if address is None:
        config = local_system_config()
        try:
            with environment({NICENESS: "0", **(worker_env or {})}):  # the raylet passes it to every worker
                ray.init(**init_args, **({"_system_config": config} if config else {}))
            started_here = not _joined(ray)
        except ValueError as e:
            # no address, but Ray found one (RAY_ADDRESS, or a `ray start` on this machine) and
            # joins that cluster, whose settings are its own
            if not config or "_system_config" not in str(e):
                raise
            ray.init(**init_args)
    else:
        ray.init(**init_args)
    try:
        yield started_here
    finally:
        stop_autoscaler_monitor(ray)
        ray.shutdown()


def _joined(ray) -> bool:
    """Whether the running Ray was joined rather than started by this process (Ray's private
    `_global_node.head`; False where that cannot be read)."""
    try:
        return not ray._private.worker._global_node.head
    except Exception:
        return False


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """`variables` in os.environ inside the block, where not already set; put back after."""
    added = [name for name in variables if name not in os.environ]
    for name in added:
        os.environ[name] = variables[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def stop_autoscaler_monitor(ray) -> bool:
    """Kill the autoscaler monitor of a Ray this process started (True if one was killed), just
    before `ray.shutdown`. Ray's shutdown stops the raylet and GCS first and the monitor after
    them, whose SIGTERM handler then reports its end to the GCS that is gone: Ray gives it 1 s,
    then kills it (1.36 s for the whole shutdown against 0.35 s with the monitor gone first; on a
    node started here there is nothing for it to autoscale). It reaches into Ray's private
    `_global_node`, and does nothing where that is not as expected or where Ray was joined
    (a node this process did not start lists no processes of its own)."""
    try:
        node = ray._private.worker._global_node
        kind = ray._private.ray_constants.PROCESS_TYPE_MONITOR
        infos = list(node.all_processes.get(kind, ())) if node is not None and node.head else []
    except Exception:  # another Ray version, or not Ray at all
        return False
    killed = False
    for info in infos:
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()  # SIGKILL: no handler runs; it keeps nothing that needs saving
            with contextlib.suppress(Exception):
                process.wait(timeout=1)
            killed = True
    return killed


def write(out, output: Path, out_format: str, readers: int = 1, file_rows: int | None = None) -> None:
    """Run the dataset `out` into the folder `output` as Parquet (row order kept within a file)
    or JSON lines, with at most `readers` write tasks at a time and about `file_rows` records a
    file at least (None: a file per block, Ray's choice); a record's failure under
    --on-error fail comes back as its RecordError."""
    try:
        if out_format == "parquet":
            sink = parquet_sink(str(output), file_rows)
            out.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=readers)
        else:
            args = dict(force_ascii=False, min_rows_per_file=file_rows, ray_remote_args={"num_cpus": 0})
            out.write_json(str(output), **args, concurrency=readers)
    except Exception as e:
        if isinstance(e, RecordError) or "RecordError" in str(e):
            line = next((x for x in str(e).splitlines() if "--on-error fail stops here" in x), str(e))
            raise RecordError(line.split("RecordError: ")[-1].strip()) from None
        raise
