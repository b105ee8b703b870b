"""`pidec train` and `pidec compare`: their options are built from the settings' declarations
(`TrainConfig` and `CompareSettings` fields with `setting(...)` metadata, see `.options`),
grouped into help panels, so a new setting is one field there and nothing here."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Optional

import typer

from .. import training
from ..training.compare import (
    COMPARE_DEFAULTS,
    COMPARE_HELP,
    COMPARE_REQUIRED,
    COMPARE_TRAIN_FIELDS,
    CompareSettings,
    format_results,
    parse_layouts,
    run_comparison,
)
from ..training.config import PANELS, TASK_ONLY, TrainConfig
from .common import fail, input_errors_fail, print_json
from .options import build_config, by_panel, command, declared_options

RESUME = inspect.Parameter(
    "resume",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[
        Optional[str],
        typer.Option(
            "--resume",
            help="continue the run in this folder from its last readable checkpoint",
            rich_help_panel="Output",
        ),
    ],
    default=None,
)


PRETRAIN_ONLY = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("panel") == "Pre-training")
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PRETRAIN_ONLY]
PRETRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in TASK_ONLY]
PRETRAIN_HELP = {
    "task": "a registered task whose training documents are the text (instead of --text)",
    "max_input_length": "encoder length of every example (default: the model's, 512 from scratch)",
}


RESUME_MAY_CHANGE = ("resume", "stop_after_step")  # how far this piece goes is the command's, not the run's


def train_or_resume(ctx: typer.Context, options: dict, **fixed) -> None:
    """Start a run from the options (with the `fixed` settings), or continue one (--resume)."""
    with input_errors_fail():
        if options["resume"] is not None:
            flags = {p.name: p.opts[0] for p in ctx.command.params}
            given = [
                flags.get(p, p)
                for p in ctx.params
                if p not in RESUME_MAY_CHANGE and getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"
            ]
            if given:
                fail(f"--resume continues with the run's saved settings; drop {', '.join(given)}")
            changes = {"stop_after_step": options["stop_after_step"]} if options["stop_after_step"] else {}
            result = training.resume(options["resume"], **changes)
        else:
            if options["output"] is None:
                fail("--output DIR is required (or --resume DIR)")
            result = training.train(build_config(TrainConfig, options, **fixed))
    if result.get("rank", 0) == 0:
        print_json(result)


@command(
    "train",
    [*declared_options(TrainConfig, TRAIN_FIELDS, panels=PANELS), RESUME],
    "Train a T5 in the pid, pie or seq layout (run under `accelerate launch` for data parallel).",
)
def train(ctx: typer.Context, **options) -> None:
    train_or_resume(ctx, options)


@command(
    "pretrain",
    [*declared_options(TrainConfig, PRETRAIN_FIELDS, helps=PRETRAIN_HELP, panels=PANELS), RESUME],
    "Pre-train a T5 with span corruption (T5's own objective) on raw text; `pidec train --model` fine-tunes the result.",
)
def pretrain(ctx: typer.Context, **options) -> None:
    train_or_resume(ctx, options, objective="span_corruption")


@command(
    "compare",
    by_panel(
        [
            *declared_options(TrainConfig, COMPARE_TRAIN_FIELDS, COMPARE_DEFAULTS, COMPARE_REQUIRED, COMPARE_HELP),
            *declared_options(CompareSettings),
        ],
        PANELS,
    ),
    "Train seq, pie and pid on the same budget (steps x tokens per step) and compare metric and speed.",
)
def compare(ctx: typer.Context, **options) -> None:
    with input_errors_fail():
        names = parse_layouts(options["layouts"])
        train_values = {k: v for k, v in options.items() if k in COMPARE_TRAIN_FIELDS}
        # checked as a pid/pie run where there is one: their subtask sampling is left out for seq
        cfg = build_config(TrainConfig, train_values, layout=next((n for n in names if n != "seq"), names[0]))
        cfg.check()
        settings = build_config(CompareSettings, options)
        result = run_comparison(
            cfg,
            names,
            settings.eval_split,
            settings.eval_limit,
            eval_batch_size=settings.eval_batch_size,
            max_new_tokens=settings.max_new_tokens,
            curve_every=settings.curve_every,
            curve_split=settings.curve_split,
            curve_limit=settings.curve_limit,
        )
    typer.echo(format_results(result))
