"""Profile pidec-pid on documents of the bench's `dst` workload at base size (torch.profiler).

    python scripts/profile_decode.py [--size base] [--workload dst] [--rows 15] [--repeats 3] [--no-pack]

Prints the operator table sorted by self CPU time, summed over `--repeats` runs of one document
(after a warm-up), and the self CPU time per document. docs/performance.md shows it before
and after the decoding-step changes; run it from another checkout through PYTHONPATH to
compare (a checkout from before `pidec.packing` runs its own BLAS path whatever the flag)."""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pidec.bench.engines import run_pidec_pid
from pidec.bench.workloads import WORKLOADS, build_random_model, draw_documents
from pidec.packing import Linear

p = argparse.ArgumentParser()
p.add_argument("--size", default="base")
p.add_argument("--workload", default="dst")
p.add_argument("--rows", type=int, default=15)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--no-pack", action="store_true", help="BLAS linear layers, not oneDNN-packed weights")
a = p.parse_args()
model = build_random_model(a.size).eval()
packed = False
if hasattr(Linear, "packed") and not a.no_pack:  # this checkout has pidec.packing
    from pidec import packing

    if packing.available():
        packing.pack(model)
        packed = True
d = draw_documents(WORKLOADS[a.workload], 1, 0)[0]
with torch.inference_mode():
    run_pidec_pid(model, None, d, torch.device("cpu"))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.repeats):
            run_pidec_pid(model, None, d, torch.device("cpu"))
print("linear layers:", "oneDNN-packed" if packed else "BLAS", f"| {a.repeats} runs of one {a.workload} document")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=32))
total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
print(f"self CPU time per document: {total / a.repeats:.3f} s")
