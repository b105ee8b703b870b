"""pidec-pid's time per phase against each phase's roofline floor, on a bench workload:
encode, cross K/V projection, prefill, decoding steps (`pidec.bench.roofline.phase_work`).

    PYTHONPATH=src python scripts/phase_times.py [--size base] [--workload dst] [--docs 2]
        [--repeats 3] [--dtype float32] [--quantize int8] [--threads N] [--no-pack]

The model is `pidec bench`'s (random seeded weights of a preset size, prepared for inference as
`pidec.load` prepares it: packed float32, or int8 with --quantize). Each document is decoded as
`pidec bench`'s pidec-pid decodes it (fixed output lengths, compaction), with a clock around
each phase: `T5.encode`, `T5.cross_cache`, `generate.prefill`, `generate.decode_n_tokens`. The
floor of each phase is its FLOPs at the GEMM ceiling or its bytes at the measured bandwidth,
whichever is longer (`bench.ceiling`, measured before and after, best kept). Prints the median
per phase over docs x repeats, the floor and the floor's share of the time."""

import argparse
import statistics
import time

import torch

from pidec import cpu
from pidec.bench import harness, roofline
from pidec.bench.ceiling import best_bandwidth, best_ceiling, measure_bandwidth, measure_ceiling
from pidec.bench.workloads import WORKLOADS, build_random_model, draw_documents
from pidec.generate import DecodeStats, Row, decode_n_tokens, prefill, special_ids
from pidec.inference import prepare_for_inference
from pidec.rows import document_order
from pidec.search import new_search


def timed_phases(model, d) -> dict:
    start = model.config.decoder_start_token_id
    rows = [Row(0, [start] + p, n) for p, n in zip(d.prompts, d.out_lens)]
    rows = [rows[i] for i in document_order(rows)]
    ids = torch.tensor([d.document])
    keep = torch.ones_like(ids, dtype=torch.bool)
    t = {}
    t0 = time.perf_counter()
    enc = model.encode(ids, keep)
    t["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cross = model.cross_cache(enc, keep)
    t["cross_kv"] = time.perf_counter() - t0
    eos, pad = special_ids(model, None, None)
    t0 = time.perf_counter()
    batch = prefill(model, cross, rows, pad)
    t["prefill"] = time.perf_counter() - t0
    search = new_search([r.max_new_tokens for r in rows], 1, eos, pad, model.device)
    t0 = time.perf_counter()
    decode_n_tokens(batch, search, DecodeStats(), None)
    t["decode"] = time.perf_counter() - t0
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="base")
    p.add_argument("--workload", default="dst")
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    p.add_argument("--quantize", default=None, choices=[None, "int8"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-pack", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = cpu.auto_dtype("cpu") if a.dtype == "auto" else getattr(torch, a.dtype)
    f = cpu.features()
    print(f"# {f.model}, {f.cores} cores; {f.instruction_sets()}; torch threads {torch.get_num_threads()}")
    model = build_random_model(a.size, 0).to(dtype)
    prepare_for_inference(model, a.quantize, pack_weights=False if a.no_pack else None)
    cfg = model.config
    draws = draw_documents(WORKLOADS[a.workload], a.docs, 0, cfg.vocab_size)
    int8 = a.quantize == "int8"
    name = "pidec-pid-int8" if int8 else "pidec-pid"
    shape = (len(draws[0].document), cfg.d_model, cfg.d_ff)
    (k, n), decode_rows = harness.bandwidth_shape(cfg), sorted({1, draws[0].k})

    def limits():
        ceil = measure_ceiling(*shape, "cpu", dtype)
        bw = measure_bandwidth(k, n, decode_rows, dtype, int8=int8)
        return ceil, bw

    ceil, bw = limits()
    times = {ph: [] for ph in roofline.PHASES}
    with torch.inference_mode():
        timed_phases(model, draws[0])  # warm-up
        for _ in range(a.repeats):
            for d in draws:
                for ph, s in timed_phases(model, d).items():
                    times[ph].append(s)
    ceil2, bw2 = limits()
    ceil, bw = best_ceiling(ceil, ceil2), best_bandwidth(bw, bw2)
    rate = (ceil["int8_gops"] if int8 else ceil["float_gflops"]) * 1e9
    floors = [
        roofline.floor(harness.phase_work(name, cfg, d, dtype.itemsize), rate, bw["best_gbps"] * 1e9) for d in draws
    ]
    print(
        f"# {a.size} {a.workload}, {name}, {str(dtype).removeprefix('torch.')}, docs {a.docs} x repeats {a.repeats}; "
        f"ceiling {rate / 1e9:.1f} G(FL)OP/s at {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}, "
        f"bandwidth {bw['best_gbps']:.1f} GB/s ({bw['kernel']}, rows {decode_rows})"
    )
    print(f"{'phase':<10} {'time_s':>9} {'floor_s':>9} {'%floor':>7} {'bound':>8} {'GFLOP':>8} {'GB read':>8}")
    total_t = total_f = 0.0
    for ph in roofline.PHASES:
        t = statistics.median(times[ph])
        fl = statistics.mean(f[ph]["floor_s"] for f in floors)
        total_t, total_f = total_t + t, total_f + fl
        gflop = statistics.mean(f[ph]["flops"] for f in floors) / 1e9
        gb = statistics.mean(f[ph]["bytes"] for f in floors) / 1e9
        print(
            f"{ph:<10} {t:>9.4f} {fl:>9.4f} {100 * fl / t:>6.1f}% {floors[0][ph]['bound']:>8} {gflop:>8.2f} {gb:>8.3f}"
        )
    print(f"{'total':<10} {total_t:>9.4f} {total_f:>9.4f} {100 * total_f / total_t:>6.1f}%")


if __name__ == "__main__":
    main()
