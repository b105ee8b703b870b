"""`pidec ...`: parse, call the library, print. Errors go to stderr as one line, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Encode once, decode every subtask in parallel.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read_text(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        _fail(f"{what} file {path} not found")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        _fail(f"{what} file {path} is not UTF-8 text ({e})")


def read_prompts_file(path: str) -> list[str]:
    """A .json file holding a list of strings, or plain text with one prompt a line (empty lines
    are skipped; a whitespace-only line is an error naming its line)."""
    text = _read_text(path, "prompts")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            _fail(f"{path}: expected a JSON list of strings")
        return data
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line == "":
            continue
        if not line.strip():
            _fail(f"{path}:{n}: prompt is whitespace only")
        prompts.append(line.strip())
    return prompts


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    document: str = typer.Option(..., "--document", help="file holding the document, or - for stdin"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="a subtask prompt (repeatable)"),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="one prompt a line, or a JSON list"),
    layout: str = typer.Option("pid", "--layout", help="pid | pie | seq"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    num_beams: int = typer.Option(1, "--num-beams"),
    truncate: Optional[str] = typer.Option(None, "--truncate", help="left | right: cut a too-long document"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder if the checkpoint has none"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
) -> None:
    """Answer every prompt about one document; prints {"outputs": [...], "timings": {...}}."""
    import pidec
    from pidec.checkpoint import CheckpointError
    from pidec.layouts import LAYOUTS

    if layout not in LAYOUTS:
        _fail(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if truncate not in (None, "left", "right"):
        _fail(f"--truncate {truncate!r}: expected left or right")
    prompts = list(prompt or [])
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts:
        _fail("no prompts: give --prompt P (repeatable) or --prompts-file F")
    text = _read_text(document, "document")
    try:
        m = pidec.load(model, device=device, dtype=dtype, tokenizer=tokenizer)
        result = m.generate(
            text,
            prompts,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            layout=layout,
            truncate=truncate,
            return_details=True,
        )
    except (pidec.InputError, CheckpointError) as e:
        _fail(str(e))
    out = result.to_dict()
    out["outputs"] = out["outputs"][0]
    typer.echo(json.dumps(out, ensure_ascii=False))


@app.command()
def bench(
    workload: str = typer.Option("dst", "--workload", help="dst | summ | qa"),
    model_size: str = typer.Option("base", "--model-size", help="tiny | small | base | large (random weights)"),
    model: Optional[str] = typer.Option(None, "--model", help="a checkpoint folder instead of --model-size"),
    configs: str = typer.Option(
        "hf-pie,hf-pid-expanded,pidec-seq,pidec-pie,pidec-pid", "--configs", help="comma list of configurations"
    ),
    docs: int = typer.Option(2, "--docs", help="documents per configuration"),
    repeats: int = typer.Option(3, "--repeats", help="passes over the documents"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the results as JSON here"),
) -> None:
    """Time the configurations side by side on one workload and print a table."""
    from pidec.bench import format_table, run_bench

    names = [c.strip() for c in configs.split(",") if c.strip()]
    try:
        result = run_bench(
            workload=workload,
            model_size=model_size,
            model_dir=model,
            configs=names,
            docs=docs,
            repeats=repeats,
            device=device,
            dtype=dtype,
            seed=seed,
            threads=threads,
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
