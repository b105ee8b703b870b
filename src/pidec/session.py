"""Greedy decoding that lets new documents join between steps: the engine of continuous batching.

`generate.decode` runs a fixed set of rows to the end. A service wants more: documents arrive
while others are being decoded, and a document that arrives should not wait for the whole batch
to finish. A `DecodeSession` holds the rows of many documents at once:

    admit(cross, rows) -> row ids   prefill the new rows (packed, as `decode` does) and merge them
                                    into the running batch, their documents' cache beside the rest
    step() -> finished rows         pick every row's next token, retire the rows that ended
                                    (compaction), run one decoder step for the others
    drop(row ids)                   remove rows whose caller has gone (a cancelled request)

A row sees what it would see in `decode`: T5's self-attention depends only on key - query
distances, so a row that joins late is placed to end its prompt at the session's current cache
position, with the slots before it masked out, exactly as a short prompt is placed in `decode`;
and its document's cross-attention keys are its own, padded and masked beside the others'. The
greedy tokens are therefore those of `decode` (the arithmetic is the same up to the order of
floating-point sums in batches of other shapes, as in `Model.generate_batch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .generate import Row, check_rows, drop_empty_docs, prefill, step_decode
from .model import T5, CrossCache, KVCache, RowGroups, additive_mask


def concat_cross(caches: list[CrossCache]) -> CrossCache:
    """Documents' cross-attention caches side by side: [sum docs, heads, longest S, d_kv] per layer,
    shorter documents right-padded with zeros and masked (no mask when none is padded)."""
    if not caches:
        raise ValueError("no cross-attention caches to concatenate")
    if len(caches) == 1:
        return caches[0]
    S = max(c.k[0].shape[2] for c in caches)
    docs = sum(c.docs for c in caches)
    dtype = caches[0].k[0].dtype

    def side_by_side(parts: list[Tensor]) -> Tensor:
        out = parts[0].new_zeros((docs, parts[0].shape[1], S, parts[0].shape[3]))
        lo = 0
        for t in parts:
            out[lo : lo + t.shape[0], :, : t.shape[2]] = t
            lo += t.shape[0]
        return out

    layers = range(len(caches[0].k))
    ks = [side_by_side([c.k[layer] for c in caches]) for layer in layers]
    vs = [side_by_side([c.v[layer] for c in caches]) for layer in layers]
    lengths = torch.cat([c.lengths for c in caches])
    keep = torch.arange(S, device=lengths.device)[None, :] < lengths[:, None]  # [docs, S]
    mask = None if bool(keep.all()) else additive_mask(keep[:, None, None, :], dtype)
    return CrossCache(ks, vs, mask, lengths)


class DecodeSession:
    """Greedy rows of many documents, decoded one step at a time; documents may join between
    steps and rows leave as they end. Row ids are the session's own, unique for its lifetime.

    eos_token_id=-1 means the model's; None means rows run to their max_new_tokens."""

    def __init__(self, model: T5, eos_token_id: int | None = -1, pad_token_id: int | None = None):
        cfg = model.config
        self.model = model
        self.eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        self.pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        self.steps = 0  # decoder steps run (after prefills)
        self.row_steps = 0  # sum over steps of the rows computed
        self._next_id = 0
        self._reset()

    def _reset(self) -> None:
        self.cross: CrossCache | None = None  # documents with rows (a few empty ones until dropped)
        self.cache: KVCache | None = None  # per-row self-attention cache, [rows, heads, capacity, d_kv]
        self.key_keep: Tensor | None = None  # [rows, capacity] False on the slots before a row's prompt
        self.doc: Tensor | None = None  # [rows] index into self.cross
        self.limit: Tensor | None = None  # [rows] max_new_tokens
        self.count: Tensor | None = None  # [rows] tokens chosen so far
        self.logits: Tensor | None = None  # [rows, vocab] the next token's logits
        self.groups: RowGroups | None = None
        self.ids: list[int] = []  # row id of each row, in batch order
        self.tokens: dict[int, list[int]] = {}
        self._table: Tensor | None = None  # the decoding steps' relative bias, [1, heads, 1, capacity]

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def docs(self) -> int:
        return 0 if self.cross is None else self.cross.docs

    # -- joining ----------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, cross: CrossCache, rows: list[Row]) -> list[int]:
        """Prefill `rows` (their `doc` indexes `cross`) and add them to the batch. Returns their
        row ids, in the order given. Their first token is chosen by the next `step`. If it raises,
        the rows already running are untouched."""
        if not rows:
            return []
        check_rows(rows, cross)
        model, device = self.model, self.model.device
        cfg = model.config
        order = sorted(range(len(rows)), key=lambda i: rows[i].doc)  # the decoder folds rows by document
        ordered = [rows[i] for i in order]
        G = len(ordered)
        P = max(len(r.prefix) for r in ordered)
        longest = max(r.max_new_tokens for r in ordered)
        cache = KVCache(len(model.decoder.layers), G, cfg.num_heads, P + longest, cfg.d_kv, model.dtype, device)
        logits = prefill(model, cross, ordered, cache, P, self.pad)  # [G, vocab]
        keep = torch.ones((G, P + longest), dtype=torch.bool)
        for i, r in enumerate(ordered):
            keep[i, : P - len(r.prefix)] = False
        ids = list(range(self._next_id, self._next_id + G))
        self._next_id += G
        new = {
            "cache": cache,
            "key_keep": keep.to(device),
            "doc": torch.tensor([r.doc for r in ordered], device=device),
            "limit": torch.tensor([r.max_new_tokens for r in ordered], device=device),
            "logits": logits,
        }
        self._merge(cross, new, ids)
        for rid in ids:
            self.tokens[rid] = []
        back = [0] * G
        for new_pos, old in enumerate(order):
            back[old] = new_pos
        return [ids[back[i]] for i in range(G)]

    def _merge(self, cross: CrossCache, new: dict, ids: list[int]) -> None:
        """Put the prefilled rows after the running ones. Both caches are shifted so that every
        row's next write lands at one common position p = max(running position, new prompts' end)."""
        cache: KVCache = new["cache"]
        if not self.ids:
            self.cross, self.cache, self.key_keep = cross, cache, new["key_keep"]
            self.doc, self.limit, self.logits = new["doc"], new["limit"], new["logits"]
            self.count = torch.zeros_like(self.limit)
            self.ids = list(ids)
            self.groups = RowGroups.from_doc(self.doc, self.cross.docs)
            return
        old = self.cache
        kept_cross, old_doc = self._compact_docs()
        p_old, p_new = old.pos, cache.pos
        p = max(p_old, p_new)
        remaining = int(torch.cat([self.limit - self.count, new["limit"]]).max())
        capacity = p + remaining
        R, G = old.rows, cache.rows

        def shifted(a: Tensor, b: Tensor) -> Tensor:
            out = a.new_empty((R + G, a.shape[1], capacity, a.shape[3]))
            out[:, :, :p].zero_()  # masked slots must hold numbers: 0 * NaN is NaN
            out[:R, :, p - p_old : p] = a[:, :, :p_old]
            out[R:, :, p - p_new : p] = b[:, :, :p_new]
            return out

        k = [shifted(a, b) for a, b in zip(old.k, cache.k)]
        v = [shifted(a, b) for a, b in zip(old.v, cache.v)]
        keep = torch.ones((R + G, capacity), dtype=torch.bool, device=self.key_keep.device)
        keep[:R, : p - p_old] = False
        keep[:R, p - p_old : p] = self.key_keep[:, :p_old]
        keep[R:, : p - p_new] = False
        keep[R:, p - p_new : p] = new["key_keep"][:, :p_new]
        merged_cross = concat_cross([kept_cross, cross])
        doc = torch.cat([old_doc, new["doc"] + kept_cross.docs])
        groups = RowGroups.from_doc(doc, merged_cross.docs)
        limit = torch.cat([self.limit, new["limit"]])
        count = torch.cat([self.count, torch.zeros_like(new["limit"])])
        logits = torch.cat([self.logits, new["logits"]])
        # everything is built: only now does the session change, so a failure above leaves it whole
        old.k, old.v, old.pos = k, v, p
        self.key_keep, self.cross, self.doc, self.groups = keep, merged_cross, doc, groups
        self.limit, self.count, self.logits = limit, count, logits
        self.ids = self.ids + list(ids)

    def _compact_docs(self) -> tuple[CrossCache, Tensor]:
        """The cross cache without the documents that have no row left, and the rows' new indices."""
        present = torch.zeros(self.cross.docs, dtype=torch.bool, device=self.doc.device)
        present[self.doc] = True
        if bool(present.all()):
            return self.cross, self.doc
        kept = present.nonzero().squeeze(1)
        remap = torch.full((self.cross.docs,), -1, dtype=torch.long, device=self.doc.device)
        remap[kept] = torch.arange(kept.numel(), device=self.doc.device)
        return self.cross.select(kept), remap[self.doc]

    # -- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[int, list[int]]]:
        """Choose every row's next token; return the rows that ended as (row id, tokens without
        EOS); run one decoder step for the rows still going."""
        if not self.ids:
            return []
        nxt = self.logits.argmax(-1)  # [R]
        self.count += 1
        finished = self.count >= self.limit
        if self.eos is not None:
            finished |= nxt == self.eos
        done = []
        for rid, token, end in zip(self.ids, nxt.tolist(), finished.tolist()):
            self.tokens[rid].append(token)
            if end:
                seq = self.tokens.pop(rid)
                if self.eos is not None and seq[-1] == self.eos:
                    seq.pop()
                done.append((rid, seq))
        if done:
            if len(done) == len(self.ids):
                self._reset()
                return done
            keep = (~finished).nonzero().squeeze(1)
            nxt = nxt.index_select(0, keep)
            self._select(keep)
        self._forward(nxt)
        return done

    def _forward(self, feed: Tensor) -> None:
        model = self.model
        p, capacity = self.cache.pos, self.cache.capacity
        if self._table is None or self._table.shape[-1] != capacity:  # the capacity changes when rows join
            self._table = model.decoder.rel_bias.step_table(capacity, model.dtype)
        mask = self._table[..., capacity - 1 - p :]  # [1, heads, 1, p+1]: the bias of this step (see decode)
        keep = self.key_keep[:, : p + 1]
        if not bool(keep.all()):
            mask = mask.masked_fill(~keep[:, None, None, :], torch.finfo(model.dtype).min)
        hidden = step_decode(model)(feed[:, None], self.cross, self.groups, mask, self.cache)
        self.logits = model.logits(hidden[:, -1])
        self.steps += 1
        self.row_steps += feed.numel()

    @torch.inference_mode()
    def drop(self, row_ids) -> None:
        """Remove these rows (their caller has gone); unknown ids are ignored."""
        gone = set(row_ids) & set(self.tokens)
        if not gone:
            return
        for rid in gone:
            del self.tokens[rid]
        if len(gone) == len(self.ids):
            self._reset()
            return
        keep = torch.tensor([i for i, rid in enumerate(self.ids) if rid not in gone], device=self.doc.device)
        self._select(keep)

    def _select(self, keep: Tensor) -> None:
        """Keep rows `keep` (in order) in every per-row tensor; drop documents left empty once a
        quarter of them are (as `decode` does)."""
        self.cache.select(keep)
        self.key_keep = self.key_keep.index_select(0, keep)
        self.doc = self.doc.index_select(0, keep)
        self.limit = self.limit.index_select(0, keep)
        self.count = self.count.index_select(0, keep)
        self.logits = self.logits.index_select(0, keep)
        kept = keep.tolist()
        self.ids = [self.ids[i] for i in kept]
        self.cross, self.doc = drop_empty_docs(self.cross, self.doc)
        self.groups = RowGroups.from_doc(self.doc, self.cross.docs)
