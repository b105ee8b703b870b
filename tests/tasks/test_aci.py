"""ACI-Bench: the CSV and section files on slices of the real ones, empty sections, the seq
note, ROUGE on the full note and per section against hand-computed values."""

import csv
import json
import shutil

import pytest

from pidec import tasks
from pidec.data import DataError
from pidec.layouts import format_seq, parse_seq
from pidec.metrics import Rouge
from pidec.tasks.aci_bench import PROMPTS, SECTIONS

from ..shared_data import ACI_BENCH, require

TASK = tasks.get("aci_bench")


def aci_slice(tmp_path, encounters: list[int], split="valid"):
    """A copy of the first valid encounters, in the distribution's folder layout."""
    src = require(ACI_BENCH)
    (tmp_path / "csv").mkdir()
    (tmp_path / "sections").mkdir()
    with open(src / "csv" / f"{split}.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [rows[i] for i in encounters]
    with open(tmp_path / "csv" / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    ids = {r["encounter_id"] for r in keep}
    for s in SECTIONS:
        data = json.loads((src / "sections" / f"{split}_{s}.json").read_text())
        data["data"] = [d for d in data["data"] if d["file"].split("-")[0] in ids]
        (tmp_path / "sections" / f"{split}_{s}.json").write_text(json.dumps(data))
    return tmp_path, keep


def test_slice_reads_dialogues_and_four_sections(tmp_path):
    folder, rows = aci_slice(tmp_path, [0, 5])  # D2N073 (index 5) has no results section
    examples = TASK.load("dev", folder)
    assert [e.id for e in examples] == [r["encounter_id"] for r in rows] == ["D2N068", "D2N073"]
    assert list(PROMPTS) == ["subjective", "objective exam", "objective results", "assessment and plan"]
    assert all(e.prompts == list(PROMPTS) for e in examples)
    assert examples[0].document == rows[0]["dialogue"].strip()
    assert examples[0].targets[1].startswith("PHYSICAL EXAMINATION")
    assert examples[1].targets[2] == "none"
    assert examples.report.changes["empty sections"] == 1
    # the sections, joined in order as the full-note metric joins them, are the CSV's note
    for ex, row in zip(examples, rows):
        joined = "\n\n".join(t for t in ex.targets if t != "none")
        assert joined.split() == row["note"].split()


def test_every_split_has_the_readme_counts():
    folder = require(ACI_BENCH)
    counts = {s: len(TASK.load(s, folder)) for s in TASK.splits}
    assert counts == {"train": 67, "valid": 20, "test1": 40, "test2": 40}
    assert len(TASK.load("test", folder)) == 40  # test is test1


def test_missing_or_mismatched_files_are_named(tmp_path):
    folder, _ = aci_slice(tmp_path, [0, 1])
    path = folder / "sections" / "valid_objective_exam.json"
    data = json.loads(path.read_text())
    data["data"][1]["src"] = "[doctor] something else"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"valid_objective_exam\.json: encounter D2N069: src differs"):
        TASK.load("valid", folder)
    path.unlink()
    with pytest.raises(DataError, match=r"no section file valid_objective_exam\.json"):
        TASK.load("valid", folder)
    with pytest.raises(DataError, match="unknown split 'test3'"):
        TASK.load("test3", folder)


def test_sections_alone_give_the_dialogue(tmp_path):
    folder, rows = aci_slice(tmp_path, [2])
    shutil.rmtree(folder / "csv")
    (ex,) = TASK.load("valid", folder)
    assert ex.document == rows[0]["dialogue"].strip()


def test_normalize_reads_none_as_an_empty_section():
    for text in ("none", "None.", "  ", "objective_results: #####EMPTY#####."):
        assert TASK.normalize(text) == ""
    assert TASK.normalize(" RESULTS\n\nNormal. ") == "RESULTS\n\nNormal."


def test_rouge_by_hand():
    r = Rouge().pair("the cat sat", "the cat sat on the mat")
    assert r["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)  # P 3/3, R 3/6
    assert r["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)  # P 2/2, R 2/5
    assert r["rougeL"] == pytest.approx(r["rouge1"])
    # Lsum splits sentences at newlines: each reference line is matched on its own
    assert Rouge().pair("a b\nc d", "c d\na b")["rougeLsum"] == pytest.approx(100.0)
    assert Rouge().pair("a b c d", "c d a b")["rougeL"] == pytest.approx(50.0)


def test_score_full_note_and_sections():
    ex = tasks.TaskExample("e", "[doctor] hi", [], None)
    from pidec.data import Subtask

    ex.subtasks = [Subtask(p, t) for p, t in zip(PROMPTS, ["pain in knee", "swelling", "none", "rest and ice"])]
    perfect = TASK.score([ex], [["pain in knee", "swelling", "none", "rest and ice"]])
    assert perfect["rouge1"] == pytest.approx(100.0) and perfect["objective_results/rouge1"] == 100.0
    half = TASK.score([ex], [["pain in knee", "", "x-ray normal", "rest and ice"]])
    assert half["objective_exam/rouge1"] == 0.0 and half["objective_results/rougeL"] == 0.0
    assert half["subjective/rouge2"] == pytest.approx(100.0)
    # full note: "pain in knee / x-ray normal / rest and ice" vs "pain in knee / swelling / rest and ice"
    p, r = 9, 7  # unigram tokens (rouge-score splits x-ray into x, ray); 6 shared
    assert half["rouge1"] == pytest.approx(100 * 2 * (6 / p) * (6 / r) / (6 / p + 6 / r))
    assert half["notes"] == 1


def test_seq_note_round_trips_through_the_parser(tmp_path):
    folder, _ = aci_slice(tmp_path, [0])
    (ex,) = TASK.load("valid", folder)
    note = format_seq(ex.prompts, ex.targets)
    assert parse_seq(note, ex.prompts) == ex.targets  # sections hold ':' and newlines
    assert TASK.score([ex], [parse_seq(note, ex.prompts)])["rougeLsum"] == pytest.approx(100.0)
