"""QA: SQuAD normalisation and metrics by hand, COVID-QA and SQuAD v2 files, the article split,
long documents as windows, and how window answers are scored and merged."""

import itertools
import json

import pytest
import torch

import pidec
from pidec import checkpoint, evaluate, likelihood, tasks
from pidec.data import DataError, Example, Subtask
from pidec.metrics import best_over, squad_exact, squad_f1, squad_normalize
from pidec.tasks.qa import NO_ANSWER, assign_splits

from ..shared_data import COVID_QA, T5_TOKENIZER, require, tiny_checkpoint

TASK = tasks.get("qa")


@pytest.fixture(scope="module")
def tok():
    return checkpoint.load_tokenizer(require(T5_TOKENIZER))


@pytest.mark.parametrize(
    "text, want",
    [
        ("The Cat!", "cat"),
        ("an apple, a pear", "apple pear"),
        ("U.S.  troops", "us troops"),
        ("theory of the atom", "theory of atom"),  # 'the' inside a word stays
        ("  ", ""),
        ("A", ""),
    ],
)
def test_squad_normalize(text, want):
    assert squad_normalize(text) == want


def test_exact_match_and_f1_by_hand():
    assert squad_exact("The big dog.", "big dog") == 1.0
    assert squad_exact("big dogs", "big dog") == 0.0
    assert squad_f1("the big red dog", "red dog") == pytest.approx(0.8)  # P 2/3, R 1
    assert squad_f1("dog dog", "dog") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped
    assert squad_f1("cat", "dog") == 0.0
    assert squad_f1("", "") == 1.0 and squad_f1("the", "") == 1.0 and squad_f1("x", "") == 0.0
    assert best_over(squad_f1, "red dog", ["a cat", "the red dog"]) == 1.0
    assert best_over(squad_exact, "", []) == 1.0  # no gold answer: the empty answer is right


def question(qid: str, text: str, *answers: tuple[str, int], impossible: bool = False) -> dict:
    """One SQuAD question, its answers given as (text, answer_start)."""
    q = {"id": qid, "question": text, "answers": [{"text": t, "answer_start": at} for t, at in answers]}
    return q | ({"is_impossible": True} if impossible else {})


def squad_file(tmp_path, context="Paris is the capital of France. It is large.", extra=None):
    capital = question("q1", "What is the capital of France?", ("Paris", 0), ("Paris ", 0))
    bern = question("q3", "Where is Bern?", ("Switzerland", 11), ("in Switzerland", 8))
    paragraphs = [
        {"context": context, "qas": [capital, question("q2", "Who?", impossible=True)]},
        {"context": "Bern is in Switzerland.", "qas": [bern]},
    ]
    data = {"version": "v2.0", "data": [{"title": "France", "paragraphs": paragraphs}] + (extra or [])}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_squad_v2_file(tmp_path):
    examples = TASK.load("all", squad_file(tmp_path))
    assert [e.id for e in examples] == ["France/0", "France/1"]
    assert examples[0].prompts == ["What is the capital of France?", "Who?"]
    assert examples[0].targets == ["Paris", NO_ANSWER]
    assert examples[0].references == [["Paris"], []]
    assert examples[1].references == [["Switzerland", "in Switzerland"]]
    m = TASK.score(examples, [["paris", "unanswerable"], ["Switzerland."]])
    assert m == {"exact_match": 100.0, "f1": 100.0, "questions": 3}
    m = TASK.score(examples, [["Lyon", "Napoleon"], ["in Switzerland"]])
    assert m["exact_match"] == pytest.approx(100 / 3) and m["f1"] == pytest.approx(100 / 3)


def test_bad_squad_files_are_named(tmp_path):
    path = squad_file(tmp_path)
    data = json.loads(path.read_text())
    data["data"][0]["paragraphs"][0]["qas"][1]["question"] = " "
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"squad\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: 'question'"):
        TASK.load("all", path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"squad\.json:1: invalid JSON"):
        TASK.load("all", path)
    with pytest.raises(DataError, match="unknown split 'validate'"):
        TASK.load("validate", path)


