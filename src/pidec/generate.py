"""The decoding engine: encode each document once, decode all of its rows over one shared
cross-attention cache, greedy or beam search, ragged rows, compaction.

Works on token ids only; `layouts` turns text into `Row`s and back. Decoding is three named
steps (after gpt-fast's `prefill` -> `decode_one_token` -> `decode_n_tokens`):

    prefill(rows) -> RowBatch        every row's prompt through the decoder in one packed pass
                                     (each document's prompts end to end, no padding); the batch
                                     holds the rows' caches and their next-token logits [R, vocab]
    decode_one_token(batch, search)  the search (`pidec.search`: greedy or beams, one interface)
                                     picks each row's next token; rows that ended leave the batch
                                     (compaction); the others run one decoder step:
                                     tokens [R', 1] at cache position p -> logits [R', vocab]
    decode_n_tokens(batch, search)   until every row has ended

Every row's cache is aligned so that the prompts end together at one position p (T5's
self-attention depends only on key - query distances), the slots before a short prompt masked out
for good. A step costs what the rows still alive cost; a document with no row left is dropped
from the cross-attention cache once enough of them have gone. `session.DecodeSession` runs the
same batch and searches with rows joining between steps.

Host reads: on the CPU the search reads its choices back at every step (free there); on a GPU
(`sync_every`, `default_sync_every`) the search's state stays on the device and is read back
every few steps, so that the host keeps queueing kernels. Every read goes through
`pidec.hostsync` and is counted by `SyncCounter`. For CUDA graphs, `pad_rows` pads the batch to
a few row counts (`bucket_rows`) and `StaticSteps` runs the step with static shapes.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import packing
from .errors import InputError
from .hostsync import SyncCounter as SyncCounter  # re-exported: counts a decoding's host reads
from .hostsync import read_bool, read_int, read_list, to_device, upload
from .model import T5, CrossCache, KVCache, RowGroups
from .rows import document_order, inverse, pack_prompts, prompt_key_keep
from .search import apply_keep, new_search

CUDA_SYNC_EVERY = 8  # steps between host reads on a GPU (see `default_sync_every`)


def default_sync_every(device) -> int:
    """How many decoding steps pass between host reads of the rows that ended, by default.

    On the CPU a read costs nothing, and reading at every step lets a row leave the batch at the
    step it ends: 1. On a GPU a read stops the host from queueing kernels until the GPU has run
    dry, so the state is kept on the device and read every CUDA_SYNC_EVERY steps: a row that
    ended computes on (fed pad) for at most that many steps less one, a price that falls as the
    batch grows, while the reads per step fall by that factor."""
    return 1 if torch.device(device).type == "cpu" else CUDA_SYNC_EVERY


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


def special_ids(model: T5, eos_token_id: int | None, pad_token_id: int | None) -> tuple[int | None, int]:
    """eos_token_id=-1 means the model's, None no EOS (rows run to their budget); pad None the model's."""
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    return eos, cfg.pad_token_id if pad_token_id is None else pad_token_id


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
    ids, keep = to_device(ids, model.device), to_device(keep, model.device)
    enc = model.encode(ids, keep)
    return model.cross_cache(enc, keep)


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


def prefill_prompts(model: T5, cross: CrossCache, rows: list[Row], cache: KVCache, P: int, pad: int) -> Tensor:
    """Run every row's prefix through the decoder in one pass and return each row's next-token
    logits [rows, vocab]. The prefixes of a document are packed end to end (`rows.pack_prompts`);
    the relative bias is each token's against the tokens of its own row, the rest masked."""
    packed = pack_prompts([r.prefix for r in rows], [r.doc for r in rows], cache, P, pad, model.device)
    inrow = packed.inrow
    mask = model.decoder.rel_bias.of(inrow[:, None, :] - inrow[:, :, None]).to(model.dtype)  # [S, heads, q, k]
    mask = mask.masked_fill(~packed.keep[:, None], torch.finfo(model.dtype).min)
    groups = RowGroups.from_doc(packed.seg_doc, cross.docs)
    hidden = model.decode(packed.tokens, cross, groups, mask, packed.writer)  # [S, T, d_model]
    return model.logits(packed.last(hidden))


