"""`pidec demo`."""

from __future__ import annotations

import typer

from ..demo.run import format_result, run_demo
from .common import app, fail


@app.command()
def demo(
    output: str = typer.Option("pidec-demo", "--output", "-o", help="folder for the data, model, table and plot"),
    steps: int = typer.Option(1400, "--steps", help="training steps"),
    train_examples: int = typer.Option(12000, "--train-examples"),
    test_examples: int = typer.Option(300, "--test-examples"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate a synthetic booking task, train a small T5 on it in pid, compare decoders."""

    if steps < 1 or train_examples < 1 or test_examples < 1:
        fail("--steps, --train-examples and --test-examples must be >= 1")
    typer.echo(f"pidec demo: writing data, tokenizer, model, table and plot into {output}/", err=True)
    result = run_demo(
        output,
        train_examples=train_examples,
        test_examples=test_examples,
        steps=steps,
        seed=seed,
        log=lambda line: typer.echo(line, err=True),
    )
    typer.echo(format_result(result))
