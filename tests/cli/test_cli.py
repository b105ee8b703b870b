"""The command line, run as a user would: a real subprocess for one run, Typer's runner for the rest."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pidec.cli import app

from ..shared_data import tiny_checkpoint

runner = CliRunner()
DOC = "User: a cheap hotel in the north please. System: The Acorn it is."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli"), seed=1, max_input_length=40)


def generate_args(folder, document, *extra) -> list[str]:
    """`pidec generate --model FOLDER --document DOCUMENT EXTRA...` as arguments."""
    return ["generate", "--model", str(folder), "--document", str(document), *extra]


def generate(folder, document, *extra, input=None):
    """`pidec generate` through Typer's runner."""
    return runner.invoke(app, generate_args(folder, document, *extra), input=input)


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
            *generate_args(folder, doc_file, "--prompt", "hotel area", "--prompt", "hotel price range"),
            *("--max-new-tokens", "3"),
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
    budget = ["--max-new-tokens", "2", "--num-beams", "2"]
    for layout in ("pid", "pie", "seq"):
        r = generate(folder, "-", "--prompts-file", str(pf), "--layout", layout, *budget, input=DOC)
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        assert len(data["outputs"]) == 2
        first = first or data
    pj = tmp_path / "prompts.json"
    pj.write_text(json.dumps(["hotel area", "hotel price range"]))
    r = generate(folder, "-", "--prompts-file", str(pj), *budget, input=DOC)
    assert json.loads(r.stdout)["outputs"] == first["outputs"]


def _err(args, input=None):
    r = runner.invoke(app, args, input=input)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr


def test_generate_bad_input_is_one_clear_line(folder, doc_file, tmp_path):
    base = generate_args(folder, doc_file)
    assert "no prompts" in _err(base)
    assert "'x' is not one of 'pid', 'pie', 'seq'" in _err(base + ["--prompt", "a", "--layout", "x"])
    assert "max_new_tokens must be an integer >= 1" in _err(base + ["--prompt", "a", "--max-new-tokens", "0"])
    assert "prompt 0 is empty or whitespace" in _err(base + ["--prompt", "   "])
    assert "not found" in _err(generate_args(folder, tmp_path / "no.txt", "--prompt", "a"))
    assert "no such checkpoint folder" in _err(generate_args(tmp_path / "none", doc_file, "--prompt", "a"))
    long = tmp_path / "long.txt"
    long.write_text("word " * 100)
    assert "longer than the model's limit of 40" in _err(generate_args(folder, long, "--prompt", "a"))
    r = generate(folder, long, "--prompt", "a", "--truncate", "right", "--max-new-tokens", "1")
    assert r.exit_code == 0 and json.loads(r.stdout)["truncations"][0]["kept_tokens"] == 40
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n   \n")
    assert f"{bad}:2: prompt is whitespace only" in _err(base + ["--prompts-file", str(bad)])


# -- hostile input and first-hour mistakes (issues 19 and 20): one line, exit code 2 ----------


def _one_line(args, match, input=None):
    err = _err(args, input)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert match in err, err
    return err


def test_option_errors_are_one_line(folder, doc_file):
    base = generate_args(folder, doc_file, "--prompt", "a")
    _one_line(base + ["--max-new-tokens", "1e30"], "--max-new-tokens")
    _one_line(["generate", "--document", str(doc_file), "--prompt", "a"], "Missing option '--model'")
    _one_line(base + ["--bogus"], "No such option: --bogus")


def test_huge_max_new_tokens_is_refused_before_allocating(folder, doc_file):
    base = generate_args(folder, doc_file, "--prompt", "a")
    _one_line(base + ["--max-new-tokens", "1000000000"], "max_new_tokens=1000000000: 1 row(s) x 1 beam(s) would need")


