"""`pidec bench`'s text output: the table of a run, what its columns mean, why the
configurations expected to be slow are slow, the cross-checks, and the memory report. Nothing
here measures or computes; it formats `harness.run_bench`'s and `harness.run_memory`'s results.
"""

from __future__ import annotations

from .crosscheck import LOGITS_RTOL

COLUMNS = [
    ("latency_s", "median seconds per document (over docs x repeats, timed round-robin)"),
    ("tok/s", "answer tokens the workload asks for per document, over the latency (the same for every row)"),
    ("peak_MB", "peak memory of one document above the level before it (CPU: sampled process RSS)"),
    ("GFLOP/doc", "matmul FLOPs one document costs in this layout, padding included (analytic)"),
    ("GFLOP/s", "GFLOP/doc over the latency: the arithmetic rate achieved"),
    ("%ceil", "GFLOP/s as a share of the machine's ceiling above (the int8 one for int8 rows)"),
    (
        "%floor",
        "the roofline floor over the latency: each phase's FLOPs at the ceiling or its bytes at the measured "
        "bandwidth, whichever is longer (100 = at the floor; per phase below)",
    ),
    ("cross_MB", "cross-attention keys and values held for one document while decoding"),
    ("MB/step", "bytes one decoding step moves after the prefill: weights + cross cache + self cache"),
    ("speedup", "hf-pie's latency over this row's"),
]

