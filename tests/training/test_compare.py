"""`pidec compare`: every layout trained on the same budget from the same start, evaluated on the
task's split, with the throughputs taken from the runs' own logs."""

import json

import pytest
from typer.testing import CliRunner

from pidec.cli import app
from pidec.data import write_jsonl
from pidec.errors import InputError
from pidec.tasks import booking as synthetic
from pidec.training.compare import parse_layouts, training_totals

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cmp")
    train, test = synthetic.make_splits(24, 4, seed=3)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(test, folder / "test.jsonl")
    return folder


def test_compare_trains_each_layout_on_the_same_budget(data, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--output", str(out), "--task", "jsonl", "--data", str(data), "--layouts", "pie,pid"]
    args += ["--size", "tiny", "--tokenizer", "byte", "--steps", "3", "--batch-tokens", "8000", "--lr", "1e-3"]
    args += ["--max-input-length", "512", "--max-new-tokens", "3", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["layouts"]) == ["pie", "pid"] and res["eval_split"] == "test"
    for layout, x in res["layouts"].items():
        assert x["logged_steps"] == 3 and x["eval_examples"] == 4
        assert x["tokens"] <= 3 * 8000 and x["docs"] >= 3
        assert x["train_docs_per_s"] > 0 and x["infer_docs_per_s"] > 0
        assert (out / layout / "final" / "config.json").exists()
        assert (out / layout / f"jsonl-test-{layout}.predictions.jsonl").exists()
        assert x["main"] == x["metrics"][res["main_metric"]]
    # within one token budget a pid step holds more documents than a pie step (K encoder copies)
    assert res["layouts"]["pid"]["docs"] > res["layouts"]["pie"]["docs"]
    ratio = res["pid_vs_pie"]["train_throughput_x"]
    pid, pie = res["layouts"]["pid"], res["layouts"]["pie"]
    assert ratio == pytest.approx(pid["train_docs_per_s"] / pie["train_docs_per_s"], rel=0.01)
    assert "| pid |" in r.stdout and "pid - pie on" in (out / "results.md").read_text()


def test_training_totals_sum_only_the_train_steps(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [
        {"type": "start", "step": 0},
        {"type": "train", "step": 1, "docs": 3, "tokens": 100, "target_tokens": 9, "seconds": 0.5},
        {"type": "eval", "step": 1, "eval_s": 9.0},
        {"type": "train", "step": 2, "docs": 5, "tokens": 120, "target_tokens": 11, "seconds": 1.5},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    t = training_totals(log)
    assert (t["logged_steps"], t["docs"], t["tokens"], t["target_tokens"]) == (2, 8, 220, 20)
    assert t["train_s"] == 2.0 and t["train_docs_per_s"] == 4.0


@pytest.mark.parametrize("bad", ["", "pid,,pie", "pid,xyz", "pid,pid"])
def test_bad_layout_lists_are_refused(bad):
    with pytest.raises(InputError, match="--layouts"):
        parse_layouts(bad)


def test_compare_cli_refuses_a_bad_layout_in_one_line(tmp_path):
    r = runner.invoke(app, ["compare", "-o", str(tmp_path), "--task", "jsonl", "--steps", "1", "--layouts", "pid,x"])
    assert r.exit_code == 2 and "unknown layout 'x'" in r.output


def test_compare_seq_alone_refuses_subtask_sampling_naming_the_option(data, tmp_path):
    args = ["compare", "-o", str(tmp_path / "cmp"), "--task", "jsonl", "--data", str(data), "--layouts", "seq"]
    args += ["--size", "tiny", "--tokenizer", "byte", "--steps", "1", "--downsample", "none:0.3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--downsample: " in r.output and "seq" in r.output
    assert not (tmp_path / "cmp" / "seq").exists()


def test_compare_samples_subtasks_for_pid_and_pie_but_not_seq(data, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--output", str(out), "--task", "jsonl", "--data", str(data), "--layouts", "seq,pid"]
    args += ["--size", "tiny", "--tokenizer", "byte", "--steps", "2", "--batch-tokens", "8000"]
    args += ["--max-input-length", "512", "--max-new-tokens", "3", "--device", "cpu", "--downsample", "none:0.0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output  # seq is not refused for a sampling it cannot do
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["downsample"] == {"none": 0.0}
    seq_cfg = json.loads((out / "seq" / "run_config.json").read_text())
    pid_cfg = json.loads((out / "pid" / "run_config.json").read_text())
    assert seq_cfg["downsample"] == {} and pid_cfg["downsample"] == {"none": 0.0}


def test_compare_learning_curves_come_from_the_runs_own_evaluations(data, tmp_path):
    out = tmp_path / "curve"
    args = ["compare", "--output", str(out), "--task", "jsonl", "--data", str(data), "--layouts", "pie,pid"]
    args += ["--size", "tiny", "--tokenizer", "byte", "--steps", "3", "--batch-tokens", "8000", "--lr", "1e-3"]
    args += ["--max-input-length", "512", "--max-new-tokens", "3", "--device", "cpu"]
    args += ["--curve-every", "2", "--curve-limit", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["curve"] == {"every": 2, "split": "test", "limit": 2}
    for layout, x in res["layouts"].items():
        curve = x["curve"]
        # every 2 steps, and the final model at step 3
        assert [p["step"] for p in curve] == [2, 3], curve
        assert 0 < curve[0]["train_s"] <= curve[1]["train_s"] <= x["train_s"] + 0.1
        assert 0 < curve[0]["docs"] < curve[1]["docs"] == x["docs"]
        assert all(p["main"] == p[res["main_metric"]] for p in curve)
        evals = [json.loads(line) for line in open(out / layout / "log.jsonl") if '"eval"' in line]
        assert [e["step"] for e in evals] == [2, 3]
    assert "Learning curves" in r.stdout and "| pid | 3 |" in r.stdout


@pytest.mark.parametrize("every, msg", [("3", "only 3 steps"), ("-1", "give a number of steps")])
def test_compare_refuses_a_curve_it_cannot_draw(data, tmp_path, every, msg):
    args = ["compare", "-o", str(tmp_path), "--task", "jsonl", "--data", str(data), "--layouts", "pid"]
    args += ["--size", "tiny", "--tokenizer", "byte", "--steps", "3", "--curve-every", every, "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and msg in r.output, r.output
    assert not (tmp_path / "pid").exists()
