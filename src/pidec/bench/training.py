"""`pidec bench --train`: training throughput of the layouts on a workload's shape.

Each layout trains on the same drawn documents, prompts and target tokens (the engine bench's
workloads: dst is 512-token documents with 30 subtasks), one document per optimizer step, with
the trainer's own `collate` and `loss_sum`, AdamW and a backward pass: what `pidec train` does
per step, minus data loading. pid encodes each document once and decodes its K rows against one
cross-attention computation; pie encodes K rows of prompt + document; seq one row with every
answer. Layouts are timed round-robin so that machine drift hits them alike.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from ..forcing import Part, collate, loss_sum
from ..layouts import TrainItem
from .workloads import WORKLOADS, build_random_model, draw_documents

LAYOUTS = ("pid", "pie", "seq")


def items_for(layout: str, draws, rng: random.Random, eos: int = 1, start: int = 0) -> list[TrainItem]:
    out = []
    for i, d in enumerate(draws):
        targets = [[rng.randrange(100, 32000) for _ in range(n)] + [eos] for n in d.out_lens]
        if layout == "pid":
            rows = [(0, [start] + p, t) for p, t in zip(d.prompts, targets)]
            out.append(TrainItem(i, [d.document], rows, ["x"] * d.k))
        elif layout == "pie":
            enc = [p + d.document for p in d.prompts]
            out.append(TrainItem(i, enc, [(j, [start], t) for j, t in enumerate(targets)], ["x"] * d.k))
        else:  # one row: "prompt: answer; ..." ~ prompt + 1 + answer + 1 tokens per subtask
            seq = [tok for p, t in zip(d.prompts, targets) for tok in p + [10] + t[:-1] + [11]] + [eos]
            out.append(TrainItem(i, [d.document], [(0, [start], seq)], ["x"]))
    return out


def run_train_bench(
    workload: str = "dst",
    model_size: str = "base",
    layouts: list[str] | tuple[str, ...] = ("pid", "pie"),
    docs: int = 2,
    repeats: int = 1,
    seed: int = 0,
    threads: int | None = None,
    gradient_checkpointing: bool = False,
) -> dict:
    """Time one optimizer step per document for each of `layouts` on `workload` at `model_size`
    (random weights), round-robin over `repeats` passes; one row per layout."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    for name in layouts:
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}")
    if docs < 1 or repeats < 1:
        raise ValueError("--docs and --repeats must be >= 1")
    if threads:
        torch.set_num_threads(threads)
    model = build_random_model(model_size, seed).train()
    model.gradient_checkpointing = gradient_checkpointing
    draws = draw_documents(WORKLOADS[workload], docs, seed)
    items = {name: items_for(name, draws, random.Random(seed)) for name in layouts}
    batches = {name: [collate(items[name], [_whole(items[name], i)], 0) for i in range(docs)] for name in layouts}
    times = time_steps(model, batches, layouts, docs, repeats)
    return {
        "workload": workload,
        "model_size": model_size,
        "docs": docs,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "results": layout_rows(batches, times, layouts),
    }


def time_steps(model, batches: dict, layouts, docs: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each optimizer step (forward, backward, AdamW) by layout, after one untimed
    warm-up step per layout (allocator, optimizer state); the layouts interleaved."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch) -> float:
        t0 = time.perf_counter()
        loss = loss_sum(model, batch) / batch.target_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in layouts:
        step(batches[name][0])
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):
        for i in range(docs):
            for name in layouts:
                times[name].append(step(batches[name][i]))
    return times


def layout_rows(batches: dict, times: dict[str, list[float]], layouts) -> list[dict]:
    """One row per layout: seconds and documents per second, tokens per document, and the
    throughput against pie's."""
    results = []
    for name in layouts:
        per_doc = statistics.median(times[name])
        b = batches[name]
        results.append(
            {
                "layout": name,
                "s_per_doc": per_doc,
                "docs_per_s": 1.0 / per_doc,
                "target_tokens_per_doc": sum(x.target_tokens for x in b) / len(b),
                "encoder_tokens_per_doc": sum(int(x.attention_mask.sum()) for x in b) / len(b),
            }
        )
    pie = next((r["docs_per_s"] for r in results if r["layout"] == "pie"), None)
    for r in results:
        r["vs_pie"] = r["docs_per_s"] / pie if pie else None
    return results


def _whole(items: list[TrainItem], i: int):

    return Part.of(items, i, list(range(len(items[i].rows))))


def format_train_table(r: dict) -> str:
    lines = [
        (
            f"training throughput, {r['workload']} shape, {r['model_size']} (random weights), one document per step, "
            f"median of {r['docs'] * r['repeats']} steps, {r['threads']} threads"
        ),
        f"{'layout':<7} {'s/doc':>8} {'docs/s':>8} {'enc tok/doc':>12} {'target tok/doc':>15} {'vs pie':>7}",
    ]
    for x in r["results"]:
        vs = f"{x['vs_pie']:.2f}x" if x["vs_pie"] else "-"
        lines.append(
            f"{x['layout']:<7} {x['s_per_doc']:>8.3f} {x['docs_per_s']:>8.3f} "
            f"{x['encoder_tokens_per_doc']:>12.0f} {x['target_tokens_per_doc']:>15.0f} {vs:>7}"
        )
    return "\n".join(lines)
