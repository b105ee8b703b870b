"""The analytic side of the benchmark: matmul FLOPs, bytes moved per decoding step and
documents that fit in a memory budget. Pure arithmetic on a `T5Config` and a few shape numbers
(`bench.configs` supplies them per configuration); the timed half, the machine's own matmul
ceiling and memory bandwidth, is `bench.ceiling`.

FLOPs count matrix products only, 2 per multiply-add, of what a configuration actually
computes, padding included. Bytes moved per decoding step = the weights one decoder pass reads
+ the cross-attention keys/values it attends to + the self-attention keys/values of the rows
still decoding. A decoding step does little arithmetic per byte, so at small batch these bytes,
not the FLOPs, set its speed; prompt-in-decoder shrinks the cross-attention term by reading one
copy of a document's cache for all of its rows. `phase_work` and `floor` join the two sides:
per phase (encode, cross K/V projection, prefill, decoding steps) the FLOPs and the bytes read,
and the least time they can take at a measured GEMM ceiling and memory bandwidth. How the
columns are used: docs/performance.md.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..model import T5Config

SCALE_BYTES = 4  # an int8 linear layer keeps one float32 scale per output channel


# -- FLOPs (matmuls only, 2 per multiply-add) -----------------------------------------------


def _ffn_flops(cfg: T5Config) -> int:
    return 2 * cfg.d_model * cfg.d_ff * (3 if cfg.is_gated else 2)


def encoder_token_flops(cfg: T5Config, seq_len: int) -> int:
    """One encoder token in a sequence of `seq_len` (padding included), all encoder layers:
    q/k/v/o projections, attention scores and weighted sum over seq_len keys, feed-forward."""
    inner = cfg.inner_dim
    per_layer = 8 * cfg.d_model * inner + 4 * seq_len * inner + _ffn_flops(cfg)
    return cfg.num_layers * per_layer


def cross_kv_flops(cfg: T5Config) -> int:
    """Projecting one encoded token to the cross-attention keys and values of every decoder layer."""
    return cfg.num_decoder_layers * 4 * cfg.d_model * cfg.inner_dim


def decoder_token_flops(cfg: T5Config, self_len: int, cross_len: int) -> int:
    """One decoder token, all decoder layers, without the LM head: self-attention projections and
    scores over `self_len` keys, cross-attention q/o projections and scores over `cross_len`
    keys (their k/v projection is `cross_kv_flops`), feed-forward."""
    inner, d = cfg.inner_dim, cfg.d_model
    per_layer = 8 * d * inner + 4 * self_len * inner + 4 * d * inner + 4 * cross_len * inner + _ffn_flops(cfg)
    return cfg.num_decoder_layers * per_layer


def lm_head_flops(cfg: T5Config) -> int:
    return 2 * cfg.d_model * cfg.vocab_size


def decoding_flops(
    cfg: T5Config,
    prefix: int,
    lengths: list[int],
    cross_len: int,
    compaction: bool,
    head_on_prefix: bool = False,
    packed: list[int] | None = None,
) -> int:
    """A batch of rows sharing a left-padded prefix of `prefix` tokens, row i generating lengths[i]
    tokens: a prefill pass (every prefix position computed, dense attention over the prefix),
    then one pass per further token over the rows still alive (all rows without compaction).
    The LM head runs on the last position of each pass (on every prefix position with
    `head_on_prefix`, as transformers' T5 does). `packed`: the rows' own prefix lengths, when
    the prefill computes only those tokens (pidec packs them), not prefix tokens per row."""
    rows, longest = len(lengths), max(lengths)
    if packed is None:
        total = rows * prefix * decoder_token_flops(cfg, prefix, cross_len)
    else:
        total = sum(n * decoder_token_flops(cfg, n, cross_len) for n in packed)
    total += rows * (prefix if head_on_prefix else 1) * lm_head_flops(cfg)
    for step in range(1, longest):
        alive = sum(1 for n in lengths if n > step) if compaction else rows
        total += alive * (decoder_token_flops(cfg, prefix + step, cross_len) + lm_head_flops(cfg))
    return total


# -- bytes ------------------------------------------------------------------------------------


def linear_bytes(in_features: int, out_features: int, element_size: int, int8: bool = False) -> int:
    """A bias-free linear layer's weight: in x out elements, or in x out bytes + a scale per output."""
    if int8:
        return in_features * out_features + SCALE_BYTES * out_features
    return in_features * out_features * element_size


def _ffn_shapes(cfg: T5Config) -> list[tuple[int, int]]:
    return [(cfg.d_model, cfg.d_ff)] * (2 if cfg.is_gated else 1) + [(cfg.d_ff, cfg.d_model)]


def _attention_shapes(cfg: T5Config) -> list[tuple[int, int]]:
    d, inner = cfg.d_model, cfg.inner_dim
    return [(d, inner)] * 3 + [(inner, d)]


def step_weight_bytes(cfg: T5Config, element_size: int, int8: bool = False, head_int8: bool = False) -> int:
    """The weights one decoder pass reads: per layer the self-attention q/k/v/o, the
    cross-attention q and o (its k and v were applied to the document once, before decoding),
    the feed-forward and three norms; then the final norm and the LM head (the embedding when
    tied). `int8`: the linear layers of the layers are int8; `head_int8`: the head too. Left out:
    the few embedding rows looked up and the relative-position table (heads x buckets)."""
    d = cfg.d_model
    linears = _attention_shapes(cfg) + [(d, cfg.inner_dim), (cfg.inner_dim, d)] + _ffn_shapes(cfg)
    per_layer = sum(linear_bytes(i, o, element_size, int8) for i, o in linears) + 3 * d * element_size
    head = linear_bytes(d, cfg.vocab_size, element_size, head_int8 and not cfg.tie_word_embeddings)
    return cfg.num_decoder_layers * per_layer + d * element_size + head


def packed_weight_bytes(cfg: T5Config, int8: bool = False) -> int:
    """The oneDNN-packed float32 copies a packed model keeps beside its weights
    (`pidec.packing`): every linear layer of both stacks and the LM head (the embedding when
    tied); with int8 layers, the float head only."""
    d = cfg.d_model
    head = d * cfg.vocab_size * 4
    if int8:
        return head
    enc = sum(i * o for i, o in _attention_shapes(cfg) + _ffn_shapes(cfg))
    dec = sum(i * o for i, o in _attention_shapes(cfg) * 2 + _ffn_shapes(cfg))
    return (cfg.num_layers * enc + cfg.num_decoder_layers * dec) * 4 + head


def model_weight_bytes(cfg: T5Config, element_size: int, int8: bool = False, head_int8: bool = False) -> int:
    """Every weight of the model: embedding, both stacks, norms, relative biases, untied head."""
    d = cfg.d_model
    enc_layer = sum(linear_bytes(i, o, element_size, int8) for i, o in _attention_shapes(cfg) + _ffn_shapes(cfg))
    enc_layer += 2 * d * element_size
    dec_linears = _attention_shapes(cfg) * 2 + _ffn_shapes(cfg)
    dec_layer = sum(linear_bytes(i, o, element_size, int8) for i, o in dec_linears) + 3 * d * element_size
    total = cfg.vocab_size * d * element_size  # embedding
    total += cfg.num_layers * enc_layer + cfg.num_decoder_layers * dec_layer + 2 * d * element_size
    total += 2 * cfg.relative_attention_num_buckets * cfg.num_heads * element_size
    if not cfg.tie_word_embeddings:
        total += linear_bytes(d, cfg.vocab_size, element_size, head_int8)
    return total


def kv_bytes(cfg: T5Config, rows: int, length: int, element_size: int) -> int:
    """Keys and values of every decoder layer for `rows` sequences of `length` positions."""
    return 2 * cfg.num_decoder_layers * rows * cfg.num_heads * length * cfg.d_kv * element_size


def _decoding_passes(cfg, prefix, lengths, cross_len, cross_per_row, compaction, element_size):
    """(s, rows alive, cross-attention bytes, self-attention bytes) of each decoding pass
    s = 1 .. max(lengths) - 1 after the prefill (`decoding_step_bytes` says what is counted)."""
    rows, longest = len(lengths), max(lengths)
    held = rows  # cross-attention copies held (per-row layouts)
    for s in range(1, longest):
        alive = sum(1 for n in lengths if n > s) if compaction else rows
        if cross_per_row:
            if compaction:
                empty = held - alive
                if held > 1 and empty > 0 and empty * 4 >= held:
                    held = alive
            copies = held
        else:
            copies = 1
        yield s, alive, kv_bytes(cfg, copies, cross_len, element_size), kv_bytes(cfg, alive, prefix + s, element_size)


def decoding_step_bytes(
    cfg: T5Config,
    prefix: int,
    lengths: list[int],
    cross_len: int,
    cross_per_row: bool,
    compaction: bool,
    element_size: int,
    int8: bool = False,
    head_int8: bool = False,
) -> dict:
    """Mean bytes moved per decoding pass after the prefill, over the passes of one document.

    Rows share a prefix of `prefix` positions and row i writes lengths[i] tokens, so pass s
    (s = 1 .. max(lengths) - 1) runs the rows with lengths[i] > s (every row without
    compaction), each reading prefix + s self-attention positions. Cross-attention:
    one copy of the document's `cross_len` positions (`cross_per_row=False`, pid and seq), or
    one copy per row (pie, transformers). With compaction pidec drops the copies of finished
    rows only once a quarter of those held are finished (`generate.drop_empty_docs`), and
    that is what is counted.

    Returns mean bytes per pass: weights, cross, self, total; and the number of passes."""
    weights = step_weight_bytes(cfg, element_size, int8, head_int8)
    cross_sum = self_sum = passes = 0
    for _, _, cross, self_ in _decoding_passes(
        cfg, prefix, lengths, cross_len, cross_per_row, compaction, element_size
    ):
        cross_sum += cross
        self_sum += self_
        passes += 1
    if passes == 0:
        return {"weights": 0.0, "cross": 0.0, "self": 0.0, "total": 0.0, "passes": 0}
    cross, self_ = cross_sum / passes, self_sum / passes
    return {
        "weights": float(weights),
        "cross": cross,
        "self": self_,
        "total": weights + cross + self_,
        "passes": passes,
    }


# -- the floor: arithmetic at the GEMM ceiling, bytes at the measured bandwidth -------------------

PHASES = ("encode", "cross_kv", "prefill", "decode")


def encoder_weight_bytes(cfg: T5Config, element_size: int, int8: bool = False) -> int:
    """The weights one encoder pass reads: every layer's attention and feed-forward linears and
    its two norms, and the final norm (the embedding rows looked up are left out)."""
    d = cfg.d_model
    linears = _attention_shapes(cfg) + _ffn_shapes(cfg)
    per_layer = sum(linear_bytes(i, o, element_size, int8) for i, o in linears) + 2 * d * element_size
    return cfg.num_layers * per_layer + d * element_size


def cross_kv_weight_bytes(cfg: T5Config, element_size: int, int8: bool = False) -> int:
    """The cross-attention key and value projections of every decoder layer."""
    return cfg.num_decoder_layers * 2 * linear_bytes(cfg.d_model, cfg.inner_dim, element_size, int8)


def phase_work(
    cfg: T5Config,
    enc_rows: int,
    enc_len: int,
    cross_rows: int,
    prefix: int,
    lengths: list[int],
    compaction: bool,
    element_size: int,
    int8: bool = False,
    head_int8: bool = False,
    head_on_prefix: bool = False,
    packed: list[int] | None = None,
) -> dict[str, list[tuple[int, int]]]:
    """What one document costs, phase by phase, as passes of (FLOPs, bytes read):

    - encode: one pass, `enc_rows` rows of `enc_len` tokens; bytes: the encoder's weights.
    - cross_kv: one pass projecting `cross_rows` x `enc_len` encoded tokens to every decoder
      layer's cross keys and values; bytes: those projections' weights.
    - prefill: one pass over every row's prefix (`decoding_flops`' first pass, `packed` and
      `head_on_prefix` as there); bytes: one decoder pass's weights and the cross cache
      (`cross_rows` copies).
    - decode: one entry per further pass, the rows alive at it (`decoding_flops`); bytes: one
      decoder pass's weights + the cross and self caches it attends to (`decoding_step_bytes`).

    The FLOPs of the four phases add up to what `decoding_flops` and the encoder and cross
    terms of `configs.config_flops` count. Layer norms, softmax and the other element-wise work
    are left out of both columns, so the floor they give is a lower bound."""
    cross_per_row = cross_rows > 1
    step_weights = step_weight_bytes(cfg, element_size, int8, head_int8)
    rows = len(lengths)
    if packed is None:
        prefill_flops = rows * prefix * decoder_token_flops(cfg, prefix, enc_len)
    else:
        prefill_flops = sum(n * decoder_token_flops(cfg, n, enc_len) for n in packed)
    prefill_flops += rows * (prefix if head_on_prefix else 1) * lm_head_flops(cfg)
    cross_cache = kv_bytes(cfg, cross_rows if cross_per_row else 1, enc_len, element_size)
    decode = [
        (
            alive * (decoder_token_flops(cfg, prefix + s, enc_len) + lm_head_flops(cfg)),
            step_weights + cross + self_,
        )
        for s, alive, cross, self_ in _decoding_passes(
            cfg, prefix, lengths, enc_len, cross_per_row, compaction, element_size
        )
    ]
    return {
        "encode": [
            (enc_rows * enc_len * encoder_token_flops(cfg, enc_len), encoder_weight_bytes(cfg, element_size, int8))
        ],
        "cross_kv": [(cross_rows * enc_len * cross_kv_flops(cfg), cross_kv_weight_bytes(cfg, element_size, int8))],
        "prefill": [(prefill_flops, step_weights + cross_cache)],
        "decode": decode,
    }


def floor(work: dict[str, list[tuple[int, int]]], flops_per_s: float, bytes_per_s: float) -> dict:
    """The roofline floor of `phase_work`'s passes: each pass takes at least its FLOPs at the
    GEMM ceiling or its bytes at the measured bandwidth, whichever is longer (a decoding step
    is bound by its bytes, a 512-row encoder pass by its FLOPs); a phase's floor is the sum over
    its passes, the document's the sum over its phases. Returns {phase: {"flops", "bytes",
    "passes", "floor_s", "bound"}, "total_s": ...}, `bound` naming the side that set most of the
    phase's floor ("compute" or "memory")."""
    if flops_per_s <= 0 or bytes_per_s <= 0:
        raise ValueError(f"floor needs a positive ceiling and bandwidth, got {flops_per_s} FLOP/s, {bytes_per_s} B/s")
    out, total = {}, 0.0
    for name, passes in work.items():
        compute = sum(f / flops_per_s for f, b in passes if f / flops_per_s >= b / bytes_per_s)
        memory = sum(b / bytes_per_s for f, b in passes if f / flops_per_s < b / bytes_per_s)
        out[name] = {
            "flops": sum(f for f, _ in passes),
            "bytes": sum(b for _, b in passes),
            "passes": len(passes),
            "floor_s": compute + memory,
            "bound": "compute" if compute >= memory else "memory",
        }
        total += compute + memory
    out["total_s"] = total
    return out


# -- memory budget --------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """'8GiB', '512MiB', '16GB' (10**9), '2e9', 4096 -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {text!r}: expected a size such as 8GiB, 512MiB or 16GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory budget {text!r}: must be > 0")
    return value


@dataclass
class MemoryEstimate:
    """Memory of decoding documents together: the weights once, the working memory of encoding
    one document at a time (`transient`), and what each document holds while it decodes
    (`per_doc`: cross-attention cache, preallocated self-attention cache at full length,
    the encoder output where the implementation keeps it, one step's float32 logits)."""

    weights: int
    transient: int
    per_doc: int
    parts: dict  # per_doc split: cross, self, encoder_output, logits

    def fit(self, budget: int) -> int:
        """Documents decoded together within `budget` bytes (0 when even one does not fit)."""
        room = budget - self.weights - self.transient
        return max(0, room // self.per_doc) if self.per_doc > 0 else 0

    def to_dict(self) -> dict:
        return asdict(self)


def decode_memory(
    cfg: T5Config,
    element_size: int,
    weights: int,
    enc_rows: int,
    enc_len: int,
    cross_rows: int,
    rows: int,
    self_len: int,
    keeps_encoder_output: bool,
    per_row_scores: bool,
) -> MemoryEstimate:
    """Analytic memory of one configuration for one document (see MemoryEstimate).

    transient: one encoder layer's working set for the document's `enc_rows` x `enc_len`
    tokens: hidden states in, out and normed, the attention output (4 x d_model), the
    feed-forward activations (d_ff, twice when gated), and the attention scores, heads x
    enc_len per token: for every row where the implementation materialises them
    (`per_row_scores`: transformers' eager attention, CTranslate2), once for the shared
    relative-position bias where it does not (pidec's fused attention).
    per_doc: cross cache of `cross_rows` x `enc_len`, self cache of `rows` x `self_len`, the
    encoder output (enc_rows x enc_len x d_model) when kept, and rows x vocab float32 logits."""
    ff = cfg.d_ff * (2 if cfg.is_gated else 1)
    tokens = enc_rows * enc_len
    scores = (enc_rows if per_row_scores else 1) * cfg.num_heads * enc_len * enc_len
    transient = (tokens * (4 * cfg.d_model + ff) + scores) * element_size
    parts = {
        "cross": kv_bytes(cfg, cross_rows, enc_len, element_size),
        "self": kv_bytes(cfg, rows, self_len, element_size),
        "encoder_output": tokens * cfg.d_model * element_size if keeps_encoder_output else 0,
        "logits": rows * cfg.vocab_size * 4,
    }
    return MemoryEstimate(weights, transient, sum(parts.values()), parts)
