"""`pidec run`: a trained model over a whole corpus, answers written next to each record's id.
Its options are the fields of `RunOptions` (see `.options`); the command checks how they combine
and hands them to the local or the Ray engine."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from ..bulk import fields as bulk_fields
from ..bulk import ray as bulk_ray
from ..bulk import runner
from ..bulk.extract import Options
from ..bulk.workers import ModelSpec
from ..settings import setting
from .common import RUNTIME, Dtype, Layout, Quantize, Tokenizer, fail, input_errors_fail, print_json, template_of
from .options import build_config, command, declared_options, keyword, template_options

ENGINES = ("local", "ray")
PROGRESS = ("auto", "bar", "log", "off")
RUN_DEVICE = Annotated[
    str,
    typer.Option(
        "--device", help="cpu, cuda, cuda:N (with --workers N and cuda: one device each)", rich_help_panel=RUNTIME
    ),
]


@dataclass
class RunOptions:
    """What `pidec run` is told: one field an option (layout, quantize, dtype and tokenizer are
    the shared options)."""

    model: str = setting(help="checkpoint folder or hub id", panel="Input")
    input: str = setting(help="a .jsonl, .csv or .parquet file, or a folder of them", panel="Input")
    output: str = setting(help="an output folder, or a .jsonl/.parquet file for one input file", panel="Output")
    fields_file: Optional[str] = setting(
        None,
        help="JSON or YAML list of {name, prompt, max_new_tokens[, num_beams]} asked of every record",
        panel="Questions",
        flag="--fields",
    )
    prompt: Optional[list[str]] = setting(None, help="a prompt asked of every record (repeatable)", panel="Questions")
    input_format: Optional[str] = setting(None, help="jsonl | csv | parquet (default: by extension)", panel="Input")
    output_format: Optional[str] = setting(
        None, help="jsonl | parquet (default: by extension, else jsonl)", panel="Output"
    )
    id_field: str = setting("id", help="the record's id column", panel="Input")
    document_field: str = setting("document", help="the record's document column", panel="Input")
    num_beams: int = setting(1, help="default for fields without their own", panel="Questions")
    max_new_tokens: int = setting(32, help="default for fields without their own", panel="Questions")
    truncate: Optional[str] = setting(None, help="left | right: cut a too-long document (counted)", panel="Input")
    max_input_length: Optional[int] = setting(None, help="encoder limit (default: model's)", panel="Input")
    limit: Optional[int] = setting(None, help="only the first N records of the input", panel="Input")
    batch_tokens: int = setting(8192, help="padded document tokens decoded together", panel="Scale")
    window: int = setting(runner.DEFAULT_WINDOW, help="records read, sorted and batched together", panel="Scale")
    workers: int = setting(1, help="processes on this machine, each with its share of the cores", panel="Scale")
    malloc: str = setting(
        "keep", help="keep: freed memory reused by the next batch (faster) | default: glibc's own", panel="Scale"
    )
    on_error: str = setting("continue", help="continue (count bad records) | fail (stop at the first)", panel="Output")
    resume: bool = setting(False, help="require a progress file to resume from (resuming is automatic)", panel="Output")
    overwrite: bool = setting(False, help="discard an earlier run's output and start again", panel="Output")
    progress: str = setting("auto", help=" | ".join(PROGRESS), panel="Output")
    log_every: float = setting(10.0, help="seconds between log lines without a terminal", panel="Output")
    json_summary: Optional[str] = setting(None, help="write the final summary to this JSON file", panel="Output")
    engine: str = setting("local", help="local | ray (Ray Data: pip install 'pidec[ray]')", panel="Scale")
    ray_address: Optional[str] = setting(None, help="join this Ray cluster (default: a local Ray)", panel="Ray")
    actors: int = setting(1, help="--engine ray: model replicas (actors)", panel="Ray")
    actor_cpus: Optional[float] = setting(None, help="--engine ray: CPUs per actor", panel="Ray")
    actor_gpus: Optional[float] = setting(None, help="--engine ray: GPUs per actor", panel="Ray")
    layout: str = setting("pid", help="the shared --layout", panel="Questions", cli=False)
    quantize: Optional[str] = setting(None, help="the shared --quantize", panel=RUNTIME, cli=False)
    device: str = setting("cpu", help="--device", panel=RUNTIME, cli=False)
    dtype: str = setting("auto", help="the shared --dtype", panel=RUNTIME, cli=False)
    tokenizer: Optional[str] = setting(None, help="the shared --tokenizer", panel=RUNTIME, cli=False)
    prefix_template: Optional[str] = setting(None, help="the shared --prefix-template", panel=RUNTIME, cli=False)
    row_template: Optional[str] = setting(None, help="the shared --row-template", panel=RUNTIME, cli=False)
    chat_template: Optional[bool] = setting(None, help="the shared --chat-template", panel=RUNTIME, cli=False)


@command(
    "run",
    [
        *declared_options(RunOptions, required=("model", "input", "output")),
        keyword("layout", Layout, "pid"),
        keyword("quantize", Quantize, None),
        keyword("device", RUN_DEVICE, "cpu"),
        keyword("dtype", Dtype, "auto"),
        keyword("tokenizer", Tokenizer, None),
        *template_options(),
    ],
    """Answer the same questions of every record of a corpus; one output record per input record.
    Streaming, resumable (run the same command again), with --workers N processes or on Ray.""",
)
def run_corpus(ctx: typer.Context, **options) -> None:
    o = build_config(RunOptions, options)
    check_engine(o)
    with input_errors_fail():
        questions = bulk_fields.questions(o.fields_file, list(o.prompt or []))
        result = run_on_engine(o, questions)
    if o.progress != "off":
        typer.echo(runner.describe(result), err=True)
    print_json(result)
    sys.stdout.flush()


def check_engine(o: RunOptions) -> None:
    """Refuse an unknown engine or progress display, and options of the other engine."""
    if o.engine not in ENGINES:
        fail(f"--engine {o.engine!r}: expected local or ray")
    if o.progress not in PROGRESS:
        fail(f"--progress {o.progress!r}: expected auto, bar, log or off")
    if o.engine == "local" and (o.ray_address or o.actors != 1 or o.actor_cpus or o.actor_gpus):
        fail("--ray-address, --actors, --actor-cpus and --actor-gpus go with --engine ray")
    if o.engine == "ray" and (o.workers != 1 or o.resume):
        fail("--engine ray: give --actors N instead of --workers; --resume is for the local engine")


def run_on_engine(o: RunOptions, questions) -> dict:
    """The run on `--engine`: local (--workers processes on this machine, `bulk.runner`) or
    ray (Ray Data actors, `bulk.ray`)."""
    template = template_of(o.prefix_template, o.row_template, o.chat_template)
    spec = ModelSpec(
        o.model, o.device, o.dtype, o.quantize, o.tokenizer, o.max_input_length, template=template, malloc=o.malloc
    )
    options = Options(o.layout, o.num_beams, o.max_new_tokens, o.truncate, o.id_field, o.document_field, o.batch_tokens)
    both = dict(
        input_format=o.input_format,
        output_format=o.output_format,
        limit=o.limit,
        on_error=o.on_error,
        overwrite=o.overwrite,
        json_summary=o.json_summary,
    )
    if o.engine == "ray":
        ray = dict(address=o.ray_address, actors=o.actors, actor_cpus=o.actor_cpus, actor_gpus=o.actor_gpus)
        return bulk_ray.run(spec, o.input, o.output, questions, options, **ray, **both)
    local = dict(workers=o.workers, window=o.window, resume=o.resume, display=o.progress, log_every=o.log_every)
    return runner.run(spec, o.input, o.output, questions, options, **local, **both)
