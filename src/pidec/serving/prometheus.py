"""Counters, gauges and histograms for the service, written in Prometheus' text format.

A few dozen lines instead of a dependency: the service needs labelled counters, gauges read at
scrape time and fixed-bucket histograms, all updated from the event loop and from the decoding
thread, hence one lock. `parse` reads such a page back (for tests and the soak script)."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values))
    return "{" + inner + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Registry:
    """Metrics by name; `render()` gives the /metrics page."""

    def __init__(self):
        self._lock = threading.Lock()
        self._order: list[str] = []
        self._meta: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # name -> (type, help, label names)
        self._values: dict[str, dict[tuple, float]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._hist: dict[str, dict[tuple, list]] = {}  # labels -> [bucket counts..., sum, count]
        self._gauges: dict[str, Callable[[], float]] = {}

    def _declare(self, name: str, kind: str, help: str, labels: tuple[str, ...]) -> None:
        if name in self._meta:
            raise ValueError(f"metric {name} declared twice")
        self._order.append(name)
        self._meta[name] = (kind, help, labels)

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self._declare(name, "counter", help, labels)
        self._values[name] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when the page is rendered."""
        self._declare(name, "gauge", help, ())
        self._gauges[name] = read

    def histogram(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> None:
        self._declare(name, "histogram", help, labels)
        self._buckets[name] = tuple(sorted(buckets))
        self._hist[name] = {}

    def _key(self, name: str, labels: dict) -> tuple:
        names = self._meta[name][2]
        if set(labels) != set(names):
            raise ValueError(f"metric {name} takes labels {names}, got {tuple(labels)}")
        return tuple(labels[n] for n in names)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels) -> None:
        key = self._key(name, labels)
        buckets = self._buckets[name]
        with self._lock:
            row = self._hist[name].setdefault(key, [0] * len(buckets) + [0.0, 0])
            for i, upper in enumerate(buckets):
                if value <= upper:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def value(self, name: str, **labels) -> float:
        """A counter's value, or a histogram's count (for tests and summaries)."""
        key = self._key(name, labels)
        with self._lock:
            if name in self._hist:
                row = self._hist[name].get(key)
                return 0 if row is None else row[-1]
            return self._values[name].get(key, 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name in self._order:
                kind, help, label_names = self._meta[name]
                lines.append(f"# HELP {name} {_escape(help)}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "gauge":
                    lines.append(f"{name} {_number(self._gauges[name]())}")
                elif kind == "counter":
                    for key, v in sorted(self._values[name].items()):
                        lines.append(f"{name}{_labels(label_names, key)} {_number(v)}")
                else:
                    buckets = self._buckets[name]
                    for key, row in sorted(self._hist[name].items()):
                        for upper, n in zip(buckets + (math.inf,), row[: len(buckets)] + [row[-1]]):
                            lab = _labels(label_names + ("le",), key + (_number(upper),))
                            lines.append(f"{name}_bucket{lab} {n}")
                        lines.append(f"{name}_sum{_labels(label_names, key)} {_number(row[-2])}")
                        lines.append(f"{name}_count{_labels(label_names, key)} {row[-1]}")
        return "\n".join(lines) + "\n"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a page in the text format (what `Registry.render` writes):
    {(name, ((label, value), ...)): value}, labels sorted by name. A line that is not a comment
    and not a sample is a ValueError naming its number."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"line {n} is not a Prometheus sample: {line!r}")
        name, labels, value = m.groups()
        pairs = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(labels or "")))
        out[(name, pairs)] = math.inf if value == "+Inf" else float(value)
    return out


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (all of them when none given)."""
    want = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and want <= set(pairs))
