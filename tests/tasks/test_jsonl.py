"""The generic JSONL task: reading a file or a folder of splits, exact match per subtask and per
example, ROUGE, and the registry."""

import json

import pytest

from pidec import tasks
from pidec.data import DataError

TASK = tasks.get("jsonl")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"id": "a", "document": "doc a", "subtasks": [{"prompt": "p1", "target": "Yes"}, {"prompt": "p2", "target": "no"}]},
    {"id": "b", "document": "doc b", "subtasks": [{"prompt": "p1", "target": "the red cat"}]},
]


def test_registry_names_and_unknown_task():
    assert tasks.names() == ["multiwoz", "multiwoz-state", "multiwoz-slot-state", "aci_bench", "qa", "booking", "jsonl"]
    for name in tasks.names():
        t = tasks.get(name)
        assert t.name == name and t.description and t.splits and t.main_metric
    with pytest.raises(
        DataError,
        match="unknown task 'squad': expected one of multiwoz, multiwoz-state, multiwoz-slot-state, aci_bench, qa, booking, jsonl",
    ):
        tasks.get("squad")


def test_file_or_folder_of_splits(tmp_path):
    path = write(tmp_path / "x.jsonl", ROWS)
    examples = TASK.load("test", path)
    assert [e.id for e in examples] == ["a", "b"] and examples[0].targets == ["Yes", "no"]
    assert len(TASK.load("test", path, limit=1)) == 1
    write(tmp_path / "dev.jsonl", ROWS[:1])
    assert [e.id for e in TASK.load("validation", tmp_path)] == ["a"]
    with pytest.raises(DataError, match=r"no test\.jsonl \(splits here: dev, x\)"):
        TASK.load("test", tmp_path)
    with pytest.raises(DataError, match="task jsonl: no default data path"):
        TASK.load("test")
    with pytest.raises(DataError, match="limit must be a positive integer"):
        TASK.load("test", path, limit=0)


def test_exact_match_per_subtask_and_per_example(tmp_path):
    examples = TASK.load("test", write(tmp_path / "x.jsonl", ROWS))
    m = TASK.score(examples, [["yes ", "No"], ["the red  cat"]])
    assert m["exact_match"] == 100.0 and m["example_exact_match"] == 100.0
    m = TASK.score(examples, [["yes", "maybe"], ["the red cat"]])
    assert m["exact_match"] == pytest.approx(200 / 3) and m["example_exact_match"] == 50.0
    assert m["rouge1"] == pytest.approx(200 / 3)  # per-answer ROUGE-1: 100, 0, 100
    assert tasks.get("jsonl").__class__(lowercase=False).score(examples, [["yes", "no"], ["the red cat"]])[
        "exact_match"
    ] == pytest.approx(200 / 3)


def test_unscorable_subtask_is_an_error(tmp_path):
    rows = [{"id": "a", "document": "d", "subtasks": [{"prompt": "p"}]}]
    examples = TASK.load("test", write(tmp_path / "x.jsonl", rows))
    with pytest.raises(ValueError, match="example 'a': subtask 0 has no target"):
        TASK.score(examples, [["x"]])
