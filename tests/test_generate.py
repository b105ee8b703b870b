"""pidec.generate against transformers.generate, row by row, on tiny random models.

Generation runs in float64 on both sides so that no near-tie between two logits can flip a
greedy choice or a beam ranking: any difference is a real difference.

transformers 5.23's generate builds its KV cache with `num_layers` (encoder) layers, which fails
for a decoder deeper than the encoder (ours: 2 vs 3), so the reference runs with use_cache=False.
"""

from __future__ import annotations

import pytest
import torch

import pidec.generate as gen_mod
import pidec.rows as rows_mod
from pidec.generate import Decoded, Row, decode, encode
from pidec.model import KVCache
from pidec.rows import pack_prompts

from .conftest import DOC_LENGTHS, EOS, random_docs, random_rows, random_tokens


def hf_generate(v, doc: list[int], row: Row, num_beams: int = 1, **kw) -> tuple[list[int], bool, float | None]:
    """transformers' output for one row: tokens after the prefix with a final EOS removed,
    whether it ended with EOS, and the beam score."""
    out = v.hf64().generate(
        input_ids=torch.tensor([doc]),
        decoder_input_ids=torch.tensor([row.prefix]),
        max_new_tokens=row.max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        use_cache=False,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )
    seq = out.sequences[0].tolist()
    assert seq[: len(row.prefix)] == row.prefix
    new = seq[len(row.prefix) :]  # one row alone: transformers pads nothing, every id is generated
    assert 1 <= len(new) <= row.max_new_tokens
    eos = kw.get("eos_token_id", EOS)
    ended = eos is not None and new[-1] == eos
    if ended:
        new = new[:-1]
    if eos is not None:
        assert eos not in new  # generation stops at the first EOS
    score = float(out.sequences_scores[0]) if num_beams > 1 else None
    return new, ended, score


def hf_reference(v, docs, rows, num_beams=1, **kw):
    return [hf_generate(v, docs[r.doc], r, num_beams, **kw) for r in rows]


def _assert_coverage(rows, ref):
    """The case exercises both ways of ending: EOS before the limit, and the limit."""
    assert any(ended and len(t) + 1 < r.max_new_tokens for r, (t, ended, _) in zip(rows, ref)), ref
    assert any(not ended and len(t) == r.max_new_tokens for r, (t, ended, _) in zip(rows, ref)), ref


# -- parity with transformers -------------------------------------------------------------


