"""MultiWOZ: both formats on slices of the real files, the value normaliser, fitting long
histories, joint goal accuracy by hand, and seq outputs parsed back into slots."""

import csv
import json
import zipfile

import pytest

from pidec import checkpoint, tasks
from pidec.data import DataError, Example, Subtask
from pidec.layouts import format_seq, parse_seq
from pidec.tasks.multiwoz import PROMPTS, SLOTS, canonical, normalize_time, raw_label

from ..shared_data import MULTIWOZ, MULTIWOZ_RAW, T5_TOKENIZER, require

TASK = tasks.get("multiwoz")


@pytest.fixture(scope="module")
def tok():
    return checkpoint.load_tokenizer(require(T5_TOKENIZER))


@pytest.fixture(scope="module")
def dev_rows():
    with open(require(MULTIWOZ) / "dev.tsv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def raw_dialogues():
    with zipfile.ZipFile(require(MULTIWOZ_RAW)) as z:
        return json.loads(z.read("val.json"))


@pytest.fixture(scope="module")
def dev_examples():
    return TASK.load("dev", require(MULTIWOZ))


def tsv_slice(tmp_path, rows, n):
    path = tmp_path / "dev.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows[: n + 1]) + "\n", encoding="utf-8")
    return path


def test_prompts_are_readable_and_unique():
    assert len(SLOTS) == len(PROMPTS) == len(set(PROMPTS)) == 30
    assert PROMPTS[SLOTS.index("hotel-pricerange")] == "hotel price range"
    assert PROMPTS[SLOTS.index("taxi-leaveat")] == "taxi leave at"
    assert PROMPTS[SLOTS.index("train-arriveby")] == "train arrive by"
    assert PROMPTS[SLOTS.index("hotel-book stay")] == "hotel book stay"


@pytest.mark.parametrize(
    "slot, value, want",
    [
        ("hotel-area", "  East ", "east"),
        ("hotel-area", "", "none"),
        ("hotel-area", "not mentioned", "none"),
        ("hotel-pricerange", "Don't care", "do not care"),
        ("hotel-pricerange", "dontcare", "do not care"),
        ("hotel-pricerange", "cheap.", "cheap"),
        ("hotel-type", "true", "hotel"),
        ("hotel-type", "false", "guest house"),
        ("hotel-type", "guesthouse", "guest house"),
        ("hotel-parking", "free", "yes"),
        ("hotel-internet", "false", "no"),
        ("taxi-leaveat", "7:45", "07:45"),
        ("hotel-area", "east; hotel stars: 4", "east"),  # a seq answer that ran past its separator
    ],
)
def test_canonical(slot, value, want):
    assert canonical(slot, value) == want


def test_raw_labels_get_the_usual_cleanup():
    assert raw_label("hotel-area", "center") == "centre"
    assert raw_label("hotel-name", "City Centre North B and B") == "city centre north bed and breakfast"
    assert raw_label("hotel-name", "alpha-milton guest house") == "alpha milton guest house"
    assert raw_label("attraction-type", "musuem") == "museum"
    assert raw_label("train-leaveat", "5:45 pm") == "17:45"
    assert raw_label("hotel-type", "venetian") == "none"
    assert normalize_time("after 11 am") == "after 11:00 am"


def test_tsv_slice_counts_and_values(tmp_path, dev_rows):
    path = tsv_slice(tmp_path, dev_rows, 120)
    examples = TASK.load("dev", path)
    body = dev_rows[1:121]
    assert len(examples) == 120 == examples.report.kept
    assert len({e.id.split(":")[0] for e in examples}) == len({r[0] for r in body})
    assert all(e.prompts == list(PROMPTS) for e in examples)
    # every target is the file's cell, canonical; every column read
    for ex, row in zip(examples, body):
        assert ex.id == f"{row[0].removesuffix('.json')}:{row[1]}"
        assert ex.targets == [canonical(s, v.split("|")[0]) for s, v in zip(SLOTS, row[5:])]
        assert ex.document.endswith(f"user: {' '.join(row[4].split())}")
    turn3 = next(e for e in examples if e.id == "PMUL1635:3")
    state = dict(zip(SLOTS, turn3.targets))
    assert state["hotel-book day"] == "friday" and state["hotel-internet"] == "yes" and state["hotel-area"] == "east"
    assert turn3.document.count("\n") == 6  # user, system, user, system, user, system, user
    assert turn3.document.startswith("user: i need to book a hotel in the east")


def test_full_dev_split_matches_the_data_readme(dev_examples):
    examples = dev_examples
    assert len(examples) == 7371
    assert len({e.id.split(":")[0] for e in examples}) == 1000


def test_tsv_errors_name_file_and_line(tmp_path, dev_rows):
    rows = [list(r) for r in dev_rows[:4]]
    rows[2] = rows[2][:-1]
    path = tsv_slice(tmp_path, rows, 3)
    with pytest.raises(DataError, match=r"dev\.tsv:3: 34 fields, expected 35"):
        TASK.load("dev", path)
    rows = [list(r) for r in dev_rows[:4]]
    rows[0][7] = "hotel-colour"
    with pytest.raises(DataError, match=r"dev\.tsv:1: the slot columns"):
        TASK.load("dev", tsv_slice(tmp_path, rows, 3))


def raw_slice(tmp_path, raw_dialogues, n, name="val.json.zip"):
    keep = dict(list(raw_dialogues.items())[:n])
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("val.json", json.dumps(keep))
    return path, keep


def test_raw_format_slice_agrees_with_the_tsv(tmp_path, raw_dialogues, dev_examples):
    folder = tmp_path / "raw"
    folder.mkdir()
    _, keep = raw_slice(folder, raw_dialogues, 40)
    examples = TASK.load("dev", folder)  # the folder's val.json.zip stands for dev
    assert len(examples) == sum(len(d["log"]) // 2 for d in keep.values())
    tsv = {e.id: e for e in dev_examples}
    both = [e for e in examples if e.id in tsv]
    assert len(both) >= 0.95 * len(examples)
    same = sum(all(p[0] in g for p, g in zip(e.references, tsv[e.id].references)) for e in both)
    assert same >= 0.97 * len(both)  # 99.2% on the whole validation set


def test_data_json_uses_the_split_lists(tmp_path, raw_dialogues):
    keep = dict(list(raw_dialogues.items())[:6])
    ids = list(keep)
    (tmp_path / "data.json").write_text(json.dumps(keep))
    (tmp_path / "valListFile.txt").write_text("\n".join(f"{i}.json" for i in ids[:2]) + "\n")
    (tmp_path / "testListFile.txt").write_text(f"{ids[2]}.json\n")
    got = {s: {e.id.split(":")[0] for e in TASK.load(s, tmp_path / "data.json")} for s in ("train", "dev", "test")}
    assert got == {"dev": set(ids[:2]), "test": {ids[2]}, "train": set(ids[3:])}


def test_missing_split_file_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match="no file for split 'test'"):
        TASK.load("test", tmp_path)
    with pytest.raises(DataError, match="unknown split 'eval'"):
        TASK.load("eval", tmp_path)
    with pytest.raises(DataError, match="not found"):
        TASK.load("dev", tmp_path / "nowhere")


def test_fit_drops_the_oldest_utterances(tok):
    lines = [f"user: turn {i} " + "word " * 20 for i in range(6)]
    ex = Example("d:5", "\n".join(lines), [Subtask(p, "none") for p in PROMPTS])
    report = tasks.TaskReport("x")
    size = len(tok(lines[-1], add_special_tokens=False)["input_ids"])
    (fitted,) = TASK.fit([ex], tok, 2 * size + 1 + 3, report)[0]  # room for the last two lines
    assert fitted.document == "\n".join(lines[-2:])
    assert report.changes["utterances dropped"] == 4 and report.truncated == 1
    short = Example("d:0", lines[0], ex.subtasks)
    assert TASK.fit([short], tok, 512, report)[0][0] is short


def test_fit_counts_the_line_breaks_a_byte_level_bpe_encodes(tmp_path):
    """A byte-level BPE gives each line break a token of its own (T5's vocabulary reads it as a
    space): a fitted history must still be inside the limit with its line breaks counted."""
    from pidec.demo.run import build_tokenizer

    lines = [f"system: the {i} train leaves at 1{i}:15 .\nuser: i need to book {i} tickets ." for i in range(12)]
    examples = [Example(f"d:{i}", "\n".join(lines[: i + 1]), [Subtask("train day", "none")]) for i in range(12)]
    bpe = build_tokenizer(examples, tmp_path / "bpe", vocab_size=300)
    assert len(bpe("a\nb", add_special_tokens=False)["input_ids"]) > len(
        bpe("ab", add_special_tokens=False)["input_ids"]
    )
    for limit in (40, 64, 97, 130):
        report = tasks.TaskReport("x")
        fitted = [piece for pieces in TASK.fit(examples, bpe, limit, report) for piece in pieces]
        sizes = [len(bpe(ex.document)["input_ids"]) for ex in fitted]  # with its EOS, as the model reads it
        assert max(sizes) <= limit and report.truncated > 0, (limit, sizes)
        assert all(ex.document.endswith(lines[i].split("\n")[-1]) for i, ex in enumerate(fitted))


def test_fit_cuts_inside_a_last_utterance_that_is_alone_too_long(tok):
    ex = Example("d:0", "user: " + " ".join(f"w{i}" for i in range(200)), [Subtask("hotel area", "none")])
    report = tasks.TaskReport("x")
    (fitted,) = TASK.fit([ex], tok, 33, report)[0]
    assert fitted.document.endswith("w199") and len(tok(fitted.document, add_special_tokens=False)["input_ids"]) <= 32
    assert report.changes["last utterances cut inside"] == 1


def turn(values: dict, answers: dict | None = None):
    """An example with the given non-none gold values, and a prediction (default: the gold)."""
    gold = [values.get(s, "none") for s in SLOTS]
    pred = [(answers if answers is not None else values).get(s, "none") for s in SLOTS]
    return Example("t", "user: x", [Subtask(p, g) for p, g in zip(PROMPTS, gold)]), pred


def test_joint_goal_accuracy_by_hand():
    ex1, p1 = turn({"hotel-area": "east"})
    ex2, p2 = turn({"hotel-area": "east", "hotel-stars": "4"}, {"hotel-area": "east", "hotel-stars": "3"})
    ex3, p3 = turn({"train-day": "friday"}, {"train-day": "Friday", "hotel-area": "none"})
    m = TASK.score([ex1, ex2, ex3], [p1, p2, p3])
    assert m["joint_goal_accuracy"] == pytest.approx(100 * 2 / 3)  # one wrong slot fails turn 2
    assert m["slot_accuracy"] == pytest.approx(100 * 89 / 90)
    assert m["joint_goal_accuracy/hotel"] == pytest.approx(50.0) and m["turns/hotel"] == 2
    assert m["joint_goal_accuracy/train"] == 100.0 and "joint_goal_accuracy/taxi" not in m


def test_alternative_gold_values_are_all_accepted(tmp_path, dev_rows):
    ex = Example("t", "user: x", [Subtask(p, "none") for p in PROMPTS])
    ex = tasks.TaskExample(ex.id, ex.document, ex.subtasks, references=[["none"]] * 30)
    ex.references[SLOTS.index("hotel-type")] = ["hotel", "guest house"]
    pred = ["none"] * 30
    pred[SLOTS.index("hotel-type")] = "guest house"
    assert TASK.score([ex], [pred])["joint_goal_accuracy"] == 100.0
    pred[SLOTS.index("hotel-type")] = "bed and breakfast"
    assert TASK.score([ex], [pred])["joint_goal_accuracy"] == 0.0


def test_seq_outputs_are_parsed_back_into_the_thirty_slots():
    gold = {"hotel-area": "east", "hotel-stars": "4", "train-day": "friday"}
    ex, _ = turn(gold)
    prompts = list(PROMPTS)
    clean = format_seq(prompts, ex.targets)
    assert TASK.score([ex], [parse_seq(clean, prompts)])["joint_goal_accuracy"] == 100.0
    # only the filled slots, in another order: the rest read as none
    sparse = "train day: friday; hotel stars: 4; hotel area: east"
    assert TASK.score([ex], [parse_seq(sparse, prompts)])["joint_goal_accuracy"] == 100.0
    # a lost separator, an unknown prompt, a repeated slot (the first counts): still right
    messy = "hotel area: east; hotel stars: 4 ; hotel colour: red; train day: friday; hotel stars: 5"
    assert TASK.score([ex], [parse_seq(messy, prompts)])["joint_goal_accuracy"] == 100.0
    # output cut mid-way, and garbage: wrong, but scored slot by slot without an error
    cut = parse_seq("hotel area: east; hotel stars: 4; train d", prompts)
    assert TASK.score([ex], [cut])["slot_accuracy"] == pytest.approx(100 * 29 / 30)
    for junk in ("", "no colon at all", ";;; : ;"):
        m = TASK.score([ex], [parse_seq(junk, prompts)])
        assert m["joint_goal_accuracy"] == 0.0 and m["slot_accuracy"] == pytest.approx(100 * 27 / 30)


def test_seq_training_targets_list_only_the_filled_slots(tok):
    from pidec.layouts import TrainTokenizer

    gold = {"hotel-area": "east", "train-day": "friday"}
    ex, _ = turn(gold)
    prompts = list(PROMPTS)
    assert TASK.seq_omit == "none"
    short = format_seq(prompts, ex.targets, TASK.seq_omit)
    assert short == "hotel area: east; train day: friday"
    assert TASK.score([ex], [parse_seq(short, prompts)])["joint_goal_accuracy"] == 100.0
    empty, _ = turn({})
    assert format_seq(prompts, empty.targets, TASK.seq_omit) == ""
    assert TASK.score([empty], [parse_seq("", prompts)])["joint_goal_accuracy"] == 100.0
    coder = TrainTokenizer(tok, "seq", 512, 0, "left", None, TASK.seq_omit)
    item = coder.item(0, ex.document, prompts, ex.targets)
    assert item.values == [short]
    assert coder.target_tokens(prompts, ex.targets) == [len(tok(short, add_special_tokens=False)["input_ids"]) + 1]
    full = TrainTokenizer(tok, "seq", 512, 0, "left").target_tokens(prompts, ex.targets)[0]
    assert full > 5 * coder.target_tokens(prompts, ex.targets)[0]


def test_seq_predictions_name_the_omitted_slots_none():
    from pidec.evaluate import fill_omitted

    prompts = list(PROMPTS)
    parsed = parse_seq("hotel area: east; train day: friday", prompts)
    assert parsed.count("") == 28  # the parser knows nothing of the task's default
    filled = fill_omitted([parsed], TASK, "seq")[0]
    assert filled.count("none") == 28 and filled[prompts.index("hotel area")] == "east"
    assert fill_omitted([parsed], TASK, "pid") == [parsed]  # an empty pid answer is the model's own


def test_score_rejects_mismatched_predictions():
    ex, pred = turn({})
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        TASK.score([ex, ex], [pred])
    with pytest.raises(ValueError, match="29 answers for 30 subtasks"):
        TASK.score([ex], [pred[:-1]])


# -- the state form: previous state + last turn, evaluated with the model's own states chained --


def state_tsv(tmp_path, dialogues):
    """A hand-made TSV: dialogues = {id: [(system, user, {slot: value}), ...]}."""
    from pidec.tasks.multiwoz import TSV_COLUMNS

    rows = ["\t".join(TSV_COLUMNS + SLOTS)]
    for dialogue, turns in dialogues.items():
        for t, (system, user, values) in enumerate(turns):
            cells = [values.get(s, "none") for s in SLOTS]
            rows.append("\t".join([f"{dialogue}.json", str(t), str(t == len(turns) - 1), system, user, *cells]))
    path = tmp_path / "test.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


TWO_DIALOGUES = {
    "A": [
        ("", "i need a hotel in the north", {"hotel-area": "north"}),
        (
            "how long ?",
            "3 nights , parking please",
            {"hotel-area": "north", "hotel-book stay": "3", "hotel-parking": "true"},
        ),
        ("booked .", "thanks", {"hotel-area": "north", "hotel-book stay": "3", "hotel-parking": "true"}),
    ],
    "B": [
        ("", "a train on friday", {"train-day": "friday"}),
        ("where to ?", "to ely", {"train-day": "friday", "train-destination": "ely"}),
    ],
}


# a model's answers to TWO_DIALOGUES by user utterance: it misses the parking at A:1 and then
# keeps what it was shown
MISSES_THE_PARKING = {
    "i need a hotel in the north": {"hotel-area": "north"},
    "3 nights , parking please": {"hotel-area": "north", "hotel-book stay": "3"},
    "thanks": {"hotel-area": "north", "hotel-book stay": "3"},
    "a train on friday": {"train-day": "friday"},
    "to ely": {"train-day": "friday", "train-destination": "ely"},
}


def test_serialize_state_names_the_filled_slots_only():
    from pidec.tasks.multiwoz import serialize_state

    values = ["none"] * len(SLOTS)
    assert serialize_state(values) == "state: none"
    values[SLOTS.index("hotel-area")] = "north"
    values[SLOTS.index("hotel-book stay")] = "3"
    values[SLOTS.index("hotel-parking")] = "true"  # canonical: yes
    values[SLOTS.index("train-leaveat")] = "dontcare"
    assert (
        serialize_state(values)
        == "state: hotel area = north; hotel book stay = 3; hotel parking = yes; train leave at = do not care"
    )
    with pytest.raises(ValueError, match="30 slot values"):
        serialize_state(values[:-1])


def test_state_form_documents_hold_the_gold_previous_state_and_the_last_turn(tmp_path):
    from pidec.tasks.multiwoz import MultiWOZState, recent_turns

    path = state_tsv(tmp_path, TWO_DIALOGUES)
    plain = TASK.load("test", path)
    examples = tasks.get("multiwoz-state").load("test", path)
    assert [e.id for e in examples] == ["A:0", "A:1", "A:2", "B:0", "B:1"]
    assert examples[0].document == "state: none\nuser: i need a hotel in the north"
    assert examples[1].document == "state: hotel area = north\nsystem: how long ?\nuser: 3 nights , parking please"
    assert examples[2].document.startswith(
        "state: hotel area = north; hotel book stay = 3; hotel parking = yes\nsystem: booked ."
    )
    assert examples[3].document == "state: none\nuser: a train on friday"  # a new dialogue starts empty
    assert [e.targets for e in examples] == [e.targets for e in plain]  # the targets do not change
    two = MultiWOZState(last_turns=2).load("test", path)
    assert (
        two[2].document.split("\n", 1)[1]
        == recent_turns(plain[2].document, 2)
        == ("system: how long ?\nuser: 3 nights , parking please\nsystem: booked .\nuser: thanks")
    )
    assert TASK.load("test", path)[1].document.startswith("user: i need")  # the plain task is unchanged
    with pytest.raises(ValueError, match="last_turns"):
        MultiWOZState(last_turns=0)


def test_state_form_fit_keeps_the_state_and_drops_old_utterances(tok):
    from pidec.tasks.multiwoz import MultiWOZState

    task = MultiWOZState(last_turns=3)
    lines = ["state: hotel area = north"] + [f"user: turn {i} " + "word " * 20 for i in range(3)]
    ex = Example("d:2", "\n".join(lines), [Subtask(p, "none") for p in PROMPTS])
    report = tasks.TaskReport("x")
    size = len(tok(lines[-1], add_special_tokens=False)["input_ids"])
    head = len(tok(lines[0], add_special_tokens=False)["input_ids"])
    (fitted,) = task.fit([ex], tok, head + 2 * size + 1 + 4, report)[0]
    assert fitted.document == "\n".join([lines[0], *lines[-2:]])
    assert report.changes["utterances dropped"] == 1 and report.truncated == 1


class ScriptedModel:
    """Stands in for `pidec.api.Model` in `evaluate`: answers from a script keyed by the user's
    utterance, and records every document it was given, in order, with its batch."""

    def __init__(self, tok, script):
        from types import SimpleNamespace

        self.tokenizer, self.script, self.calls = tok, script, []
        self.config = SimpleNamespace(max_input_length=512)

    def generate_batch(self, batch, max_new_tokens, num_beams, layout, return_details, seq_instruction):
        from types import SimpleNamespace

        self.calls.append([document for document, _ in batch])
        outputs = []
        for document, prompts in batch:
            said = self.script[document.rsplit("user: ", 1)[1]]
            outputs.append([said.get(SLOT_OF_PROMPT_[p], "none") for p in prompts])
        return SimpleNamespace(outputs=outputs, timings={"total_ms": 1.0}, usage={})


SLOT_OF_PROMPT_ = dict(zip(PROMPTS, SLOTS))


def test_chained_evaluation_feeds_each_turn_the_state_predicted_before(tmp_path, tok):
    from pidec.evaluate import evaluate
    from pidec.tasks.multiwoz import MultiWOZState

    path = state_tsv(tmp_path, TWO_DIALOGUES)
    task = tasks.get("multiwoz-state")
    examples = task.load("test", path)
    script = MISSES_THE_PARKING
    model = ScriptedModel(tok, script)
    result = evaluate(model, task, examples, "pid", batch_size=8)  # what `pidec eval --task multiwoz-state` runs
    # the first round's batch is decoded once untimed (the warm-up), then one round per turn
    # index, the dialogues batched together; A:2 reads the predicted state
    assert model.calls[0] == model.calls[1]
    model.calls = model.calls[1:]
    assert [len(c) for c in model.calls] == [2, 2, 1]
    assert model.calls[0] == ["state: none\nuser: i need a hotel in the north", "state: none\nuser: a train on friday"]
    assert model.calls[1][1] == "state: train day = friday\nsystem: where to ?\nuser: to ely"
    assert model.calls[2] == ["state: hotel area = north; hotel book stay = 3\nsystem: booked .\nuser: thanks"]
    assert result.metrics["joint_goal_accuracy"] == pytest.approx(60.0) and result.metrics["turns"] == 5
    assert result.speed["rounds"] == 3
    # the oracle reads the gold previous state instead (and decodes all turns at once)
    oracle = ScriptedModel(tok, script)
    evaluate(oracle, MultiWOZState(previous="gold"), examples, "pid", batch_size=8, warmup=False)
    assert len(oracle.calls) == 1 and "hotel parking = yes" in oracle.calls[0][2]


def test_chained_evaluation_needs_the_turns_of_a_dialogue_in_order(tmp_path, tok):
    from pidec.evaluate import evaluate

    examples = tasks.get("multiwoz-state").load("test", state_tsv(tmp_path, TWO_DIALOGUES))
    with pytest.raises(ValueError, match="consecutive and in order"):
        evaluate(ScriptedModel(tok, {}), tasks.get("multiwoz-state"), [examples[0], examples[2]], "pid")


# -- the slot-state form: each slot's prompt carries its previous value --------------------------


def test_slot_state_prompts_carry_the_gold_previous_values_and_documents_the_last_turn(tmp_path):
    from pidec.tasks.multiwoz import MultiWOZSlotState

    path = state_tsv(tmp_path, TWO_DIALOGUES)
    plain = TASK.load("test", path)
    examples = tasks.get("multiwoz-slot-state").load("test", path)
    assert [e.id for e in examples] == ["A:0", "A:1", "A:2", "B:0", "B:1"]
    assert examples[1].document == "system: how long ?\nuser: 3 nights , parking please"
    first = dict(zip(examples[0].prompts, examples[0].targets))
    assert first["hotel area = none"] == "north" and len(first) == len(SLOTS)
    second = examples[1].prompts
    assert "hotel area = north" in second and "hotel parking = none" in second
    assert "hotel parking = yes" in examples[2].prompts  # canonical form of the gold `true`
    assert "train day = none" in examples[3].prompts  # a new dialogue starts empty
    assert [e.targets for e in examples] == [e.targets for e in plain]
    task = MultiWOZSlotState()
    assert task.slots_of(examples[2]) == list(SLOTS) == task.slots_of(plain[2])
    with pytest.raises(ValueError, match="not a MultiWOZ slot prompt"):
        task.slots_of(Example("x:0", "d", [Subtask("hotel colour = red", "none")]))


class PromptScriptedModel(ScriptedModel):
    """ScriptedModel for prompts that carry a value: records the prompts it was given."""

    def generate_batch(self, batch, max_new_tokens, num_beams, layout, return_details, seq_instruction):
        from types import SimpleNamespace

        self.calls.append([prompts for _, prompts in batch])
        outputs = []
        for document, prompts in batch:
            said = self.script[document.rsplit("user: ", 1)[1]]
            outputs.append([said.get(SLOT_OF_PROMPT_[p.split(" = ")[0]], "none") for p in prompts])
        return SimpleNamespace(outputs=outputs, timings={"total_ms": 1.0}, usage={})


def test_slot_state_chained_evaluation_feeds_each_prompt_the_value_predicted_before(tmp_path, tok):
    from pidec.evaluate import evaluate
    from pidec.tasks.multiwoz import MultiWOZSlotState

    task = tasks.get("multiwoz-slot-state")
    examples = task.load("test", state_tsv(tmp_path, TWO_DIALOGUES))
    script = MISSES_THE_PARKING
    model = PromptScriptedModel(tok, script)
    result = evaluate(model, task, examples, "pid", batch_size=8, warmup=False)
    assert [len(c) for c in model.calls] == [2, 2, 1]
    (a2,) = model.calls[2]
    assert "hotel parking = none" in a2 and "hotel book stay = 3" in a2  # predicted, not gold (yes)
    assert "train day = friday" in model.calls[1][1]
    assert result.metrics["joint_goal_accuracy"] == pytest.approx(60.0)
    assert "hotel parking = none" in result.examples[2].prompts  # scored as decoded
    oracle = PromptScriptedModel(tok, script)
    evaluate(oracle, MultiWOZSlotState(previous="gold"), examples, "pid", batch_size=8, warmup=False)
    assert len(oracle.calls) == 1 and "hotel parking = yes" in oracle.calls[0][2]
