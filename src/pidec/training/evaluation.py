"""The evaluations during a run and the rule that picks `best/`.

Every evaluation goes through `pidec.evaluate.evaluate` with the run's task (the JSONL task for
--eval files), so `pidec train`, `pidec eval` and `pidec compare` report the same metrics on the
same scale: percent.

`best/` is the checkpoint with the highest `best_metric` (default: the task's main metric; for
JSONL data exact match per subtask, which moves long before every subtask of an example is
right). Ties go to the task's main metric, then to the later checkpoint: a metric that has not
moved yet never keeps the first, least trained checkpoint. Every metric is higher-is-better.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api import Model
from ..data import Example
from ..errors import InputError
from ..evaluate import evaluate
from ..model import T5
from ..tasks.base import Task


def evaluate_model(
    model: T5, tokenizer, task: Task, examples: list[Example], layout: str, max_new_tokens: int, seq_instruction=None
) -> dict:
    """The task's metrics (percent) on `examples`, plus the seconds it took (`eval_s`). The
    model is left in the mode it was in."""
    was_training = model.training
    try:
        result = evaluate(
            Model(model, tokenizer),
            task,
            examples,
            layout,
            max_new_tokens=max_new_tokens,
            seq_instruction=seq_instruction,
            warmup=False,
        )
    finally:
        model.train(was_training)
    return {**result.metrics, "eval_s": round(result.speed["wall_s"], 3)}


@dataclass
class BestRule:
    """Which evaluation is best: the highest (metric, then tie_breakers...), the later on a tie."""

    metric: str
    tie_breakers: tuple[str, ...] = ()

    @classmethod
    def for_task(cls, task: Task, metric: str | None, examples: list[Example]) -> BestRule:
        """The rule for `task`, its metric checked against the names the task's score gives
        (scored once on the examples' own targets, which costs no decoding)."""
        names = [k for k, v in task.score(examples, [ex.targets for ex in examples]).items() if _number(v)]
        metric = metric or task.main_metric
        if metric not in names:
            raise InputError(f"--best-metric: {metric!r} is not a metric of task {task.name} ({', '.join(names)})")
        ties = tuple(m for m in (task.main_metric,) if m != metric and m in names)
        return cls(metric, ties)

    def describe(self) -> str:
        return " then ".join((self.metric, *self.tie_breakers, "the later step"))

    def key(self, metrics: dict) -> list[float]:
        return [float(metrics[m]) for m in (self.metric, *self.tie_breakers)]

    def better(self, metrics: dict, best: dict | None) -> bool:
        """Whether an evaluation with `metrics` replaces `best` (a later one wins a full tie)."""
        return best is None or self.key(metrics) >= list(best.get("key") or [best["value"]])

    def record(self, step: int, metrics: dict) -> dict:
        """What the trainer state keeps of the best evaluation (plain values)."""
        return {"step": step, "metric": self.metric, "value": metrics[self.metric], "key": self.key(metrics)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
