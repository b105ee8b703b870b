import pytest

from pidec import checkpoint
from pidec.errors import InputError
from pidec.layouts import build, collect, fit, format_seq, parse_seq

from .shared_data import T5_TOKENIZER, require


@pytest.fixture(scope="module")
def tok():
    return checkpoint.load_tokenizer(require(T5_TOKENIZER))


DOC = "User: I want a cheap hotel in the north. System: The Acorn has rooms."
PROMPTS = ["hotel price range", "hotel area"]


def test_pid_rows_start_with_decoder_start_then_prompt(tok):
    plan = build(tok, [(DOC, PROMPTS)], "pid", 7, 512, 0)
    assert plan.docs == [tok(DOC)["input_ids"]]  # document + EOS, encoded once
    assert [r.prefix for r in plan.rows] == [[0] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert all(r.doc == 0 and r.max_new_tokens == 7 for r in plan.rows)
    assert plan.owner == [(0, 0), (0, 1)]


def test_pie_rows_put_prompt_before_document(tok):
    plan = build(tok, [(DOC, PROMPTS), ("second doc", ["x"])], "pie", 5, 512, 0)
    assert plan.docs[:2] == [tok(f"{p} {DOC}")["input_ids"] for p in PROMPTS]
    assert [r.prefix for r in plan.rows] == [[0], [0], [0]]
    assert [r.doc for r in plan.rows] == [0, 1, 2]
    assert plan.owner == [(0, 0), (0, 1), (1, 0)]


def test_seq_one_row_with_instruction_and_budget(tok):
    plan = build(tok, [(DOC, PROMPTS)], "seq", 4, 512, 0, seq_instruction="fill the slots:")
    assert plan.docs == [tok(f"fill the slots: {DOC}")["input_ids"]]
    assert len(plan.rows) == 1 and plan.rows[0].prefix == [0]
    prompt_lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert plan.rows[0].max_new_tokens == sum(n + 4 + 2 for n in prompt_lens)


def test_parse_seq_round_trip_and_malformed():
    prompts = ["hotel area", "hotel price range", "train day"]
    text = format_seq(prompts, ["north; near centre", "cheap", "none"])
    assert text == "hotel area: north; near centre; hotel price range: cheap; train day: none"
    assert parse_seq(text, prompts) == ["north; near centre", "cheap", "none"]
    # reordered, missing and garbage
    assert parse_seq("train day: monday; hotel area: east", prompts) == ["east", "", "monday"]
    assert parse_seq("garbage with no markers", prompts) == ["", "", ""]
    assert parse_seq("", prompts) == ["", "", ""]
    # a prompt that is a suffix of another only matches at a boundary
    assert parse_seq("restaurant area: west; area: east", ["area", "restaurant area"]) == ["east", "west"]
    # repeated marker: first wins
    assert parse_seq("hotel area: a; hotel area: b", ["hotel area"]) == ["a"]


def test_document_too_long_errors_or_truncates_and_reports(tok):
    long_doc = " ".join(["word"] * 100)
    with pytest.raises(InputError, match=r"101 tokens, longer than the model's limit of 20"):
        build(tok, [(long_doc, PROMPTS)], "pid", 4, 20, 0)
    plan = build(tok, [(long_doc, PROMPTS)], "pid", 4, 20, 0, truncate="left")
    assert len(plan.docs[0]) == 20 and plan.docs[0][-1] == tok.eos_token_id
    assert plan.truncations[0].original_tokens == 101 and plan.truncations[0].kept_tokens == 20
    # pie: the document is cut, never the prompt
    plan = build(tok, [(long_doc, PROMPTS)], "pie", 4, 20, 0, truncate="right")
    p0 = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert plan.docs[0][: len(p0)] == p0 and len(plan.docs[0]) == 20
    assert len(plan.truncations) == 2 and plan.truncations[1].subtask == 1
    with pytest.raises(InputError, match="prompt 0 \\+ document"):
        build(tok, [(long_doc, PROMPTS)], "pie", 4, 20, 0)


def test_fit_sides():
    assert fit([1, 2, 3, 4], 3, "right", "x", [9]) == ([1, 2, 9], True)
    assert fit([1, 2, 3, 4], 3, "left", "x", [9]) == ([3, 4, 9], True)
    assert fit([1, 2], 3, None, "x", [9]) == ([1, 2, 9], False)
    with pytest.raises(InputError, match="truncate="):
        fit([1, 2, 3, 4], 3, "middle", "x", [9])


@pytest.mark.parametrize(
    "examples, layout, max_new, match",
    [
        ([(DOC, [])], "pid", 4, "empty prompt list"),
        ([(DOC, ["ok", "  "])], "pid", 4, "prompt 1 is empty or whitespace"),
        ([(DOC, "one string")], "pid", 4, "list of strings"),
        ([(DOC, [3])], "pid", 4, "prompt 0 is int"),
        ([("   ", ["a"])], "pid", 4, "document is empty"),
        ([(DOC, ["a"])], "pad", 4, "unknown layout 'pad'"),
        ([(DOC, ["a"])], "pid", 0, "max_new_tokens must be an integer >= 1"),
        ([], "pid", 4, "no examples"),
    ],
)
def test_bad_input(tok, examples, layout, max_new, match):
    with pytest.raises(InputError, match=match):
        build(tok, examples, layout, max_new, 512, 0)


def test_collect_maps_rows_back_in_prompt_order(tok):
    plan = build(tok, [(DOC, PROMPTS), (DOC, ["x"])], "pid", 4, 512, 0)
    tokens = [tok(t, add_special_tokens=False)["input_ids"] for t in ["cheap", "north", "y"]]
    assert collect(plan, tokens, tok) == [["cheap", "north"], ["y"]]
    seq = build(tok, [(DOC, PROMPTS)], "seq", 4, 512, 0)
    text = format_seq(PROMPTS, ["cheap", "north"])
    assert collect(seq, [tok(text, add_special_tokens=False)["input_ids"]], tok) == [["cheap", "north"]]