# -- the batch of rows ----------------------------------------------------------------------


class StepBias:
    """The additive mask of a one-token step: the relative bias of the query at position p against
    keys 0..p, with the slots before a row's prompt masked. The bias is a slice of one table
    computed per cache capacity (T5's bias depends only on key - query), not a bucketing of
    distances at every step."""

    def __init__(self, model: T5):
        self.model = model
        self.table: Tensor | None = None  # [1, heads, 1, capacity]

    def mask(self, key_keep: Tensor, p: int, padded: bool) -> Tensor:
        """[1 or R, heads, 1, p+1] for a step writing position p; `padded`: some key_keep is False."""
        capacity = key_keep.shape[1]
        if self.table is None or self.table.shape[-1] != capacity:
            self.table = self.model.decoder.rel_bias.step_table(capacity, self.model.dtype)
        mask = self.table[..., capacity - 1 - p :]  # a view
        if padded:
            mask = mask.masked_fill(~key_keep[:, None, None, : p + 1], torch.finfo(self.model.dtype).min)
        return mask


class RowBatch:
    """The rows being decoded, sorted by document, every per-row tensor kept aligned under
    compaction and reordering (`select`):

        cache     KVCache [R, heads, capacity, d_kv] per layer; every row writes at cache.pos
        key_keep  [R, capacity] False on the slots before a row's prompt (`padded`: any False)
        doc       [R] the row's document in `cross` (documents with no row left go now and then)
        logits    [R, vocab] each row's next-token logits (None between a choice and the step)
    """

    def __init__(
        self,
        model: T5,
        cross: CrossCache,
        cache: KVCache,
        key_keep: Tensor,
        doc: Tensor,
        logits,
        *,
        bucketed: bool = False,
    ):
        self.model, self.cross, self.cache = model, cross, cache
        self.key_keep, self.doc, self.logits = key_keep, doc, logits
        self.real = doc.numel()  # the rows the searches see; with `bucketed`, the tensors hold more
        self.bucketed = bucketed
        self.version = 0  # bumped whenever the tensors are replaced (`StaticSteps` rebinds then)
        self.runner = None  # a `StaticSteps`, or None: the eager step
        self.padded = not read_bool(key_keep.all(), "RowBatch")
        if bucketed:
            index = self.bucket_index(torch.arange(self.real, device=doc.device))
            self.cache.select(index)
            self.key_keep, self.doc = key_keep.index_select(0, index), doc.index_select(0, index)
        self.groups = RowGroups.from_doc(self.doc, cross.docs)
        self.bias = StepBias(model)

    @property
    def rows(self) -> int:
        return self.real

    def bucket_index(self, keep: Tensor) -> Tensor:
        """`keep` padded to its bucket (`bucket_rows`) by repeating its last row: the padding
        rows copy a real row (its document, so the rows stay sorted) and their results are dropped."""
        extra = bucket_rows(keep.numel()) - keep.numel()
        return keep if extra == 0 else torch.cat([keep, keep[-1:].expand(extra)])

    def select(self, keep: Tensor) -> None:
        """Keep rows `keep`, in that order; drop documents left empty once enough of them are.
        A `keep` as long as the batch is a reordering within documents (beams: each new beam
        continues a beam of its group, and the beams of a group share a prompt and a document):
        only the self-attention cache moves, no host read."""
        self.version += 1
        index = self.bucket_index(keep) if self.bucketed else keep
        self.cache.select(index)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, keep)
        if keep.numel() == self.real:
            return
        self.real = keep.numel()
        self.key_keep = self.key_keep.index_select(0, index)
        self.doc = self.doc.index_select(0, index)
        self.cross, self.doc = drop_empty_docs(self.cross, self.doc)
        self.groups = RowGroups.from_doc(self.doc, self.cross.docs)

    def padded_feed(self, feed: Tensor) -> Tensor:
        """feed [real] -> [rows held]: the padding rows fed the last real row's token."""
        extra = self.doc.numel() - feed.numel()
        return feed if extra == 0 else torch.cat([feed, feed[-1:].expand(extra)])

    def forward(self, feed: Tensor) -> None:
        """One decoder step: feed [R] one token a row; `logits` become the next token's."""
        if self.runner is not None:
            self.logits = self.runner.forward(self, feed)
            return
        p = self.cache.pos
        mask = self.bias.mask(self.key_keep, p, self.padded)
        hidden = step_decode(self.model)(self.padded_feed(feed)[:, None], self.cross, self.groups, mask, self.cache)
        self.logits = self.model.logits(hidden[: self.real, -1])


