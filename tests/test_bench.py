"""The speed harness on a tiny model and shrunken workloads: schema, accounting, argument checks.
Timings themselves are not checked (they are what the harness is for, not something to assert)."""

import random

import pytest
import torch

from pidec.bench import harness as bench
from pidec.bench.harness import (
    CONFIGS,
    WORKLOADS,
    config_cross_bytes,
    config_flops,
    cross_cache_bytes,
    decoding_flops,
    draw_documents,
    encoder_token_flops,
    format_table,
    run_bench,
)
from pidec.model import PRESETS, T5Config

K, DOC = 4, 64
RESULT_KEYS = {
    "config",
    "precision",
    "achieved_gflops_per_s",
    "ceiling_fraction",
    "step_mb",
    "step_parts_mb",
    "latency_s_median",
    "docs_per_s",
    "tokens_per_s",
    "peak_mem_mb",
    "gflops_per_doc",
    "cross_cache_mb",
    "speedup_vs_hf_pie",
}


@pytest.fixture(scope="module")
def full():
    return run_bench("dst", "tiny", docs=1, repeats=1, seed=0, threads=1, doc_tokens=DOC, subtasks=K)


def by_config(result):
    return {r["config"]: r for r in result["results"]}


def test_schema(full):
    assert full["workload"] == "dst" and full["device"] == "cpu" and full["dtype"] == "float32"
    assert full["docs"] == 1 and full["repeats"] == 1 and full["torch_threads"] >= 1
    assert full["model"]["size"] == "tiny" and full["model"]["params"] > 0
    assert full["model"]["config"]["d_model"] == PRESETS["tiny"]["d_model"]
    assert [r["config"] for r in full["results"]] == CONFIGS
    for r in full["results"]:
        assert set(r) == RESULT_KEYS
        assert r["latency_s_median"] > 0 and r["docs_per_s"] == pytest.approx(1 / r["latency_s_median"])
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] >= 0
        assert r["gflops_per_doc"] > 0 and r["cross_cache_mb"] > 0
        assert r["speedup_vs_hf_pie"] > 0
    assert by_config(full)["hf-pie"]["speedup_vs_hf_pie"] == 1.0


def test_same_token_numerator_for_every_config(full):
    rates = [r["tokens_per_s"] * r["latency_s_median"] for r in full["results"]]
    assert rates == pytest.approx([rates[0]] * len(rates))
    d = draw_documents(WORKLOADS["dst"], 1, 0, doc_tokens=DOC, subtasks=K)[0]
    assert rates[0] == pytest.approx(d.answer_tokens)


def test_fp32_cross_check_agrees(full):
    assert full["agree"] is True
    # teacher-forced in float64, the two stacks give the same logits to rounding
    assert full["logits_agree"] is True and 0 <= full["logits_gap"] <= bench.LOGITS_RTOL
    assert "logits, teacher-forced in float64" in format_table(full)


def test_logits_gap_sees_a_different_model(tmp_path):
    from pidec import checkpoint
    from pidec.bench.harness import _load_models, _logits_gap

    checkpoint.save(bench.build_random_model("tiny"), tmp_path)
    ours, hf = _load_models(tmp_path, torch.device("cpu"), torch.float32, True)
    d = bench.draw_documents(bench.WORKLOADS["dst"], 1, 0, ours.config.vocab_size, DOC, K)[0]
    assert _logits_gap(ours, hf, d, torch.device("cpu")) <= bench.LOGITS_RTOL
    with torch.no_grad():
        ours.decoder.layers[0].ff.wo.weight.mul_(1.5)  # one layer off: no longer the same function
    assert _logits_gap(ours, hf, d, torch.device("cpu")) > bench.LOGITS_RTOL


def test_flops_order_for_dst(full):
    r = by_config(full)
    assert r["pidec-pid"]["gflops_per_doc"] < r["pidec-pie"]["gflops_per_doc"] < r["hf-pie"]["gflops_per_doc"]
    assert r["pidec-pid"]["gflops_per_doc"] < r["hf-pid-expanded"]["gflops_per_doc"]


def test_cross_cache_sizes(full):
    r = by_config(full)
    d = draw_documents(WORKLOADS["dst"], 1, 0, doc_tokens=DOC, subtasks=K)[0]
    cfg = T5Config.from_name("tiny")
    # pid holds one document; pie holds K rows of (longest prompt + document)
    assert r["pidec-pid"]["cross_cache_mb"] * 2**20 == cross_cache_bytes(cfg, 1, DOC, 4)
    ratio = r["pidec-pid"]["cross_cache_mb"] / r["pidec-pie"]["cross_cache_mb"]
    assert ratio == pytest.approx(DOC / (K * d.pie_len))
    assert ratio == pytest.approx(1 / K, rel=0.15)  # 1/K up to the prompt tokens pie also encodes
    assert r["hf-pie"]["cross_cache_mb"] == r["pidec-pie"]["cross_cache_mb"]
    assert r["hf-pid-expanded"]["cross_cache_mb"] == pytest.approx(K * r["pidec-pid"]["cross_cache_mb"])
    assert r["pidec-seq"]["cross_cache_mb"] == r["pidec-pid"]["cross_cache_mb"]
    # the measured size of pidec's cache matches the analytic one used for transformers
    assert config_cross_bytes("pidec-pie", cfg, d, 4) == r["pidec-pie"]["cross_cache_mb"] * 2**20


