"""Settings declared once: a dataclass field that carries its command-line form.

`setting(...)` makes a dataclass field whose metadata says how the command line shows and reads
it (flag, help text, help panel, how a string becomes the value). `TrainConfig`,
`CompareSettings`, `ServeSettings` and `ServerSettings` declare their fields this way, and
`pidec.cli.options` builds each command's options from them: a new option is one field in its
settings class and nothing in the CLI. Nothing here knows about the CLI library.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    panel: str,
    flag: str | None = None,
    short: str | None = None,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    required: str | None = None,
    factory: Callable[[], Any] | None = None,
    envvar: str | None = None,
    off: Any = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its command-line form: `help` and `panel` for the help text,
    `flag` (default --field-name), `parse` to turn the option's string into the value (the
    option is then a string, shown as `shown` by default), `required` to say when it must be
    given (shown in the help), `envvar` read when the option is not given, `off` the option value
    that stands for None (a value below it is refused), `cli=False` for settings only the Python
    API sets."""
    meta = {"help": help, "panel": panel, "flag": flag, "short": short, "parse": parse, "shown": shown}
    meta |= {"required": required, "envvar": envvar, "off": off, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(cls, name: str) -> str:
    """The command-line flag of field `name` of settings class `cls` (`--a/--no-a` for a switch)."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("flag"):
            return f.metadata["flag"]
    return "--" + name.replace("_", "-")