def test_greedy_matches_transformers(variant):
    model = variant.pid64()
    docs = random_docs(variant.vocab, seed=102)
    rows = random_rows(variant.vocab, seed=202)
    got = decode(model, encode(model, docs), rows)
    ref = hf_reference(variant, docs, rows)
    assert isinstance(got, Decoded) and got.scores is None
    assert got.tokens == [t for t, _, _ in ref]
    _assert_coverage(rows, ref)
    for r, t in zip(rows, got.tokens):
        assert len(t) <= r.max_new_tokens and EOS not in t


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_matches_transformers(variant, num_beams):
    model = variant.pid64()
    docs = random_docs(variant.vocab, seed=101)
    rows = random_rows(variant.vocab, seed=201)
    got = decode(model, encode(model, docs), rows, num_beams=num_beams)
    ref = hf_reference(variant, docs, rows, num_beams=num_beams)
    assert got.tokens == [t for t, _, _ in ref]
    assert got.scores == pytest.approx([s for _, _, s in ref], abs=1e-4)
    assert any(ended for _, ended, _ in ref)


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping", [(3, 0.5, False), (3, 2.0, False), (2, 1.0, True), (4, -1.0, True)]
)
def test_beam_options_match_transformers(v11, mt5, num_beams, length_penalty, early_stopping):
    for v in (v11, mt5):
        model = v.pid64()
        docs = random_docs(v.vocab, seed=114)
        rows = random_rows(v.vocab, seed=214)
        got = decode(
            model,
            encode(model, docs),
            rows,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        ref = hf_reference(
            v, docs, rows, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping
        )
        assert got.tokens == [t for t, _, _ in ref], v.name
        assert got.scores == pytest.approx([s for _, _, s in ref], abs=1e-4), v.name


def test_pad_and_eos_ids_inside_documents_and_prompts(variant):
    """Padding is by length, not by id: a 0 (pad id) or 1 (EOS id) inside a document or a prompt
    is an ordinary token."""
    model = variant.pid64()
    docs = [[5, 0, 0, 7, 1, 9, 0, 3, 4, 0], [0, 8, 8, 0, 2]]
    rows = [Row(0, [0, 0, 5], 8), Row(0, [0, 3, 0, 0, 1], 8), Row(1, [0], 8), Row(1, [0, 0], 8)]
    got = decode(model, encode(model, docs), rows)
    # transformers would infer an attention mask from the pad id: give it the real one
    ref = [
        hf_generate(variant, docs[r.doc], r, attention_mask=torch.ones(1, len(docs[r.doc]), dtype=torch.long))
        for r in rows
    ]
    assert got.tokens == [t for t, _, _ in ref]


def test_greedy_float32_matches_transformers(t5):
    """The float32 path too (the one benchmarks use)."""
    docs = random_docs(t5.vocab, seed=100)
    rows = random_rows(t5.vocab, seed=200)
    got = decode(t5.pid, encode(t5.pid, docs), rows)
    ref = hf_reference(t5, docs, rows)
    assert got.tokens == [t for t, _, _ in ref]


def test_rows_for_some_documents_only(v11):
    """Encoded documents without rows are fine (and row doc indices keep their meaning)."""
    model = v11.pid64()
    docs = random_docs(v11.vocab, seed=103)
    rows = [r for r in random_rows(v11.vocab, seed=203) if r.doc == 2]
    got = decode(model, encode(model, docs), rows)
    assert got.tokens == [t for t, _, _ in hf_reference(v11, docs, rows)]


def test_custom_eos_token(mt5):
    """eos_token_id given explicitly: that id ends a row, the model's EOS is an ordinary token."""
    model = mt5.pid64()
    docs = random_docs(mt5.vocab, seed=104)
    rows = random_rows(mt5.vocab, seed=204)
    default = decode(model, encode(model, docs), rows)
    # pick, as the custom EOS, a token the default run generates somewhere in the middle of a row
    candidates = [t[1] for t in default.tokens if len(t) > 2]
    assert candidates
    eos = candidates[0]
    got = decode(model, encode(model, docs), rows, eos_token_id=eos)
    ref = hf_reference(mt5, docs, rows, eos_token_id=eos)
    assert got.tokens == [t for t, _, _ in ref]
    assert got.tokens != default.tokens


# -- compaction ---------------------------------------------------------------------------


def _generated_lengths(tokens, rows, eos=EOS):
    """Tokens each row computed, its EOS included."""
    return [len(t) + (1 if len(t) < r.max_new_tokens else 0) for t, r in zip(tokens, rows)]


def test_compaction_changes_cost_not_tokens_greedy(variant):
    model = variant.pid64()
    docs = random_docs(variant.vocab, seed=105)
    rows = random_rows(variant.vocab, seed=205)
    cross = encode(model, docs)
    on = decode(model, cross, rows, compaction=True)
    off = decode(model, cross, rows, compaction=False)
    assert on.tokens == off.tokens
    lengths = _generated_lengths(on.tokens, rows)
    # every row is computed for each of its tokens after the first (which comes from the prefill)
    assert on.stats.steps == off.stats.steps == max(lengths) - 1
    assert on.stats.row_steps == sum(n - 1 for n in lengths)
    assert off.stats.row_steps == len(rows) * off.stats.steps
    assert on.stats.row_steps < off.stats.row_steps
    # output_tokens counts the tokens returned (EOS excluded), as for beams and the API's usage
    assert on.stats.output_tokens == off.stats.output_tokens == sum(len(t) for t in on.tokens)


def encoded_case(variant, k: int):
    """A pid64 model, random documents (seed 100 + k) and rows (seed 200 + k), the documents encoded."""
    model = variant.pid64()
    docs = random_docs(variant.vocab, seed=100 + k)
    return model, docs, random_rows(variant.vocab, seed=200 + k), encode(model, docs)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_compaction_changes_cost_not_tokens_beam(variant, num_beams):
    model, docs, rows, cross = encoded_case(variant, 6)
    on = decode(model, cross, rows, num_beams=num_beams, compaction=True)
    off = decode(model, cross, rows, num_beams=num_beams, compaction=False)
    assert on.tokens == off.tokens
    assert on.scores == off.scores
    assert off.stats.row_steps == len(rows) * num_beams * off.stats.steps
    assert on.stats.row_steps < off.stats.row_steps
    assert on.stats.row_steps % num_beams == 0  # whole groups leave together


# -- order, lengths, shared cache ---------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 2])
def test_rows_out_of_document_order_come_back_in_caller_order(v11, num_beams):
    model, docs, rows, cross = encoded_case(v11, 7)
    shuffled_index = [5, 0, 3, 7, 1, 4, 2, 6]
    shuffled = [rows[i] for i in shuffled_index]
    assert [r.doc for r in shuffled] != sorted(r.doc for r in shuffled)
    ordered = decode(model, cross, rows, num_beams=num_beams)
    got = decode(model, cross, shuffled, num_beams=num_beams)
    assert got.tokens == [ordered.tokens[i] for i in shuffled_index]
    if num_beams > 1:
        assert got.scores == [ordered.scores[i] for i in shuffled_index]
    # and against transformers, row by row
    assert got.tokens == [t for t, _, _ in hf_reference(v11, docs, shuffled, num_beams=num_beams)]
    # the rows really differ, so a wrong permutation would show
    assert len({tuple(t) for t in got.tokens}) > 3


@pytest.mark.parametrize("num_beams", [1, 2])
def test_eos_none_runs_every_row_to_max_new_tokens(variant, num_beams):
    model, docs, rows, cross = encoded_case(variant, 8)
    full = decode(model, cross, rows, num_beams=num_beams, eos_token_id=None)
    assert [len(t) for t in full.tokens] == [r.max_new_tokens for r in rows]
    if num_beams == 1:
        stopped = decode(model, cross, rows, eos_token_id=-1)
        # up to its first EOS, a row is what it is with EOS enabled; then it goes on
        for f, s, r in zip(full.tokens, stopped.tokens, rows):
            assert f[: len(s)] == s
            if len(s) < r.max_new_tokens:
                assert f[len(s)] == EOS
        assert any(EOS in t for t in full.tokens)
        # every token is transformers' argmax given the row so far (teacher-forced check)
        hf = variant.hf64()
        for r, t in zip(rows, full.tokens):
            seq = torch.tensor([r.prefix + t])
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([docs[r.doc]]), decoder_input_ids=seq).logits[0]
            p = len(r.prefix)
            assert logits[p - 1 : p - 1 + len(t)].argmax(-1).tolist() == t


