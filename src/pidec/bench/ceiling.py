"""The machine's own matrix-product speed at a workload's shape: the ceiling each benchmark row
is measured against (its `%ceil`). Timed at the start of a run and again at the end, keeping the
best of each kernel, because on a shared machine a busy spell lowers a single measurement.
Method and measured values: docs/performance.md ("Ceiling").
"""

from __future__ import annotations

import time

import torch

from .. import packing
from ..generate import sync


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


def _int8_rate(m, k, n, device, gen, min_time_s, trials) -> tuple[float | None, str | None]:
    """`torch._int_mm` at [m, k] x [k, n]: uint8 x int8 first (the operand pair VNNI multiplies
    natively), else int8 x int8; (None, why) where torch has neither for the device."""
    flops = 2 * m * k * n
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen).to(device)
    error = None
    for low, high, kind in ((0, 256, torch.uint8), (-127, 128, torch.int8)):
        a8 = torch.randint(low, high, (m, k), dtype=kind, generator=gen).to(device)
        try:
            return best_rate(lambda a8=a8: torch._int_mm(a8, b8), flops, device, min_time_s, trials), None
        except (RuntimeError, NotImplementedError) as e:
            error = f"torch._int_mm: {e}".splitlines()[0]
    return None, error


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
    the ceiling is measured against the best product this machine has. Returns {"shape",
    "dtype", "float_gflops", "float_kernels", "int8_gops", "int8_error", "trials"}; the int8
    rate is None where torch has no int8 product for the device."""
    device = torch.device(device)
    flops = 2 * m * k * n
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    kernels = {"blas": best_rate(lambda: torch.mm(a, b), flops, device, min_time_s, trials)}
    if device.type == "cpu" and dtype == torch.float32 and packing.available():
        w = b.t().contiguous()  # [n, k], the layout of a linear weight
        kernels["onednn_packed"] = best_rate(lambda: packing.packed_product(a, w), flops, device, min_time_s, trials)
    int8_rate, error = _int8_rate(m, k, n, device, gen, min_time_s, trials)
    return {
        "shape": [m, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "float_gflops": max(kernels.values()) / 1e9,
        "float_kernels": {name: rate / 1e9 for name, rate in kernels.items()},
        "int8_gops": None if int8_rate is None else int8_rate / 1e9,
        "int8_error": error,
        "trials": trials,
    }


def best_ceiling(a: dict, b: dict) -> dict:
    """Two measurements of the same ceiling: the faster of each, trials added up."""
    out = dict(a, trials=a["trials"] + b["trials"], float_gflops=max(a["float_gflops"], b["float_gflops"]))
    ka, kb = a.get("float_kernels") or {}, b.get("float_kernels") or {}
    if ka or kb:
        out["float_kernels"] = {name: max(ka.get(name, 0.0), kb.get(name, 0.0)) for name in {**ka, **kb}}
    rates = [r for r in (a["int8_gops"], b["int8_gops"]) if r is not None]
    out["int8_gops"] = max(rates) if rates else None
    out["int8_error"] = None if rates else a["int8_error"]
    return out
