"""Extractive question answering over long documents, in SQuAD format (v1.1 or v2.0).

One example per context (a COVID-QA article, a SQuAD paragraph); its questions are the
subtasks, the first gold answer the target, every gold answer a reference. A v2.0 question
marked impossible has the target `unanswerable` and is scored against the empty answer.

Splits: COVID-QA has none, so `train` / `dev` / `test` are made by article, never splitting
one: the articles are ranked by the SHA-1 of their id (the article's `title`, else its first
paragraph's `document_id`, else its position in the file) and the first 80% (rounded) go to
train, the next 10% to dev, the rest to test: 78 / 10 / 10 of COVID-QA's 98 articles. `all` is
every article (use it for a file that is already one split, such as SQuAD's dev-v1.1.json).

Long documents (COVID-QA articles are 1,000 to 12,000 T5 tokens) are never cut. `fit` splits
them into overlapping windows (a quarter of a window's tokens shared with the next) and every
window is asked every question. For training, a window's target is the gold answer when that
text is inside the window and `unanswerable` otherwise. For evaluation each window is decoded
and each question takes the answer, among windows that did not say `unanswerable`, with the
highest mean log-likelihood under the model (see `pidec.evaluate`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

from ..data import DataError, Example, Subtask
from ..metrics import best_over, squad_exact, squad_f1, squad_normalize
from . import windows
from .base import Task, TaskExample, TaskReport, check_predictions, fit_each, read_data_list, references

NO_ANSWER = "unanswerable"
SPLIT_SHARES = (0.8, 0.1, 0.1)  # train, dev, test
WINDOW_OVERLAP = 0.25


def assign_splits(article_ids: list[str]) -> dict[str, str]:
    """article id -> train / dev / test: articles ranked by the SHA-1 of their id, the first
    80% (rounded) to train, the next 10% to dev, the rest to test."""
    ranked = sorted(article_ids, key=lambda a: hashlib.sha1(a.encode("utf-8")).hexdigest())
    n_train = round(len(ranked) * SPLIT_SHARES[0])
    n_dev = round(len(ranked) * SPLIT_SHARES[1])
    return {a: "train" if r < n_train else "dev" if r < n_train + n_dev else "test" for r, a in enumerate(ranked)}


def read_squad(path: Path) -> list[tuple[str, list[TaskExample]]]:
    """(article id, its examples) for every article of a SQuAD-format file."""
    articles = read_data_list(path, 'SQuAD format {"data": [{"paragraphs": [...]}]}')
    out, seen = [], set()
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list) or not paragraphs:
            raise DataError(f"{path}: data[{a}]: expected a non-empty 'paragraphs' list")
        first = paragraphs[0] if isinstance(paragraphs[0], dict) else {}
        key = str(article.get("title") or first.get("document_id") or a)
        if key in seen:
            raise DataError(f"{path}: data[{a}]: duplicate article id {key!r}")
        seen.add(key)
        examples = []
        for p, para in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            ex_id = key if len(paragraphs) == 1 else f"{key}/{p}"
            examples.append(_example(para, ex_id, where))
        out.append((key, examples))
    return out


def _example(para, ex_id: str, where: str) -> TaskExample:
    if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not para["context"].strip():
        raise DataError(f"{where}: 'context' must be a non-empty string")
    qas = para.get("qas")
    if not isinstance(qas, list) or not qas:
        raise DataError(f"{where}: 'qas' must be a non-empty list")
    subtasks, refs = [], []
    for q, qa in enumerate(qas):
        here = f"{where}.qas[{q}]"
        question = qa.get("question") if isinstance(qa, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{here}: 'question' must be a non-empty string")
        answers = qa.get("answers") or []
        if not isinstance(answers, list) or not all(
            isinstance(x, dict) and isinstance(x.get("text"), str) for x in answers
        ):
            raise DataError(f"{here}: 'answers' must be a list of objects with a 'text'")
        texts = [] if qa.get("is_impossible") else list(dict.fromkeys(x["text"].strip() for x in answers))
        texts = [t for t in texts if t]
        subtasks.append(Subtask(" ".join(question.split()), texts[0] if texts else NO_ANSWER))
        refs.append(texts)
    return TaskExample(ex_id, para["context"], subtasks, references=refs)


class QA(Task):
    name = "qa"
    description = "extractive QA over long documents in SQuAD format (default: COVID-QA, split by article)"
    default_path = "covid-qa/covidQA-200423.json"
    splits = ("train", "dev", "test", "all")
    split_aliases: ClassVar[dict[str, str]] = {"validation": "dev", "val": "dev"}
    main_metric = "f1"
    max_new_tokens = 64
    long_documents = "windows"
    no_answer = NO_ANSWER

    def read(self, split: str, path: Path, report: TaskReport) -> list[Example]:
        if path.is_dir():
            files = sorted(path.glob("*.json"))
            if len(files) != 1:
                raise DataError(f"{path}: expected one SQuAD .json file in the folder, found {len(files)}")
            path = files[0]
        articles = read_squad(path)
        which = assign_splits([a for a, _ in articles])
        return [ex for article, exs in articles if split == "all" or which[article] == split for ex in exs]

    def fit(self, examples, tokenizer, max_input_tokens, report):
        """A document too long becomes overlapping windows, each answering the questions whose
        answer it holds (the rest: NO_ANSWER)."""

        def into_windows(ex: Example, spans, room: int) -> list[Example]:
            pieces = windows.split(ex.document, tokenizer, room, int(room * WINDOW_OVERLAP), spans)
            refs = references(ex)
            group = []
            for k, text in enumerate(pieces):
                targets = [next((r for r in rs if r in text), NO_ANSWER) for rs in refs]
                group.append(
                    Example(f"{ex.id}#{k}", text, [Subtask(s.prompt, t) for s, t in zip(ex.subtasks, targets)])
                )
            report.changes["documents split into windows"] += 1
            report.changes["windows"] += len(pieces)
            return group

        return fit_each(examples, tokenizer, max_input_tokens, into_windows)

    def normalize(self, text: str, subtask: int = 0) -> str:
        text = squad_normalize(text)
        return "" if text == NO_ANSWER else text

    def score(self, examples: list[Example], predictions: list[list[str]]) -> dict:
        """SQuAD exact match and F1 (x100), each question against its best gold answer."""
        check_predictions(examples, predictions)
        em = f1 = 0.0
        n = 0
        for ex, pred in zip(examples, predictions):
            for answer, golds in zip(pred, references(ex)):
                answer = "" if squad_normalize(answer) == NO_ANSWER else answer
                golds = [g for g in golds if squad_normalize(g) != NO_ANSWER]
                em += best_over(squad_exact, answer, golds)
                f1 += best_over(squad_f1, answer, golds)
                n += 1
        return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f1 / n if n else 0.0, "questions": n}
