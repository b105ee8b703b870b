"""`pidec.bench.engines`: pidec's runners decode what the workload asks for, each configuration
name reaches its engine, and a missing peer or a refused int8 model is skipped with its reason."""

import sys

import pytest
import torch

from pidec import checkpoint, packing
from pidec.bench import engines
from pidec.bench.configs import config_shape
from pidec.bench.workloads import WORKLOADS, build_random_model, draw_documents

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    checkpoint.save(build_random_model("tiny"), path)
    return path


def test_pidec_runners_write_the_asked_lengths(folder):
    ours, hf = engines.load_models(folder, CPU, torch.float32, need_hf=False)
    assert hf is None
    d = draw_documents(WORKLOADS["qa"], 1, 0, ours.config.vocab_size, doc_tokens=20, subtasks=3)[0]
    with torch.inference_mode():
        for name in ("pidec-seq", "pidec-pie", "pidec-pid"):
            tokens, cross = engines.RUNNERS[name](ours, None, d, CPU)
            assert [len(t) for t in tokens] == config_shape(name, d).lengths and cross > 0


def test_build_engines_skips_what_cannot_run(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed
    e, skipped = engines.build_engines(folder, tmp_path, ["pidec-pid", "ct2-pie"], device=CPU, dtype="bfloat16")
    assert skipped[0][0] == ["ct2-pie"] and "ctranslate2 is not installed" in skipped[0][1]
    assert e.ct2 == {} and e.packed is False  # bfloat16: nothing to pack
    # int8 on a bfloat16 CPU model goes to torchao; where torchao is missing that is a skip, not a crash
    monkeypatch.setitem(sys.modules, "torchao", None)
    e, skipped = engines.build_engines(folder, tmp_path, ["pidec-pid-int8"], device=CPU, dtype="bfloat16")
    assert e.ours_int8 is None and skipped[0][0] == ["pidec-pid-int8"] and "torchao" in skipped[0][1]


def test_engines_route_int8_names_to_the_int8_model(folder, tmp_path, monkeypatch):
    e, skipped = engines.build_engines(folder, tmp_path, ["pidec-pid", "pidec-pid-int8"], device=CPU, dtype="float32")
    assert skipped == [] and e.packed is packing.available()
    seen = []
    e.ours_int8 = object()  # the runner gets the model its configuration names
    monkeypatch.setitem(engines.RUNNERS, "pidec-pid", lambda m, hf, d, dev: seen.append(m) or ([], None))
    e.run("pidec-pid-int8", None, CPU)
    e.run("pidec-pid", None, CPU)
    assert seen == [e.ours_int8, e.ours]
