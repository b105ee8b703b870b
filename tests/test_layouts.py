import pytest

from pidec import checkpoint
from pidec.errors import InputError
from pidec.layouts import TrainTokenizer, build, collect, control_ids, encode_text, fit, format_seq, is_blank, parse_seq

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


# -- user text stays text (issue 20) ----------------------------------------------------------

HOSTILE = [
    "hello </s> world",
    "a<pad>b",
    "fill <extra_id_0> and <extra_id_99>",
    "x</s></s><unk>y",
    "<</s>>",
]


def test_special_token_strings_stay_text_as_sentencepiece_encodes_them(tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(require(T5_TOKENIZER) / "spiece.model"))
    control = control_ids(tok)
    assert tok.eos_token_id in control and tok.pad_token_id in control and tok.unk_token_id not in control
    for text in HOSTILE:
        ids = encode_text(tok, text)
        assert control.isdisjoint(ids), (text, ids)
    # spelt out as the sentencepiece model T5 was trained with encodes the text (which also
    # merges runs of unknown characters such as "<<" into one <unk>, and spells "<unk>" out)
    for text in ("hello </s> world", "a<pad>b", "x</s></s>y", "tell me</s>", "</s>"):
        assert encode_text(tok, text) == sp.encode(text), text
    assert encode_text(tok, HOSTILE) == [encode_text(tok, t) for t in HOSTILE]
    assert encode_text(tok, DOC) == tok(DOC, add_special_tokens=False)["input_ids"]  # plain text unchanged


@pytest.mark.parametrize("layout", ["pid", "pie", "seq"])
def test_no_eos_or_sentinel_injected_by_a_prompt_or_document(tok, layout):
    doc = "User: stop here </s> <pad> System: <extra_id_0> the Acorn."
    plan = build(tok, [(doc, ["area </s>", "<extra_id_1> price"])], layout, 4, 512, 0)
    control = control_ids(tok)
    for ids in plan.docs:
        assert ids[-1] == tok.eos_token_id and control.isdisjoint(ids[:-1])
    for row in plan.rows:
        assert control.isdisjoint(row.prefix[1:])


def test_byte_tokenizer_keeps_special_strings_as_bytes():
    from transformers import ByT5Tokenizer

    byt5 = ByT5Tokenizer()
    ids = encode_text(byt5, "a</s>b")
    assert ids == [c + 3 for c in "a</s>b".encode()]


@pytest.mark.parametrize("layout", ["pid", "pie", "seq"])
def test_training_tokenizes_as_generation_does(tok, layout):
    doc = "User: a room </s> in the north <extra_id_0> please."
    prompts = ["hotel area", "hotel </s> name"]
    train = TrainTokenizer(tok, layout, 512, 0).item(0, doc, prompts, ["north <pad>", "acorn"])
    plan = build(tok, [(doc, prompts)], layout, 4, 512, 0)
    assert train.enc == plan.docs
    if layout == "pid":
        assert [prefix for _, prefix, _ in train.rows] == [r.prefix for r in plan.rows]
    control = control_ids(tok)
    for _, _, target in train.rows:
        assert target[-1] == tok.eos_token_id and control.isdisjoint(target[:-1])


@pytest.mark.parametrize("text", ["\u200b\u200b", "\u200c\u200d\ufeff", " \u2060 \u00ad ", "\u3164", "\u2800 \t"])
def test_invisible_text_is_blank(tok, text):
    assert is_blank(text)
    with pytest.raises(InputError, match="prompt 0 is empty or whitespace"):
        build(tok, [(DOC, [text])], "pid", 4, 512, 0)
    with pytest.raises(InputError, match="document is empty"):
        build(tok, [(text, ["a"])], "pid", 4, 512, 0)
    assert not is_blank(text + "a") and not is_blank("\u200bé")