def test_cross_cache_is_one_copy_per_document(t5):
    model = t5.pid
    docs = random_docs(t5.vocab, seed=109)
    cross = encode(model, docs)
    cfg = model.config
    assert len(cross.k) == len(cross.v) == 3  # one per decoder layer
    assert cross.k[0].shape == (3, cfg.num_heads, 40, cfg.d_kv)
    assert cross.docs == 3
    assert cross.lengths.tolist() == DOC_LENGTHS
    assert cross.mask is not None and cross.mask.shape == (3, 1, 1, 40)

    one = encode(model, docs[:1])
    expected_bytes = 3 * 2 * 1 * cfg.num_heads * 40 * cfg.d_kv * 4  # layers, k+v, docs, heads, S, d_kv, fp32
    assert one.nbytes() == expected_bytes and one.mask is None
    prefix = [0, 5, 6]
    single = decode(model, one, [Row(0, prefix, 6)])
    many = decode(model, one, [Row(0, prefix, 6)] * 4 + [Row(0, [0], 6), Row(0, [0, 9], 6)])
    assert single.stats.cross_cache_bytes == many.stats.cross_cache_bytes == expected_bytes
    assert many.tokens[:4] == single.tokens * 4
    assert many.stats.self_cache_bytes > single.stats.self_cache_bytes  # the per-row cache does grow


