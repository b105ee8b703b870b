"""The counters that say how far a configuration is from the machine (`pidec.bench.roofline`, the
ceiling and the per-configuration shapes in `pidec.bench.harness`), against values worked out by hand
on a model small enough to count on paper."""

import pytest
import torch

from pidec import packing
from pidec.bench import harness as bench
from pidec.bench import roofline
from pidec.bench.harness import DocDraw, config_flops, config_shape, config_step_bytes, largest_draw, measure_ceiling
from pidec.model import T5, T5Config

# 1 encoder and 1 decoder layer, d_model 4, 2 heads of d_kv 2 (inner 4), gated d_ff 8, vocabulary 10
CFG = T5Config(
    vocab_size=10,
    d_model=4,
    d_kv=2,
    d_ff=8,
    num_layers=1,
    num_heads=2,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)


def test_step_weight_bytes_by_hand():
    # linears (elements): self q,k,v,o 4*16 = 64; cross q,o 2*16 = 32; wi_0, wi_1, wo 3*32 = 96 -> 192
    # float32: 192*4 = 768 + 3 norms 3*4*4 = 48 -> 816; final norm 16; head 4*10*4 = 160 -> 992
    assert roofline.step_weight_bytes(CFG, 4) == 992
    # int8: each linear in*out bytes + 4 bytes per output: q,k,v,o,cross q,o 6*(16+16) = 192;
    # wi_0, wi_1 2*(32+32) = 128; wo 32+16 = 48 -> 368 + norms 48 + final 16 + float head 160
    assert roofline.step_weight_bytes(CFG, 4, int8=True) == 592
    assert roofline.step_weight_bytes(CFG, 4, int8=True, head_int8=True) == 592 - 160 + 40 + 40
    tied = T5Config(**{**CFG.to_dict(), "tie_word_embeddings": True})
    assert roofline.step_weight_bytes(tied, 4, int8=True, head_int8=True) == 592  # the embedding: float


@pytest.mark.parametrize("ff, tie", [("gated-gelu", False), ("relu", True)])
def test_model_weight_bytes_is_the_models_own_size(ff, tie):
    cfg = T5Config(**{**CFG.to_dict(), "feed_forward_proj": ff, "tie_word_embeddings": tie, "num_decoder_layers": 2})
    model = T5(cfg)
    assert roofline.model_weight_bytes(cfg, 4) == sum(p.numel() * 4 for p in model.parameters())
    assert roofline.model_weight_bytes(cfg, 2) == sum(p.numel() * 2 for p in model.parameters())


def test_model_weight_bytes_by_hand():
    # embedding 160; encoder layer (64 + 96)*4 + 2 norms 32 = 672; decoder layer (128 + 96)*4 + 48 = 944;
    # final norms 32; relative biases 2 * 32 buckets * 2 heads * 4 = 512; head 160
    assert roofline.model_weight_bytes(CFG, 4) == 160 + 672 + 944 + 32 + 512 + 160


def test_kv_bytes_by_hand():
    # K and V, 1 layer, 3 rows, 2 heads, 5 positions, d_kv 2, 4 bytes
    assert roofline.kv_bytes(CFG, 3, 5, 4) == 2 * 1 * 3 * 2 * 5 * 2 * 4 == 480
    assert bench.cross_cache_bytes(CFG, 3, 5, 4) == 480


def test_decoding_step_bytes_shared_cache():
    # prefix 2, rows writing 1, 3, 4 tokens: passes s = 1, 2, 3 with 2, 2, 1 rows alive,
    # reading 2+s self positions each: 32 bytes per row-position -> 192, 256, 160
    got = roofline.decoding_step_bytes(CFG, 2, [1, 3, 4], 5, cross_per_row=False, compaction=True, element_size=4)
    assert got["passes"] == 3
    assert got["weights"] == 992
    assert got["cross"] == 160  # one copy of the document: kv_bytes(1, 5)
    assert got["self"] == pytest.approx((192 + 256 + 160) / 3)
    assert got["total"] == pytest.approx(992 + 160 + 608 / 3)