# -- static shapes: bucketing and CUDA graphs -----------------------------------------------

BUCKET_FINE = 64  # row counts up to this are padded to powers of two, larger ones to multiples of it


def bucket_rows(n: int) -> int:
    """The row count a batch of n rows is padded to, so that few shapes recur and a CUDA graph
    captured for one is reused (as vLLM and gpt-fast pad batches): the next power of two up to
    BUCKET_FINE (1, 2, 4, ..., 64), then the next multiple of BUCKET_FINE (128, 192, ...), which
    wastes at most BUCKET_FINE - 1 rows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"bucket_rows: a row count >= 1, got {n!r}")
    if n <= BUCKET_FINE:
        return 1 << (n - 1).bit_length()
    return -(-n // BUCKET_FINE) * BUCKET_FINE


class StaticKVCache:
    """The self-attention cache of a static-shape step: the step's keys and values are written
    at the position held in a device tensor `pos` [1], and attention spans the whole capacity
    (the mask hides the slots after pos), so that no shape depends on the position."""

    def __init__(self, k: list[Tensor], v: list[Tensor], pos: Tensor):
        self.k, self.v, self.pos = k, v, pos

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]

    def advance(self) -> None:  # the host moves `RowBatch.cache.pos`; `pos` is set before each step
        pass


@dataclass
class StaticEntry:
    """The buffers of one step shape: what a captured graph reads and writes."""

    feed: Tensor
    pos: Tensor
    k: list[Tensor]
    v: list[Tensor]
    key_keep: Tensor
    cross: CrossCache
    groups: RowGroups
    graph: object = None
    logits: Tensor | None = None


class StaticSteps:
    """The one-token step with static shapes (`RowBatch.runner`): per shape (rows held, cache
    capacity, documents, document length, row fold) one set of buffers that the batch is bound
    to (its tensors copied in once after each change: compaction, beam reordering, documents
    dropped), a position in a device tensor, the step mask built on the device from it. With
    `graphs` (CUDA only) the step of each shape is captured once as a CUDA graph and replayed:
    one launch a step instead of one per kernel. Without, it runs eagerly (the CPU tests run
    it so, against the usual step). The logits it returns are a view of the shape's output
    buffer, valid until its next step."""

    def __init__(self, model: T5, graphs: bool):
        if graphs and model.device.type != "cuda":
            raise InputError(f"cuda_graphs: CUDA graphs need a model on a CUDA device, not {model.device.type}")
        self.model, self.graphs = model, graphs
        self.entries: dict[tuple, StaticEntry] = {}
        self.tables: dict[int, Tensor] = {}
        self.bound: tuple | None = None
        self.captures = 0
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    @staticmethod
    def key(batch: RowBatch) -> tuple:
        c, g = batch.cross, batch.groups
        return (batch.doc.numel(), batch.cache.capacity, c.docs, c.k[0].shape[2], c.mask is None, g.width, g.regular)

    def table(self, capacity: int) -> Tensor:
        """[1, heads, 1, 2*capacity-1]: the bias of key - query = -(capacity-1) .. capacity-1."""
        if capacity not in self.tables:
            rel = torch.arange(1 - capacity, capacity, device=self.model.device)[None, :]
            self.tables[capacity] = self.model.decoder.rel_bias.of(rel).unsqueeze(0).to(self.model.dtype)
        return self.tables[capacity]

    def bind(self, batch: RowBatch, key: tuple) -> StaticEntry:
        """Copy the batch's tensors into the buffers of its shape, and point the batch at them."""
        e = self.entries.get(key)
        c = batch.cross
        if e is None:
            mask = None if c.mask is None else c.mask.clone()
            cross = CrossCache([t.clone() for t in c.k], [t.clone() for t in c.v], mask, c.lengths.clone())
            g = batch.groups
            groups = RowGroups(g.doc.clone(), g.slot.clone(), g.docs, g.width, g.regular)
            e = StaticEntry(
                batch.doc.new_zeros(batch.doc.numel()),
                batch.doc.new_zeros(1),
                [t.clone() for t in batch.cache.k],
                [t.clone() for t in batch.cache.v],
                batch.key_keep.clone(),
                cross,
                groups,
            )
            self.entries[key] = e
        else:
            for dst, src in zip(e.k + e.v, batch.cache.k + batch.cache.v):
                dst.copy_(src)
            for dst, src in zip(e.cross.k + e.cross.v, c.k + c.v):
                dst.copy_(src)
            if c.mask is not None:
                e.cross.mask.copy_(c.mask)
            e.cross.lengths.copy_(c.lengths)
            e.groups.doc.copy_(batch.groups.doc)
            e.groups.slot.copy_(batch.groups.slot)
            e.key_keep.copy_(batch.key_keep)
        for t in e.k + e.v:  # attention spans every slot: unwritten ones must hold numbers (0 * NaN is NaN)
            t[:, :, batch.cache.pos :].zero_()
        batch.cache.k, batch.cache.v = list(e.k), list(e.v)
        batch.cross, batch.groups, batch.key_keep = e.cross, e.groups, e.key_keep
        batch.doc = e.groups.doc
        return e

    def step(self, e: StaticEntry) -> Tensor:
        """The step itself, on the shape's buffers only (what a graph captures)."""
        capacity = e.key_keep.shape[1]
        j = torch.arange(capacity, device=e.pos.device)
        bias = self.table(capacity).index_select(-1, j - e.pos + (capacity - 1))  # [1, heads, 1, capacity]
        keep = e.key_keep & (j <= e.pos)[None, :]
        mask = bias.masked_fill(~keep[:, None, None, :], torch.finfo(self.model.dtype).min)
        cache = StaticKVCache(e.k, e.v, e.pos)
        hidden = self.model.decode(e.feed[:, None], e.cross, e.groups, mask, cache)
        return self.model.logits(hidden[:, -1])

    def capture(self, e: StaticEntry) -> None:
        """Warm up on a side stream (the warm-up writes the same keys and values the step will),
        then capture the step into a graph sharing one memory pool with the other shapes'."""
        self.table(e.key_keep.shape[1])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(e)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            e.logits = self.step(e)
        e.graph = graph
        self.captures += 1

    def forward(self, batch: RowBatch, feed: Tensor) -> Tensor:
        """One step of `batch` (feed [real rows]); returns the real rows' logits."""
        key = self.key(batch)
        state = (id(batch), batch.version, key)
        e = self.entries.get(key) if self.bound == state else self.bind(batch, key)
        self.bound = state
        e.feed.copy_(batch.padded_feed(feed))
        e.pos.fill_(batch.cache.pos)
        if self.graphs:
            if e.graph is None:
                self.capture(e)
            e.graph.replay()
            logits = e.logits
        else:
            logits = self.step(e)
        batch.cache.pos += 1
        return logits[: batch.real]


