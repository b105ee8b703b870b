"""The timing harness (`pidec.bench.harness`) on a tiny model and shrunken workloads: schema,
accounting, argument checks, the spec and its steps. Timings themselves are not checked (they
are what the harness is for, not something to assert)."""

import pytest
import torch

from pidec import packing
from pidec.bench import harness, roofline
from pidec.bench.configs import CONFIGS, config_cross_bytes
from pidec.bench.crosscheck import LOGITS_RTOL
from pidec.bench.harness import make_spec, run_bench
from pidec.bench.report import format_table
from pidec.bench.workloads import WORKLOADS, draw_documents
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
    "decode_steps",
    "speedup_vs_hf_pie",
    "floor_s",
    "floor_fraction",
    "floor_phases_s",
    "floor_bound",
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
        assert r["decode_steps"] >= 1
    assert by_config(full)["hf-pie"]["speedup_vs_hf_pie"] == 1.0


def test_same_token_numerator_for_every_config(full):
    rates = [r["tokens_per_s"] * r["latency_s_median"] for r in full["results"]]
    assert rates == pytest.approx([rates[0]] * len(rates))
    d = draw_documents(WORKLOADS["dst"], 1, 0, doc_tokens=DOC, subtasks=K)[0]
    assert rates[0] == pytest.approx(d.answer_tokens)


def test_fp32_cross_check_agrees(full):
    assert full["agree"] is True
    # teacher-forced in float64, the two stacks give the same logits to rounding
    assert full["logits_agree"] is True and 0 <= full["logits_gap"] <= LOGITS_RTOL
    assert "logits, teacher-forced in float64" in format_table(full)


def test_flops_order_for_dst(full):
    r = by_config(full)
    assert r["pidec-pid"]["gflops_per_doc"] < r["pidec-pie"]["gflops_per_doc"] < r["hf-pie"]["gflops_per_doc"]
    assert r["pidec-pid"]["gflops_per_doc"] < r["hf-pid-expanded"]["gflops_per_doc"]


def test_cross_cache_sizes(full):
    r = by_config(full)
    d = draw_documents(WORKLOADS["dst"], 1, 0, doc_tokens=DOC, subtasks=K)[0]
    cfg = T5Config.from_name("tiny")
    # pid holds one document; pie holds K rows of (longest prompt + document)
    assert r["pidec-pid"]["cross_cache_mb"] * 2**20 == roofline.kv_bytes(cfg, 1, DOC, 4)
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
    assert full["packed_weights"] is packing.available()  # float32 on the CPU: packed, as pidec.load does
    assert ("oneDNN-packed" in format_table(full)) is packing.available()
    plain = run_bench(
        "qa", "tiny", configs=["pidec-pid"], docs=1, repeats=1, threads=1, doc_tokens=32, subtasks=3, pack=False
    )
    assert plain["packed_weights"] is False and "BLAS" in format_table(plain)


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


def test_decode_steps_are_the_longest_row(full):
    r = by_config(full)
    d = draw_documents(WORKLOADS["dst"], 1, 0, doc_tokens=DOC, subtasks=K)[0]
    assert r["pidec-pid"]["decode_steps"] == r["hf-pie"]["decode_steps"] == d.longest
    assert r["pidec-seq"]["decode_steps"] == d.seq_len  # one row writes every answer in turn


def test_spec_holds_the_checked_arguments():
    spec = make_spec("qa", "tiny", None, ["pidec-pid"], 1, 2, "cpu", "float32", "int8", memory_budget="1MiB")
    assert spec.configs == ("pidec-pid-int8",) and spec.device == torch.device("cpu")
    assert spec.memory_budget == 2**20 and spec.torch_dtype is torch.float32 and spec.threads is None
    with pytest.raises(ValueError, match="memory budget"):
        make_spec("qa", "tiny", None, None, 1, 1, "cpu", "float32", None, memory_budget="lots")


def test_build_prepares_pidec_as_load_does():
    spec = make_spec("qa", "tiny", None, ["pidec-pid", "pidec-pid-int8"], 1, 1, "cpu", "float32", None, doc_tokens=16)
    built = harness.build(spec)
    e = built.engines
    assert built.configs == ["pidec-pid", "pidec-pid-int8"] and len(built.draws) == 1
    assert e.packed is packing.available() and packing.is_packed(e.ours) is packing.available()
    assert e.ours_int8.quantization["method"] == "int8" and e.ours_int8.quantization["head"] is False
    assert packing.is_packed(e.ours_int8) is packing.available()  # its float LM head
    assert not e.ours.training and not e.ours_int8.training
    plain = harness.build(make_spec("qa", "tiny", None, ["pidec-pid"], 1, 1, "cpu", "float32", None, pack=False))
    assert plain.engines.packed is False and not packing.is_packed(plain.engines.ours)


def test_format_table_names_every_config(full):
    table = format_table(full)
    for name in CONFIGS:
        assert name in table
    assert "latency_s" in table and "GFLOP/doc" in table and "agree: True" in table
