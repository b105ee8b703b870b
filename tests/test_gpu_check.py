"""scripts/gpu_check.py (the GPU checks of issue 18) run in its --dry-run form on the CPU: the
script works and what it reports holds on the CPU (the same tokens under every policy, fewer
host reads with deferred ones). The GPU figures themselves come from a GPU session."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("gpu_check")


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "decode.json"
    report = _script().main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["dry_run"] is True
    for part in ("correctness", "syncs", "speed"):
        assert "error" not in report[part], report[part]
    correct = report["correctness"]
    assert {k: v for k, v in correct.items() if k.endswith("_cpu")} and all(
        v == 1.0 for k, v in correct.items() if k.endswith("_cpu")
    )
    for workload in ("dst", "summ"):
        syncs = report["syncs"][workload]
        every, deferred = syncs["sync_every_1"], syncs[f"sync_every_{report['cuda_sync_every']}"]
        assert every["steps"] == deferred["steps"] > 0
        assert every["syncs"] >= every["steps"] and deferred["syncs"] <= every["syncs"]
    # long answers: reads every 8 steps (and a few when budgets run out), not one a step
    summ = report["syncs"]["summ"]
    assert summ[f"sync_every_{report['cuda_sync_every']}"]["syncs"] < summ["sync_every_1"]["syncs"] / 3
    speed = report["speed"]
    assert set(speed["rows_equal_to_every_step"]) == {"every_step", "deferred"}
    assert all(v == 1.0 for v in speed["rows_equal_to_every_step"].values())
    assert speed["deferred"]["syncs_per_document"] < speed["every_step"]["syncs_per_document"]


def test_gpu_check_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
