"""Decoding many rows over shared prefixes with a decoder-only model (`pidec.causal`).

Works on token ids only; `pidec.causal.layouts` turns text into rows and back. A run is

1. the documents' shared prefixes prefilled once, together (`CausalLM.prefill_prefix`): one
   key/value copy per document (`CrossCache`, lengths = prefix lengths);
2. every row's suffix (its tokens after the shared prefix: the rest of the prompt) prefilled in
   one packed pass (`pidec.rows.pack_prompts`, as T5's prompts): each document's suffixes laid
   end to end in segments of up to PACK_TOKENS tokens, kept to their own row by a
   block-diagonal causal mask, all segments of a document attending its one prefix copy; each
   token's keys go to its row's `KVCache` slot (rows are aligned so that their suffixes end
   together, the slots before a short one masked);
3. one token per row per step: tokens [R, 1] at positions prefix length + suffix length + step,
   the rows of a document folded into one product against its prefix, merged by log-sum-exp
   with attention over the row's own cache.

Rows that end (an EOS id, or their budget) leave the batch before the next step (compaction);
a document with no row left is dropped from the prefix cache once a quarter of them have gone.
The `pie` layout is the same engine with no prefix: each row prefilled whole.

Greedy picks the argmax; sampling (temperature, top-k, top-p) draws from a seeded generator,
one draw per row per step in batch order. Beam search is not implemented for these models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..generate import Aborted, Decoded, DecodeStats, drop_empty_docs, sync
from ..model import CrossCache, KVCache, RowGroups, additive_mask
from ..rows import document_order, inverse, pack_prompts, prompt_key_keep
from .model import CausalLM


@dataclass
class SuffixRow:
    """One row: its document (an index into the prefix cache, ignored without one), its tokens
    after the document's shared prefix (at least one), and how many tokens it may add."""

    doc: int
    tokens: list[int]
    max_new_tokens: int


