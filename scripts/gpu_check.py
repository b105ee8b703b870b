"""The decoding checks of issue 18 on a GPU, in one run (scripts/gpu_check.sh calls it).

1. correctness: greedy and beam tokens of a tiny random T5 on CUDA (float32; the per-step-read
   policy, the deferred one, with CUDA graphs) against the CPU's, as the share of rows equal;
2. host synchronisations: `pidec.hostsync.SyncCounter` per decoded document with sync_every 1
   and the CUDA default, and torch's own sync detector (`torch.cuda.set_sync_debug_mode`) over
   the same decoding, to show that no synchronisation escapes the count;
3. speed: the dst workload at `--size` in bfloat16 with `--docs` documents in flight, decoded
   with sync_every 1, the CUDA default, and the default with CUDA graphs: documents/s, decoding
   step time, peak memory (graphs' pools included).

Results go to one JSON file (--out). --dry-run does the same on the CPU with a tiny model and
a few small documents and no graphs: it checks this script, not the GPU (the CPU tests run it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from pidec.bench.workloads import WORKLOADS, build_random_model, draw_documents
from pidec.generate import CUDA_SYNC_EVERY, Row, SyncCounter, decode, encode


def rows_of(draws, limit_tokens: int | None = None) -> tuple[list[list[int]], list[Row]]:
    docs = [d.document for d in draws]
    rows = [
        Row(i, [0] + p, n if limit_tokens is None else min(n, limit_tokens))
        for i, d in enumerate(draws)
        for p, n in zip(d.prompts, d.out_lens)
    ]
    return docs, rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def correctness(device: torch.device, graphs: bool) -> dict:
    """Tiny model, float32: the CPU (per-step reads) against the device, every policy."""
    model_cpu = build_random_model("tiny", seed=1)
    draws = draw_documents(WORKLOADS["dst"], 4, seed=1, vocab_size=model_cpu.config.vocab_size, doc_tokens=64)
    docs, rows = rows_of(draws)
    out: dict = {}
    with torch.inference_mode():
        ref = {nb: decode(model_cpu, encode(model_cpu, docs), rows, num_beams=nb, sync_every=1) for nb in (1, 2)}
        model = build_random_model("tiny", seed=1).to(device)
        cross = encode(model, docs)
        policies = {"every_step": dict(sync_every=1), "deferred": dict(sync_every=CUDA_SYNC_EVERY)}
        if graphs:
            policies["deferred_graphs"] = dict(sync_every=CUDA_SYNC_EVERY, cuda_graphs=True)
        for name, kw in policies.items():
            for nb in (1, 2):
                got = decode(model, cross, rows, num_beams=nb, **kw)
                out[f"{name}_beams{nb}_rows_equal_to_cpu"] = agreement(got.tokens, ref[nb].tokens)
    out["rows"] = len(rows)
    return out


def sync_counts(device: torch.device, debug_mode: bool) -> dict:
    """SyncCounter per document, and torch's sync warnings over the same decoding (CUDA): dst
    (8 documents, short answers) and summ (2 documents, answers of 100-250 tokens), documents
    cut to 64 tokens, fixed-length answers."""
    model = build_random_model("tiny", seed=2).to(device)
    out: dict = {}
    for workload, n_docs in (("dst", 8), ("summ", 2)):
        draws = draw_documents(WORKLOADS[workload], n_docs, seed=2, vocab_size=model.config.vocab_size, doc_tokens=64)
        out[workload] = sync_counts_of(model, *rows_of(draws), debug_mode)
    return out


def sync_counts_of(model, docs, rows, debug_mode: bool) -> dict:
    out: dict = {}
    with torch.inference_mode():
        cross = encode(model, docs)
        for every in (1, CUDA_SYNC_EVERY):
            with SyncCounter() as count, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if debug_mode:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    result = decode(model, cross, rows, eos_token_id=None, sync_every=every)
                finally:
                    if debug_mode:
                        torch.cuda.set_sync_debug_mode("default")
            torch_syncs = sum("synchroniz" in str(w.message) for w in caught)
            out[f"sync_every_{every}"] = {
                "steps": result.stats.steps,
                "syncs": count.syncs,
                "syncs_per_document": count.syncs / len(docs),
                "uploads": count.uploads,
                "sites": dict(count.sites),
                "torch_sync_warnings": torch_syncs if debug_mode else None,
            }
    return out


def speed(
    device: torch.device, size: str, n_docs: int, dtype: torch.dtype, graphs: bool, repeats: int, doc_tokens=None
) -> dict:
    model = build_random_model(size, seed=0).to(device=device, dtype=dtype)
    draws = draw_documents(WORKLOADS["dst"], n_docs, seed=0, vocab_size=model.config.vocab_size, doc_tokens=doc_tokens)
    docs, rows = rows_of(draws)
    policies = {"every_step": dict(sync_every=1), "deferred": dict(sync_every=CUDA_SYNC_EVERY)}
    if graphs:
        policies["deferred_graphs"] = dict(sync_every=CUDA_SYNC_EVERY, cuda_graphs=True)
    out: dict = {"size": size, "docs": n_docs, "rows": len(rows), "dtype": str(dtype).removeprefix("torch.")}
    tokens = {}
    with torch.inference_mode():
        for name, kw in policies.items():
            decode(model, encode(model, docs[:2]), [r for r in rows if r.doc < 2], eos_token_id=None, **kw)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best = None
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                with SyncCounter() as count:
                    cross = encode(model, docs)
                    result = decode(model, cross, rows, eos_token_id=None, **kw)
                sync(device)
                wall = time.perf_counter() - t0
                if best is None or wall < best[0]:
                    best = (wall, result, count)
            wall, result, count = best
            tokens[name] = result.tokens
            out[name] = {
                "wall_s": wall,
                "docs_per_s": n_docs / wall,
                "decode_s": result.stats.decode_s,
                "steps": result.stats.steps,
                "step_ms": 1e3 * result.stats.decode_s / max(result.stats.steps, 1),
                "row_steps": result.stats.row_steps,
                "syncs_per_document": count.syncs / n_docs,
                "peak_memory_MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                "reserved_MiB": torch.cuda.memory_reserved(device) / 2**20 if device.type == "cuda" else None,
            }
    out["rows_equal_to_every_step"] = {name: agreement(t, tokens["every_step"]) for name, t in tokens.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--size", default="base", help="model size for the speed part (default base)")
    ap.add_argument("--docs", type=int, default=64, help="documents in flight for the speed part (default 64)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny and small: checks the script only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.dry_run:
        device, size, n_docs, dtype, graphs, repeats = torch.device("cpu"), "tiny", 2, torch.float32, False, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (use --dry-run on the CPU)")
        device, size, n_docs, dtype, graphs, repeats = (
            torch.device("cuda"),
            args.size,
            args.docs,
            torch.bfloat16,
            True,
            args.repeats,
        )
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "cuda_sync_every": CUDA_SYNC_EVERY,
    }
    parts = (
        ("correctness", lambda: correctness(device, graphs)),
        ("syncs", lambda: sync_counts(device, debug_mode=device.type == "cuda")),
        ("speed", lambda: speed(device, size, n_docs, dtype, graphs, repeats, 64 if args.dry_run else None)),
    )
    for name, run in parts:
        t = time.perf_counter()
        try:
            report[name] = run()
        except Exception as e:  # one part failing must not lose the others' results
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        report[name + "_s"] = round(time.perf_counter() - t, 2)
        print(f"gpu_check: {name} done in {report[name + '_s']} s", file=sys.stderr, flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    report["total_s"] = round(time.perf_counter() - t0, 2)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