@pytest.mark.parametrize("device, match", [("foo", "device 'foo': not a device name"), ("cuda:7", "device 'cuda:7'")])
def test_unknown_device_is_one_line(folder, doc_file, device, match):
    _one_line(generate_args(folder, doc_file, "--prompt", "a", "--device", device), match)


def _broken_copy(folder, tmp_path, name):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / name))


@pytest.mark.parametrize(
    "config, match",
    [
        ("[1, 2]", "found a JSON array"),
        (b"\x00\x01\xff binary", "not UTF-8 text"),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
        ("num_layers=2.5", "config num_layers must be an integer, got 2.5"),
        ("num_layers=1000000", "config.json num_layers=1000000, but the weights hold 2 encoder layers"),
    ],
    ids=["array", "binary", "deeply-nested", "non-integer-size", "absurd-size"],
)
def test_broken_config_is_one_line(folder, doc_file, tmp_path, config, match):
    bad = _broken_copy(folder, tmp_path, "bad")
    if isinstance(config, str) and config.startswith("num_layers="):
        cfg = json.loads((bad / "config.json").read_text())
        cfg["num_layers"] = json.loads(config.split("=")[1])
        (bad / "config.json").write_text(json.dumps(cfg))
    else:
        (bad / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    _one_line(generate_args(bad, doc_file, "--prompt", "a"), match)


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_integer_weights_are_one_line(folder, doc_file, tmp_path, dtype):
    import torch
    from safetensors.torch import load_file, save_file

    bad = _broken_copy(folder, tmp_path, "w")
    sd = load_file(str(bad / "model.safetensors"))
    sd["shared.weight"] = sd["shared.weight"].to(getattr(torch, dtype))
    save_file(sd, str(bad / "model.safetensors"))
    _one_line(
        generate_args(bad, doc_file, "--prompt", "a"),
        "tensor shared.weight is stored as",
    )


def test_missing_tokenizer_json_is_one_line_not_garbage(folder, doc_file, tmp_path):
    bad = _broken_copy(folder, tmp_path, "t")
    (bad / "tokenizer.json").unlink()  # tokenizer_config.json alone: transformers would build 104 tokens
    _one_line(generate_args(bad, doc_file, "--prompt", "a"), "no vocabulary")


def test_mistyped_local_path_never_goes_to_the_hub(doc_file, tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    _one_line(
        generate_args("runs/nope", doc_file, "--prompt", "a"),
        "runs/nope: no such checkpoint folder",
    )


def test_run_folder_as_model_names_its_checkpoints(folder, doc_file, tmp_path):
    import shutil

    run = tmp_path / "prod"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    shutil.copytree(folder, run / "final")
    shutil.copytree(folder, run / "best")
    err = _one_line(generate_args(run, doc_file, "--prompt", "a"), "training run folder")
    assert f"{run}/final" in err and f"{run}/best" in err


def test_json_output_ends_with_a_newline(folder, doc_file, tmp_path):
    r = runner.invoke(app, generate_args(folder, doc_file, "--prompt", "a", "--max-new-tokens", "1"))
    assert r.exit_code == 0 and r.stdout.endswith("}\n")
    data = tmp_path / "x.jsonl"
    data.write_text(
        json.dumps({"id": "a", "document": DOC, "subtasks": [{"prompt": "area", "target": "north"}]}) + "\n"
    )
    r = runner.invoke(
        app, ["eval", "--task", "jsonl", "--data", str(data), "--model", str(folder), "--max-new-tokens", "1"]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("}\n")


def test_unknown_split_names_the_splits(folder, tmp_path):
    data = tmp_path / "x.jsonl"
    data.write_text(
        json.dumps({"id": "a", "document": DOC, "subtasks": [{"prompt": "area", "target": "north"}]}) + "\n"
    )
    args = ["eval", "--task", "jsonl", "--data", str(data), "--model", str(folder), "--split", "banana"]
    _one_line(args, "--split 'banana': task jsonl has the splits train, dev, test")
