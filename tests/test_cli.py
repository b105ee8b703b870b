"""The command line, run as a user would: a real subprocess for one run, Typer's runner for the rest."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pidec.cli import app

from .shared_data import tiny_checkpoint

runner = CliRunner()
DOC = "User: a cheap hotel in the north please. System: The Acorn it is."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli"), seed=1, max_input_length=40)


@pytest.fixture()
def doc_file(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text(DOC)
    return p


def test_generate_subprocess_prints_json(folder, doc_file):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pidec",
            "generate",
            "--model",
            str(folder),
            "--document",
            str(doc_file),
            "--prompt",
            "hotel area",
            "--prompt",
            "hotel price range",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["outputs"]) == 2 and all(isinstance(o, str) for o in data["outputs"])
    assert data["timings"]["total_ms"] > 0


def test_generate_layouts_stdin_and_prompts_file(folder, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("hotel area\n\nhotel price range\n")
    first = None
    for layout in ("pid", "pie", "seq"):
        r = runner.invoke(
            app,
            [
                "generate",
                "--model",
                str(folder),
                "--document",
                "-",
                "--prompts-file",
                str(pf),
                "--layout",
                layout,
                "--max-new-tokens",
                "2",
                "--num-beams",
                "2",
            ],
            input=DOC,
        )
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        assert len(data["outputs"]) == 2
        first = first or data
    pj = tmp_path / "prompts.json"
    pj.write_text(json.dumps(["hotel area", "hotel price range"]))
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(folder),
            "--document",
            "-",
            "--prompts-file",
            str(pj),
            "--max-new-tokens",
            "2",
            "--num-beams",
            "2",
        ],
        input=DOC,
    )
    assert json.loads(r.stdout)["outputs"] == first["outputs"]


def _err(args, input=None):
    r = runner.invoke(app, args, input=input)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr


def test_generate_bad_input_is_one_clear_line(folder, doc_file, tmp_path):
    base = ["generate", "--model", str(folder), "--document", str(doc_file)]
    assert "no prompts" in _err(base)
    assert "unknown layout 'x'" in _err(base + ["--prompt", "a", "--layout", "x"])
    assert "max_new_tokens must be an integer >= 1" in _err(base + ["--prompt", "a", "--max-new-tokens", "0"])
    assert "prompt 0 is empty or whitespace" in _err(base + ["--prompt", "   "])
    assert "not found" in _err(
        ["generate", "--model", str(folder), "--document", str(tmp_path / "no.txt"), "--prompt", "a"]
    )
    assert "no such checkpoint folder" in _err(
        ["generate", "--model", str(tmp_path / "none"), "--document", str(doc_file), "--prompt", "a"]
    )
    long = tmp_path / "long.txt"
    long.write_text("word " * 100)
    assert "longer than the model's limit of 40" in _err(
        ["generate", "--model", str(folder), "--document", str(long), "--prompt", "a"]
    )
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(folder),
            "--document",
            str(long),
            "--prompt",
            "a",
            "--truncate",
            "right",
            "--max-new-tokens",
            "1",
        ],
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["truncations"][0]["kept_tokens"] == 40
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n   \n")
    assert f"{bad}:2: prompt is whitespace only" in _err(base + ["--prompts-file", str(bad)])
