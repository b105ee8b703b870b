"""pidec.session (continuous batching) against pidec.generate.decode, document by document.

Like test_generate, the models run in float64 so that no near-tie between two logits can flip a
greedy choice: a difference is a real difference."""

from __future__ import annotations

import pytest
import torch

from pidec.generate import Row, decode, encode
from pidec.session import DecodeSession, concat_cross

from .conftest import random_tokens

# per document: its length and its rows as (prompt length, max_new_tokens); prompts of 0-7 tokens
DOCS = [
    (40, [(0, 12), (3, 1), (5, 9)]),
    (17, [(2, 12)]),
    (6, [(1, 7), (4, 12), (0, 3), (5, 10)]),
    (25, [(7, 6), (2, 11)]),
    (9, [(3, 8), (6, 4)]),
    (12, [(14, 5), (1, 9)]),
]


def _case(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [random_tokens(g, n, vocab) for n, _ in DOCS]
    rows = [[Row(0, [0] + random_tokens(g, p, vocab), m) for p, m in spec] for _, spec in DOCS]
    return docs, rows


def _alone(model, docs, rows, eos=-1) -> list[list[list[int]]]:
    """Each document decoded by itself with the offline engine: the reference."""
    return [decode(model, encode(model, [d]), r, eos_token_id=eos).tokens for d, r in zip(docs, rows)]


def _run(session: DecodeSession, model, docs, rows, joins: dict[int, list[int]]) -> list[list[list[int]]]:
    """Admit documents at the steps given by `joins` ({step: [doc, ...]}) and step to the end."""
    ids: dict[int, tuple[int, int]] = {}
    got = [[None] * len(r) for r in rows]
    step = 0
    while step <= max(joins) or session.rows:
        if step in joins:
            new = joins[step]
            cross = concat_cross([encode(model, [docs[d]]) for d in new])
            batch = [Row(k, r.prefix, r.max_new_tokens) for k, d in enumerate(new) for r in rows[d]]
            owners = [(d, j) for d in new for j in range(len(rows[d]))]
            for rid, owner in zip(session.admit(cross, batch), owners):
                ids[rid] = owner
        for rid, tokens in session.step():
            d, j = ids.pop(rid)
            got[d][j] = tokens
        step += 1
    assert not ids
    return got


def test_documents_joining_between_steps_decode_as_alone(variant):
    model = variant.pid64()
    docs, rows = _case(variant.vocab)
    want = _alone(model, docs, rows)
    # doc 5 joins a running batch with a prompt longer than the batch's position (the running rows
    # shift right), others with shorter prompts (they are placed to end at the running position);
    # doc 3 joins an empty session; some join together
    schedules = (
        {0: [0, 1, 2, 3, 4, 5]},
        {0: [1], 1: [5], 2: [0, 2], 3: [4], 30: [3]},
        {0: [2], 1: [0], 5: [3, 1, 4, 5]},
    )
    for joins in schedules:
        session = DecodeSession(model)
        assert _run(session, model, docs, rows, joins) == want, joins
        assert session.rows == 0 and session.docs == 0


def test_rows_run_to_their_budget_without_eos(v11):
    model = v11.pid64()
    docs, rows = _case(v11.vocab, seed=3)
    want = _alone(model, docs, rows, eos=None)
    got = _run(DecodeSession(model, eos_token_id=None), model, docs, rows, {0: [0, 1], 4: [2, 3, 4], 6: [5]})
    assert got == want
    assert [[len(t) for t in d] for d in got] == [[r.max_new_tokens for r in d] for d in rows]


def test_dropped_rows_leave_the_others_unchanged(t5):
    model = t5.pid64()
    docs, rows = _case(t5.vocab, seed=5)
    want = _alone(model, docs, rows, eos=None)
    session = DecodeSession(model, eos_token_id=None)
    cross = concat_cross([encode(model, [d]) for d in docs])
    batch = [Row(d, r.prefix, r.max_new_tokens) for d in range(len(docs)) for r in rows[d]]
    owners = [(d, j) for d in range(len(docs)) for j in range(len(rows[d]))]
    ids = dict(zip(session.admit(cross, batch), owners))
    session.step()
    session.drop([rid for rid, (d, _) in ids.items() if d in (0, 2)])  # two requests went away
    session.drop([10**6])  # unknown ids are ignored
    got = {}
    while session.rows:
        for rid, tokens in session.step():
            got[ids[rid]] = tokens
    assert {d for d, _ in got} == {1, 3, 4, 5}
    for (d, j), tokens in got.items():
        assert tokens == want[d][j]
    session.drop(list(ids))  # nothing left: still fine
    assert session.rows == 0


def test_concat_cross_pads_and_masks(v11):
    model = v11.pid
    a, b = encode(model, [[5, 6, 7, 8]]), encode(model, [[9, 10]])
    assert concat_cross([a]) is a
    both = concat_cross([a, b])
    assert both.docs == 2 and both.k[0].shape[2] == 4 and both.lengths.tolist() == [4, 2]
    assert both.mask is not None and bool((both.mask[1, ..., 2:] < -1e30).all()) and bool((both.mask[0] == 0).all())
    assert torch.equal(both.k[1][1, :, :2], b.k[1][0]) and bool((both.v[1][1, :, 2:] == 0).all())
    assert concat_cross([a, a]).mask is None
    with pytest.raises(ValueError, match="no cross-attention caches"):
        concat_cross([])


def test_bad_rows_are_refused(t5):
    model = t5.pid
    cross = encode(model, [[5, 6, 7]])
    session = DecodeSession(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.admit(cross, [Row(0, [0], 0)])
    with pytest.raises(ValueError, match="empty prefix"):
        session.admit(cross, [Row(0, [], 3)])
    with pytest.raises(ValueError, match="document 1 out of range"):
        session.admit(cross, [Row(1, [0], 3)])
    assert session.admit(cross, []) == [] and session.step() == []


def test_a_failed_admission_leaves_the_running_rows_whole(v11):
    model = v11.pid64()
    docs, rows = _case(v11.vocab, seed=9)
    want = _alone(model, docs, rows)
    session = DecodeSession(model)
    ids = {rid: j for j, rid in enumerate(session.admit(encode(model, [docs[0]]), rows[0]))}
    got = {}
    for rid, tokens in session.step():
        got[ids[rid]] = tokens
    inner = model.decode

    def broken_prefill(tokens, *args):
        if tokens.shape[1] > 1:
            raise RuntimeError("injected")
        return inner(tokens, *args)

    model.decode = broken_prefill
    try:
        with pytest.raises(RuntimeError, match="injected"):
            session.admit(encode(model, [docs[1]]), rows[1])
    finally:
        del model.decode
    while session.rows:
        for rid, tokens in session.step():
            got[ids[rid]] = tokens
    assert [got[j] for j in range(len(rows[0]))] == want[0]


def test_a_session_kept_busy_keeps_its_cache_bounded_by_its_live_rows(v11):
    """Rows join every few steps and the session never empties: the cache position would grow
    without end if the slots before the oldest live row were kept. The cache length stays within
    twice the longest span (prompt + budget) of the rows it holds, and every answer is decode's."""
    model = v11.pid64()
    g = torch.Generator().manual_seed(17)
    docs = [random_tokens(g, 5 + i % 9, v11.vocab) for i in range(30)]
    rows = [
        [Row(0, [0] + random_tokens(g, (i + k) % 5, v11.vocab), 4 + (i * 3 + k) % 9) for k in range(2)]
        for i in range(30)
    ]
    want = _alone(model, docs, rows, eos=None)
    session = DecodeSession(model, eos_token_id=None)
    span = {}  # live row id -> its prompt + budget
    ids, got = {}, {}
    for step in range(200):
        if step % 3 == 0 and step // 3 < len(docs):
            d = step // 3
            for rid, (j, r) in zip(session.admit(encode(model, [docs[d]]), rows[d]), enumerate(rows[d])):
                ids[rid] = (d, j)
                span[rid] = len(r.prefix) + r.max_new_tokens
            assert session.capacity <= 2 * max(span.values()), (step, session.capacity, span)
        assert session.rows == 0 or session.capacity <= 2 * max(
            len(r.prefix) + r.max_new_tokens for d in rows for r in d
        )
        for rid, tokens in session.step():
            got[ids[rid]] = tokens
            del span[rid]
        if step > 3 * len(docs) and not session.rows:
            break
    assert step > 3 * len(docs) - 1  # the session ran that long without emptying ...
    assert len(got) == sum(len(r) for r in rows)
    assert [[got[(d, j)] for j in range(len(rows[d]))] for d in range(len(docs))] == want


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_rows_join_beside_greedy_ones_and_decode_as_alone(v11, num_beams):
    model = v11.pid64()
    docs, rows = _case(v11.vocab, seed=11)
    greedy = _alone(model, docs, rows)
    beams = [decode(model, encode(model, [d]), r, num_beams=num_beams) for d, r in zip(docs, rows)]
    session = DecodeSession(model)
    ids, got = {}, {}
    plan = {0: [(0, 1), (1, num_beams)], 2: [(2, num_beams)], 3: [(3, 1), (4, num_beams)], 7: [(5, num_beams)]}
    step = 0
    while step <= max(plan) or session.rows:
        for d, nb in plan.get(step, []):
            for rid, j in zip(session.admit(encode(model, [docs[d]]), rows[d], num_beams=nb), range(len(rows[d]))):
                ids[rid] = (d, j, nb)
        for rid, tokens in session.step():
            got[ids.pop(rid)] = tokens
        step += 1
    for (d, j, nb), tokens in got.items():
        assert tokens == (greedy[d][j] if nb == 1 else beams[d].tokens[j]), (d, j, nb)
    assert len(got) == sum(len(r) for r in rows)
    assert any(beams[d].tokens[j] != greedy[d][j] for d in range(len(docs)) for j in range(len(rows[d])))


def test_dropping_a_beam_request_leaves_the_others_unchanged(t5):
    model = t5.pid64()
    docs, rows = _case(t5.vocab, seed=13)
    want = [decode(model, encode(model, [d]), r, num_beams=2, eos_token_id=None).tokens for d, r in zip(docs, rows)]
    session = DecodeSession(model, eos_token_id=None)
    first = session.admit(encode(model, [docs[0]]), rows[0], num_beams=2)
    second = session.admit(encode(model, [docs[2]]), rows[2], num_beams=2)
    session.step()
    session.drop(first[1:])  # two of the first request's rows (four beams) go away
    got = {}
    while session.rows:
        for rid, tokens in session.step():
            got[rid] = tokens
    assert set(got) == {first[0], *second}
    assert got[first[0]] == want[0][0] and [got[r] for r in second] == want[2]
