"""`pidec.evaluate`: speed is timed after a warm-up batch (or says it includes one-time costs),
and the metrics of every path are on one scale, percent; the trainer's choice of best/."""

from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer

from pidec import tasks
from pidec.api import Model
from pidec.data import Example, Subtask
from pidec.errors import InputError
from pidec.evaluate import evaluate
from pidec.model import T5, T5Config
from pidec.training.evaluation import BestRule

TASK = tasks.get("jsonl")


def tiny_model() -> Model:
    cfg = T5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )  # fmt: skip
    return Model(T5(cfg).init_weights(torch.Generator().manual_seed(0)), ByT5Tokenizer())


EXAMPLES = [
    Example(f"e{i}", f"a {c} car in {t}", [Subtask("color", c), Subtask("city", t)])
    for i, (c, t) in enumerate([("red", "rome"), ("blue", "oslo"), ("green", "lima")])
]


class Counting:
    """A model whose generate_batch calls are counted."""

    def __init__(self, model: Model):
        self.model, self.calls = model, 0
        self.tokenizer, self.config = model.tokenizer, model.config

    def generate_batch(self, *args, **kwargs):
        self.calls += 1
        return self.model.generate_batch(*args, **kwargs)


def test_speed_is_timed_after_a_warm_up_batch():
    model = Counting(tiny_model())
    result = evaluate(model, TASK, EXAMPLES, "pid", max_new_tokens=3, batch_size=2)
    assert model.calls == 3  # the warm-up batch, then the two timed ones
    assert result.speed["warmup_s"] > 0 and result.speed["includes_one_time_costs"] is False
    cold = Counting(tiny_model())
    result_cold = evaluate(cold, TASK, EXAMPLES, "pid", max_new_tokens=3, batch_size=2, warmup=False)
    assert cold.calls == 2 and result_cold.speed["warmup_s"] is None
    assert result_cold.speed["includes_one_time_costs"] is True
    assert result_cold.predictions == result.predictions  # the warm-up changes nothing else


def test_metrics_are_percent():
    result = evaluate(tiny_model(), TASK, EXAMPLES, "pid", max_new_tokens=3)
    perfect = TASK.score(EXAMPLES, [ex.targets for ex in EXAMPLES])
    assert perfect["exact_match"] == 100.0 and perfect["example_exact_match"] == 100.0
    assert 0 <= result.metrics["exact_match"] <= 100


def test_best_rule_defaults_to_the_subtask_metric_and_ties_go_to_the_later_step():
    """The issue's run: example exact match stays 0 while exact match per subtask rises; best/
    must follow the subtask metric, and a full tie must not keep the earliest checkpoint."""
    rule = BestRule.for_task(TASK, None, EXAMPLES)
    assert rule.metric == "exact_match" and "later step" in rule.describe()
    best = None
    for step, subtask in ((100, 10.0), (200, 30.0), (300, 48.3), (400, 48.3)):
        metrics = {"exact_match": subtask, "example_exact_match": 0.0}
        if rule.better(metrics, best):
            best = rule.record(step, metrics)
    assert best["step"] == 400 and best["metric"] == "exact_match" and best["value"] == 48.3
    by_example = BestRule.for_task(TASK, "example_exact_match", EXAMPLES)
    assert by_example.tie_breakers == ("exact_match",)  # then the main metric separates them
    best = None
    for step, subtask in ((100, 10.0), (200, 48.3), (300, 30.0)):
        metrics = {"exact_match": subtask, "example_exact_match": 0.0}
        if by_example.better(metrics, best):
            best = by_example.record(step, metrics)
    assert best["step"] == 200


def test_an_unknown_best_metric_is_refused_naming_the_task_metrics():
    with pytest.raises(InputError, match=r"--best-metric: 'f1' is not a metric of task jsonl \(exact_match, "):
        BestRule.for_task(TASK, "f1", EXAMPLES)
