"""The text API end to end on a tiny random model saved with the real T5 vocabulary."""

import pytest
import torch

import pidec
from pidec import checkpoint

from .shared_data import tiny_checkpoint

DOC = "User: I need a cheap hotel in the north for three nights. System: The Acorn guest house has rooms."
PROMPTS = ["hotel price range", "hotel area", "hotel book stay", "train day"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0, max_input_length=64, eos_boost=4.0)


@pytest.fixture(scope="module")
def model(folder):
    return pidec.load(folder)


def test_generate_matches_transformers_per_subtask(model, folder):
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(folder).eval()
    tok = model.tokenizer
    got = model.generate(DOC, PROMPTS, max_new_tokens=6)
    ids = tok(DOC, return_tensors="pt").input_ids
    want = []
    for p in PROMPTS:
        dec = torch.tensor([[0] + tok(p, add_special_tokens=False).input_ids])
        out = hf.generate(input_ids=ids, decoder_input_ids=dec, max_new_tokens=6, do_sample=False)
        want.append(tok.decode(out[0, dec.shape[1] :], skip_special_tokens=True).strip())
    assert got == want
    assert len(got) == len(PROMPTS)


def test_encode_once_then_generate_reuses_it(model):
    enc = model.encode(DOC)
    assert enc.cross.k[0].shape[0] == 1  # one document's cache, whatever the number of prompts
    first = model.generate(enc, PROMPTS, max_new_tokens=6)
    assert first == model.generate(DOC, PROMPTS, max_new_tokens=6)
    assert model.generate(enc, PROMPTS[:1], max_new_tokens=6) == first[:1]
    with pytest.raises(pidec.InputError, match="pid layout only"):
        model.generate(enc, PROMPTS, layout="pie")


def test_generate_batch_equals_one_by_one(model):
    examples = [
        (DOC, PROMPTS),
        ("Another short document about trains on monday.", ["train day"]),
        (DOC + " More text.", PROMPTS[:2]),
    ]
    batch = model.generate_batch(examples, max_new_tokens=5)
    assert batch == [model.generate(d, p, max_new_tokens=5) for d, p in examples]
    beams = model.generate_batch(examples, max_new_tokens=5, num_beams=3)
    assert beams == [model.generate(d, p, max_new_tokens=5, num_beams=3) for d, p in examples]


def test_small_token_budget_chunks_documents_without_changing_outputs(model):
    examples = [(DOC, PROMPTS), ("trains on monday", ["train day"]), (DOC, PROMPTS[1:])]
    want = model.generate_batch(examples, max_new_tokens=4)
    model.max_batch_tokens = 8  # forces one document per encoder batch
    try:
        assert model.generate_batch(examples, max_new_tokens=4) == want
    finally:
        model.max_batch_tokens = 16384


def test_layouts_and_details(model):
    for layout in pidec.LAYOUTS:
        res = model.generate(DOC, PROMPTS, max_new_tokens=4, layout=layout, return_details=True)
        assert len(res.outputs) == len(PROMPTS)
        assert set(res.timings) == {"tokenize_ms", "encode_ms", "decode_ms", "total_ms"}
        assert res.usage["prompt_tokens"] > 0 and res.usage["output_tokens"] > 0
    pid = model.generate(DOC, PROMPTS, max_new_tokens=4, return_details=True)
    pie = model.generate(DOC, PROMPTS, max_new_tokens=4, layout="pie", return_details=True)
    # pid encodes the document once; pie once per prompt (plus the prompt)
    assert pie.usage["document_tokens"] > len(PROMPTS) * pid.usage["document_tokens"] - 1


def test_too_long_document_needs_truncate_and_is_reported(model):
    long_doc = " ".join(["hotel"] * 200)
    with pytest.raises(pidec.InputError, match="longer than the model's limit of 64"):
        model.generate(long_doc, PROMPTS)
    res = model.generate(long_doc, PROMPTS, truncate="left", max_new_tokens=3, return_details=True)
    assert res.truncations and res.truncations[0].kept_tokens == 64
    assert res.to_dict()["truncations"][0]["side"] == "left"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"num_beams": 0}, "num_beams must be an integer >= 1"),
        ({"layout": "both"}, "unknown layout"),
        ({"truncate": "middle"}, "truncate="),
    ],
)
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(pidec.InputError, match=match):
        model.generate(DOC, PROMPTS, **kwargs)


def test_bad_prompts(model):
    with pytest.raises(pidec.InputError, match="empty prompt list"):
        model.generate(DOC, [])
    with pytest.raises(pidec.InputError, match="prompt 1 is empty"):
        model.generate(DOC, ["a", ""])
    with pytest.raises(pidec.InputError, match="document is empty"):
        model.generate("  ", ["a"])


