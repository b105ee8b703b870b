import random

import pytest

from pidec.data import read_jsonl, write_jsonl
from pidec.tasks import booking as synthetic
from pidec.tasks.booking import (
    CORRECTED,
    DECLINED,
    NONE,
    OTHER,
    REJECTED,
    SLOT,
    SLOTS,
    Booking,
    Distractor,
    describe,
    make_examples,
    make_splits,
    render,
    stats,
)

LONG = 100_000  # max_chars that never redraws, so the knobs are measured without the length filter


def test_same_seed_same_examples_other_seed_other_examples():
    a, b, c = make_examples(50, 7), make_examples(50, 7), make_examples(50, 8)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert sum(x.document == y.document for x, y in zip(a, c)) < 5
    # example i does not depend on how many are drawn
    assert [e.to_dict() for e in make_examples(20, 7)] == [e.to_dict() for e in a[:20]]


def test_every_example_has_the_twelve_slots_in_order():
    assert len(SLOTS) == len(set(SLOTS)) == 12
    for ex in make_examples(100, 1):
        assert ex.prompts == SLOTS
        assert all(isinstance(t, str) and t for t in ex.targets)


def test_targets_are_values_copied_from_the_document():
    for ex in make_examples(300, 2):
        assert ex.document == ex.document.lower()
        for s in ex.subtasks:
            assert len(s.target.encode()) < 20
            if s.target != NONE:
                assert s.target in SLOT[s.prompt].values
                assert s.target in ex.document, (s.prompt, s.target, ex.document)


def test_none_rate_follows_the_knob_and_defaults_leave_slots_empty():
    assert 0.3 <= stats(make_examples(300, 3))["none_rate"] <= 0.6
    for rate in (0.2, 0.7):
        measured = stats(make_examples(300, 3, none_rate=rate, max_chars=LONG))
        assert abs(measured["none_rate"] - rate) < 0.04, measured
        assert all(abs(r - rate) < 0.12 for r in measured["none_rate_by_slot"].values())
    filled = make_examples(100, 3, none_rate=0.0, max_chars=LONG)
    assert stats(filled)["none_rate"] == 0.0


def test_distractors_come_at_the_configured_rate():
    # with every slot set each slot can take a distractor, so the measured rate is the knob
    for rate in (0.0, 0.3):
        measured = stats(make_examples(400, 4, none_rate=0.0, distractor_rate=rate, max_chars=LONG))
        assert abs(measured["distractor_rate"] - rate) < 0.03, measured
    assert 0.3 < stats(make_examples(300, 4))["examples_with_distractor"] < 0.9


def test_stats_counts_exactly_the_distractors_drawn():
    for booking, ex in synthetic._generate(300, 5, distractor_rate=0.3):
        assert stats([ex])["distractor_rate"] * 12 == pytest.approx(len(booking.distractors)), ex.document


def _only(prompt: str, value: str | None, distractor: Distractor) -> Booking:
    return Booking({p: value if p == prompt else None for p in SLOTS}, {prompt: distractor})


def _sentence(doc: str, pos: int) -> str:
    """The sentence of doc around character pos (turns can hold several sentences)."""
    start = max(doc.rfind(sep, 0, pos) for sep in (". ", "? ", "\n"))
    ends = [i for i in (doc.find(sep, pos) for sep in (". ", "? ", "\n")) if i >= 0]
    return doc[start + 1 : min(ends, default=len(doc))]


@pytest.mark.parametrize("prompt", SLOTS)
def test_the_target_is_the_last_word_not_the_distractor(prompt):
    slot = SLOT[prompt]
    value, wrong = slot.values[0], slot.values[1]
    kinds = [REJECTED, CORRECTED, DECLINED] + ([OTHER] if slot.others else [])
    for kind in kinds:
        kept = None if kind == DECLINED else value
        booking = _only(prompt, kept, Distractor(kind, wrong))
        assert booking.targets()[SLOTS.index(prompt)] == (kept or NONE)
        for seed in range(5):
            doc = render(booking, random.Random(seed), answer_rate=0.5)
            said = doc.index(wrong)
            if kind == DECLINED:
                assert value not in doc, doc
                offer, reply = doc[doc.rfind("\n", 0, said) + 1 :].splitlines()[:2]
                assert offer.startswith("agent: ") and reply.startswith("user: no, "), doc
            elif kind == OTHER:
                assert "train" in _sentence(doc, said) or "attraction" in _sentence(doc, said), doc
                assert value in doc
            else:
                last = doc.rindex(value)
                assert said < last and wrong not in _sentence(doc, last), doc
                assert ("no, " if kind == REJECTED else "actually, ") in _sentence(doc, last), doc


