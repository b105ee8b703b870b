"""The speed harness: time transformers and pidec side by side on synthetic fixed-length workloads.

This is a benchmark, not a test. Every configuration decodes the same documents, prompts and
output lengths with the same weights (random, seeded, T5 v1.1 shapes; or a checkpoint folder),
so what differs is only how the work is laid out.

Workloads (token ids are random in [100, 32000), seeded; no tokenizer is involved):

- ``dst``:  document of 512 tokens (the last one EOS, id 1); K = 30 prompts of 4-8 tokens;
  output lengths: 80 % of the rows (rounded, at least one row is long) write 2 tokens
  ("none" + EOS), the rest a length uniform in 3..10.
- ``summ``: document of 1500 tokens; K = 4 prompts of 3-5 tokens; outputs uniform in 100..250.
- ``qa``:   document of 512 tokens; K = 14 prompts of 8-16 tokens; outputs uniform in 3..20.

Each document gets its own draw (document, prompts and output lengths), from `seed`.

Configurations (one document at a time):

- ``hf-pie``: ``T5ForConditionalGeneration.generate`` on K encoder rows (prompt + document,
  right-padded, attention mask), ``min_new_tokens = max_new_tokens = L`` with L the longest
  output of the document: a transformers batch cannot let a row stop early, so every row pays
  for L steps.
- ``hf-pid-expanded``: transformers with the document encoded once, its encoder output
  ``expand``-ed to K rows and passed as ``encoder_outputs=BaseModelOutput(...)``, the prompts
  as ``decoder_input_ids`` ([0] + prompt, left-padded, ``decoder_attention_mask``), same L.
  transformers still projects the cross-attention keys/values for each of the K rows.
- ``pidec-seq``: pidec, one encoder row (the document) and one decoder row [0] whose output is
  the concatenation "prompt: answer; " of every subtask, i.e. its length is
  sum over subtasks of (prompt length + output length + 1).
- ``pidec-pie``: pidec, K encoder rows (prompt + document), decoder rows [0].
- ``pidec-pid``: pidec, the document encoded once, K rows [0] + prompt sharing one
  cross-attention cache; each row stops at its own length and leaves the batch (compaction).

pidec runs with ``eos_token_id=None`` and per-row ``max_new_tokens`` = the row's output length.

Reported per configuration: the median latency per document over docs x repeats timings, taken
round-robin over the configurations (after one untimed warm-up of each on the first document,
which is also where its peak memory is measured, alone), documents/s, output tokens/s (the mean
number of answer tokens the workload asks for per document, the same for every configuration,
divided by the median latency), peak memory (CUDA: max_memory_allocated above the level before;
CPU: process RSS sampled every 5 ms by a background thread, above the RSS before, after
returning freed heap to the OS), analytic GFLOPs per document (matmul FLOPs, 2 per multiply-add,
of what the configuration actually computes, padding included), the size of the cross-attention
keys/values held while decoding, and the speed-up over hf-pie.

A cross-check: on the first document, the first 2 tokens of 3 rows of pidec-pid are compared
with hf-pid-expanded (``agree`` in the result; transformers forbids EOS before min_new_tokens,
so a pidec row is only compared up to its first EOS), and likewise ct2-pie with pidec-pie
(``agree_ct2``), which checks the conversion. Random weights leave near-ties between the top
logits, where two correct float32 stacks that round differently can choose differently, so the
same 3 rows are also run teacher-forced through float64 copies of pidec and transformers and
their logits compared (``logits_gap``: the largest difference over the largest logit;
``logits_agree``: at most ``LOGITS_RTOL``).

More configurations, asked for by name (``ALL_CONFIGS``; the default run is ``CONFIGS``):

- ``pidec-seq-int8``, ``pidec-pie-int8``, ``pidec-pid-int8``: the same pidec model with int8
  linear layers (`pidec.quantize`: int8 weights, activations quantized per call, LM head float).
  ``quantize="int8"`` (``--quantize int8``) turns every pidec and ct2 configuration of the run
  into its int8 form; transformers configurations stay float.
- ``ct2-pie``: CTranslate2 (optional extra ``pidec[ct2]``) on the same checkpoint converted with
  its `TransformersConverter`: K sources of prompt + document, every row L steps as hf-pie.
- ``ct2-prefix``: CTranslate2 with the document K times as the sources and the prompts as
  ``target_prefix`` (left-padded with the pad token to the longest prompt, since CTranslate2's
  decoding length counts the prefix and is one number for the batch), L steps after it.
- ``ct2-pie-int8``, ``ct2-prefix-int8``: the same with ``compute_type="int8"``.
  When ctranslate2 is not installed these configurations are skipped, and the result says so
  (``skipped``) instead of failing.

How far each row is from the machine (`measure_ceiling`, `pidec.roofline`): at start the
harness times a float matrix product (in the run's dtype) and an int8 one (``torch._int_mm``)
of the workload's own shape, encoder tokens x d_model x d_ff, again at the end, and keeps the
best of those trials as the machine's ceiling in GFLOP/s (on a shared machine a busy spell
lowers a single measurement; a fraction above 100 % says the ceiling was still measured low).
Per configuration: achieved GFLOP/s (analytic FLOPs per document / median latency), its
fraction of the ceiling (the int8 ceiling for int8 rows), and the mean bytes moved per
decoding step after the prefill (weights read by a decoder pass + cross-attention cache read +
self-attention cache read, `roofline`).

Memory scaling (``memory_budget``, `memory_report`): how many documents of the workload's
largest shape (longest prompts, every output at the longest length) a configuration can decode
together within a budget, analytically: weights + the working memory of encoding one document
+ n x (cross cache + preallocated self cache + kept encoder output + one step's logits); see
`roofline.decode_memory`.
"""

from __future__ import annotations

import copy
import gc
import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from .. import checkpoint, packing
from .. import quantize as quant
from ..generate import Row, compile_steps, decode, encode, sync
from ..model import PRESETS, T5, T5Config
from ..quantize import QuantizeError, check_method, quiet_import
from . import roofline

