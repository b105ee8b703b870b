"""Command-line options built from settings classes (`pidec.settings.setting` fields), so that a
command's options are declared once, in its settings class, and its body stays thin."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Annotated, Any, Callable, Optional, Sequence

import typer

from ..errors import InputError
from ..settings import flag_of
from .common import (
    ChatTemplate,
    Compile,
    Device,
    Dtype,
    NoPack,
    PrefixTemplate,
    Quantize,
    RowTemplate,
    Tokenizer,
    app,
)


def option_parameter(
    f: dataclasses.Field, hint: Any, default: Any = None, required: bool = False, help: str | None = None
) -> inspect.Parameter:
    """The Typer option of one declared setting, as a keyword-only parameter."""
    meta = dict(f.metadata) | ({"help": help} if help else {})
    decls = [meta.get("flag") or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
    text = meta["help"] + (f" (required, {meta['required']})" if meta.get("required") and not required else "")
    if meta.get("parse"):  # given as a string, turned into the value when the config is built
        hint, default = Optional[str], meta.get("shown")
    option = typer.Option(
        *decls, help=text, rich_help_panel=meta["panel"], show_default=True, envvar=meta.get("envvar")
    )
    return inspect.Parameter(
        f.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[hint, option],
        default=... if required else default,
    )


def keyword(name: str, annotation: Any, default: Any = ...) -> inspect.Parameter:
    """A keyword-only option parameter for `command` from an annotated type (`common.Device`, ...);
    required unless given a default."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def template_options() -> list[inspect.Parameter]:
    """--prefix-template, --row-template, --chat-template: how a decoder-only checkpoint builds its rows."""
    return [
        keyword("prefix_template", PrefixTemplate, None),
        keyword("row_template", RowTemplate, None),
        keyword("chat_template", ChatTemplate, None),
    ]


def runtime_options(compile: bool = False, templates: bool = True) -> list[inspect.Parameter]:
    """The options of a command that loads a checkpoint with `common.load_model`: --tokenizer,
    --device, --dtype, --quantize, --compile (with `compile`), --no-pack and, with `templates`,
    the decoder-only row templates."""
    out = [
        keyword("tokenizer", Tokenizer, None),
        keyword("device", Device, "cpu"),
        keyword("dtype", Dtype, "auto"),
        keyword("quantize", Quantize, None),
    ]
    if compile:
        out.append(keyword("compile_steps", Compile, False))
    out.append(keyword("no_pack", NoPack, False))
    return out + (template_options() if templates else [])


def with_options(parameters: list[inspect.Parameter]) -> Callable:
    """Give a command function that declares options of its own the keyword options
    `parameters` too (`runtime_options`); their values reach it in its `**kwargs`."""

    def add(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        func.__signature__ = signature.replace(parameters=[*own, *parameters])
        return func

    return add


def declared_options(
    cls, names=None, defaults=None, required=(), helps=None, panels: Sequence[str] | None = None
) -> list[inspect.Parameter]:
    """The options of dataclass `cls`'s command-line settings (only `names`, if given; other
    `defaults`, `required` ones, other `helps` by name), ordered by help panel (`panels`, else
    the order in which `cls` first names them)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli") or (names is not None and f.name not in names):
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        out.append(option_parameter(f, hints[f.name], default, f.name in required, (helps or {}).get(f.name)))
    return by_panel(out, panels)


def by_panel(parameters: list[inspect.Parameter], panels: Sequence[str] | None = None) -> list[inspect.Parameter]:
    """Parameters in the order of `panels` (default: their first appearance); stable within one."""
    order = list(panels) if panels is not None else list(dict.fromkeys(panel_of(p) for p in parameters))
    return sorted(parameters, key=lambda p: order.index(panel_of(p)))


def panel_of(parameter: inspect.Parameter) -> str:
    """The help panel of a generated option."""
    return typing.get_args(parameter.annotation)[1].rich_help_panel


def build_config(cls, values: dict, **extra) -> Any:
    """A `cls` from option values: parsed where the setting says how, its default where not
    given, None where the value is the setting's `off` (an InputError below it)."""
    kwargs = dict(extra)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, parse, off = values[f.name], f.metadata.get("parse"), f.metadata.get("off")
        if parse is not None and value is not None:
            value = parse(value)
        elif parse is not None:
            continue  # not given: the field's own default
        if off is not None and value is not None and value <= off:
            if value < off:
                raise InputError(f"{flag_of(cls, f.name)} must be >= {off} ({off} turns it off), got {value}")
            value = None
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
