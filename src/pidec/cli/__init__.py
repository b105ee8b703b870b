"""`pidec ...`: parse, call the library, print. Errors go to stderr as one line, exit code 2.

Each module of this package registers its commands on the one Typer app of `common`."""

from . import (  # noqa: F401  (registers the commands)
    bench,
    demo,
    infer,
    run,  # noqa: F401  (registers `pidec run`)
    serve,
    train,
)
from .common import app as app
from .common import command


def main() -> None:
    command()(prog_name="pidec")
