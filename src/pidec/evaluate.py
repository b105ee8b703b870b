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
The trainer calls the same function for its periodic evaluation, so every command reports the
same metrics on the same scale (percent, as the tasks score).

Speed figures are timed after a warm-up batch (decoded once, untimed) unless `warmup=False`,
which the speed dict then states (`includes_one_time_costs`).
"""

from __future__ import annotations

import json
import os
import re
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
    warmup: bool = True,
) -> Evaluation:
    """Decode `examples` with `model` (a `pidec.api.Model`) and score them with `task`.

    batch_size: documents (windows) decoded together. max_new_tokens: per subtask (default:
    the task's). warmup: decode the first batch once, untimed, before the timed pass, so that
    the speed figures leave out one-time costs (first allocations, kernel selection); its time
    is `speed["warmup_s"]`. Without it `speed["includes_one_time_costs"]` is true."""
    check_layout(layout)
    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(task, "chained", False):  # each document depends on the answers to an earlier one
        return evaluate_chained(
            model, task, examples, layout, max_new_tokens, num_beams, batch_size, seq_instruction, warmup
        )
    t0 = time.perf_counter()
    tok = model.tokenizer
    report = TaskReport(f"{task.name} fitted for {layout}", read=len(examples))
    budget = input_budget(tok, model.config.max_input_length, layout, examples, seq_instruction)
    groups = task.fit(examples, tok, budget, report)
    report.kept = sum(len(g) for g in groups)
    pieces = [(p.document, p.prompts) for g in groups for p in g]
    decode = Decoding(model, max_new_tokens or task.max_new_tokens, num_beams, layout, seq_instruction)
    warmup_s = decode.warm_up(pieces[:batch_size]) if warmup else None
    for lo in range(0, len(pieces), batch_size):
        decode.batch(pieces[lo : lo + batch_size])
    outputs = fill_omitted(decode.outputs, task, layout)
    t1 = time.perf_counter()
    predictions = _predictions(model, task, groups, outputs, layout, seq_instruction)
    rescore_s = time.perf_counter() - t1
    metrics = task.score(examples, predictions)
    speed = decode.speed(len(examples), len(pieces)) | {
        "rescore_s": round(rescore_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "warmup_s": warmup_s,
        "includes_one_time_costs": not warmup,
    }
    return Evaluation(task.name, layout, metrics, speed, list(examples), predictions, [len(g) for g in groups], report)


def _predictions(model, task: Task, groups: list[list[Example]], outputs: list, layout: str, seq_instruction):
    """One prediction per example: its piece's outputs, or its pieces' outputs merged (`merge`)."""
    predictions, at = [], 0
    for group in groups:
        answers = outputs[at : at + len(group)]
        at += len(group)
        predictions.append(
            answers[0] if len(group) == 1 else merge(model, task, group, answers, layout, seq_instruction)
        )
    return predictions


class Decoding:
    """The decoding pass of an evaluation: outputs in order, with summed timings and usage."""

    def __init__(self, model, max_new_tokens: int, num_beams: int, layout: str, seq_instruction: str | None):
        self.model, self.max_new_tokens, self.num_beams = model, max_new_tokens, num_beams
        self.layout, self.seq_instruction = layout, seq_instruction
        self.outputs: list[list[str]] = []
        self.timings = {"encode_ms": 0.0, "decode_ms": 0.0, "total_ms": 0.0}
        self.usage = {"document_tokens": 0, "prompt_tokens": 0, "output_tokens": 0}
        self.rows = 0

    def _generate(self, batch: list[tuple[str, list[str]]]):
        return self.model.generate_batch(
            batch,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            layout=self.layout,
            return_details=True,
            seq_instruction=self.seq_instruction,
        )

    def warm_up(self, batch: list[tuple[str, list[str]]]) -> float:
        """Decode `batch` once, untimed and unrecorded; returns its seconds."""
        t0 = time.perf_counter()
        self._generate(batch)
        return round(time.perf_counter() - t0, 3)

    def batch(self, batch: list[tuple[str, list[str]]]) -> None:
        result = self._generate(batch)
        self.outputs.extend(result.outputs)
        self.rows += len(batch) if self.layout == "seq" else sum(len(p) for _, p in batch)
        for k in self.timings:
            self.timings[k] += result.timings.get(k, 0.0)
        for k in self.usage:
            self.usage[k] += result.usage.get(k, 0)

    def speed(self, examples: int, documents: int) -> dict:
        gen_s = self.timings["total_ms"] / 1e3
        return {
            "examples": examples,
            "documents": documents,
            "rows": self.rows,
            "output_tokens": self.usage["output_tokens"],
            "document_tokens": self.usage["document_tokens"],
            "encode_s": round(self.timings["encode_ms"] / 1e3, 3),
            "decode_s": round(self.timings["decode_ms"] / 1e3, 3),
            "generate_s": round(gen_s, 3),
            "examples_per_s": round(examples / gen_s, 3) if gen_s else None,
            "output_tokens_per_s": round(self.usage["output_tokens"] / gen_s, 1) if gen_s else None,
        }


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
    """`{name}.metrics.json` and, beside it, `{name}.predictions.jsonl` (one example a line).
    A task's settings in `name` (`multiwoz-slot-state:last_turns=2`) are written with `_` for
    the colon and commas."""
    name = re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, predictions_path = out / f"{name}.metrics.json", out / f"{name}.predictions.jsonl"
    metrics_path.write_text(json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with predictions_path.open("w", encoding="utf-8") as f:
        for rec in result.records():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return metrics_path, predictions_path


def _chained_example(task: Task, example: Example, last: list[str] | None) -> Example:
    """`example` rewritten with its chain's last answers (`last`; None for the first of a
    chain, which is read as it is)."""
    return example if last is None else task.chain_example(example, last)


def _add_counts(total: dict, speed: dict) -> None:
    """Add a round's counts and seconds to `total` (rates, ending in _per_s, are left out)."""
    for k, v in speed.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_per_s"):
            total[k] = round(total.get(k, 0) + v, 3)