def prefill(
    model: T5, cross: CrossCache, rows: list[Row], pad: int, num_beams: int = 1, *, bucketed: bool = False
) -> RowBatch:
    """Rows (sorted by document) prefilled into a new batch whose cache holds their prompts and
    budgets; with beams, each row becomes `num_beams` consecutive rows sharing its prefill.
    bucketed: the batch's row count padded to `bucket_rows` (and again after each compaction)."""
    device = model.device
    cfg = model.config
    P = max(len(r.prefix) for r in rows)
    capacity = P + max(r.max_new_tokens for r in rows)
    cache = KVCache(len(model.decoder.layers), len(rows), cfg.num_heads, capacity, cfg.d_kv, model.dtype, device)
    logits = prefill_prompts(model, cross, rows, cache, P, pad)  # [G, vocab]
    key_keep = prompt_key_keep([len(r.prefix) for r in rows], P, capacity, device)
    doc = upload([r.doc for r in rows], torch.long, device)
    if num_beams > 1:
        cache.repeat_rows(num_beams)
        key_keep, doc, logits = (t.repeat_interleave(num_beams, dim=0) for t in (key_keep, doc, logits))
    return RowBatch(model, cross, cache, key_keep, doc, logits, bucketed=bucketed)


# -- decoding -------------------------------------------------------------------------------


