"""The starting point of a run: its tokenizer, its model (from a checkpoint or from scratch),
the optimizer and the learning-rate schedule. Deterministic in the config's seed.
"""

from __future__ import annotations

import math

import torch

from .. import checkpoint
from ..errors import InputError
from ..model import T5, T5Config
from .config import BYTE_TOKENIZER, SHAPE_FIELDS, TrainConfig


def build_tokenizer(cfg: TrainConfig):
    """The tokenizer --tokenizer names (None when it names none)."""
    if cfg.tokenizer in (None, ""):
        return None
    if cfg.tokenizer == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    return checkpoint.load_tokenizer(cfg.tokenizer)


def scratch_config(cfg: TrainConfig, tokenizer) -> T5Config:
    """The size's T5 v1.1 shape, changed by the shape settings, then by model_overrides."""
    fields_ = dict(
        vocab_size=-(-len(tokenizer) // 128) * 128,
        dropout_rate=0.1 if cfg.dropout is None else cfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        max_input_length=cfg.max_input_length or 512,
    )
    for name in SHAPE_FIELDS:
        if getattr(cfg, name) is not None:
            fields_[name] = getattr(cfg, name)
    if cfg.num_layers is not None:
        fields_["num_decoder_layers"] = cfg.num_layers
    if cfg.tie_embeddings:
        fields_["tie_word_embeddings"] = True  # and the decoder outputs scaled by d_model**-0.5, as T5 does
    fields_.update(cfg.model_overrides)
    return T5Config.from_name(cfg.size, **fields_)


def build_model(cfg: TrainConfig) -> tuple[T5, object, str | None]:
    """The starting model (before any checkpoint is restored), its tokenizer, and the folder it
    came from (None when built from scratch)."""
    if cfg.model is not None:
        folder = checkpoint.resolve(cfg.model)
        overrides = {}
        if cfg.max_input_length:
            overrides["max_input_length"] = cfg.max_input_length
        if cfg.dropout is not None:
            overrides["dropout_rate"] = cfg.dropout
        model = checkpoint.load_model(folder, dtype=torch.float32, **overrides)
        tok = build_tokenizer(cfg) or checkpoint.load_tokenizer(folder)
        base: str | None = str(folder)
    else:
        tok = build_tokenizer(cfg)
        model = T5(scratch_config(cfg, tok)).init_weights(
            torch.Generator().manual_seed(cfg.seed), position_std=cfg.position_init_std
        )
        base = None
    if len(tok) > model.config.vocab_size:
        raise InputError(f"tokenizer has {len(tok)} tokens, the model's vocab_size is {model.config.vocab_size}")
    return model, tok, base


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only) or Adafactor. The relative-position biases form a
    group of their own at lr x position_lr_scale, without decay: they are T5's only source of word
    order, a few hundred numbers that must grow to several units before attention can prefer
    near words, and at the lr that suits the matrices a small model trained from scratch stays
    close to order-blind for thousands of steps (measured on the demo's task: `pidec.demo`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    position = [p for n, p in named if "rel_bias" in n]
    params = [p for n, p in named if "rel_bias" not in n]
    position_lr = cfg.lr * cfg.position_lr_scale
    if cfg.optimizer == "adafactor":
        groups = [{"params": params}, {"params": position, "lr": position_lr, "weight_decay": 0.0}]
        return torch.optim.Adafactor([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        {"params": position, "weight_decay": 0.0, "lr": position_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """--warmup-steps, or 4% of the run's steps when it is not given."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 25)


def lr_lambda(cfg: TrainConfig, total: int):
    """The factor on each group's lr at a step: linear warm-up, then the schedule down to 0."""
    warmup = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        done = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
        return 1.0 - done if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    return factor
