"""`pidec bench`: the speed harness, its sweep and its training mode. Its options are the fields
of `BenchOptions` (see `.options`); the command checks how they combine and calls one mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from ..api import parse_dtype
from ..bench.causal import ARCHES, format_causal_table, plot_causal_sweep, run_causal_bench, run_causal_sweep
from ..bench.harness import run_bench, run_memory
from ..bench.report import format_memory, format_table
from ..bench.sweep import format_sweep, parse_ks, plot_sweep, run_sweep
from ..bench.training import format_train_table, run_train_bench
from ..settings import setting
from .common import RUNTIME, Device, Dtype, NoPack, check_quantize, fail, input_errors_fail, write_json
from .options import build_config, command, declared_options, keyword

BENCH_QUANTIZE = Annotated[
    Optional[str],
    typer.Option(
        "--quantize",
        help="int8: the pidec and ct2 configurations in int8",
        callback=check_quantize,
        rich_help_panel=RUNTIME,
    ),
]


@dataclass
class BenchOptions:
    """What `pidec bench` is told: one field an option (device, dtype, quantize and no_pack are
    the shared runtime options)."""

    workload: str = setting("dst", help="dst | summ | qa", panel="Workload")
    model_size: str = setting("base", help="tiny | small | base | large (random weights)", panel="Workload")
    model: Optional[str] = setting(None, help="a checkpoint folder instead of --model-size", panel="Workload")
    arch: Optional[str] = setting(
        None,
        help=f"a decoder-only shape instead of T5 ({', '.join(ARCHES)}; random weights, float32)",
        panel="Workload",
    )
    configs: Optional[str] = setting(
        None,
        help="comma list of configurations (default: hf-pie,hf-pid-expanded,pidec-seq,pidec-pie,pidec-pid; "
        "with --sweep-k: hf-pie,ct2-pie-int8,pidec-pie,pidec-pid,pidec-pid-int8)",
        panel="Workload",
    )
    docs: int = setting(2, help="documents per configuration", panel="Timing")
    repeats: int = setting(3, help="passes over the documents", panel="Timing")
    seed: int = setting(0, help="seeds the weights and the documents", panel="Timing")
    threads: Optional[int] = setting(None, help="torch threads (default: torch's choice)", panel="Timing")
    compile_steps: bool = setting(
        False, help="the float pidec configurations decode through torch.compile", panel="Timing", flag="--compile"
    )
    train_mode: bool = setting(False, help="time training steps of the layouts instead", panel="Modes", flag="--train")
    layouts: str = setting("pid,pie", help="with --train: comma list of pid, pie, seq", panel="Modes")
    memory_budget: Optional[str] = setting(
        None, help="e.g. 8GiB: also report how many documents fit (analytic)", panel="Modes"
    )
    memory_only: bool = setting(False, help="with --memory-budget: only that report, no timing", panel="Modes")
    sweep_k: Optional[str] = setting(
        None, help="e.g. 1,2,4,8,16,32,64: latency per document against the number of prompts K", panel="Modes"
    )
    plot: Optional[str] = setting(None, help="with --sweep-k: write a log-log PNG plot here", panel="Output")
    json_out: Optional[str] = setting(None, help="also write the results as JSON here", panel="Output", flag="--json")
    device: str = setting("cpu", help="the shared --device", panel=RUNTIME, cli=False)
    dtype: str = setting("auto", help="the shared --dtype", panel=RUNTIME, cli=False)
    quantize: Optional[str] = setting(None, help="the shared --quantize", panel=RUNTIME, cli=False)
    no_pack: bool = setting(False, help="the shared --no-pack", panel=RUNTIME, cli=False)

    @property
    def names(self) -> list[str] | None:
        """--configs as a list (None: the mode's default)."""
        return None if self.configs is None else [c.strip() for c in self.configs.split(",") if c.strip()]

    @property
    def named_dtype(self) -> str:
        """The dtype as a name: what "auto" means on this device."""
        return str(parse_dtype(self.dtype, self.device)).removeprefix("torch.")

    def passes(self) -> dict:
        """How much every mode times and how, by name: documents, passes, seed, torch threads."""
        return dict(docs=self.docs, repeats=self.repeats, seed=self.seed, threads=self.threads)

    def timing(self) -> dict:
        """The arguments every T5 timing run takes, by name (the dtype named: see `bench_decoding`)."""
        return self.passes() | dict(
            workload=self.workload,
            model_size=self.model_size,
            model_dir=self.model,
            configs=self.names,
            dtype=self.named_dtype,
            pack=not self.no_pack,
        )


@command(
    "bench",
    [
        *declared_options(BenchOptions),
        keyword("device", Device, "cpu"),
        keyword("dtype", Dtype, "auto"),
        keyword("quantize", BENCH_QUANTIZE, None),
        keyword("no_pack", NoPack, False),
    ],
    """Time the configurations side by side on one workload and print a table. More configurations:
    pidec-{seq,pie,pid}-int8, ct2-pie, ct2-prefix (+ -int8; needs the ct2 extra: pip install ".[ct2]").""",
)
def bench(ctx: typer.Context, **options) -> None:
    o = build_config(BenchOptions, options)
    if o.arch is not None:  # decoder-only models: pidec.bench.causal
        bench_causal(o)
        return
    check_modes(o)
    with input_errors_fail():
        if o.sweep_k:
            bench_sweep(o)
        elif o.memory_only:
            mem = run_memory(
                o.workload,
                o.model_size,
                o.model,
                o.names,
                o.memory_budget,
                o.named_dtype,
                o.quantize,
                pack=not o.no_pack,
            )
            _emit(format_memory(mem), mem, o.json_out, say=False)
        elif o.train_mode:
            layout_names = [x.strip() for x in o.layouts.split(",") if x.strip()]
            result = run_train_bench(o.workload, o.model_size, layout_names, **o.passes())
            _emit(format_train_table(result), result, o.json_out, say=False)
        else:
            bench_decoding(o)


def check_modes(o: BenchOptions) -> None:
    """Refuse options that do not go together (one line naming them)."""
    if o.compile_steps and (o.train_mode or o.sweep_k or o.memory_only):
        fail("--compile applies to a timed decoding run: leave out --train, --sweep-k and --memory-only")
    if o.plot and not o.sweep_k:
        fail("--plot draws the --sweep-k results: give --sweep-k too")
    if o.sweep_k and (o.train_mode or o.memory_budget or o.quantize):
        fail("--sweep-k times decoding per K: leave out --train, --memory-budget and --quantize")
    if o.memory_only and o.memory_budget is None:
        fail("--memory-only needs --memory-budget SIZE (e.g. 8GiB)")
    if o.train_mode and (o.quantize or o.memory_budget):
        fail("--train times training steps: --quantize and --memory-budget apply to decoding")


def bench_decoding(o: BenchOptions) -> None:
    """The timed decoding run (the default mode)."""
    # the harness gets the dtype as given, so that its header says what "auto" chose and why
    result = run_bench(
        **(o.timing() | {"dtype": o.dtype}),
        device=o.device,
        quantize=o.quantize,
        memory_budget=o.memory_budget,
        compile=o.compile_steps,
    )
    _emit(format_table(result), result, o.json_out)


def bench_sweep(o: BenchOptions) -> None:
    """--sweep-k: latency per document against K."""
    sweep = run_sweep(parse_ks(o.sweep_k), **o.timing(), progress=_sweep_progress)
    _emit(format_sweep(sweep), sweep, o.json_out)
    if o.plot:
        plot_sweep(sweep, o.plot)
        typer.echo(f"wrote {o.plot}")


def _sweep_progress(k: int, result: dict) -> None:
    typer.echo(f"K={k}: " + ", ".join(f"{x['config']} {x['latency_s_median']:.3f}s" for x in result["results"]))


def _emit(table: str, result: dict, json_out: Optional[str], say: bool = True) -> None:
    """Print the table; with --json, write the result there too (and say so when `say`)."""
    typer.echo(table)
    write_json(json_out, result, say)


def bench_causal(o: BenchOptions) -> None:
    """`pidec bench --arch NAME`: the decoder-only configurations (see pidec.bench.causal)."""
    with input_errors_fail():
        if o.sweep_k:
            result = run_causal_sweep(parse_ks(o.sweep_k), o.names, arch=o.arch, workload=o.workload, **o.passes())
            for k, run in zip(result["ks"], result["runs"]):
                typer.echo(f"K={k}\n" + format_causal_table(run))
        else:
            result = run_causal_bench(o.arch, o.workload, o.names, **o.passes())
            typer.echo(format_causal_table(result))
    write_json(o.json_out, result)
    if o.plot and o.sweep_k:
        plot_causal_sweep(result, o.plot)
        typer.echo(f"wrote {o.plot}")
