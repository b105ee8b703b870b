"""What every task is: a reader for its own files, the prompts of its subtasks, how a document
too long for the model is made to fit, an answer normaliser and a metric.

A task's examples are plain `Example`s (see `pidec.data`), so the trainer and the generator
need nothing task-specific. A task may attach `references` (every accepted answer of each
subtask: SQuAD's several gold answers, MultiWOZ's `a|b` alternatives) for its metric; the
`target` stays the one text a model is trained to write.

Fitting is explicit: `fit` returns, for each example, the pieces that fit the encoder (one cut
piece, or several windows), and counts what it did in the report. Nothing is cut silently.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..data import DataError, DataReport, Example, Subtask

ENV_DATA = "PIDEC_DATA"


@dataclass
class TaskExample(Example):
    """An example with every accepted answer per subtask (defaults to the one target)."""

    references: list[list[str]] | None = None


def references(example: Example) -> list[list[str]]:
    refs = getattr(example, "references", None)
    if refs is not None:
        return refs
    return [[s.target] if s.target is not None else [] for s in example.subtasks]


@dataclass
class TaskReport(DataReport):
    """DataReport plus what reading and fitting changed (documents cut, windows made, states
    carried over), counted by kind."""

    changes: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.source}: {self.read} examples"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) + ")"
        if self.kept != self.read:
            text += f", {self.kept} kept"
        if self.changes:
            text += "; " + ", ".join(f"{n} {what}" for what, n in sorted(self.changes.items()))
        return text


class Examples(list):
    """A list of examples that also carries the report of how they were read and fitted."""

    def __init__(self, items=(), report: TaskReport | None = None):
        super().__init__(items)
        self.report = report if report is not None else TaskReport("examples", read=len(self), kept=len(self))


def data_root() -> Path:
    """Where the tasks' default paths live: $PIDEC_DATA, else $PIDEC_SHARED/data, else
    ../shared/data beside the repository (the development layout: src/pidec/tasks/ is four
    folders below it)."""
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA])
    if os.environ.get("PIDEC_SHARED"):
        return Path(os.environ["PIDEC_SHARED"]) / "data"
    return Path(__file__).resolve().parents[4] / "shared" / "data"


class Task:
    """One task. Subclasses set the class attributes and implement `read`, `score`."""

    name: str = ""
    description: str = ""
    default_path: str | None = None  # relative to data_root(); None: --data is required
    splits: tuple[str, ...] = ()
    split_aliases: ClassVar[dict[str, str]] = {}
    main_metric: str = ""
    max_new_tokens: int = 32  # decoding budget per subtask, unless the caller gives one
    long_documents: str = "cut"  # "cut": one piece per example; "windows": several, merged by score
    no_answer: str | None = None  # an answer that means "not in this piece" (windows are merged past it)
    # seq targets leave out the subtasks whose answer is this one (MultiWOZ: the empty slots), as
    # seq state trackers usually do; the parser returns "" for a missing subtask, which
    # `normalize` must map back to this answer.
    seq_omit: str | None = None

    # -- reading ------------------------------------------------------------------------------

    def resolve(self, path: str | os.PathLike | None) -> Path:
        if path is None:
            if self.default_path is None:
                raise DataError(f"task {self.name}: no default data path; give one (--data PATH)")
            path = data_root() / self.default_path
        path = Path(path)
        if not path.exists():
            raise DataError(f"task {self.name}: data path {path} not found")
        return path

    def check_split(self, split: str) -> str:
        split = self.split_aliases.get(split, split)
        if split not in self.splits:
            raise DataError(f"task {self.name}: unknown split {split!r}: expected one of {', '.join(self.splits)}")
        return split

    def read(self, split: str, path: Path, report: TaskReport) -> list[Example]:
        """Every example of `split` under `path`; what is skipped is counted in `report`."""
        raise NotImplementedError

    def load(
        self,
        split: str,
        path: str | os.PathLike | None = None,
        limit: int | None = None,
        tokenizer=None,
        max_input_tokens: int | None = None,
    ) -> Examples:
        """The examples of `split` (the first `limit` of them), read from `path` (default: the
        task's folder under the data root).

        With a tokenizer and max_input_tokens (the encoder's limit, EOS included), every
        document is made to fit as the task documents in `fit`; the pieces are returned in
        place of the examples and `.report` counts what was cut or split."""
        split = self.check_split(split)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataError(f"limit must be a positive integer, got {limit!r}")
        where = self.resolve(path)
        report = TaskReport(f"{self.name}:{split} ({where})")
        examples = self.read(split, where, report)
        if not examples:
            raise DataError(f"{where}: no examples in split {split!r}")
        if limit is not None:
            examples = examples[:limit]
        report.read = len(examples) + sum(report.skipped.values())
        if tokenizer is not None and max_input_tokens is not None:
            examples = [piece for group in self.fit(examples, tokenizer, max_input_tokens, report) for piece in group]
        report.kept = len(examples)
        return Examples(examples, report)

    # -- fitting the encoder ------------------------------------------------------------------

    def fit(self, examples: list[Example], tokenizer, max_input_tokens: int, report: TaskReport) -> list[list[Example]]:
        """Per example, the pieces whose documents fit in max_input_tokens - 1 tokens (EOS is the
        last). Default: documents are cut at the end, keeping their beginning."""

        def cut_at_the_end(ex: Example, spans, room: int) -> list[Example]:
            cut = replace_document(ex, cut_to_fit(ex.document, spans, tokenizer, room, keep="start"))
            report.truncated += 1
            report.changes["documents cut at the end"] += 1
            return [cut]

        return fit_each(examples, tokenizer, max_input_tokens, cut_at_the_end)

    # -- answers ------------------------------------------------------------------------------

    def normalize(self, text: str, subtask: int = 0) -> str:
        """The form in which answers are compared (both predictions and references)."""
        return " ".join(text.split())

    def score(self, examples: list[Example], predictions: list[list[str]]) -> dict:
        raise NotImplementedError


def fit_each(examples: list[Example], tokenizer, max_input_tokens: int, too_long) -> list[list[Example]]:
    """Per example, [the example] when its document fits in max_input_tokens - 1 tokens (EOS is
    the last), else `too_long(example, its token spans, the room)`: the pieces it becomes."""
    room = document_room(max_input_tokens)
    spans_of = token_spans(tokenizer, [e.document for e in examples])
    return [[ex] if len(spans) <= room else too_long(ex, spans, room) for ex, spans in zip(examples, spans_of)]


def read_data_list(path: Path, shape: str) -> list:
    """The "data" list of a JSON file shaped {"data": [...]} (SQuAD, ACI-Bench's section files):
    a DataError naming the file and line of malformed JSON, or saying it expected `shape`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected {shape}")
    return rows


def document_room(max_input_tokens: int) -> int:
    if isinstance(max_input_tokens, bool) or not isinstance(max_input_tokens, int) or max_input_tokens < 2:
        raise DataError(f"max_input_tokens must be an integer >= 2, got {max_input_tokens!r}")
    return max_input_tokens - 1


def token_spans(tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    """Each text's tokens as (start, end) character spans, so that a document is cut in its
    own characters rather than re-decoded from tokens (decoding would rewrite its spacing).
    Needs a fast tokenizer (tokenizer.json), which `checkpoint.load_tokenizer` gives."""
    if not getattr(tokenizer, "is_fast", False):
        if type(tokenizer).__name__ == "ByT5Tokenizer":  # one token per UTF-8 byte of each character
            return [[(i, i + 1) for i, c in enumerate(t) for _ in c.encode("utf-8")] for t in texts]
        raise DataError("cutting documents to fit needs a fast tokenizer (tokenizer.json) for character offsets")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [[tuple(o) for o in offsets] for offsets in enc["offset_mapping"]]


def cut_to_fit(text: str, spans: list[tuple[int, int]], tokenizer, room: int, keep: str) -> str:
    """The longest beginning (keep="start") or end (keep="end") of `text`, cut between tokens,
    whose own tokenization is at most `room` tokens (it can differ by one at the cut)."""
    k = min(room, len(spans))
    for _ in range(4):
        piece = text[: spans[k - 1][1]] if keep == "start" else text[spans[len(spans) - k][0] :]
        n = len(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
        if n <= room:
            return piece
        k -= n - room
    raise DataError(f"could not cut a document to {room} tokens")


def replace_document(example: Example, document: str, id: str | None = None, targets: list[str] | None = None):
    """A copy of `example` with another document (and optionally id and targets). Its accepted
    answers (`TaskExample.references`) stay, unless new targets replace them."""
    subtasks = example.subtasks
    if targets is not None:
        subtasks = [Subtask(s.prompt, t) for s, t in zip(subtasks, targets)]
    id = example.id if id is None else id
    refs = getattr(example, "references", None)
    if targets is None and refs is not None:
        return TaskExample(id, document, list(subtasks), references=refs)
    return Example(id, document, list(subtasks))


def check_predictions(examples: list[Example], predictions: list[list[str]]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    for ex, pred in zip(examples, predictions):
        if len(pred) != len(ex.subtasks):
            raise ValueError(f"example {ex.id!r}: {len(pred)} answers for {len(ex.subtasks)} subtasks")