def test_decoding_step_bytes_per_row_cache_follows_pidec_compaction():
    # one cross copy per row: 3 held; at s=1 one of 3 is done (1*4 >= 3: dropped) -> 2 copies;
    # s=2: 2; at s=3 one of 2 done -> 1
    got = roofline.decoding_step_bytes(CFG, 2, [1, 3, 4], 5, cross_per_row=True, compaction=True, element_size=4)
    assert got["cross"] == pytest.approx((320 + 320 + 160) / 3)
    # 1 of 8 done is under a quarter: the copy stays until more rows are done
    lag = roofline.decoding_step_bytes(CFG, 1, [1] + [3] * 7, 5, cross_per_row=True, compaction=True, element_size=4)
    assert lag["cross"] == pytest.approx(8 * 160)
    # without compaction every row runs every pass
    full = roofline.decoding_step_bytes(CFG, 2, [1, 3, 4], 5, cross_per_row=True, compaction=False, element_size=4)
    assert full["cross"] == 3 * 160 and full["self"] == pytest.approx(32 * 3 * (3 + 4 + 5) / 3)
    none = roofline.decoding_step_bytes(CFG, 2, [1, 1], 5, cross_per_row=False, compaction=True, element_size=4)
    assert none["passes"] == 0 and none["total"] == 0


def test_decode_memory_by_hand():
    # one document of 5 tokens, 3 rows of 6 positions, fused attention (scores for the bias only):
    # transient: (5 tokens * (4*4 hidden + 2*8 ff) + 2 heads * 5*5 scores) * 4 = (160 + 50) * 4 = 840
    # per document: cross 160 + self kv(3, 6) = 576 + logits 3*10*4 = 120 -> 856
    est = roofline.decode_memory(CFG, 4, 1000, 1, 5, 1, 3, 6, keeps_encoder_output=False, per_row_scores=False)
    assert est.transient == 840 and est.per_doc == 856
    assert est.parts == {"cross": 160, "self": 576, "encoder_output": 0, "logits": 120}
    assert est.fit(1000 + 840 + 4 * 856) == 4 and est.fit(1000 + 840 + 4 * 856 - 1) == 3
    assert est.fit(1000) == 0
    # 3 encoder rows, scores per row, encoder output kept: (15*32 + 3*2*25)*4 = 2520; output 15*4*4 = 240
    hf = roofline.decode_memory(CFG, 4, 1000, 3, 5, 3, 3, 6, keeps_encoder_output=True, per_row_scores=True)
    assert hf.transient == 2520 and hf.parts["encoder_output"] == 240 and hf.parts["cross"] == 480