@dataclass
class Sampling:
    """How the next token is chosen: greedy (do_sample False) or drawn, as transformers names it."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> Sampling:
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.top_k is not None and self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def truncate_prefix(prefix: CrossCache, length: int) -> CrossCache:
    """The first `length` positions of a one-document prefix cache (keys at a position depend
    only on the tokens before it, so a shorter common prefix reuses a longer one's cache)."""
    if prefix.docs != 1:
        raise ValueError("truncate_prefix takes a one-document cache")
    if length == int(prefix.lengths[0]):
        return prefix
    return CrossCache(
        [k[:, :, :length] for k in prefix.k],
        [v[:, :, :length] for v in prefix.v],
        None,
        torch.tensor([length], device=prefix.lengths.device),
    )


class RowBook:
    """Per-row bookkeeping of a greedy or sampled run, on the host: one copy of the chosen tokens
    per step (which rows ended decides the next batch), the rest in Python lists."""

    def __init__(self, limits: list[int], eos: set[int], sampling: Sampling, device):
        self.limits, self.eos, self.sampling = limits, eos, sampling
        self.tokens: list[list[int]] = [[] for _ in limits]  # per caller row, EOS included
        self.alive = list(range(len(limits)))  # caller row of each batch row
        self.generator = None
        if sampling.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    def choose(self, logits: Tensor) -> Tensor:
        s = self.sampling
        if not s.do_sample:
            return logits.argmax(-1)
        scores = logits.float() / s.temperature
        if s.top_k is not None and s.top_k < scores.shape[-1]:
            kth = torch.topk(scores, s.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p is not None and s.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = torch.softmax(sorted_scores, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, -1) >= s.top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, -1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def step(self, logits: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Pick each batch row's next token from logits [R, vocab]. Returns the tokens to feed
        [R'] (None once every row has ended) and the batch rows to keep (None: all of them)."""
        nxt = self.choose(logits)
        keep = []
        for b, (i, token) in enumerate(zip(self.alive, nxt.tolist())):
            out = self.tokens[i]
            out.append(token)
            if token not in self.eos and len(out) < self.limits[i]:
                keep.append(b)
        if not keep:
            return None, None
        if len(keep) == len(self.alive):
            return nxt, None
        index = torch.tensor(keep, device=nxt.device)
        self.alive = [self.alive[b] for b in keep]
        return nxt.index_select(0, index), index

    def results(self) -> list[list[int]]:
        """Tokens per caller row, a final EOS removed."""
        return [seq[:-1] if seq and seq[-1] in self.eos else seq for seq in self.tokens]


def prefill_suffixes(
    model: CausalLM, prefix: CrossCache | None, rows: list[SuffixRow], cache: KVCache, P: int
) -> Tensor:
    """Run every row's suffix through the model in one packed pass (`pidec.rows.pack_prompts`),
    writing its keys/values to `cache` (suffixes aligned to end at slot P); returns each row's
    next-token logits [R, vocab]. A suffix's positions continue from its document's prefix."""
    packed = pack_prompts([r.tokens for r in rows], [r.doc for r in rows], cache, P, 0, model.device)
    mask = additive_mask(packed.keep[:, None], torch.float32)  # [S, 1, T, T]
    groups = None
    pos = packed.inrow
    if prefix is not None:
        groups = RowGroups.from_doc(packed.seg_doc, prefix.docs)
        pos = packed.inrow + prefix.lengths.to(model.device)[packed.seg_doc][:, None]
    hidden = model.forward_hidden(packed.tokens, pos, mask, packed.writer, prefix, groups)
    return model.logits(packed.last(hidden))


def check_rows(rows: list[SuffixRow], prefix: CrossCache | None) -> None:
    for i, r in enumerate(rows):
        if r.max_new_tokens < 1:
            raise ValueError(f"row {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        if not r.tokens:
            raise ValueError(f"row {i}: no tokens after the shared prefix (the prefix must leave at least one)")
        if prefix is not None and not 0 <= r.doc < prefix.docs:
            raise ValueError(f"row {i}: document {r.doc} out of range ({prefix.docs} prefilled)")


@dataclass
class Batch:
    """The rows decoding now: their own caches, the slots each may see, their positions and
    documents, and the prefix cache of the documents still in the batch."""

    cache: KVCache
    key_keep: Tensor  # [R, capacity] False on the slots before a suffix shorter than the longest
    padded: bool  # whether any row has such slots (else no mask is needed)
    pos: Tensor  # [R] position of each row's next token
    doc: Tensor  # [R] each row's document in `live`
    live: CrossCache | None  # None: no shared prefix (pie)
    groups: RowGroups | None

    def select(self, keep: Tensor) -> None:
        """Keep the batch rows `keep` [R'] (compaction); a document left without rows goes."""
        self.cache.select(keep)
        self.key_keep, self.pos, self.doc = (t.index_select(0, keep) for t in (self.key_keep, self.pos, self.doc))
        if self.live is not None:
            self.live, self.doc = drop_empty_docs(self.live, self.doc)
            self.groups = RowGroups.from_doc(self.doc, self.live.docs)

    def step(self, model: CausalLM, feed: Tensor) -> Tensor:
        """One token per row, feed [R]; returns the next logits [R, vocab]."""
        mask = None
        if self.padded:
            mask = additive_mask(self.key_keep[:, None, None, : self.cache.pos + 1], torch.float32)
        hidden = model.forward_hidden(feed[:, None], self.pos[:, None], mask, self.cache, self.live, self.groups)
        self.pos = self.pos + 1
        return model.logits(hidden[:, -1])


def start_batch(model: CausalLM, prefix: CrossCache | None, rows: list[SuffixRow]) -> tuple[Batch, Tensor]:
    """Allocate the rows' caches (suffixes aligned to end together, room for the largest budget)
    and prefill their suffixes; returns the batch and each row's first logits [R, vocab]."""
    device, cfg = model.device, model.config
    P = max(len(r.tokens) for r in rows)
    capacity = P + max(r.max_new_tokens for r in rows)
    key_keep = prompt_key_keep([len(r.tokens) for r in rows], P, capacity, device)
    doc = torch.tensor([r.doc if prefix is not None else 0 for r in rows], device=device)
    pos = torch.tensor([len(r.tokens) for r in rows], device=device)
    groups = None
    if prefix is not None:
        pos = pos + prefix.lengths.to(device)[doc]
        groups = RowGroups.from_doc(doc, prefix.docs)
    cache = KVCache(cfg.num_layers, len(rows), cfg.num_kv_heads, capacity, cfg.head_dim, model.dtype, device)
    logits = prefill_suffixes(model, prefix, rows, cache, P)
    padded = any(len(r.tokens) < P for r in rows)
    return Batch(cache, key_keep, padded, pos, doc, prefix, groups), logits


@torch.inference_mode()
def decode(
    model: CausalLM,
    prefix: CrossCache | None,
    rows: list[SuffixRow],
    eos_token_ids: list[int] | None = None,
    sampling: Sampling | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Decoded:
    """Decode `rows` over `prefix` (one entry per document; None: no shared prefix, the rows
    are whole). Generation stops per row at any of `eos_token_ids` or its budget. Returns the
    generated tokens per row, in the order given, final EOS removed. `should_stop` is asked
    before every step; True ends the run with `Aborted` (the service's callers have all gone)."""
    sampling = (sampling or Sampling()).check()
    if not rows:
        return Decoded([])
    check_rows(rows, prefix)
    order = document_order(rows)  # without a prefix, `doc` is ignored: the rows stay as given
    if prefix is not None and order != list(range(len(rows))):
        result = decode(model, prefix, [rows[i] for i in order], eos_token_ids, sampling, should_stop)
        result.tokens = [result.tokens[b] for b in inverse(order)]
        return result

    sync(model.device)
    t0 = time.perf_counter()
    stats = DecodeStats(prefill_tokens=sum(len(r.tokens) for r in rows))
    if prefix is not None:
        stats.cross_cache_bytes = prefix.nbytes()
    batch, logits = start_batch(model, prefix, rows)
    stats.self_cache_bytes = batch.cache.nbytes()
    book = RowBook([r.max_new_tokens for r in rows], set(eos_token_ids or []), sampling, model.device)
    while True:
        feed, keep = book.step(logits)
        if feed is None:
            break
        if should_stop is not None and should_stop():
            raise Aborted()
        if keep is not None:
            batch.select(keep)
        logits = batch.step(model, feed)
        stats.steps += 1
        stats.row_steps += feed.numel()
    sync(model.device)
    stats.decode_s = time.perf_counter() - t0
    tokens = book.results()
    stats.output_tokens = sum(len(t) for t in tokens)
    return Decoded(tokens, None, stats)


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest common prefix of token lists, capped to leave every row at least
    one token of its own (the row's first logits come from its last token)."""
    if not rows:
        return 0
    first = rows[0]
    n = min(len(r) for r in rows) - 1
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)
