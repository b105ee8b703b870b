"""Any decomposed task in pidec's own JSONL format (see `pidec.data`): one example a line,
`{"id", "document", "subtasks": [{"prompt", "target"}]}`.

`path` is a JSONL file (read whatever the split is called), or a folder holding
`{split}.jsonl`. Metrics, in percent like every task's: exact match per subtask (`exact_match`,
the main metric) and per example (`example_exact_match`: every subtask right), after collapsing
whitespace and, by default, lower-casing; and ROUGE per subtask answer. `pidec train --eval FILE`
scores its evaluations with this task.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..data import DataError, Example, read_jsonl
from ..metrics import Rouge
from .base import Task, TaskReport, check_predictions, references


class JSONL(Task):
    name = "jsonl"
    description = "any task in pidec's JSONL format (--data FILE.jsonl or a folder of {split}.jsonl)"
    default_path = None
    splits = ("train", "dev", "test")
    split_aliases: ClassVar[dict[str, str]] = {"validation": "dev", "valid": "dev", "val": "dev"}
    main_metric = "exact_match"
    max_new_tokens = 64

    def __init__(self, lowercase: bool = True):
        self.lowercase = lowercase

    def check_split(self, split: str) -> str:
        """Any split name a folder holds as {split}.jsonl is accepted (checked when reading)."""
        if not isinstance(split, str) or not split or "/" in split:
            raise DataError(f"task jsonl: bad split name {split!r}")
        return self.split_aliases.get(split, split)

    def read(self, split: str, path: Path, report: TaskReport) -> list[Example]:
        if path.is_dir():
            file = path / f"{split}.jsonl"
            if not file.is_file():
                have = sorted(p.stem for p in path.glob("*.jsonl"))
                raise DataError(f"{path}: no {split}.jsonl (splits here: {', '.join(have) or 'none'})")
            path = file
        return read_jsonl(path, require_target=False)

    def normalize(self, text: str, subtask: int = 0) -> str:
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def score(self, examples: list[Example], predictions: list[list[str]]) -> dict:
        check_predictions(examples, predictions)
        rouge = Rouge()
        right = total = whole = 0
        preds, refs = [], []
        for ex, pred in zip(examples, predictions):
            all_right = True
            for j, (answer, golds) in enumerate(zip(pred, references(ex))):
                if not golds:
                    raise ValueError(f"example {ex.id!r}: subtask {j} has no target to score against")
                ok = self.normalize(answer, j) in {self.normalize(g, j) for g in golds}
                right += ok
                total += 1
                all_right &= ok
                preds.append(answer)
                refs.append(golds[0])
            whole += all_right
        metrics = {
            "exact_match": 100.0 * right / total if total else 0.0,
            "example_exact_match": 100.0 * whole / len(examples) if examples else 0.0,
            "subtasks": total,
            "examples": len(examples),
        }
        metrics.update(rouge.mean(preds, refs))
        return metrics
