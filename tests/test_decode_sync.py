"""Host synchronisations of the decoding loop, counted on the CPU (issue 18, item 1).

On a GPU every host read of a device tensor stalls the queue. With the GPU policy
(`sync_every` = N > 1) the search's state stays on the device and is read back every N steps, so
the reads per decoded document are bounded by steps / N plus a constant; with N = 1 (the CPU's
default) the loop reads at every step. The tokens are the same for every N.

The counts are honest: every read the engine makes goes through `pidec.hostsync`, and
`test_every_read_is_counted` patches torch's own reading methods to check that none bypasses it.
"""

from __future__ import annotations

import math

import pytest
import torch

from pidec import hostsync
from pidec.generate import CUDA_SYNC_EVERY, Row, SyncCounter, decode, default_sync_every, encode
from pidec.session import DecodeSession

from .conftest import random_docs, random_rows, random_tokens

EVERY = (1, 2, 3, 5, 8, 1000)


def _case(variant, seed: int):
    model = variant.pid  # float32: the same arithmetic must give the same tokens, not merely close ones
    docs = random_docs(variant.vocab, seed=seed)
    rows = random_rows(variant.vocab, seed=seed + 100)
    return model, encode(model, docs), rows


@pytest.mark.parametrize("compaction", [True, False])
def test_greedy_tokens_do_not_depend_on_sync_every(variant, compaction):
    model, cross, rows = _case(variant, 301)
    ref = decode(model, cross, rows, sync_every=1, compaction=compaction)
    assert any(len(t) < r.max_new_tokens for t, r in zip(ref.tokens, rows))  # some rows end on EOS
    for every in EVERY[1:]:
        out = decode(model, cross, rows, sync_every=every, compaction=compaction)
        assert out.tokens == ref.tokens, every
        # rows that ended compute on until the next read: never fewer steps, at most every-1 more
        assert ref.stats.steps <= out.stats.steps <= ref.stats.steps + every - 1
        assert out.stats.output_tokens == ref.stats.output_tokens


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_tokens_and_scores_do_not_depend_on_sync_every(variant, num_beams):
    """Tokens identical in float32. The scores are sums of log-probabilities computed in batches
    of other sizes (rows that ended stay until the next read), which float32 may round apart in
    the last bit, as it does with compaction off (test_generate): equal in float64, close in float32."""
    model, cross, rows = _case(variant, 302)
    ref = decode(model, cross, rows, num_beams=num_beams, sync_every=1)
    ref64 = decode(
        variant.pid64(),
        encode(variant.pid64(), random_docs(variant.vocab, seed=302)),
        rows,
        num_beams=num_beams,
        sync_every=1,
    )
    for every in (2, 4, 1000):
        out = decode(model, cross, rows, num_beams=num_beams, sync_every=every)
        assert out.tokens == ref.tokens, every
        assert out.scores == pytest.approx(ref.scores, rel=1e-5, abs=1e-6), every
        out64 = decode(
            variant.pid64(),
            encode(variant.pid64(), random_docs(variant.vocab, seed=302)),
            rows,
            num_beams=num_beams,
            sync_every=every,
        )
        assert out64.tokens == ref64.tokens and out64.scores == ref64.scores, every


def test_eos_none_runs_rows_to_their_budgets_with_deferred_reads(t5):
    model, cross, rows = _case(t5, 303)
    for num_beams in (1, 2):
        out = decode(model, cross, rows, num_beams=num_beams, eos_token_id=None, sync_every=4)
        assert [len(t) for t in out.tokens] == [r.max_new_tokens for r in rows]
        assert out.tokens == decode(model, cross, rows, num_beams=num_beams, eos_token_id=None, sync_every=1).tokens


def test_default_policy_by_device():
    assert default_sync_every("cpu") == 1
    assert default_sync_every(torch.device("cuda")) == CUDA_SYNC_EVERY > 1


def test_bad_sync_every(t5):
    model, cross, rows = _case(t5, 304)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="sync_every"):
            decode(model, cross, rows, sync_every=bad)


# -- counting -------------------------------------------------------------------------------