CONFIGS = ["hf-pie", "hf-pid-expanded", "pidec-seq", "pidec-pie", "pidec-pid"]  # the default run
INT8_CONFIGS = ["pidec-seq-int8", "pidec-pie-int8", "pidec-pid-int8"]
CT2_CONFIGS = ["ct2-pie", "ct2-prefix", "ct2-pie-int8", "ct2-prefix-int8"]
ALL_CONFIGS = CONFIGS + INT8_CONFIGS + CT2_CONFIGS
CT2_INSTALL = "pip install 'pidec[ct2]'  (or: pip install ctranslate2)"


def base_config(name: str) -> str:
    """The layout a configuration runs: its name without the -int8 suffix."""
    return name.removesuffix("-int8")


def is_int8(name: str) -> bool:
    return name.endswith("-int8")


# T5 v1.1 shapes (gated-GELU, untied LM head, vocabulary 32128). "tiny" is for tests.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TOKEN_LOW, TOKEN_HIGH = 100, 32000
DOC_EOS = 1


@dataclass(frozen=True)
class Workload:
    """What one document asks for: its length, how many subtasks, their prompt lengths and the
    distribution of their output lengths (a fraction `short_fraction` of the rows writes
    `short_len` tokens, the others a length uniform in `long_range`)."""

    name: str
    doc_tokens: int
    subtasks: int
    prompt_range: tuple[int, int]
    long_range: tuple[int, int]
    short_fraction: float = 0.0
    short_len: int = 2
    description: str = ""

    def output_lengths(self, rng: random.Random, k: int) -> list[int]:
        lengths = [rng.randint(*self.long_range) for _ in range(k)]
        if self.short_fraction > 0:
            n_long = min(k, max(1, round((1 - self.short_fraction) * k)))
            long_rows = set(rng.sample(range(k), n_long))
            lengths = [n if i in long_rows else self.short_len for i, n in enumerate(lengths)]
        return lengths


WORKLOADS: dict[str, Workload] = {
    "dst": Workload(
        "dst",
        512,
        30,
        (4, 8),
        (3, 10),
        short_fraction=0.8,
        short_len=2,
        description="dialogue state tracking: 30 slots, mostly 'none'",
    ),
    "summ": Workload("summ", 1500, 4, (3, 5), (100, 250), description="4 summaries of a long document"),
    "qa": Workload("qa", 512, 14, (8, 16), (3, 20), description="14 questions about a passage"),
}


@dataclass
class DocDraw:
    """One document of a workload: its tokens (ending with EOS), the K prompts and the number
    of tokens each subtask's answer has."""

    document: list[int]
    prompts: list[list[int]]
    out_lens: list[int]

    @property
    def k(self) -> int:
        return len(self.prompts)

    @property
    def longest(self) -> int:
        return max(self.out_lens)

    @property
    def answer_tokens(self) -> int:
        return sum(self.out_lens)

    @property
    def seq_len(self) -> int:
        """The single pidec-seq row writes "prompt: answer; " for every subtask."""
        return sum(len(p) + n + 1 for p, n in zip(self.prompts, self.out_lens))

    @property
    def pie_len(self) -> int:
        """Encoder length of the pie batch (the longest prompt + document)."""
        return max(len(p) for p in self.prompts) + len(self.document)

    @property
    def pid_prefix(self) -> int:
        """Decoder prefix length of the pid batch ([0] + the longest prompt)."""
        return 1 + max(len(p) for p in self.prompts)


def draw_documents(
    workload: Workload,
    docs: int,
    seed: int,
    vocab_size: int = 32128,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
) -> list[DocDraw]:
    rng = random.Random(f"pidec-bench:{workload.name}:{seed}")
    high = min(TOKEN_HIGH, vocab_size)
    n_doc = workload.doc_tokens if doc_tokens is None else doc_tokens
    k = workload.subtasks if subtasks is None else subtasks
    out = []
    for _ in range(docs):
        document = [rng.randrange(TOKEN_LOW, high) for _ in range(n_doc - 1)] + [DOC_EOS]
        prompts = [
            [rng.randrange(TOKEN_LOW, high) for _ in range(rng.randint(*workload.prompt_range))] for _ in range(k)
        ]
        out.append(DocDraw(document, prompts, workload.output_lengths(rng, k)))
    return out


# -- analytic FLOPs (matmuls only, 2 FLOPs per multiply-add) ---------------------------------


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


def cross_cache_bytes(cfg: T5Config, rows: int, length: int, element_size: int) -> int:
    """K and V of every decoder layer for `rows` encoder rows of `length` tokens."""
    return roofline.kv_bytes(cfg, rows, length, element_size)


@dataclass(frozen=True)
class Shape:
    """What a configuration computes and holds for one document: `enc_rows` encoder rows of
    `enc_len` tokens, cross-attention keys/values for `cross_rows` of them, and `rows` decoder
    rows after a `prefix` of positions, row i writing lengths[i] tokens."""

    enc_rows: int
    enc_len: int
    cross_rows: int
    prefix: int
    lengths: list[int]
    compaction: bool  # rows leave the batch when done
    head_on_prefix: bool = False  # the LM head runs on every prefix position (transformers)
    packed: list[int] | None = None  # pidec's packed prefill: each row's own prefix length
    family: str = "pidec"  # pidec | hf | ct2

    @property
    def rows(self) -> int:
        return len(self.lengths)


def config_shape(name: str, d: DocDraw) -> Shape:
    """The layout of configuration `name` (an -int8 suffix changes nothing here) for document `d`."""
    K, S, L = d.k, len(d.document), d.longest
    base = base_config(name)
    if base == "hf-pie":
        return Shape(K, d.pie_len, K, 1, [L] * K, False, head_on_prefix=True, family="hf")
    if base == "hf-pid-expanded":
        return Shape(1, S, K, d.pid_prefix, [L] * K, False, head_on_prefix=True, family="hf")
    if base == "pidec-pie":
        return Shape(K, d.pie_len, K, 1, list(d.out_lens), True)
    if base == "pidec-pid":
        return Shape(1, S, 1, d.pid_prefix, list(d.out_lens), True, packed=[1 + len(p) for p in d.prompts])
    if base == "pidec-seq":
        return Shape(1, S, 1, 1, [d.seq_len], True)
    if base == "ct2-pie":
        return Shape(K, d.pie_len, K, 1, [L] * K, False, family="ct2")
    if base == "ct2-prefix":
        return Shape(K, S, K, d.pid_prefix, [L] * K, False, family="ct2")
    raise ValueError(f"unknown configuration {name!r}")


