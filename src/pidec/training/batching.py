"""Which rows each step trains on: subtask sampling and token-budget batches.

Every choice is a function of (seed, epoch), so an epoch's batch list is rebuilt identically
after a resume and the data position is just (epoch, batch index).
"""

from __future__ import annotations

import random

from ..forcing import Part, padded_tokens
from ..layouts import UNCHANGED_ROWS, TrainItem
from .config import TrainConfig

POOL_BATCHES = 50  # examples are sorted by length within pools of about this many batches


def keep_probability(item: TrainItem, j: int, downsample: dict[str, float]) -> float:
    """Row j's keep probability: its kind's (`@unchanged`: the target repeats the value its prompt
    carries) when it is of one and the kind is given, else its target value's, else 1."""
    value = item.values[j].strip().lower()
    if UNCHANGED_ROWS in downsample and j < len(item.carried):
        carried = item.carried[j]
        if carried is not None and carried.strip().lower() == value:
            return downsample[UNCHANGED_ROWS]
    return downsample.get(value, 1.0)


def select_rows(item: TrainItem, cfg: TrainConfig, epoch: int) -> list[int]:
    """The rows of an item trained on this epoch: every row, or a seeded sample (down-sampling the
    dominant values or row kinds first, then at most max_subtasks), each kept row that has a
    noisy variant (`--carried-noise`) swapped for it with that probability. Never empty."""
    rows = list(range(item.real_rows))
    if not cfg.downsample and not cfg.max_subtasks and not (cfg.carried_noise and item.noisy):
        return rows
    rng = random.Random(f"{cfg.seed}/{epoch}/{item.example}")
    keep = [j for j in rows if rng.random() < keep_probability(item, j, cfg.downsample)]
    if not keep:
        keep = [rng.choice(rows)]
    if cfg.max_subtasks and len(keep) > cfg.max_subtasks:
        keep = sorted(rng.sample(keep, cfg.max_subtasks))
    if cfg.carried_noise and item.noisy:
        # noise on the rows kept: a row sampled down stays out whatever its prompt carries
        keep = [item.noisy[j] if j in item.noisy and rng.random() < cfg.carried_noise else j for j in keep]
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
    pool = max(1, int(POOL_BATCHES * cfg.batch_tokens / max(mean, 1)))
    batches: list[list[Part]] = []
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
    alone = sum(len(b) == 1 and padded_tokens(b) > cfg.batch_tokens for b in batches)
    rng.shuffle(batches)
    return batches, alone
