"""Examples and subtasks: the schema, the JSONL format, and checking them before training.

One example a line:

    {"id": "...", "document": "...", "subtasks": [{"prompt": "...", "target": "..."}, ...]}

`id` is optional (the line number stands in). `target` is required for training and optional for
generation. Malformed lines are errors naming the file and line. Examples that are well-formed
but unusable (no subtasks, a missing target, a target over the token limit) are counted by reason
and either raise or are skipped, as the caller chooses; they are never dropped silently.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .layouts import is_blank

ON_BAD = ("error", "skip")
MAX_LINE_BYTES = 16 * 2**20  # one JSONL line (one example); far beyond any document a T5 reads


@dataclass
class Subtask:
    prompt: str
    target: str | None = None


@dataclass
class Example:
    id: str
    document: str
    subtasks: list[Subtask]

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.subtasks]

    @property
    def targets(self) -> list[str | None]:
        return [s.target for s in self.subtasks]

    def to_dict(self) -> dict:
        subtasks = [{"prompt": s.prompt} | ({} if s.target is None else {"target": s.target}) for s in self.subtasks]
        return {"id": self.id, "document": self.document, "subtasks": subtasks}


class DataError(InputError):
    """Bad data: names the file and line (or example id) and the field."""


@dataclass
class DataReport:
    """What reading and checking a data set kept and what it skipped, by reason."""

    source: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> examples
    truncated: int = 0  # documents cut to fit (only when truncation was asked for)

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} of {self.read} examples kept"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) + ")"
        if self.truncated:
            text += f"; {self.truncated} documents truncated"
        return text


def parse_example(obj, where: str, require_target: bool = True) -> Example:
    """One decoded JSON value -> Example; `where` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "document", "subtasks"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (expected id, document, subtasks)")
    ex_id = obj.get("id", where.rsplit(":", 1)[-1])
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
        raise DataError(f"{where}: 'id' must be a string, got {type(ex_id).__name__}")
    document = obj.get("document")
    if not isinstance(document, str):
        got = "missing" if document is None else type(document).__name__
        raise DataError(f"{where}: 'document' must be a string ({got})")
    if is_blank(document):
        raise DataError(f"{where}: 'document' is empty")
    raw = obj.get("subtasks")
    if not isinstance(raw, list):
        got = "missing" if raw is None else type(raw).__name__
        raise DataError(f"{where}: 'subtasks' must be a list ({got})")
    subtasks = []
    for j, s in enumerate(raw):
        if not isinstance(s, dict):
            raise DataError(f"{where}: subtasks[{j}] must be an object with prompt and target")
        extra = set(s) - {"prompt", "target"}
        if extra:
            raise DataError(f"{where}: subtasks[{j}] has unknown field(s) {', '.join(sorted(extra))}")
        prompt, target = s.get("prompt"), s.get("target")
        if not isinstance(prompt, str) or is_blank(prompt):
            raise DataError(f"{where}: subtasks[{j}].prompt must be a non-empty string")
        if target is not None and not isinstance(target, str):
            raise DataError(f"{where}: subtasks[{j}].target must be a string, got {type(target).__name__}")
        subtasks.append(Subtask(prompt, target))
    return Example(str(ex_id), document, subtasks)


def read_jsonl(
    path: str | os.PathLike, require_target: bool = True, max_line_bytes: int = MAX_LINE_BYTES
) -> list[Example]:
    """Read a JSONL file; a malformed line raises DataError naming the file and line.
    Blank lines are allowed. A line over `max_line_bytes` is refused as soon as that many bytes
    are read (a line is never held whole beyond it). Usability (empty subtask lists, missing
    targets) is `check`'s job."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    examples = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            where = f"{path}:{n}"
            if len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")):
                raise DataError(f"{where}: line is longer than {max_line_bytes} bytes (the limit, max_line_bytes)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            ex = parse_example(obj, where, require_target)
            if ex.id in seen:
                raise DataError(f"{where}: duplicate id {ex.id!r} (first on line {seen[ex.id]})")
            seen[ex.id] = n
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_jsonl(examples: list[Example], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples)


def check(
    examples: list[Example],
    source: str,
    tokenizer=None,
    max_target_tokens: int | None = None,
    require_target: bool = True,
    on_bad: str = "error",
) -> tuple[list[Example], DataReport]:
    """Keep the usable examples. Unusable ones raise (on_bad="error") or are skipped and counted
    (on_bad="skip"): no subtasks, a subtask without a target (when training), a target longer
    than max_target_tokens tokens."""
    if on_bad not in ON_BAD:
        raise InputError(f"on_bad={on_bad!r}: expected 'error' or 'skip'")
    report = DataReport(source, read=len(examples))
    kept = []
    for ex in examples:
        reason = _problem(ex, tokenizer, max_target_tokens, require_target)
        if reason is None:
            kept.append(ex)
            continue
        if on_bad == "error":
            raise DataError(f"{source}: example {ex.id!r}: {reason[1]} (pass on_bad='skip' to skip and count these)")
        report.skipped[reason[0]] += 1
    report.kept = len(kept)
    if not kept:
        raise DataError(f"{source}: no usable examples ({report.summary()})")
    return kept, report


def _problem(ex: Example, tokenizer, max_target_tokens, require_target) -> tuple[str, str] | None:
    if not ex.subtasks:
        return "without subtasks", "no subtasks"
    if require_target:
        for j, s in enumerate(ex.subtasks):
            if s.target is None:
                return "with a missing target", f"subtasks[{j}] has no target"
    if tokenizer is not None and max_target_tokens is not None:
        targets = [s.target for s in ex.subtasks if s.target is not None]
        if targets:
            lengths = [len(t) + 1 for t in tokenizer(targets, add_special_tokens=False)["input_ids"]]
            j = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[j] > max_target_tokens:
                return (
                    "with a target over the limit",
                    f"a target is {lengths[j]} tokens with EOS, over the limit of {max_target_tokens}",
                )
    return None