def config_flops(name: str, cfg: T5Config, d: DocDraw) -> int:
    """What configuration `name` computes for document `d`."""
    sh = config_shape(name, d)
    total = sh.enc_rows * sh.enc_len * encoder_token_flops(cfg, sh.enc_len)
    total += sh.cross_rows * sh.enc_len * cross_kv_flops(cfg)
    return total + decoding_flops(
        cfg, sh.prefix, sh.lengths, sh.enc_len, sh.compaction, head_on_prefix=sh.head_on_prefix, packed=sh.packed
    )


def config_cross_bytes(name: str, cfg: T5Config, d: DocDraw, element_size: int) -> int:
    sh = config_shape(name, d)
    return cross_cache_bytes(cfg, sh.cross_rows, sh.enc_len, element_size)


def config_step_bytes(name: str, cfg: T5Config, d: DocDraw, element_size: int) -> dict:
    """Mean bytes per decoding step of configuration `name` on document `d` (`roofline`)."""
    sh = config_shape(name, d)
    return roofline.decoding_step_bytes(
        cfg,
        sh.prefix,
        sh.lengths,
        sh.enc_len,
        cross_per_row=sh.cross_rows > 1,
        compaction=sh.compaction,
        element_size=element_size,
        int8=is_int8(name),
        head_int8=is_int8(name) and sh.family == "ct2",  # pidec keeps its LM head float
    )


def largest_draw(workload: Workload, doc_tokens: int | None = None, subtasks: int | None = None) -> DocDraw:
    """The workload's largest document: every prompt and every output at its longest."""
    S = workload.doc_tokens if doc_tokens is None else doc_tokens
    K = workload.subtasks if subtasks is None else subtasks
    longest = max(workload.long_range[1], workload.short_len if workload.short_fraction > 0 else 0)
    return DocDraw([TOKEN_LOW] * (S - 1) + [DOC_EOS], [[TOKEN_LOW] * workload.prompt_range[1]] * K, [longest] * K)


def memory_report(
    configs: list[str],
    cfg: T5Config,
    workload: str,
    budget: int | str,
    element_size: int = 4,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
    packed: bool = True,
) -> dict:
    """How many documents of `workload` each configuration decodes together within `budget`
    bytes (analytic: `largest_draw`, `roofline.decode_memory`). `packed`: pidec's float32
    weights have their oneDNN-packed copies too (`pidec.packing`, the CPU default)."""
    budget = roofline.parse_bytes(budget)
    d = largest_draw(WORKLOADS[workload], doc_tokens, subtasks)
    rows = []
    for name in configs:
        sh = config_shape(name, d)
        int8 = is_int8(name)
        weights = roofline.model_weight_bytes(cfg, element_size, int8, head_int8=int8 and sh.family == "ct2")
        if packed and sh.family == "pidec" and element_size == 4:
            weights += roofline.packed_weight_bytes(cfg, int8)
        est = roofline.decode_memory(
            cfg,
            element_size,
            weights,
            sh.enc_rows,
            sh.enc_len,
            sh.cross_rows,
            sh.rows,
            sh.prefix + max(sh.lengths),
            keeps_encoder_output=sh.family != "pidec",
            per_row_scores=sh.family != "pidec",
        )
        rows.append(
            {
                "config": name,
                "docs_fit": est.fit(budget),
                "weights_mb": est.weights / 2**20,
                "transient_mb": est.transient / 2**20,
                "per_doc_mb": est.per_doc / 2**20,
                "per_doc_parts_mb": {k: v / 2**20 for k, v in est.parts.items()},
            }
        )
    return {
        "budget_bytes": budget,
        "workload": workload,
        "document": {
            "doc_tokens": len(d.document),
            "subtasks": d.k,
            "prompt_tokens": len(d.prompts[0]),
            "output_tokens": d.longest,
        },
        "method": "analytic: weights + encoding one document + n x (cross cache + self cache at full "
        "length + kept encoder output + one step's logits)"
        + ("; pidec float32 weights counted twice (their oneDNN-packed copies)" if packed else ""),
        "rows": rows,
    }


# -- models ---------------------------------------------------------------------------------


def build_random_model(size: str, seed: int = 0) -> T5:
    """A T5 v1.1 of `size` with fast seeded init: linears N(0, fan_in**-0.5), embedding N(0, 1),
    relative biases N(0, 0.1), norms 1. Weights do not matter for speed; activations stay finite."""
    cfg = T5Config.from_name(size)
    with torch.device("meta"):
        model = T5(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed.weight":
                p.normal_(0.0, 1.0, generator=gen)
            elif "rel_bias" in name:
                p.normal_(0.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return model.eval()


def _load_models(folder, device: torch.device, dtype: torch.dtype, need_hf: bool):

    ours = checkpoint.load_model(folder, device=device, dtype=dtype).eval()
    hf = None
    if need_hf:
        from transformers import T5ForConditionalGeneration

        with checkpoint.quiet_transformers():
            hf = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        cfg = ours.config
        hf.generation_config.pad_token_id = cfg.pad_token_id
        hf.generation_config.eos_token_id = cfg.eos_token_id
        hf.generation_config.decoder_start_token_id = cfg.decoder_start_token_id
        hf.generation_config.max_length = None
        # both stacks must hold the same weights, or the comparison means nothing
        head = ours.embed.weight if ours.lm_head is None else ours.lm_head.weight
        pairs = [
            (hf.lm_head.weight, head),
            (hf.shared.weight, ours.embed.weight),
            (hf.decoder.block[-1].layer[1].EncDecAttention.k.weight, ours.decoder.layers[-1].cross_attn.k.weight),
        ]
        for a, b in pairs:
            if a.shape != b.shape or not torch.equal(a.detach().cpu(), b.detach().cpu()):
                raise RuntimeError(f"transformers did not load the same weights from {folder}")
    # Weights read from safetensors may be mapped lazily; page them all in now, or the first
    # configuration to touch them is charged the whole model in its peak memory.
    with torch.inference_mode():
        for m in (ours, hf):
            if m is not None:
                for p in m.parameters():
                    p.detach().sum()
    return ours, hf


# -- measuring ------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:  # give freed heap back to the OS so that the RSS baseline is honest (glibc)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover
        pass


class _PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled process RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self):
        _release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak_bytes = self._max - self._base
        return False


# -- the configurations ---------------------------------------------------------------------
# Each runner decodes one document and returns (generated tokens per row, cross-cache bytes or None).


def _right_pad(seqs: list[list[int]], pad: int, device):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _left_pad(seqs: list[list[int]], pad: int, device):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _run_hf_pie(ours, hf, d: DocDraw, device):
    pad = ours.config.pad_token_id
    ids, mask = _right_pad([p + d.document for p in d.prompts], pad, device)
    L = d.longest
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=L, min_new_tokens=L, num_beams=1, do_sample=False
    )
    return out[:, 1:].tolist(), None


