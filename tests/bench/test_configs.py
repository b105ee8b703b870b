"""`pidec.bench.configs`: the configuration names, each one's shape for a document, and the
analytic columns that follow from it (FLOPs, bytes per step, the memory report), against values
worked out by hand on a model small enough to count on paper."""

import pytest

from pidec.bench import configs, roofline
from pidec.bench.configs import (
    ALL_CONFIGS,
    CONFIGS,
    CT2_CONFIGS,
    check_configs,
    config_flops,
    config_shape,
    config_step_bytes,
    memory_report,
)
from pidec.bench.engines import RUNNERS
from pidec.bench.report import format_memory
from pidec.bench.workloads import WORKLOADS, DocDraw, draw_documents, largest_draw
from pidec.model import T5Config

from ..conftest import HAND_COUNTED

CFG = HAND_COUNTED


def test_config_flops_accounts_for_padding_and_rows():
    cfg = T5Config.from_name("tiny")
    d = draw_documents(WORKLOADS["qa"], 1, 0, doc_tokens=40, subtasks=3)[0]
    flops = {name: config_flops(name, cfg, d) for name in CONFIGS}
    assert flops["pidec-pid"] < flops["hf-pid-expanded"]
    assert flops["pidec-pie"] < flops["hf-pie"]
    with pytest.raises(ValueError):
        config_flops("nope", cfg, d)


def test_config_shapes_and_flops_of_the_peers():
    d = DocDraw(list(range(100, 140)) + [1], [[5] * 3, [6] * 5, [7] * 4], [2, 6, 3])
    for name in ("pidec-pid", "pidec-pie", "pidec-seq", "ct2-pie", "ct2-prefix"):
        assert config_flops(f"{name}-int8", CFG, d) == config_flops(name, CFG, d)  # int8 does the same work
    assert config_flops("ct2-pie", CFG, d) == config_flops("hf-pie", CFG, d)  # K rows, L steps each
    prefix = config_shape("ct2-prefix", d)
    assert (prefix.enc_rows, prefix.enc_len, prefix.cross_rows, prefix.prefix) == (3, 41, 3, 6)
    assert prefix.lengths == [6, 6, 6] and not prefix.compaction
    pid, pie = config_step_bytes("pidec-pid", CFG, d, 4), config_step_bytes("pidec-pie", CFG, d, 4)
    assert pid["cross"] == roofline.kv_bytes(CFG, 1, 41, 4) < pie["cross"]
    q = config_step_bytes("pidec-pid-int8", CFG, d, 4)
    assert q["weights"] == roofline.step_weight_bytes(CFG, 4, int8=True) and q["cross"] == pid["cross"]
    assert config_step_bytes("ct2-pie-int8", CFG, d, 4)["weights"] == roofline.step_weight_bytes(CFG, 4, True, True)
    with pytest.raises(ValueError, match="unknown configuration"):
        config_shape("vllm", d)


def test_memory_report_by_hand():
    # dst at its largest, shrunk: a 5-token document, 3 prompts of 8 tokens, outputs of 10 tokens
    d = largest_draw(WORKLOADS["dst"], doc_tokens=5, subtasks=3)
    assert len(d.document) == 5 and d.k == 3 and [len(p) for p in d.prompts] == [8] * 3 and d.out_lens == [10] * 3
    weights = roofline.model_weight_bytes(CFG, 4)  # 2480
    # pidec-pid: per document cross kv(1, 5) 160 + self kv(3, 9+10) 1824 + logits 120 = 2104, transient 840
    # pidec-pie: 3 rows of 13 tokens: cross kv(3, 13) 1248 + self kv(3, 11) 1056 + 120 = 2424;
    #            transient (39*32 + 2*13*13)*4 = 6344
    # hf-pie:    as pie + encoder output 39*4*4 = 624 -> 3048; scores per row: (39*32 + 3*2*169)*4 = 9048
    budget = weights + 9048 + 7 * 3048
    mem = memory_report(
        ["pidec-pid", "pidec-pie", "hf-pie"], CFG, "dst", budget, 4, doc_tokens=5, subtasks=3, packed=False
    )
    rows = {r["config"]: r for r in mem["rows"]}
    assert rows["pidec-pid"]["per_doc_mb"] * 2**20 == 2104 and rows["pidec-pid"]["transient_mb"] * 2**20 == 840
    assert rows["pidec-pie"]["per_doc_mb"] * 2**20 == 2424 and rows["pidec-pie"]["transient_mb"] * 2**20 == 6344
    assert rows["hf-pie"]["per_doc_mb"] * 2**20 == 3048 and rows["hf-pie"]["transient_mb"] * 2**20 == 9048
    assert rows["hf-pie"]["docs_fit"] == 7
    assert rows["pidec-pie"]["docs_fit"] == (budget - weights - 6344) // 2424
    assert rows["pidec-pid"]["docs_fit"] == (budget - weights - 840) // 2104
    assert mem["budget_bytes"] == budget and "analytic" in mem["method"]
    assert "docs_fit" in format_memory(mem)
    # packed (the CPU default): pidec's float32 linear weights once more. Encoder: attention
    # 4 x (4x4) + gated FFN 2 x (4x8) + 8x4 = 160 elements; decoder: 2 attentions 128 + FFN 96 = 224;
    # head 4x10 = 40: (160 + 224 + 40) x 4 bytes = 1696. transformers holds no such copy.
    assert roofline.packed_weight_bytes(CFG) == 1696 and roofline.packed_weight_bytes(CFG, int8=True) == 160
    packed = memory_report(["pidec-pid", "hf-pie"], CFG, "dst", budget, 4, doc_tokens=5, subtasks=3)
    prow = {r["config"]: r for r in packed["rows"]}
    assert prow["pidec-pid"]["weights_mb"] * 2**20 == weights + 1696
    assert prow["pidec-pid"]["docs_fit"] == (budget - weights - 1696 - 840) // 2104
    assert prow["hf-pie"]["weights_mb"] * 2**20 == weights and "packed" in packed["method"]


def test_quantize_turns_pidec_and_ct2_rows_into_int8():
    got = check_configs(["hf-pie", "pidec-pid", "ct2-pie", "pidec-pie-int8"], "int8")
    assert got == ["hf-pie", "pidec-pid-int8", "ct2-pie-int8", "pidec-pie-int8"]
    assert check_configs(["pidec-pid", "pidec-pid-int8"], "int8") == ["pidec-pid-int8"]
    with pytest.raises(ValueError, match="expected one of int8"):
        check_configs(["pidec-pid"], "int4")
    with pytest.raises(ValueError, match="ct2-prefix-int8"):  # the message lists every name
        check_configs(["ct2-nope"], None)


def test_every_config_name_is_known():
    assert set(CT2_CONFIGS) < set(ALL_CONFIGS) and set(CONFIGS) < set(ALL_CONFIGS)
    assert all(configs.base_config(c) in RUNNERS for c in ALL_CONFIGS)
