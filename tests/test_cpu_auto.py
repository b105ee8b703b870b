"""`dtype="auto"`, the default of `pidec.load` and of every command that loads a model, on
forced feature sets (`PIDEC_CPU_FEATURES`), so that the result does not depend on this CPU:
bf16 where the features say AMX or AVX-512 bf16, float32 otherwise, and the details, the
service's start-up line and the bench header say which and why."""

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

import pidec
from pidec import cpu
from pidec.bench.harness import make_spec
from pidec.cli import app
from pidec.serving.server import describe
from pidec.serving.settings import ServeSettings

from .shared_data import tiny_checkpoint

BF16 = ["amx_bf16,amx_int8,amx_tile,avx2", "avx512_bf16,avx512_vnni,avx2"]
FP32 = ["avx512_vnni,avx512f,avx2", "avx2", "none"]
DOC = "User: a cheap hotel in the north please. System: The Acorn it is."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("auto"), seed=1, max_input_length=40)


@pytest.mark.parametrize("forced", BF16 + FP32)
def test_load_defaults_to_auto_and_says_why(folder, monkeypatch, forced):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, forced)
    want = torch.bfloat16 if forced in BF16 else torch.float32
    m = pidec.load(folder)  # no dtype: auto
    assert m.model.dtype == want
    assert m.dtype_choice.startswith("auto, ") and cpu.ENV_OVERRIDE in m.dtype_choice
    assert ("multiplies bf16 in hardware" in m.dtype_choice) == (want == torch.bfloat16)
    details = m.generate(DOC, ["hotel area"], max_new_tokens=2, return_details=True).to_dict()
    assert details["runtime"] == {"dtype": str(want).removeprefix("torch."), "dtype_choice": m.dtype_choice}
    line = describe(m, ServeSettings(), "ckpt", "http://x").splitlines()[1]
    assert f"dtype {str(want).removeprefix('torch.')} (auto, " in line


def test_named_dtype_is_taken_as_given(folder, monkeypatch):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, BF16[0])
    m = pidec.load(folder, dtype="float32")
    assert m.model.dtype == torch.float32 and m.dtype_choice == "asked for"
    assert pidec.load(folder, dtype=torch.float32).generate(DOC, ["a"], max_new_tokens=1, return_details=True).runtime[
        "dtype_choice"
    ] == ("asked for")


def test_every_model_loading_command_defaults_to_auto():
    assert inspect.signature(pidec.load).parameters["dtype"].default == "auto"
    for name in ("generate", "eval", "run", "serve", "bench"):
        r = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
        assert r.exit_code == 0, r.output
        text = " ".join(r.output.split())
        assert "--dtype" in text and "[default: auto]" in text, name


@pytest.mark.parametrize("forced", [BF16[1], FP32[1]])
def test_generate_command_reports_the_choice(folder, tmp_path, monkeypatch, forced):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, forced)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    args = [
        "generate",
        "--model",
        str(folder),
        "--document",
        str(doc),
        "--prompt",
        "hotel area",
        "--max-new-tokens",
        "2",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    runtime = json.loads(r.stdout)["runtime"]
    assert runtime["dtype"] == ("bfloat16" if forced in BF16 else "float32")
    assert runtime["dtype_choice"].startswith("auto, ")


@pytest.mark.parametrize("forced", [BF16[0], FP32[0]])
def test_bench_spec_resolves_auto_and_keeps_the_reason(monkeypatch, forced):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, forced)
    spec = make_spec("dst", "tiny", None, ["pidec-pid"], 1, 1, "cpu", "auto", None)
    assert spec.dtype == ("bfloat16" if forced in BF16 else "float32")
    assert spec.dtype_reason == cpu.dtype_choice("auto", "cpu") and spec.dtype_reason.startswith("auto, ")
    assert make_spec("dst", "tiny", None, ["pidec-pid"], 1, 1, "cpu", "float32", None).dtype_reason == "asked for"
