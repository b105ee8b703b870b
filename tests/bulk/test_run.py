"""`pidec run` on one machine: formats, fields, ids and order, bad input, resuming, refusing."""

import json
import os
import platform

import pytest
from typer.testing import CliRunner

import pidec
from pidec import allocator
from pidec.bulk import runner
from pidec.bulk.extract import Options
from pidec.bulk.fields import FieldsError, questions
from pidec.bulk.progress import ResumeError
from pidec.bulk.workers import ModelSpec
from pidec.bulk.writers import read_output
from pidec.cli import app

from ..shared_data import tiny_checkpoint
from .corpus import FIELDS, records, write_csv, write_fields, write_jsonl, write_parquet

cli = CliRunner()
GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("bulk"), seed=3, max_input_length=40, eos_boost=2.0)


def run(ckpt, input, output, **kw):
    q = kw.pop("questions", None) or questions(fields=FIELDS)
    opts = kw.pop("options", None) or Options(max_new_tokens=4, batch_tokens=kw.pop("batch_tokens", 200))
    return runner.run(ModelSpec(str(ckpt)), input, output, q, opts, display="off", **kw)


def test_answers_match_model_generate_in_input_order(ckpt, tmp_path):
    rows = records(37)
    summary = run(ckpt, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", window=16)
    out = read_output(tmp_path / "out.jsonl")
    assert [r.get("id") for r in out] == [r["id"] for r in rows]  # every id once, in input order
    assert summary["records"] == summary["answered"] == 37 and summary["errors"] == 0
    model = pidec.load(ckpt)
    prompts = [f["prompt"] for f in FIELDS]
    budgets = [f.get("max_new_tokens", 4) for f in FIELDS]
    for row, rec in zip(rows, out):
        want = model.generate(row["document"], prompts, max_new_tokens=budgets, return_details=True)
        assert rec["answers"] == dict(zip([f["name"] for f in FIELDS], want.outputs))
        assert rec["usage"]["output_tokens"] == want.usage["output_tokens"]
        assert rec["usage"]["prompt_tokens"] == want.usage["prompt_tokens"]
        assert rec["usage"]["document_tokens"] == want.usage["document_tokens"]
    assert summary["output_tokens"] == sum(r["usage"]["output_tokens"] for r in out)
    assert not list(tmp_path.glob("*.partial"))


def test_three_input_formats_and_parquet_output_agree(ckpt, tmp_path):
    rows = records(12)
    want = None
    for name, write in (("a.jsonl", write_jsonl), ("b.csv", write_csv), ("c.parquet", write_parquet)):
        for out_ext in ("jsonl", "parquet"):
            out = tmp_path / f"out-{name}.{out_ext}"
            run(ckpt, write(tmp_path / name, rows), out, window=8)
            got = read_output(out)
            want = want or got
            assert got == want, (name, out_ext)
    assert [r["id"] for r in want] == [r["id"] for r in rows]


def test_folder_of_shards_to_folder_of_outputs(ckpt, tmp_path):
    src = tmp_path / "corpus"
    (src / "part2").mkdir(parents=True)
    write_jsonl(src / "a.jsonl", records(5))
    write_csv(src / "part2" / "b.csv", records(4, start=5))
    write_parquet(src / "c.parquet", records(6, start=9))
    (src / "_SUCCESS").write_text("")
    summary = run(ckpt, src, tmp_path / "out", output_format="parquet")
    assert summary["records"] == 15
    outs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet"))
    assert outs == ["a.parquet", "c.parquet", "part2/b.parquet"]
    assert [r["id"] for r in read_output(tmp_path / "out" / "part2" / "b.parquet")] == [f"doc-{i}" for i in range(5, 9)]


def test_prompts_from_the_record_and_from_the_command_line(ckpt, tmp_path):
    rows = [
        {"id": 1, "document": "a cheap hotel in the north", "prompts": ["hotel area", "hotel price range"]},
        {"id": 2, "document": "a taxi to the station", "subtasks": [{"prompt": "taxi destination", "target": "x"}]},
    ]
    run(ckpt, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", questions=questions())
    out = read_output(tmp_path / "out.jsonl")
    model = pidec.load(ckpt)
    assert out[0]["id"] == "1" and out[0]["answers"] == model.generate(rows[0]["document"], rows[0]["prompts"], 4)
    assert out[1]["answers"] == model.generate(rows[1]["document"], ["taxi destination"], 4)
    r = cli.invoke(
        app,
        ["run", "--model", str(ckpt), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o2.jsonl")]
        + ["--prompt", "hotel area", "--max-new-tokens", "4", "--progress", "off"],
    )
    assert r.exit_code == 0, r.output
    assert [x["answers"] for x in read_output(tmp_path / "o2.jsonl")] == [
        model.generate(row["document"], ["hotel area"], 4) for row in rows
    ]


def test_bad_records_are_counted_with_clear_messages_and_the_run_goes_on(ckpt, tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "ok-1", "document": "a cheap hotel", "prompts": ["hotel area"]}),
        "{not json",
        json.dumps({"document": "no id here"}),
        json.dumps({"id": "no-doc"}),
        json.dumps({"id": "empty", "document": "   "}),
        json.dumps({"id": "long", "document": "word " * 80, "prompts": ["hotel area"]}),
        json.dumps({"id": "blank", "document": "a hotel", "prompts": ["hotel area", "  "]}),
        json.dumps({"id": "noprompts", "document": "a hotel"}),
        "",
        json.dumps({"id": "ok-2", "document": "a taxi", "prompts": ["taxi destination"]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    s = runner.run(
        ModelSpec(str(ckpt)), path, tmp_path / "out.jsonl", questions(), Options(max_new_tokens=3), display="off"
    )
    out = read_output(tmp_path / "out.jsonl")
    assert len(out) == 9 and s["records"] == 9 and s["answered"] == 2 and s["errors"] == 7
    assert s["errors_by_kind"] == {
        "blank_prompt": 1,
        "document_too_long": 1,
        "empty_document": 1,
        "malformed_line": 1,
        "missing_document": 1,
        "missing_id": 1,
        "no_prompts": 1,
    }
    errors = {r["error"]["kind"]: r for r in out if "error" in r}
    assert errors["malformed_line"]["error"]["message"].startswith(f"{path}:2: invalid JSON")
    assert errors["missing_id"]["error"]["message"] == f"{path}:3: no 'id' (the record's id)"
    assert (
        errors["missing_document"]["id"] == "no-doc" and f"{path}:4" in errors["missing_document"]["error"]["message"]
    )
    assert errors["empty_document"]["id"] == "empty"
    assert "81 tokens, over the model's limit of 40" in errors["document_too_long"]["error"]["message"]
    assert "--truncate" in errors["document_too_long"]["error"]["message"]
    assert "prompt 1 is empty" in errors["blank_prompt"]["error"]["message"]
    assert [r["id"] for r in out if "answers" in r] == ["ok-1", "ok-2"]
    assert [r.get("id") for r in out] == [
        "ok-1", None, None, "no-doc", "empty", "long", "blank", "noprompts", "ok-2"
    ]  # fmt: skip


def test_truncate_is_counted(ckpt, tmp_path):
    rows = [{"id": "long", "document": "word " * 80, "prompts": ["hotel area"]}]
    s = runner.run(
        ModelSpec(str(ckpt)),
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out.jsonl",
        questions(),
        Options(max_new_tokens=3, truncate="left"),
        display="off",
    )
    (rec,) = read_output(tmp_path / "out.jsonl")
    assert s["truncated"] == 1 and rec["truncated_from"] == 81 and rec["usage"]["document_tokens"] == 40


def _cli_err(args):
    r = cli.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr


def test_on_error_fail_and_fields_file_errors_stop_the_run(ckpt, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", records(3) + [{"id": "e", "document": ""}])
    base = ["run", "--model", str(ckpt), "--input", str(path), "--progress", "off"]
    err = _cli_err(base + ["--output", str(tmp_path / "o1"), "--prompt", "a", "--on-error", "fail"])
    assert f"{path}:4: id e: 'document' is empty [empty_document; --on-error fail stops here]" in err
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"name": "area", "prompt": "a"}, {"name": "area", "prompt": "b"}]))
    assert f"{dup}: field 'area': duplicate name" in _cli_err(
        base + ["--output", str(tmp_path / "o2"), "--fields", str(dup)]
    )
    missing = tmp_path / "missing.yaml"
    missing.write_text("- name: area\n  prompt: hotel area\n- name: price\n  max_new_tokens: 4\n")
    assert f"{missing}: field 'price': missing prompt" in _cli_err(
        base + ["--output", str(tmp_path / "o3"), "--fields", str(missing)]
    )
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # stopped before it started
    assert "prompt 0 is empty" in _cli_err(base + ["--output", str(tmp_path / "o4"), "--prompt", " "])


def test_yaml_fields_file(tmp_path):
    y = tmp_path / "f.yaml"
    y.write_text("fields:\n  - name: area\n    prompt: hotel area\n    max_new_tokens: 4\n    num_beams: 2\n")
    (f,) = questions(fields_file=y).fields
    assert (f.name, f.prompt, f.max_new_tokens, f.num_beams) == ("area", "hotel area", 4, 2)
    y.write_text("- name: area\n  prompt: hotel area\n  max_new_tokens: 0\n")
    with pytest.raises(FieldsError, match="field 'area': max_new_tokens must be an integer >= 1"):
        questions(fields_file=y)


def test_rerun_is_a_no_op_and_a_changed_model_or_fields_refuses(ckpt, tmp_path, tmp_path_factory):
    path = write_jsonl(tmp_path / "in.jsonl", records(9))
    out = tmp_path / "out"
    first = run(ckpt, path, out)
    before = (out / "in.jsonl").read_bytes()
    again = run(ckpt, path, out)
    assert again["resumed"] and again["records_this_run"] == 0 and again["records"] == first["records"] == 9
    assert (out / "in.jsonl").read_bytes() == before
    with pytest.raises(ResumeError, match="the fields or prompts changed"):
        run(ckpt, path, out, questions=questions(fields=FIELDS[:2]))
    other = tiny_checkpoint(tmp_path_factory.mktemp("other"), seed=4, max_input_length=40)
    with pytest.raises(ResumeError, match="the model changed"):
        run(other, path, out)
    with pytest.raises(ResumeError, match=r"decoding options changed \(layout: 'pid' -> 'pie'\)"):
        run(ckpt, path, out, options=Options(layout="pie", max_new_tokens=4))
    with pytest.raises(ResumeError, match="no progress file says which run wrote it"):
        (tmp_path / "o2").mkdir()
        (tmp_path / "o2" / "in.jsonl").write_text("")
        run(ckpt, path, tmp_path / "o2")
    run(ckpt, path, out, questions=questions(fields=FIELDS[:2]), overwrite=True)
    assert set(read_output(out)[0]["answers"]) == {"area", "price"}


def test_limit_and_json_summary(ckpt, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", records(12))
    r = cli.invoke(
        app,
        ["run", "--model", str(ckpt), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]
        + [
            "--fields",
            str(write_fields(tmp_path / "f.json")),
            "--limit",
            "5",
            "--json-summary",
            str(tmp_path / "s.json"),
        ]
        + ["--progress", "log"],
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["records"] == 5 and s["documents_per_s"] > 0 and json.loads(r.stdout) == s
    assert s["malloc"] == allocator.batch_setting()
    if GLIBC and not any(os.environ.get(v) for v in allocator.USER_MALLOC_VARIABLES):
        assert s["malloc"].startswith("malloc: freed blocks kept for reuse (mmap threshold 256 MiB")
    assert "pidec run: 5 records, 5 answered, 0 errors" in r.stderr
    assert [x["id"] for x in read_output(tmp_path / "o.jsonl")] == [f"doc-{i}" for i in range(5)]
    # glibc's own malloc thresholds: the same answers; an unknown setting is refused before loading
    args = ["run", "--model", str(ckpt), "--input", str(path), "--fields", str(tmp_path / "f.json"), "--limit", "5"]
    r = cli.invoke(app, args + ["--output", str(tmp_path / "d.jsonl"), "--malloc", "default", "--progress", "off"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d.jsonl").read_bytes() == (tmp_path / "o.jsonl").read_bytes()
    r = cli.invoke(app, args + ["--output", str(tmp_path / "x.jsonl"), "--malloc", "jemalloc"])
    assert r.exit_code != 0 and "--malloc 'jemalloc': expected keep or default" in r.output
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.slow  # two worker processes each import torch and load the model
def test_workers_two_match_workers_one(ckpt, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", records(40))
    one = run(ckpt, path, tmp_path / "one.jsonl", window=8, batch_tokens=64)
    two = run(ckpt, path, tmp_path / "two.jsonl", window=8, batch_tokens=64, workers=2)
    assert one["records"] == two["records"] == 40 and two["workers"] == 2
    if GLIBC and not any(os.environ.get(v) for v in allocator.USER_MALLOC_VARIABLES):  # set in the workers
        assert two["malloc"].startswith("malloc: freed blocks kept for reuse")
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()


def test_log_lines_without_a_terminal_say_rate_and_eta():
    import io

    from pidec.bulk.report import Display

    stream = io.StringIO()
    shown = Display(total=100, initial=20, mode="auto", log_every=0.0, stream=stream)
    assert shown.mode == "log"  # not a terminal
    shown.t0 -= 10.0  # ten seconds in
    shown.update(30, 600)
    line = stream.getvalue().strip()
    assert line.startswith("pidec run: 50/100 documents, 3.00 documents/s, 60 output tokens/s, ETA 17s"), line
