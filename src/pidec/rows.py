"""The bookkeeping of decoder rows that both decoding engines share: T5's (`pidec.generate`) and
the decoder-only one (`pidec.causal.generate`). Token ids only; nothing here knows the model.

- `document_order` / `inverse`: rows are decoded sorted by document (the rows of a document are
  folded into one product against its cache), and results go back in the caller's order.
- `prompt_key_keep`: rows are aligned so that their prompts end together at slot P of their
  caches; the slots before a shorter prompt are masked for good.
- `pack_prompts`: every row's prompt in one packed prefill pass, each document's prompts laid
  end to end in segments of up to PACK_TOKENS tokens (no padding between rows of unequal
  lengths), kept to their own row by a block-diagonal causal mask. A segment's attention is
  segment x segment, so the cap bounds that cost; a longer prompt gets a segment of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .hostsync import to_device, upload
from .model import KVCache, PackedPrefill

PACK_TOKENS = 256  # longest packed prefill segment (its attention is segment x segment)


def document_order(rows: list) -> list[int]:
    """The caller's row indices sorted by each row's `doc` (stable: a document's rows keep their order)."""
    return sorted(range(len(rows)), key=lambda i: rows[i].doc)


def inverse(order: list[int]) -> list[int]:
    """The permutation that undoes `order`: `[x[order[i]] ...][inverse(order)[j]] == x[j]`."""
    back = [0] * len(order)
    for new, old in enumerate(order):
        back[old] = new
    return back


def prompt_key_keep(prefix_lengths: list[int], P: int, capacity: int, device) -> Tensor:
    """[R, capacity] False on the slots before each prompt: a row's prompt ends at P."""
    keep = torch.ones((len(prefix_lengths), capacity), dtype=torch.bool)
    for i, n in enumerate(prefix_lengths):
        keep[i, : P - n] = False
    return to_device(keep, device)


@dataclass
class PackedPrompts:
    """Rows' prompts packed into S segments of T tokens, for one prefill pass (`pack_prompts`).

    tokens  [S, T] the prompts end to end, `pad` after a segment's last one
    inrow   [S, T] each token's position within its own prompt (0 on padding)
    keep    [S, T, T] query q may see key k: same row, k not after q (block-diagonal causal)
    seg_doc [S] each segment's document (a segment holds the rows of one document only)
    writer  scatters each prompt token's keys and values to its row's cache slot
    ends    [R, 2] (segment, offset) of each row's last prompt token: where its logits come from
    """

    tokens: Tensor
    inrow: Tensor
    keep: Tensor
    seg_doc: Tensor
    writer: PackedPrefill
    ends: Tensor

    def last(self, hidden: Tensor) -> Tensor:
        """hidden [S, T, d] -> [R, d]: each row's hidden state at its last prompt token."""
        return hidden[self.ends[:, 0], self.ends[:, 1]]


def segments_of(prompts: list[list[int]], docs: list[int]) -> tuple[list[list[int]], list[int], list[int]]:
    """Consecutive rows of one document grouped while their prompts fit PACK_TOKENS together.
    Returns the rows of each segment, its document and its length in tokens."""
    segments: list[list[int]] = []
    seg_doc: list[int] = []
    seg_len: list[int] = []
    for i, (prompt, doc) in enumerate(zip(prompts, docs)):
        n = len(prompt)
        if segments and seg_doc[-1] == doc and seg_len[-1] + n <= PACK_TOKENS:
            segments[-1].append(i)
            seg_len[-1] += n
        else:
            segments.append([i])
            seg_doc.append(doc)
            seg_len.append(n)
    return segments, seg_doc, seg_len


def pack_prompts(prompts: list[list[int]], docs: list[int], cache: KVCache, P: int, pad: int, device) -> PackedPrompts:
    """Rows' prompts (row i: `prompts[i]`, of document `docs[i]`, rows sorted by document) packed
    for one prefill pass whose keys and values go to `cache`, each prompt ending at slot P."""
    segments, seg_doc, seg_len = segments_of(prompts, docs)
    S, T = len(segments), max(seg_len)
    tokens = torch.full((S, T), pad, dtype=torch.long)
    owner = torch.full((S, T), -1, dtype=torch.long)  # row of each packed token, -1 on padding
    inrow = torch.zeros((S, T), dtype=torch.long)
    seg, tok, row, slot, last = [], [], [], [], []
    for s, members in enumerate(segments):
        t = 0
        for i in members:
            n = len(prompts[i])
            tokens[s, t : t + n] = torch.tensor(prompts[i], dtype=torch.long)
            owner[s, t : t + n] = i
            inrow[s, t : t + n] = torch.arange(n)
            seg += [s] * n
            tok += range(t, t + n)
            row += [i] * n
            slot += range(P - n, P)
            last.append((s, t + n - 1))
            t += n
    tokens, owner, inrow = (to_device(t, device) for t in (tokens, owner, inrow))
    keep = (owner[:, :, None] == owner[:, None, :]) & (inrow[:, None, :] <= inrow[:, :, None])  # [S, q, k]

    def index(values) -> Tensor:
        return upload(values, torch.long, device)

    writer = PackedPrefill(cache, index(seg), index(tok), index(row), index(slot), P)
    return PackedPrompts(tokens, inrow, keep, index(seg_doc), writer, index(last))
