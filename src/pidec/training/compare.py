"""`pidec compare`: train one model per layout (seq, pie, pid) on the same budget and compare them.

Each layout gets the same model (size, tokenizer, seed: the same initial weights), the same
optimizer and schedule, the same number of optimizer steps and the same token budget per step
(padded encoder + decoder tokens), so the same training compute. What differs is what a budget
buys: a pie step spends its tokens on K copies of the document, a pid step on one copy and K
short decoder rows, so within one budget pid sees more documents. `--downsample` and `--max-subtasks` sample the
subtask rows of pid and pie; seq, which has one target per document, trains without them (a
task's seq target can leave out its default answer instead: `Task.seq_omit`).

Per layout it reports, from the run's own log (every step is logged) and from `pidec.evaluate`
on the evaluation split:

- the task's metrics (its main metric first);
- training: seconds in optimizer steps (evaluation and checkpointing excluded), documents and
  target tokens seen, documents per second;
- inference: generation seconds per document (the evaluation's `generate_s`, one batch of
  `eval_batch_size` documents at a time), documents per second.

and the pid/pie ratios of both throughputs. With `--curve-every N` each run is also evaluated
every N steps as it trains (by the trainer's own evaluation, on `--curve-split`, its first
`--curve-limit` examples), and each layout's learning curve (the main metric against steps,
seconds of training and documents seen) is read back from its log. `results.json` and
`results.md` are written in the output folder; each layout's run folder (`<output>/<layout>/`) holds its checkpoints, its log and
its evaluation's metrics and predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import api, tasks
from ..errors import InputError
from ..evaluate import evaluate, write
from ..layouts import LAYOUTS
from ..settings import setting
from .config import SHAPE_FIELDS, TrainConfig
from .loop import train

# The TrainConfig settings `pidec compare` takes (the same defaults as `pidec train`, except
# COMPARE_DEFAULTS), and the ones it requires.
COMPARE_TRAIN_FIELDS = (
    "output", "task", "data", "model", "size", "tokenizer", *SHAPE_FIELDS, "tie_embeddings", "dropout",
    "position_init_std", "precision", "device", "steps", "batch_tokens", "optimizer", "lr", "position_lr_scale",
    "warmup_steps", "schedule", "max_grad_norm", "label_smoothing", "seed", "max_input_length",
    "max_target_tokens", "on_bad", "max_subtasks", "downsample", "carried_noise", "progress", "progress_every",
)  # fmt: skip
COMPARE_DEFAULTS = {"on_bad": "skip"}
COMPARE_HELP = {
    "output": "parent folder: one run folder per layout, results.json and results.md",
    "task": "a registered task (`pidec tasks`): its splits are trained and evaluated",
}
COMPARE_REQUIRED = ("output", "task", "steps")


@dataclass
class CompareSettings:
    """What `pidec compare` adds to the training settings: the layouts and their evaluation."""

    layouts: str = setting("seq,pie,pid", help="comma-separated layouts, trained in this order", panel="Data")
    eval_split: str = setting("test", help="the task's split every final model is evaluated on", panel="Evaluation")
    eval_limit: int | None = setting(None, help="evaluate on the first N examples", panel="Evaluation")
    eval_batch_size: int = setting(8, help="documents decoded together", panel="Evaluation")
    max_new_tokens: int | None = setting(None, help="tokens per subtask (default: the task's)", panel="Evaluation")
    curve_every: int = setting(
        0, help="learning curves: evaluate each run every N steps (0: the final model only)", panel="Evaluation"
    )
    curve_split: str | None = setting(
        None, help="the split the learning curves are evaluated on (default: --eval-split)", panel="Evaluation"
    )
    curve_limit: int | None = setting(
        None, help="learning curves: the first N examples of the split", panel="Evaluation"
    )


def parse_layouts(value: str | list[str]) -> list[str]:
    layouts = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not layouts or any(not v for v in layouts):
        raise InputError(f"--layouts: give a comma-separated list from {', '.join(LAYOUTS)}, got {value!r}")
    bad = [v for v in layouts if v not in LAYOUTS]
    if bad:
        raise InputError(f"--layouts: unknown layout {bad[0]!r}; expected names from {', '.join(LAYOUTS)}")
    if len(set(layouts)) != len(layouts):
        raise InputError(f"--layouts: {value!r} names a layout twice")
    return layouts


def training_totals(log_path: Path) -> dict:
    """Sums over the logged training steps (the run must log every step)."""
    steps = docs = tokens = target_tokens = 0
    seconds = 0.0
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") != "train":
                continue
            steps += 1
            docs += rec["docs"]
            tokens += rec["tokens"]
            target_tokens += rec["target_tokens"]
            seconds += rec["seconds"]
    return {
        "logged_steps": steps,
        "docs": docs,
        "tokens": tokens,
        "target_tokens": target_tokens,
        "train_s": round(seconds, 2),
        "train_docs_per_s": round(docs / seconds, 3) if seconds else None,
    }


def learning_curve(log_path: Path, metric: str) -> list[dict]:
    """The run's evaluations in step order, each with the seconds of training (optimizer steps
    only) that led to it and the documents seen so far."""
    curve, seconds, docs = [], 0.0, 0
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") == "train":
                seconds += rec["seconds"]
                docs += rec["docs"]
            elif rec.get("type") == "eval":
                point = {"step": rec["step"], "train_s": round(seconds, 1), "docs": docs, "main": rec.get(metric)}
                point.update({k: v for k, v in rec.items() if k not in ("type", "step", "best", "best_metric")})
                curve.append(point)
    return curve


def run_comparison(
    base: TrainConfig,
    layouts: list[str],
    eval_split: str = "test",
    eval_limit: int | None = None,
    eval_batch_size: int = 8,
    max_new_tokens: int | None = None,
    curve_every: int = 0,
    curve_split: str | None = None,
    curve_limit: int | None = None,
) -> dict:
    """Train `base` once per layout (base.output is the parent folder) and evaluate each final
    model on `eval_split` of base.task; with `curve_every`, each run is evaluated every that many
    steps on `curve_split` (default `eval_split`, its first `curve_limit` examples) as it trains.
    Returns the results (also written to results.json/md)."""

    if base.task is None:
        raise InputError("compare needs --task (the task's own splits are trained and evaluated)")
    base = base.check().resolved()
    task = tasks.get(base.task)
    eval_split = task.check_split(eval_split)
    if curve_every < 0:
        raise InputError(f"--curve-every: give a number of steps (0: no curve), got {curve_every}")
    if curve_every and curve_every >= base.steps:
        raise InputError(f"--curve-every {curve_every}: the runs have only {base.steps} steps; give fewer")
    curve_split = task.check_split(curve_split or eval_split)
    out = Path(base.output)
    out.mkdir(parents=True, exist_ok=True)
    examples = task.load(eval_split, base.data, limit=eval_limit)
    results = {"task": task.name, "main_metric": task.main_metric, "eval_split": eval_split, "layouts": {}}
    results["config"] = {k: v for k, v in base.to_dict().items() if k not in ("output", "layout", "progress")}
    if curve_every:
        results["curve"] = {"every": curve_every, "split": curve_split, "limit": curve_limit}
    for layout in layouts:
        cfg = replace(base, output=str(out / layout), layout=layout, log_every=1, eval=None, eval_split=None)
        if curve_every:
            cfg = replace(
                cfg,
                eval_split=curve_split,
                eval_every=curve_every,
                eval_limit=curve_limit,
                eval_max_new_tokens=max_new_tokens,
            )
        if layout == "seq":  # subtask sampling is for pid and pie rows; seq trains on the whole target
            cfg = replace(cfg, downsample={}, max_subtasks=None)
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
        totals = training_totals(out / layout / "log.jsonl")
        model = api.load(out / layout / "final")
        ev = evaluate(model, task, examples, layout, max_new_tokens=max_new_tokens, batch_size=eval_batch_size)
        write(ev, out / layout, f"{task.name}-{eval_split}-{layout}")
        gen_s = ev.speed["generate_s"]
        results["layouts"][layout] = {
            "metrics": ev.metrics,
            "main": ev.metrics.get(task.main_metric),
            **totals,
            "run_wall_s": round(wall, 1),
            "eval_examples": ev.speed["examples"],
            "eval_documents": ev.speed["documents"],
            "infer_s_per_doc": round(gen_s / ev.speed["examples"], 4),
            "infer_docs_per_s": ev.speed["examples_per_s"],
        }
        if curve_every:
            results["layouts"][layout]["curve"] = learning_curve(out / layout / "log.jsonl", task.main_metric)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    got = results["layouts"]
    if "pid" in got and "pie" in got:
        pid, pie = got["pid"], got["pie"]
        results["pid_vs_pie"] = {
            "main_metric_diff": _diff(pid["main"], pie["main"]),
            "train_throughput_x": _ratio(pid["train_docs_per_s"], pie["train_docs_per_s"]),
            "inference_throughput_x": _ratio(pid["infer_docs_per_s"], pie["infer_docs_per_s"]),
        }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(format_results(results) + "\n")
    return results


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def _diff(a, b):
    return round(a - b, 2) if a is not None and b is not None else None


def format_results(r: dict) -> str:
    m = r["main_metric"]
    lines = [
        f"{r['task']} ({r['eval_split']} split), main metric {m}",
        "",
        f"| layout | {m} | train s | docs trained | train docs/s | infer s/doc | infer docs/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, x in r["layouts"].items():
        main = "n/a" if x["main"] is None else f"{x['main']:.2f}"
        lines.append(
            f"| {layout} | {main} | {x['train_s']:.0f} | {x['docs']} | {x['train_docs_per_s']:.2f} | "
            f"{x['infer_s_per_doc']:.3f} | {x['infer_docs_per_s']:.2f} |"
        )
    v = r.get("pid_vs_pie")
    if v:
        lines += [
            "",
            (
                f"pid - pie on {m}: {v['main_metric_diff']:+.2f} points; pid/pie training throughput "
                f"{v['train_throughput_x']}x, inference throughput {v['inference_throughput_x']}x"
            ),
        ]
    if r.get("curve"):
        c = r["curve"]
        where = f"{c['split']} split" + (f", first {c['limit']} examples" if c["limit"] else "")
        lines += ["", f"Learning curves ({m} on the {where}; training seconds in optimizer steps):", ""]
        lines += ["| layout | step | train s | docs trained | " + m + " |", "|---|---:|---:|---:|---:|"]
        for layout, x in r["layouts"].items():
            for p in x.get("curve", []):
                main = "n/a" if p["main"] is None else f"{p['main']:.2f}"
                lines.append(f"| {layout} | {p['step']} | {p['train_s']:.0f} | {p['docs']} | {main} |")
    return "\n".join(lines)
