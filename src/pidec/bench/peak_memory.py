"""Peak memory of one configuration decoding one document, above the level before it: the CUDA
allocator's peak, or on the CPU the process RSS sampled every few milliseconds by a background
thread, after returning freed heap to the OS so that the baseline is honest. RSS sampling can
miss a peak shorter than the interval; the analytic memory report (`configs.memory_report`) is
the other view.
"""

from __future__ import annotations

import gc
import os
import threading

import torch


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed memory back (the CUDA cache, or glibc's heap)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover
        pass


class PeakMemory:
    """`with PeakMemory(device) as mem: ...` then `mem.peak_bytes`: the peak above the level at entry."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self):
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, rss_bytes())
            self.peak_bytes = self._max - self._base
        return False
