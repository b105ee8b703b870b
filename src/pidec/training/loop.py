"""Training in the pid, pie and seq layouts, with one loop.

In `pid` each document is encoded once per step and all of its subtask rows are decoded against
one cross-attention computation (`RowGroups` folds a document's rows into its query axis), so a
step over K subtasks costs one encoder pass instead of K. The loss covers target tokens only:
the decoder start and the prompt are the row's prefix and never predicted.

Determinism is the design rule that makes resume exact: every random choice of the data (epoch
order, subtask sampling, batching) is a function of (seed, epoch), so the data position is just
(epoch, batch index); model, optimizer, scheduler and RNG states are saved with it. A
checkpoint is written to a temporary folder and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the new one, never half of one.

Data parallel: with several processes (`accelerate launch`/`torchrun`) every process builds the
same batch list; an optimizer step takes `processes x grad_accum` batches, process r computes
batches r, r + processes, ...; the loss of each is divided by the step's total target tokens
(known before the step runs), and gradients are summed across processes. One process with
`grad_accum = N` therefore takes the same steps as N processes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .. import checkpoint, lora, tasks
from ..api import Model
from ..data import DataReport, Example, check, read_jsonl
from ..errors import InputError
from ..evaluate import evaluate as evaluate_task
from ..forcing import Part, collate, loss_sum, padded_tokens
from ..layouts import LAYOUTS, TRUNCATE, TrainItem, TrainTokenizer
from ..model import T5, T5Config

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
SIZES = ("tiny", "small", "base")
BYTE_TOKENIZER = "byte"
RUN_CONFIG = "run_config.json"
LOG = "log.jsonl"
STATE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as run_config.json so `--resume` needs nothing else."""

    output: str
    layout: str = "pid"
    train: str | None = None  # JSONL file
    eval: str | None = None  # JSONL file
    task: str | None = None  # a registered task instead of train/eval files
    data: str | None = None  # the task's data folder/file
    eval_split: str | None = "dev"  # with a task: the split evaluated during training (None: none)
    model: str | None = None  # checkpoint folder (or hub id) to start from
    size: str | None = None  # or from scratch: tiny | small | base (T5 v1.1 shapes)
    tokenizer: str | None = None  # tokenizer folder, or "byte" (built-in, ByT5-style)
    model_overrides: dict = field(default_factory=dict)  # T5Config fields for a from-scratch model
    steps: int | None = None
    epochs: float | None = None  # converted to steps with the first epoch's step count
    batch_tokens: int = 4096  # per process and micro-batch: padded encoder + decoder tokens
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-4
    position_lr_scale: float = 1.0  # the relative-position biases learn at lr x this (see make_optimizer)
    position_init_std: float | None = None  # from scratch: their initial std (None: T5's d_model**-0.5)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0  # 0: no clipping
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast on a GPU that has it, else fp32
    dropout: float | None = None  # overrides the model's dropout_rate
    max_input_length: int | None = None
    truncate: str | None = None  # None: a document over the limit is an error (or skipped)
    max_target_tokens: int = 64  # per subtask target, with EOS
    on_bad: str = "error"  # error | skip (skipped examples are counted and reported)
    max_subtasks: int | None = None  # sample at most this many subtasks per example per epoch
    downsample: dict = field(default_factory=dict)  # target value -> keep probability, e.g. {"none": 0.3}
    seq_instruction: str | None = None
    eval_every: int = 0  # steps; 0: only at the end (when there is an eval set)
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None  # default: the longest eval target
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    lora_r: int = 0
    lora_alpha: float | None = None
    lora_targets: list = field(default_factory=lambda: ["q", "v"])
    lora_dropout: float = 0.0
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def check(self) -> TrainConfig:
        def bad(option: str, message: str):
            raise InputError(f"--{option.replace('_', '-')}: {message}")

        if self.layout not in LAYOUTS:
            bad("layout", f"{self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if (self.model is None) == (self.size is None):
            bad("model", "give a checkpoint (--model DIR) or a size to train from scratch (--size), not both")
        if self.size is not None and self.size not in SIZES:
            bad("size", f"{self.size!r} is not one of {', '.join(SIZES)}")
        if self.size is not None and self.tokenizer is None:
            bad("tokenizer", "training from scratch needs a tokenizer folder or 'byte' (the built-in one)")
        if (self.train is None) == (self.task is None):
            bad("train", "give a training file (--train) or a task (--task), not both")
        if self.steps is None and self.epochs is None:
            bad("steps", "give --steps or --epochs")
        for name in ("steps", "batch_tokens", "grad_accum", "keep_checkpoints", "log_every", "max_target_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(name, f"must be an integer >= 1, got {v!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "lora_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(name, f"must be an integer >= 0, got {v!r}")
        if self.epochs is not None and not self.epochs > 0:
            bad("epochs", f"must be > 0, got {self.epochs}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not self.position_lr_scale > 0:
            bad("position_lr_scale", f"must be > 0, got {self.position_lr_scale}")
        if self.position_init_std is not None and not self.position_init_std >= 0:
            bad("position_init_std", f"must be >= 0, got {self.position_init_std}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.truncate not in TRUNCATE:
            bad("truncate", f"{self.truncate!r}: expected left or right")
        if self.on_bad not in ("error", "skip"):
            bad("on_bad", f"{self.on_bad!r}: expected error or skip")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.max_subtasks is not None and self.max_subtasks < 1:
            bad("max_subtasks", f"must be >= 1, got {self.max_subtasks}")
        if self.layout == "seq" and (self.max_subtasks or self.downsample):
            bad(
                "downsample" if self.downsample else "max_subtasks",
                "subtask sampling applies to pid and pie; seq trains on every subtask's answer",
            )
        for value, keep in self.downsample.items():
            if not 0 <= keep <= 1:
                bad("downsample", f"keep probability for {value!r} must be in [0, 1], got {keep}")
        if self.lora_r:
            if self.lora_alpha is not None and self.lora_alpha <= 0:
                bad("lora_alpha", "must be > 0")
            if not self.lora_targets:
                bad("lora_targets", "give at least one module name, e.g. q,v")
        return self


def parse_downsample(spec: str | None) -> dict[str, float]:
    """ "none:0.3,unknown:0.5" -> {"none": 0.3, "unknown": 0.5}"""
    out: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        value, sep, keep = part.rpartition(":")
        try:
            if not sep or not value.strip():
                raise ValueError
            out[value.strip()] = float(keep)
        except ValueError:
            raise InputError(f"--downsample: {part!r} is not VALUE:KEEP_PROBABILITY (e.g. none:0.3)") from None
    return out


# -- the run folder ---------------------------------------------------------------------------


def save_run_config(cfg: TrainConfig, folder: Path) -> None:
    _write_atomic(folder / RUN_CONFIG, json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")


def load_run_config(folder: str | os.PathLike) -> TrainConfig:
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"--resume {folder}: no {RUN_CONFIG} there (not a pidec training folder)")
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in known})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place), oldest first."""
    found = []
    for p in folder.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if p.is_dir() and step.isdigit() and (p / STATE).is_file():
            found.append((int(step), p))
    return sorted(found)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an older copy is moved aside first, then removed."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _recover(folder: Path) -> None:
    """Undo what a kill in the middle of a save left: temporary folders, a moved-aside folder."""
    for p in folder.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(".old-*"):
        final = folder / p.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, final)


# -- data ------------------------------------------------------------------------------------


class TrainingDiverged(ValueError):
    """The loss or the gradients became NaN or infinite; no optimizer step was taken with them."""


def _task_seq_omit(cfg: TrainConfig) -> str | None:

    return tasks.get(cfg.task).seq_omit if cfg.task else None


def load_examples(
    cfg: TrainConfig, split: str, tokenizer, max_input_length: int = 512
) -> tuple[list[Example], DataReport | None]:
    path = cfg.train if split == "train" else cfg.eval
    if cfg.task is not None:
        task = tasks.get(cfg.task)
        if split == "train":  # fitted the task's way (QA: windows), counted, leaving room for the layout's
            from ..evaluate import input_budget  # prompt (pie) or instruction (seq), as evaluation does

            examples = task.load("train", cfg.data)
            budget = input_budget(tokenizer, max_input_length, cfg.layout, examples, cfg.seq_instruction)
            report = examples.report
            examples = [piece for group in task.fit(examples, tokenizer, budget, report) for piece in group]
            report.kept = len(examples)
        elif cfg.eval_split is None:
            return [], None
        else:  # whole examples: evaluation fits and merges them itself
            examples = task.load(cfg.eval_split, cfg.data)
        source = f"task {cfg.task} ({'train' if split == 'train' else cfg.eval_split})"
    elif path is None:
        return [], None
    else:
        examples, source = read_jsonl(path), str(path)
    if split == "eval" and cfg.eval_limit:
        examples = examples[: cfg.eval_limit]
    return check(examples, source, tokenizer, cfg.max_target_tokens, require_target=True, on_bad=cfg.on_bad)


def tokenize(examples: list[Example], coder: TrainTokenizer, report: DataReport, on_bad: str) -> list[TrainItem]:
    items = []
    for i, ex in enumerate(examples):
        try:
            item = coder.item(i, ex.document, ex.prompts, ex.targets)
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


def select_rows(item: TrainItem, cfg: TrainConfig, epoch: int) -> list[int]:
    """The rows of an item trained on this epoch: every row, or a seeded sample (down-sampling the
    dominant values first, then at most max_subtasks). Never empty."""
    rows = list(range(len(item.rows)))
    if not cfg.downsample and not cfg.max_subtasks:
        return rows
    rng = random.Random(f"{cfg.seed}/{epoch}/{item.example}")
    keep = [j for j in rows if rng.random() < cfg.downsample.get(item.values[j].strip().lower(), 1.0)]
    if not keep:
        keep = [rng.choice(rows)]
    if cfg.max_subtasks and len(keep) > cfg.max_subtasks:
        keep = sorted(rng.sample(keep, cfg.max_subtasks))
    return keep


def epoch_batches(items: list[TrainItem], cfg: TrainConfig, epoch: int) -> tuple[list[list[Part]], int]:
    """Token-budget batches for one epoch: a seeded order, sorted by length within pools of
    about 50 batches (so that a batch pads little), filled up to batch_tokens, then shuffled.
    An example that alone exceeds the budget is a batch of its own (counted, returned)."""
    rng = random.Random(f"{cfg.seed}/{epoch}/order")
    order = list(range(len(items)))
    rng.shuffle(order)
    parts = [Part.of(items, i, select_rows(items[i], cfg, epoch)) for i in order]
    mean = sum(p.enc_rows * p.enc_len + len(p.rows) * p.dec_len for p in parts) / len(parts)
    pool = max(1, int(50 * cfg.batch_tokens / max(mean, 1)))
    batches: list[list[Part]] = []
    alone = 0
    for lo in range(0, len(parts), pool):
        chunk = sorted(parts[lo : lo + pool], key=lambda p: (p.enc_len, p.dec_len))
        batch: list[Part] = []
        for p in chunk:
            if batch and padded_tokens(batch + [p]) > cfg.batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(p)
        if batch:
            batches.append(batch)
    for b in batches:
        alone += len(b) == 1 and padded_tokens(b) > cfg.batch_tokens
    rng.shuffle(batches)
    return batches, alone


# -- model, tokenizer, optimizer ------------------------------------------------------------


def build_tokenizer(cfg: TrainConfig):
    if cfg.tokenizer in (None, ""):
        return None
    if cfg.tokenizer == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    return checkpoint.load_tokenizer(cfg.tokenizer)


def scratch_config(cfg: TrainConfig, tokenizer) -> T5Config:
    vocab = -(-len(tokenizer) // 128) * 128
    fields_ = dict(
        vocab_size=vocab,
        dropout_rate=0.1 if cfg.dropout is None else cfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        max_input_length=cfg.max_input_length or 512,
    )
    fields_.update(cfg.model_overrides)
    return T5Config.from_name(cfg.size, **fields_)


def build_model(cfg: TrainConfig) -> tuple[T5, object, str | None]:
    """The starting model (before any checkpoint is restored), its tokenizer, and the folder it
    came from (None when built from scratch). Deterministic in cfg.seed."""
    if cfg.model is not None:
        folder = checkpoint.resolve(cfg.model)
        overrides = {}
        if cfg.max_input_length:
            overrides["max_input_length"] = cfg.max_input_length
        if cfg.dropout is not None:
            overrides["dropout_rate"] = cfg.dropout
        model = checkpoint.load_model(folder, dtype=torch.float32, **overrides)
        tok = build_tokenizer(cfg) or checkpoint.load_tokenizer(folder)
        return model, tok, str(folder)
    tok = build_tokenizer(cfg)
    model = T5(scratch_config(cfg, tok)).init_weights(
        torch.Generator().manual_seed(cfg.seed), position_std=cfg.position_init_std
    )
    return model, tok, None


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only) or Adafactor. The relative-position biases form a
    group of their own at lr x position_lr_scale, without decay: they are T5's only source of word
    order, a few hundred numbers that must grow to several units before attention can prefer
    near words, and at the lr that suits the matrices a small model trained from scratch stays
    close to order-blind for thousands of steps (measured on the demo's task: `pidec.demo`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    position = [p for n, p in named if "rel_bias" in n]
    params = [p for n, p in named if "rel_bias" not in n]
    if cfg.optimizer == "adafactor":
        groups = [{"params": params}, {"params": position, "lr": cfg.lr * cfg.position_lr_scale, "weight_decay": 0.0}]
        return torch.optim.Adafactor([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        {"params": position, "weight_decay": 0.0, "lr": cfg.lr * cfg.position_lr_scale},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def lr_lambda(cfg: TrainConfig, total: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        done = min(max(done, 0.0), 1.0)
        return 1.0 - done if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


# -- evaluation ------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(examples: list[Example], predictions: list[list[str]]) -> dict:
    """Exact match after lower-casing and collapsing whitespace: per subtask and per example
    (an example counts only when every subtask is right)."""
    right = total = joint = 0
    for ex, pred in zip(examples, predictions):
        hits = [normalize(p) == normalize(s.target or "") for p, s in zip(pred, ex.subtasks)]
        right += sum(hits)
        total += len(hits)
        joint += all(hits)
    return {"subtask_exact_match": right / max(total, 1), "example_exact_match": joint / max(len(examples), 1)}


def evaluate(model: T5, tokenizer, examples: list[Example], cfg: TrainConfig, batch: int = 32) -> tuple[dict, list]:
    """Generate every eval example with the engine in the run's layout and score it."""

    was_training = model.training
    runner = Model(model, tokenizer)
    if cfg.task is not None:  # the task's own evaluation: fitting, window merging, its metric
        result = evaluate_task(
            runner,
            tasks.get(cfg.task),
            examples,
            cfg.layout,
            max_new_tokens=cfg.eval_max_new_tokens,
            seq_instruction=cfg.seq_instruction,
        )
        model.train(was_training)
        return {**result.metrics, "eval_s": round(result.speed.get("wall_s", 0.0), 3)}, result.predictions
    budget = cfg.eval_max_new_tokens or max(
        len(t) + 1
        for t in tokenizer([s.target for ex in examples for s in ex.subtasks], add_special_tokens=False)["input_ids"]
    )
    predictions: list[list[str]] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(examples), batch):
            chunk = examples[lo : lo + batch]
            out = runner.run(
                [(ex.document, ex.prompts) for ex in chunk],
                budget,
                layout=cfg.layout,
                truncate=cfg.truncate,
                seq_instruction=cfg.seq_instruction,
            )
            predictions.extend(out.outputs)
    seconds = time.perf_counter() - t0
    if cfg.task is not None:
        metrics = tasks.get(cfg.task).score(examples, predictions)
    else:
        metrics = exact_match(examples, predictions)
    metrics["eval_s"] = round(seconds, 3)
    model.train(was_training)
    return metrics, predictions


def main_metric(cfg: TrainConfig) -> str:
    if cfg.task is not None:
        return tasks.get(cfg.task).main_metric
    return "example_exact_match"


# -- the loop --------------------------------------------------------------------------------


class Run:
    """One training run in one process (one of several under data parallelism)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from accelerate import PartialState

        self.cfg = cfg.check()
        want_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        self.state = PartialState(cpu=want_cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = torch.device(cfg.device) if cfg.device not in ("auto", "cpu", "cuda") else self.state.device
        self.out = Path(cfg.output)
        self.main = self.rank == 0
        self.resume = resume
        bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.precision = "bf16" if bf16 else "fp32"

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        if self.main:
            if not self.resume and self.out.exists() and (checkpoints(self.out) or (self.out / LOG).exists()):
                raise InputError(f"--output {self.out} already holds a run; pass --resume {self.out} or another folder")
            self.out.mkdir(parents=True, exist_ok=True)
            _recover(self.out)
        self._barrier()
        model, tok, base = build_model(cfg)
        self.tokenizer = tok
        if len(tok) > model.config.vocab_size:
            raise InputError(f"tokenizer has {len(tok)} tokens, the model's vocab_size is {model.config.vocab_size}")
        self.base_folder = base
        if cfg.lora_r:
            model = self._add_lora(model, base)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model = model.to(self.device).train()

        coder = TrainTokenizer(
            tok,
            cfg.layout,
            model.config.max_input_length,
            model.config.decoder_start_token_id,
            cfg.truncate,
            cfg.seq_instruction,
            _task_seq_omit(cfg),
        )
        examples, self.train_report = load_examples(cfg, "train", tok, model.config.max_input_length)
        self.items = tokenize(examples, coder, self.train_report, cfg.on_bad)
        self.eval_examples, self.eval_report = load_examples(cfg, "eval", tok)
        if self.main and not self.resume:  # only once the data has been read and checked
            save_run_config(cfg, self.out)

        first, self.over_budget = epoch_batches(self.items, cfg, 0)
        self.steps_per_epoch = math.ceil(len(first) / (self.world * cfg.grad_accum))
        self.total_steps = cfg.steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        self._epoch_cache = {0: first}

        self.optimizer = make_optimizer(cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.step, self.epoch, self.position = 0, 0, 0
        self.best: dict | None = None
        found = checkpoints(self.out) if self.resume else []
        if found:
            self._restore(found[-1][1])
        else:
            torch.manual_seed(cfg.seed + self.rank)
        if self.main:
            self._trim_log(self.step)
            self._log(
                {
                    "type": "resume" if found else "start",
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "processes": self.world,
                    "precision": self.precision,
                    "layout": cfg.layout,
                    "parameters": sum(p.numel() for p in self.model.parameters()),
                    "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                    "train_data": self.train_report.summary(),
                    "eval_data": self.eval_report.summary() if self.eval_report else None,
                    "examples_over_budget": self.over_budget,
                }
            )

    def _add_lora(self, model: T5, base: str | None) -> T5:

        cfg = self.cfg
        if base is None:  # from scratch: the frozen base must exist somewhere for export
            base_dir = self.out / "base"
            if self.main and not base_dir.exists():
                tmp = self.out / ".tmp-base"
                checkpoint.save(model, tmp, tokenizer=self.tokenizer)
                os.rename(tmp, base_dir)
            self._barrier()
            base = str(base_dir.resolve())
        self.base_folder = base
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return lora.add_lora(model, cfg.lora_r, cfg.lora_alpha, list(cfg.lora_targets), cfg.lora_dropout)

    def _barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def batches(self, epoch: int) -> list[list[Part]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.items, self.cfg, epoch)[0]}
        return self._epoch_cache[epoch]

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_model(self, folder: Path) -> None:
        if self.cfg.lora_r:
            lora.save_adapter(self.model, folder, self.base_folder)
            self.tokenizer.save_pretrained(str(folder))
        else:
            checkpoint.save(self.model, folder, tokenizer=self.tokenizer)

    def save_checkpoint(self) -> None:
        final = self.out / f"checkpoint-{self.step}"
        if final.exists():
            return
        tmp = self.out / f".tmp-checkpoint-{self.step}"
        if self.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.main:
            self._save_model(tmp)
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "best": self.best,
                "processes": self.world,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            if self.cfg.lora_r:
                state["lora"] = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
            torch.save(state, tmp / STATE)
            summary = {k: state[k] for k in ("step", "epoch", "position", "best", "processes")}
            (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._barrier()
        if self.main:
            os.rename(tmp, final)
            for _, old in checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _restore(self, folder: Path) -> None:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=False)
        if state["processes"] != self.world:
            raise InputError(
                f"{folder} was written by {state['processes']} process(es); resume with the same number "
                f"(now {self.world}) so that the data order and the loss continue exactly"
            )
        if self.cfg.lora_r:
            missing = self.model.load_state_dict(state["lora"], strict=False)
            if missing.unexpected_keys:
                raise InputError(f"{folder}: unexpected LoRA tensors {missing.unexpected_keys[:3]}")
        else:
            restored = checkpoint.load_model(
                folder,
                dtype=torch.float32,
                dropout_rate=self.model.config.dropout_rate,
                max_input_length=self.model.config.max_input_length,
            )
            self.model.load_state_dict(restored.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position, self.best = (
            state["step"],
            state["epoch"],
            state["position"],
            state["best"],
        )
        rng = folder / f"rng-{self.rank}.pt"
        _set_rng_state(torch.load(rng, weights_only=False))

    def _save_named(self, name: str, extra: dict | None = None) -> None:
        tmp = self.out / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._save_model(tmp)
        if extra is not None:
            (tmp / "metrics.json").write_text(json.dumps(extra, indent=2) + "\n")
        _replace_dir(tmp, self.out / name)

    # -- log -----------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_log(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint: those steps run again."""
        path = self.out / LOG
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        _write_atomic(path, "".join(line + "\n" for line in kept))

    # -- steps ---------------------------------------------------------------------------------

    def _next_step_batches(self) -> list[list[Part]]:
        batches = self.batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        take = batches[self.position : self.position + self.world * self.cfg.grad_accum]
        self.position += len(take)
        return take

    def train_step(self) -> dict:
        cfg = self.cfg
        step_batches = self._next_step_batches()
        collated = [collate(self.items, b, self.tokenizer.pad_token_id) for b in step_batches]
        total_targets = sum(b.target_tokens for b in collated)
        mine = collated[self.rank :: self.world]
        sums = torch.zeros(4, dtype=torch.float64)  # loss, docs, tokens, target tokens
        for batch in mine:
            batch = batch.to(self.device)
            with self.autocast:
                loss = loss_sum(self.model, batch)
            (loss / total_targets).backward()
            sums += torch.tensor([loss.item(), batch.docs, batch.tokens, batch.target_tokens], dtype=torch.float64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world > 1:
            _all_reduce_grads(params)
            sums = sums.to(self.device)
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not (math.isfinite(sums[0].item()) and math.isfinite(float(norm))):
            # stop before the step writes NaN into the weights: the last checkpoint stays usable
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: the loss or the gradient norm is not finite "
                f"(loss sum {sums[0].item()}, gradient norm {float(norm)}, precision {self.precision}); "
                "lower --lr or --position-lr-scale, or train with --precision fp32"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": sums[0].item() / max(sums[3].item(), 1),
            "lr": lr,
            "grad_norm": float(norm),
            "docs": int(sums[1]),
            "tokens": int(sums[2]),
            "target_tokens": int(sums[3]),
        }

    def run_eval(self) -> dict | None:
        if not self.eval_examples:
            return None
        if self.main:
            metrics, _ = evaluate(self.model, self.tokenizer, self.eval_examples, self.cfg)
            key = main_metric(self.cfg)
            better = self.best is None or metrics[key] > self.best["value"]
            if better:
                self.best = {"step": self.step, "metric": key, "value": metrics[key]}
                self._save_named("best", {"step": self.step, **metrics})
            self._log({"type": "eval", "step": self.step, **metrics, "best": better})
        else:
            metrics = None
        self._barrier()
        if self.world > 1:  # every process keeps the same `best` (it is saved with the state)
            box = [self.best]
            torch.distributed.broadcast_object_list(box, src=0)
            self.best = box[0]
        return metrics

    def fit(self) -> dict:
        cfg = self.cfg
        progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = None
        if self.main and progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        t_start, last_eval = time.perf_counter(), None
        window_tokens, window_t = 0, time.perf_counter()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            rec = self.train_step()
            seconds = time.perf_counter() - t0
            window_tokens += rec["tokens"]
            rec.update(
                type="train",
                step=self.step,
                epoch=self.epoch,
                seconds=round(seconds, 4),
                tokens_per_s=round(rec["tokens"] / max(seconds, 1e-9), 1),
            )
            if self.main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                self._log(rec)
            if bar is not None:
                bar.update(1)
                rate = window_tokens / max(time.perf_counter() - window_t, 1e-9)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rate:,.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                last_eval = self.run_eval()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.eval_examples:
            last_eval = self.run_eval()
        self.save_checkpoint()
        if self.main:
            self._save_named("final")
            self._log({"type": "end", "step": self.step, "seconds": round(time.perf_counter() - t_start, 3)})
        self._barrier()
        return {
            "output": str(self.out),
            "steps": self.step,
            "eval": last_eval,
            "best": self.best,
            "final": str(self.out / "final"),
        }


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or, with resume=True, continue the run in cfg.output from its latest checkpoint)."""
    run = Run(cfg, resume=resume)
    run.prepare()
    return run.fit()


def resume(folder: str | os.PathLike, **changes) -> dict:
    """Continue a run from its latest checkpoint with its saved settings."""
    cfg = load_run_config(folder)
    cfg.output = str(folder)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return train(cfg, resume=True)


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of all processes, in one flat buffer per dtype."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