def test_splits_are_disjoint_even_when_conversations_repeat():
    easy = {"none_rate": 0.95, "distractor_rate": 0.0, "answer_rate": 0.0}  # short, so repeats are common
    train, test = make_splits(300, 100, 9, **easy)
    assert len(train) == 300 and len(test) == 100
    train_docs = {ex.document for ex in train}
    raw_test = [ex.document for ex in make_examples(100, 9, "test", **easy)]
    assert any(doc in train_docs for doc in raw_test)  # without the check, the splits would overlap
    assert not train_docs & {ex.document for ex in test}
    assert len({ex.document for ex in test}) == 100
    assert not {ex.id for ex in train} & {ex.id for ex in test}


def test_documents_stay_within_max_chars():
    measured = stats(make_examples(300, 10))
    assert measured["max_chars"] <= synthetic.DEFAULTS["max_chars"]
    assert 150 <= measured["mean_chars"] <= 400
    assert stats(make_examples(100, 10, max_chars=200))["max_chars"] <= 200
    with pytest.raises(ValueError, match="max_chars=20"):
        make_examples(1, 10, max_chars=20)


def test_bad_knobs_are_named():
    with pytest.raises(TypeError, match="none_rat"):
        make_examples(1, 0, none_rat=0.5)
    with pytest.raises(ValueError, match="distractor_rate=1.5"):
        make_examples(1, 0, distractor_rate=1.5)


def test_jsonl_round_trip(tmp_path):
    examples = make_examples(20, 11)
    write_jsonl(examples, tmp_path / "syn.jsonl")
    back = read_jsonl(tmp_path / "syn.jsonl")
    assert [e.to_dict() for e in back] == [e.to_dict() for e in examples]


def test_describe_names_every_slot():
    text = describe(distractor_rate=0.2)
    assert all(p in text for p in SLOTS) and "20%" in text


# -- the task by name (`--task booking`) ------------------------------------------------------


def test_booking_task_is_registered_and_generates_the_demo_splits():
    from pidec import tasks

    task = tasks.get("booking")
    assert "booking" in tasks.names() and task.main_metric == "joint_accuracy"
    small = tasks.TASKS["booking"](train_examples=30, test_examples=5, seed=3)
    want_train, want_test = synthetic.make_splits(30, 5, 3)
    assert [e.id for e in small.load("train")] == [e.id for e in want_train]
    assert [e.document for e in small.load("dev")] == [e.document for e in want_test]  # dev is test
    assert len(small.load("train", limit=7)) == 7


def test_booking_task_scores_in_percent():
    from pidec import tasks

    task = tasks.TASKS["booking"](train_examples=4, test_examples=2)
    examples = task.load("test")
    gold = [[s.target for s in e.subtasks] for e in examples]
    assert task.score(examples, gold)["joint_accuracy"] == 100.0
    one_wrong = [list(g) for g in gold]
    j = next(j for j, v in enumerate(one_wrong[0]) if v != synthetic.NONE)
    one_wrong[0][j] = "NOT " + one_wrong[0][j]
    m = task.score(examples, one_wrong)
    assert m["joint_accuracy"] == 50.0
    assert m["slot_accuracy"] == pytest.approx(100 * 23 / 24)
    filled = sum(v != synthetic.NONE for g in gold for v in g)
    assert m["filled_slot_accuracy"] == pytest.approx(100 * (filled - 1) / filled)


def test_booking_task_reads_a_folder_the_demo_wrote_and_names_a_missing_file(tmp_path):
    from pidec import tasks
    from pidec.data import DataError, write_jsonl

    train, test = synthetic.make_splits(6, 3, 1)
    write_jsonl(test, tmp_path / "test.jsonl")
    task = tasks.get("booking")
    assert [e.id for e in task.load("test", tmp_path)] == [e.id for e in test]
    with pytest.raises(DataError, match="train.jsonl not found"):
        task.load("train", tmp_path)