# Why a configuration is slower than prompt-in-decoder by design, not by a fault of the run.
SLOW_BECAUSE = {
    "pidec-seq": "one row writes every subtask's 'prompt: answer; ' in turn: {steps:.0f} sequential steps "
    "per document, where pidec-pid's rows take {pid_steps:.0f} side by side",
    "pidec-pie": "encodes the document once per subtask (K encoder rows of prompt + document)",
    "hf-pie": "encodes the document once per subtask, and every row runs to the longest answer",
    "ct2-pie": "encodes the document once per subtask, and every row runs to the longest answer",
    "hf-pid-expanded": "encodes once, but every row projects its own copy of the cross-attention cache "
    "and runs to the longest answer",
    "ct2-prefix": "encodes the document once per subtask, every row runs to the longest answer",
}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ceiling_lines(ceil: dict | None) -> list[str]:
    if not ceil:
        return []
    m, k, n = ceil["shape"]
    int8 = f"{ceil['int8_gops']:.1f} GOP/s" if ceil["int8_gops"] else f"n/a ({ceil['int8_error']})"
    lines = [
        f"machine ceiling ({m}x{k} @ {k}x{n} matmul, best of {ceil['trials']}): "
        f"{ceil['dtype']} {ceil['float_gflops']:.1f} GFLOP/s, int8 {int8}"
    ]
    kernels = ceil.get("float_kernels") or {}
    if len(kernels) > 1:
        lines.append("  float kernels: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in kernels.items()))
    int8_kernels = ceil.get("int8_kernels") or {}
    if len(int8_kernels) > 1:
        lines.append("  int8 kernels: " + ", ".join(f"{k} {v:.1f} GOP/s" for k, v in int8_kernels.items()))
    return lines


def _bandwidth_lines(bandwidth: dict | None) -> list[str]:
    if not bandwidth:
        return []
    lines = []
    for b in bandwidth.values():
        k, n = b["shape"]
        rates = ", ".join(f"{m} rows {v:.1f}" for m, v in b["gbps"].items())
        lines.append(
            f"memory bandwidth ({b['dtype']} {k}x{n} weights through {b['kernel']}, "
            f"{b['bytes_streamed'] / 2**20:.0f} MiB streamed, best of {b['trials']}): {rates} GB/s"
        )
    return lines


def _cpu_lines(result: dict) -> list[str]:
    c = result.get("cpu")
    lines = []
    if c:
        lines += [f"cpu: {c['model']}, {c['cores']} cores; {c['instruction_sets']}", f"kernels: {c['kernels']}"]
    if result.get("dtype_reason"):
        lines.append(f"dtype {result['dtype']}: {result['dtype_reason']}")
    return lines


def _header_lines(result: dict) -> list[str]:
    model = result["model"]
    name = model.get("size") or model.get("path")
    lines = [
        f"workload {result['workload']}  model {name} ({model['params'] / 1e6:.1f}M params)  "
        f"device {result['device']}  dtype {result['dtype']}  threads {result['torch_threads']}  "
        f"docs {result['docs']} x repeats {result['repeats']}",
        *_cpu_lines(result),
    ]
    if result.get("compile"):
        lines.append(
            f"float pidec configurations: steps through torch.compile (compiling took {result['compile_s']:.1f} s)"
        )
    if model.get("int8"):
        lines.append(f"int8 pidec model: {model['int8']}")
    lines += _ceiling_lines(result.get("ceiling")) + _bandwidth_lines(result.get("bandwidth"))
    if "packed_weights" in result:
        lines.append(f"pidec float32 linear layers: {'oneDNN-packed weights' if result['packed_weights'] else 'BLAS'}")
    return lines


HEADER = (
    f"{'config':<16} {'latency_s':>10} {'docs/s':>8} {'tok/s':>9} {'peak_MB':>9} "
    f"{'GFLOP/doc':>10} {'GFLOP/s':>8} {'%ceil':>6} {'%floor':>6} {'cross_MB':>9} {'MB/step':>8} {'speedup':>8}"
)


def _row_line(r: dict) -> str:
    frac = r.get("ceiling_fraction")
    floor = r.get("floor_fraction")
    speedup = r["speedup_vs_hf_pie"]
    return (
        f"{r['config']:<16} {r['latency_s_median']:>10.4f} {r['docs_per_s']:>8.3f} {r['tokens_per_s']:>9.1f} "
        f"{r['peak_mem_mb']:>9.1f} {r['gflops_per_doc']:>10.2f} {r['achieved_gflops_per_s']:>8.1f} "
        f"{_fmt(None if frac is None else 100 * frac, '>6.1f')} {_fmt(None if floor is None else 100 * floor, '>6.1f')} "
        f"{r['cross_cache_mb']:>9.2f} "
        f"{_fmt(r.get('step_mb'), '>8.1f')} "
        f"{_fmt(speedup, '>7.2f') + ('x' if speedup is not None else ''):>8}"
    )


def floor_lines(results: list[dict]) -> list[str]:
    """Each row's roofline floor by phase (seconds, `roofline.floor`), and what bounds each phase."""
    with_floor = [r for r in results if r.get("floor_phases_s")]
    if not with_floor:
        return []
    phases = list(with_floor[0]["floor_phases_s"])
    lines = ["roofline floor by phase (s; c = compute-bound, m = memory-bound):"]
    lines.append(f"  {'config':<16} " + " ".join(f"{p:>10}" for p in phases) + f" {'floor':>8} {'latency':>8}")
    for r in with_floor:
        cells = " ".join(f"{r['floor_phases_s'][p]:>9.4f}{r['floor_bound'][p][0]}" for p in phases)
        lines.append(f"  {r['config']:<16} {cells} {r['floor_s']:>8.4f} {r['latency_s_median']:>8.4f}")
    return lines


def slow_notes(results: list[dict]) -> list[str]:
    """For each row slower than the fastest that is slow by design: why (`SLOW_BECAUSE`)."""
    if len(results) < 2:
        return []
    fastest = min(r["latency_s_median"] for r in results)
    pid = next((r for r in results if r["config"].removesuffix("-int8") == "pidec-pid"), None)
    notes = []
    for r in results:
        why = SLOW_BECAUSE.get(r["config"].removesuffix("-int8"))
        if why is None or r["latency_s_median"] <= fastest:
            continue
        if "{steps" in why:
            if pid is None or "decode_steps" not in r:
                continue
            why = why.format(steps=r["decode_steps"], pid_steps=pid["decode_steps"])
        notes.append(f"  {r['config']}: {why}")
    return ["slower by design:", *notes] if notes else []


def _check_lines(result: dict) -> list[str]:
    lines = []
    if result.get("agree") is not None:
        lines.append(f"pidec-pid vs hf-pid-expanded first tokens agree: {result['agree']}")
    if result.get("logits_gap") is not None:
        lines.append(
            f"pidec vs transformers logits, teacher-forced in float64: max difference {result['logits_gap']:.1e} of the "
            f"largest logit, agree (<= {LOGITS_RTOL:g}): {result['logits_agree']}"
        )
    if result.get("agree_ct2") is not None:
        lines.append(f"pidec-pie vs ct2-pie first tokens agree: {result['agree_ct2']}")
    for s in result.get("skipped") or []:
        lines.append(f"skipped {', '.join(s['configs'])}: {s['reason']}")
    return lines


def format_table(result: dict) -> str:
    """A fixed-width text table of `run_bench`'s result, its columns explained under it, why
    the rows slow by design are slow, the cross-checks and skipped configurations."""
    lines = _header_lines(result) + [HEADER, "-" * len(HEADER)]
    lines += [_row_line(r) for r in result["results"]]
    if result["results"]:
        lines += ["columns:", *(f"  {name:<10} {text}" for name, text in COLUMNS)]
    lines += floor_lines(result["results"]) + slow_notes(result["results"]) + _check_lines(result)
    if result.get("memory"):
        lines += ["", format_memory(result["memory"])]
    return "\n".join(lines)


def format_memory(mem: dict) -> str:
    """The documents-per-budget table of `configs.memory_report`."""
    d = mem["document"]
    lines = [
        (
            f"memory budget {mem['budget_bytes'] / 2**30:.2f} GiB, workload {mem['workload']} at its largest "
            f"({d['doc_tokens']}-token document, {d['subtasks']} prompts of {d['prompt_tokens']} tokens, "
            f"outputs of {d['output_tokens']} tokens)"
        ),
        f"method: {mem['method']}",
    ]
    header = (
        f"{'config':<16} {'docs_fit':>9} {'weights_MB':>11} {'encode_MB':>10} {'per_doc_MB':>11} "
        f"{'cross':>9} {'self':>8} {'enc_out':>8} {'logits':>7}"
    )
    lines += [header, "-" * len(header)]
    for r in mem["rows"]:
        p = r["per_doc_parts_mb"]
        lines.append(
            f"{r['config']:<16} {r['docs_fit']:>9d} {r['weights_mb']:>11.1f} {r['transient_mb']:>10.1f} "
            f"{r['per_doc_mb']:>11.2f} {p['cross']:>9.2f} {p['self']:>8.2f} {p['encoder_output']:>8.2f} "
            f"{p['logits']:>7.2f}"
        )
    return "\n".join(lines)
