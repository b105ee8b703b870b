"""A decoder-only language model (Llama, Qwen2, Qwen3, Mistral) in plain PyTorch, built for
decoding many rows over one shared prefix.

One `CausalLM` covers the Llama family (Llama 2/3.x, SmolLM: RMSNorm, rotary positions with
Llama 3's rope scaling, grouped-query attention, SwiGLU), Qwen2 (biases on q, k and v), Qwen3
(RMSNorm on each query and key head) and Mistral (Llama's shape; its sliding window is not
implemented, so a sequence longer than the window is refused where rows are built).

What differs from the usual causal LM is attention over a *shared prefix* (the decoder-only
form of prompt-in-decoder; Hydragen, FlashInfer's cascade attention). A document's prefix is
prefilled once; its keys and values are stored ONE copy per document, a `CrossCache`:

    prefix k, v [docs, kv_heads, S, head_dim]      (lengths [docs]; a mask over padding)

Each row (the document's prompt and answer) keeps its own suffix keys and values in a `KVCache`
[rows, kv_heads, L, head_dim]. Attention of a row's queries is computed in two parts:

- against the prefix: every row of a document and every query head that shares a KV head are
  folded into the query axis, `q [docs, kv_heads, rows*t*group, d]` against the document's
  single copy, one matrix product over a cache read once;
- against the row's own suffix, per row, causal;

and the two partial results are merged by their log-sum-exp, which is exactly softmax attention
over the concatenated keys. Rotary positions of a suffix continue from its prefix's length, as
for the row alone. With no prefix (`prefix=None`) it is the plain causal LM (the `pie` layout:
each row whole; prefilling the prefixes themselves).

Attention is computed in float32 (scores, log-sum-exp, merge) whatever the weights' dtype.
Nothing here knows about text, templates or tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import packing
from ..model import CrossCache, LanguageModel, RowGroups, additive_mask
from ..model import RMSNorm as T5RMSNorm

ROPE_TYPES = ("default", "linear", "llama3")

# Shapes by name, for the benchmark's random-weight models (their published config.json shapes).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}


@dataclass
class CausalConfig:
    model_type: str = "llama"  # llama | qwen2 | qwen3 | mistral
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: = num_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} or None
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets it and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral (or Qwen with use_sliding_window): longest sequence accepted
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    max_input_length: int | None = None  # longest row (document + prompt) without truncation; None: the context
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary positions")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={self.hidden_act!r}: only silu (SwiGLU) is supported")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.max_input_length is None:
            self.max_input_length = self.context_length

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """The longest sequence (row + generated tokens) the model takes."""
        if self.sliding_window:
            return min(self.max_position_embeddings, int(self.sliding_window))
        return self.max_position_embeddings

    @classmethod
    def from_name(cls, name: str, **overrides) -> CausalConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown decoder-only preset {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


class RMSNorm(T5RMSNorm):
    """Llama's RMSNorm: T5's weight and epsilon, the statistics in float32, the weight applied in
    the input's dtype (T5 casts only to a half-precision weight's dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Linear(packing.Linear):
    """`packing.Linear` (packed and few-rows CPU products) with an optional bias (Qwen2's q, k, v)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y = packing.linear(x, self.weight, self.packed)
        return y if self.bias is None else y + self.bias


def inverse_frequencies(config: CausalConfig) -> Tensor:
    """Rotary inverse frequencies [head_dim/2] in float32, with linear or Llama 3 scaling, as
    transformers computes them."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Rotary(nn.Module):
    def __init__(self, config: CausalConfig):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [n, t] -> cos, sin [n, t, 1, head_dim] (broadcast over heads)."""
        freqs = pos.to(torch.float32)[..., None] * self.inv_freq.float()  # [n, t, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _flash_cpu():
    """torch's fused CPU attention that also returns the log-sum-exp (what `F.scaled_dot_product_attention`
    runs on the CPU), or None where this torch lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


FLASH_CPU = _flash_cpu()


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns its log-sum-exp, in float32.

    q [n, h, tq, d], k, v [n, h, L, d], mask additive float32 broadcastable to [n, h, tq, L]
    -> out [n, h, tq, d], lse [n, h, tq, 1]. On the CPU through torch's fused flash kernel (no
    [tq, L] score matrix kept), elsewhere written out."""
    q, k, v = q.float(), k.float(), v.float()
    if FLASH_CPU is not None and q.device.type == "cpu":
        # the kernel reads a strided last dimension wrongly (a few-rows product returns its
        # result transposed in memory, see packing.linear): such inputs are copied first
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse.unsqueeze(-1)
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is not None:
        s = s + mask
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    return torch.matmul(p / total, v), m + torch.log(total)


def merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tensor:
    """Two partial attentions over disjoint key sets -> attention over their union."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1 * w1 + o2 * w2) / (w1 + w2)


