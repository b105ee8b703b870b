"""The timing harness: time transformers, CTranslate2 and pidec side by side on one synthetic
workload (`pidec bench`). A run is a checked `BenchSpec`, then four steps: build the engines
(`build`), warm up and time them (`warm_up_and_time`), turn the timings into rows (`rows`), and
cross-check that the configurations computed the same function (`cross_checks`).

Each configuration is warmed up alone on the first document, which is also where its peak
memory is measured; then every configuration is timed round-robin over docs x repeats, so a
slow spell of the machine falls on all of them alike, and each row reports the median. The
method, what each column means and measured tables are in docs/performance.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from .. import checkpoint, cpu, packing
from ..generate import sync
from ..model import PRESETS, T5Config
from ..quantize import describe
from . import crosscheck, roofline
from .ceiling import best_bandwidth, best_ceiling, measure_bandwidth, measure_ceiling
from .configs import (
    Shape,
    check_configs,
    config_cross_bytes,
    config_flops,
    config_shape,
    config_step_bytes,
    is_int8,
    memory_report,
)
from .engines import Engines, build_engines
from .peak_memory import PeakMemory, release_memory
from .workloads import WORKLOADS, DocDraw, build_random_model, draw_documents

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run, checked (`make_spec`): what to time, on what, how often."""

    workload: str
    model_size: str
    model_dir: str | None
    configs: tuple[str, ...]
    docs: int
    repeats: int
    device: torch.device
    dtype: str
    seed: int = 0
    threads: int | None = None
    doc_tokens: int | None = None  # shrink the workload (tests, the K sweep)
    subtasks: int | None = None
    ceiling: bool = True
    compile: bool = False
    pack: bool = True
    memory_budget: int | None = None
    dtype_reason: str = "asked for"  # why this dtype: "asked for", or what `dtype="auto"` saw

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_model(workload, model_size, model_dir, dtype) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    if model_dir is None and model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_size!r}: expected one of {', '.join(PRESETS)}")
    if dtype not in DTYPES and dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")


