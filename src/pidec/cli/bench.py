"""`pidec bench`: the speed harness, its sweep and its training mode."""

from __future__ import annotations

from typing import Optional

import typer

from ..api import parse_dtype
from ..bench.causal import ARCHES, format_causal_table, plot_causal_sweep, run_causal_bench, run_causal_sweep
from ..bench.harness import run_bench, run_memory
from ..bench.report import format_memory, format_table
from ..bench.sweep import format_sweep, parse_ks, plot_sweep, run_sweep
from ..bench.training import format_train_table, run_train_bench
from .common import Device, Dtype, NoPack, app, check_quantize, fail, input_errors_fail, write_json


@app.command()
def bench(
    workload: str = typer.Option("dst", "--workload", help="dst | summ | qa"),
    model_size: str = typer.Option("base", "--model-size", help="tiny | small | base | large (random weights)"),
    model: Optional[str] = typer.Option(None, "--model", help="a checkpoint folder instead of --model-size"),
    configs: Optional[str] = typer.Option(
        None,
        "--configs",
        help="comma list of configurations (default: hf-pie,hf-pid-expanded,pidec-seq,pidec-pie,pidec-pid; "
        "with --sweep-k: hf-pie,ct2-pie-int8,pidec-pie,pidec-pid,pidec-pid-int8)",
    ),
    docs: int = typer.Option(2, "--docs", help="documents per configuration"),
    repeats: int = typer.Option(3, "--repeats", help="passes over the documents"),
    device: Device = "cpu",
    dtype: Dtype = "auto",
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the results as JSON here"),
    train_mode: bool = typer.Option(False, "--train", help="time training steps of the layouts instead"),
    layouts: str = typer.Option("pid,pie", "--layouts", help="with --train: comma list of pid, pie, seq"),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8: the pidec and ct2 configurations in int8", callback=check_quantize
    ),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="e.g. 8GiB: also report how many documents fit (analytic)"
    ),
    memory_only: bool = typer.Option(False, "--memory-only", help="with --memory-budget: only that report, no timing"),
    sweep_k: Optional[str] = typer.Option(
        None, "--sweep-k", help="e.g. 1,2,4,8,16,32,64: latency per document against the number of prompts K"
    ),
    plot: Optional[str] = typer.Option(None, "--plot", help="with --sweep-k: write a log-log PNG plot here"),
    compile_steps: bool = typer.Option(
        False, "--compile", help="the float pidec configurations decode through torch.compile"
    ),
    no_pack: NoPack = False,
    arch: Optional[str] = typer.Option(
        None, "--arch", help=f"a decoder-only shape instead of T5 ({', '.join(ARCHES)}; random weights, float32)"
    ),
) -> None:
    """Time the configurations side by side on one workload and print a table. More configurations:
    pidec-{seq,pie,pid}-int8, ct2-pie, ct2-prefix (+ -int8; needs the ct2 extra: pip install ".[ct2]")."""

    named = str(parse_dtype(dtype, device)).removeprefix("torch.")  # what auto means here
    names = None if configs is None else [c.strip() for c in configs.split(",") if c.strip()]
    if arch is not None:  # decoder-only models: pidec.bench.causal
        bench_causal(arch, workload, names, docs, repeats, seed, threads, sweep_k, plot, json_out)
        return
    if compile_steps and (train_mode or sweep_k or memory_only):
        fail("--compile applies to a timed decoding run: leave out --train, --sweep-k and --memory-only")
    if plot and not sweep_k:
        fail("--plot draws the --sweep-k results: give --sweep-k too")
    if sweep_k and (train_mode or memory_budget or quantize):
        fail("--sweep-k times decoding per K: leave out --train, --memory-budget and --quantize")
    if memory_only and memory_budget is None:
        fail("--memory-only needs --memory-budget SIZE (e.g. 8GiB)")
    if train_mode and (quantize or memory_budget):
        fail("--train times training steps: --quantize and --memory-budget apply to decoding")
    with input_errors_fail():
        if sweep_k:
            sweep = run_sweep(
                parse_ks(sweep_k),
                names,
                workload,
                model_size,
                model,
                docs=docs,
                repeats=repeats,
                dtype=named,
                seed=seed,
                threads=threads,
                pack=not no_pack,
                progress=_sweep_progress,
            )
            _emit(format_sweep(sweep), sweep, json_out)
            if plot:
                plot_sweep(sweep, plot)
                typer.echo(f"wrote {plot}")
        elif memory_only:
            mem = run_memory(workload, model_size, model, names, memory_budget, named, quantize, pack=not no_pack)
            _emit(format_memory(mem), mem, json_out, say=False)
        elif train_mode:
            layout_names = [x.strip() for x in layouts.split(",") if x.strip()]
            result = run_train_bench(
                workload, model_size, layout_names, docs=docs, repeats=repeats, seed=seed, threads=threads
            )
            _emit(format_train_table(result), result, json_out, say=False)
        else:
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
                quantize=quantize,
                memory_budget=memory_budget,
                compile=compile_steps,
                pack=not no_pack,
            )
            _emit(format_table(result), result, json_out)


def _sweep_progress(k: int, result: dict) -> None:
    typer.echo(f"K={k}: " + ", ".join(f"{x['config']} {x['latency_s_median']:.3f}s" for x in result["results"]))


def _emit(table: str, result: dict, json_out: Optional[str], say: bool = True) -> None:
    """Print the table; with --json, write the result there too (and say so when `say`)."""
    typer.echo(table)
    write_json(json_out, result, say)


def bench_causal(arch, workload, names, docs, repeats, seed, threads, sweep_k, plot, json_out) -> None:
    """`pidec bench --arch NAME`: the decoder-only configurations (see pidec.bench.causal)."""
    with input_errors_fail():
        if sweep_k:
            result = run_causal_sweep(
                parse_ks(sweep_k),
                names,
                arch=arch,
                workload=workload,
                docs=docs,
                repeats=repeats,
                seed=seed,
                threads=threads,
            )
            for k, run in zip(result["ks"], result["runs"]):
                typer.echo(f"K={k}\n" + format_causal_table(run))
        else:
            result = run_causal_bench(arch, workload, names, docs=docs, repeats=repeats, seed=seed, threads=threads)
            typer.echo(format_causal_table(result))
    write_json(json_out, result)
    if plot and sweep_k:
        plot_causal_sweep(result, plot)
        typer.echo(f"wrote {plot}")
