"""Evaluate a model on a task: fit the documents, decode every subtask, merge windows, score.

    model = pidec.load(folder)
    task = pidec.tasks.get("multiwoz")
    result = evaluate(model, task, task.load("dev", limit=200), layout="pid")
    result.metrics, result.speed
    write(result, out_dir, "multiwoz-dev-pid")   # metrics JSON + predictions JSONL

Pass whole examples (`task.load` without a tokenizer): documents are fitted here, to the
model's input limit less what the layout puts beside the document (pie: the prompt; seq: the
instruction), as the task documents it: cut (counted in `result.report`) or split into
windows, whose answers are merged per question by the model's own likelihood (`likelihood`).
The trainer calls the same function for its periodic evaluation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import Example
from .layouts import check_layout
from .likelihood import answer_scores
from .tasks.base import Task, TaskReport


@dataclass
class Evaluation:
    task: str
    layout: str
    metrics: dict
    speed: dict
    examples: list[Example]
    predictions: list[list[str]]  # per example, one raw answer per subtask (windows merged)
    pieces: list[int] = field(default_factory=list)  # per example, how many windows were decoded
    report: TaskReport | None = None

    def records(self) -> list[dict]:
        out = []
        for ex, pred, n in zip(self.examples, self.predictions, self.pieces):
            rec = {"id": ex.id, "predictions": pred, "targets": ex.targets, "prompts": ex.prompts}
            if n > 1:
                rec["windows"] = n
            out.append(rec)
        return out

    def summary(self) -> dict:
        return {
            "task": self.task,
            "layout": self.layout,
            "metrics": self.metrics,
            "speed": self.speed,
            "data": self.report.summary() if self.report else None,
        }


def input_budget(tokenizer, max_input_length: int, layout: str, examples: list[Example], seq_instruction=None) -> int:
    """The encoder tokens a document may use (EOS included), given what the layout adds."""
    if layout == "pie":
        prompts = sorted({p for ex in examples for p in ex.prompts})
        longest = max((len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]), default=0)
        return max_input_length - longest - 1  # "prompt document": the space may cost a token
    if layout == "seq" and seq_instruction:
        return max_input_length - len(tokenizer(seq_instruction, add_special_tokens=False)["input_ids"])
    return max_input_length


def evaluate(
    model,
    task: Task,
    examples: list[Example],
    layout: str = "pid",
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    batch_size: int = 8,
    seq_instruction: str | None = None,
) -> Evaluation:
    """Decode `examples` with `model` (a `pidec.api.Model`) and score them with `task`.

    batch_size: documents (windows) decoded together. max_new_tokens: per subtask (default:
    the task's)."""
    check_layout(layout)
    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(task, "chained", False):  # each document depends on the answers to an earlier one
        return task.evaluate_chained(model, examples, layout, max_new_tokens, num_beams, batch_size, seq_instruction)
    t0 = time.perf_counter()
    tok = model.tokenizer
    report = TaskReport(f"{task.name} fitted for {layout}", read=len(examples))
    budget = input_budget(tok, model.config.max_input_length, layout, examples, seq_instruction)
    groups = task.fit(examples, tok, budget, report)
    report.kept = sum(len(g) for g in groups)
    pieces = [(p.document, p.prompts) for g in groups for p in g]
    limit = max_new_tokens or task.max_new_tokens

    outputs: list[list[str]] = []
    totals = {"encode_ms": 0.0, "decode_ms": 0.0, "total_ms": 0.0}
    usage = {"document_tokens": 0, "prompt_tokens": 0, "output_tokens": 0}
    rows = 0
    for lo in range(0, len(pieces), batch_size):
        batch = pieces[lo : lo + batch_size]
        result = model.generate_batch(
            batch,
            max_new_tokens=limit,
            num_beams=num_beams,
            layout=layout,
            return_details=True,
            seq_instruction=seq_instruction,
        )
        outputs.extend(result.outputs)
        rows += len(batch) if layout == "seq" else sum(len(p) for _, p in batch)
        for k in totals:
            totals[k] += result.timings.get(k, 0.0)
        for k in usage:
            usage[k] += result.usage.get(k, 0)

    outputs = fill_omitted(outputs, task, layout)
    t1 = time.perf_counter()
    predictions, at = [], 0
    for ex, group in zip(examples, groups):
        answers = outputs[at : at + len(group)]
        at += len(group)
        if len(group) == 1:
            predictions.append(answers[0])
        else:
            predictions.append(merge(model, task, group, answers, layout, seq_instruction))
    rescore_s = time.perf_counter() - t1
    metrics = task.score(examples, predictions)
    wall = time.perf_counter() - t0
    gen_s = totals["total_ms"] / 1e3
    speed = {
        "examples": len(examples),
        "documents": len(pieces),
        "rows": rows,
        "output_tokens": usage["output_tokens"],
        "document_tokens": usage["document_tokens"],
        "encode_s": round(totals["encode_ms"] / 1e3, 3),
        "decode_s": round(totals["decode_ms"] / 1e3, 3),
        "generate_s": round(gen_s, 3),
        "rescore_s": round(rescore_s, 3),
        "wall_s": round(wall, 3),
        "examples_per_s": round(len(examples) / gen_s, 3) if gen_s else None,
        "output_tokens_per_s": round(usage["output_tokens"] / gen_s, 1) if gen_s else None,
    }
    return Evaluation(task.name, layout, metrics, speed, list(examples), predictions, [len(g) for g in groups], report)


def fill_omitted(outputs: list[list[str]], task: Task, layout: str) -> list[list[str]]:
    """A task whose seq targets leave out its default answer (`Task.seq_omit`, MultiWOZ's none)
    trains seq to list only the other subtasks, so a subtask its output does not name (parsed
    as "") has the default answer. Other layouts and tasks are returned as they are."""
    if layout != "seq" or task.seq_omit is None:
        return outputs
    return [[a if a.strip() else task.seq_omit for a in answers] for answers in outputs]


def merge(model, task: Task, group: list[Example], answers: list[list[str]], layout: str, seq_instruction=None):
    """Each question's answer over the windows of one document: the most likely (mean
    log-probability) among the answers that are not the task's no-answer; no-answer if none."""
    best: list[tuple[float, str] | None] = [None] * len(group[0].subtasks)
    for piece, piece_answers in zip(group, answers):
        found = [j for j, a in enumerate(piece_answers) if task.normalize(a, j)]
        if not found:
            continue
        prompts = [piece.prompts[j] for j in found]
        scores = answer_scores(
            model, piece.document, prompts, [piece_answers[j] for j in found], layout, seq_instruction
        )
        for j, s in zip(found, scores):
            if best[j] is None or s > best[j][0]:
                best[j] = (s, piece_answers[j])
    fallback = task.no_answer if task.no_answer is not None else ""
    return [fallback if b is None else b[1] for b in best]


def write(result: Evaluation, out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """`{name}.metrics.json` and, beside it, `{name}.predictions.jsonl` (one example a line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, predictions_path = out / f"{name}.metrics.json", out / f"{name}.predictions.jsonl"
    metrics_path.write_text(json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with predictions_path.open("w", encoding="utf-8") as f:
        for rec in result.records():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return metrics_path, predictions_path
