"""The examples of a run: read from JSONL files or from a task, checked, and tokenized into
training rows. Evaluation examples stay whole: `pidec.evaluate` fits them to the model itself.
"""

from __future__ import annotations

from .. import tasks
from ..data import DataReport, Example, check, read_jsonl
from ..errors import InputError
from ..evaluate import input_budget
from ..layouts import TrainItem, TrainTokenizer
from ..tasks.base import Task
from .config import TrainConfig
from .pretraining import pretrain_items, read_texts, task_texts


def eval_task(cfg: TrainConfig) -> Task:
    """The task that scores the run's evaluations: --task, or the JSONL task for --eval files
    (exact match per subtask and per example, in percent, as every task reports)."""
    return tasks.get(cfg.task or "jsonl")


def seq_omit(cfg: TrainConfig) -> str | None:
    return tasks.get(cfg.task).seq_omit if cfg.task else None


def load_train_examples(cfg: TrainConfig, tokenizer, max_input_length: int) -> tuple[list[Example], DataReport]:
    """The training examples, checked. A task's are fitted its way (QA: windows), counted,
    leaving room for the layout's prompt (pie) or instruction (seq), as evaluation does."""
    if cfg.task is None:
        examples, source = read_jsonl(cfg.train), str(cfg.train)
    else:
        task = tasks.get(cfg.task)
        examples = task.load("train", cfg.data)
        budget = input_budget(tokenizer, max_input_length, cfg.layout, examples, cfg.seq_instruction)
        report = examples.report
        examples = [piece for group in task.fit(examples, tokenizer, budget, report) for piece in group]
        report.kept = len(examples)
        source = f"task {cfg.task} (train)"
    return check(examples, source, tokenizer, cfg.max_target_tokens, require_target=True, on_bad=cfg.on_bad)


def load_eval_examples(cfg: TrainConfig, tokenizer) -> tuple[list[Example], DataReport | None]:
    """The evaluation examples, whole (no eval set: an empty list)."""
    if cfg.task is not None:
        if cfg.eval_split is None:
            return [], None
        examples, source = tasks.get(cfg.task).load(cfg.eval_split, cfg.data), f"task {cfg.task} ({cfg.eval_split})"
    elif cfg.eval is None:
        return [], None
    else:
        examples, source = read_jsonl(cfg.eval), str(cfg.eval)
    if cfg.eval_limit:
        examples = examples[: cfg.eval_limit]
    return check(examples, source, tokenizer, cfg.max_target_tokens, require_target=True, on_bad=cfg.on_bad)


def tokenize(examples: list[Example], rows: TrainTokenizer, report: DataReport, on_bad: str) -> list[TrainItem]:
    """Each example as training rows; one over the input limit raises or is skipped (counted)."""
    items = []
    for i, ex in enumerate(examples):
        try:
            item = rows.item(i, ex.document, ex.prompts, ex.targets)
        except InputError as e:
            if on_bad == "error":
                raise InputError(f"{report.source}: example {ex.id!r}: {e}") from None
            report.skipped["over the input limit"] += 1
            report.kept -= 1
            continue
        report.truncated += item.truncated
        items.append(item)
    if not items:
        raise InputError(f"{report.source}: no usable examples ({report.summary()})")
    return items


def longest_target(examples: list[Example], tokenizer) -> int:
    """Tokens of the longest target, with EOS: the default decoding budget of an evaluation."""
    targets = [s.target for ex in examples for s in ex.subtasks if s.target is not None]
    return max((len(t) + 1 for t in tokenizer(targets, add_special_tokens=False)["input_ids"]), default=1)


def load_pretrain_items(
    cfg: TrainConfig, tokenizer, inputs_length: int, decoder_start: int
) -> tuple[list[TrainItem], DataReport]:
    """`pidec pretrain`'s examples: the text of --text or of the task's training documents, as
    span-corruption examples that fill an encoder of `inputs_length` tokens."""
    if cfg.text is not None:
        report = DataReport(f"--text {cfg.text}")
        texts = read_texts(cfg.text, cfg.text_field, report)
    else:
        report = DataReport(f"task {cfg.task} (train documents)")
        texts = task_texts(cfg.task, cfg.data, report)
    items = pretrain_items(
        texts, tokenizer, inputs_length, cfg.noise_density, cfg.mean_span_length, decoder_start, cfg.seed, report
    )
    return items, report
