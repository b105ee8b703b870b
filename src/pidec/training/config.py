"""`TrainConfig`: every setting of a run, declared once, with its checks.

Each field carries its command-line form in its metadata (`pidec.settings.setting`: help text,
help panel, flag, and how a string becomes the value), and `pidec.cli.options` builds the
`pidec train` and `pidec compare` options from them: a new setting is one field here. A run folder keeps the
resolved config as `run_config.json`, so `--resume` needs nothing else.

Defaults that depend on how the model starts are `None` ("auto") and filled by `resolved()`:
a model trained from scratch gets the settings the demo measured to work (`SCRATCH`, and at
tiny size `SCRATCH_SHAPE`, see `pidec.demo.run`); a model started from a checkpoint gets the
usual fine-tuning ones (`FINETUNE`). The resolved values are what run_config.json records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import InputError
from ..layouts import LAYOUTS, TRUNCATE, UNCHANGED_ROWS
from ..settings import flag_of, setting

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
SIZES = ("tiny", "small", "base")
BYTE_TOKENIZER = "byte"
SHAPE_FIELDS = ("d_model", "d_ff", "num_layers", "num_heads", "d_kv")

# From scratch: the relative-position biases start at std 1 and learn at 100x the lr (T5's
# defaults leave a small model nearly blind to word order), lr 2e-3 with a cosine schedule.
SCRATCH: dict[str, Any] = {"lr": 2e-3, "position_lr_scale": 100.0, "position_init_std": 1.0}
# ... and at tiny size 8 heads of 16 dimensions rather than 4 of 32 (measured by the demo).
SCRATCH_SHAPE: dict[str, dict[str, int]] = {"tiny": {"num_heads": 8, "d_kv": 16}}
# From a checkpoint: a pretrained model's biases already encode word order.
FINETUNE: dict[str, Any] = {"lr": 3e-4, "position_lr_scale": 1.0, "position_init_std": None}

PANELS = ("Data", "Pre-training", "Model", "Optimisation", "Evaluation", "LoRA", "Output")
OBJECTIVES = ("tasks", "span_corruption")
# what `pidec pretrain` leaves out of `pidec train`'s options: the settings of subtask examples
TASK_ONLY = (
    "layout", "train", "eval", "max_target_tokens", "max_subtasks", "downsample", "carried_noise", "seq_instruction",
    "truncate",
    "eval_split", "eval_every", "eval_limit", "eval_max_new_tokens", "best_metric", "on_bad",
)  # fmt: skip


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


def parse_names(spec: str | None) -> list[str]:
    """ "q, v" -> ["q", "v"]"""
    return [t.strip() for t in (spec or "").split(",") if t.strip()]


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as run_config.json so `--resume` needs nothing else."""

    # -- output
    output: str = setting(
        help="run folder: checkpoint-N/, best/, final/, log.jsonl", panel="Output", short="-o", required="or --resume"
    )
    # -- data
    layout: str = setting("pid", help="how an example becomes rows: pid | pie | seq", panel="Data")
    train: str | None = setting(None, help="training JSONL file", panel="Data", required="or --task")
    task: str | None = setting(
        None,
        help="a registered task (`pidec tasks`) instead of --train; settings after a colon (multiwoz-slot-state:last_turns=3)",
        panel="Data",
    )
    data: str | None = setting(None, help="the task's data folder or file", panel="Data")
    max_input_length: int | None = setting(
        None, help="encoder limit (default: the model's, 512 from scratch)", panel="Data"
    )
    truncate: str | None = setting(
        None, help="left | right: cut documents over the limit (default: refuse)", panel="Data"
    )
    max_target_tokens: int = setting(64, help="longest target accepted, with EOS", panel="Data")
    on_bad: str = setting("error", help="error | skip: what an unusable example does (skips are counted)", panel="Data")
    max_subtasks: int | None = setting(None, help="sample at most N subtasks per example per epoch", panel="Data")
    downsample: dict = setting(
        help="VALUE:KEEP, e.g. none:0.3 keeps 30% of rows whose target is none; "
        "@unchanged:0.2 keeps 20% of rows whose target repeats the value the prompt carries (`slot = value`)",
        panel="Data",
        parse=parse_downsample,
        factory=dict,
    )
    carried_noise: float = setting(
        0.0,
        help="P: a row whose prompt carries a value (`slot = value`) that its target repeats and its "
        "document mentions trains with `none` carried instead, with probability P an epoch "
        "(a model chained on its own answers learns to pick up a value it missed)",
        panel="Data",
    )
    seq_instruction: str | None = setting(None, help="seq layout: text put before the document", panel="Data")
    # -- pre-training (`pidec pretrain`: T5's span corruption on raw text)
    objective: str = setting("tasks", help="tasks | span_corruption", panel="Pre-training", cli=False)
    text: str | None = setting(
        None, help=".txt, .jsonl or .parquet file, or a folder of them", panel="Pre-training", required="or --task"
    )
    text_field: str = setting("text", help="the text field of JSONL records or Parquet rows", panel="Pre-training")
    noise_density: float = setting(0.15, help="fraction of the tokens masked", panel="Pre-training")
    mean_span_length: float = setting(3.0, help="mean length of a masked span", panel="Pre-training")
    # -- model
    model: str | None = setting(
        None, help="checkpoint folder (or hub id) to start from", panel="Model", required="or --size"
    )
    size: str | None = setting(None, help="from scratch: tiny | small | base (T5 v1.1 shapes)", panel="Model")
    tokenizer: str | None = setting(
        None, help="tokenizer folder, or 'byte' (built in); required from scratch", panel="Model"
    )
    d_model: int | None = setting(None, help="from scratch: model width (default: the size's)", panel="Model")
    d_ff: int | None = setting(None, help="from scratch: feed-forward width (default: the size's)", panel="Model")
    num_layers: int | None = setting(
        None, help="from scratch: encoder and decoder layers (default: the size's)", panel="Model"
    )
    num_heads: int | None = setting(
        None, help="from scratch: attention heads (tiny: 8, else the size's)", panel="Model"
    )
    d_kv: int | None = setting(
        None, help="from scratch: dimensions per head (tiny: 16, else the size's)", panel="Model"
    )
    tie_embeddings: bool = setting(
        False,
        help="from scratch: the output layer is the embedding matrix (T5 v1.0; a token read in the "
        "input and written in the output share one vector) instead of a layer of its own (T5 v1.1)",
        panel="Model",
    )
    model_overrides: dict = setting(
        help="T5Config fields for a from-scratch model", panel="Model", factory=dict, cli=False
    )
    dropout: float | None = setting(
        None, help="dropout rate (default: the checkpoint's; 0.1 from scratch)", panel="Model"
    )
    position_init_std: float | None = setting(
        None, help="from scratch: initial std of the relative-position biases (auto: 1)", panel="Model"
    )
    gradient_checkpointing: bool = setting(False, help="recompute activations in the backward pass", panel="Model")
    precision: str = setting(
        "auto", help="auto | fp32 | bf16 (autocast; auto: bf16 on a GPU that has it)", panel="Model"
    )
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N", panel="Model")
    # -- optimisation
    steps: int | None = setting(None, help="optimizer steps", panel="Optimisation", required="or --epochs")
    epochs: float | None = setting(None, help="or epochs (x the first epoch's steps)", panel="Optimisation")
    batch_tokens: int = setting(4096, help="padded encoder + decoder tokens per micro-batch", panel="Optimisation")
    grad_accum: int = setting(1, help="micro-batches per optimizer step (per process)", panel="Optimisation")
    optimizer: str = setting("adamw", help="adamw | adafactor", panel="Optimisation")
    lr: float | None = setting(
        None, help="learning rate (auto: 2e-3 from scratch, 3e-4 from --model)", panel="Optimisation"
    )
    position_lr_scale: float | None = setting(
        None,
        help="the relative-position biases learn at lr x this (auto: 100 from scratch, 1 from --model)",
        panel="Optimisation",
    )
    weight_decay: float = setting(0.0, help="AdamW weight decay on matrices", panel="Optimisation")
    warmup_steps: int | None = setting(None, help="linear warm-up steps (auto: 4% of the steps)", panel="Optimisation")
    schedule: str = setting("cosine", help="after warm-up: linear | cosine | constant", panel="Optimisation")
    max_grad_norm: float = setting(1.0, help="gradient clipping (0: none)", panel="Optimisation")
    label_smoothing: float = setting(
        0.0, help="share of each target token's probability spread over the vocabulary (0: none)", panel="Optimisation"
    )
    seed: int = setting(0, help="seeds the weights, the data order and the sampling", panel="Optimisation")
    # -- evaluation
    eval: str | None = setting(None, help="evaluation JSONL file", panel="Evaluation")
    eval_split: str | None = setting("dev", help="with --task: the split evaluated during training", panel="Evaluation")
    eval_every: int = setting(0, help="steps between evaluations (0: at the end only)", panel="Evaluation")
    eval_limit: int | None = setting(None, help="evaluate on the first N examples", panel="Evaluation")
    eval_max_new_tokens: int | None = setting(
        None, help="tokens per subtask when evaluating (default: the longest eval target)", panel="Evaluation"
    )
    best_metric: str | None = setting(
        None,
        help="metric that picks best/ (default: the task's main one; JSONL: exact_match per subtask)",
        panel="Evaluation",
    )
    # -- LoRA
    lora_r: int = setting(0, help="LoRA rank (0: train every weight)", panel="LoRA")
    lora_alpha: float | None = setting(None, help="LoRA scale numerator (default: the rank)", panel="LoRA")
    lora_targets: list = setting(
        help="module names, e.g. q,v or q,k,v,o,wi_0,wi_1,wo",
        panel="LoRA",
        parse=parse_names,
        shown="q,v",
        factory=lambda: ["q", "v"],
    )
    lora_dropout: float = setting(0.0, help="dropout on the LoRA input", panel="LoRA")
    # -- output (continued)
    save_every: int = setting(0, help="steps between checkpoints (0: at the end only)", panel="Output")
    keep_checkpoints: int = setting(2, help="checkpoint-N folders kept (the newest)", panel="Output")
    log_every: int = setting(1, help="steps between log.jsonl records", panel="Output")
    stop_after_step: int | None = setting(
        None,
        help="pause after step N of the --steps schedule: checkpoint-N is written, no final/; "
        "--resume DIR goes on (to the end, or to a later --stop-after-step)",
        panel="Output",
    )
    progress: bool | None = setting(
        None,
        help="progress bar (default: on a terminal; otherwise plain lines)",
        panel="Output",
        flag="--progress/--no-progress",
    )
    progress_every: float = setting(30.0, help="seconds between plain progress lines off a terminal", panel="Output")

    @property
    def from_scratch(self) -> bool:
        return self.model is None

    def resolved(self) -> TrainConfig:
        """A copy with the auto settings filled for how the model starts (see the module doc)."""
        auto = SCRATCH if self.from_scratch else FINETUNE
        changes = {k: v for k, v in auto.items() if getattr(self, k) is None}
        if self.from_scratch:
            shape = SCRATCH_SHAPE.get(self.size or "", {})
            changes |= {k: v for k, v in shape.items() if getattr(self, k) is None and k not in self.model_overrides}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def check(self) -> TrainConfig:
        """Raise InputError naming the flag of the first bad setting; return self."""
        _check_sources(self)
        _check_numbers(self)
        _check_choices(self)
        _check_sampling(self)
        return self


