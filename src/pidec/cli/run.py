"""`pidec run`: a trained model over a whole corpus, answers written next to each record's id."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..bulk import fields as bulk_fields
from ..bulk import ray as bulk_ray
from ..bulk import runner
from ..bulk.extract import Options
from ..bulk.workers import ModelSpec
from .common import (
    ChatTemplate,
    Dtype,
    Layout,
    PrefixTemplate,
    Quantize,
    RowTemplate,
    Tokenizer,
    app,
    fail,
    input_errors_fail,
    print_json,
    template_of,
)

ENGINES = ("local", "ray")


@app.command("run")
def run_corpus(
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    input: str = typer.Option(..., "--input", help="a .jsonl, .csv or .parquet file, or a folder of them"),
    output: str = typer.Option(..., "--output", help="an output folder, or a .jsonl/.parquet file for one input file"),
    fields_file: Optional[str] = typer.Option(
        None, "--fields", help="JSON or YAML list of {name, prompt, max_new_tokens[, num_beams]} asked of every record"
    ),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="a prompt asked of every record (repeatable)"),
    input_format: Optional[str] = typer.Option(
        None, "--input-format", help="jsonl | csv | parquet (default: by extension)"
    ),
    output_format: Optional[str] = typer.Option(
        None, "--output-format", help="jsonl | parquet (default: by extension, else jsonl)"
    ),
    id_field: str = typer.Option("id", "--id-field", help="the record's id column"),
    document_field: str = typer.Option("document", "--document-field", help="the record's document column"),
    layout: Layout = "pid",
    num_beams: int = typer.Option(1, "--num-beams", help="default for fields without their own"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="default for fields without their own"),
    truncate: Optional[str] = typer.Option(None, "--truncate", help="left | right: cut a too-long document (counted)"),
    quantize: Quantize = None,
    device: str = typer.Option(
        "cpu", "--device", help="cpu, cuda, cuda:N (with --workers N and cuda: one device each)"
    ),
    dtype: Dtype = "auto",
    tokenizer: Tokenizer = None,
    max_input_length: Optional[int] = typer.Option(None, "--max-input-length", help="encoder limit (default: model's)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N records of the input"),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="padded document tokens decoded together"),
    window: int = typer.Option(runner.DEFAULT_WINDOW, "--window", help="records read, sorted and batched together"),
    workers: int = typer.Option(1, "--workers", help="processes on this machine, each with its share of the cores"),
    on_error: str = typer.Option(
        "continue", "--on-error", help="continue (count bad records) | fail (stop at the first)"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="require a progress file to resume from (resuming is automatic)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard an earlier run's output and start again"),
    progress: str = typer.Option("auto", "--progress", help="auto | bar | log | off"),
    log_every: float = typer.Option(10.0, "--log-every", help="seconds between log lines without a terminal"),
    json_summary: Optional[str] = typer.Option(
        None, "--json-summary", help="write the final summary to this JSON file"
    ),
    engine: str = typer.Option("local", "--engine", help="local | ray (Ray Data: pip install 'pidec[ray]')"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="join this Ray cluster (default: a local Ray)"
    ),
    actors: int = typer.Option(1, "--actors", help="--engine ray: model replicas (actors)"),
    actor_cpus: Optional[float] = typer.Option(None, "--actor-cpus", help="--engine ray: CPUs per actor"),
    actor_gpus: Optional[float] = typer.Option(None, "--actor-gpus", help="--engine ray: GPUs per actor"),
    prefix_template: PrefixTemplate = None,
    row_template: RowTemplate = None,
    chat_template: ChatTemplate = None,
) -> None:
    """Answer the same questions of every record of a corpus; one output record per input record.
    Streaming, resumable (run the same command again), with --workers N processes or on Ray."""

    if engine not in ENGINES:
        fail(f"--engine {engine!r}: expected local or ray")
    if progress not in ("auto", "bar", "log", "off"):
        fail(f"--progress {progress!r}: expected auto, bar, log or off")
    if engine == "local" and (ray_address or actors != 1 or actor_cpus or actor_gpus):
        fail("--ray-address, --actors, --actor-cpus and --actor-gpus go with --engine ray")
    if engine == "ray" and (workers != 1 or resume):
        fail("--engine ray: give --actors N instead of --workers; --resume is for the local engine")
    template = template_of(prefix_template, row_template, chat_template)
    with input_errors_fail():
        questions = bulk_fields.questions(fields_file, list(prompt or []))
        options = Options(layout, num_beams, max_new_tokens, truncate, id_field, document_field, batch_tokens)
        spec = ModelSpec(model, device, dtype, quantize, tokenizer, max_input_length, template=template)
        if engine == "ray":
            result = bulk_ray.run(
                spec,
                input,
                output,
                questions,
                options,
                input_format=input_format,
                output_format=output_format,
                address=ray_address,
                actors=actors,
                actor_cpus=actor_cpus,
                actor_gpus=actor_gpus,
                limit=limit,
                on_error=on_error,
                overwrite=overwrite,
                json_summary=json_summary,
            )
        else:
            result = runner.run(
                spec,
                input,
                output,
                questions,
                options,
                input_format=input_format,
                output_format=output_format,
                workers=workers,
                limit=limit,
                window=window,
                on_error=on_error,
                resume=resume,
                overwrite=overwrite,
                display=progress,
                log_every=log_every,
                json_summary=json_summary,
            )
    if progress != "off":
        typer.echo(runner.describe(result), err=True)
    print_json(result)
    sys.stdout.flush()