def _run_hf_pid_expanded(ours, hf, d: DocDraw, device):
    from transformers.modeling_outputs import BaseModelOutput

    pad, start = ours.config.pad_token_id, ours.config.decoder_start_token_id
    K, S = d.k, len(d.document)
    doc = torch.tensor([d.document], dtype=torch.long, device=device)
    enc = hf.get_encoder()(input_ids=doc).last_hidden_state  # [1, S, d_model], once
    dec_ids, dec_mask = _left_pad([[start] + p for p in d.prompts], pad, device)
    L = d.longest
    out = hf.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.expand(K, S, enc.shape[-1])),
        attention_mask=torch.ones((K, S), dtype=torch.long, device=device),
        decoder_input_ids=dec_ids,
        decoder_attention_mask=dec_mask,
        max_new_tokens=L,
        min_new_tokens=L,
        num_beams=1,
        do_sample=False,
    )
    return out[:, dec_ids.shape[1] :].tolist(), None


def _run_pidec_seq(ours, hf, d: DocDraw, device):

    cross = encode(ours, [d.document])
    res = decode(ours, cross, [Row(0, [ours.config.decoder_start_token_id], d.seq_len)], eos_token_id=None)
    return res.tokens, res.stats.cross_cache_bytes


def _run_pidec_pie(ours, hf, d: DocDraw, device):

    cross = encode(ours, [p + d.document for p in d.prompts])
    start = ours.config.decoder_start_token_id
    rows = [Row(i, [start], n) for i, n in enumerate(d.out_lens)]
    res = decode(ours, cross, rows, eos_token_id=None)
    return res.tokens, res.stats.cross_cache_bytes


def _run_pidec_pid(ours, hf, d: DocDraw, device):

    cross = encode(ours, [d.document])
    start = ours.config.decoder_start_token_id
    rows = [Row(0, [start] + p, n) for p, n in zip(d.prompts, d.out_lens)]
    res = decode(ours, cross, rows, eos_token_id=None)
    return res.tokens, res.stats.cross_cache_bytes


# -- CTranslate2 --------------------------------------------------------------------------
# The checkpoint has token ids, not text: the converter is given a vocabulary that names each id
# ("t123"; the pad, EOS and an unknown token by their usual names), and the runners translate
# id lists to those names and back.


def ct2_missing() -> str | None:
    """Why the CTranslate2 configurations cannot run here, or None when they can."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as e:
        return f"ctranslate2 is not installed ({e}): {CT2_INSTALL}"
    return None


class _IdVocabulary:
    """What ctranslate2's T5 converter asks of a tokenizer: one name per id, and the special tokens."""

    def __init__(self, cfg: T5Config):
        self.size = cfg.vocab_size
        unk = next(i for i in range(3) if i not in (cfg.pad_token_id, cfg.eos_token_id))
        self.special = {cfg.pad_token_id: "<pad>", cfg.eos_token_id: "</s>", unk: "<unk>"}
        self.ids = {name: i for i, name in self.special.items()}
        self.pad_token, self.eos_token, self.unk_token = "<pad>", "</s>", "<unk>"

    def token(self, i: int) -> str:
        return self.special.get(i) or f"t{i}"

    def id(self, token: str) -> int:
        return self.ids[token] if token in self.ids else int(token[1:])

    def get_vocab(self) -> dict[str, int]:
        return {self.token(i): i for i in range(self.size)}

    def convert_ids_to_tokens(self, i):
        return [self.token(x) for x in i] if isinstance(i, (list, tuple)) else self.token(i)


def convert_ct2(folder, out_dir, cfg: T5Config) -> _IdVocabulary:
    """Convert the Hugging Face checkpoint `folder` with ctranslate2's TransformersConverter
    (float32 weights; int8 is chosen when loading, with compute_type)."""
    import ctranslate2

    vocab = _IdVocabulary(cfg)

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return vocab

    with checkpoint.quiet_transformers(), quiet_import():  # transformers may import torchao, which logs
        Converter(str(folder)).convert(str(out_dir), force=True)
    return vocab


@dataclass
class _Ct2:
    translator: object
    vocab: _IdVocabulary
    compute_type: str


def _load_ct2(folder, tmp, cfg: T5Config, device: torch.device, dtype: str, kinds: set[str]) -> dict[str, _Ct2]:
    """One translator per precision asked for ("float", "int8"), threads as torch's."""
    import ctranslate2

    out = os.path.join(tmp, "ct2")
    vocab = convert_ct2(folder, out, cfg)
    types = {"float": dtype, "int8": "int8" if dtype == "float32" else f"int8_{dtype}"}
    engines = {}
    for kind in sorted(kinds):
        tr = ctranslate2.Translator(
            out,
            device=device.type,
            device_index=device.index or 0,
            compute_type=types[kind],
            inter_threads=1,
            intra_threads=torch.get_num_threads() if device.type == "cpu" else 0,
        )
        engines[kind] = _Ct2(tr, vocab, types[kind])
    return engines


