"""The tasks `pidec train --task` and `pidec eval --task` know, by name.

task = pidec.tasks.get("multiwoz")
examples = task.load("dev", limit=100)          # list[Example]; examples.report counts skips
metrics = task.score(examples, predictions)     # predictions: one answer list per example
"""

from __future__ import annotations

from ..data import DataError
from .aci_bench import ACIBench
from .base import Examples, Task, TaskExample, TaskReport, data_root
from .booking import BookingTask
from .jsonl import JSONL
from .multiwoz import MultiWOZ, MultiWOZSlotState, MultiWOZState
from .qa import QA

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (MultiWOZ, MultiWOZState, MultiWOZSlotState, ACIBench, QA, BookingTask, JSONL)
}


def names() -> list[str]:
    return list(TASKS)


def get(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Examples", "Task", "TaskExample", "TaskReport", "data_root", "get", "names"]
