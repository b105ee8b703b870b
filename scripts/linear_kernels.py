"""Time T5-base linear layers through the products pidec can run on this CPU, at the row counts
pidec meets: 1-30 rows in decoding steps, ~170 in a dst prefill, 512 in encoding.

    python scripts/linear_kernels.py [--rows 1,6,30,170,512] [--layers 40]
    python scripts/linear_kernels.py --int8 [--rows 1,6,30,512] [--layers 20] [--json out.json] [--threads N] [--passes 7]

Float32 (the default): BLAS (`pidec.packing.linear` unpacked: `x @ W^T`, or `W @ x^T` at up to
16 rows) against the oneDNN-packed weights (`pidec.packing`).

--int8: every int8 product torch offers here, each timed as a whole linear layer (float32
activations in, float32 out: the activation's quantization, the int8 product and the rescale),
beside the float32 packed product they would replace:
  dyn_x86 / dyn_fbgemm / dyn_onednn  torch's dynamic int8 linear (`torch.ops.quantized.
      linear_dynamic`, what `pidec.quantize`'s torch backend runs) with weights packed by each
      quantized engine; activations per tensor, 7 bits without VNNI (`activation_bits`)
  int_mm      per-token int8 activations, `torch._int_mm` (int8 x int8 -> int32), rescaled
  onednn_q    per-tensor uint8 activations through oneDNN's static int8 linear
      (`torch.ops.onednn.qlinear_pointwise`, the op inductor lowers int8 linears to)
and each one's error against the float32 product (relative Frobenius norm), so that a fast
kernel that saturates (u8 x s8 pair sums in int16 without VNNI) shows as such.

Each product runs over `--layers` distinct weights, so that (as in a real model) a weight is not
in cache when it is used; the kernels take turns within each of 7 passes (a busy spell of a
shared machine falls on all of them; `--passes`), and the median pass is reported: GFLOP/s, and for the few
rows of decoding the weight bytes read per second. docs/performance.md quotes its output."""

import argparse
import json
import statistics
import time
import warnings

import torch

from pidec import cpu, packing
from pidec.packing import linear
from pidec.quantize import activation_bits

SHAPES = ((768, 768), (768, 2048), (2048, 768))  # T5-base: attention, feed-forward in, feed-forward out


def timed_round_robin(kernels: dict, x, passes: int = 7) -> dict:
    """Median seconds of one pass over each kernel's weights, kernels taking turns per pass."""
    for fn in kernels.values():
        fn(x)
    times = {name: [] for name in kernels}
    for _ in range(passes):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def float_table(rows, layers, gen):
    print(
        f"{'shape':<14} {'rows':>5} {'BLAS GFLOP/s':>13} {'packed GFLOP/s':>15} {'BLAS GB/s':>10} "
        f"{'packed GB/s':>12} {'speed-up':>9}"
    )
    for k, n in ((768, 768), (768, 2048), (2048, 768), (768, 32128)):
        count = layers if n != 32128 else 4
        weights = [torch.randn(n, k, generator=gen) for _ in range(count)]
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            flops, nbytes = 2 * m * k * n * count, k * n * 4 * count
            t = timed_round_robin(
                {
                    "blas": lambda x: [linear(x, w) for w in weights],
                    "packed": lambda x: [packing.packed_product(x, w) for w in weights],
                },
                x,
            )
            blas, packed = t["blas"], t["packed"]
            print(
                f"{f'{k}->{n}':<14} {m:>5} {flops / blas / 1e9:>13.1f} {flops / packed / 1e9:>15.1f} "
                f"{nbytes / blas / 1e9:>10.1f} {nbytes / packed / 1e9:>12.1f} {blas / packed:>8.2f}x"
            )


# -- int8 ----------------------------------------------------------------------------------------