def test_covid_qa_counts_and_article_split():
    path = require(COVID_QA)
    everything = TASK.load("all", path)
    assert len(everything) == 98 and sum(len(e.subtasks) for e in everything) == 1380
    splits = {s: TASK.load(s, path) for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [78, 10, 10]
    ids = [{e.id for e in splits[s]} for s in ("train", "dev", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(e.subtasks) for s in splits.values() for e in s) == 1380
    assert [e.id for e in TASK.load("test", path)] == [e.id for e in splits["test"]]  # deterministic


def test_split_ranks_articles_by_hash():
    ids = [str(i) for i in range(20)]
    which = assign_splits(ids)
    assert sorted(which.values()).count("train") == 16 and list(which.values()).count("dev") == 2
    assert assign_splits(list(reversed(ids))) == which  # file order does not matter


def test_long_document_becomes_windows_with_window_targets(tmp_path, tok):
    words = [f"w{i}" for i in range(300)]
    context = " ".join(words[:250]) + " the answer is Paris. " + " ".join(words[250:])
    (ex,) = TASK.load("all", squad_file(tmp_path, context=context), limit=1)
    report = tasks.TaskReport("x")
    (group,) = TASK.fit([ex], tok, 64, report)
    assert len(group) > 5 and report.changes["windows"] == len(group)
    lengths = [len(ids) for ids in tok([p.document for p in group], add_special_tokens=False)["input_ids"]]
    assert max(lengths) <= 63
    assert context.startswith(group[0].document) and context.endswith(group[-1].document)
    for a, b in itertools.pairwise(group):  # consecutive windows overlap: no text falls between them
        assert context.index(b.document) < context.index(a.document) + len(a.document)
    with_answer = [p for p in group if "Paris" in p.document]
    assert with_answer and all(p.targets == ["Paris", NO_ANSWER] for p in with_answer)
    assert all(p.targets == [NO_ANSWER, NO_ANSWER] for p in group if p not in with_answer)
    assert [p.id for p in group[:2]] == ["France/0#0", "France/0#1"]


def test_covid_article_windows_fit(tok):
    (ex,) = TASK.load("test", require(COVID_QA), limit=1)
    (group,) = TASK.fit([ex], tok, 512, tasks.TaskReport("x"))
    lengths = [len(ids) for ids in tok([p.document for p in group], add_special_tokens=False)["input_ids"]]
    total = len(tok(ex.document, add_special_tokens=False)["input_ids"])
    assert max(lengths) <= 511 and len(group) >= total / 511
    found = [any(t != NO_ANSWER for t in col) for col in zip(*(p.targets for p in group))]
    assert sum(found) >= 0.9 * len(ex.subtasks)  # nearly every answer lies whole in some window


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("qa"), seed=3, max_input_length=64)
    return pidec.load(folder)


@pytest.mark.parametrize("layout", ["pid", "pie"])
def test_answer_scores_are_teacher_forced_log_likelihoods(model, layout):
    doc, prompts, answers = "paris is the capital of france", ["capital?", "country name?"], ["paris", "france x"]
    got = likelihood.answer_scores(model, doc, prompts, answers, layout)
    tok, t5 = model.tokenizer, model.model
    start, eos = model.config.decoder_start_token_id, tok.eos_token_id
    for j, (p, a) in enumerate(zip(prompts, answers)):
        a_ids = tok(a, add_special_tokens=False)["input_ids"] + [eos]
        if layout == "pid":
            enc, prefix = tok(doc)["input_ids"], [start] + tok(p, add_special_tokens=False)["input_ids"]
        else:
            enc, prefix = tok(f"{p} {doc}")["input_ids"], [start]
        dec = torch.tensor([prefix + a_ids[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(t5(torch.tensor([enc]), dec)[0], -1)
        want = torch.stack([logp[len(prefix) - 1 + i, t] for i, t in enumerate(a_ids)]).mean()
        assert got[j] == pytest.approx(float(want), abs=1e-4)
    seq = likelihood.answer_scores(model, doc, prompts, answers, "seq")
    assert len(seq) == 2 and seq[0] == seq[1] < 0


def test_merge_takes_the_likeliest_answer_past_unanswerable(monkeypatch):
    scores = {("w0", "a"): -3.0, ("w1", "b"): -1.0, ("w1", "c"): -2.0, ("w2", "d"): -0.5}
    monkeypatch.setattr(
        evaluate, "answer_scores", lambda m, doc, prompts, answers, *rest: [scores[(doc, a)] for a in answers]
    )
    group = [Example(f"x#{k}", f"w{k}", [Subtask("q1"), Subtask("q2"), Subtask("q3")]) for k in range(3)]
    answers = [
        ["a", "unanswerable", "Unanswerable."],
        ["b", "c", "unanswerable"],
        ["unanswerable", "d", "unanswerable"],
    ]
    merged = evaluate.merge(None, TASK, group, answers, "pid")
    assert merged == ["b", "d", NO_ANSWER]


def test_evaluate_decodes_windows_and_scores_the_article(model, tmp_path):
    words = " ".join(f"w{i}" for i in range(120))
    (ex,) = TASK.load("all", squad_file(tmp_path, context=words + " Paris is the capital."), limit=1)
    result = evaluate.evaluate(model, TASK, [ex], "pid", max_new_tokens=3)
    assert result.pieces[0] > 1 and result.speed["documents"] == result.pieces[0]
    assert result.speed["rows"] == 2 * result.pieces[0] and result.speed["rescore_s"] >= 0
    assert len(result.predictions) == 1 and len(result.predictions[0]) == 2
    assert set(result.metrics) == {"exact_match", "f1", "questions"}
    assert result.records()[0]["windows"] == result.pieces[0]