def test_cross_cache_is_reusable(v11):
    """decode does not modify the documents' cache: encode once, decode many times."""
    model = v11.pid64()
    docs = random_docs(v11.vocab, seed=110)
    rows = random_rows(v11.vocab, seed=210)
    cross = encode(model, docs)
    k0 = [k.clone() for k in cross.k]
    first = decode(model, cross, rows)
    beams = decode(model, cross, rows, num_beams=2)
    again = decode(model, cross, rows)
    assert first.tokens == again.tokens
    assert cross.docs == 3 and all(torch.equal(a, b) for a, b in zip(k0, cross.k))
    assert beams.tokens == [t for t, _, _ in hf_reference(v11, docs, rows, num_beams=2)]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_finished_documents_are_dropped_without_changing_outputs(variant, num_beams, monkeypatch):
    model = variant.pid64()
    lengths = [33, 5, 21, 40, 9, 14, 2, 27]
    docs = random_docs(variant.vocab, seed=111, lengths=lengths)
    max_new = [1, 12, 2, 20, 1, 3, 16, 1]
    g = torch.Generator().manual_seed(211)
    rows = []
    for d, n in enumerate(max_new):
        for k in range(1 + d % 2):
            rows.append(Row(d, [0] + random_tokens(g, (d + k) % 4, variant.vocab), n + k))

    seen = []
    real = gen_mod.drop_empty_docs

    def spy(cross, doc):
        out_cross, out_doc = real(cross, doc)
        seen.append((cross.docs, out_cross.docs))
        return out_cross, out_doc

    monkeypatch.setattr(gen_mod, "drop_empty_docs", spy)
    together = decode(model, encode(model, docs), rows, num_beams=num_beams)
    assert any(after < before for before, after in seen), seen  # documents were dropped
    monkeypatch.setattr(gen_mod, "drop_empty_docs", real)

    for d in range(len(docs)):
        mine = [i for i, r in enumerate(rows) if r.doc == d]
        alone = decode(
            model,
            encode(model, [docs[d]]),
            [Row(0, rows[i].prefix, rows[i].max_new_tokens) for i in mine],
            num_beams=num_beams,
        )
        assert [together.tokens[i] for i in mine] == alone.tokens, d
        if num_beams > 1:
            assert [together.scores[i] for i in mine] == pytest.approx(alone.scores, abs=1e-9)
    # the long rows did outlive the dropping
    assert max(len(t) for t in together.tokens) > 3


def test_one_long_document_among_finished_ones_matches_transformers(mt5):
    """After dropping, the remaining rows must still read their own document's cache."""
    model = mt5.pid64()
    docs = random_docs(mt5.vocab, seed=112, lengths=[12, 30, 7, 40, 19])
    rows = [
        Row(0, [0], 1),
        Row(1, [0, 4], 1),
        Row(2, [0], 1),
        Row(3, [0, 7, 8], 12),
        Row(4, [0, 2], 1),
        Row(3, [0], 12),
    ]
    got = decode(model, encode(model, docs), rows, eos_token_id=None)
    ref = hf_reference(mt5, docs, rows, eos_token_id=None)
    assert got.tokens == [t for t, _, _ in ref]
    assert [len(t) for t in got.tokens] == [1, 1, 1, 12, 1, 12]


# -- bad input ----------------------------------------------------------------------------


def test_bad_input(t5):
    model = t5.pid
    cross = encode(model, random_docs(t5.vocab, seed=113))
    ok = Row(0, [0, 5], 3)
    with pytest.raises(ValueError, match=r"row 1: max_new_tokens must be >= 1, got 0"):
        decode(model, cross, [ok, Row(1, [0], 0)])
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got -2"):
        decode(model, cross, [Row(1, [0], -2)])
    with pytest.raises(ValueError, match=r"num_beams must be >= 1, got 0"):
        decode(model, cross, [ok], num_beams=0)
    with pytest.raises(ValueError, match=r"row 0: document 3 out of range \(3 encoded\)"):
        decode(model, cross, [Row(3, [0], 2), ok])
    with pytest.raises(ValueError, match=r"document -1 out of range"):
        decode(model, cross, [ok, Row(-1, [0], 2)])
    with pytest.raises(ValueError, match=r"row 1: empty prefix"):
        decode(model, cross, [ok, Row(0, [], 2)])
    with pytest.raises(ValueError, match="no documents"):
        encode(model, [])
    with pytest.raises(ValueError, match="empty document"):
        encode(model, [[]])


