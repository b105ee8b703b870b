"""`compile_steps`: decoding steps through torch.compile give the eager steps' greedy tokens.

One tiny model (T5 v1.1 shape) is compiled once for the module (inductor on the CPU, a few
graphs: rows that leave change the row count, several documents fold irregularly); the model
is a copy, so the other tests' shared models stay eager. float64, as in test_generate, so that
no near-tie can flip a greedy choice: a difference here is a real difference."""

from __future__ import annotations

import copy

import pytest
import torch

from pidec.generate import compile_steps, decode, encode, is_compiled
from pidec.session import DecodeSession

from .conftest import random_docs, random_rows


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from .conftest import get_variant

    v = get_variant("v11", tmp_path_factory)
    eager = v.pid64()
    compiled = compile_steps(copy.deepcopy(eager))
    return v, eager, compiled


@pytest.mark.slow
def test_compiled_steps_give_the_same_greedy_tokens(pair):
    v, eager, compiled = pair
    assert is_compiled(compiled) and not is_compiled(eager)
    docs = random_docs(v.vocab, seed=130)
    rows = random_rows(v.vocab, seed=230)  # 3 documents, ragged prompts, budgets 1-12: rows leave at different steps
    cross = encode(eager, docs)
    want = decode(eager, cross, rows)
    got = decode(compiled, cross, rows)
    assert got.tokens == want.tokens
    assert got.stats.steps == want.stats.steps and got.stats.row_steps == want.stats.row_steps
    assert len({tuple(t) for t in got.tokens}) > 3  # the rows really differ
    # rows that run to their budget (no EOS): the same graphs, other steps
    full = decode(compiled, cross, rows, eos_token_id=None)
    assert full.tokens == decode(eager, cross, rows, eos_token_id=None).tokens


@pytest.mark.slow
def test_compiled_session_steps_give_the_same_tokens(pair):
    v, eager, compiled = pair
    docs = random_docs(v.vocab, seed=132)
    rows = random_rows(v.vocab, seed=232)
    cross = encode(eager, docs)
    want = decode(eager, cross, rows).tokens
    session = DecodeSession(compiled)
    ids = session.admit(cross, rows)
    got = {}
    while session.rows:
        got.update(dict(session.step()))
    assert [got[i] for i in ids] == want


def test_an_int8_model_is_not_compiled(pair):
    from pidec.quantize import quantize_model

    _, eager, _ = pair
    q = quantize_model(copy.deepcopy(eager).to(torch.float32), "int8")
    with pytest.raises(ValueError, match="int8"):
        compile_steps(q)
