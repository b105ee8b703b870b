"""`pidec demo`'s pieces: the tokenizer it trains, and the whole pipeline at toy scale."""

import json

from pidec.demo.run import build_tokenizer, format_result, run_demo
from pidec.tasks import booking as synthetic


def test_tokenizer_round_trips_and_appends_eos(tmp_path):
    from transformers import AutoTokenizer

    train, test = synthetic.make_splits(200, 20, seed=1)
    build_tokenizer(train, tmp_path / "tok", vocab_size=600)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    for ex in test:
        ids = tok(ex.document, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == ex.document  # byte-level BPE: exact, no unknown tokens
        assert len(ids) < len(ex.document.encode()) / 2  # far fewer tokens than bytes
        assert tok(ex.document)["input_ids"] == ids + [1]
        for s in ex.subtasks:
            assert tok.decode(tok(s.target, add_special_tokens=False)["input_ids"]) == s.target


def test_demo_pipeline_at_toy_scale(tmp_path):
    lines = []
    result = run_demo(tmp_path, train_examples=40, test_examples=6, steps=2, batch_tokens=2048, log=lines.append)
    # each stage announces itself, the first one naming the folder it writes to
    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert str(tmp_path) in lines[0]
    # accuracy and speed come from the same held-out documents: the headline is pid's row
    assert result["timed_docs"] == result["test_examples"] == 6
    assert result["test_joint_accuracy"] == result["decoding"][0]["joint_accuracy"]
    assert [r["config"] for r in result["decoding"]] == ["pidec-pid", "pidec-pie", "hf-pie"]
    by = {r["config"]: r for r in result["decoding"]}
    # the same model decoded by pidec and by transformers in pie agrees
    assert by["pidec-pie"]["slot_accuracy"] == by["hf-pie"]["slot_accuracy"]
    assert (tmp_path / "speed.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo.json").read_text())["test_examples"] == 6
    assert "joint accuracy" in format_result(result)


def test_cli_demo_says_where_it_writes_and_shows_progress_off_a_terminal(tmp_path):
    from typer.testing import CliRunner

    from pidec.cli import app

    out = tmp_path / "demo-out"
    args = ["demo", "--output", str(out), "--steps", "2", "--train-examples", "40", "--test-examples", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert err.splitlines()[0] == f"pidec demo: writing data, tokenizer, model, table and plot into {out}/"
    assert "[3/4] training" in err and "[4/4] decoding" in err
    assert "joint accuracy" in result.stdout


def test_tokenizer_training_prints_nothing_on_a_redirected_stdout(tmp_path):
    import subprocess
    import sys

    code = (
        "from pathlib import Path; from pidec.tasks import booking; from pidec.demo.run import build_tokenizer; "
        f"build_tokenizer(booking.make_splits(100, 2, 0)[0], Path({str(tmp_path / 'tok')!r}), vocab_size=400)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # the demo's table is the only thing it prints on stdout
