"""`pidec generate`, `eval`, `tasks`, `export`: a checkpoint at work on documents and tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import lora
from .. import tasks as registry
from ..api import parse_dtype
from ..evaluate import evaluate, write
from ..layouts import LAYOUTS
from .common import (
    Layout,
    app,
    fail,
    input_errors_fail,
    load_model,
    print_json,
    read_prompts_file,
    read_text,
    runtime_template,
)
from .options import runtime_options, with_options


@app.command()
@with_options(runtime_options(compile=True))
def generate(
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    document: str = typer.Option(..., "--document", help="file holding the document, or - for stdin"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="a subtask prompt (repeatable)"),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="one prompt a line, or a JSON list"),
    layout: Layout = "pid",
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    num_beams: int = typer.Option(1, "--num-beams"),
    truncate: Optional[str] = typer.Option(None, "--truncate", help="left | right: cut a too-long document"),
    **runtime,
) -> None:
    """Answer every prompt about one document; prints {"outputs": [...], "usage": {...}, "timings": {...},
    "truncations": [...]}."""

    if layout not in LAYOUTS:
        fail(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if truncate not in (None, "left", "right"):
        fail(f"--truncate {truncate!r}: expected left or right")
    template = runtime_template(runtime)
    prompts = list(prompt or [])
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts:
        fail("no prompts: give --prompt P (repeatable) or --prompts-file F")
    text = read_text(document, "document")
    with input_errors_fail():
        m = load_model(model, runtime, template)
        result = m.generate(
            text,
            prompts,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            layout=layout,
            truncate=truncate,
            return_details=True,
        )
    print_json(result.to_dict())


@app.command("export")
def export_checkpoint(
    checkpoint_dir: str = typer.Option(..., "--checkpoint", help="checkpoint folder, or a LoRA adapter folder"),
    out: str = typer.Option(..., "--out", help="folder to write the Hugging Face checkpoint to"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="merge a LoRA adapter into its base model"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: as stored)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="not here: quantize when loading"),
) -> None:
    """Write a plain Hugging Face checkpoint: a LoRA adapter merged into its base, or a checkpoint re-saved."""

    if quantize is not None:
        fail(
            f"--quantize {quantize}: export writes float weights in the Hugging Face format; int8 is made when "
            "loading: pidec generate / eval / serve / bench --quantize int8"
        )
    if not Path(checkpoint_dir).is_dir():
        fail(f"--checkpoint {checkpoint_dir}: no such folder")
    adapter = lora.is_adapter(checkpoint_dir)
    if adapter and not merge_lora:
        fail(f"{checkpoint_dir} is a LoRA adapter: a LoRA checkpoint must be merged into its base, pass --merge-lora")
    if merge_lora and not adapter:
        fail(f"--merge-lora: {checkpoint_dir} is not a LoRA adapter folder (no adapter_config.json, or a config.json)")
    with input_errors_fail():
        written = lora.export(checkpoint_dir, out, dtype=None if dtype is None else parse_dtype(dtype))
    typer.echo(f"wrote {written}")


@app.command("tasks")
def list_tasks() -> None:
    """List the tasks that --task accepts: splits, main metric, default data path."""

    for name in registry.names():
        t = registry.get(name)
        where = registry.data_root() / t.default_path if t.default_path else "give --data PATH"
        typer.echo(f"{name}: {t.description}")
        typer.echo(f"    splits: {', '.join(t.splits)}; main metric: {t.main_metric}; data: {where}")
        settings = registry.settings_of(name)
        if settings:
            shown = ", ".join(f"{k}={v}" for k, v in settings.items())
            typer.echo(f"    settings ({name}:key=value): {shown}")


@app.command("eval")
@with_options(runtime_options(templates=False))
def eval_task(
    task: str = typer.Option(
        ...,
        "--task",
        help="a task from `pidec tasks`, with settings after a colon if it takes any (multiwoz-slot-state:last_turns=3)",
    ),
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    layout: Layout = "pid",
    split: str = typer.Option("test", "--split"),
    limit: Optional[int] = typer.Option(None, "--limit", help="the first N examples of the split"),
    data: Optional[str] = typer.Option(None, "--data", help="the task's data folder or file (default: its own)"),
    out: Optional[str] = typer.Option(None, "--out", help="folder for the metrics JSON and predictions JSONL"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="per subtask (default: the task's)"),
    num_beams: int = typer.Option(1, "--num-beams"),
    batch_size: int = typer.Option(8, "--batch-size", help="documents decoded together"),
    max_input_length: Optional[int] = typer.Option(None, "--max-input-length", help="encoder limit (default: model's)"),
    **runtime,
) -> None:
    """Score a model on a task's split; prints {"metrics": ..., "speed": ...} and, with --out,
    writes TASK-SPLIT-LAYOUT.metrics.json and .predictions.jsonl."""

    if layout not in LAYOUTS:
        fail(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    for name, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            fail(f"{name} must be >= 1, got {value}")
    with input_errors_fail():
        spec = registry.get(task)
        known = tuple(spec.splits) + tuple(getattr(spec, "split_aliases", {}))
        if split not in known and not (data is not None and Path(data).is_dir()):
            # a folder of {split}.jsonl names the splits it holds when the split is read
            fail(f"--split {split!r}: task {task} has the splits {', '.join(spec.splits)}")
        examples = spec.load(split, data, limit=limit)
        m = load_model(model, runtime, max_input_length=max_input_length)
        result = evaluate(m, spec, examples, layout, max_new_tokens, num_beams, batch_size)
    summary = result.summary() | {"split": split}
    if out:
        summary["wrote"] = [str(p) for p in write(result, out, f"{task}-{split}-{layout}")]
    print_json(summary)
