"""What every command shares: the Typer app, the options several commands take (declared once
here as annotated types), one-line errors, and JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperGroup

from ..api import load
from ..causal import Template, use_template
from ..errors import InputError
from ..quantize import check_method

try:  # typer >= 0.24 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on the click package
    from click.exceptions import NoArgsIsHelpError, UsageError


def fail(message: str) -> None:
    """Print `error: message` on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


class OneLineErrors(TyperGroup):
    """The command group whose option errors (`--max-new-tokens 1e30`, a missing `--model`, an
    unknown option) are one line on stderr with exit code 2, like every other error, instead of
    the framed usage message."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as e:
            command = f"pidec {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "pidec"
            fail(f"{' '.join(e.format_message().split())} (see {command} --help)")


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # help text is plain text: brackets such as ".[ct2]" are shown, not parsed as markup
    help="Encode once, decode every subtask in parallel.",
)


NO_PACK_HELP = "plain BLAS linear layers on the CPU (less memory) instead of oneDNN-packed weights"


def check_quantize(value: Optional[str]) -> Optional[str]:
    """--quantize is checked before anything is loaded."""
    with input_errors_fail():
        return check_method(value)


def read_text(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        fail(f"{what} file {path} not found")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fail(f"{what} file {path} is not UTF-8 text ({e})")


def read_prompts_file(path: str) -> list[str]:
    """A .json file holding a list of strings, or plain text with one prompt a line (empty lines
    are skipped; a whitespace-only line is an error naming its line)."""
    text = read_text(path, "prompts")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            fail(f"{path}: expected a JSON list of strings")
        return data
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line == "":
            continue
        if not line.strip():
            fail(f"{path}:{n}: prompt is whitespace only")
        prompts.append(line.strip())
    return prompts


@contextlib.contextmanager
def input_errors_fail():
    """Inside the block, an error the caller can fix (`InputError`, and the ValueError of a bad
    option value) ends the command as `fail` does: one line on stderr, exit status 2."""
    try:
        yield
    except (InputError, ValueError) as e:
        fail(str(e))


def print_json(data) -> None:
    """One JSON document on stdout, ending with a newline."""
    typer.echo(json.dumps(data, ensure_ascii=False))


def write_json(path: str | None, data, say: bool = True) -> None:
    """With a path (--json), `data` as indented JSON there, and `wrote PATH` when `say`."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if say:
            typer.echo(f"wrote {path}")


# -- options several commands take ------------------------------------------------------------

RUNTIME = "Runtime"
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N, mps", rich_help_panel=RUNTIME)]
Dtype = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    typer.Option(
        "--dtype",
        help="auto: bfloat16 where the CPU or GPU multiplies it in hardware, else float32",
        rich_help_panel=RUNTIME,
    ),
]
Quantize = Annotated[
    Optional[str],
    typer.Option(
        "--quantize",
        callback=check_quantize,
        help="int8: int8 weights and activations in the linear layers",
        rich_help_panel=RUNTIME,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="decoding steps through torch.compile (slow start, faster steps)", rich_help_panel=RUNTIME
    ),
]
NoPack = Annotated[bool, typer.Option("--no-pack", help=NO_PACK_HELP, rich_help_panel=RUNTIME)]
Tokenizer = Annotated[Optional[str], typer.Option("--tokenizer", help="tokenizer folder, if the checkpoint has none")]
Layout = Annotated[Literal["pid", "pie", "seq"], typer.Option("--layout", help="how subtasks become rows")]
JsonOut = Annotated[Optional[str], typer.Option("--json", help="also write the result as JSON to this file")]

DECODER_ONLY = "Decoder-only checkpoints (Llama, Qwen, Mistral)"
PrefixTemplate = Annotated[
    Optional[str],
    typer.Option(
        "--prefix-template",
        help="the text before each prompt, holding {document}: shared by the rows (default '{document}\\n\\n')",
        rich_help_panel=DECODER_ONLY,
    ),
]
RowTemplate = Annotated[
    Optional[str],
    typer.Option(
        "--row-template",
        help="each row's text after the prefix, holding {prompt} (default '{prompt}\\n')",
        rich_help_panel=DECODER_ONLY,
    ),
]
ChatTemplate = Annotated[
    Optional[bool],
    typer.Option(
        "--chat-template/--no-chat-template",
        help="rows through the tokenizer's chat template: one user message of document and prompt (default: no)",
        rich_help_panel=DECODER_ONLY,
    ),
]


def template_of(prefix_template: Optional[str], row_template: Optional[str], chat: Optional[bool]) -> Template | None:
    """The decoder-only row template the options give (None: none given), its fields checked
    before anything is loaded; `pidec.causal.use_template` then refuses it for a T5 checkpoint."""
    given = {"prefix_template": prefix_template, "row_template": row_template, "chat": chat}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if chat and (prefix_template is not None or row_template is not None):
        fail(
            "--prefix-template and --row-template do not apply with --chat-template: the chat template builds the rows"
        )
    with input_errors_fail():
        return Template(**given).check()


def runtime_template(runtime: dict) -> Template | None:
    """`template_of` the decoder-only template options among `runtime` (a command's option values)."""
    return template_of(runtime.get("prefix_template"), runtime.get("row_template"), runtime.get("chat_template"))


def load_model(model: str, runtime: dict, template: Template | None = None, **extra):
    """`pidec.load` of `model` as a command's runtime options say (`runtime`: their values by
    name, see `options.runtime_options`; --no-pack is pack_weights=False), the decoder-only row
    `template` given to it (`runtime_template`). extra: more `pidec.load` arguments."""
    if runtime.get("compile_steps"):
        extra["compile"] = True
    m = load(
        model,
        device=runtime["device"],
        dtype=runtime["dtype"],
        tokenizer=runtime["tokenizer"],
        quantize=runtime["quantize"],
        pack_weights=False if runtime["no_pack"] else None,
        **extra,
    )
    use_template(m, template)
    return m


def command():
    """The click command behind `app`, with flags shown as flags in --help (Typer labels them
    `<bool>`, as if they took a value)."""
    group = typer.main.get_command(app)
    for cmd in [group, *getattr(group, "commands", {}).values()]:
        help_option = cmd.get_help_option(cmd.context_class(cmd))
        for param in [*cmd.params, help_option]:
            if getattr(param, "is_flag", False):
                param.metavar = ""
    return group
