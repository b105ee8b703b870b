"""`pidec bench --sweep-k`: latency per document against K on a tiny model and a short document.
Timings are not checked, only the shape of the result, the table, the plot and the errors."""

import json

import pytest
from typer.testing import CliRunner

from pidec.bench import sweep as bench_sweep
from pidec.bench.sweep import format_sweep, parse_ks, plot_sweep, run_sweep
from pidec.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep():
    return run_sweep([1, 3], ["pidec-pid", "pidec-pie"], "dst", "tiny", threads=1, doc_tokens=32)


def test_one_latency_per_k_and_config(sweep):
    assert sweep["ks"] == [1, 3] and sweep["configs"] == ["pidec-pid", "pidec-pie"]
    assert sweep["model"]["size"] == "tiny" and sweep["model"]["params"] > 0
    for name in sweep["configs"]:
        assert len(sweep["latency_s"][name]) == 2 and all(s > 0 for s in sweep["latency_s"][name])
    # each K is a run of the harness with K prompts, on one model
    assert [run["result"]["workload_shape"]["subtasks"] for run in sweep["runs"]] == [1, 3]
    assert len({run["result"]["model"]["params"] for run in sweep["runs"]}) == 1
    json.dumps(sweep)  # the CLI writes it as JSON


def test_table_and_plot(sweep, tmp_path):
    text = format_sweep(sweep)
    assert "K=1" in text and "K=3" in text and "pidec-pie" in text
    path = tmp_path / "k.png"
    plot_sweep(sweep, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_ks():
    assert parse_ks("1,2, 4,2") == [1, 2, 4]
    for bad in ("", "0,1", "a,b", "-2"):
        with pytest.raises(ValueError, match="--sweep-k"):
            parse_ks(bad)
    with pytest.raises(ValueError, match="ks must be"):
        run_sweep([0], ["pidec-pid"], model_size="tiny")


def test_cli_sweep_writes_json_and_plot(tmp_path, monkeypatch):
    real = bench_sweep.run_sweep

    def short(*args, **kwargs):  # the CLI's document is 512 tokens; a short one is enough here
        return real(*args, doc_tokens=32, **kwargs)

    monkeypatch.setattr(bench_sweep, "run_sweep", short)
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    args = ["bench", "--model-size", "tiny", "--sweep-k", "1,2", "--configs", "pidec-pid", "--threads", "1"]
    r = runner.invoke(app, args + ["--json", str(out), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "K=1:" in r.output and "K sweep" in r.output
    assert json.loads(out.read_text())["ks"] == [1, 2] and png.exists()


def test_cli_sweep_errors():
    r = runner.invoke(app, ["bench", "--plot", "x.png"])
    assert r.exit_code == 2 and "--sweep-k" in r.output
    r = runner.invoke(app, ["bench", "--sweep-k", "1,x"])
    assert r.exit_code == 2 and "comma list" in r.output
    r = runner.invoke(app, ["bench", "--sweep-k", "1", "--quantize", "int8"])
    assert r.exit_code == 2 and "leave out" in r.output