def dynamic_linear(weights, engine: str):
    """torch's dynamic int8 linear with weights packed by `engine` (per-channel int8 weights)."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        packed = []
        for w in weights:
            q = torch.quantize_per_channel(
                w, w.abs().amax(1) / 127, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8
            )
            packed.append(torch.ops.quantized.linear_prepack(q, None))
    finally:
        torch.backends.quantized.engine = old
    reduce = activation_bits() < 8

    def run(x):
        torch.backends.quantized.engine = engine
        try:
            return [torch.ops.quantized.linear_dynamic(x, p, reduce_range=reduce) for p in packed]
        finally:
            torch.backends.quantized.engine = old

    return run


def int_mm(weights):
    """Per-token int8 activations, per-channel int8 weights, `torch._int_mm`, rescaled to float."""
    ws = [w.abs().amax(1) / 127 for w in weights]
    w8 = [(w / s[:, None]).round().clamp(-127, 127).to(torch.int8).t().contiguous() for w, s in zip(weights, ws)]

    def run(x):
        s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        x8 = (x / s).round().to(torch.int8)
        return [torch._int_mm(x8, w).float() * s * scale for w, scale in zip(w8, ws)]

    return run


def onednn_qlinear(weights, m):
    """Per-tensor uint8 activations through oneDNN's int8 linear (weights prepacked for m rows)."""
    ws = [w.abs().amax(1) / 127 for w in weights]
    zp = torch.zeros(weights[0].shape[0], dtype=torch.long)
    packed = [
        torch.ops.onednn.qlinear_prepack((w / s[:, None]).round().clamp(-127, 127).to(torch.int8), [m, w.shape[1]])
        for w, s in zip(weights, ws)
    ]

    def run(x):
        lo, hi = torch.aminmax(x)
        lo, hi = min(lo.item(), 0.0), max(hi.item(), 0.0)
        scale = max(hi - lo, 1e-12) / 255
        zero = int(round(-lo / scale))
        qx = (x / scale + zero).round().clamp(0, 255).to(torch.uint8)
        return [
            torch.ops.onednn.qlinear_pointwise(qx, scale, zero, p, s, zp, None, 1.0, 0, torch.float32, "none", [], "")
            for p, s in zip(packed, ws)
        ]

    return run


def int8_table(rows, layers, gen, passes: int = 7) -> list[dict]:
    f = cpu.features()
    print(f"# {f.model}, {f.cores} cores; {f.instruction_sets()}; torch threads {torch.get_num_threads()}")
    print(f"# activation bits of the dynamic linear here: {activation_bits()}")
    names = ["fp32_packed", "dyn_x86", "dyn_fbgemm", "dyn_onednn", "int_mm", "onednn_q"]
    print(f"{'shape':<12} {'rows':>5} " + " ".join(f"{n:>11}" for n in names) + "   (GFLOP/s; error vs float32)")
    out = []
    for k, n in SHAPES:
        weights = [torch.randn(n, k, generator=gen) / k**0.5 for _ in range(layers)]
        fp32 = [w.clone() for w in weights]
        for w in fp32:
            packing.packed_product(torch.zeros(1, k), w)  # pack now
        engines = [e for e in ("x86", "fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            kernels = {"fp32_packed": lambda x: [packing.packed_product(x, w) for w in fp32]}
            for e in engines:
                kernels[f"dyn_{e}"] = dynamic_linear(weights, e)
            kernels["int_mm"] = int_mm(weights)
            kernels["onednn_q"] = onednn_qlinear(weights, m)
            exact = x @ weights[0].t()
            errors, ok = {}, {}
            for name, fn in kernels.items():
                try:
                    y = fn(x)[0]
                    errors[name] = ((y - exact).norm() / exact.norm()).item()
                    ok[name] = fn
                except (RuntimeError, NotImplementedError) as e:
                    errors[name] = f"n/a: {str(e).splitlines()[0][:80]}"
            t = timed_round_robin(ok, x, passes)
            flops = 2 * m * k * n * layers
            rates = {name: flops / t[name] / 1e9 for name in t}
            cells = " ".join(f"{rates[n]:>11.1f}" if n in rates else f"{'n/a':>11}" for n in names)
            print(f"{f'{k}->{n}':<12} {m:>5} {cells}")
            errs = " ".join(f"{errors[n]:>11.4f}" if isinstance(errors.get(n), float) else f"{'-':>11}" for n in names)
            print(f"{'':<12} {'err':>5} {errs}")
            out.append({"shape": [k, n], "rows": m, "gflops": rates, "error": errors})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--int8", action="store_true", help="the int8 products against float32 packed")
    p.add_argument("--json", default=None, help="with --int8: write the figures here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--passes", type=int, default=7, help="timed passes per kernel (the median is reported)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not packing.available():
        raise SystemExit("this torch has no oneDNN: nothing to compare")
    gen = torch.Generator().manual_seed(0)
    warnings.simplefilter("ignore", UserWarning)  # torch 2.13: quantized tensor creation marked deprecated
    with torch.inference_mode():
        if a.int8:
            rows = [int(x) for x in (a.rows or "1,6,30,512").split(",")]
            out = int8_table(rows, a.layers or 20, gen, a.passes)
            if a.json:
                with open(a.json, "w", encoding="utf-8") as f:
                    json.dump(out, f, indent=1)
        else:
            float_table([int(x) for x in (a.rows or "1,6,30,170,512").split(",")], a.layers or 40, gen)


if __name__ == "__main__":
    main()