def test_load_errors(tmp_path, folder):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint folder"):
        pidec.load(tmp_path / "nope")
    bare = tmp_path / "bare"
    checkpoint.save(pidec.load(folder).model, bare)  # weights without tokenizer files
    with pytest.raises(checkpoint.CheckpointError, match="no tokenizer files"):
        pidec.load(bare)
    assert pidec.load(bare, tokenizer=folder).generate(DOC, PROMPTS[:1], max_new_tokens=2) is not None
    with pytest.raises(pidec.InputError, match="unknown dtype"):
        pidec.load(folder, dtype="float8")


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "again")
    again = pidec.load(tmp_path / "again")
    assert again.generate(DOC, PROMPTS, max_new_tokens=5) == model.generate(DOC, PROMPTS, max_new_tokens=5)


def test_bfloat16_runs(folder):
    m = pidec.load(folder, dtype="bfloat16")
    assert m.model.dtype == torch.bfloat16
    assert len(m.generate(DOC, PROMPTS, max_new_tokens=3)) == len(PROMPTS)


def test_one_budget_per_prompt(model):
    budgets = [1, 6, 3, 2]
    got = model.generate(DOC, PROMPTS, max_new_tokens=budgets, return_details=True)
    alone = [model.generate(DOC, [p], max_new_tokens=n)[0] for p, n in zip(PROMPTS, budgets)]
    assert got.outputs == alone
    assert got.usage["output_tokens"] <= sum(budgets)
    enc = model.encode(DOC)
    assert model.generate(enc, PROMPTS, max_new_tokens=budgets) == alone
    for layout in ("pie", "seq"):
        assert len(model.generate(DOC, PROMPTS, max_new_tokens=budgets, layout=layout)) == len(PROMPTS)
    batch = model.generate_batch([(DOC, PROMPTS), (DOC, PROMPTS[:1])], max_new_tokens=[budgets, 6])
    assert batch == [alone, model.generate(DOC, PROMPTS[:1], max_new_tokens=6)]


@pytest.mark.parametrize(
    "budgets, match",
    [
        ([1, 2], "2 max_new_tokens values for 4 prompts"),
        ([1, 0, 2, 2], r"max_new_tokens\[1\] must be an integer >= 1, got 0"),
        ([1, True, 2, 2], r"max_new_tokens\[1\] must be an integer >= 1, got True"),
        ("8", "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_budgets(model, budgets, match):
    with pytest.raises(pidec.InputError, match=match):
        model.generate(DOC, PROMPTS, max_new_tokens=budgets)
    with pytest.raises(pidec.InputError, match=match):
        model.generate(model.encode(DOC), PROMPTS, max_new_tokens=budgets)


def test_batch_budget_count_must_match_examples(model):
    with pytest.raises(pidec.InputError, match="3 max_new_tokens entries for 2 examples"):
        model.generate_batch([(DOC, PROMPTS), (DOC, PROMPTS)], max_new_tokens=[1, 2, 3])


def test_details_hold_the_same_outputs_as_the_plain_call(model):
    """generate's details hold its flat list of answers; generate_batch's its nested lists."""
    plain = model.generate(DOC, PROMPTS, max_new_tokens=4)
    details = model.generate(DOC, PROMPTS, max_new_tokens=4, return_details=True)
    assert details.outputs == plain and all(isinstance(a, str) for a in details.outputs)
    assert details.to_dict()["outputs"] == plain
    enc = model.encode(DOC)
    assert model.generate(enc, PROMPTS, max_new_tokens=4, return_details=True).outputs == plain
    examples = [(DOC, PROMPTS), ("Another short document about trains on monday.", ["train day"])]
    batch = model.generate_batch(examples, max_new_tokens=4, return_details=True)
    assert batch.outputs == model.generate_batch(examples, max_new_tokens=4) and batch.outputs[0] == plain


def test_decoding_options_are_explicit_keywords(model):
    beams = model.generate(DOC, PROMPTS, max_new_tokens=5, num_beams=2)
    assert model.generate(DOC, PROMPTS, max_new_tokens=5, num_beams=2, compaction=False) == beams
    short = model.generate(DOC, PROMPTS, max_new_tokens=5, num_beams=3, length_penalty=-2.0)
    assert len(short) == len(PROMPTS)
    enc = model.encode(DOC)
    assert model.generate(enc, PROMPTS, max_new_tokens=5, num_beams=2, compaction=False) == beams
    with pytest.raises(TypeError, match="early_stop"):
        model.generate(DOC, PROMPTS, early_stop=True)  # a misspelt option is an error, not ignored
    with pytest.raises(TypeError):
        model.generate(DOC, PROMPTS, 5, 1, "pid", None, False, True)  # the options are keyword-only
    assert not hasattr(model, "run")
