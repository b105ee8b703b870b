"""The benchmark's configurations: their names, and what each computes and holds for one
document (its `Shape`), from which the analytic columns follow: FLOPs, cross-attention cache
size, bytes per decoding step and documents per memory budget (`roofline`). What each
configuration runs is described in docs/performance.md ("Method").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import T5Config
from ..quantize import QuantizeError, check_method
from . import roofline
from .workloads import WORKLOADS, DocDraw, largest_draw

CONFIGS = ["hf-pie", "hf-pid-expanded", "pidec-seq", "pidec-pie", "pidec-pid"]  # the default run
INT8_CONFIGS = ["pidec-seq-int8", "pidec-pie-int8", "pidec-pid-int8"]
CT2_CONFIGS = ["ct2-pie", "ct2-prefix", "ct2-pie-int8", "ct2-prefix-int8"]
ALL_CONFIGS = CONFIGS + INT8_CONFIGS + CT2_CONFIGS


def base_config(name: str) -> str:
    """The layout a configuration runs: its name without the -int8 suffix."""
    return name.removesuffix("-int8")


def is_int8(name: str) -> bool:
    return name.endswith("-int8")


def check_configs(configs, quantize) -> list[str]:
    """Known names, in order, once each; quantize="int8" turns pidec and ct2 names into their
    -int8 forms (transformers has no int8 configuration here and stays float). ValueError
    naming every accepted name otherwise."""
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

    @property
    def steps(self) -> int:
        """Sequential decoding passes: the longest row's length."""
        return max(self.lengths)


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
    """What configuration `name` computes for document `d`: encoder, cross-attention keys and
    values, decoding (`roofline`)."""
    sh = config_shape(name, d)
    total = sh.enc_rows * sh.enc_len * roofline.encoder_token_flops(cfg, sh.enc_len)
    total += sh.cross_rows * sh.enc_len * roofline.cross_kv_flops(cfg)
    return total + roofline.decoding_flops(
        cfg, sh.prefix, sh.lengths, sh.enc_len, sh.compaction, head_on_prefix=sh.head_on_prefix, packed=sh.packed
    )


def config_cross_bytes(name: str, cfg: T5Config, d: DocDraw, element_size: int) -> int:
    """The cross-attention keys and values configuration `name` holds for document `d`."""
    sh = config_shape(name, d)
    return roofline.kv_bytes(cfg, sh.cross_rows, sh.enc_len, element_size)


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


def config_memory(name: str, cfg: T5Config, d: DocDraw, element_size: int, packed: bool) -> roofline.MemoryEstimate:
    """Analytic memory of configuration `name` decoding documents like `d` (`roofline.decode_memory`).
    `packed`: pidec's float32 weights have their oneDNN-packed copies too (`pidec.packing`)."""
    sh = config_shape(name, d)
    int8 = is_int8(name)
    weights = roofline.model_weight_bytes(cfg, element_size, int8, head_int8=int8 and sh.family == "ct2")
    if packed and sh.family == "pidec" and element_size == 4:
        weights += roofline.packed_weight_bytes(cfg, int8)
    return roofline.decode_memory(
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
    bytes, analytically, at the workload's largest (`workloads.largest_draw`, `config_memory`)."""
    budget = roofline.parse_bytes(budget)
    d = largest_draw(WORKLOADS[workload], doc_tokens, subtasks)
    rows = []
    for name in configs:
        est = config_memory(name, cfg, d, element_size, packed)
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
    document = {"doc_tokens": len(d.document), "subtasks": d.k, "prompt_tokens": len(d.prompts[0])}
    return {
        "budget_bytes": budget,
        "workload": workload,
        "document": {**document, "output_tokens": d.longest},
        "method": "analytic: weights + encoding one document + n x (cross cache + self cache at full "
        "length + kept encoder output + one step's logits)"
        + ("; pidec float32 weights counted twice (their oneDNN-packed copies)" if packed else ""),
        "rows": rows,
    }
