"""ACI-Bench: a clinical note written from a doctor-patient conversation, in four sections.

Reads the challenge files as distributed (github wyim/aci-bench): `csv/{split}.csv` with
`dataset, encounter_id, dialogue, note`, and `sections/{split}_{section}.json` with
`{"data": [{"src", "tgt", "file"}]}`, `file` being `{encounter_id}-{dataset}-{section}`. The CSV
gives the conversation; the section files give the four targets, matched by encounter id (their
`src` must be the same conversation). Without the CSV the conversation is the sections' `src`.

A section the note does not have is written `{section}: #####EMPTY#####.` in the files; its
target is `none` and a prediction of `none` (or nothing) means "no such section". In the `seq`
layout the model writes the whole note, one `section: text;` after another.

ROUGE (rouge-score, stemmed) is reported on the full note, the non-empty sections joined in
order, and per section; a section empty in both reference and prediction scores 100, empty in
one of them 0. Conversations are 900 to 2,600 T5 tokens: past the encoder's limit they are cut
at the end, keeping their beginning, and counted; load the model with a larger
`max_input_length` (T5's relative positions allow it) to keep more.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import ClassVar

from ..data import DataError, Example, Subtask
from ..metrics import ROUGE_TYPES, Rouge
from .base import Task, TaskReport, check_predictions, read_data_list

SECTIONS = ("subjective", "objective_exam", "objective_results", "assessment_and_plan")
PROMPTS = tuple(s.replace("_", " ") for s in SECTIONS)
FILE_PREFIXES = {
    "train": ("train",),
    "valid": ("valid",),
    "test1": ("clinicalnlp_taskB_test1", "test1"),
    "test2": ("clinicalnlp_taskC_test2", "test2"),
}
EMPTY_MARK = "#####EMPTY#####"
EMPTY = "none"


def _find(path: Path, names: list[str]) -> Path | None:
    for folder in (path, path / "csv", path / "sections"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def read_csv(path: Path) -> dict[str, tuple[str, str]]:
    """encounter_id -> (dataset, dialogue), in file order."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    out: dict[str, tuple[str, str]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"encounter_id", "dialogue"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            enc, dialogue = (row.get("encounter_id") or "").strip(), row.get("dialogue") or ""
            if not enc:
                raise DataError(f"{where}: empty encounter_id")
            if not dialogue.strip():
                raise DataError(f"{where}: encounter {enc}: empty dialogue")
            if enc in out:
                raise DataError(f"{where}: duplicate encounter_id {enc}")
            out[enc] = ((row.get("dataset") or "").strip(), dialogue)
    return out


def read_section(path: Path, section: str) -> dict[str, tuple[str, str]]:
    """encounter_id -> (src, tgt) from one section file."""
    rows = read_data_list(path, '{"data": [{"src", "tgt", "file"}, ...]}')
    out = {}
    for k, row in enumerate(rows):
        where = f"{path}: data[{k}]"
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in ("src", "tgt", "file")):
            raise DataError(f"{where}: expected string fields src, tgt, file")
        enc, _, rest = row["file"].partition("-")
        if not rest.endswith(section):
            raise DataError(f"{where}: file {row['file']!r} is not a {section} section")
        out[enc] = (row["src"], row["tgt"])
    return out


def section_target(text: str) -> str:
    return EMPTY if EMPTY_MARK in text else text.strip()


class ACIBench(Task):
    name = "aci_bench"
    description = "ACI-Bench clinical note generation: 4 note sections from a doctor-patient conversation"
    default_path = "aci-bench"
    splits = ("train", "valid", "test1", "test2")
    split_aliases: ClassVar[dict[str, str]] = {"dev": "valid", "validation": "valid", "test": "test1"}
    main_metric = "rougeL"  # the issue names ROUGE-L as the comparison metric
    max_new_tokens = 512

    def read(self, split: str, path: Path, report: TaskReport) -> list[Example]:
        prefixes = FILE_PREFIXES[split]
        if path.is_file():
            raise DataError(f"{path}: give the ACI-Bench folder (holding csv/ and sections/), not one file")
        sections = {}
        for section in SECTIONS:
            found = _find(path, [f"{p}_{section}.json" for p in prefixes])
            if found is None:
                raise DataError(
                    f"{path}: no section file {prefixes[0]}_{section}.json (in sections/) for split {split}"
                )
            sections[section] = (found, read_section(found, section))
        csv_path = _find(path, [f"{p}.csv" for p in prefixes])
        first_file, first = sections[SECTIONS[0]]
        if csv_path is not None:
            dialogues = read_csv(csv_path)
        else:
            dialogues = {enc: ("", src) for enc, (src, _) in first.items()}
        examples = []
        for enc, (_, dialogue) in dialogues.items():
            subtasks = []
            for section, prompt in zip(SECTIONS, PROMPTS):
                file, rows = sections[section]
                if enc not in rows:
                    raise DataError(f"{file}: no {section} section for encounter {enc} (in {csv_path or first_file})")
                src, tgt = rows[enc]
                if src.strip() != dialogue.strip():
                    raise DataError(f"{file}: encounter {enc}: src differs from the dialogue in {csv_path}")
                subtasks.append(Subtask(prompt, section_target(tgt)))
                report.changes["empty sections"] += subtasks[-1].target == EMPTY
            examples.append(Example(enc, dialogue.strip(), subtasks))
        extra = set().union(*(set(rows) for _, rows in sections.values())) - set(dialogues)
        if extra:
            raise DataError(f"{path}: section files hold encounters missing from {csv_path}: {sorted(extra)[:5]}")
        if not report.changes["empty sections"]:
            del report.changes["empty sections"]
        return examples

    def normalize(self, text: str, subtask: int = 0) -> str:
        """A section as compared: stripped, and "" when the answer says there is none."""
        text = text.strip()
        return "" if text.lower().rstrip(".") in ("", EMPTY) or EMPTY_MARK in text else text

    def score(self, examples: list[Example], predictions: list[list[str]]) -> dict:
        check_predictions(examples, predictions)
        rouge = Rouge()
        notes_pred, notes_ref = [], []
        per_section = {s: [] for s in SECTIONS}
        for ex, pred in zip(examples, predictions):
            p = [self.normalize(a) for a in pred]
            r = [self.normalize(t or "") for t in ex.targets]
            notes_pred.append("\n\n".join(x for x in p if x))
            notes_ref.append("\n\n".join(x for x in r if x))
            for section, a, b in zip(SECTIONS, p, r):
                if not a or not b:
                    score = 100.0 if a == b else 0.0
                    per_section[section].append(dict.fromkeys(ROUGE_TYPES, score))
                else:
                    per_section[section].append(rouge.pair(a, b))
        metrics = rouge.mean(notes_pred, notes_ref)
        for section, scores in per_section.items():
            for t in ROUGE_TYPES:
                metrics[f"{section}/{t}"] = sum(s[t] for s in scores) / len(scores) if scores else 0.0
        metrics["notes"] = len(examples)
        return metrics
