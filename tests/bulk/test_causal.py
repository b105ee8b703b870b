"""`pidec run` with a decoder-only checkpoint (a tiny random Llama): every record's answers and
usage equal to `CausalModel.generate` for it alone, templates from the command line, rows over
the limit refused or cut and counted."""

import json

import pytest
import torch
from typer.testing import CliRunner

import pidec
from pidec.bulk import runner
from pidec.bulk.extract import Options
from pidec.bulk.fields import questions
from pidec.bulk.workers import ModelSpec
from pidec.bulk.writers import read_output
from pidec.causal import Template
from pidec.cli import app
from tests.bulk.corpus import FIELDS, records, write_fields, write_jsonl
from tests.causal_tiny import family_for_tests

torch.set_num_threads(1)
LIMIT = 128  # max_input_length: a row of document + prompt
NAMES = [f["name"] for f in FIELDS]
PROMPTS = [f["prompt"] for f in FIELDS]
BUDGETS = [f.get("max_new_tokens", 4) for f in FIELDS]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return family_for_tests("llama", tmp_path_factory)[0]


def test_answers_and_usage_equal_generate_per_record(llama, tmp_path):
    rows = records(11) + [{"id": "long", "document": "cheap hotel " * 60}]
    spec = ModelSpec(str(llama), max_input_length=LIMIT)
    summary = runner.run(
        spec,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out.jsonl",
        questions(fields=FIELDS),
        Options(max_new_tokens=4, batch_tokens=400),
        workers=1,
        window=8,
        display="off",
    )
    out = read_output(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert summary["answered"] == 11 and summary["errors"] == 1
    assert out[-1]["error"]["kind"] == "document_too_long" and f"limit of {LIMIT}" in out[-1]["error"]["message"]
    model = pidec.load(llama, max_input_length=LIMIT)
    for row, rec in zip(rows[:-1], out):
        want = model.generate(row["document"], PROMPTS, max_new_tokens=BUDGETS, return_details=True)
        assert rec["answers"] == dict(zip(NAMES, want.outputs)), row["id"]
        assert rec["usage"] == want.usage, row["id"]
    assert summary["output_tokens"] == sum(r["usage"]["output_tokens"] for r in out[:-1])


def test_a_row_over_the_limit_is_cut_and_counted(llama, tmp_path):
    model = pidec.load(llama, max_input_length=LIMIT)
    doc = "cheap"
    while len(model.tokenizer(doc + " hotel")["input_ids"]) < LIMIT - 4:
        doc += " hotel"  # under the limit alone, over it with the template and a prompt
    rows = [{"id": "near", "document": doc}]
    runner.run(
        ModelSpec(str(llama), max_input_length=LIMIT),
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out.jsonl",
        questions(fields=FIELDS),
        Options(max_new_tokens=4, truncate="left"),
        display="off",
    )
    (rec,) = read_output(tmp_path / "out.jsonl")
    want = model.generate(doc, PROMPTS, max_new_tokens=BUDGETS, truncate="left", return_details=True)
    assert rec["answers"] == dict(zip(NAMES, want.outputs))
    assert rec["truncated_from"] == want.truncations[0].original_tokens > LIMIT


def test_cli_run_with_a_chat_template(llama, tmp_path):
    rows = records(4)
    fields = write_fields(tmp_path / "fields.json")
    args = ["run", "--model", str(llama), "--input", str(write_jsonl(tmp_path / "in.jsonl", rows))]
    args += ["--output", str(tmp_path / "out.jsonl"), "--fields", str(fields), "--progress", "off"]
    res = CliRunner().invoke(app, args + ["--chat-template", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["answered"] == 4
    model = pidec.load(llama)
    for row, rec in zip(rows, read_output(tmp_path / "out.jsonl")):
        want = model.generate(row["document"], PROMPTS, max_new_tokens=BUDGETS, template=Template(chat=True))
        assert rec["answers"] == dict(zip(NAMES, want))
    bad = CliRunner().invoke(app, args[:-2] + ["--output", str(tmp_path / "o2"), "--row-template", "Q:"])
    assert bad.exit_code == 2 and "row_template 'Q:' has no {prompt} field" in bad.output
