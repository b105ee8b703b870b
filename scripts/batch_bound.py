"""How much batching documents can gain at most, in one process: a loop of `Model.generate` (one
document at a time) against one `Model.generate_batch` over the same documents, each with the
answers' budgets and with 1 new token (the encoder, the cross K/V projection and the prompts'
prefill only, no decoding step), round-robin. The budgets are the fields file's
`max_new_tokens` (dst's answer lengths in the file `bulk_speed.py --budgets dst` writes), or
`--max-new-tokens` for a field without one.

    PYTHONPATH=src python scripts/batch_bound.py --model bs64/model-base \
        --corpus bs64/corpus-64-512.jsonl --fields bs64/fields-30-dst.json [--docs 8] [--quantize int8]

The files are those `scripts/bulk_speed.py` builds. Both sides keep freed blocks
(`pidec.allocator.keep_freed_blocks`, as `pidec run` does). The bound: a batch whose decoding
steps cost nothing would take the batch's time at 1 new token; the loop's time with the
budgets over that is the most any batching of these documents could gain.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True, help="JSONL with a document field")
    p.add_argument("--fields", required=True, help="the fields file (JSON list with prompts)")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=4, help="the budget of a field without one")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quantize", choices=["int8"], default=None)
    a = p.parse_args()

    import pidec
    from pidec import allocator

    with open(a.fields) as f:
        fields = json.load(f)
    prompts = [field["prompt"] for field in fields]
    budgets = [field.get("max_new_tokens") or a.max_new_tokens for field in fields]
    full = "budgets" if any("max_new_tokens" in field for field in fields) else f"{a.max_new_tokens} new"
    docs = []
    with open(a.corpus) as f:
        for line in f:
            if len(docs) == a.docs:
                break
            docs.append(json.loads(line)["document"])
    model = pidec.load(a.model, quantize=a.quantize)
    allocator.keep_freed_blocks()
    batch = [(d, prompts) for d in docs]

    def loop(n) -> None:
        for d in docs:
            model.generate(d, prompts, max_new_tokens=n, truncate="right")

    def batched(n) -> None:
        model.generate_batch(batch, max_new_tokens=n if isinstance(n, int) else [n] * len(batch), truncate="right")

    batched(budgets)  # warm-up
    runs = {
        f"loop, {full}": lambda: loop(budgets),
        f"batch, {full}": lambda: batched(budgets),
        "loop, 1 new": lambda: loop(1),
        "batch, 1 new": lambda: batched(1),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(round(time.perf_counter() - t, 2))
    best = {k: min(v) for k, v in times.items()}
    loop_full, batch_full = best[f"loop, {full}"], best[f"batch, {full}"]
    result = {
        "docs": len(docs),
        "quantize": a.quantize,
        "budgets": budgets,
        "seconds": times,
        "batch / loop (best against best)": round(loop_full / batch_full, 3),
        "bound: loop / batch without steps": round(loop_full / best["batch, 1 new"], 3),
        "steps of the loop (s)": round(loop_full - best["loop, 1 new"], 2),
        "steps of the batch (s)": round(batch_full - best["batch, 1 new"], 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
