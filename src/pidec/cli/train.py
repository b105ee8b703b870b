"""`pidec train` and `pidec compare`: their options are built from the settings' declarations
(`TrainConfig` and `CompareSettings` fields with `setting(...)` metadata), grouped into help
panels, so a new setting is one field there and nothing here."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Annotated, Any, Callable, Optional

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
from .common import app, fail, input_errors_fail, print_json


def option_parameter(
    f: dataclasses.Field, hint: Any, default: Any = None, required: bool = False, help: str | None = None
) -> inspect.Parameter:
    """The Typer option of one declared setting, as a keyword-only parameter."""
    meta = dict(f.metadata) | ({"help": help} if help else {})
    decls = [meta.get("flag") or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
    text = meta["help"] + (f" (required, {meta['required']})" if meta.get("required") and not required else "")
    if meta.get("parse"):  # given as a string, turned into the value when the config is built
        hint, default = Optional[str], meta.get("shown")
    option = typer.Option(*decls, help=text, rich_help_panel=meta["panel"], show_default=True)
    return inspect.Parameter(
        f.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[hint, option],
        default=... if required else default,
    )


def declared_options(cls, names=None, defaults=None, required=(), helps=None) -> list[inspect.Parameter]:
    """The options of dataclass `cls`'s command-line settings (only `names`, if given; other
    `defaults`, `required` ones, other `helps` by name), ordered by help panel."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli") or (names is not None and f.name not in names):
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        out.append(option_parameter(f, hints[f.name], default, f.name in required, (helps or {}).get(f.name)))
    return by_panel(out)


def by_panel(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Parameters in the order of the help panels (stable: declaration order within one)."""
    return sorted(parameters, key=lambda p: PANELS.index(_panel(p)))


def _panel(parameter: inspect.Parameter) -> str:
    return typing.get_args(parameter.annotation)[1].rich_help_panel


def build_config(cls, values: dict, **extra) -> Any:
    """A `cls` from option values: parsed where the setting says how, its default where not given."""
    kwargs = dict(extra)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, parse = values[f.name], f.metadata.get("parse")
        if parse is not None and value is not None:
            value = parse(value)
        elif parse is not None:
            continue  # not given: the field's own default
        kwargs[f.name] = value
    return cls(**kwargs)


def command(name: str, parameters: list[inspect.Parameter], doc: str) -> Callable:
    """Register `func(ctx, **options)` as command `name` with the generated options."""

    def register(func: Callable) -> Callable:
        ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        func.__signature__ = inspect.Signature([ctx, *parameters])
        func.__doc__ = doc
        return app.command(name)(func)

    return register


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


def train_or_resume(ctx: typer.Context, options: dict, **fixed) -> None:
    """Start a run from the options (with the `fixed` settings), or continue one (--resume)."""
    with input_errors_fail():
        if options["resume"] is not None:
            flags = {p.name: p.opts[0] for p in ctx.command.params}
            given = [
                flags.get(p, p)
                for p in ctx.params
                if p != "resume" and getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"
            ]
            if given:
                fail(f"--resume continues with the run's saved settings; drop {', '.join(given)}")
            result = training.resume(options["resume"])
        else:
            if options["output"] is None:
                fail("--output DIR is required (or --resume DIR)")
            result = training.train(build_config(TrainConfig, options, **fixed))
    if result.get("rank", 0) == 0:
        print_json(result)


@command(
    "train",
    [*declared_options(TrainConfig, TRAIN_FIELDS), RESUME],
    "Train a T5 in the pid, pie or seq layout (run under `accelerate launch` for data parallel).",
)
def train(ctx: typer.Context, **options) -> None:
    train_or_resume(ctx, options)


@command(
    "pretrain",
    [*declared_options(TrainConfig, PRETRAIN_FIELDS, helps=PRETRAIN_HELP), RESUME],
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
        ]
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
        )
    typer.echo(format_results(result))
