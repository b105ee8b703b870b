"""Decoding that lets new rows join between steps: the engine of continuous batching.

`generate.decode` runs a fixed set of rows to the end. A service wants more: documents arrive
while others are being decoded, and a document that arrives should not wait for the whole batch
to finish. A `DecodeSession` holds the rows of many documents at once, greedy and beam search
side by side (one search per admission, `pidec.search`), in one `generate.RowBatch`:

    admit(cross, rows, num_beams) -> row ids   prefill the new rows (as `decode` does) and merge
                                    them into the running batch, their documents' cache beside the rest
    step() -> finished rows         every search picks its rows' next tokens, rows that ended
                                    leave (compaction), one decoder step runs for all the others
    drop(row ids)                   remove rows whose caller has gone (a cancelled request)

A row sees what it would see in `decode`: T5's self-attention depends only on key - query
distances, so a row that joins late is placed to end its prompt at the session's current cache
position, with the slots before it masked out, exactly as a short prompt is placed in `decode`;
and its document's cross-attention keys are its own, padded and masked beside the others'. The
tokens are therefore those of `decode` (the arithmetic is the same up to the order of
floating-point sums in batches of other shapes, as in `Model.generate_batch`).

The self-attention cache stays as long as the live rows need, however long the session runs
without emptying: when rows join, the slots before the oldest live row's first slot are cut off
(the time axis is compacted), so the cache length is at most twice the longest span (prompt plus
budget) of the rows it holds (`capacity_after`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .generate import (
    Row,
    RowBatch,
    check_rows,
    check_sync_every,
    drop_empty_docs,
    prefill,
    special_ids,
)
from .hostsync import read_bool, read_int, read_list, upload
from .model import T5, CrossCache, additive_mask
from .rows import document_order, inverse
from .search import Choice, apply_keep, new_search


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
    mask = None if read_bool(keep.all(), "concat_cross") else additive_mask(keep[:, None, None, :], dtype)
    return CrossCache(ks, vs, mask, lengths)


@dataclass
class Admission:
    """The rows admitted together: one search over a contiguous block of the batch. Caller row i
    of the search has the session row id `first_id + i`."""

    search: object
    first_id: int


class DecodeSession:
    """Rows of many documents, decoded one step at a time; rows may join between steps and leave
    as they end. Row ids are the session's own, unique for its lifetime. Every method either
    does all it says or, when it raises, leaves the running rows as they were.

    eos_token_id=-1 means the model's; None means rows run to their max_new_tokens. sync_every:
    which rows ended is read back on the host every this many steps (None: the device's default,
    `generate.default_sync_every`: 1 on the CPU); between reads rows that ended compute on and
    `step` reports them at the next read."""

    def __init__(
        self,
        model: T5,
        eos_token_id: int | None = -1,
        pad_token_id: int | None = None,
        *,
        sync_every: int | None = None,
    ):
        self.model = model
        self.eos, self.pad = special_ids(model, eos_token_id, pad_token_id)
        self.sync_every = check_sync_every(sync_every, model.device)
        self.steps = 0  # decoder steps run (after prefills)
        self.row_steps = 0  # sum over steps of the rows computed
        self.batch: RowBatch | None = None
        self.admissions: list[Admission] = []  # in batch order
        self._next_id = 0

    @property
    def rows(self) -> int:
        return 0 if self.batch is None else self.batch.rows

    @property
    def docs(self) -> int:
        return 0 if self.batch is None else self.batch.cross.docs

    @property
    def capacity(self) -> int:
        """Length of the self-attention cache (slots per row)."""
        return 0 if self.batch is None else self.batch.cache.capacity

    @property
    def document_length(self) -> int:
        """Length of the cross-attention cache (the longest document held)."""
        return 0 if self.batch is None else self.batch.cross.k[0].shape[2]

    # -- joining ----------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(
        self,
        cross: CrossCache,
        rows: list[Row],
        num_beams: int = 1,
        *,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
    ) -> list[int]:
        """Prefill `rows` (their `doc` indexes `cross`) and add them to the batch. Returns their
        row ids, in the order given. Their first token is chosen by the next `step`.

        num_beams > 1: beam search for these rows (each becomes num_beams batch rows, its result
        the best beam); length_penalty and early_stopping as in `generate.decode`."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not rows:
            return []
        check_rows(rows, cross)
        order = document_order(rows)
        ordered = [rows[i] for i in order]
        new = prefill(self.model, cross, ordered, self.pad, num_beams)
        limits = [r.max_new_tokens for r in ordered]
        search = new_search(
            limits,
            num_beams,
            self.eos,
            self.pad,
            self.model.device,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            read_every=self.sync_every,
        )
        batch = new if self.batch is None else self._join(new, max(limits))
        # everything is built: only now does the session change, so a failure above leaves it whole
        self.batch = batch
        first = self._next_id
        self._next_id += len(rows)
        self.admissions.append(Admission(search, first))
        return [first + b for b in inverse(order)]

    def capacity_after(self, prefix: int, budget: int) -> int:
        """The cache length after admitting rows whose prompts are at most `prefix` tokens and
        budgets at most `budget`: the live rows' window (from the oldest live row's first slot to
        the current position) or the new prompts, whichever is longer, plus the most slots any row
        may still write."""
        if self.batch is None:
            return prefix + budget
        window = self.batch.cache.pos - self._first_live_slot()
        room = max(a.search.slots_left() for a in self.admissions)
        return max(window, prefix) + max(room, budget)

    def _first_live_slot(self) -> int:
        b = self.batch
        return read_int(b.key_keep[:, : b.cache.pos].any(0).int().argmax(), "session.first_live_slot")

    def _join(self, new: RowBatch, budget: int) -> RowBatch:
        """The running rows and the prefilled ones in one batch, the new ones after. Both caches
        are shifted so that every row's next write lands at one position p = max(live window,
        new prompts' end); the slots before the oldest live row's first slot are cut off."""
        old = self.batch
        lo = self._first_live_slot()
        w_old, p_new = old.cache.pos - lo, new.cache.pos
        p = max(w_old, p_new)
        capacity = self.capacity_after(p_new, budget)
        R, G = old.rows, new.rows

        def shifted(a: Tensor, b: Tensor) -> Tensor:
            out = a.new_empty((R + G, a.shape[1], capacity, a.shape[3]))
            out[:, :, :p].zero_()  # masked slots must hold numbers: 0 * NaN is NaN
            out[:R, :, p - w_old : p] = a[:, :, lo : lo + w_old]
            out[R:, :, p - p_new : p] = b[:, :, :p_new]
            return out

        k = [shifted(a, b) for a, b in zip(old.cache.k, new.cache.k)]
        v = [shifted(a, b) for a, b in zip(old.cache.v, new.cache.v)]
        keep = torch.zeros((R + G, capacity), dtype=torch.bool, device=old.key_keep.device)
        keep[:, p:] = True
        keep[:R, p - w_old : p] = old.key_keep[:, lo : lo + w_old]
        keep[R:, p - p_new : p] = new.key_keep[:, :p_new]
        kept_cross, old_doc = drop_empty_docs(old.cross, old.doc, share=0.0)
        cross = concat_cross([kept_cross, new.cross])
        doc = torch.cat([old_doc, new.doc + kept_cross.docs])
        joined = RowBatch(self.model, cross, old.cache, keep, doc, torch.cat([old.logits, new.logits]))
        old.cache.k, old.cache.v, old.cache.pos = k, v, p  # last: nothing below can fail
        return joined

    # -- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[int, list[int]]]:
        """Choose every row's next token; return the rows that ended as (row id, tokens without
        EOS; for beams, the best beam's); run one decoder step for the rows still going."""
        if self.batch is None:
            return []
        logits = self.batch.logits
        choices = []
        lo = 0
        for a in self.admissions:
            n = a.search.rows
            choices.append((lo, n, a.search.choose(logits[lo : lo + n])))
            lo += n
        choices = self._settle(choices)
        feeds, keeps, done = [], [], []
        for a, (lo, n, choice) in zip(self.admissions, choices):
            done += [(a.first_id + i, tokens) for i, tokens in zip(choice.ended, a.search.results_for(choice.ended))]
            keeps.append((lo, n, choice.keep))
            feeds.append(choice.feed)
        if all(a.search.done for a in self.admissions):
            self._reset()
            return done
        self.batch.logits = None  # the step below replaces them
        if any(keep is not None for _, _, keep in keeps):
            self.batch.select(self._batch_index(keeps))
        self.admissions = [a for a in self.admissions if not a.search.done]
        feed = torch.cat(feeds)
        self.batch.forward(feed)
        self.steps += 1
        self.row_steps += feed.numel()
        return done

    def _settle(self, choices: list) -> list:
        """Read the deferred searches back, all in one host read, every `sync_every` steps or
        when one has spent its budgets; each choice gets its search's compaction and ended rows."""
        deferred = [j for j, a in enumerate(self.admissions) if a.search.deferred]
        due = (self.steps + 1) % self.sync_every == 0
        if not deferred or not (due or any(self.admissions[j].search.must_settle for j in deferred)):
            return choices
        flags = [self.admissions[j].search.flags() for j in deferred]
        read = read_list(torch.cat(flags), "session.settle")
        out, lo = list(choices), 0
        for j, f in zip(deferred, flags):
            keep, ended = self.admissions[j].search.settle(read[lo : lo + f.numel()])
            lo += f.numel()
            start, n, choice = out[j]
            choice = apply_keep(choice, keep, self.batch.doc.device)
            out[j] = (start, n, Choice(choice.feed, choice.keep, ended))
        return out

    def _batch_index(self, keeps: list[tuple[int, int, Tensor | None]]) -> Tensor:
        """The admissions' own keep indices (block start, rows, keep or None: all) as one index
        into the batch."""
        device = self.batch.doc.device
        parts = [torch.arange(lo, lo + n, device=device) if keep is None else keep + lo for lo, n, keep in keeps]
        return torch.cat(parts)

    @torch.inference_mode()
    def drop(self, row_ids) -> None:
        """Remove these rows (their caller has gone); unknown ids are ignored."""
        if self.batch is None:
            return
        gone = set(row_ids)
        index, lo, changed = [], 0, False
        for a in self.admissions:
            owner = a.search.owner
            mine = [b for b, i in enumerate(owner) if a.first_id + i not in gone]
            if len(mine) < len(owner):
                a.search.drop_rows(mine)
                changed = True
            index += [lo + b for b in mine]
            lo += len(owner)
        if not changed:
            return
        if not index:
            self._reset()
            return
        self.batch.select(upload(index, torch.long, self.batch.doc.device))
        self.admissions = [a for a in self.admissions if a.search.rows]

    def _reset(self) -> None:
        self.batch, self.admissions = None, []