def settle_due(step: int, every: int) -> bool:
    """Whether a deferred search's flags are read after choice number `step` (0-based)."""
    return (step + 1) % every == 0


def choose_next(batch: RowBatch, search, settle: bool = True) -> Tensor | None:
    """The search picks every row's next token and the rows that ended leave the batch. Returns
    the tokens to feed the rows left, or None once the search is done. A deferred search
    (`pidec.search`) is read back only when `settle` is True or its budgets are all spent: one
    host read; otherwise this queues device work only."""
    choice = search.choose(batch.logits)
    if search.deferred and (settle or search.must_settle):
        keep, _ = search.settle(read_list(search.flags(), "settle"))
        choice = apply_keep(choice, keep, batch.doc.device)
    if search.done:
        return None
    batch.logits = None  # the step about to run replaces them
    if choice.keep is not None:
        batch.select(choice.keep)
    return choice.feed


def decode_one_token(batch: RowBatch, search, stats: DecodeStats, sync_every: int = 1) -> bool:
    """One step: choose, compact, run the decoder for the rows left. False once every row ended.
    sync_every: a deferred search is read back after every sync_every-th step."""
    feed = choose_next(batch, search, settle_due(stats.steps, sync_every))
    if feed is None:
        return False
    batch.forward(feed)
    stats.steps += 1
    stats.row_steps += feed.numel()
    return True


def decode_n_tokens(
    batch: RowBatch, search, stats: DecodeStats, should_stop: Callable[[], bool] | None, sync_every: int = 1
) -> None:
    """Steps until every row has ended; `should_stop` is asked before each decoder step."""
    if should_stop is None:
        while decode_one_token(batch, search, stats, sync_every):
            pass
        return
    while (feed := choose_next(batch, search, settle_due(stats.steps, sync_every))) is not None:
        if should_stop():
            raise Aborted(f"stopped after {stats.steps + 1} steps")
        batch.forward(feed)
        stats.steps += 1
        stats.row_steps += feed.numel()