def evaluate_chained(
    model,
    task: Task,
    examples: list[Example],
    layout="pid",
    max_new_tokens=None,
    num_beams=1,
    batch_size=8,
    seq_instruction=None,
    warmup: bool = True,
) -> Evaluation:
    """`evaluate` for a task whose documents carry answers given to an earlier example (MultiWOZ
    with the previous state in the document): the examples are decoded round by round
    (`task.chain_rounds`), each example rewritten with its chain's last answers
    (`task.chain_example`, `task.chain_state`), each round scored as the task reads documents
    (`task.unchained()`), and all of them scored together at the end. The warm-up, when asked
    for, runs once, before the first round."""
    rounds, chain_of = task.chain_rounds(examples)
    one_round = task.unchained()
    current = list(examples)  # each example as it was decoded (rewritten by its chain)
    state: dict[str, list[str]] = {}
    predictions: list[list[str] | None] = [None] * len(examples)
    speed: dict = {}
    report = TaskReport(f"{task.name} chained for {layout}", read=len(examples))
    for r, members in enumerate(rounds):
        for i in members:
            current[i] = _chained_example(task, examples[i], state.get(chain_of[i]))
        batch = [current[i] for i in members]
        result = evaluate(
            model,
            one_round,
            batch,
            layout,
            max_new_tokens,
            num_beams,
            batch_size,
            seq_instruction,
            warmup=warmup and r == 0,
        )
        for i, answers in zip(members, result.predictions):
            predictions[i] = answers
            state[chain_of[i]] = task.chain_state(examples[i], answers)
        _add_counts(speed, result.speed)
        report.truncated += result.report.truncated
        report.changes.update(result.report.changes)
    report.kept = len(examples)
    gen_s = speed.get("generate_s", 0)
    speed["examples_per_s"] = round(len(examples) / gen_s, 3) if gen_s else None
    speed["rounds"] = len(rounds)
    return Evaluation(
        task.name, layout, task.score(current, predictions), speed, current, predictions, [1] * len(current), report
    )
