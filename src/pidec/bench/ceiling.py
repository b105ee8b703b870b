"""The machine's own limits, the two sides of the roofline each benchmark row is measured
against: the matrix-product speed at a workload's shape (`measure_ceiling`, the row's `%ceil`)
and the memory bandwidth a decoding step sees (`measure_bandwidth`: a weight matrix that is not
in cache streamed through a product of the few rows decoding has). `bench.roofline.floor` turns
the two into each row's floor time (`%floor`). Timed at the start of a run and again at the
end, keeping the best of each, because on a shared machine a busy spell lowers a single
measurement. Method and measured values: docs/performance.md ("Roofline").
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from .. import packing
from ..cpu import last_level_cache_bytes
from ..generate import sync
from ..quantize import activation_bits


def best_rate(fn, flops: int, device: torch.device, min_time_s: float, trials: int) -> float:
    """Best of `trials` rates (FLOP/s), each over as many calls of `fn` as fill `min_time_s`,
    after one untimed call."""
    fn()
    sync(device)
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
        best = max(best, n * flops / elapsed)
    return best


def _int8_rates(m, k, n, device, gen, min_time_s, trials) -> tuple[dict[str, float], str | None]:
    """The int8 products torch has at [m, k] x [k, n], by name: `torch._int_mm` (uint8 x int8
    first, the operand pair VNNI multiplies natively, else int8 x int8) and, on the CPU, torch's
    dynamic int8 linear (float activations quantized per call, the product `pidec.quantize`'s
    torch backend runs); with the error of whichever torch could not run."""
    flops = 2 * m * k * n
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen).to(device)
    rates, error = {}, None
    for low, high, kind in ((0, 256, torch.uint8), (-127, 128, torch.int8)):
        a8 = torch.randint(low, high, (m, k), dtype=kind, generator=gen).to(device)
        try:
            rates["int_mm"] = best_rate(lambda a8=a8: torch._int_mm(a8, b8), flops, device, min_time_s, trials)
            break
        except (RuntimeError, NotImplementedError) as e:
            error = f"torch._int_mm: {e}".splitlines()[0]
    if device.type == "cpu":
        _, (product,) = _int8_streamers(k, n, 1, gen)
        x = torch.randn(m, k, generator=gen)
        try:
            rates["dynamic_linear"] = best_rate(lambda: product(x), flops, device, min_time_s, trials)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - a torch without x86/fbgemm
            error = f"quantized.linear_dynamic: {e}".splitlines()[0]
    return rates, None if rates else error


def measure_ceiling(
    m: int,
    k: int,
    n: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    min_time_s: float = 0.1,
    trials: int = 3,
) -> dict:
    """The machine's own matrix-product speed at [m, k] x [k, n] (2mkn FLOPs): the best of
    `trials` timings in `dtype` and in int8, with the threads torch has now. The float rate is
    the faster of two kernels: BLAS (`torch.mm`) and, in float32 on the CPU, oneDNN with the
    weight packed ahead (`pidec.packing`, what pidec's linear layers use), so that a fraction of
    the ceiling is measured against the best product this machine has; the int8 rate likewise
    the faster of `torch._int_mm` and torch's dynamic int8 linear (`_int8_rates`). Returns
    {"shape", "dtype", "float_gflops", "float_kernels", "int8_gops", "int8_kernels",
    "int8_error", "trials"}; the int8 rate is None where torch has no int8 product for the
    device."""
    device = torch.device(device)
    flops = 2 * m * k * n
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    kernels = {"blas": best_rate(lambda: torch.mm(a, b), flops, device, min_time_s, trials)}
    if device.type == "cpu" and dtype == torch.float32 and packing.available():
        w = b.t().contiguous()  # [n, k], the layout of a linear weight
        kernels["onednn_packed"] = best_rate(lambda: packing.packed_product(a, w), flops, device, min_time_s, trials)
    int8_kernels, error = _int8_rates(m, k, n, device, gen, min_time_s, trials)
    return {
        "shape": [m, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "float_gflops": max(kernels.values()) / 1e9,
        "float_kernels": {name: rate / 1e9 for name, rate in kernels.items()},
        "int8_gops": max(int8_kernels.values()) / 1e9 if int8_kernels else None,
        "int8_kernels": {name: rate / 1e9 for name, rate in int8_kernels.items()},
        "int8_error": error,
        "trials": trials,
    }


def best_ceiling(a: dict, b: dict) -> dict:
    """Two measurements of the same ceiling: the faster of each, trials added up."""
    out = dict(a, trials=a["trials"] + b["trials"], float_gflops=max(a["float_gflops"], b["float_gflops"]))
    for key in ("float_kernels", "int8_kernels"):
        ka, kb = a.get(key) or {}, b.get(key) or {}
        if ka or kb:
            out[key] = {name: max(ka.get(name, 0.0), kb.get(name, 0.0)) for name in {**ka, **kb}}
    rates = [r for r in (a["int8_gops"], b["int8_gops"]) if r is not None]
    out["int8_gops"] = max(rates) if rates else None
    out["int8_error"] = None if rates else a["int8_error"]
    return out


# -- memory bandwidth ---------------------------------------------------------------------------

STREAM_FLOOR_BYTES = 128 * 2**20  # stream at least this much, and at least 4x the last-level cache


def _float_streamers(k: int, n: int, count: int, dtype: torch.dtype, gen) -> tuple[str, list]:
    """`count` distinct [n, k] weights and the product pidec runs on them: oneDNN-packed in
    float32 on the CPU where torch has it (only the packed copies are kept), else torch's linear."""
    if dtype == torch.float32 and packing.available():
        ws = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, generator=gen), packing.PACK_ROWS_HINT)]
        ws += [ws[0].clone() for _ in range(count - 1)]
        return "onednn_packed", [
            lambda x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in ws
        ]
    w0 = torch.randn(n, k, generator=gen).to(dtype)
    ws = [w0] + [w0.clone() for _ in range(count - 1)]
    return "linear", [lambda x, w=w: packing.linear(x, w) for w in ws]


