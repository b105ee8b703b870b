"""The analytic counters (`pidec.bench.roofline`): FLOPs, bytes per decoding step and memory,
against values worked out by hand on a model small enough to count on paper."""

import pytest

from pidec.bench import roofline
from pidec.model import T5, T5Config

from ..conftest import HAND_COUNTED

CFG = HAND_COUNTED


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


def test_encoder_token_flops_by_hand():
    # 1 layer, d_model 4, 2 heads of d_kv 2 (inner 4), gated d_ff 8, sequence of 3 tokens:
    #   q, k, v, o: 4 * 2*4*4 = 128;  scores + weighted sum: 2 * 2*3*4 = 48
    #   wi_0, wi_1: 2 * 2*4*8 = 128;  wo: 2*8*4 = 64           -> 368
    cfg = T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    assert roofline.encoder_token_flops(cfg, 3) == 368
    relu = T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_layers=2, num_heads=2, feed_forward_proj="relu")
    assert roofline.encoder_token_flops(relu, 3) == 2 * (128 + 48 + 64 + 64)


def test_decoding_flops_compaction():
    cfg = T5Config.from_name("tiny")
    short = roofline.decoding_flops(cfg, 3, [2, 5], 16, compaction=True)
    full = roofline.decoding_flops(cfg, 3, [5, 5], 16, compaction=True)
    assert roofline.decoding_flops(cfg, 3, [2, 5], 16, compaction=False) == full
    # compaction saves exactly the 3 passes the short row skips
    saved = sum(roofline.decoder_token_flops(cfg, 3 + s, 16) + roofline.lm_head_flops(cfg) for s in (2, 3, 4))
    assert full - short == saved
