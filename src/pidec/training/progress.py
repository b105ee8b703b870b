"""What a run shows while it trains, on stderr: a progress bar (loss, tokens/s, ETA) on a
terminal, and off a terminal (a log file, a job scheduler) a plain line at the first step,
every `every` seconds and at the last step. Notes (evaluations, which checkpoint is best,
checkpoints passed over on resume) are a line of their own either way.
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of the steps from `initial` to `total`. bar=None: a bar only on a terminal."""

    def __init__(self, total: int, initial: int, bar: bool | None, every: float, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.initial, self.every, self.enabled = total, initial, every, enabled
        self.t0 = self.last_line = time.perf_counter()
        self.tokens = 0
        self.bar = None
        if enabled and (bar if bar is not None else self.stream.isatty()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream)

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        if not self.enabled:
            return
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            return
        if step == self.initial + 1 or step == self.total or now - self.last_line >= self.every:
            done = step - self.initial
            eta = (now - self.t0) / done * (self.total - step) if done else 0.0
            self.note(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s  "
                f"elapsed {format_duration(now - self.t0)}  eta {format_duration(eta)}"
            )
            self.last_line = now

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