def test_memory_report_by_hand():
    # dst at its largest, shrunk: a 5-token document, 3 prompts of 8 tokens, outputs of 10 tokens
    d = largest_draw(bench.WORKLOADS["dst"], doc_tokens=5, subtasks=3)
    assert len(d.document) == 5 and d.k == 3 and [len(p) for p in d.prompts] == [8] * 3 and d.out_lens == [10] * 3
    weights = roofline.model_weight_bytes(CFG, 4)  # 2480
    # pidec-pid: per document cross kv(1, 5) 160 + self kv(3, 9+10) 1824 + logits 120 = 2104, transient 840
    # pidec-pie: 3 rows of 13 tokens: cross kv(3, 13) 1248 + self kv(3, 11) 1056 + 120 = 2424;
    #            transient (39*32 + 2*13*13)*4 = 6344
    # hf-pie:    as pie + encoder output 39*4*4 = 624 -> 3048; scores per row: (39*32 + 3*2*169)*4 = 9048
    budget = weights + 9048 + 7 * 3048
    mem = bench.memory_report(
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
    assert "docs_fit" in bench.format_memory(mem)
    # packed (the CPU default): pidec's float32 linear weights once more. Encoder: attention
    # 4 x (4x4) + gated FFN 2 x (4x8) + 8x4 = 160 elements; decoder: 2 attentions 128 + FFN 96 = 224;
    # head 4x10 = 40: (160 + 224 + 40) x 4 bytes = 1696. transformers holds no such copy.
    assert roofline.packed_weight_bytes(CFG) == 1696 and roofline.packed_weight_bytes(CFG, int8=True) == 160
    packed = bench.memory_report(["pidec-pid", "hf-pie"], CFG, "dst", budget, 4, doc_tokens=5, subtasks=3)
    prow = {r["config"]: r for r in packed["rows"]}
    assert prow["pidec-pid"]["weights_mb"] * 2**20 == weights + 1696
    assert prow["pidec-pid"]["docs_fit"] == (budget - weights - 1696 - 840) // 2104
    assert prow["hf-pie"]["weights_mb"] * 2**20 == weights and "packed" in packed["method"]


@pytest.mark.parametrize(
    "text, value",
    [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("16GB", 16 * 10**9), ("1.5GiB", 3 * 2**29), ("2e9", 2 * 10**9)],
)
def test_parse_bytes(text, value):
    assert roofline.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["8 lightyears", "GiB", "-1GiB", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="memory budget"):
        roofline.parse_bytes(text)


def test_best_rate_counts_calls_over_the_clock(monkeypatch):
    clock = [0.0]

    def product():  # each call takes 10 ms of the fake clock
        clock[0] += 0.01

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    # at least 0.05 s per trial: 5 calls of 120 FLOPs in 0.05 s
    assert bench._best_rate(product, 120, torch.device("cpu"), 0.05, trials=2) == pytest.approx(5 * 120 / 0.05)


def test_measure_ceiling_times_the_workload_shape(monkeypatch):
    seen = []

    def fake_rate(fn, flops, device, min_time_s, trials):
        out = fn()
        seen.append((flops, out.dtype, tuple(out.shape)))
        return 1e9 * len(seen)

    monkeypatch.setattr(bench, "_best_rate", fake_rate)
    ceil = measure_ceiling(32, 64, 48)
    flops = 2 * 32 * 64 * 48
    assert seen[0] == (flops, torch.float32, (32, 48))  # 2mkn FLOPs, float product (BLAS)
    if packing.available():  # the same product through the oneDNN-packed weight
        assert seen[1] == (flops, torch.float32, (32, 48))
        kernels = {"blas": 1.0, "onednn_packed": 2.0}
    else:
        kernels = {"blas": 1.0}
    assert seen[-1] == (flops, torch.int32, (32, 48))  # int8 product, int32 result
    assert ceil == {
        "shape": [32, 64, 48],
        "dtype": "float32",
        "float_gflops": max(kernels.values()),  # the faster float kernel is the ceiling
        "float_kernels": kernels,
        "int8_gops": float(len(seen)),
        "int8_error": None,
        "trials": 3,
    }


def test_measure_ceiling_packed_product_is_the_same_product():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=gen), torch.randn(64, 48, generator=gen)
    if not packing.available():
        pytest.skip("torch without oneDNN")
    torch.testing.assert_close(packing.packed_product(a, b.t().contiguous()), a @ b, rtol=1e-4, atol=1e-4)


def test_best_ceiling_keeps_the_faster_of_each_kernel():
    a = {
        "shape": [1, 1, 1],
        "dtype": "float32",
        "float_gflops": 5.0,
        "float_kernels": {"blas": 5.0, "onednn_packed": 3.0},
        "int8_gops": None,
        "int8_error": "none here",
        "trials": 3,
    }
    b = dict(a, float_gflops=6.0, float_kernels={"blas": 2.0, "onednn_packed": 6.0}, int8_gops=9.0, int8_error=None)
    out = bench._best_ceiling(a, b)
    assert out["float_gflops"] == 6.0 and out["float_kernels"] == {"blas": 5.0, "onednn_packed": 6.0}
    assert out["int8_gops"] == 9.0 and out["int8_error"] is None and out["trials"] == 6


def test_measure_ceiling_for_real_is_positive():
    ceil = measure_ceiling(32, 64, 64, min_time_s=0.01, trials=1)
    assert ceil["float_gflops"] > 0 and ceil["int8_gops"] > 0


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


def test_best_ceiling_keeps_the_faster_of_two_measurements():
    a = {"shape": [4, 4, 4], "dtype": "float32", "float_gflops": 5.0, "int8_gops": None, "int8_error": "x", "trials": 3}
    b = dict(a, float_gflops=4.0, int8_gops=9.0, int8_error=None)
    assert bench._best_ceiling(a, b) == dict(a, float_gflops=5.0, int8_gops=9.0, int8_error=None, trials=6)
    assert bench._best_ceiling(a, a)["int8_gops"] is None and bench._best_ceiling(a, a)["int8_error"] == "x"
