"""Teacher forcing: training rows (`layouts.TrainItem`) as padded tensors, and the model's logits
at their labelled positions.

A `Part` is the rows of one example that go into a batch; `collate` lays parts out as one
encoder row per distinct encoder input and one decoder row per subtask (`labels` IGNORE on the
prompt and padding); `target_logits` runs the model on it and projects only the labelled
positions. Used by training, by the answer scorer (`likelihood`) and by the training bench.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layouts import TrainItem
from .model import T5, RowGroups

IGNORE = -100  # label of positions that carry no loss (cross_entropy's ignore_index)


@dataclass
class Part:
    item: int
    rows: list[int]
    enc_len: int
    enc_rows: int
    dec_len: int  # longest decoder row: prefix + target - 1 (teacher forcing input)

    @classmethod
    def of(cls, items: list[TrainItem], i: int, rows: list[int]) -> Part:
        """The part of item `i` that trains on `rows`, with the padded sizes it costs."""
        item = items[i]
        encs = {item.rows[j][0] for j in rows}
        dec = max(len(item.rows[j][1]) + len(item.rows[j][2]) - 1 for j in rows)
        return cls(i, rows, max(len(item.enc[e]) for e in encs), len(encs), dec)


def padded_tokens(parts: list[Part]) -> int:
    """What a batch costs: its padded encoder rows plus its padded decoder rows."""
    enc = sum(p.enc_rows for p in parts) * max(p.enc_len for p in parts)
    dec = sum(len(p.rows) for p in parts) * max(p.dec_len for p in parts)
    return enc + dec


@dataclass
class Batch:
    input_ids: torch.Tensor  # [docs, S]
    attention_mask: torch.Tensor  # [docs, S] bool
    decoder_input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T], IGNORE on the prefix and padding
    row_doc: torch.Tensor  # [R]
    docs: int  # examples in the batch
    target_tokens: int
    tokens: int  # real (unpadded) encoder + decoder tokens

    def to(self, device) -> Batch:
        moved = {f: getattr(self, f).to(device) for f in ("input_ids", "attention_mask", "decoder_input_ids")}
        return Batch(
            **moved,
            labels=self.labels.to(device),
            row_doc=self.row_doc.to(device),
            docs=self.docs,
            target_tokens=self.target_tokens,
            tokens=self.tokens,
        )


def collate(items: list[TrainItem], parts: list[Part], pad: int) -> Batch:
    enc: list[list[int]] = []
    dec_in, labels, row_doc = [], [], []
    for part in parts:
        item = items[part.item]
        where: dict[int, int] = {}
        for j in part.rows:
            e, prefix, target = item.rows[j]
            if e not in where:
                where[e] = len(enc)
                enc.append(item.enc[e])
            tokens = prefix + target
            dec_in.append(tokens[:-1])
            labels.append([IGNORE] * (len(prefix) - 1) + target)
            row_doc.append(where[e])
    # rows must be ordered by document (pie: one row per encoder row, already in order)
    S, T = max(map(len, enc)), max(map(len, dec_in))
    input_ids = torch.full((len(enc), S), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), S), dtype=torch.bool)
    for d, ids in enumerate(enc):
        input_ids[d, : len(ids)] = torch.tensor(ids)
        mask[d, : len(ids)] = True
    dec = torch.full((len(dec_in), T), pad, dtype=torch.long)
    lab = torch.full((len(dec_in), T), IGNORE, dtype=torch.long)
    for r, (x, y) in enumerate(zip(dec_in, labels)):
        dec[r, : len(x)] = torch.tensor(x)
        lab[r, : len(y)] = torch.tensor(y)
    n_target = int((lab != IGNORE).sum())
    return Batch(
        input_ids,
        mask,
        dec,
        lab,
        torch.tensor(row_doc),
        len(parts),
        n_target,
        sum(map(len, enc)) + sum(map(len, dec_in)),
    )


def target_logits(model: T5, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, vocab] at the labelled positions of a batch, row by row, and their labels [N].

    Right-padded decoder rows need no key mask: the causal mask already hides a row's padding
    from its real positions, and padded positions carry no label. The LM head runs on labelled
    positions only, which skips the prompt and padding positions' vocabulary projection."""
    enc = model.encode(batch.input_ids, batch.attention_mask)
    cross = model.cross_cache(enc, batch.attention_mask)
    groups = RowGroups.from_doc(batch.row_doc, batch.input_ids.shape[0])
    pos = torch.arange(batch.decoder_input_ids.shape[1], device=batch.input_ids.device)
    hidden = model.decode(batch.decoder_input_ids, cross, groups, model.self_attention_mask(pos, pos, None))
    keep = batch.labels != IGNORE
    return model.logits(hidden[keep]), batch.labels[keep]


def loss_sum(model: T5, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over the target tokens of a batch (the caller normalises); with
    `label_smoothing` e, against targets of 1 - e on the gold token plus e spread evenly over the
    vocabulary."""
    logits, labels = target_logits(model, batch)
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
