"""pidec.model against transformers: teacher-forced logits, row folding, relative buckets, config."""

from __future__ import annotations

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from pidec.model import T5, RowGroups, T5Config, relative_position_bucket

from .conftest import SPECS, TINY, VARIANTS, padded_batch, random_tokens

ATOL = 1e-4

DOC_LENGTHS = [40, 23, 7]  # 40 > 2 * max_distance: every bucket kind is reached


def _docs(vocab: int, seed: int, lengths=DOC_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [random_tokens(g, n, vocab) for n in lengths]


def _rows(vocab: int, seed: int, lengths: list[int]) -> list[list[int]]:
    """Decoder rows: decoder start token, then random ids (EOS and pad included)."""
    g = torch.Generator().manual_seed(seed)
    return [[0] + random_tokens(g, n - 1, vocab, low=0) for n in lengths]


def _hf_logits(hf, ids, mask, dec, dec_mask):
    with torch.no_grad():
        return hf(
            input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec, decoder_attention_mask=dec_mask.long()
        ).logits


# -- teacher forcing ----------------------------------------------------------------------


def test_variants_are_what_they_claim(variant):
    """The fixtures really are original T5 (tied + scaled), v1.1 and mT5 (untied, unscaled)."""
    pid = variant.pid
    spec = SPECS[variant.name]
    assert pid.config.tie_word_embeddings is spec["tie"]
    assert (pid.lm_head is None) is spec["tie"]
    assert pid.config.is_gated is (variant.name != "t5")
    assert len(pid.encoder.layers) == 2 and len(pid.decoder.layers) == 3
    if not spec["tie"]:
        assert not torch.equal(pid.lm_head.weight, pid.embed.weight)
        torch.testing.assert_close(pid.lm_head.weight, variant.hf.lm_head.weight, rtol=0, atol=0)


def test_teacher_forced_logits_match_transformers(variant):
    docs = _docs(variant.vocab, seed=1)
    ids, mask = padded_batch(docs)
    assert not bool(mask.all())  # the encoder batch really is padded
    dec, dec_mask = padded_batch(_rows(variant.vocab, seed=2, lengths=[9, 4, 1]))
    ours = variant.pid(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask)
    ref = _hf_logits(variant.hf, ids, mask, dec, dec_mask)
    assert ours.shape == (3, 9, variant.vocab)
    keep = dec_mask  # positions past a row's end are padding: their values are nobody's business
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=0, atol=ATOL)
    # the reference is not trivially small: a wrong model could not pass by accident
    assert ref[keep].abs().max() > 0.5


def test_teacher_forced_unpadded_single_document(variant):
    docs = _docs(variant.vocab, seed=3, lengths=[41])
    ids, mask = padded_batch(docs)
    dec = torch.tensor(_rows(variant.vocab, seed=4, lengths=[12]))
    ours = variant.pid(ids, dec)
    with torch.no_grad():
        ref = variant.hf(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)


def test_encoder_padding_does_not_change_a_document(variant):
    """A document encoded alone and inside a padded batch gives the same decoder logits."""
    docs = _docs(variant.vocab, seed=5)
    dec = torch.tensor(_rows(variant.vocab, seed=6, lengths=[6]))
    ids, mask = padded_batch(docs)
    batch = variant.pid(ids, dec.expand(3, -1), attention_mask=mask)
    alone = variant.pid(torch.tensor([docs[2]]), dec)
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=ATOL)
    # and the documents do differ, so the rows are not all the same
    assert (batch[0] - batch[2]).abs().max() > 1e-2


# -- prompt-in-decoder folding ------------------------------------------------------------


@pytest.mark.parametrize(
    "counts",
    [
        [2, 2, 2],  # regular: the fold is a view
        [3, 1, 2],  # ragged
        [1, 4, 1],
        [2, 0, 1],  # a document without rows
        [1, 1, 1],  # the usual one row per document
    ],
)
def test_folded_rows_match_repeated_documents(variant, counts):
    docs = _docs(variant.vocab, seed=7)
    ids, mask = padded_batch(docs)
    row_doc = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    R = int(row_doc.numel())
    lengths = [1 + (5 * i + 3) % 8 for i in range(R)]  # different lengths: decoder padding too
    dec, dec_mask = padded_batch(_rows(variant.vocab, seed=8, lengths=lengths))
    ours = variant.pid(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask, row_doc=row_doc)
    ref = _hf_logits(variant.hf, ids[row_doc], mask[row_doc], dec, dec_mask)
    assert ours.shape == ref.shape == (R, dec.shape[1], variant.vocab)
    torch.testing.assert_close(ours[dec_mask], ref[dec_mask], rtol=0, atol=ATOL)


