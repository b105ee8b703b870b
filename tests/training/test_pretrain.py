"""`pidec pretrain`: raw text read from .txt, .jsonl and .parquet files into span-corruption
examples of the exact T5 shape, a run that writes a checkpoint `pidec train --model` fine-tunes,
exact resume after a kill, and the errors of bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import ByT5Tokenizer

from pidec import span_corruption
from pidec.data import DataReport
from pidec.errors import InputError
from pidec.training import pretraining
from pidec.training.config import TrainConfig

from .test_train import kill_after_steps, pidec, train_losses, write_data

ROOT = Path(__file__).resolve().parents[2]
TOK = ByT5Tokenizer()
WORDS = "the guest house in the north has free parking and a cheap room for three nights near the station".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(6, 20))) for _ in range(n)]


def corpus(folder: Path, n: int = 60) -> Path:
    """A folder with the three kinds of text file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = sentences(n)
    (folder / "a.txt").write_text("\n".join(lines[: n // 3]) + "\n\n")
    with (folder / "b.jsonl").open("w") as f:
        for s in lines[n // 3 : 2 * n // 3]:
            f.write(json.dumps({"text": s, "id": 1}) + "\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": lines[2 * n // 3 :]}), folder / "c.parquet")
    return folder


def items_of(path: Path, inputs_length: int = 64, field: str = "text"):
    report = DataReport(str(path))
    texts = pretraining.read_texts(path, field, report)
    return pretraining.pretrain_items(texts, TOK, inputs_length, 0.15, 3.0, 0, 7, report), report


def test_examples_have_t5s_exact_shape_and_cover_the_text_in_order(tmp_path):
    folder = corpus(tmp_path / "text")
    items, report = items_of(folder)
    assert report.read == report.kept == 60
    shape = span_corruption.lengths(64, 0.15, 3.0)
    full = items[:-1]
    assert shape.inputs <= 64 and all(len(it.enc[0]) == shape.inputs for it in full)  # no padding needed
    assert all(len(it.rows[0][2]) == shape.targets for it in full)
    assert len(items[-1].enc[0]) <= shape.inputs
    assert all(it.rows[0][1] == [0] for it in items)  # the decoder starts from its start token
    # input and target together give back the text: the sentinels say where each span goes
    sentinels = span_corruption.sentinel_ids(TOK)
    stream = []
    for it in items:
        inputs, target = it.enc[0][:-1], it.rows[0][2][:-1]
        spans, current = {}, None
        for t in target:
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        for t in inputs:
            stream += spans[t] if t in sentinels else [t]
    text = "".join(sentences(60))
    dropped = sum(report.skipped.values())
    assert TOK.decode(stream) == text if not dropped else text.startswith(TOK.decode(stream))


def test_a_tasks_documents_are_read_once_each(tmp_path):
    """`--task`: a dialogue's history at one turn, which the next turn's history extends, and a
    document repeated are skipped and counted, so each text is pre-trained on once."""
    docs = ["user: a", "user: a\nsystem: b", "user: a\nsystem: b\nuser: c", "x", "x", "user: a\nsystem: b\nuser: c"]
    docs += ["user: a", "user: a\nsystem: z", "y"]
    lines = [
        json.dumps({"id": str(i), "document": d, "subtasks": [{"prompt": "p", "target": "t"}]})
        for i, d in enumerate(docs)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    report = DataReport("task")
    texts = list(pretraining.task_texts("jsonl", str(tmp_path / "train.jsonl"), report))
    assert texts == ["user: a\nsystem: b\nuser: c", "x", "user: a\nsystem: z", "y"]
    assert (report.read, report.kept) == (9, 4)
    assert report.skipped == {"history the next document extends": 3, "repeated document": 2}


def test_corruption_is_seeded_per_chunk_and_matches_its_settings(tmp_path):
    folder = corpus(tmp_path / "text", n=300)
    a, _ = items_of(folder, inputs_length=128)
    b, _ = items_of(folder, inputs_length=128)
    assert [x.enc for x in a] == [x.enc for x in b] and [x.rows for x in a] == [x.rows for x in b]
    # noise density and mean span length, measured over the examples
    sentinels = set(span_corruption.sentinel_ids(TOK))
    noise = spans = kept = 0
    for it in a[:-1]:
        target, inputs = it.rows[0][2][:-1], it.enc[0][:-1]
        spans += sum(t in sentinels for t in target)
        noise += sum(t not in sentinels for t in target)
        kept += sum(t not in sentinels for t in inputs)
    assert abs(noise / (noise + kept) - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.35


def test_bad_text_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(InputError, match="no text to pre-train on"):
        items_of(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ok\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.txt:1: not UTF-8"):
        items_of(latin)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "some words here"}) + "\n")
    with pytest.raises(InputError, match=r"rows\.jsonl:1: the text field 'text' must be a string \(missing\)"):
        items_of(rows)
    assert items_of(rows, field="body")[1].kept == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine words"}\n{oops\n')
    with pytest.raises(InputError, match=r"broken\.jsonl:2: invalid JSON"):
        items_of(broken)
    with pytest.raises(InputError, match="no such file"):
        items_of(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="no .txt, .jsonl, .parquet files"):
        items_of(tmp_path / "nothing")


def test_settings_are_checked_naming_the_flag(tmp_path):
    base = dict(output=str(tmp_path / "o"), size="tiny", tokenizer="byte", steps=2, objective="span_corruption")
    with pytest.raises(InputError, match="--text: give the text"):
        TrainConfig(**base).check()
    with pytest.raises(InputError, match="--noise-density: must be strictly between 0 and 1"):
        TrainConfig(**base, text="x", noise_density=1.5).check()
    with pytest.raises(InputError, match="--mean-span-length: must be >= 1"):
        TrainConfig(**base, text="x", mean_span_length=0.5).check()
    with pytest.raises(InputError, match="--text: raw text is for `pidec pretrain`"):
        TrainConfig(**{**base, "objective": "tasks"}, text="x").check()


def pretrain_args(text: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--text",
        str(text),
        "--size",
        "tiny",
        "--tokenizer",
        "byte",
        "--max-input-length",
        "64",
        "--batch-tokens",
        "512",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow
def test_pretrain_resumes_exactly_after_a_kill_and_train_fine_tunes_its_checkpoint(tmp_path):
    text = corpus(tmp_path / "text", n=150)
    common = pretrain_args(text, "--steps", "8", "--save-every", "2", "--dropout", "0.1")
    done = pidec(*common, "--output", str(tmp_path / "whole"))
    assert done.returncode == 0, done.stderr
    whole = train_losses(tmp_path / "whole")
    assert [s for s, _ in whole] == list(range(1, 9))
    assert whole[-1][1] < whole[0][1]  # it learns

    killed = tmp_path / "killed"
    kill_after_steps(common, killed, 4)
    assert len(train_losses(killed)) < 8
    resumed = pidec("pretrain", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(killed) == whole

    train, evalf = write_data(tmp_path)
    tuned = pidec(
        "train", "--train", str(train), "--eval", str(evalf), "--model", str(tmp_path / "whole" / "final"),
        "--steps", "2", "--batch-tokens", "1024", "--output", str(tmp_path / "tuned"), "--no-progress",
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert (tmp_path / "tuned" / "final" / "config.json").exists()
