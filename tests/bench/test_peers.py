"""The benchmark's peers (`pidec.bench.peers`) on a tiny model and a shrunken workload:
CTranslate2 (ct2-pie, ct2-prefix, float32 and int8) and its absence said plainly instead of a
crash, beside the int8 pidec rows, the ceiling and roofline columns, and the memory report."""

import importlib
import json
import os
import sys

import pytest
from typer.testing import CliRunner

from pidec.bench import harness, peers
from pidec.bench.configs import CT2_CONFIGS, config_flops
from pidec.bench.harness import run_bench
from pidec.bench.report import format_table
from pidec.bench.workloads import WORKLOADS, draw_documents
from pidec.cli import app

runner = CliRunner()
K, DOC = 3, 40
SMALL = dict(docs=1, repeats=1, threads=1, doc_tokens=DOC, subtasks=K)


def needs_ct2():
    try:
        return importlib.import_module("ctranslate2")
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"ctranslate2 is missing in CI ({e}): .ci/run installs pidec[ct2]")
        pytest.skip(f"ctranslate2 is not installed: {peers.CT2_INSTALL}")


@pytest.fixture
def no_ct2(monkeypatch):
    """As if ctranslate2 were not installed: `import ctranslate2` raises ImportError."""
    for name in [m for m in sys.modules if m == "ctranslate2" or m.startswith("ctranslate2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ctranslate2", None)


def by_config(result):
    return {r["config"]: r for r in result["results"]}


def test_missing_ct2_is_skipped_with_the_reason(no_ct2):
    assert 'pip install ".[ct2]"' in peers.ct2_missing()  # the README's form
    r = run_bench("dst", "tiny", configs=["pidec-pid", "ct2-pie", "ct2-prefix-int8"], ceiling=False, **SMALL)
    assert [x["config"] for x in r["results"]] == ["pidec-pid"]
    assert r["skipped"] == [{"configs": ["ct2-pie", "ct2-prefix-int8"], "reason": peers.ct2_missing()}]
    table = format_table(r)
    assert "skipped ct2-pie, ct2-prefix-int8: ctranslate2 is not installed" in table
    assert 'pip install ".[ct2]"' in table


def test_only_ct2_asked_and_missing_still_reports(no_ct2):
    r = run_bench("dst", "tiny", configs=["ct2-pie"], ceiling=False, **SMALL)
    assert r["results"] == [] and r["skipped"][0]["configs"] == ["ct2-pie"]
    assert "skipped ct2-pie" in format_table(r)


def test_cli_says_when_ct2_is_missing(no_ct2, tmp_path):
    out = tmp_path / "b.json"
    args = ["bench", "--model-size", "tiny", "--configs", "ct2-pie,ct2-prefix", "--docs", "1", "--repeats", "1"]
    r = runner.invoke(app, [*args, "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipped ct2-pie, ct2-prefix: ctranslate2 is not installed" in r.output
    assert json.loads(out.read_text())["skipped"][0]["configs"] == ["ct2-pie", "ct2-prefix"]


@pytest.fixture(scope="module")
def peer_run():
    needs_ct2()
    names = ["pidec-pie", "pidec-pid", "pidec-pid-int8", *CT2_CONFIGS]
    return run_bench("dst", "tiny", configs=names, memory_budget="64MiB", **SMALL)


def test_ct2_rows_run_the_same_work(peer_run):
    r = by_config(peer_run)
    assert peer_run["skipped"] == []
    assert list(r) == ["pidec-pie", "pidec-pid", "pidec-pid-int8", *CT2_CONFIGS]
    # the conversion is right: greedy ct2-pie and pidec-pie start alike on the same weights
    assert peer_run["agree_ct2"] is True
    d = draw_documents(WORKLOADS["dst"], 1, 0, doc_tokens=DOC, subtasks=K)[0]
    assert r["ct2-pie"]["gflops_per_doc"] * 1e9 == pytest.approx(config_flops("hf-pie", peers_cfg(peer_run), d))
    assert r["ct2-prefix"]["cross_cache_mb"] == pytest.approx(K * r["pidec-pid"]["cross_cache_mb"])
    for name in CT2_CONFIGS:
        assert r[name]["precision"] == ("int8" if name.endswith("-int8") else "float32")
        assert r[name]["latency_s_median"] > 0


def peers_cfg(result):
    from pidec.model import T5Config

    return T5Config(**result["model"]["config"])


def test_roofline_columns(peer_run):
    ceil = peer_run["ceiling"]
    assert ceil["shape"] == [DOC, 128, 256]  # encoder tokens x d_model x d_ff of the tiny model
    assert ceil["float_gflops"] > 0 and ceil["int8_gops"] > 0
    for row in peer_run["results"]:
        assert row["achieved_gflops_per_s"] == pytest.approx(row["gflops_per_doc"] / row["latency_s_median"])
        limit = ceil["int8_gops"] if row["precision"] == "int8" else ceil["float_gflops"]
        assert row["ceiling_fraction"] == pytest.approx(row["achieved_gflops_per_s"] / limit)
        parts = row["step_parts_mb"]
        assert row["step_mb"] == pytest.approx(parts["weights"] + parts["cross"] + parts["self"])
    r = by_config(peer_run)
    assert r["pidec-pid"]["step_parts_mb"]["cross"] < r["pidec-pie"]["step_parts_mb"]["cross"]
    assert r["pidec-pid-int8"]["step_parts_mb"]["weights"] < r["pidec-pid"]["step_parts_mb"]["weights"]
    assert peer_run["model"]["int8"].startswith("int8 (")
    table = format_table(peer_run)
    for word in ("machine ceiling", "GFLOP/s", "%ceil", "MB/step", "pidec-pie vs ct2-pie first tokens agree: True"):
        assert word in table


def test_memory_report_in_the_run(peer_run):
    mem = peer_run["memory"]
    assert mem["budget_bytes"] == 64 * 2**20
    rows = {x["config"]: x for x in mem["rows"]}
    assert set(rows) == {r["config"] for r in peer_run["results"]}
    assert rows["pidec-pid"]["docs_fit"] > rows["pidec-pie"]["docs_fit"] > 0
    assert "memory budget 0.06 GiB" in format_table(peer_run)


def test_cli_memory_only_builds_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("--memory-only must not build a model")

    monkeypatch.setattr(harness, "build_random_model", boom)
    args = ["bench", "--model-size", "base", "--workload", "summ", "--memory-budget", "8GiB", "--memory-only"]
    r = runner.invoke(app, [*args, "--configs", "pidec-pid,pidec-pie,hf-pie"])
    assert r.exit_code == 0, r.output
    assert "memory budget 8.00 GiB" in r.output and "pidec-pid" in r.output and "hf-pie" in r.output
    r = runner.invoke(app, ["bench", "--memory-only"])
    assert r.exit_code == 2 and "--memory-budget" in r.output
    r = runner.invoke(app, ["bench", "--memory-budget", "lots", "--memory-only"])
    assert r.exit_code == 2 and "memory budget 'lots'" in r.output