@torch.inference_mode()
def decode(
    model: T5,
    cross: CrossCache,
    rows: list[Row],
    num_beams: int = 1,
    *,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
    compaction: bool = True,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    should_stop: Callable[[], bool] | None = None,
    sync_every: int | None = None,
    pad_rows: bool | None = None,
    cuda_graphs: bool = False,
) -> Decoded:
    """Decode `rows` against `cross` (one entry per document); results in the caller's row order.

    eos_token_id: -1 the model's; None: rows run to their max_new_tokens (the benchmark's
    fixed-length workloads). compaction: rows that ended leave the batch (False keeps them,
    computing on, to measure what compaction saves). length_penalty, early_stopping: beam search
    scoring and stopping, as transformers'. should_stop: asked before every step; True abandons
    the decoding with `Aborted`. sync_every: read back which rows ended every this many steps
    (None: `default_sync_every`, 1 on the CPU); between reads the search's state stays on the
    device and rows that ended compute on, fed pad. The tokens do not depend on it.
    pad_rows: pad the batch's rows up to `bucket_rows` sizes (None: as cuda_graphs). cuda_graphs:
    run each step through a CUDA graph captured per bucketed shape (`StaticSteps`); refused on
    the CPU and with a compiled model."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    steps = Stepping.check(model, sync_every, pad_rows, cuda_graphs, should_stop)
    if not rows:
        return Decoded([], None if num_beams == 1 else [])
    check_rows(rows, cross)
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    order = document_order(rows)
    ordered = [rows[i] for i in order]
    limits = [r.max_new_tokens for r in ordered]
    scoring = dict(compaction=compaction, length_penalty=length_penalty, early_stopping=early_stopping)
    search = new_search(limits, num_beams, eos, pad, model.device, read_every=steps.sync_every, **scoring)
    tokens, scores, stats = decode_sorted(model, cross, ordered, pad, num_beams, search, steps)
    back = inverse(order)
    return Decoded([tokens[b] for b in back], None if scores is None else [scores[b] for b in back], stats)


@dataclass
class Stepping:
    """How `decode` runs its steps: a deferred search is read back every `sync_every` steps; each
    step runs eagerly (`runner` None) or through a `StaticSteps`; `bucketed`: the batch's row
    count is padded to `bucket_rows`; `should_stop` is asked before each step."""

    sync_every: int
    runner: StaticSteps | None = None
    bucketed: bool = False
    should_stop: Callable[[], bool] | None = None

    @classmethod
    def check(
        cls, model: T5, sync_every: int | None, pad_rows: bool | None, cuda_graphs: bool, should_stop
    ) -> Stepping:
        """`decode`'s step options checked: CUDA graphs refused with a compiled model or off CUDA;
        pad_rows None follows cuda_graphs."""
        every = check_sync_every(sync_every, model.device)
        runner = None
        if cuda_graphs:
            if is_compiled(model):
                raise InputError("cuda_graphs: not with a compiled model (torch.compile captures its own graphs)")
            runner = StaticSteps(model, graphs=True)  # refuses a model that is not on a CUDA device
        bucketed = cuda_graphs if pad_rows is None else bool(pad_rows)
        return cls(every, runner, bucketed, should_stop)


def decode_sorted(
    model: T5, cross: CrossCache, rows: list[Row], pad: int, num_beams: int, search, steps: Stepping
) -> tuple[list[list[int]], list[float] | None, DecodeStats]:
    """`decode` of rows sorted by document, their search built: the prompts prefilled, steps until
    every row has ended; returns the tokens and beam scores in this order and the stats
    (decode_s: from the prefill to the last step, the queued device work included)."""
    sync(model.device)
    t0 = time.perf_counter()
    stats = DecodeStats(cross_cache_bytes=cross.nbytes(), document_tokens=read_int(cross.lengths.sum(), "decode"))
    batch = prefill(model, cross, rows, pad, num_beams, bucketed=steps.bucketed)
    batch.runner = steps.runner
    stats.prefill_tokens = sum(len(r.prefix) for r in rows)
    stats.self_cache_bytes = batch.cache.nbytes()
    decode_n_tokens(batch, search, stats, steps.should_stop, steps.sync_every)
    sync(model.device)
    stats.decode_s = time.perf_counter() - t0
    tokens, scores = search.results()
    stats.output_tokens = sum(len(t) for t in tokens)  # EOS not counted
    return tokens, scores, stats


def check_sync_every(sync_every: int | None, device) -> int:
    """`sync_every` checked, None replaced by the device's default."""
    if sync_every is None:
        return default_sync_every(device)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    return sync_every


def drop_empty_docs(cross: CrossCache, doc: Tensor, share: float = 0.25) -> tuple[CrossCache, Tensor]:
    """Drop documents with no row left from the cross cache once `share` of them are empty (each
    drop copies the remaining documents' cache, so by default it is not done for every row; 0:
    whenever one is). Returns the cache and the rows' new document indices."""
    docs = cross.docs
    if docs <= 1:
        return cross, doc
    present = torch.zeros(docs, dtype=torch.bool, device=doc.device)
    present[doc] = True
    empty = docs - read_int(present.sum(), "drop_empty_docs")
    if empty == 0 or empty < share * docs:
        return cross, doc
    kept = present.nonzero().squeeze(1)
    remap = torch.full((docs,), -1, dtype=torch.long, device=doc.device)
    remap[kept] = torch.arange(kept.numel(), device=doc.device)
    return cross.select(kept), remap[doc]


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