def _bad(name: str, message: str):
    raise InputError(f"{flag_of(TrainConfig, name).split('/')[0]}: {message}")


def _check_sources(cfg: TrainConfig) -> None:
    if cfg.model is None and cfg.size is None:
        _bad("model", "give a checkpoint to start from (--model DIR) or a size to train from scratch (--size tiny)")
    if cfg.model is not None and cfg.size is not None:
        _bad("model", "--model starts from a checkpoint and --size builds a new model: give one of them, not both")
    if cfg.size is not None and cfg.size not in SIZES:
        _bad("size", f"{cfg.size!r} is not one of {', '.join(SIZES)}")
    if cfg.size is not None and cfg.tokenizer is None:
        _bad("tokenizer", "training from scratch needs a tokenizer folder or 'byte' (the built-in one)")
    shape = [n for n in SHAPE_FIELDS if getattr(cfg, n) is not None]
    if cfg.model is not None and shape:
        _bad(shape[0], "sets the shape of a model built from scratch (--size); a checkpoint has its own")
    if cfg.model is not None and cfg.tie_embeddings:
        _bad("tie_embeddings", "sets the output layer of a model built from scratch (--size); a checkpoint has its own")
    if cfg.objective not in OBJECTIVES:
        _bad("objective", f"{cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.objective == "span_corruption":
        if (cfg.text is None) == (cfg.task is None):
            _bad("text", "give the text to pre-train on (--text FILE_OR_FOLDER) or a task's documents (--task NAME)")
        if cfg.train is not None:
            _bad("train", "pre-training reads raw text (--text), not subtask examples")
    elif cfg.text is not None:
        _bad("text", "raw text is for `pidec pretrain`; `pidec train` reads --train or --task")
    elif cfg.train is None and cfg.task is None:
        _bad("train", "give a training file (--train FILE.jsonl) or a task (--task NAME)")
    elif cfg.train is not None and cfg.task is not None:
        _bad("train", "--train reads a JSONL file and --task a task's own files: give one of them, not both")
    if cfg.steps is None and cfg.epochs is None:
        _bad("steps", "give --steps or --epochs")


def _check_numbers(cfg: TrainConfig) -> None:
    positive = (
        "steps", "batch_tokens", "grad_accum", "keep_checkpoints", "log_every", "max_target_tokens", "stop_after_step",
    )  # fmt: skip
    for name in positive + SHAPE_FIELDS:
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            _bad(name, f"must be an integer >= 1, got {v!r}")
    for name in ("eval_every", "save_every", "warmup_steps", "lora_r"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            _bad(name, f"must be an integer >= 0, got {v!r}")
    for name in ("epochs", "lr", "position_lr_scale", "progress_every"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            _bad(name, f"must be > 0, got {v}")
    if not 0 < cfg.noise_density < 1:
        _bad("noise_density", f"must be strictly between 0 and 1, got {cfg.noise_density}")
    if not cfg.mean_span_length >= 1:
        _bad("mean_span_length", f"must be >= 1, got {cfg.mean_span_length}")
    if cfg.position_init_std is not None and not cfg.position_init_std >= 0:
        _bad("position_init_std", f"must be >= 0, got {cfg.position_init_std}")
    if cfg.max_grad_norm < 0:
        _bad("max_grad_norm", "must be >= 0")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        _bad("label_smoothing", f"must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        _bad("dropout", f"must be in [0, 1), got {cfg.dropout}")
    if cfg.lora_r and cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        _bad("lora_alpha", "must be > 0")
    if cfg.lora_r and not cfg.lora_targets:
        _bad("lora_targets", "give at least one module name, e.g. q,v")


def _check_choices(cfg: TrainConfig) -> None:
    for name, allowed in (
        ("layout", LAYOUTS),
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("precision", PRECISIONS),
    ):
        if getattr(cfg, name) not in allowed:
            _bad(name, f"{getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if cfg.truncate not in TRUNCATE:
        _bad("truncate", f"{cfg.truncate!r}: expected left or right")
    if cfg.on_bad not in ("error", "skip"):
        _bad("on_bad", f"{cfg.on_bad!r}: expected error or skip")


def _check_sampling(cfg: TrainConfig) -> None:
    if cfg.max_subtasks is not None and cfg.max_subtasks < 1:
        _bad("max_subtasks", f"must be >= 1, got {cfg.max_subtasks}")
    if cfg.layout == "seq" and (cfg.max_subtasks or cfg.downsample):
        _bad(
            "downsample" if cfg.downsample else "max_subtasks",
            "subtask sampling applies to pid and pie; seq trains on every subtask's answer",
        )
    if not 0 <= cfg.carried_noise < 1:
        _bad("carried_noise", f"must be in [0, 1), got {cfg.carried_noise}")
    if cfg.layout == "seq" and cfg.carried_noise:
        _bad("carried_noise", "applies to pid and pie, whose prompts are rows of their own; seq reads no prompts")
    for value, keep in cfg.downsample.items():
        if value.startswith("@") and value != UNCHANGED_ROWS:
            _bad("downsample", f"unknown row kind {value!r}; the one row kind is {UNCHANGED_ROWS}")
        if not 0 <= keep <= 1:
            _bad("downsample", f"keep probability for {value!r} must be in [0, 1], got {keep}")
