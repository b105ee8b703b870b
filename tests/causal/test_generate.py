"""Shared-prefix decoding of decoder-only models: greedy tokens identical, row for row, to
transformers' `generate(input_ids=row)` run on each row alone, in one ragged batch of several
documents (different K, per-row budgets, the generation config's list of EOS ids), with plain
and chat templates, GQA and non-GQA shapes; pie through the same engine; encode reuse; sampling."""

from __future__ import annotations

import pytest
import torch

import pidec
from pidec.causal.api import CausalModel
from pidec.causal.generate import SuffixRow, common_prefix, decode
from pidec.causal.layouts import Template
from tests.causal_tiny import FAMILIES, family_for_tests, hf_greedy

torch.set_num_threads(1)

DOCS = [
    "User: I need a cheap hotel in the north for 3 nights. System: The Acorn has rooms.",
    "The Golden Curry serves Indian food in the centre; a table for 4 on Friday?",
    "Answer the questions about this.",
]
PROMPTS = [
    ["hotel price range", "hotel area", "hotel book stay"],
    ["restaurant food"],
    ["which day?", "how many people?", "what price range?", "which area?"],
]
BUDGETS = [[6, 3, 9], [12], [1, 7, 5, 10]]
TEMPLATES = {
    "plain": Template(prefix_template="Document: {document}\n", row_template="Question: {prompt}\nAnswer:"),
    "chat": Template(chat=True, chat_user_template="{document}\n\nQuestion: {prompt}"),
}


@pytest.fixture(params=FAMILIES)
def loaded(request, tmp_path_factory):
    folder, hf = family_for_tests(request.param, tmp_path_factory)
    return request.param, pidec.load(folder), hf


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_greedy_pid_equals_transformers_per_row(loaded, template):
    name, model, hf = loaded
    assert isinstance(model, CausalModel)
    tpl = TEMPLATES[template]
    examples = list(zip(DOCS, PROMPTS))
    result = model.generate_batch(examples, max_new_tokens=BUDGETS, template=tpl, return_details=True)
    pie = model.generate_batch(examples, max_new_tokens=BUDGETS, template=tpl, layout="pie")
    assert pie == result.outputs
    tok = model.tokenizer
    for i, (doc, prompts) in enumerate(examples):
        rows = [tpl.ids(tok, doc, p) for p in prompts]
        for j, row in enumerate(rows):
            expected = hf_greedy(hf, row, BUDGETS[i][j], model.eos_token_ids)
            assert result.outputs[i][j] == tok.decode(expected, skip_special_tokens=True).strip(), (name, i, j)
    assert result.usage["document_tokens"] == sum(common_prefix([tpl.ids(tok, d, p) for p in ps]) for d, ps in examples)


def test_engine_tokens_equal_transformers_with_eos_list(tmp_path_factory):
    """Token level, on the engine: ids (not text) equal transformers', the EOS list respected."""
    folder, hf = family_for_tests("qwen2", tmp_path_factory)
    model = pidec.load(folder)
    eos = model.eos_token_ids
    assert len(eos) == 2
    gen = torch.Generator().manual_seed(5)
    docs = [[1] + torch.randint(6, 300, (n,), generator=gen).tolist() for n in (40, 9, 25)]
    sets = [
        [d + torch.randint(6, 300, (k,), generator=gen).tolist() for k in ks]
        for d, ks in zip(docs, ([2, 5], [1], [4, 1, 3]))
    ]
    prefixes = [s[0][: common_prefix(s)] for s in sets]
    rows, full = [], []
    for d, s in enumerate(sets):
        for r in s:
            budget = 3 + len(r) % 9
            rows.append(SuffixRow(d, r[len(prefixes[d]) :], budget))
            full.append((r, budget))
    out = decode(model.model, model.model.prefill_prefix(prefixes), rows, eos)
    ended = 0
    for (r, budget), got in zip(full, out.tokens):
        want = hf_greedy(hf, r, budget, eos)
        assert got == want
        ended += len(got) < budget
    assert ended > 0
    assert out.stats.steps > 0 and out.stats.row_steps < out.stats.steps * len(rows)  # rows left the batch


def test_encode_is_reused_and_equals_generate(tmp_path_factory):
    folder, _ = family_for_tests("llama", tmp_path_factory)
    model = pidec.load(folder)
    for tpl in TEMPLATES.values():
        model.template = tpl
        enc = model.encode(DOCS[0])
        a = model.generate(enc, PROMPTS[0], max_new_tokens=BUDGETS[0], return_details=True)
        b = model.generate(enc, ["restaurant area", "taxi leave at"], max_new_tokens=5)
        assert a.outputs == model.generate(DOCS[0], PROMPTS[0], max_new_tokens=BUDGETS[0])
        assert b == model.generate(DOCS[0], ["restaurant area", "taxi leave at"], max_new_tokens=5)
        assert a.usage["document_tokens"] <= len(enc.tokens)


def test_sampling_is_seeded(tmp_path_factory):
    folder, _ = family_for_tests("smollm", tmp_path_factory)
    model = pidec.load(folder)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = model.generate(DOCS[0], PROMPTS[0], seed=3, **kw)
    assert a == model.generate(DOCS[0], PROMPTS[0], seed=3, **kw)
    draws = {tuple(model.generate(DOCS[0], PROMPTS[0], seed=s, **kw)) for s in range(6)}
    assert len(draws) > 1