def test_folded_rows_attend_to_their_own_document(t5):
    """Same decoder row, different documents -> different logits; same document -> identical."""
    docs = _docs(t5.vocab, seed=9)
    ids, mask = padded_batch(docs)
    row = _rows(t5.vocab, seed=10, lengths=[5])[0]
    dec = torch.tensor([row] * 4)
    out = t5.pid(ids, dec, attention_mask=mask, row_doc=torch.tensor([0, 0, 1, 2]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    assert (out[1] - out[2]).abs().max() > 1e-2
    assert (out[2] - out[3]).abs().max() > 1e-2


def test_rows_must_be_ordered_by_document(t5):
    ids, mask = padded_batch(_docs(t5.vocab, seed=11))
    dec = torch.tensor(_rows(t5.vocab, seed=12, lengths=[3, 3, 3]))
    with pytest.raises(ValueError, match="ordered by document"):
        t5.pid(ids, dec, attention_mask=mask, row_doc=torch.tensor([1, 0, 2]))


def test_row_count_must_match_documents_without_row_doc(t5):
    ids, mask = padded_batch(_docs(t5.vocab, seed=13))
    dec = torch.tensor(_rows(t5.vocab, seed=14, lengths=[3, 3]))
    with pytest.raises(ValueError, match="row_doc"):
        t5.pid(ids, dec, attention_mask=mask)


@pytest.mark.parametrize("counts", [[2, 2, 2], [3, 1, 2], [0, 2, 1], [1]])
def test_rowgroups_fold_unfold_round_trip(counts):
    g = RowGroups.from_counts(counts)
    R, t = sum(counts), 3
    assert g.docs == len(counts) and g.width == max(counts)
    assert g.regular is (len(set(counts)) == 1)
    x = torch.arange(R * t * 2, dtype=torch.float32).view(R, t, 2)
    folded = g.fold(x)
    assert folded.shape == (len(counts), max(counts) * t, 2)
    # row r of document d sits at slot s: positions [s*t, (s+1)*t) of document d
    r = 0
    for d, c in enumerate(counts):
        for s in range(c):
            assert torch.equal(folded[d, s * t : (s + 1) * t], x[r])
            r += 1
    assert torch.equal(g.unfold(folded, t), x)


# -- relative positions -------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(8, 20), (32, 128), (16, 40), (6, 7)])
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    q = torch.arange(0, 300)
    rel = q[None, :] - q[:, None]  # key - query, both signs, up to +-299 (beyond max_distance)
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref)
    # the grid reaches every bucket the scheme has (bidirectional: all but bucket num_buckets/2,
    # which would be "positive offset 0")
    expected = num_buckets - 1 if bidirectional else num_buckets
    assert int(ours.unique().numel()) == expected


def test_relative_position_bucket_known_values():
    rel = torch.tensor([-100, -20, -5, -3, 0, 1, 3, 5, 100])
    bi = relative_position_bucket(rel, True, 8, 20).tolist()
    uni = relative_position_bucket(rel, False, 8, 20).tolist()
    # bidirectional: 4 buckets per side, 2 exact; positive offsets in the upper half
    assert bi == [3, 3, 2, 2, 0, 5, 6, 6, 7]
    # unidirectional: only the past counts; every future offset is bucket 0
    assert uni == [7, 7, 4, 3, 0, 0, 0, 0, 0]


# -- configuration ------------------------------------------------------------------------


def _tiny(**kw) -> dict:
    base = dict(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "proj,match",
    [
        ("gated-gelu-new", "feed_forward_proj"),
        ("relu-gated", "feed_forward_proj"),
        ("swiglu", "unknown feed-forward activation"),
        ("gated-bogus", "unknown feed-forward activation"),
        ("", "unknown feed-forward activation"),
    ],
)
def test_config_rejects_bad_feed_forward_proj(proj, match):
    with pytest.raises(ValueError, match=match):
        T5Config(**_tiny(feed_forward_proj=proj))


@pytest.mark.parametrize(
    "proj,gated,act", [("relu", False, "relu"), ("gated-gelu", True, "gelu"), ("gated-silu", True, "silu")]
)
def test_config_accepts_feed_forward_proj(proj, gated, act):
    c = T5Config(**_tiny(feed_forward_proj=proj))
    assert c.is_gated is gated and c.activation == act
    m = T5(c)
    ff = m.encoder.layers[0].ff
    assert hasattr(ff, "wi_0") is gated and hasattr(ff, "wi") is (not gated)


@pytest.mark.parametrize("name", ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"])
@pytest.mark.parametrize("value", [0, -1])
def test_config_rejects_non_positive_sizes(name, value):
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        T5Config(**_tiny(**{name: value}))


@pytest.mark.parametrize("value", [0, -2])
def test_config_rejects_non_positive_decoder_layers(value):
    with pytest.raises(ValueError, match="num_decoder_layers"):
        T5Config(**_tiny(num_decoder_layers=value))


def test_config_defaults_follow_tying():
    tied = T5Config(**_tiny())
    assert tied.num_decoder_layers == 1 and tied.scale_decoder_outputs is True
    untied = T5Config(**_tiny(tie_word_embeddings=False, num_decoder_layers=3))
    assert untied.num_decoder_layers == 3 and untied.scale_decoder_outputs is False
    assert T5(untied).lm_head is not None and T5(tied).lm_head is None


def test_scaling_of_decoder_outputs(t5):
    """Original T5 multiplies by d_model**-0.5 before the tied head."""
    h = torch.randn(2, 3, TINY["d_model"])
    expected = (h * TINY["d_model"] ** -0.5) @ t5.pid.embed.weight.T
    torch.testing.assert_close(t5.pid.logits(h), expected, rtol=1e-5, atol=1e-5)


def test_all_variants_listed():
    assert set(VARIANTS) == {"t5", "v11", "mt5"}


@pytest.mark.parametrize("shape", [(1, 24), (3, 2, 24), (16, 24), (17, 24), (40, 1, 24)])
def test_few_rows_linear_matches_f_linear(shape):
    from pidec.packing import FEW_ROWS, Linear

    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(shape)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (*shape[:-1], 40)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert isinstance(layer, torch.nn.Linear) and layer.bias is None
    # with gradients the plain path runs (training), and gradients flow
    y = layer(x).sum()
    y.backward()
    assert layer.weight.grad is not None and FEW_ROWS == 16
