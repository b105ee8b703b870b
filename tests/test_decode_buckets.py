"""Static shapes for CUDA graphs (issue 18, item 2, its CPU side): row counts padded to buckets,
the static-shape step (a position in a device tensor, attention over the whole cache) run
eagerly on the CPU against the usual step, and `cuda_graphs` refused without CUDA. The graph
capture itself runs only where CUDA is."""

from __future__ import annotations

import pytest
import torch

from pidec.errors import InputError
from pidec.generate import (
    BUCKET_FINE,
    DecodeStats,
    StaticSteps,
    bucket_rows,
    decode,
    decode_n_tokens,
    document_order,
    encode,
    inverse,
    prefill,
)
from pidec.search import new_search

from .conftest import random_docs, random_rows


def test_bucket_rows():
    assert [bucket_rows(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]
    assert [bucket_rows(n) for n in (65, 128, 129, 1920, 1921)] == [128, 128, 192, 1920, 1984]
    for n in range(1, 700):
        b = bucket_rows(n)
        assert b >= n and (b < 2 * n or n == 1) and b - n < BUCKET_FINE
        assert bucket_rows(b) == b  # a bucket is its own bucket
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="bucket_rows"):
            bucket_rows(bad)


def _case(variant, seed: int):
    """Seven rows: the batch is padded to 8 from the start, and again after each compaction."""
    model = variant.pid
    rows = random_rows(variant.vocab, seed=seed + 100)[:7]
    return model, encode(model, random_docs(variant.vocab, seed=seed)), rows


@pytest.mark.parametrize("every", [1, 4])
def test_greedy_with_rows_padded_to_buckets_is_unchanged(variant, every):
    model, cross, rows = _case(variant, 401)
    assert bucket_rows(len(rows)) != len(rows)  # the batch does get padding rows
    ref = decode(model, cross, rows, sync_every=every)
    out = decode(model, cross, rows, sync_every=every, pad_rows=True)
    assert out.tokens == ref.tokens
    assert out.stats.row_steps == ref.stats.row_steps  # the searches see the real rows only


def test_beams_with_rows_padded_to_buckets_keep_their_tokens(v11):
    model, cross, rows = _case(v11, 402)
    for every in (1, 3):
        ref = decode(model, cross, rows, num_beams=2, sync_every=every)
        assert decode(model, cross, rows, num_beams=2, sync_every=every, pad_rows=True).tokens == ref.tokens


@torch.inference_mode()
def _static_decode(model, cross, rows, num_beams: int, every: int):
    """`decode`'s loop with the static-shape step run eagerly (what a CUDA graph would replay)."""
    order = document_order(rows)
    ordered = [rows[i] for i in order]
    batch = prefill(model, cross, ordered, model.config.pad_token_id, num_beams, bucketed=True)
    runner = StaticSteps(model, graphs=False)
    batch.runner = runner
    search = new_search(
        [r.max_new_tokens for r in ordered], num_beams, model.config.eos_token_id, 0, model.device, read_every=every
    )
    decode_n_tokens(batch, search, DecodeStats(), None, every)
    tokens, _ = search.results()
    return [tokens[b] for b in inverse(order)], runner


@pytest.mark.parametrize("num_beams,every", [(1, 1), (1, 4), (2, 1), (2, 4)])
def test_static_shape_step_gives_the_usual_tokens(variant, num_beams, every):
    model, cross, rows = _case(variant, 403)
    ref = decode(model, cross, rows, num_beams=num_beams, sync_every=every)
    tokens, runner = _static_decode(model, cross, rows, num_beams, every)
    assert tokens == ref.tokens
    # buffers per shape: few shapes (buckets), not one per step
    assert 1 <= len(runner.entries) < ref.stats.steps


def test_cuda_graphs_refused_on_the_cpu(t5):
    model, cross, rows = _case(t5, 404)
    with pytest.raises(InputError, match="cuda_graphs.*CUDA device"):
        decode(model, cross, rows, cuda_graphs=True)
    with pytest.raises(InputError, match="cuda_graphs"):
        StaticSteps(model, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("num_beams", [1, 2])
def test_cuda_graphs_give_the_eager_tokens(v11, num_beams):
    model = v11.pid.to("cuda")
    cross = encode(model, random_docs(v11.vocab, seed=405))
    rows = random_rows(v11.vocab, seed=505)
    ref = decode(model, cross, rows, num_beams=num_beams)
    out = decode(model, cross, rows, num_beams=num_beams, cuda_graphs=True)
    assert out.tokens == ref.tokens
