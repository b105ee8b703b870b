"""`pidec bench --train`: the layouts train on the same targets; the table reports them."""

import random

import pytest

from pidec.bench.training import format_train_table, items_for, run_train_bench
from pidec.bench.workloads import WORKLOADS, draw_documents


def test_layouts_carry_the_same_targets():
    draws = draw_documents(WORKLOADS["dst"], 2, seed=0, doc_tokens=40, subtasks=5)
    pid = items_for("pid", draws, random.Random(0))
    pie = items_for("pie", draws, random.Random(0))
    for a, b, d in zip(pid, pie, draws):
        assert [r[2] for r in a.rows] == [r[2] for r in b.rows]  # identical target tokens
        assert len(a.enc) == 1 and len(b.enc) == d.k  # pid encodes once, pie K times
        assert [r[1][1:] for r in a.rows] == d.prompts  # pid: the prompt is the decoder prefix


def test_run_train_bench_tiny():
    r = run_train_bench("dst", "tiny", ["pid", "pie"], docs=1, repeats=1, threads=1)
    pid, pie = r["results"]
    assert pid["target_tokens_per_doc"] == pie["target_tokens_per_doc"]
    assert pie["encoder_tokens_per_doc"] > 25 * pid["encoder_tokens_per_doc"]
    assert pie["vs_pie"] == 1.0 and pid["vs_pie"] > 0
    assert "docs/s" in format_train_table(r)
    with pytest.raises(ValueError, match="layout"):
        run_train_bench("dst", "tiny", ["pix"], docs=1)
