"""T5 in plain PyTorch, built for prompt-in-decoder decoding.

One `T5` module covers original T5 (ReLU feed-forward, LM head tied to the embedding and
scaled by d_model**-0.5), T5 v1.1 / Flan-T5 (gated-GELU, untied head) and mT5 (v1.1 with a
large vocabulary). What differs from the usual seq2seq model is the cross-attention: its keys
and values are computed once per *document* and every decoder *row* of that document attends
to them through one attention call, the rows' queries folded into the query axis:

    q [docs, heads, rows*t, d_kv]  against  k, v [docs, heads, S, d_kv]

`RowGroups` says which document each row belongs to. Nothing here knows about text or tasks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hostsync
from .packing import Linear, linear

# Shapes by name (T5 v1.1 at small, base and large; "tiny" for tests and the demo).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
}


_SIZES = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "max_input_length")
_TOKEN_IDS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")
_POSITION_FIELDS = ("relative_attention_num_buckets", "relative_attention_max_distance")


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5) or "gated-gelu" (T5 v1.1, Flan-T5, mT5)
    tie_word_embeddings: bool = True  # LM head shares the embedding matrix
    scale_decoder_outputs: bool | None = None  # multiply by d_model**-0.5 before the head; None: = tie
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    max_input_length: int = 512  # longest document accepted without truncation (HF: n_positions)
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for saving

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        self.validate()

    def validate(self) -> None:
        """Every field of the right type and in range, or ValueError naming the field: sizes are
        integers >= 1 (a float, a string or a bool is refused, not rounded), token ids lie in
        [0, vocab_size), the relative-position buckets can be computed. Called on construction;
        call it again after changing fields by hand."""
        for name in _SIZES + _TOKEN_IDS + _POSITION_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"config {name} must be an integer, got {value!r}")
        for name in _SIZES:
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        for name in _TOKEN_IDS:
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"config {name}={getattr(self, name)} is not a token id of the vocabulary "
                    f"(vocab_size={self.vocab_size})"
                )
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"config relative_attention_num_buckets must be >= 4, got {self.relative_attention_num_buckets}"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ValueError(
                f"config relative_attention_max_distance={self.relative_attention_max_distance} must be above half "
                f"of relative_attention_num_buckets={self.relative_attention_num_buckets}"
            )
        for name in ("dropout_rate", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"config {name} must be a number, got {value!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"config dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0.0 < self.layer_norm_epsilon < 1.0:
            raise ValueError(f"config layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        for name in ("tie_word_embeddings", "scale_decoder_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config {name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.feed_forward_proj, str):
            raise ValueError(f"config feed_forward_proj must be a string, got {self.feed_forward_proj!r}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT', e.g. 'relu' or 'gated-gelu'"
            )
        _activation(parts[-1])  # validates the name

    def parameter_count(self) -> int:
        """The number of parameters a T5 of this config has, by arithmetic (nothing is built):
        what a config implies before anything is allocated."""
        d, inner, ff = self.d_model, self.inner_dim, self.d_ff
        ff_params = (3 if self.is_gated else 2) * d * ff
        bias = self.relative_attention_num_buckets * self.num_heads
        encoder = self.num_layers * (4 * d * inner + ff_params + 2 * d) + bias + d
        decoder = self.num_decoder_layers * (8 * d * inner + ff_params + 3 * d) + bias + d
        embed = self.vocab_size * d
        return embed + encoder + decoder + (0 if self.tie_word_embeddings else embed)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_name(cls, size: str, **overrides) -> T5Config:
        """A T5 v1.1 shape by preset name (`PRESETS`: tiny, small, base, large): gated-GELU,
        untied head, the T5 vocabulary, no dropout, unless `overrides` say otherwise."""
        if size not in PRESETS:
            raise ValueError(f"unknown model size {size!r}: expected one of {', '.join(PRESETS)}")
        fields_ = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
        fields_.update(PRESETS[size])
        fields_.update(overrides)
        return cls(**fields_)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


@contextlib.contextmanager
def on_meta_without_init():
    """Modules built inside get meta tensors and skip `torch.nn.init`, for a model whose weights
    are assigned next (a checkpoint's, or a seeded init of its own). Initialising meta tensors
    does no work, but it goes through torch's Python reference ops, whose first call imports
    torch._dynamo: about 2-4 s of every `pidec.load` on a 2-core CPU, for nothing."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, _keep)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor: Tensor, *args, **kwargs) -> Tensor:
    return tensor


def _activation(name: str):
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        # T5 v1.1's "gated-gelu" is the tanh approximation (HF: gelu_new)
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu_exact":
        return F.gelu
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unknown feed-forward activation {name!r} (known: relu, gelu, gelu_new, silu)")


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean, no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff)
            self.wi_1 = Linear(config.d_model, config.d_ff)
        else:
            self.wi = Linear(config.d_model, config.d_ff)
        self.wo = Linear(config.d_ff, config.d_model)
        self.act = _activation(config.activation)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucketing of (key position - query position): exact for small distances, log-spaced
    up to max_distance, one bucket beyond. Decoder (unidirectional) buckets only look back."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = (
        max_exact
        + (
            torch.log(n.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class RelativeBias(nn.Module):
    """Learned per-head bias over bucketed relative positions, shared by all layers of a stack."""

    def __init__(self, config: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.weight = nn.Parameter(torch.zeros(self.num_buckets, config.num_heads))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_pos [t], k_pos [L] -> bias [heads, t, L]"""
        return self.of(k_pos[None, :] - q_pos[:, None])

    def of(self, rel: Tensor) -> Tensor:
        """key - query distances [..., t, L] -> bias [..., heads, t, L]"""
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).movedim(-1, -3)

    def step_table(self, length: int, dtype: torch.dtype) -> Tensor:
        """The bias of every one-token decoding step up to position length-1, as one table
        [1, heads, 1, length]: the query at position p against keys 0..p is the view
        `table[..., length - 1 - p:]`, since the bias depends only on key - query (here -p..0)."""
        rel = torch.arange(1 - length, 1, device=self.weight.device)[None, :]  # [1, length]
        return self.of(rel).unsqueeze(0).to(dtype)


def _heads(x: Tensor, heads: int) -> Tensor:
    """[n, t, heads*d] -> [n, heads, t, d]"""
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)


def _sdpa_query(q: Tensor) -> Tensor:
    """The few-rows `linear` returns its result transposed in memory, so a decoding step's
    queries reach attention with a strided last dimension, and the CPU's fused attention kernel
    then falls back to the unfused one: copying the (small) query first is faster, about 20 us
    of 50 for a step's self-attention and 200 us of 450 for a cross-attention over 1,500
    positions (T5 base, 2 cores)."""
    return q if q.stride(-1) == 1 else q.contiguous()


def _merge(x: Tensor) -> Tensor:
    """[n, heads, t, d] -> [n, t, heads*d]"""
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


class Projections(nn.Module):
    """The q, k, v and o projections of a T5 attention block (the names Hugging Face's weights use)."""

    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.inner_dim
        self.heads = config.num_heads
        self.q = Linear(config.d_model, inner)
        self.k = Linear(config.d_model, inner)
        self.v = Linear(config.d_model, inner)
        self.o = Linear(inner, config.d_model)
        self.dropout = config.dropout_rate


class SelfAttention(Projections):
    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x [n, t, d_model]; mask additive, broadcastable to [n, heads, t, L] (bias + padding + causal).
        With a cache, this step's keys/values are written at cache.pos and attention spans [0, pos + t)."""
        q, k, v = _heads(self.q(x), self.heads), _heads(self.k(x), self.heads), _heads(self.v(x), self.heads)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        # T5 folds the usual 1/sqrt(d) into its initialisation: scale=1.0. `q.contiguous()`: see _sdpa_query
        out = F.scaled_dot_product_attention(_sdpa_query(q), k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        return self.o(_merge(out))


@dataclass
class RowGroups:
    """Which document each decoder row belongs to. Rows are ordered by document.

    `slot` is a row's index among its document's rows; `width` the most rows of any document.
    When every document has exactly `width` rows the fold is a free view (`regular`)."""

    doc: Tensor  # [R] long
    slot: Tensor  # [R] long
    docs: int
    width: int
    regular: bool

    @classmethod
    def from_doc(cls, doc: Tensor, docs: int) -> RowGroups:
        if doc.numel() == 0:
            return cls(doc, doc.clone(), docs, 0, False)
        counts = torch.bincount(doc, minlength=docs)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(doc.numel(), device=doc.device) - starts[doc]
        most = counts.max()
        unordered = (doc[1:] < doc[:-1]).any()
        # one host read (a synchronisation on a GPU) for the three facts the fold needs
        unordered, width, regular = hostsync.read_list(
            torch.stack([unordered.long(), most, (counts == most).all().long()]), "RowGroups.from_doc"
        )
        if unordered:
            raise ValueError("decoder rows must be ordered by document")
        return cls(doc, slot, docs, width, bool(regular))

    @classmethod
    def from_counts(cls, counts: list[int], device=None) -> RowGroups:
        doc = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        return cls.from_doc(doc, len(counts))

    def fold(self, x: Tensor) -> Tensor:
        """[R, t, ...] -> [docs, width*t, ...]: each document's rows side by side on the query axis."""
        R, t = x.shape[:2]
        if self.regular:
            return x.reshape(self.docs, self.width * t, *x.shape[2:])
        out = x.new_zeros(self.docs, self.width, t, *x.shape[2:])
        out[self.doc, self.slot] = x
        return out.view(self.docs, self.width * t, *x.shape[2:])

    def unfold(self, y: Tensor, t: int) -> Tensor:
        """[docs, width*t, ...] -> [R, t, ...]"""
        if self.regular:
            return y.reshape(self.docs * self.width, t, *y.shape[2:])
        return y.view(self.docs, self.width, t, *y.shape[2:])[self.doc, self.slot]


@dataclass
class CrossCache:
    """Cross-attention keys and values, ONE copy per document: k, v [docs, heads, S, d_kv] per layer.
    mask: additive [docs, 1, 1, S] over padded document positions, or None when no document is padded."""

    k: list[Tensor]
    v: list[Tensor]
    mask: Tensor | None
    lengths: Tensor  # [docs] real token counts

    @property
    def docs(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def select(self, index: Tensor) -> CrossCache:
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return CrossCache(
            [k.index_select(0, index) for k in self.k],
            [v.index_select(0, index) for v in self.v],
            mask,
            self.lengths.index_select(0, index),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CrossAttention(Projections):
    def project(self, enc: Tensor) -> tuple[Tensor, Tensor]:
        """encoder output [docs, S, d_model] -> k, v [docs, heads, S, d_kv]; done once per document."""
        return _heads(self.k(enc), self.heads), _heads(self.v(enc), self.heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: RowGroups) -> Tensor:
        """x [R, t, d_model] -> [R, t, d_model]. The R rows are folded into their documents' query
        axis so that each document's k/v is read once for all of its rows."""
        t = x.shape[1]
        q = self.q(x)  # [R, t, inner]
        q = _heads(groups.fold(q), self.heads)  # [docs, heads, width*t, d_kv]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(_sdpa_query(q), k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        out = groups.unfold(_merge(out), t)  # [R, t, inner]
        return self.o(out)


class EncoderLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = SelfAttention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attn = SelfAttention(config)
        self.cross_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.cross_attn = CrossAttention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor, mask: Tensor, cross: CrossCache, groups: RowGroups, cache, layer: int) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), mask, cache, layer))
        h = self.cross_attn(self.cross_attn_norm(x), cross.k[layer], cross.v[layer], cross.mask, groups)
        x = x + self.dropout(h)
        return x + self.dropout(self.ff(self.ff_norm(x)))


class KVCache:
    """Per-row self-attention cache, preallocated: k, v [rows, heads, capacity, d_kv] per layer.

    All rows write at the same position `pos`: each row's prompt is placed so that all prompts end
    together, which T5's relative positions allow (only key - query distances matter; the slots
    before a shorter prompt are masked)."""

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, d_kv: int, dtype, device):
        shape = (rows, heads, capacity, d_kv)
        # never read before written: attention spans [0, pos + t) only
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pos = 0  # positions [0, pos) are filled
        self._step = 0

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[2]
        end = self.pos + t
        if end > self.capacity:
            raise RuntimeError(f"self-attention cache full: {end} positions > capacity {self.capacity}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        self._step = t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self) -> None:
        """Called once per forward pass, after every layer has written."""
        self.pos += self._step
        self._step = 0

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (in that order): compaction and beam reordering."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]

    def repeat_rows(self, n: int) -> None:
        """Each row becomes n consecutive rows (beams start from a shared prompt prefill)."""
        if n > 1:
            self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
            self.v = [v.repeat_interleave(n, dim=0) for v in self.v]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PackedPrefill:
    """Stands in for the KVCache while the prompts are prefilled packed: several rows' prompts
    laid end to end in one sequence (a segment), so that no compute goes to padding. Each layer's
    keys/values are scattered to their rows' cache slots; attention runs within the segment,
    kept to each row by the mask.

    seg, tok: where each real prompt token sits in the packed batch [segments, T];
    row, pos: where it goes in the cache (pos = P - len(prefix) + i: prompts end together)."""

    def __init__(self, cache: KVCache, seg: Tensor, tok: Tensor, row: Tensor, pos: Tensor, end: int):
        self.cache, self.seg, self.tok, self.row, self.pos, self.end = cache, seg, tok, row, pos, end
        if pos.numel() < cache.rows * end:
            # slots before a short prompt are never written; masked attention gives them weight 0,
            # and 0 * (uninitialised NaN) would still be NaN
            for t in cache.k + cache.v:
                t[:, :, :end].zero_()

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k [segments, heads, T, d] -> [tokens, heads, d] -> cache[row, :, pos]
        self.cache.k[layer][self.row, :, self.pos] = k[self.seg, :, self.tok]
        self.cache.v[layer][self.row, :, self.pos] = v[self.seg, :, self.tok]
        return k, v

    def advance(self) -> None:
        self.cache.pos = self.end


class Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.rel_bias = RelativeBias(config, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


class Decoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.rel_bias = RelativeBias(config, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


def additive_mask(keep: Tensor, dtype) -> Tensor:
    """bool keep-mask -> additive mask (0 where kept, most negative finite value elsewhere)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class LanguageModel(nn.Module):
    """What `T5` and the decoder-only `pidec.causal.CausalLM` share: a token embedding `embed`
    (its weight's dtype and device are the model's), an output head `lm_head`, or None where the
    head is the embedding (tied), and `packed`: whether the linear weights go through their
    oneDNN-packed copies for CPU inference (`pidec.packing`). A subclass sets the three."""

    embed: nn.Embedding
    lm_head: nn.Module | None
    packed: bool

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., d] -> logits [..., vocab] through the head (the embedding when tied)."""
        if self.lm_head is None:
            return linear(hidden, self.embed.weight, self.packed)
        return self.lm_head(hidden)  # the module, so that a quantized head is called as such

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class T5(LanguageModel):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.d_model, config.vocab_size)
        self.gradient_checkpointing = False
        self.packed = False  # oneDNN-packed linear weights for CPU inference (pidec.packing)

    # -- encoder ---------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [docs, S] (right-padded), attention_mask [docs, S] bool -> [docs, S, d_model]"""
        S = input_ids.shape[1]
        x = self.encoder.dropout(self.embed(input_ids))
        pos = torch.arange(S, device=input_ids.device)
        # [1, heads, S, S], contiguous once here: the bias is a transposed view of its
        # embedding lookup, which the fused attention kernel would otherwise copy in every layer
        mask = self.encoder.rel_bias(pos, pos).unsqueeze(0).to(x.dtype).contiguous()
        if attention_mask is not None and not hostsync.read_bool(attention_mask.all(), "T5.encode"):
            mask = mask.masked_fill(~attention_mask[:, None, None, :].bool(), torch.finfo(x.dtype).min)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return self.encoder.dropout(self.encoder.final_norm(x))

    def cross_cache(self, enc: Tensor, attention_mask: Tensor | None = None) -> CrossCache:
        """Project the encoder output to every decoder layer's cross-attention keys/values, once."""
        ks, vs = [], []
        for layer in self.decoder.layers:
            k, v = layer.cross_attn.project(enc)
            if not torch.is_grad_enabled():
                # decoding reads this cache at every step: store each head's [S, d_kv] block
                # contiguous (one copy per document), the layout `CrossCache.select` and
                # `concat_cross` produce too, so the steps see one layout (and a compiled step
                # one set of strides) whether or not documents were dropped
                k, v = k.contiguous(), v.contiguous()
            ks.append(k)
            vs.append(v)
        if attention_mask is None:
            attention_mask = torch.ones(enc.shape[:2], dtype=torch.bool, device=enc.device)
        attention_mask = attention_mask.bool()
        keep_all = hostsync.read_bool(attention_mask.all(), "T5.cross_cache")
        mask = None if keep_all else additive_mask(attention_mask[:, None, None, :], enc.dtype)
        return CrossCache(ks, vs, mask, attention_mask.sum(-1))

    # -- decoder ---------------------------------------------------------------------------

    def self_attention_mask(self, q_pos: Tensor, k_pos: Tensor, key_keep: Tensor | None) -> Tensor:
        """Relative bias with causal and key-padding masking folded in: [1 or rows, heads, t, L].
        Masks are combined as booleans first so that no sum of two large negatives overflows."""
        bias = self.decoder.rel_bias(q_pos, k_pos).unsqueeze(0).to(self.dtype)
        keep = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, t, L]
        if key_keep is not None:
            keep = keep & key_keep[:, None, None, :].bool()
        if bool(keep.all()):
            return bias
        return bias.masked_fill(~keep, torch.finfo(self.dtype).min)

    def decode(
        self,
        tokens: Tensor,
        cross: CrossCache,
        groups: RowGroups,
        mask: Tensor,
        cache: KVCache | None = None,
    ) -> Tensor:
        """tokens [R, t] -> final hidden states [R, t, d_model] (before the LM head)."""
        x = self.decoder.dropout(self.embed(tokens))
        for i, layer in enumerate(self.decoder.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, cross, groups, None, i, use_reentrant=False)
            else:
                x = layer(x, mask, cross, groups, cache, i)
        if cache is not None:
            cache.advance()
        return self.decoder.dropout(self.decoder.final_norm(x))

    def logits(self, hidden: Tensor) -> Tensor:
        """Original T5 scales the decoder's output by d_model**-0.5 before its (tied) head."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model**-0.5)
        return super().logits(hidden)

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        row_doc: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced forward, for training and parity checks.

        input_ids [docs, S]; decoder_input_ids [R, T] right-padded; row_doc [R] maps each decoder
        row to its document (default: row i <-> document i, the usual one-to-one seq2seq).
        Returns logits [R, T, vocab]."""
        enc = self.encode(input_ids, attention_mask)
        cross = self.cross_cache(enc, attention_mask)
        R, T = decoder_input_ids.shape
        if row_doc is None:
            if R != input_ids.shape[0]:
                raise ValueError(f"{R} decoder rows for {input_ids.shape[0]} documents: pass row_doc")
            row_doc = torch.arange(R, device=input_ids.device)
        groups = RowGroups.from_doc(row_doc.to(input_ids.device), input_ids.shape[0])
        pos = torch.arange(T, device=input_ids.device)
        keep = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        mask = self.self_attention_mask(pos, pos, keep)
        return self.logits(self.decode(decoder_input_ids, cross, groups, mask))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, position_std: float | None = None) -> T5:
        """T5's initialisation (Mesh TensorFlow's, as transformers also does it), for training
        from scratch: each projection N(0, fan_in**-0.5), with queries further scaled by
        d_kv**-0.5 because T5 attention has no 1/sqrt(d) factor; embedding N(0, 1); an untied head
        N(0, d_model**-0.5), so that the first logits are of unit scale (transformers draws it
        N(0, 1), which starts training from scratch at a loss of ~30); relative biases
        N(0, d_model**-0.5) unless `position_std` is given; norms 1."""
        cfg = self.config
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed.weight":
                p.normal_(0.0, 1.0, generator=generator)
            elif name == "lm_head.weight":
                p.normal_(0.0, cfg.d_model**-0.5, generator=generator)
            elif "rel_bias" in name:
                std = cfg.d_model**-0.5 if position_std is None else position_std
                p.normal_(0.0, std, generator=generator)
            elif name.endswith((".q.weight",)):
                p.normal_(0.0, (cfg.d_model * cfg.d_kv) ** -0.5, generator=generator)
            else:  # k, v, o, wi*, wo: N(0, fan_in**-0.5)
                p.normal_(0.0, p.shape[1] ** -0.5, generator=generator)
        return self


def config_fields() -> set[str]:
    return {f.name for f in fields(T5Config)}
