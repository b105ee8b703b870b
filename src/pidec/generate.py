"""The decoding engine: encode each document once, decode all of its rows over one shared
cross-attention cache, greedy or beam search, ragged rows, compaction.

Works on token ids only; `layouts` turns text into `Row`s and back. The prompts are prefilled
in one pass, each document's prompts packed end to end (no padding); then one step is

    rows alive R (sorted by document), cache position p (the same for every row: each row's
    cache is aligned so that the prompts end together), tokens [R, 1] -> logits [R, vocab]

A row that has finished is dropped from every per-row tensor before the next step
(compaction), so a step costs what the rows still alive cost; a document with no row left
is dropped from the cross-attention cache once enough of them have gone.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import packing
from .model import T5, CrossCache, KVCache, PackedPrefill, RowGroups


@dataclass
class Row:
    """One decoder sequence: the tokens it starts from (decoder start token, then the prompt in
    the pid layout) and how many tokens it may add. `doc` indexes the encoded documents."""

    doc: int
    prefix: list[int]
    max_new_tokens: int


@dataclass
class DecodeStats:
    encode_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # decoding steps after the prompt prefill
    row_steps: int = 0  # sum over steps of the rows computed (what compaction saves)
    output_tokens: int = 0
    prefill_tokens: int = 0
    document_tokens: int = 0
    cross_cache_bytes: int = 0
    self_cache_bytes: int = 0  # at allocation (the largest it gets)

    def add(self, other: DecodeStats) -> None:
        for name in self.__dataclass_fields__:
            if name.endswith("_bytes"):
                setattr(self, name, max(getattr(self, name), getattr(other, name)))
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated tokens per row, EOS not included
    scores: list[float] | None = None  # beam search: the length-normalised score of each row
    stats: DecodeStats = field(default_factory=DecodeStats)


class Aborted(Exception):
    """`decode` was told to stop (`should_stop`) before it finished."""


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def encode(model: T5, docs: list[list[int]], pad_token_id: int | None = None) -> CrossCache:
    """Token lists -> the documents' cross-attention cache (right-padded, masked)."""
    if not docs:
        raise ValueError("no documents to encode")
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    S = max(len(d) for d in docs)
    if S == 0:
        raise ValueError("cannot encode an empty document")
    ids = torch.full((len(docs), S), pad, dtype=torch.long)
    keep = torch.zeros((len(docs), S), dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
        keep[i, : len(d)] = True
    ids, keep = ids.to(model.device), keep.to(model.device)
    enc = model.encode(ids, keep)
    return model.cross_cache(enc, keep)


class _Rows:
    """The per-row state of one decoding run, kept aligned under compaction and reordering."""

    def __init__(self, doc: Tensor, key_keep: Tensor, origin: Tensor):
        self.doc = doc  # [R] document of each row
        self.key_keep = key_keep  # [R, capacity] False on left padding
        self.origin = origin  # [R] index into the caller's rows (beam rows: group index)

    def select(self, index: Tensor) -> None:
        self.doc = self.doc.index_select(0, index)
        self.key_keep = self.key_keep.index_select(0, index)
        self.origin = self.origin.index_select(0, index)


# -- torch.compile ---------------------------------------------------------------------------
# The one-token decoding steps of the models given to `compile_steps` run through one compiled
# `T5.decode` (inductor). Shapes are dynamic rather than padded to buckets: the row count, the
# cache position and the document length are symbolic, so a model compiles about three graphs
# (documents with unequal row counts, with equal row counts, with one row each), not one per
# step, and no step computes padding rows. The prefill and the encoder stay eager: their shapes
# change with every batch, and they are large matrix products that the BLAS already runs near
# the machine's speed, where a step is many small operations around products that stream weights.

_compiled_decode: Callable | None = None
_compiled_models: weakref.WeakSet = weakref.WeakSet()


def compile_steps(model: T5) -> T5:
    """Decode `model`'s steps through torch.compile from now on (greedy, beams, `DecodeSession`).
    The compilation happens on the first steps decoded: about a minute for T5 small and base on
    two CPU cores. There, a compiled step took 13-24 % less time than an eager BLAS one when this
    was added, but a whole document was no faster than with the packed eager default
    (docs/performance.md). The model is unpacked (`pidec.packing`)."""
    global _compiled_decode
    if getattr(model, "quantization", None):
        raise ValueError("compile: not with an int8 model (its dynamic int8 layers run eagerly); pick one of the two")
    if _compiled_decode is None:
        _compiled_decode = torch.compile(T5.decode, dynamic=True)
    packing.unpack(model)  # inductor lays out the weights its own way; the packed ops are eager-only
    _compiled_models.add(model)
    return model


def is_compiled(model: T5) -> bool:
    return model in _compiled_models


def step_decode(model: T5) -> Callable:
    """`model.decode`, or its compiled form for the models given to `compile_steps`."""
    if model in _compiled_models:
        return lambda *args: _compiled_decode(model, *args)
    return model.decode


def check_rows(rows: list[Row], cross: CrossCache) -> None:
    """Every row has a budget, a prefix and a document that was encoded."""
    for i, r in enumerate(rows):
        if r.max_new_tokens < 1:
            raise ValueError(f"row {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        if not r.prefix:
            raise ValueError(f"row {i}: empty prefix (it needs at least the decoder start token)")
        if not 0 <= r.doc < cross.docs:
            raise ValueError(f"row {i}: document {r.doc} out of range ({cross.docs} encoded)")


@torch.inference_mode()
def decode(
    model: T5,
    cross: CrossCache,
    rows: list[Row],
    num_beams: int = 1,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
    compaction: bool = True,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Decoded:
    """Decode `rows` against `cross` (one entry per document). eos_token_id=-1 means the model's;
    None means rows run to their max_new_tokens (the benchmark's fixed-length workloads).
    `should_stop`, when given, is asked before every step; True abandons the decoding with
    `Aborted` (the service uses it to stop a beam batch whose callers have all gone)."""
    cfg = model.config
    device = model.device
    eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not rows:
        return Decoded([], None if num_beams == 1 else [])
    check_rows(rows, cross)
    order = sorted(range(len(rows)), key=lambda i: rows[i].doc)
    if order != list(range(len(rows))):
        result = decode(
            model,
            cross,
            [rows[i] for i in order],
            num_beams,
            eos_token_id,
            pad_token_id,
            compaction,
            length_penalty,
            early_stopping,
            should_stop,
        )
        back = [0] * len(rows)
        for new, old in enumerate(order):
            back[old] = new
        result.tokens = [result.tokens[back[i]] for i in range(len(rows))]
        if result.scores is not None:
            result.scores = [result.scores[back[i]] for i in range(len(rows))]
        return result

    sync(device)
    t0 = time.perf_counter()
    stats = DecodeStats(cross_cache_bytes=cross.nbytes(), document_tokens=int(cross.lengths.sum()))
    G = len(rows)
    P = max(len(r.prefix) for r in rows)
    limits = [r.max_new_tokens for r in rows]
    capacity = P + max(limits)

    # Every row's cache is aligned so that the prefixes end together at P: row i's keys sit at
    # [P - len(prefix_i), P) and the positions before are masked out for good.
    key_keep = torch.ones((G, capacity), dtype=torch.bool)
    for i, r in enumerate(rows):
        key_keep[i, : P - len(r.prefix)] = False
    key_keep = key_keep.to(device)
    padded = any(len(r.prefix) < P for r in rows)
    doc = torch.tensor([r.doc for r in rows], device=device)
    state = _Rows(doc, key_keep, torch.arange(G, device=device))

    cache = KVCache(len(model.decoder.layers), G, cfg.num_heads, capacity, cfg.d_kv, model.dtype, device)
    logits = prefill(model, cross, rows, cache, P, pad)  # [G, vocab]
    stats.prefill_tokens = sum(len(r.prefix) for r in rows)
    stats.self_cache_bytes = cache.nbytes() * num_beams
    groups = RowGroups.from_doc(state.doc, cross.docs)

    if num_beams > 1:
        max_new = torch.tensor(limits, device=device)
        beam = _BeamState(G, num_beams, max(limits), device, length_penalty, early_stopping)
        greedy = None
        cache.repeat_rows(num_beams)
        state.select(torch.arange(G, device=device).repeat_interleave(num_beams))
        logits = logits.repeat_interleave(num_beams, dim=0)
    else:
        beam, greedy = None, _Greedy(limits, eos, pad, compaction)

    # A step's additive mask is the relative bias of the query at position p against keys 0..p,
    # with the slots before a short prompt masked: the bias is a slice of one table computed here
    # (T5's bias depends only on key - query), not a bucketing of distances at every step.
    table = model.decoder.rel_bias.step_table(capacity, model.dtype)  # [1, heads, 1, capacity]
    neg = torch.finfo(model.dtype).min

    live_docs = cross
    forward = step_decode(model)
    step = 0
    while True:
        if greedy is not None:
            feed, keep_index = greedy.step(logits)
            if feed is None:
                break
        else:
            # beam rows are reordered every step (each new beam continues one parent), and the
            # rows of finished groups are left out of the same index when compacting
            limit = max_new.index_select(0, state.origin)  # [R]
            feed, keep_index = beam.step(logits, state.origin, limit, step, eos, compaction)
            if bool(beam.done.all()):
                break
        if keep_index is not None:
            cache.select(keep_index)
            state.select(keep_index)
            live_docs, state.doc = drop_empty_docs(live_docs, state.doc)
            groups = RowGroups.from_doc(state.doc, live_docs.docs)
        step += 1
        if should_stop is not None and should_stop():
            raise Aborted(f"stopped after {step} steps")
        p = cache.pos
        mask = table[..., capacity - 1 - p :]  # [1, heads, 1, p+1], a view
        if padded:
            mask = mask.masked_fill(~state.key_keep[:, None, None, : p + 1], neg)
        hidden = forward(feed[:, None], live_docs, groups, mask, cache)
        logits = model.logits(hidden[:, -1])
        stats.steps += 1
        stats.row_steps += feed.numel()

    sync(device)
    stats.decode_s = time.perf_counter() - t0
    if beam is not None:
        result, scores = beam.results(eos)
    else:
        result, scores = greedy.results(), None
    stats.output_tokens = sum(len(t) for t in result)  # EOS not counted
    return Decoded(result, scores, stats)


class _Greedy:
    """Greedy bookkeeping on the host. A step copies the chosen tokens to the host once (the one
    synchronisation a step needs: which rows ended decides the next batch) and keeps the rest in
    Python lists, instead of a dozen small tensor operations and several synchronisations."""

    def __init__(self, limits: list[int], eos: int | None, pad: int, compaction: bool):
        self.limits, self.eos, self.pad, self.compaction = limits, eos, pad, compaction
        self.tokens: list[list[int]] = [[] for _ in limits]  # per caller row, EOS included
        self.alive = list(range(len(limits)))  # caller row of each batch row
        self.done = [False] * len(limits)
        self.remaining = len(limits)
        self.idle: Tensor | None = None  # without compaction: batch rows that have ended

    def step(self, logits: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Take each row's next token from logits [R, vocab]. Returns the tokens to feed [R'] (None
        once every row has ended) and the batch rows to keep (None: the batch stays as it is)."""
        nxt = logits.argmax(-1)  # [R]
        keep, ended = [], False
        for b, (i, token) in enumerate(zip(self.alive, nxt.tolist())):
            if self.done[i]:  # without compaction, rows that ended stay in the batch
                continue
            out = self.tokens[i]
            out.append(token)
            if token == self.eos or len(out) >= self.limits[i]:
                self.done[i] = True
                self.remaining -= 1
                ended = True
            else:
                keep.append(b)
        if self.remaining == 0:
            return None, None
        if ended and self.compaction:
            index = torch.tensor(keep, device=nxt.device)
            self.alive = [self.alive[b] for b in keep]
            return nxt.index_select(0, index), index
        if ended:  # no compaction: rows that ended compute on, fed pad, and nothing is kept
            self.idle = torch.tensor([self.done[i] for i in self.alive], device=nxt.device)
        return (nxt if self.idle is None else nxt.masked_fill(self.idle, self.pad)), None

    def results(self) -> list[list[int]]:
        """Tokens per caller row, a final EOS removed."""
        out = []
        for seq in self.tokens:
            if seq and self.eos is not None and seq[-1] == self.eos:
                seq = seq[:-1]
            out.append(seq)
        return out


PACK_TOKENS = 256  # longest packed prefill segment (its attention is segment x segment)


def prefill(model: T5, cross: CrossCache, rows: list[Row], cache: KVCache, P: int, pad: int) -> Tensor:
    """Run every row's prefix through the decoder in one pass and return each row's next-token
    logits [rows, vocab]. The prefixes of a document are packed end to end into segments of up
    to PACK_TOKENS tokens (no padding between rows of different lengths); a block-diagonal
    causal mask keeps each row to itself, and each token's keys/values go to its row's cache."""
    device = model.device
    segments: list[list[int]] = []
    seg_doc: list[int] = []
    seg_len: list[int] = []
    for i, r in enumerate(rows):
        n = len(r.prefix)
        if segments and seg_doc[-1] == r.doc and seg_len[-1] + n <= PACK_TOKENS:
            segments[-1].append(i)
            seg_len[-1] += n
        else:
            segments.append([i])
            seg_doc.append(r.doc)
            seg_len.append(n)
    S, T = len(segments), max(seg_len)
    tokens = torch.full((S, T), pad, dtype=torch.long)
    owner = torch.full((S, T), -1, dtype=torch.long)  # row of each packed token, -1 on padding
    inrow = torch.zeros((S, T), dtype=torch.long)  # position of the token within its row
    seg, tok, row, slot, last = [], [], [], [], []
    for s, members in enumerate(segments):
        t = 0
        for i in members:
            prefix = rows[i].prefix
            n = len(prefix)
            tokens[s, t : t + n] = torch.tensor(prefix, dtype=torch.long)
            owner[s, t : t + n] = i
            inrow[s, t : t + n] = torch.arange(n)
            seg += [s] * n
            tok += range(t, t + n)
            row += [i] * n
            slot += range(P - n, P)
            last.append((s, t + n - 1))
            t += n
    tokens, owner, inrow = tokens.to(device), owner.to(device), inrow.to(device)
    keep = (owner[:, :, None] == owner[:, None, :]) & (inrow[:, None, :] <= inrow[:, :, None])  # [S, q, k]
    mask = model.decoder.rel_bias.of(inrow[:, None, :] - inrow[:, :, None]).to(model.dtype)  # [S, heads, q, k]
    mask = mask.masked_fill(~keep[:, None], torch.finfo(model.dtype).min)

    def index(values) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    writer = PackedPrefill(cache, index(seg), index(tok), index(row), index(slot), P)
    groups = RowGroups.from_doc(index(seg_doc), cross.docs)
    hidden = model.decode(tokens, cross, groups, mask, writer)  # [S, T, d_model]
    ends = index(last)
    return model.logits(hidden[ends[:, 0], ends[:, 1]])


def drop_empty_docs(cross: CrossCache, doc: Tensor) -> tuple[CrossCache, Tensor]:
    """Drop documents with no row left from the cross cache once a quarter of them are empty
    (each drop copies the remaining documents' cache, so it is not done for every row)."""
    docs = cross.docs
    if docs <= 1:
        return cross, doc
    present = torch.zeros(docs, dtype=torch.bool, device=doc.device)
    present[doc] = True
    empty = docs - int(present.sum())
    if empty == 0 or empty * 4 < docs:
        return cross, doc
    kept = present.nonzero().squeeze(1)
    remap = torch.full((docs,), -1, dtype=torch.long, device=doc.device)
    remap[kept] = torch.arange(kept.numel(), device=doc.device)
    return cross.select(kept), remap[doc]


class _BeamState:
    """Beam search over G groups (one per row) of `nb` beams, with transformers' scoring:
    cumulative log-probabilities, 2*nb candidates a step, finished hypotheses scored by
    sum_logprobs / generated_len**length_penalty, and its stopping heuristic. Beams of a row
    are consecutive rows of the batch and share the document's cross-attention cache."""

    NEG = -1.0e9

    def __init__(self, G: int, nb: int, max_len: int, device, length_penalty: float, early_stopping: bool):
        self.G, self.nb = G, nb
        self.lp, self.early = length_penalty, early_stopping
        self.running_scores = torch.zeros((G, nb), device=device)
        self.running_scores[:, 1:] = self.NEG
        self.running_seqs = torch.zeros((G, nb, max_len), dtype=torch.long, device=device)
        self.fin_scores = torch.full((G, nb), self.NEG, device=device)
        self.fin_seqs = torch.zeros((G, nb, max_len), dtype=torch.long, device=device)
        self.fin_lens = torch.zeros((G, nb), dtype=torch.long, device=device)
        self.fin_flag = torch.zeros((G, nb), dtype=torch.bool, device=device)
        self.improvable = torch.ones(G, dtype=torch.bool, device=device)
        self.alive = torch.arange(G, device=device)  # groups still in the batch, in batch order
        self.top_mask = torch.zeros(2 * nb, dtype=torch.bool, device=device)
        self.top_mask[:nb] = True
        self.done = torch.zeros(G, dtype=torch.bool, device=device)

    def step(self, logits: Tensor, origin: Tensor, limit: Tensor, step: int, eos, compaction: bool):
        """logits [A*nb, V] for the alive groups (or all groups without compaction).
        Returns the tokens to feed, the row index to keep (reorder + compaction) and the groups
        that finished at this step."""
        nb = self.nb
        groups = origin.view(-1, nb)[:, 0]  # [A]
        A = groups.numel()
        V = logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1).view(A, nb, V)
        logp = logp + self.running_scores[groups][:, :, None]
        top_lp, top_idx = torch.topk(logp.view(A, nb * V), k=2 * nb)  # [A, 2nb]
        src = top_idx // V
        tok = top_idx % V
        glimit = limit.view(-1, nb)[:, 0]
        hits = (step + 1 >= glimit)[:, None].expand(A, 2 * nb)
        if eos is not None:
            hits = hits | (tok == eos)
        prev = self.running_seqs[groups]  # [A, nb, L]
        cand_seqs = torch.gather(prev, 1, src[:, :, None].expand(A, 2 * nb, prev.shape[-1])).clone()
        cand_seqs[:, :, step] = tok

        # next running beams: best nb candidates that did not stop
        run_lp = top_lp + hits.float() * self.NEG
        nxt = torch.topk(run_lp, k=nb).indices  # [A, nb]
        new_scores = torch.gather(run_lp, 1, nxt)
        new_src = torch.gather(src, 1, nxt)
        new_tok = torch.gather(tok, 1, nxt)
        new_seqs = torch.gather(cand_seqs, 1, nxt[:, :, None].expand(A, nb, cand_seqs.shape[-1]))

        # finished hypotheses: only among the top nb candidates
        improvable = self.improvable[groups]
        fin_flag = self.fin_flag[groups]
        fin_cand = top_lp / ((step + 1) ** self.lp)
        full = fin_flag.all(-1, keepdim=True) & self.early
        fin_cand = fin_cand + full.float() * self.NEG
        fin_cand = fin_cand + (~improvable)[:, None].float() * self.NEG
        just = hits & self.top_mask[None, :]
        fin_cand = fin_cand + (~just).float() * self.NEG
        m_scores = torch.cat([self.fin_scores[groups], fin_cand], 1)
        m_seqs = torch.cat([self.fin_seqs[groups], cand_seqs], 1)
        m_lens = torch.cat([self.fin_lens[groups], torch.full_like(fin_cand, step + 1, dtype=torch.long)], 1)
        m_flag = torch.cat([fin_flag, just], 1)
        pick = torch.topk(m_scores, k=nb).indices
        fin_scores = torch.gather(m_scores, 1, pick)
        fin_flag = torch.gather(m_flag, 1, pick)

        # stopping heuristic (transformers' early_stopping=False): can the best running beam
        # still beat the worst finished one?
        best = new_scores[:, :1] / ((step + 1) ** self.lp)
        worst = torch.where(fin_flag, fin_scores.min(-1, keepdim=True).values, torch.full_like(best, self.NEG))
        improvable = improvable & (best > worst).any(-1)
        finished = ~improvable | hits.all(-1)
        if self.early:
            finished = finished | fin_flag.all(-1)

        # groups that had already finished (kept in the batch when not compacting) stay as they were
        upd = ~self.done[groups]
        g = groups[upd]
        self.fin_scores[g] = fin_scores[upd]
        self.fin_flag[g] = fin_flag[upd]
        self.fin_seqs[g] = torch.gather(m_seqs, 1, pick[:, :, None].expand(A, nb, m_seqs.shape[-1]))[upd]
        self.fin_lens[g] = torch.gather(m_lens, 1, pick)[upd]
        self.running_scores[g] = new_scores[upd]
        self.running_seqs[g] = new_seqs[upd]
        self.improvable[g] = improvable[upd]
        self.done[g] = finished[upd]

        reorder = (torch.arange(A, device=logits.device)[:, None] * nb + new_src).view(-1)
        feed = new_tok.reshape(-1)
        if compaction:
            alive = ~self.done[groups]
            if bool(alive.all()):
                return feed, reorder
            return feed.view(A, nb)[alive].reshape(-1), reorder.view(A, nb)[alive].reshape(-1)
        return feed, reorder

    def results(self, eos) -> tuple[list[list[int]], list[float]]:
        seqs = self.fin_seqs[:, 0].cpu()
        lens = self.fin_lens[:, 0].cpu()
        scores = self.fin_scores[:, 0].cpu().tolist()
        out = []
        for g in range(self.G):
            s = seqs[g, : int(lens[g])].tolist()
            if s and eos is not None and s[-1] == eos:
                s.pop()
            out.append(s)
        return out, scores


def budget_ranges(lengths: list[int], budget: int):
    """Consecutive document ranges whose padded size (docs x longest) stays within budget."""
    lo = 0
    while lo < len(lengths):
        hi, longest = lo, 0
        while hi < len(lengths):
            longest_next = max(longest, lengths[hi])
            if hi > lo and longest_next * (hi - lo + 1) > budget:
                break
            longest, hi = longest_next, hi + 1
        yield lo, hi
        lo = hi
