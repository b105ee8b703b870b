"""scripts/bulk_speed.py and scripts/batch_bound.py (issue 15's measurements) on the tiny preset:
the fields file carries dst's answer lengths as budgets, and every configuration makes the tokens
those budgets ask for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO, load_script
from ..shared_data import SHARED, T5_TOKENIZER, require


def _env() -> dict:
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, PIDEC_SHARED=str(SHARED))


def test_fields_carry_dst_answer_lengths(tmp_path):
    require(T5_TOKENIZER)
    from pidec.bench.workloads import WORKLOADS, draw_documents

    build = load_script("bulk_speed").build
    _, corpus, fields = build(tmp_path, "tiny", 3, budgets="dst")
    items = json.loads(fields.read_text())
    lengths = draw_documents(WORKLOADS["dst"], 1, 0)[0].out_lens
    assert [f["max_new_tokens"] for f in items] == lengths
    assert len(items) == 30 and lengths.count(2) == 24 and all(3 <= n <= 10 for n in lengths if n != 2)
    assert len(corpus.read_text().splitlines()) == 3
    _, _, uniform = build(tmp_path, "tiny", 3, budgets="uniform")
    assert uniform != fields and all("max_new_tokens" not in f for f in json.loads(uniform.read_text()))


@pytest.mark.slow
def test_bulk_speed_and_batch_bound_on_tiny(tmp_path):
    require(T5_TOKENIZER)
    out = tmp_path / "bs"
    cmd = [sys.executable, str(REPO / "scripts" / "bulk_speed.py"), "--size", "tiny", "--docs", "2"]
    cmd += ["--configs", "run-w1,loop", "--memory-docs", "", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["budgets"] == "dst" and result["configs"]["loop"]["docs"] == 2
    assert result["ratios"]["run-w1 / loop"] > 0
    budgets = [f["max_new_tokens"] for f in json.loads((out / "fields-30-dst.json").read_text())]
    summary = json.loads((out / "o-w1" / "summary.json").read_text())
    # random weights run every answer to its budget, so the run makes exactly the budgets' tokens
    assert summary["records"] == 2 and summary["errors"] == 0
    assert summary["output_tokens"] == 2 * sum(budgets)

    cmd = [sys.executable, str(REPO / "scripts" / "batch_bound.py"), "--model", str(out / "model-tiny")]
    cmd += ["--corpus", str(out / "corpus-2-512.jsonl"), "--fields", str(out / "fields-30-dst.json")]
    cmd += ["--docs", "2", "--rounds", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bound = json.loads(r.stdout[r.stdout.index("{") :])
    assert bound["docs"] == 2 and bound["budgets"] == budgets
    assert set(bound["seconds"]) == {"loop, budgets", "batch, budgets", "loop, 1 new", "batch, 1 new"}
    assert bound["batch / loop (best against best)"] > 0
