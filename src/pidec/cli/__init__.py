"""`pidec ...`: parse, call the library, print. Errors go to stderr as one line, exit code 2.

Each module of this package registers its commands on the one Typer app of `common`."""

from . import bench, demo, infer, serve, train  # noqa: F401  (registers the commands)
from . import run  # noqa: F401  (registers `pidec run`)
from .common import app as app
from .common import command


def main() -> None:
    command()(prog_name="pidec")
