"""`pidec run` killed with SIGKILL in the middle of a shard, then started again with the same
command: the output is byte for byte the output of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pidec.bulk.writers import read_output

from ..shared_data import tiny_checkpoint
from .corpus import records, write_fields, write_jsonl, write_parquet

pytestmark = pytest.mark.slow  # three runs of the command line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("resume"), seed=5, max_input_length=40, eos_boost=2.0)


def command(ckpt, src, out, fields, *extra):
    return [sys.executable, "-m", "pidec", "run", "--model", str(ckpt), "--input", str(src), "--output", str(out)] + [
        "--fields", str(fields), "--max-new-tokens", "4", "--window", "8", "--batch-tokens", "256", "--progress", "off",
        *extra,
    ]  # fmt: skip


def env():
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    # one thread: the model is tiny, and threads fighting over a busy machine's cores cost more than they save
    return os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_resume_after_sigkill_mid_shard_equals_an_uninterrupted_run(ckpt, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    write_jsonl(src / "a.jsonl", records(200))
    write_parquet(src / "b.parquet", records(30, start=200))
    fields = write_fields(tmp_path / "fields.json")
    whole = tmp_path / "whole"
    done = subprocess.run(command(ckpt, src, whole, fields), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(ckpt, src, out, fields), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = out / "_progress.json"
    deadline = time.monotonic() + 600
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = json.loads(progress.read_text())
        except (OSError, json.JSONDecodeError):
            time.sleep(0.02)
            continue
        if state["shards"]["a.jsonl"]["done"] >= 16:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = json.loads(progress.read_text())
    shard = state["shards"]["a.jsonl"]
    assert 16 <= shard["done"] < 200 and not shard["complete"]
    assert not (out / "a.jsonl").exists() and (out / "a.jsonl.partial").exists()
    with (out / "a.jsonl.partial").open("ab") as f:  # a window half written when the run died
        f.write(b'{"id": "doc-99999", "answers": {"ar')

    again = subprocess.run(command(ckpt, src, out, fields), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["resumed"] and summary["records"] == 230 and summary["records_this_run"] == 230 - shard["done"]
    for name in ("a.jsonl", "b.jsonl"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    ids = [r["id"] for r in read_output(out)]
    assert ids == [f"doc-{i}" for i in range(230)]  # none lost, none twice
    assert not list(out.glob("*.partial"))

    # killed after the shard was renamed but before the progress file said so: finished on resume
    state = json.loads(progress.read_text())
    state["shards"]["b.parquet"]["complete"] = False
    progress.write_text(json.dumps(state))
    third = subprocess.run(
        command(ckpt, src, out, fields, "--resume"), env=env(), capture_output=True, text=True, timeout=600
    )
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["records_this_run"] == 0
    assert (out / "b.jsonl").read_bytes() == (whole / "b.jsonl").read_bytes()