def test_subset_of_configs_without_hf():
    r = run_bench(
        "qa", "tiny", configs=["pidec-pid", "pidec-seq"], docs=2, repeats=1, threads=1, doc_tokens=32, subtasks=3
    )
    assert [x["config"] for x in r["results"]] == ["pidec-pid", "pidec-seq"]
    assert all(x["speedup_vs_hf_pie"] is None for x in r["results"])
    assert r["agree"] is None
    table = format_table(r)
    assert "pidec-pid" in table and "pidec-seq" in table


def test_packed_weights_are_the_default_and_can_be_turned_off(full):
    from pidec import packing

    assert full["packed_weights"] is packing.available()  # float32 on the CPU: packed, as pidec.load does
    assert ("oneDNN-packed" in format_table(full)) is packing.available()
    plain = run_bench(
        "qa", "tiny", configs=["pidec-pid"], docs=1, repeats=1, threads=1, doc_tokens=32, subtasks=3, pack=False
    )
    assert plain["packed_weights"] is False and "BLAS" in format_table(plain)


def test_format_table_names_every_config(full):
    table = format_table(full)
    for name in CONFIGS:
        assert name in table
    assert "latency_s" in table and "GFLOP/doc" in table and "agree: True" in table


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        (dict(workload="chat"), ["dst", "summ", "qa"]),
        (dict(model_size="huge"), ["tiny", "small", "base", "large"]),
        (dict(configs=["hf-pie", "vllm"]), CONFIGS),
        (dict(dtype="float64"), ["float32", "bfloat16", "float16"]),
        (dict(dtype="float16"), ["cuda"]),
        (dict(docs=0), ["docs"]),
        (dict(repeats=0), ["repeats"]),
        (dict(threads=0), ["threads"]),
        (dict(device="tpu"), ["cpu", "cuda"]),
    ],
)
def test_bad_arguments(kwargs, allowed):
    args = dict(workload="dst", model_size="tiny", docs=1, repeats=1)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        run_bench(**args)
    for name in allowed:
        assert name in str(e.value)


def test_encoder_token_flops_by_hand():
    # 1 layer, d_model 4, 2 heads of d_kv 2 (inner 4), gated d_ff 8, sequence of 3 tokens:
    #   q, k, v, o: 4 * 2*4*4 = 128;  scores + weighted sum: 2 * 2*3*4 = 48
    #   wi_0, wi_1: 2 * 2*4*8 = 128;  wo: 2*8*4 = 64           -> 368
    cfg = T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    assert encoder_token_flops(cfg, 3) == 368
    relu = T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_layers=2, num_heads=2, feed_forward_proj="relu")
    assert encoder_token_flops(relu, 3) == 2 * (128 + 48 + 64 + 64)


def test_decoding_flops_compaction():
    cfg = T5Config.from_name("tiny")
    short = decoding_flops(cfg, 3, [2, 5], 16, compaction=True)
    full = decoding_flops(cfg, 3, [5, 5], 16, compaction=True)
    assert decoding_flops(cfg, 3, [2, 5], 16, compaction=False) == full
    # compaction saves exactly the 3 passes the short row skips
    saved = sum(bench.decoder_token_flops(cfg, 3 + s, 16) + bench.lm_head_flops(cfg) for s in (2, 3, 4))
    assert full - short == saved


def test_workload_draws():
    w = WORKLOADS["dst"]
    draws = draw_documents(w, 2, seed=5)
    assert draws[0].document != draws[1].document  # each document its own draw
    for d in draws:
        assert len(d.document) == 512 and d.document[-1] == 1 and all(100 <= t < 32000 for t in d.document[:-1])
        assert d.k == 30 and all(4 <= len(p) <= 8 for p in d.prompts)
        assert sum(n == 2 for n in d.out_lens) == 24 and all(3 <= n <= 10 for n in d.out_lens if n != 2)
        assert d.seq_len == sum(len(p) + n + 1 for p, n in zip(d.prompts, d.out_lens))
    assert draw_documents(w, 2, seed=5)[1].out_lens == draws[1].out_lens  # seeded
    s = draw_documents(WORKLOADS["summ"], 1, seed=0)[0]
    assert len(s.document) == 1500 and s.k == 4 and all(100 <= n <= 250 for n in s.out_lens)
    q = draw_documents(WORKLOADS["qa"], 1, seed=0)[0]
    assert q.k == 14 and all(8 <= len(p) <= 16 for p in q.prompts) and all(3 <= n <= 20 for n in q.out_lens)
    assert WORKLOADS["dst"].output_lengths(random.Random(0), 1)[0] >= 3  # at least one long row


def test_config_flops_accounts_for_padding_and_rows():
    cfg = T5Config.from_name("tiny")
    d = draw_documents(WORKLOADS["qa"], 1, 0, doc_tokens=40, subtasks=3)[0]
    flops = {name: config_flops(name, cfg, d) for name in CONFIGS}
    assert flops["pidec-pid"] < flops["hf-pid-expanded"]
    assert flops["pidec-pie"] < flops["hf-pie"]
    with pytest.raises(ValueError):
        config_flops("nope", cfg, d)