def _one_document(vocab: int, budget: int, rows: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    doc = random_tokens(g, 30, vocab)
    return [doc], [Row(0, [0] + random_tokens(g, 1 + i % 4, vocab), budget) for i in range(rows)]


def _syncs(model, docs, rows, **kw) -> tuple[int, int, SyncCounter]:
    cross = encode(model, docs)
    with SyncCounter() as count:
        out = decode(model, cross, rows, **kw)
    return count.syncs, out.stats.steps, count


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("every", [4, 8, 16])
def test_syncs_per_document_are_bounded_by_steps_over_n(v11, every, num_beams):
    """Fixed-length rows (eos None) so that the step count is known: 47 steps a document."""
    docs, rows = _one_document(v11.vocab, budget=48)
    syncs, steps, count = _syncs(v11.pid, docs, rows, num_beams=num_beams, eos_token_id=None, sync_every=every)
    assert steps == 47
    # prefill, batch set-up and results: a constant; settlements: one read every `every` steps
    assert syncs <= steps // every + 8, count
    assert count.sites["settle"] <= steps // every + 1, count


@pytest.mark.parametrize("num_beams", [1, 3])
def test_syncs_grow_with_steps_per_step_policy_not_with_deferred(v11, num_beams):
    """N = 1 reads at every step; N = 16 reads a bounded number of times whatever the length."""
    short_docs, short_rows = _one_document(v11.vocab, budget=16)
    long_docs, long_rows = _one_document(v11.vocab, budget=64)
    kw = dict(num_beams=num_beams, eos_token_id=None)
    per_step_short, steps_short, _ = _syncs(v11.pid, short_docs, short_rows, sync_every=1, **kw)
    per_step_long, steps_long, _ = _syncs(v11.pid, long_docs, long_rows, sync_every=1, **kw)
    assert per_step_short >= steps_short and per_step_long >= steps_long  # one read a step at least
    deferred_long, _, _ = _syncs(v11.pid, long_docs, long_rows, sync_every=16, **kw)
    assert deferred_long <= steps_long // 16 + 8
    assert deferred_long * 4 < per_step_long


def test_syncs_with_rows_ending_early_stay_bounded(variant):
    """Rows ending on EOS or their budgets at different steps: compaction happens only at reads,
    every 8 steps or when a quarter of the rows held has spent its budget (known on the host)."""
    model, cross, rows = _case(variant, 305)
    with SyncCounter() as count:
        out = decode(model, cross, rows, sync_every=8)
    budget_reads = math.ceil(math.log(len(rows)) / math.log(4 / 3)) + 1  # each removes >= 1/4 of the rows
    assert count.sites["settle"] <= out.stats.steps // 8 + 1 + budget_reads, count
    # each settlement that compacts costs the read and two more (documents left, the row fold)
    assert count.syncs <= 3 * count.sites["settle"] + 8, count
    with SyncCounter() as per_step:
        ref = decode(model, cross, rows, sync_every=1)
    assert per_step.syncs >= ref.stats.steps


def test_rows_with_short_budgets_leave_without_waiting_for_the_next_read(v11):
    """dst-like: most rows write 2 tokens, a few 40. The host knows when budgets run out, so a
    deferred search asks for a read then, instead of computing the short rows for 16 steps."""
    g = torch.Generator().manual_seed(7)
    docs = [random_tokens(g, 30, v11.vocab)]
    rows = [Row(0, [0] + random_tokens(g, 2, v11.vocab), 2 if i % 4 else 40) for i in range(24)]
    cross = encode(v11.pid, docs)
    per_step = decode(v11.pid, cross, rows, eos_token_id=None, sync_every=1)
    with SyncCounter() as count:
        deferred = decode(v11.pid, cross, rows, eos_token_id=None, sync_every=16)
    assert deferred.tokens == per_step.tokens
    assert deferred.stats.row_steps <= per_step.stats.row_steps + len(rows)
    assert count.sites["settle"] <= 39 // 16 + 2, count


def test_every_read_is_counted(v11, monkeypatch):
    """torch's own reading methods, patched: during a decode every call to one of them happens
    inside a `pidec.hostsync` read (which is what SyncCounter counts)."""
    model, cross, rows = _case(v11, 306)
    stray: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _name=name, _original=original, **k):
            if not hostsync.reading():
                stray.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, patched)
    for num_beams, every in ((1, 1), (1, 4), (2, 1), (2, 4)):
        decode(model, cross, rows, num_beams=num_beams, sync_every=every)
    session = DecodeSession(model, sync_every=4)
    session.admit(cross, rows[:3])
    session.step()
    session.admit(cross, rows[3:], num_beams=2)
    while session.rows:
        session.step()
    monkeypatch.undo()
    assert stray == []


# -- the session ------------------------------------------------------------------------------


def _session_tokens(model, cross, rows, every: int, num_beams: int = 1) -> tuple[dict, int, int]:
    session = DecodeSession(model, sync_every=every)
    out: dict[int, list[int]] = {}
    with SyncCounter() as count:
        ids = session.admit(cross, rows[:4], num_beams=num_beams)
        for _ in range(3):
            out.update(session.step())
        ids += session.admit(cross, rows[4:], num_beams=num_beams)
        while session.rows:
            out.update(session.step())
    return [out[i] for i in ids], count.syncs, session.steps


@pytest.mark.parametrize("num_beams", [1, 2])
def test_session_tokens_do_not_depend_on_sync_every(v11, num_beams):
    model, cross, rows = _case(v11, 307)
    ref, per_step_syncs, steps = _session_tokens(model, cross, rows, 1, num_beams)
    assert per_step_syncs >= steps
    for every in (3, 8):
        tokens, syncs, _ = _session_tokens(model, cross, rows, every, num_beams)
        assert tokens == ref, every
        assert syncs < per_step_syncs