def _run_ct2_pie(ours, ct2: _Ct2, d: DocDraw, device):
    tok = ct2.vocab.token
    L = d.longest
    sources = [[tok(t) for t in p + d.document] for p in d.prompts]
    res = ct2.translator.translate_batch(
        sources, beam_size=1, max_decoding_length=L, min_decoding_length=L, max_input_length=0
    )
    return [[ct2.vocab.id(t) for t in r.hypotheses[0]] for r in res], None


def _run_ct2_prefix(ours, ct2: _Ct2, d: DocDraw, device):
    tok = ct2.vocab.token
    L, P = d.longest, max(len(p) for p in d.prompts)
    pad = tok(ours.config.pad_token_id)
    source = [tok(t) for t in d.document]
    prefixes = [[pad] * (P - len(p)) + [tok(t) for t in p] for p in d.prompts]
    res = ct2.translator.translate_batch(
        [source] * d.k,
        target_prefix=prefixes,
        beam_size=1,
        max_decoding_length=P + L,  # CTranslate2 counts the prefix in the decoding length
        min_decoding_length=P + L,
        max_input_length=0,
    )
    return [[ct2.vocab.id(t) for t in r.hypotheses[0][P:]] for r in res], None


_RUNNERS = {
    "hf-pie": _run_hf_pie,
    "hf-pid-expanded": _run_hf_pid_expanded,
    "pidec-seq": _run_pidec_seq,
    "pidec-pie": _run_pidec_pie,
    "pidec-pid": _run_pidec_pid,
    "ct2-pie": _run_ct2_pie,
    "ct2-prefix": _run_ct2_prefix,
}


@dataclass
class _Engines:
    ours: T5
    hf: object = None
    ours_int8: T5 | None = None
    ct2: dict | None = None

    def run(self, name: str, d: DocDraw, device):
        """Decode document `d` with configuration `name`."""
        base = base_config(name)
        if base.startswith("ct2-"):
            return _RUNNERS[base](self.ours, self.ct2["int8" if is_int8(name) else "float"], d, device)
        return _RUNNERS[base](self.ours_int8 if is_int8(name) else self.ours, self.hf, d, device)