def _int8_streamers(k: int, n: int, count: int, gen) -> tuple[str, list]:
    """`count` int8 weights (one scale per output channel), each packed by torch's quantized
    engine, through torch's dynamic int8 linear: the product `pidec.quantize`'s torch backend runs."""
    w = torch.randn(n, k, generator=gen)
    with warnings.catch_warnings():  # torch 2.13 marks quantized tensor creation deprecated; still its API
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        q = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = [torch.ops.quantized.linear_prepack(q, None) for _ in range(count)]
    reduce = activation_bits() < 8  # as pidec.quantize runs it on this CPU
    return "int8_dynamic", [
        lambda x, p=p: torch.ops.quantized.linear_dynamic(x, p, reduce_range=reduce) for p in packed
    ]


def measure_bandwidth(
    k: int,
    n: int,
    rows: list[int],
    dtype: torch.dtype = torch.float32,
    int8: bool = False,
    min_bytes: int | None = None,
    trials: int = 3,
) -> dict:
    """The memory bandwidth a decoding step sees on the CPU: distinct [n, k] weights, together
    more than four times the last-level cache (and at least `STREAM_FLOOR_BYTES`, or
    `min_bytes`), each multiplied in turn by an activation of `rows[i]` rows, as a decoding
    step multiplies each layer's weight by its few rows; bytes of weight read per second, best of
    `trials` passes, per row count. The product is pidec's own: oneDNN-packed in float32,
    torch's linear in bf16, torch's dynamic int8 linear with `int8` (weights 1 byte per element).
    Returns {"shape", "dtype", "kernel", "bytes_streamed", "gbps": {rows: GB/s}, "best_gbps", "trials"}."""
    gen = torch.Generator().manual_seed(0)
    element = 1 if int8 else torch.empty((), dtype=dtype).element_size()
    wanted = min_bytes if min_bytes is not None else max(STREAM_FLOOR_BYTES, 4 * last_level_cache_bytes())
    count = max(2, math.ceil(wanted / (k * n * element)))
    kernel, products = _int8_streamers(k, n, count, gen) if int8 else _float_streamers(k, n, count, dtype, gen)
    nbytes = count * k * n * element
    gbps = {}
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(torch.float32 if int8 else dtype)
            for product in products[:2]:  # untimed: first-call setup of the kernels
                product(x)
            best = 0.0
            for _ in range(trials):
                t0 = time.perf_counter()
                for product in products:
                    product(x)
                best = max(best, nbytes / (time.perf_counter() - t0))
            gbps[m] = best / 1e9
    return {
        "shape": [k, n],
        "dtype": "int8" if int8 else str(dtype).removeprefix("torch."),
        "kernel": kernel,
        "bytes_streamed": nbytes,
        "gbps": gbps,
        "best_gbps": max(gbps.values()),
        "trials": trials,
    }


def best_bandwidth(a: dict | None, b: dict | None) -> dict | None:
    """Two measurements of the same bandwidth: the faster at each row count, trials added up."""
    if a is None or b is None:
        return a or b
    gbps = {m: max(a["gbps"].get(m, 0.0), b["gbps"].get(m, 0.0)) for m in {**a["gbps"], **b["gbps"]}}
    return dict(a, gbps=gbps, best_gbps=max(gbps.values()), trials=a["trials"] + b["trials"])