def _grouped(x: Tensor, kv: int) -> Tensor:
    """[n, t, heads, d] -> [n, kv, t*group, d]: the query heads sharing a KV head on the query axis."""
    n, t, h, d = x.shape
    return x.view(n, t, kv, h // kv, d).permute(0, 2, 1, 3, 4).reshape(n, kv, t * (h // kv), d)


def _ungrouped(x: Tensor, t: int) -> Tensor:
    """[n, kv, t*group, d] -> [n, t, kv*group, d]"""
    n, kv, tg, d = x.shape
    return x.view(n, kv, t, tg // t, d).permute(0, 2, 1, 3, 4).reshape(n, t, kv * (tg // t), d)


def _repeat_mask(mask: Tensor | None, group: int) -> Tensor | None:
    """[n, 1, t, L] -> [n, 1, t*group, L], matching `_grouped`'s query order (t major)."""
    if mask is None or mask.shape[2] == 1 or group == 1:
        return mask
    n, one, t, L = mask.shape
    return mask[:, :, :, None, :].expand(n, one, t, group, L).reshape(n, one, t * group, L)


class Attention(nn.Module):
    def __init__(self, config: CausalConfig):
        super().__init__()
        self.heads, self.kv, self.d = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = self.d**-0.5
        self.q = Linear(config.hidden_size, self.heads * self.d, config.qkv_bias)
        self.k = Linear(config.hidden_size, self.kv * self.d, config.qkv_bias)
        self.v = Linear(config.hidden_size, self.kv * self.d, config.qkv_bias)
        self.o = Linear(self.heads * self.d, config.hidden_size, config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.d, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache,
        layer: int,
        prefix: CrossCache | None,
        groups: RowGroups | None,
    ) -> Tensor:
        """x [n, t, hidden]; mask additive over the row's own keys [n, 1, t, L] (or None: all
        visible). `cache` stores this pass's keys/values and returns the row's keys so far
        ([n, kv, L, d]); `prefix` (with `groups` saying each row's document) adds attention to
        the documents' shared prefix."""
        n, t, _ = x.shape
        q = self.q(x).view(n, t, self.heads, self.d)
        k = self.k(x).view(n, t, self.kv, self.d)
        v = self.v(x).view(n, t, self.kv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [n, kv, t, d]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out, lse = attend(_grouped(q, self.kv), k, v, _repeat_mask(mask, self.heads // self.kv), self.scale)
        if prefix is not None:
            # all rows of a document, and all query heads of a KV head, in one product
            qf = _grouped(groups.fold(q), self.kv)  # [docs, kv, width*t*group, d]
            o1, lse1 = attend(qf, prefix.k[layer], prefix.v[layer], prefix.mask, self.scale)
            o1 = groups.unfold(_ungrouped(o1, groups.width * t), t)  # [n, t, heads, d]
            lse1 = groups.unfold(_ungrouped(lse1, groups.width * t), t)
            out = merge(_grouped(o1, self.kv), _grouped(lse1, self.kv), out, lse)
        out = _ungrouped(out, t).reshape(n, t, self.heads * self.d).to(x.dtype)
        return self.o(out)


class MLP(nn.Module):
    def __init__(self, config: CausalConfig):
        super().__init__()
        self.gate = Linear(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.up = Linear(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: CausalConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer, prefix, groups) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, prefix, groups)
        return x + self.mlp(self.mlp_norm(x))


class PrefixWriter:
    """Stands in for a cache while the documents' prefixes are prefilled: keeps each layer's
    keys and values, contiguous, to become the shared prefix cache."""

    def __init__(self):
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.append(k.contiguous())
        self.v.append(v.contiguous())
        return k, v

    def advance(self) -> None:
        pass


def causal_mask(lengths: Tensor, T: int, dtype) -> Tensor | None:
    """Right-padded sequences of `lengths` [n] in a [n, T] batch -> additive [n, 1, T, T] mask
    (causal, padded keys hidden)."""
    pos = torch.arange(T, device=lengths.device)
    keep = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lengths[:, None, None])
    return additive_mask(keep[:, None], dtype)


class CausalLM(LanguageModel):
    def __init__(self, config: CausalConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.rotary = Rotary(config)
        self.packed = False  # oneDNN-packed linear weights for CPU inference (pidec.packing)

    def forward_hidden(
        self,
        tokens: Tensor,
        pos: Tensor,
        mask: Tensor | None,
        cache=None,
        prefix: CrossCache | None = None,
        groups: RowGroups | None = None,
    ) -> Tensor:
        """tokens, pos [n, t] -> final hidden states [n, t, hidden] (before the LM head).
        mask: additive over the row's own keys, [n, 1, t, L] (None: every key visible)."""
        x = self.embed(tokens)
        cos, sin = self.rotary(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, prefix, groups)
        if cache is not None:
            cache.advance()
        return self.norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits [n, T, vocab] of right-padded rows (parity checks; a hook for
        training)."""
        n, T = input_ids.shape
        lengths = (
            torch.full((n,), T, device=input_ids.device) if attention_mask is None else attention_mask.long().sum(-1)
        )
        pos = torch.arange(T, device=input_ids.device).expand(n, T)
        return self.logits(self.forward_hidden(input_ids, pos, causal_mask(lengths, T, torch.float32)))

    @torch.inference_mode()
    def prefill_prefix(self, docs: list[list[int]]) -> CrossCache:
        """Documents' shared prefixes (token lists, right-padded here) -> their key/value cache,
        one copy per document. An empty prefix is allowed (its keys are all masked)."""
        if not docs:
            raise ValueError("no prefixes to prefill")
        lengths = torch.tensor([len(d) for d in docs], device=self.device)
        S = max(1, int(lengths.max()))
        ids = torch.zeros((len(docs), S), dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
        ids = ids.to(self.device)
        pos = torch.arange(S, device=self.device).expand(len(docs), S)
        writer = PrefixWriter()
        self.forward_hidden(ids, pos, causal_mask(lengths, S, torch.float32), writer)
        keep = torch.arange(S, device=self.device)[None, :] < lengths[:, None]
        mask = None if bool(keep.all()) else additive_mask(keep[:, None, None, :], torch.float32)
        return CrossCache(writer.k, writer.v, mask, lengths)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> CausalLM:
        """Random weights as transformers draws them (N(0, std), norms 1, biases 0): for the
        benchmark, whose speed does not depend on the values."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        return self