def _agree(pid_tokens: list[list[int]], hf_tokens: list[list[int]], eos: int, n_tokens: int = 2) -> bool:
    """First `n_tokens` of 3 rows (first, middle, last). transformers cannot emit EOS before
    min_new_tokens, so a pidec row is compared only up to its first EOS."""
    K = len(pid_tokens)
    for i in sorted({0, K // 2, K - 1}):
        ours = pid_tokens[i][:n_tokens]
        if eos in ours:
            ours = ours[: ours.index(eos)]
        if hf_tokens[i][: len(ours)] != ours:
            return False
    return True


LOGITS_RTOL = 1e-6  # max |pidec - transformers| over the largest |logit|, teacher-forced in float64


def _logits_gap(ours: T5, hf, d: DocDraw, device) -> float:
    """The same 3 rows as `_agree`, teacher-forced through float64 copies of both stacks on the
    document and [start] + prompt: the largest logit difference over the largest logit
    magnitude. Random weights leave the top logits of a row a hundredth apart, and a deep
    random network amplifies float32 rounding (about 1e-2 of the largest logit at base size,
    BLAS or packed), so a greedy token can differ between two correct float32 stacks; in
    float64 the same function gives differences near 1e-12, and a wrong one does not."""
    start = ours.config.decoder_start_token_id
    doc = torch.tensor([d.document], device=device)
    a_model, b_model = copy.deepcopy(ours).double(), copy.deepcopy(hf).double()
    worst = 0.0
    with torch.inference_mode():
        for i in sorted({0, d.k // 2, d.k - 1}):
            dec = torch.tensor([[start] + d.prompts[i]], device=device)
            a = a_model(doc, dec)
            b = b_model(input_ids=doc, decoder_input_ids=dec).logits
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    del a_model, b_model
    return worst


def _check_lengths(name: str, tokens: list[list[int]], d: DocDraw) -> None:
    """Every configuration must generate exactly what the workload asks for, or the timings
    compare different work."""
    got = [len(t) for t in tokens]
    want = config_shape(name, d).lengths
    if got != want:
        raise RuntimeError(f"{name} generated {got} tokens per row, the workload asks for {want}")


# -- the machine's ceiling -------------------------------------------------------------------


def _best_rate(fn, flops: int, device: torch.device, min_time_s: float, trials: int) -> float:
    """Best of `trials` rates (FLOP/s), each over as many calls as fill `min_time_s`."""
    fn()
    sync(device)
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
        best = max(best, n * flops / elapsed)
    return best


def measure_ceiling(
    m: int,
    k: int,
    n: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    min_time_s: float = 0.1,
    trials: int = 3,
) -> dict:
    """The machine's own matrix-product speed at a workload's shape ([m, k] x [k, n], 2mkn
    FLOPs): the best of `trials` timings in `dtype` and in int8 (`torch._int_mm`, uint8 x int8
    on the CPU, the operand pair VNNI multiplies natively, else int8 x int8), with the threads
    torch has now. The float rate is the faster of two kernels: BLAS (`torch.mm`) and, in
    float32 on the CPU, oneDNN with the weight packed ahead (`pidec.packing`, what pidec's
    linear layers use), so that a fraction of the ceiling is measured against the best
    product this machine has, not the one pidec happens to call. Returns {"shape", "dtype",
    "float_gflops", "float_kernels", "int8_gops", "int8_error"}; the int8 rate is None where
    torch has no int8 product for the device."""
    device = torch.device(device)
    flops = 2 * m * k * n
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    kernels = {"blas": _best_rate(lambda: torch.mm(a, b), flops, device, min_time_s, trials)}
    if device.type == "cpu" and dtype == torch.float32:
        if packing.available():  # the packed path pidec's linear layers take by default
            w = b.t().contiguous()  # [n, k], the layout of a linear weight
            kernels["onednn_packed"] = _best_rate(
                lambda: packing.packed_product(a, w), flops, device, min_time_s, trials
            )
    float_rate = max(kernels.values())
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen).to(device)
    int8_rate, error = None, None
    for low, high, kind in ((0, 256, torch.uint8), (-127, 128, torch.int8)):
        a8 = torch.randint(low, high, (m, k), dtype=kind, generator=gen).to(device)
        try:
            int8_rate = _best_rate(lambda a8=a8: torch._int_mm(a8, b8), flops, device, min_time_s, trials)
            error = None
            break
        except (RuntimeError, NotImplementedError) as e:
            error = f"torch._int_mm: {e}".splitlines()[0]
    return {
        "shape": [m, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "float_gflops": float_rate / 1e9,
        "float_kernels": {name: rate / 1e9 for name, rate in kernels.items()},
        "int8_gops": None if int8_rate is None else int8_rate / 1e9,
        "int8_error": error,
        "trials": trials,
    }


def _best_ceiling(a: dict, b: dict) -> dict:
    """Two measurements of the same ceiling: the faster of each, trials added up."""
    out = dict(a, trials=a["trials"] + b["trials"], float_gflops=max(a["float_gflops"], b["float_gflops"]))
    ka, kb = a.get("float_kernels") or {}, b.get("float_kernels") or {}
    if ka or kb:
        out["float_kernels"] = {name: max(ka.get(name, 0.0), kb.get(name, 0.0)) for name in {**ka, **kb}}
    rates = [r for r in (a["int8_gops"], b["int8_gops"]) if r is not None]
    out["int8_gops"] = max(rates) if rates else None
    out["int8_error"] = None if rates else a["int8_error"]
    return out


# -- the harness ----------------------------------------------------------------------------


def _check_args(
    workload, model_size, model_dir, configs, docs, repeats, device, dtype, threads, doc_tokens, subtasks, quantize
) -> tuple[list[str], torch.device, torch.dtype]:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    if model_dir is None and model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_size!r}: expected one of {', '.join(PRESETS)}")
    configs = _check_configs(configs, quantize)
    for name, value in (("docs", docs), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if doc_tokens is not None and doc_tokens < 2:
        raise ValueError(f"doc_tokens must be >= 2, got {doc_tokens}")
    if subtasks is not None and subtasks < 1:
        raise ValueError(f"subtasks must be >= 1, got {subtasks}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: expected cpu or cuda[:N]") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: expected cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    if dtype == "float16" and dev.type != "cuda":
        raise ValueError("dtype float16 is only supported on cuda: use float32 or bfloat16 on cpu")
    return configs, dev, DTYPES[dtype]


def _check_configs(configs, quantize) -> list[str]:
    """Known names, in order, once each; quantize="int8" turns pidec and ct2 names into their
    -int8 forms (transformers has no int8 configuration here and stays float)."""

    if configs is None:
        configs = list(CONFIGS)
    if isinstance(configs, str) or not all(isinstance(c, str) for c in configs):
        raise ValueError(f"configs must be a list of names from {', '.join(ALL_CONFIGS)}")
    bad = [c for c in configs if c not in ALL_CONFIGS]
    if bad:
        raise ValueError(f"unknown configuration {bad[0]!r}: expected names from {', '.join(ALL_CONFIGS)}")
    try:
        quantize = check_method(quantize)
    except QuantizeError as e:
        raise ValueError(str(e)) from None
    if quantize == "int8":
        configs = [c if c.startswith("hf-") or is_int8(c) else f"{c}-int8" for c in configs]
    configs = list(dict.fromkeys(configs))
    if not configs:
        raise ValueError(f"no configuration to run: expected names from {', '.join(ALL_CONFIGS)}")
    return configs


def run_bench(
    workload: str = "dst",
    model_size: str = "base",
    model_dir: str | None = None,
    configs: list[str] | None = None,
    docs: int = 2,
    repeats: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    threads: int | None = None,
    *,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
    quantize: str | None = None,
    memory_budget: int | str | None = None,
    ceiling: bool = True,
    compile: bool = False,
    pack: bool = True,
) -> dict:
    """Time `configs` on `docs` documents of `workload`, `repeats` passes each; see the module
    docstring. `doc_tokens` / `subtasks` shrink the workload (tests). `quantize="int8"`: the
    pidec and ct2 configurations in int8. `memory_budget` (bytes or '8GiB'): add the analytic
    documents-per-budget report. `ceiling=False` skips timing the machine's ceiling.
    `compile=True`: the float pidec configurations decode their steps through torch.compile
    (`generate.compile_steps`), compiled on the first document before anything is measured.
    `pack` (float32 on the CPU, not compiled): pidec's linear layers multiply through
    oneDNN-packed weights (`pidec.packing`), as `pidec.load` sets them up by default; False
    times the plain BLAS path."""
    configs, dev, torch_dtype = _check_args(
        workload, model_size, model_dir, configs, docs, repeats, device, dtype, threads, doc_tokens, subtasks, quantize
    )
    if memory_budget is not None:
        memory_budget = roofline.parse_bytes(memory_budget)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = _run(
            workload,
            model_size,
            model_dir,
            configs,
            docs,
            repeats,
            dev,
            dtype,
            torch_dtype,
            seed,
            doc_tokens,
            subtasks,
            ceiling,
            compile,
            pack,
        )
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    if memory_budget is not None:
        cfg = T5Config(**{k: v for k, v in result["model"]["config"].items()})
        result["memory"] = memory_report(
            configs, cfg, workload, memory_budget, torch_dtype.itemsize, doc_tokens, subtasks, result["packed_weights"]
        )
    return result


def run_memory(
    workload: str = "dst",
    model_size: str = "base",
    model_dir: str | None = None,
    configs: list[str] | None = None,
    memory_budget: int | str = "8GiB",
    dtype: str = "float32",
    quantize: str | None = None,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
    pack: bool = True,
) -> dict:
    """The memory report alone, without building a model or timing anything. `pack`: count
    pidec's packed weight copies, as a CPU run would hold them (`run_bench`'s `pack`)."""

    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    if model_dir is None and model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_size!r}: expected one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    configs = _check_configs(configs, quantize)
    if model_dir is None:
        cfg = T5Config.from_name(model_size)
    else:
        cfg = checkpoint.read_config(checkpoint.resolve(model_dir))
    packed = pack and packing.available()
    mem = memory_report(configs, cfg, workload, memory_budget, DTYPES[dtype].itemsize, doc_tokens, subtasks, packed)
    mem["packed_weights"] = packed
    mem["model"] = {"size": model_size} if model_dir is None else {"path": str(model_dir)}
    mem["dtype"] = dtype
    return mem


def _run(
    workload,
    model_size,
    model_dir,
    configs,
    docs,
    repeats,
    dev,
    dtype,
    torch_dtype,
    seed,
    doc_tokens,
    subtasks,
    ceiling,
    compile=False,
    pack=True,
) -> dict:

    skipped = []

    def skip(names: list[str], reason: str) -> None:
        nonlocal configs
        if names:
            skipped.append({"configs": names, "reason": reason})
            configs = [c for c in configs if c not in names]

    why = ct2_missing()
    if why is not None:
        skip([c for c in configs if c.startswith("ct2-")], why)
    need_hf = any(c.startswith("hf-") for c in configs)
    with tempfile.TemporaryDirectory(prefix="pidec-bench-") as tmp:
        if model_dir is None:
            model = build_random_model(model_size, seed)
            checkpoint.save(model, tmp)
            del model
            folder = tmp
        else:
            folder = checkpoint.resolve(model_dir)
        ours, hf = _load_models(folder, dev, torch_dtype, need_hf)
        # the CPU default, as pidec.load sets it up (an int8 copy made below packs its float head)
        packed = pack and not compile and packing.supported(dev, torch_dtype)
        if packed:
            packing.pack(ours)
        engines = _Engines(ours, hf)
        int8_pidec = [c for c in configs if is_int8(c) and c.startswith("pidec-")]
        if int8_pidec:
            try:
                engines.ours_int8 = quant.quantize_model(copy.deepcopy(ours), "int8")
                if packed:  # its float LM head: packed now, not during the warm-up that measures peak memory
                    packing.pack(engines.ours_int8)
            except quant.QuantizeError as e:
                skip(int8_pidec, str(e))
        kinds = {"int8" if is_int8(c) else "float" for c in configs if c.startswith("ct2-")}
        if kinds:
            engines.ct2 = _load_ct2(folder, tmp, ours.config, dev, dtype, kinds)
    cfg = ours.config
    draws = draw_documents(WORKLOADS[workload], docs, seed, cfg.vocab_size, doc_tokens, subtasks)
    element_size = torch.empty((), dtype=torch_dtype).element_size()
    mean_answer_tokens = statistics.mean(d.answer_tokens for d in draws)
    ceil = measure_ceiling(len(draws[0].document), cfg.d_model, cfg.d_ff, dev, torch_dtype) if ceiling else None

    # Peak memory: each configuration alone on the first document (this is also its warm-up).
    # Timing: round-robin over the configurations, so a slow spell of the machine falls on all
    # of them alike instead of on whichever happened to run then.
    compile_s = None
    if compile:  # compile before anything is measured: inductor's own memory and time are not the decoder's
        compile_steps(ours)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for name in configs:
                if name.startswith("pidec-") and not is_int8(name):
                    engines.run(name, draws[0], dev)
        compile_s = time.perf_counter() - t0

    first_tokens, peaks, cross_measured = {}, {}, dict.fromkeys(configs, 0)
    times: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for name in configs:
            with _PeakMemory(dev) as mem:
                tokens, cross = engines.run(name, draws[0], dev)
            _check_lengths(name, tokens, draws[0])
            first_tokens[name], peaks[name] = tokens, mem.peak_bytes
            cross_measured[name] = cross or 0
            del tokens
            _release_memory(dev)
        for _ in range(repeats):
            for d in draws:
                for name in configs:
                    sync(dev)
                    t0 = time.perf_counter()
                    _, cross = engines.run(name, d, dev)
                    sync(dev)
                    times[name].append(time.perf_counter() - t0)
                    cross_measured[name] = max(cross_measured[name], cross or 0)

    if ceil is not None:  # again at the end: a busy spell at the start must not lower the ceiling
        ceil = _best_ceiling(ceil, measure_ceiling(*ceil["shape"], dev, torch_dtype))

    results = []
    for name in configs:
        latency = statistics.median(times[name])
        cross_bytes = cross_measured[name] or max(config_cross_bytes(name, cfg, d, element_size) for d in draws)
        gflops = statistics.mean(config_flops(name, cfg, d) for d in draws) / 1e9
        steps = [config_step_bytes(name, cfg, d, element_size) for d in draws]
        steps = [s for s in steps if s["passes"]]
        limit = None if ceil is None else ceil["int8_gops"] if is_int8(name) else ceil["float_gflops"]
        results.append(
            {
                "config": name,
                "precision": "int8" if is_int8(name) else dtype,
                "latency_s_median": latency,
                "docs_per_s": 1.0 / latency,
                "tokens_per_s": mean_answer_tokens / latency,
                "peak_mem_mb": peaks[name] / 2**20,
                "gflops_per_doc": gflops,
                "achieved_gflops_per_s": gflops / latency,
                "ceiling_fraction": None if not limit else gflops / latency / limit,
                "cross_cache_mb": cross_bytes / 2**20,
                "step_mb": statistics.mean(s["total"] for s in steps) / 2**20 if steps else None,
                "step_parts_mb": {
                    part: statistics.mean(s[part] for s in steps) / 2**20 for part in ("weights", "cross", "self")
                }
                if steps
                else None,
                "speedup_vs_hf_pie": None,
            }
        )

    base = next((r["latency_s_median"] for r in results if r["config"] == "hf-pie"), None)
    if base is not None:
        for r in results:
            r["speedup_vs_hf_pie"] = base / r["latency_s_median"]
    agree, logits_gap = None, None
    if "pidec-pid" in first_tokens and "hf-pid-expanded" in first_tokens:
        agree = _agree(first_tokens["pidec-pid"], first_tokens["hf-pid-expanded"], cfg.eos_token_id)
        logits_gap = _logits_gap(ours, hf, draws[0], dev)
    agree_ct2 = None
    if "pidec-pie" in first_tokens and "ct2-pie" in first_tokens:
        agree_ct2 = _agree(first_tokens["pidec-pie"], first_tokens["ct2-pie"], cfg.eos_token_id)

    model_info = {"size": model_size} if model_dir is None else {"path": str(model_dir)}
    model_info.update(params=ours.num_parameters(), config=cfg.to_dict())
    if engines.ours_int8 is not None:
        model_info["int8"] = quant.describe(engines.ours_int8)
    w = WORKLOADS[workload]
    return {
        "workload": workload,
        "workload_shape": {
            "doc_tokens": len(draws[0].document) if doc_tokens is None else doc_tokens,
            "subtasks": draws[0].k,
            "answer_tokens_per_doc": mean_answer_tokens,
            "description": w.description,
        },
        "model": model_info,
        "device": str(dev),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "docs": docs,
        "repeats": repeats,
        "ceiling": ceil,
        "agree": agree,
        "logits_gap": logits_gap,
        "logits_agree": None if logits_gap is None else logits_gap <= LOGITS_RTOL,
        "agree_ct2": agree_ct2,
        "skipped": skipped,
        "compile": bool(compile),
        "compile_s": compile_s,
        "packed_weights": packed,
        "results": results,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """A fixed-width text table of `run_bench`'s result."""
    model = result["model"]
    name = model.get("size") or model.get("path")
    lines = [
        f"workload {result['workload']}  model {name} ({model['params'] / 1e6:.1f}M params)  "
        f"device {result['device']}  dtype {result['dtype']}  threads {result['torch_threads']}  "
        f"docs {result['docs']} x repeats {result['repeats']}",
    ]
    if result.get("compile"):
        lines.append(
            f"float pidec configurations: steps through torch.compile (compiling took {result['compile_s']:.1f} s)"
        )
    if model.get("int8"):
        lines.append(f"int8 pidec model: {model['int8']}")
    ceil = result.get("ceiling")
    if ceil:
        m, k, n = ceil["shape"]
        int8 = f"{ceil['int8_gops']:.1f} GOP/s" if ceil["int8_gops"] else f"n/a ({ceil['int8_error']})"
        lines.append(
            f"machine ceiling ({m}x{k} @ {k}x{n} matmul, best of {ceil['trials']}): "
            f"{ceil['dtype']} {ceil['float_gflops']:.1f} GFLOP/s, int8 {int8}"
        )
        kernels = ceil.get("float_kernels") or {}
        if len(kernels) > 1:
            lines.append("  float kernels: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in kernels.items()))
    if "packed_weights" in result:
        lines.append(f"pidec float32 linear layers: {'oneDNN-packed weights' if result['packed_weights'] else 'BLAS'}")
    header = (
        f"{'config':<16} {'latency_s':>10} {'docs/s':>8} {'tok/s':>9} {'peak_MB':>9} "
        f"{'GFLOP/doc':>10} {'GFLOP/s':>8} {'%ceil':>6} {'cross_MB':>9} {'MB/step':>8} {'speedup':>8}"
    )
    lines += [header, "-" * len(header)]
    for r in result["results"]:
        frac = r.get("ceiling_fraction")
        lines.append(
            f"{r['config']:<16} {r['latency_s_median']:>10.4f} {r['docs_per_s']:>8.3f} {r['tokens_per_s']:>9.1f} "
            f"{r['peak_mem_mb']:>9.1f} {r['gflops_per_doc']:>10.2f} {r['achieved_gflops_per_s']:>8.1f} "
            f"{_fmt(None if frac is None else 100 * frac, '>6.1f')} {r['cross_cache_mb']:>9.2f} "
            f"{_fmt(r.get('step_mb'), '>8.1f')} "
            f"{_fmt(r['speedup_vs_hf_pie'], '>7.2f') + ('x' if r['speedup_vs_hf_pie'] is not None else ''):>8}"
        )
    if result.get("agree") is not None:
        lines.append(f"pidec-pid vs hf-pid-expanded first tokens agree: {result['agree']}")
    if result.get("logits_gap") is not None:
        lines.append(
            f"pidec vs transformers logits, teacher-forced in float64: max difference {result['logits_gap']:.1e} of the "
            f"largest logit, agree (<= {LOGITS_RTOL:g}): {result['logits_agree']}"
        )
    if result.get("agree_ct2") is not None:
        lines.append(f"pidec-pie vs ct2-pie first tokens agree: {result['agree_ct2']}")
    for s in result.get("skipped") or []:
        lines.append(f"skipped {', '.join(s['configs'])}: {s['reason']}")
    if result.get("memory"):
        lines += ["", format_memory(result["memory"])]
    return "\n".join(lines)


def format_memory(mem: dict) -> str:
    """The documents-per-budget table of `memory_report`."""
    d = mem["document"]
    lines = [
        (
            f"memory budget {mem['budget_bytes'] / 2**30:.2f} GiB, workload {mem['workload']} at its largest "
            f"({d['doc_tokens']}-token document, {d['subtasks']} prompts of {d['prompt_tokens']} tokens, "
            f"outputs of {d['output_tokens']} tokens)"
        ),
        f"method: {mem['method']}",
    ]
    header = (
        f"{'config':<16} {'docs_fit':>9} {'weights_MB':>11} {'encode_MB':>10} {'per_doc_MB':>11} "
        f"{'cross':>9} {'self':>8} {'enc_out':>8} {'logits':>7}"
    )
    lines += [header, "-" * len(header)]
    for r in mem["rows"]:
        p = r["per_doc_parts_mb"]
        lines.append(
            f"{r['config']:<16} {r['docs_fit']:>9d} {r['weights_mb']:>11.1f} {r['transient_mb']:>10.1f} "
            f"{r['per_doc_mb']:>11.2f} {p['cross']:>9.2f} {p['self']:>8.2f} {p['encoder_output']:>8.2f} "
            f"{p['logits']:>7.2f}"
        )
    return "\n".join(lines)
