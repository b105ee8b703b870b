"""Time T5-base linear layers through BLAS (`pidec.packing.linear` unpacked: `x @ W^T`, or
`W @ x^T` at up to 16 rows) and through their oneDNN-packed weights (`pidec.packing`) at the
row counts pidec meets: 1-30 rows in decoding steps, ~170 in a dst prefill, 512 in encoding.

    python scripts/linear_kernels.py [--rows 1,6,30,170,512] [--layers 40]

Each product runs over `--layers` distinct weights, so that (as in a real model) a weight is not
in cache when it is used; the median of 7 passes is reported in GFLOP/s and in GB/s of weights
read. docs/performance.md quotes its output."""

import argparse
import statistics
import time

import torch

from pidec import packing
from pidec.packing import linear

p = argparse.ArgumentParser()
p.add_argument("--rows", default="1,6,30,170,512")
p.add_argument("--layers", type=int, default=40)
a = p.parse_args()
rows = [int(x) for x in a.rows.split(",")]
if not packing.available():
    raise SystemExit("this torch has no oneDNN: nothing to compare")
gen = torch.Generator().manual_seed(0)
print(
    f"{'shape':<14} {'rows':>5} {'BLAS GFLOP/s':>13} {'packed GFLOP/s':>15} {'BLAS GB/s':>10} {'packed GB/s':>12} {'speed-up':>9}"
)
with torch.inference_mode():
    for k, n in ((768, 768), (768, 2048), (2048, 768), (768, 32128)):
        count = a.layers if n != 32128 else 4
        weights = [torch.randn(n, k, generator=gen) for _ in range(count)]
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            flops, nbytes = 2 * m * k * n * count, k * n * 4 * count

            def timed(fn, x=x, weights=weights):
                fn(x, weights)
                ts = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    fn(x, weights)
                    ts.append(time.perf_counter() - t0)
                return statistics.median(ts)

            blas = timed(lambda x, ws: [linear(x, w) for w in ws])
            packed = timed(lambda x, ws: [packing.packed_product(x, w) for w in ws])
            print(
                f"{f'{k}->{n}':<14} {m:>5} {flops / blas / 1e9:>13.1f} {flops / packed / 1e9:>15.1f} "
                f"{nbytes / blas / 1e9:>10.1f} {nbytes / packed / 1e9:>12.1f} {blas / packed:>8.2f}x"
            )
