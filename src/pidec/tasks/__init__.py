"""The tasks `pidec train --task` and `pidec eval --task` know, by name.

task = pidec.tasks.get("multiwoz")
examples = task.load("dev", limit=100)          # list[Example]; examples.report counts skips
metrics = task.score(examples, predictions)     # predictions: one answer list per example

A task that takes settings is named with them after a colon, wherever a task name goes
(`--task`, a run's config): `multiwoz-slot-state:last_turns=3` is
`MultiWOZSlotState(last_turns=3)`.
"""

from __future__ import annotations

import inspect

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


def _setting_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def settings_of(name: str) -> dict[str, object]:
    """The settings a registered task takes after a colon, with their defaults."""
    return {
        p.name: p.default
        for p in inspect.signature(TASKS[name].__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def get(name: str) -> Task:
    """The task `name` names: a registered task, with `:key=value,key=value` settings passed to
    its constructor (values read as int, then float, else as text)."""
    base, colon, settings = name.partition(":")
    if base not in TASKS:
        raise DataError(f"unknown task {base!r}: expected one of {', '.join(TASKS)}")
    cls = TASKS[base]
    if not colon:
        return cls()
    accepted = list(settings_of(base))
    kwargs = {}
    for item in settings.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise DataError(f"task {name!r}: expected {base}:key=value[,key=value], got {item!r}")
        if key not in accepted:
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no settings"
            raise DataError(f"task {name!r}: {base} has no setting {key!r}; {takes}")
        if key in kwargs:
            raise DataError(f"task {name!r}: {key} given twice")
        kwargs[key] = _setting_value(value)
    try:
        task = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DataError(f"task {name!r}: {e}") from None
    task.name = f"{base}:" + ",".join(f"{k}={v}" for k, v in kwargs.items())  # reports and results name them
    return task


__all__ = ["TASKS", "Examples", "Task", "TaskExample", "TaskReport", "data_root", "get", "names", "settings_of"]
