"""The data layer (schema, JSONL reading, checking) and the input errors of `pidec train`.

Every error must name where it happened: the file and line for malformed JSONL, the example id
and the reason for unusable examples, the option for bad command-line settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pidec.cli import app
from pidec.data import DataError, DataReport, Example, Subtask, check, read_jsonl, write_jsonl
from pidec.errors import InputError

runner = CliRunner()

GOOD = {"id": "a", "document": "the hotel is in the north", "subtasks": [{"prompt": "area", "target": "north"}]}


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts are dumped, strings are written as they are."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def good(i) -> dict:
    return GOOD | {"id": f"ex{i}"}


def read_error(tmp_path: Path, bad, line: int = 2) -> str:
    """Put `bad` on line `line` (after good lines) and return the DataError's message, which must
    name the file and that line."""
    path = write_lines(tmp_path / "data.jsonl", [good(i) for i in range(line - 1)] + [bad])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: "), message
    return message


@pytest.fixture(scope="module")
def byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


# -- read_jsonl: malformed lines ----------------------------------------------------------------


def test_data_error_is_an_input_error():
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)


def test_malformed_json_names_file_and_line(tmp_path):
    message = read_error(tmp_path, '{"document": "x", "subtasks": [', line=3)
    assert "invalid JSON" in message and "column" in message


def test_malformed_json_line_number_counts_blank_lines(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good(0), "", "   ", "{not json"])
    with pytest.raises(DataError, match=rf"^{path}:4: invalid JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(("value", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "NoneType")])
def test_non_object_line(tmp_path, value, kind):
    message = read_error(tmp_path, value)
    assert f"expected a JSON object, got {kind}" in message


@pytest.mark.parametrize(
    ("document", "expect"),
    [
        (None, "'document' must be a string (missing)"),
        (7, "'document' must be a string (int)"),
        (["a"], "'document' must be a string (list)"),
        ("", "'document' is empty"),
        ("  \n\t", "'document' is empty"),
    ],
)
def test_bad_document(tmp_path, document, expect):
    obj = {"id": "x", "subtasks": [{"prompt": "p", "target": "t"}]}
    if document is not None:
        obj["document"] = document
    assert expect in read_error(tmp_path, obj)


def test_document_null_is_missing(tmp_path):
    assert "'document' must be a string (missing)" in read_error(tmp_path, GOOD | {"id": "x", "document": None})


@pytest.mark.parametrize(
    ("subtasks", "expect"),
    [
        ("MISSING", "'subtasks' must be a list (missing)"),
        ({"prompt": "p"}, "'subtasks' must be a list (dict)"),
        ("p", "'subtasks' must be a list (str)"),
    ],
)
def test_subtasks_not_a_list(tmp_path, subtasks, expect):
    obj = {"id": "x", "document": "d"}
    if subtasks != "MISSING":
        obj["subtasks"] = subtasks
    assert expect in read_error(tmp_path, obj)


@pytest.mark.parametrize("item", ["area", 3, ["area", "north"], None])
def test_subtask_not_an_object(tmp_path, item):
    obj = GOOD | {"id": "x", "subtasks": [{"prompt": "p", "target": "t"}, item]}
    assert "subtasks[1] must be an object" in read_error(tmp_path, obj)


def test_unknown_top_level_fields(tmp_path):
    message = read_error(tmp_path, GOOD | {"id": "x", "text": "?", "answers": []})
    assert "unknown field(s) answers, text" in message


def test_unknown_subtask_field(tmp_path):
    obj = GOOD | {"id": "x", "subtasks": [{"prompt": "p", "target": "t"}, {"prompt": "q", "answer": "t"}]}
    message = read_error(tmp_path, obj)
    assert "subtasks[1] has unknown field(s) answer" in message


@pytest.mark.parametrize("prompt", ["", "   ", None, 5])
def test_empty_or_missing_prompt(tmp_path, prompt):
    sub = {"target": "t"} if prompt is None else {"prompt": prompt, "target": "t"}
    obj = GOOD | {"id": "x", "subtasks": [sub]}
    assert "subtasks[0].prompt must be a non-empty string" in read_error(tmp_path, obj)


@pytest.mark.parametrize(("target", "kind"), [(3, "int"), (["a"], "list"), (True, "bool"), ({"v": 1}, "dict")])
def test_non_string_target(tmp_path, target, kind):
    obj = GOOD | {"id": "x", "subtasks": [{"prompt": "p", "target": "ok"}, {"prompt": "q", "target": target}]}
    assert f"subtasks[1].target must be a string, got {kind}" in read_error(tmp_path, obj)


@pytest.mark.parametrize(("value", "kind"), [(True, "bool"), (1.5, "float"), (["a"], "list")])
def test_bad_id_type(tmp_path, value, kind):
    assert f"'id' must be a string, got {kind}" in read_error(tmp_path, GOOD | {"id": value})


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good(1), good(2), "", good(3), good(2)])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value) == f"{path}:5: duplicate id 'ex2' (first on line 2)"


def test_int_and_string_ids_are_the_same_id(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD | {"id": 7}, GOOD | {"id": "7"}])
    with pytest.raises(DataError, match=rf"^{path}:2: duplicate id '7' \(first on line 1\)"):
        read_jsonl(path)


# -- read_jsonl: files and good lines -----------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"data file {path} not found"):
        read_jsonl(path)


def test_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", "  \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value) == f"{path}: no examples"


def test_blank_lines_allowed_and_ids_default_to_line_number(tmp_path):
    lines = [
        "",
        {"document": "first doc", "subtasks": [{"prompt": "p1", "target": "t1"}]},
        "   ",
        {"id": "named", "document": "second doc", "subtasks": [{"prompt": "p2"}]},
        {"document": "third doc", "subtasks": []},
        "",
    ]
    path = write_lines(tmp_path / "data.jsonl", lines)
    examples = read_jsonl(path)
    assert [e.id for e in examples] == ["2", "named", "5"]
    assert all(isinstance(e.id, str) for e in examples)
    assert examples[0] == Example("2", "first doc", [Subtask("p1", "t1")])
    assert examples[1].subtasks == [Subtask("p2", None)]  # a missing target is check()'s business
    assert examples[2].subtasks == []  # so is an empty subtask list
    assert examples[0].prompts == ["p1"] and examples[0].targets == ["t1"]


def test_int_id_becomes_string(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD | {"id": 12}])
    assert read_jsonl(path)[0].id == "12"


def test_crlf_and_unicode_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    obj = {"id": "ü", "document": "Zürich — 東京", "subtasks": [{"prompt": "città", "target": "naïve"}]}
    path.write_bytes((json.dumps(obj, ensure_ascii=False) + "\r\n").encode("utf-8"))
    [ex] = read_jsonl(path)
    assert ex.document == "Zürich — 東京" and ex.targets == ["naïve"] and ex.id == "ü"


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"document": "caf\xe9", "subtasks": []}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: "):
        read_jsonl(path)


# -- write_jsonl ------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    examples = [
        Example("a", "Zürich doc\nwith a newline", [Subtask("p1", "t1"), Subtask("p2", None)]),
        Example("b", 'quotes " and \\ backslash', [Subtask("東京?", "")]),
        Example("c", "no subtasks here", []),
    ]
    path = tmp_path / "out.jsonl"
    write_jsonl(examples, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert "Zürich" in lines[0]  # written as UTF-8, not escaped
    assert "target" not in json.loads(lines[0])["subtasks"][1]  # None is left out, not null
    assert json.loads(lines[1])["subtasks"][0] == {"prompt": "東京?", "target": ""}
    assert read_jsonl(path) == examples
    write_jsonl(read_jsonl(path), tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text(encoding="utf-8") == path.read_text(encoding="utf-8")


def test_to_dict():
    ex = Example("x", "d", [Subtask("p", "t"), Subtask("q")])
    assert ex.to_dict() == {"id": "x", "document": "d", "subtasks": [{"prompt": "p", "target": "t"}, {"prompt": "q"}]}


# -- check ------------------------------------------------------------------------------------


def ok(i: str) -> Example:
    return Example(i, f"document {i}", [Subtask("p", "abc"), Subtask("q", "de")])


NO_SUBTASKS = Example("empty", "document", [])
NO_TARGET = Example("untargeted", "document", [Subtask("p", "x"), Subtask("q", None)])
LONG = Example("long", "document", [Subtask("p", "ab"), Subtask("q", "abcdefgh")])  # 8 bytes + EOS = 9


def test_check_keeps_good_examples(byte_tokenizer):
    examples = [ok("1"), ok("2")]
    kept, report = check(examples, "train.jsonl", byte_tokenizer, max_target_tokens=4)
    assert kept == examples
    assert isinstance(report, DataReport)
    assert (report.source, report.read, report.kept, report.skipped, report.truncated) == ("train.jsonl", 2, 2, {}, 0)
    assert report.summary() == "train.jsonl: 2 of 2 examples kept"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (NO_SUBTASKS, "no subtasks"),
        (NO_TARGET, "subtasks[1] has no target"),
        (LONG, "a target is 9 tokens with EOS, over the limit of 8"),
    ],
)
def test_check_error_names_example_and_reason(byte_tokenizer, bad, reason):
    with pytest.raises(DataError) as e:
        check([ok("1"), bad, ok("2")], "train.jsonl", byte_tokenizer, max_target_tokens=8, on_bad="error")
    message = str(e.value)
    assert message.startswith(f"train.jsonl: example {bad.id!r}: {reason}"), message
    assert "on_bad='skip'" in message


def test_check_default_is_error(byte_tokenizer):
    with pytest.raises(DataError, match="example 'empty': no subtasks"):
        check([ok("1"), NO_SUBTASKS], "src")


def test_check_target_limit_boundary(byte_tokenizer):
    """ByT5: one token a byte, plus EOS. 'abcdefgh' is 9 tokens: the limit 9 accepts it, 8 does not."""
    kept, _ = check([LONG], "src", byte_tokenizer, max_target_tokens=9)
    assert kept == [LONG]
    with pytest.raises(DataError, match="9 tokens with EOS, over the limit of 8"):
        check([LONG], "src", byte_tokenizer, max_target_tokens=8)
    # multi-byte characters count in bytes: 'é' is two bytes, so 'éé' is 5 tokens with EOS
    accented = Example("acc", "d", [Subtask("p", "éé")])
    with pytest.raises(DataError, match="example 'acc': a target is 5 tokens with EOS, over the limit of 4"):
        check([accented], "src", byte_tokenizer, max_target_tokens=4)


def test_check_without_tokenizer_or_limit_skips_length_check(byte_tokenizer):
    assert check([LONG], "src", None, max_target_tokens=2)[0] == [LONG]
    assert check([LONG], "src", byte_tokenizer, max_target_tokens=None)[0] == [LONG]


def test_check_missing_target_allowed_when_not_required(byte_tokenizer):
    kept, report = check([NO_TARGET], "src", byte_tokenizer, max_target_tokens=4, require_target=False)
    assert kept == [NO_TARGET] and report.kept == 1
    # an example without subtasks is unusable either way
    with pytest.raises(DataError, match="no subtasks"):
        check([NO_SUBTASKS], "src", require_target=False)


def test_check_skip_counts_by_reason(byte_tokenizer):
    examples = [ok("1"), NO_SUBTASKS, LONG, ok("2"), NO_TARGET, Example("empty2", "d", []), ok("3")]
    kept, report = check(examples, "train.jsonl", byte_tokenizer, max_target_tokens=8, on_bad="skip")
    assert [e.id for e in kept] == ["1", "2", "3"]
    assert report.read == 7 and report.kept == 3
    assert report.skipped == {
        "without subtasks": 2,
        "with a missing target": 1,
        "with a target over the limit": 1,
    }
    assert sum(report.skipped.values()) + report.kept == report.read
    summary = report.summary()
    assert summary.startswith("train.jsonl: 3 of 7 examples kept (skipped: "), summary
    for part in ("2 without subtasks", "1 with a missing target", "1 with a target over the limit"):
        assert part in summary, summary


def test_summary_mentions_truncation():
    report = DataReport("src", read=4, kept=4, truncated=2)
    assert report.summary() == "src: 4 of 4 examples kept; 2 documents truncated"


def test_check_all_skipped_is_an_error(byte_tokenizer):
    with pytest.raises(DataError) as e:
        check([NO_SUBTASKS, LONG], "train.jsonl", byte_tokenizer, max_target_tokens=8, on_bad="skip")
    message = str(e.value)
    assert message.startswith("train.jsonl: no usable examples"), message
    assert "0 of 2 examples kept" in message and "1 without subtasks" in message
    assert "1 with a target over the limit" in message


def test_check_empty_list_is_an_error():
    with pytest.raises(DataError, match="src: no usable examples"):
        check([], "src", on_bad="skip")


@pytest.mark.parametrize("value", ["ignore", "", "Skip", None])
def test_check_bad_on_bad(value):
    with pytest.raises(InputError, match=r"on_bad=.*expected 'error' or 'skip'"):
        check([ok("1")], "src", on_bad=value)


# -- pidec train: input errors -------------------------------------------------------------------


def cli_error(args: list[str]) -> str:
    """Run `pidec ...`; it must exit 2 with exactly one line 'error: ...' on stderr and nothing
    on stdout. Returns that line."""
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    assert r.stdout == "", r.stdout
    return lines[0]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train_data")
    lines = [
        {"id": f"e{i}", "document": f"document number {i}", "subtasks": [{"prompt": "which", "target": f"n{i}"}]}
        for i in range(3)
    ]
    return write_lines(folder / "train.jsonl", lines)


TINY = ["--size", "tiny", "--tokenizer", "byte", "--steps", "1", "--batch-tokens", "512", "--dropout", "0"]


def base_args(tmp_path: Path, train_file: Path) -> list[str]:
    return ["train", "--output", str(tmp_path / "run"), "--train", str(train_file)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_file) -> tuple[Path, list[str]]:
    """A real 1-step run of a tiny model from scratch; returns its folder and the arguments."""
    out = tmp_path_factory.mktemp("trained") / "run"
    args = ["train", "--output", str(out), "--train", str(train_file), *TINY]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 1
    assert (out / "run_config.json").is_file()
    return out, args


def test_train_needs_output(train_file):
    line = cli_error(["train", "--train", str(train_file), *TINY])
    assert line == "error: --output DIR is required (or --resume DIR)"


def test_train_model_and_size(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--model", str(tmp_path)])
    assert line.startswith("error: --model: ") and "not both" in line
    assert not (tmp_path / "run").exists()  # settings are checked before anything is written


def test_train_neither_model_nor_size(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), "--steps", "1"])
    assert line.startswith("error: --model: ") and "--size" in line
    assert "not both" not in line  # the user gave neither: say so, not "not both"


def test_train_both_or_neither_train_file_and_task(tmp_path, train_file):
    line = cli_error(["train", "--output", str(tmp_path / "run"), *TINY])
    assert line.startswith("error: --train: ") and "--task" in line and "not both" not in line
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--task", "jsonl"])
    assert line.startswith("error: --train: ") and "not both" in line


def test_train_size_without_tokenizer(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), "--size", "tiny", "--steps", "1"])
    assert line.startswith("error: --tokenizer: ") and "'byte'" in line


def test_train_unknown_size(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), "--size", "huge", "--tokenizer", "byte", "--steps", "1"])
    assert line.startswith("error: --size: 'huge' is not one of tiny, small, base")


def test_train_unknown_layout(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--layout", "parallel"])
    assert line.startswith("error: --layout: 'parallel' is not one of ")
    assert "pid" in line and "pie" in line and "seq" in line


def test_train_steps_zero(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--steps", "0"])
    assert line == "error: --steps: must be an integer >= 1, got 0"


def test_train_needs_steps_or_epochs(tmp_path, train_file):
    args = [*base_args(tmp_path, train_file), "--size", "tiny", "--tokenizer", "byte"]
    assert cli_error(args) == "error: --steps: give --steps or --epochs"
    assert cli_error([*args, "--epochs", "0"]) == "error: --epochs: must be > 0, got 0.0"


def test_train_needs_train_file_or_task(tmp_path):
    line = cli_error(["train", "--output", str(tmp_path / "run"), *TINY])
    assert line.startswith("error: --train: ") and "--task" in line


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--lr", "0"], "error: --lr: must be > 0, got 0.0"),
        (["--on-bad", "drop"], "error: --on-bad: 'drop': expected error or skip"),
        (["--truncate", "middle"], "error: --truncate: 'middle': expected left or right"),
        (["--optimizer", "sgd"], "error: --optimizer: 'sgd' is not one of adamw, adafactor"),
        (["--max-target-tokens", "0"], "error: --max-target-tokens: must be an integer >= 1, got 0"),
        (["--dropout", "1"], "error: --dropout: must be in [0, 1), got 1.0"),
        (["--label-smoothing", "1"], "error: --label-smoothing: must be in [0, 1), got 1.0"),
        (["--label-smoothing", "-0.1"], "error: --label-smoothing: must be in [0, 1), got -0.1"),
        (["--max-subtasks", "0"], "error: --max-subtasks: must be >= 1, got 0"),
        (["--downsample", "none:2"], "error: --downsample: keep probability for 'none' must be in [0, 1], got 2.0"),
        (
            ["--downsample", "@same:0.2"],
            "error: --downsample: unknown row kind '@same'; the one row kind is @unchanged",
        ),
    ],
)
def test_train_bad_settings(tmp_path, train_file, extra, expect):
    assert cli_error([*base_args(tmp_path, train_file), *TINY, *extra]) == expect


def test_train_seq_with_max_subtasks(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--layout", "seq", "--max-subtasks", "3"])
    assert line.startswith("error: --max-subtasks: ") and "seq" in line


def test_train_seq_with_downsample(tmp_path, train_file):
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--layout", "seq", "--downsample", "none:0.5"])
    assert line.startswith("error: --downsample: ") and "seq" in line


@pytest.mark.parametrize("spec", ["none", ":0.3", "none:lots", "none:0.3,x"])
def test_train_bad_downsample(tmp_path, train_file, spec):
    line = cli_error([*base_args(tmp_path, train_file), *TINY, "--downsample", spec])
    assert line.startswith("error: --downsample: ") and "is not VALUE:KEEP_PROBABILITY" in line


def test_train_malformed_jsonl_names_file_and_line(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", [good(0), good(1), '{"document": "x", "subtasks": [}'])
    line = cli_error(["train", "--output", str(tmp_path / "run"), "--train", str(bad), *TINY])
    assert line.startswith(f"error: {bad}:3: invalid JSON"), line


def test_train_unusable_example_names_id(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [good(0), {"id": "hollow", "document": "d", "subtasks": []}])
    line = cli_error(["train", "--output", str(tmp_path / "run"), "--train", str(data), *TINY])
    assert line.startswith(f"error: {data}: example 'hollow': no subtasks"), line


def test_a_line_over_the_limit_is_refused_while_reading(tmp_path):
    path = write_lines(tmp_path / "big.jsonl", [good(0), GOOD | {"id": "big", "document": "x" * 5000}])
    with pytest.raises(DataError, match=rf"{path}:2: line is longer than 1000 bytes"):
        read_jsonl(path, max_line_bytes=1000)
    exact = len((json.dumps(good(0)) + "\n").encode())
    assert len(read_jsonl(write_lines(tmp_path / "ok.jsonl", [good(0)]), max_line_bytes=exact - 1)) == 1


def test_read_jsonl_reads_no_more_than_the_limit_of_a_long_line(tmp_path, monkeypatch):
    """The cap works while reading: a huge line is never read whole."""
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"document": "' + b"y" * 3_000_000 + b'"}\n')
    sizes = []
    real_open = Path.open

    class Recording:
        def __init__(self, f):
            self.f = f

        def readline(self, size=-1):
            line = self.f.readline(size)
            sizes.append(len(line))
            return line

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Recording(real_open(self, *a, **k)))
    with pytest.raises(DataError, match="line is longer than 1000 bytes"):
        read_jsonl(path, max_line_bytes=1000)
    assert max(sizes) <= 1001


def test_train_missing_train_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    line = cli_error(["train", "--output", str(tmp_path / "run"), "--train", str(missing), *TINY])
    assert line == f"error: data file {missing} not found"


def test_train_resume_with_extra_flags_is_refused(trained):
    out, _ = trained
    before = (out / "run_config.json").read_text()
    line = cli_error(["train", "--resume", str(out), "--lr", "0.1"])
    assert line.startswith("error: --resume continues with the run's saved settings; drop --lr"), line
    line = cli_error(["train", "--resume", str(out), "--steps", "5", "--max-target-tokens", "8"])
    assert "drop --steps, --max-target-tokens" in line or "drop --max-target-tokens, --steps" in line, line
    assert (out / "run_config.json").read_text() == before


def test_train_resume_refusal_names_real_options(trained, train_file):
    out, _ = trained
    line = cli_error(["train", "--resume", str(out), "--train", str(train_file)])
    assert line.endswith("drop --train"), line


def test_train_output_already_holds_a_run(trained):
    out, args = trained
    before = (out / "run_config.json").read_text()
    line = cli_error(args)
    assert line.startswith(f"error: --output {out} already holds a run; pass --resume {out}"), line
    assert (out / "run_config.json").read_text() == before


def test_train_resume_folder_without_run_config(tmp_path):
    line = cli_error(["train", "--resume", str(tmp_path)])
    assert line == f"error: --resume {tmp_path}: no run_config.json there (not a pidec training folder)"
    missing = tmp_path / "nothing"
    line = cli_error(["train", "--resume", str(missing)])
    assert line.startswith(f"error: --resume {missing}: no run_config.json")


@pytest.mark.parametrize("field", ["document", "prompt"])
def test_invisible_text_is_blank(tmp_path, field):
    invisible = "\u200b\u200d\ufeff"  # zero-width space, joiner, BOM: nothing a model can read
    bad = GOOD | (
        {"document": invisible} if field == "document" else {"subtasks": [{"prompt": invisible, "target": "x"}]}
    )
    message = read_error(tmp_path, bad)
    assert "empty" in message or "blank" in message
