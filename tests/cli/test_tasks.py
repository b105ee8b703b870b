"""`pidec tasks` and `pidec eval` end to end on a tiny random checkpoint, and their one-line
errors (exit code 2)."""

import json

import pytest
from typer.testing import CliRunner

from pidec.cli import app

from ..shared_data import ACI_BENCH, COVID_QA, MULTIWOZ, require, tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("eval"), seed=2, max_input_length=256, eos_boost=2.0)


def run_eval(folder, *args):
    r = runner.invoke(app, ["eval", "--model", str(folder), "--max-new-tokens", "2", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_tasks_lists_every_task():
    r = runner.invoke(app, ["tasks"])
    assert r.exit_code == 0, r.output
    for name in ("multiwoz", "aci_bench", "qa", "jsonl"):
        assert f"{name}: " in r.stdout
    assert "splits: train, dev, test; main metric: joint_goal_accuracy" in r.stdout
    assert "settings (multiwoz-slot-state:key=value): last_turns=1, previous=predicted" in r.stdout


def test_eval_a_task_with_settings_reads_them(folder, tmp_path):
    """`multiwoz-slot-state:last_turns=2`: each document holds the last two turns (the first
    turn has one), and the output files are named without the colon."""
    from pidec import tasks

    task = tasks.get("multiwoz-slot-state:last_turns=2")
    examples = task.load("dev", require(MULTIWOZ), limit=3)
    assert [ex.document.count("user: ") for ex in examples] == [1, 2, 2]
    data = ["--split", "dev", "--limit", "3", "--data", str(require(MULTIWOZ)), "--out", str(tmp_path)]
    out = run_eval(folder, "--task", "multiwoz-slot-state:last_turns=2", *data)
    assert out["task"] == "multiwoz-slot-state:last_turns=2" and out["metrics"]["turns"] == 3
    assert (tmp_path / "multiwoz-slot-state_last_turns=2-dev-pid.predictions.jsonl").is_file()


def test_eval_multiwoz_writes_metrics_and_predictions(folder, tmp_path):
    out = run_eval(
        folder,
        "--task",
        "multiwoz",
        "--split",
        "dev",
        "--limit",
        "3",
        "--data",
        str(require(MULTIWOZ)),
        "--out",
        str(tmp_path),
    )
    assert out["task"] == "multiwoz" and out["split"] == "dev" and out["layout"] == "pid"
    assert 0 <= out["metrics"]["joint_goal_accuracy"] <= 100 and out["metrics"]["turns"] == 3
    assert out["speed"]["examples"] == 3 and out["speed"]["rows"] == 90 and out["speed"]["output_tokens_per_s"] > 0
    metrics_path, predictions_path = (tmp_path / f"multiwoz-dev-pid.{x}" for x in ("metrics.json", "predictions.jsonl"))
    assert out["wrote"] == [str(metrics_path), str(predictions_path)]
    assert json.loads(metrics_path.read_text())["metrics"] == out["metrics"]
    records = [json.loads(line) for line in predictions_path.read_text().splitlines()]
    assert [r["id"] for r in records] == ["PMUL1635:0", "PMUL1635:1", "PMUL1635:2"]
    assert all(len(r["predictions"]) == len(r["targets"]) == 30 for r in records)


def test_eval_qa_long_article_in_windows(folder):
    out = run_eval(folder, "--task", "qa", "--split", "test", "--limit", "1", "--data", str(require(COVID_QA)))
    assert out["speed"]["documents"] > 1 and out["speed"]["examples"] == 1
    assert "windows" in out["data"] and out["metrics"]["questions"] >= 1


def test_eval_aci_seq(folder):
    require(ACI_BENCH)  # the task's default path
    out = run_eval(folder, "--task", "aci_bench", "--split", "valid", "--limit", "1", "--layout", "seq")
    assert out["speed"]["rows"] == 1 and "subjective/rouge1" in out["metrics"]
    assert "1 documents cut at the end" in out["data"]


def test_eval_jsonl_pie(folder, tmp_path):
    rows = [{"id": "a", "document": "a cheap hotel in the north", "subtasks": [{"prompt": "area", "target": "north"}]}]
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    out = run_eval(folder, "--task", "jsonl", "--data", str(tmp_path), "--layout", "pie")
    assert out["metrics"]["subtasks"] == 1 and out["speed"]["rows"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "squad"], "unknown task 'squad'"),
        (["--task", "multiwoz", "--split", "eval"], "--split 'eval': task multiwoz has the splits train, dev, test"),
        (["--task", "multiwoz", "--data", "/nowhere/multiwoz"], "data path /nowhere/multiwoz not found"),
        (["--task", "jsonl"], "no default data path"),
        (["--task", "multiwoz", "--layout", "both"], "'both' is not one of 'pid', 'pie', 'seq'"),
        (["--task", "multiwoz", "--limit", "0"], "--limit must be >= 1"),
        (["--task", "multiwoz-slot-state:turns=3"], "has no setting 'turns'; it takes last_turns, previous"),
        (["--task", "multiwoz:last_turns=3"], "multiwoz has no setting 'last_turns'; it takes no settings"),
        (["--task", "multiwoz-state:last_turns=0"], "last_turns must be an integer >= 1, got 0"),
        (["--task", "multiwoz-state:last_turns"], "expected multiwoz-state:key=value[,key=value]"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(folder, args, message):
    r = runner.invoke(app, ["eval", "--model", str(folder), *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


def test_eval_missing_model_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "none"), "--task", "multiwoz", "--limit", "1"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