def _check_device(device, dtype: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: expected cpu or cuda[:N]") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: expected cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    if dtype == "float16" and dev.type != "cuda":
        raise ValueError("dtype float16 is only supported on cuda: use float32 or bfloat16 on cpu")
    return dev


def make_spec(workload, model_size, model_dir, configs, docs, repeats, device, dtype, quantize, **rest) -> BenchSpec:
    """`run_bench`'s arguments checked into a BenchSpec: ValueError naming the argument and what
    it accepts otherwise. `quantize="int8"` turns pidec and ct2 names into their -int8 forms."""
    _check_model(workload, model_size, model_dir, dtype)
    configs = check_configs(configs, quantize)
    counts = {"docs": docs, "repeats": repeats}
    if rest.get("threads") is not None:
        counts["threads"] = rest["threads"]
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if rest.get("doc_tokens") is not None and rest["doc_tokens"] < 2:
        raise ValueError(f"doc_tokens must be >= 2, got {rest['doc_tokens']}")
    if rest.get("subtasks") is not None and rest["subtasks"] < 1:
        raise ValueError(f"subtasks must be >= 1, got {rest['subtasks']}")
    if dtype == "auto":  # what auto means on this device, and why
        rest["dtype_reason"] = cpu.dtype_choice("auto", device)
        dtype = str(cpu.auto_dtype(device)).removeprefix("torch.")
    dev = _check_device(device, dtype)
    if rest.get("memory_budget") is not None:
        rest["memory_budget"] = roofline.parse_bytes(rest["memory_budget"])
    return BenchSpec(workload, model_size, model_dir, tuple(configs), docs, repeats, dev, dtype, **rest)


# -- build ------------------------------------------------------------------------------------


@dataclass
class Built:
    """What a run decodes: the engines, the configurations left to time, the documents."""

    engines: Engines
    configs: list[str]
    draws: list[DocDraw]
    skipped: list[dict] = field(default_factory=list)

    @property
    def config(self) -> T5Config:
        return self.engines.ours.config


def build(spec: BenchSpec) -> Built:
    """The engines of every configuration from the checkpoint (a random model of the preset
    size, saved to a temporary folder, when `spec.model_dir` is None), and the documents."""
    with tempfile.TemporaryDirectory(prefix="pidec-bench-") as tmp:
        if spec.model_dir is None:
            checkpoint.save(build_random_model(spec.model_size, spec.seed), tmp)
            folder = tmp
        else:
            folder = checkpoint.resolve(spec.model_dir)
        engines, skipped = build_engines(
            folder, tmp, list(spec.configs), device=spec.device, dtype=spec.dtype, compile=spec.compile, pack=spec.pack
        )
    gone = {c for names, _ in skipped for c in names}
    cfg = engines.ours.config
    draws = draw_documents(
        WORKLOADS[spec.workload], spec.docs, spec.seed, cfg.vocab_size, spec.doc_tokens, spec.subtasks
    )
    return Built(
        engines,
        [c for c in spec.configs if c not in gone],
        draws,
        [{"configs": names, "reason": reason} for names, reason in skipped],
    )


# -- warm up and time ---------------------------------------------------------------------------


@dataclass
class Timings:
    """Per configuration: its first document's tokens, peak memory, the largest cross-cache it
    measured, and every timed latency; and how long compiling took (compiled runs)."""

    first_tokens: dict[str, list[list[int]]]
    peaks: dict[str, int]
    cross: dict[str, int]
    times: dict[str, list[float]]
    compile_s: float | None = None


def compile_first(built: Built, device) -> float:
    """Decode the first document with every float pidec configuration, so that torch.compile
    compiles before anything is measured (inductor's memory and time are not the decoder's)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name in built.configs:
            if name.startswith("pidec-") and not is_int8(name):
                built.engines.run(name, built.draws[0], device)
    return time.perf_counter() - t0


def warm_up(built: Built, device) -> Timings:
    """Each configuration alone on the first document: its warm-up and its peak memory; its
    token counts are checked against the workload."""
    t = Timings({}, {}, dict.fromkeys(built.configs, 0), {name: [] for name in built.configs})
    d = built.draws[0]
    with torch.inference_mode():
        for name in built.configs:
            with PeakMemory(device) as mem:
                tokens, cross = built.engines.run(name, d, device)
            crosscheck.check_lengths(name, tokens, d)
            t.first_tokens[name], t.peaks[name], t.cross[name] = tokens, mem.peak_bytes, cross or 0
            del tokens
            release_memory(device)
    return t


def time_round_robin(built: Built, t: Timings, repeats: int, device) -> None:
    """`repeats` passes over the documents, every configuration in turn on each document."""
    with torch.inference_mode():
        for _ in range(repeats):
            for d in built.draws:
                for name in built.configs:
                    sync(device)
                    t0 = time.perf_counter()
                    _, cross = built.engines.run(name, d, device)
                    sync(device)
                    t.times[name].append(time.perf_counter() - t0)
                    t.cross[name] = max(t.cross[name], cross or 0)


def warm_up_and_time(spec: BenchSpec, built: Built) -> Timings:
    compile_s = compile_first(built, spec.device) if spec.compile else None
    t = warm_up(built, spec.device)
    t.compile_s = compile_s
    time_round_robin(built, t, spec.repeats, spec.device)
    return t


# -- rows and cross-checks ------------------------------------------------------------------------


def phase_work(name: str, cfg: T5Config, d: DocDraw, element_size: int) -> dict:
    """`roofline.phase_work` for configuration `name` on document `d`."""
    sh: Shape = config_shape(name, d)
    int8 = is_int8(name)
    return roofline.phase_work(
        cfg,
        sh.enc_rows,
        sh.enc_len,
        sh.cross_rows,
        sh.prefix,
        sh.lengths,
        sh.compaction,
        element_size,
        int8=int8,
        head_int8=int8 and sh.family == "ct2",  # pidec keeps its LM head float
        head_on_prefix=sh.head_on_prefix,
        packed=sh.packed,
    )


def config_floor(name: str, spec: BenchSpec, built: Built, ceil: dict | None, bandwidth: dict | None) -> dict | None:
    """The roofline floor of configuration `name`, per phase and in all, averaged over the
    documents: its FLOPs at the GEMM ceiling and its bytes at the bandwidth measured for its
    precision (int8 rows: the int8 ones); None where either was not measured."""
    int8 = is_int8(name)
    rate = None if ceil is None else ceil["int8_gops"] if int8 else ceil["float_gflops"]
    bw = (bandwidth or {}).get("int8" if int8 else "float")
    if not rate or not bw:
        return None
    floors = [
        roofline.floor(phase_work(name, built.config, d, spec.torch_dtype.itemsize), rate * 1e9, bw["best_gbps"] * 1e9)
        for d in built.draws
    ]
    phases = {p: statistics.mean(f[p]["floor_s"] for f in floors) for p in roofline.PHASES}
    bound = {p: floors[0][p]["bound"] for p in roofline.PHASES}
    return {"total_s": statistics.mean(f["total_s"] for f in floors), "phases_s": phases, "bound": bound}


def row(name: str, spec: BenchSpec, built: Built, t: Timings, ceil: dict | None, bandwidth: dict | None = None) -> dict:
    """One configuration's result: measured latency and memory beside its analytic columns and
    its roofline floor (`floor_s`; `floor_fraction` = floor over latency, 1.0 at the floor)."""
    cfg, draws, size = built.config, built.draws, spec.torch_dtype.itemsize
    latency = statistics.median(t.times[name])
    fl = config_floor(name, spec, built, ceil, bandwidth)
    cross_bytes = t.cross[name] or max(config_cross_bytes(name, cfg, d, size) for d in draws)
    gflops = statistics.mean(config_flops(name, cfg, d) for d in draws) / 1e9
    steps = [s for s in (config_step_bytes(name, cfg, d, size) for d in draws) if s["passes"]]
    limit = None if ceil is None else ceil["int8_gops"] if is_int8(name) else ceil["float_gflops"]
    parts = {p: statistics.mean(s[p] for s in steps) / 2**20 for p in ("weights", "cross", "self")} if steps else None
    return {
        "config": name,
        "precision": "int8" if is_int8(name) else spec.dtype,
        "latency_s_median": latency,
        "docs_per_s": 1.0 / latency,
        "tokens_per_s": statistics.mean(d.answer_tokens for d in draws) / latency,
        "peak_mem_mb": t.peaks[name] / 2**20,
        "gflops_per_doc": gflops,
        "achieved_gflops_per_s": gflops / latency,
        "ceiling_fraction": None if not limit else gflops / latency / limit,
        "cross_cache_mb": cross_bytes / 2**20,
        "step_mb": statistics.mean(s["total"] for s in steps) / 2**20 if steps else None,
        "step_parts_mb": parts,
        "decode_steps": statistics.mean(config_shape(name, d).steps for d in draws),
        "floor_s": None if fl is None else fl["total_s"],
        "floor_fraction": None if fl is None else fl["total_s"] / latency,
        "floor_phases_s": None if fl is None else fl["phases_s"],
        "floor_bound": None if fl is None else fl["bound"],
        "speedup_vs_hf_pie": None,
    }


def rows(spec: BenchSpec, built: Built, t: Timings, ceil: dict | None, bandwidth: dict | None = None) -> list[dict]:
    """Every configuration's row, with its speed-up over hf-pie where hf-pie ran."""
    out = [row(name, spec, built, t, ceil, bandwidth) for name in built.configs]
    base = next((r["latency_s_median"] for r in out if r["config"] == "hf-pie"), None)
    if base is not None:
        for r in out:
            r["speedup_vs_hf_pie"] = base / r["latency_s_median"]
    return out


def cross_checks(built: Built, t: Timings, device) -> dict:
    """pidec-pid against hf-pid-expanded (first tokens, and logits in float64) and pidec-pie
    against ct2-pie (first tokens: checks the conversion), where both ran; None otherwise."""
    eos, first = built.config.eos_token_id, t.first_tokens
    out = {"agree": None, "logits_gap": None, "logits_agree": None, "agree_ct2": None}
    if "pidec-pid" in first and "hf-pid-expanded" in first:
        out["agree"] = crosscheck.agree(first["pidec-pid"], first["hf-pid-expanded"], eos)
        e = built.engines
        out["logits_gap"] = crosscheck.logits_gap(e.ours, e.hf, built.draws[0], device)
        out["logits_agree"] = out["logits_gap"] <= crosscheck.LOGITS_RTOL
    if "pidec-pie" in first and "ct2-pie" in first:
        out["agree_ct2"] = crosscheck.agree(first["pidec-pie"], first["ct2-pie"], eos)
    return out


# -- the run -------------------------------------------------------------------------------------


def _describe(spec: BenchSpec, built: Built, t: Timings) -> dict:
    """The result's header: what ran, on what."""
    model = {"size": spec.model_size} if spec.model_dir is None else {"path": str(spec.model_dir)}
    model.update(params=built.engines.ours.num_parameters(), config=built.config.to_dict())
    if built.engines.ours_int8 is not None:
        model["int8"] = describe(built.engines.ours_int8)
    d0 = built.draws[0]
    return {
        "workload": spec.workload,
        "workload_shape": {
            "doc_tokens": len(d0.document) if spec.doc_tokens is None else spec.doc_tokens,
            "subtasks": d0.k,
            "answer_tokens_per_doc": statistics.mean(d.answer_tokens for d in built.draws),
            "description": WORKLOADS[spec.workload].description,
        },
        "model": model,
        "device": str(spec.device),
        "dtype": spec.dtype,
        "dtype_reason": spec.dtype_reason,
        "cpu": cpu_header(spec, built),
        "torch_threads": torch.get_num_threads(),
        "docs": spec.docs,
        "repeats": spec.repeats,
    }


def cpu_header(spec: BenchSpec, built: Built) -> dict | None:
    """The CPU a run timed on and the kernels pidec chose on it (None on a GPU)."""
    if spec.device.type != "cpu":
        return None
    f = cpu.features()
    int8 = describe(built.engines.ours_int8) if built.engines.ours_int8 is not None else None
    return {
        "model": f.model,
        "cores": f.cores,
        "instruction_sets": f.instruction_sets(),
        "kernels": cpu.kernel_summary(spec.torch_dtype, bool(built.engines.packed), int8),
    }


def bandwidth_shape(cfg: T5Config) -> tuple[int, int]:
    """The weight shape the bandwidth is measured at: the feed-forward's (d_model x d_ff), at
    least 512 x 2048, so that a small model's run streams its bytes in few calls."""
    return max(cfg.d_model, 512), max(cfg.d_ff, 2048)


def measure_bandwidths(spec: BenchSpec, built: Built) -> dict | None:
    """The memory bandwidth decoding sees on the CPU (`ceiling.measure_bandwidth`), at a
    feed-forward weight's shape (at least 512 x 2048, so that a small model's run streams its
    bytes in few calls) and the row counts of this workload's decoding steps (1 and K): in the
    run's float dtype, and in int8 where an int8 configuration runs. None on a GPU."""
    if spec.device.type != "cpu":
        return None
    k, n = bandwidth_shape(built.config)
    decode_rows = sorted({1, built.draws[0].k})
    out = {"float": measure_bandwidth(k, n, decode_rows, spec.torch_dtype)}
    if any(is_int8(c) for c in built.configs):
        out["int8"] = measure_bandwidth(k, n, decode_rows, int8=True)
    return out


def run_spec(spec: BenchSpec) -> dict:
    """Build, time and report one checked run (threads as torch has them now)."""
    built = build(spec)
    cfg = built.config
    ceil_shape = (len(built.draws[0].document), cfg.d_model, cfg.d_ff)
    ceil = measure_ceiling(*ceil_shape, spec.device, spec.torch_dtype) if spec.ceiling else None
    bandwidth = measure_bandwidths(spec, built) if spec.ceiling else None
    t = warm_up_and_time(spec, built)
    if ceil is not None:  # again at the end: a busy spell at the start must not lower the ceiling
        ceil = best_ceiling(ceil, measure_ceiling(*ceil_shape, spec.device, spec.torch_dtype))
    if bandwidth is not None:
        again = measure_bandwidths(spec, built)
        bandwidth = {k: best_bandwidth(bandwidth.get(k), again.get(k)) for k in bandwidth}
    result = _describe(spec, built, t)
    result.update(ceiling=ceil, bandwidth=bandwidth, **cross_checks(built, t, spec.device))
    result.update(skipped=built.skipped, compile=spec.compile, compile_s=t.compile_s)
    result.update(packed_weights=built.engines.packed, results=rows(spec, built, t, ceil, bandwidth))
    if spec.memory_budget is not None:
        result["memory"] = memory_report(  # analytic: skipped configurations too
            list(spec.configs),
            cfg,
            spec.workload,
            spec.memory_budget,
            spec.torch_dtype.itemsize,
            spec.doc_tokens,
            spec.subtasks,
            built.engines.packed,
        )
    return result


def run_bench(
    workload: str = "dst",
    model_size: str = "base",
    model_dir: str | None = None,
    configs: list[str] | None = None,
    docs: int = 2,
    repeats: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    threads: int | None = None,
    *,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
    quantize: str | None = None,
    memory_budget: int | str | None = None,
    ceiling: bool = True,
    compile: bool = False,
    pack: bool = True,
) -> dict:
    """Time `configs` on `docs` documents of `workload`, `repeats` passes each, and return the
    result (docs/performance.md, "Method"). `doc_tokens` / `subtasks` shrink the workload.
    `quantize="int8"`: the pidec and ct2 configurations in int8. `memory_budget` (bytes or
    '8GiB'): add the analytic documents-per-budget report. `ceiling=False`: do not time the
    machine's ceiling. `compile`: float pidec decodes its steps through torch.compile, compiled
    before anything is measured. `pack`: pidec packs its float32 linear weights where that
    applies, as `pidec.load` does; False times the plain BLAS path."""
    spec = make_spec(
        workload,
        model_size,
        model_dir,
        configs,
        docs,
        repeats,
        device,
        dtype,
        quantize,
        seed=seed,
        threads=threads,
        doc_tokens=doc_tokens,
        subtasks=subtasks,
        ceiling=ceiling,
        compile=compile,
        pack=pack,
        memory_budget=memory_budget,
    )
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run_spec(spec)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)


def run_memory(
    workload: str = "dst",
    model_size: str = "base",
    model_dir: str | None = None,
    configs: list[str] | None = None,
    memory_budget: int | str = "8GiB",
    dtype: str = "float32",
    quantize: str | None = None,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
    pack: bool = True,
) -> dict:
    """The memory report alone, without building a model or timing anything. `pack`: count
    pidec's packed weight copies, as a CPU run would hold them (`run_bench`'s `pack`)."""
    _check_model(workload, model_size, model_dir, dtype)
    configs = check_configs(configs, quantize)
    if model_dir is None:
        cfg = T5Config.from_name(model_size)
    else:
        cfg = checkpoint.read_config(checkpoint.resolve(model_dir))
    packed = pack and packing.available()
    mem = memory_report(configs, cfg, workload, memory_budget, DTYPES[dtype].itemsize, doc_tokens, subtasks, packed)
    mem["packed_weights"] = packed
    mem["model"] = {"size": model_size} if model_dir is None else {"path": str(model_dir)}
    mem["dtype"] = dtype
    return mem
