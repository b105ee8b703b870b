"""pidec.bench.loadtest: the target guard, the workload shapes and the percentiles (the run itself is
exercised against a live server in test_serve)."""

import random

import pytest

from pidec.bench.loadtest import check_url, draw_request, percentile
from pidec.bench.workloads import WORKLOADS

from ..shared_data import T5_TOKENIZER, require


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:8000", "http://127.5.0.1"]
)
def test_loopback_urls_pass(url):
    assert check_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"])
def test_other_hosts_need_allow_remote(url):
    with pytest.raises(ValueError, match="not a loopback address"):
        check_url(url)
    assert check_url(url, allow_remote=True) == url


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://127.0.0.1", "http://"])
def test_malformed_urls(url):
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        check_url(url)


@pytest.mark.parametrize("workload", ["dst", "qa"])
def test_requests_have_the_bench_shapes(workload):
    from pidec.checkpoint import load_tokenizer

    tok = load_tokenizer(require(T5_TOKENIZER))
    w = WORKLOADS[workload]
    rng = random.Random(0)
    for _ in range(3):
        body = draw_request(workload, rng)
        assert len(tok(body["document"])["input_ids"]) == w.doc_tokens  # one token a word, plus EOS
        assert len(body["prompts"]) == len(body["max_new_tokens"]) == w.subtasks
        for p in body["prompts"]:
            assert w.prompt_range[0] <= len(tok(p, add_special_tokens=False)["input_ids"]) <= w.prompt_range[1]
    with pytest.raises(ValueError, match="unknown workload"):
        draw_request("chat", rng)


def test_percentile_is_nearest_rank():
    values = sorted(float(x) for x in range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_soak_script_short_run(tmp_path):
    """scripts/soak.py, bounded: a tiny random model, two short rounds of mixed traffic with faults,
    a retry storm and SIGTERM under load; every promise in its report holds."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out, raw = tmp_path / "soak.md", tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(root / "scripts" / "soak.py"),
        "--random",
        "tiny",
        "--tokenizer",
        str(require(T5_TOKENIZER)),
    ]
    cmd += ["--duration", "12", "--rounds", "2", "--clients", "4", "--max-queue", "4", "--request-timeout", "30"]
    cmd += ["--threads", "1", "--rss-growth", "0.5", "--out", str(out), "--json", str(raw)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    text = out.read_text()
    assert "| round | requests answered |" in text and "| status | server counted | clients received |" in text
    assert "FAIL" not in text and text.count("| PASS") == 8
    assert "self-attention cache per row bounded" in text
    import json

    data = json.loads(raw.read_text())
    assert len(data["rounds"]) == 2 and all(r["answered"] > 0 and r["steps"] > 0 for r in data["rounds"])
    assert all(0 < r["cache_mean"] <= r["cache_max_le"] < float("inf") for r in data["rounds"])
    outcomes = data["outcomes"]
    for kind in ("fault:body_timeout", "fault:invalid_json", "fault:disconnected"):
        assert outcomes.get(kind, 0) >= 1, (kind, outcomes)
    assert outcomes.get("200", 0) > 0 and data["sigterm"]["exit_code"] == 0
