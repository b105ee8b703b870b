"""What a person sees during and after a run: a progress bar on a terminal, plain periodic log
lines otherwise, and the final summary (records, errors by kind, wall time, documents/s).

The bar (tqdm) shows documents, documents/s, output tokens/s and, when the input's record count
is known, the ETA. Without a terminal (a log file, a batch job) one line every `log_every`
seconds says the same. Counts cover the whole output (a resumed run starts from what the
earlier runs did); rates cover this run only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Display:
    def __init__(self, total: int | None, initial: int = 0, mode: str = "auto", log_every: float = 10.0, stream=None):
        """mode: "auto" (bar on a terminal, else log lines), "bar", "log" or "off"."""
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.total, self.initial, self.log_every = mode, total, initial, log_every
        self.done, self.tokens = initial, 0
        self.t0 = self.last_log = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="doc", dynamic_ncols=True, file=self.stream, desc="pidec run"
            )

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return (self.done - self.initial) / elapsed, self.tokens / elapsed

    def update(self, records: int, output_tokens: int) -> None:
        self.done += records
        self.tokens += output_tokens
        docs_s, tok_s = self.rates()
        if self.bar is not None:
            self.bar.update(records)
            self.bar.set_postfix_str(f"{tok_s:.0f} out tok/s", refresh=False)
        elif self.mode == "log" and time.perf_counter() - self.last_log >= self.log_every:
            self.last_log = time.perf_counter()
            self.stream.write(self.line(docs_s, tok_s) + "\n")
            self.stream.flush()

    def line(self, docs_s: float, tok_s: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        text = f"pidec run: {self.done}{of} documents, {docs_s:.2f} documents/s, {tok_s:.0f} output tokens/s"
        if self.total is not None and docs_s > 0:
            text += f", ETA {_duration(max(0, self.total - self.done) / docs_s)}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(counts: dict, wall_s: float, records_this_run: int, tokens_this_run: int, **extra) -> dict:
    errors = counts["errors"]
    return {
        "records": counts["records"],
        "answered": counts["answered"],
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "truncated": counts["truncated"],
        "output_tokens": counts["output_tokens"],
        "records_this_run": records_this_run,
        "wall_s": round(wall_s, 3),
        "documents_per_s": round(records_this_run / wall_s, 3) if wall_s > 0 else None,
        "output_tokens_per_s": round(tokens_this_run / wall_s, 1) if wall_s > 0 else None,
    } | extra


def write_summary(result: dict, path: str | Path | None) -> dict:
    """`result` (a run's `summary`), also written as JSON to `path` when one is given."""
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_summary(s: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in s["errors_by_kind"].items())
    lines = [
        f"pidec run: {s['records']} records, {s['answered']} answered, {s['errors']} errors"
        + (f" ({kinds})" if kinds else "")
        + (f", {s['truncated']} documents truncated" if s["truncated"] else ""),
        f"  this run: {s['records_this_run']} records in {_duration(s['wall_s'])} "
        f"({s['documents_per_s'] or 0:.2f} documents/s, {s['output_tokens_per_s'] or 0:.0f} output tokens/s)",
    ]
    if s.get("output"):
        lines.append(f"  output: {s['output']}")
    return "\n".join(lines)