def test_no_rows_is_no_work(t5):
    cross = encode(t5.pid, [[5, 6, 7]])
    assert decode(t5.pid, cross, []).tokens == []
    beams = decode(t5.pid, cross, [], num_beams=3)
    assert beams.tokens == [] and beams.scores == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_unwritten_cache_slots_never_reach_outputs(variant, monkeypatch, num_beams):
    """Short prompts leave cache slots before them unwritten; masked attention gives them weight
    0, which would still turn NaN garbage into NaN. Poison every fresh cache with NaN."""
    model = variant.pid64()
    docs = random_docs(variant.vocab, seed=108)
    rows = random_rows(variant.vocab, seed=208)
    assert len({len(r.prefix) for r in rows}) > 1  # ragged prompts, so some slots stay unwritten
    cross = encode(model, docs)
    clean = decode(model, cross, rows, num_beams=num_beams)
    fresh = KVCache.__init__

    def poisoned(self, *args, **kwargs):
        fresh(self, *args, **kwargs)
        for t in self.k + self.v:
            t.fill_(float("nan"))

    monkeypatch.setattr(KVCache, "__init__", poisoned)
    for compaction in (True, False):
        assert decode(model, cross, rows, num_beams=num_beams, compaction=compaction).tokens == clean.tokens


def test_prefill_packs_long_documents_into_several_segments(variant, monkeypatch):
    """More prompt tokens than one packed segment holds: outputs do not depend on the packing."""
    model = variant.pid64()
    docs = random_docs(variant.vocab, seed=109)
    rows = random_rows(variant.vocab, seed=209)
    cross = encode(model, docs)
    one_segment_each = decode(model, cross, rows)
    monkeypatch.setattr(rows_mod, "PACK_TOKENS", 3)  # a segment per row (or two rows when short)
    assert decode(model, cross, rows).tokens == one_segment_each.tokens


def test_pack_prompts_keeps_rows_and_documents_apart(monkeypatch):
    """The one packed prefill both engines use: a segment holds one document's rows up to
    PACK_TOKENS tokens, a token sees only the earlier tokens of its own row, and each token goes
    to its row's cache slot so that every prompt ends at P."""
    monkeypatch.setattr(rows_mod, "PACK_TOKENS", 5)
    prompts = [[7, 8], [9], [4, 5, 6], [3, 2, 1, 0, 9, 8], [6]]
    docs = [0, 0, 0, 1, 1]
    P = 6
    cache = KVCache(1, len(prompts), 1, P + 1, 2, torch.float32, "cpu")
    packed = pack_prompts(prompts, docs, cache, P, pad=-1, device="cpu")
    # doc 0: rows 0, 1 fit together (3 tokens), row 2 would make 6 > 5; doc 1's long row stands alone
    assert packed.seg_doc.tolist() == [0, 0, 1, 1]
    assert packed.tokens.tolist() == [
        [7, 8, 9, -1, -1, -1],
        [4, 5, 6, -1, -1, -1],
        [3, 2, 1, 0, 9, 8],
        [6, -1, -1, -1, -1, -1],
    ]
    assert packed.inrow[0].tolist() == [0, 1, 0, 0, 0, 0]
    assert packed.keep[0, :3, :3].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert packed.ends.tolist() == [[0, 1], [0, 2], [1, 2], [2, 5], [3, 0]]
    w = packed.writer
    assert w.row.tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 4]
    assert w.pos.tolist() == [4, 5, 5, 3, 4, 5, 0, 1, 2, 3, 4, 5, 5]  # every prompt ends at slot P - 1
    hidden = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6, 1)
    assert packed.last(hidden)[:, 0].tolist() == [1.0, 2.0, 8.0, 17.0, 18.0]
