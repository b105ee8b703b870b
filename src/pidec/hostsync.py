"""Reads of device tensors on the host, in one place, so that they can be counted.

On a GPU every read of a tensor's value on the host (`.item()`, `bool(t)`, `int(t)`, `.tolist()`,
`.cpu()`) waits for all the work queued before it: the host stops launching kernels, the GPU
runs dry, and a decoding step that should be bound by memory bandwidth becomes bound by the
round trip. The decoding engine (`generate`, `search`, `session`) and `model.RowGroups` read
device values only through the functions below, and `SyncCounter` counts those reads, on the CPU
too (where a read costs nothing, but the count says what the same run would cost on a GPU).

    with SyncCounter() as count:
        decode(...)
    count.syncs        reads that would synchronise on a GPU
    count.sites        the same, by the name each read gives its site
    count.uploads      host -> device copies of small index lists (asynchronous: not syncs)

Copies from the host to the device (`upload`) are made with `non_blocking=True`: from pageable
memory CUDA stages the data before the call returns and does not wait for the queued work, so
they are counted apart, not as synchronisations.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter

import torch
from torch import Tensor

_local = threading.local()


def _counters() -> list[SyncCounter]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class SyncCounter:
    """Counts the host reads of device tensors made by this thread while it is active (a context
    manager; counters nest, each counting everything inside it). `reading` is True while one of
    this module's reads runs (tests use it to check that no read bypasses the count)."""

    def __init__(self) -> None:
        self.syncs = 0
        self.uploads = 0
        self.sites: Counter[str] = Counter()

    def __enter__(self) -> SyncCounter:
        _counters().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _counters().remove(self)

    def __repr__(self) -> str:
        return f"SyncCounter(syncs={self.syncs}, uploads={self.uploads}, sites={dict(self.sites)})"


def reading() -> bool:
    """True while a counted read is running (for tests that look for uncounted ones)."""
    return getattr(_local, "reading", False)


def _count(site: str) -> None:
    for c in _counters():
        c.syncs += 1
        c.sites[site] += 1


@contextlib.contextmanager
def _marked_reading():
    """Inside the block, `reading()` is True: what runs there is a counted read."""
    _local.reading = True
    try:
        yield
    finally:
        _local.reading = False


def to_host(t: Tensor, site: str) -> Tensor:
    """`t` on the host: one synchronisation on a GPU (counted whatever the device)."""
    _count(site)
    with _marked_reading():
        return t.cpu()


def read_list(t: Tensor, site: str) -> list:
    """`t.tolist()` through one counted read."""
    host = to_host(t, site)
    with _marked_reading():
        return host.tolist()


def read_int(t: Tensor, site: str) -> int:
    """int(t) of a one-element tensor, one counted read."""
    return int(read_list(t.reshape(()), site))


def read_bool(t: Tensor, site: str) -> bool:
    """bool(t) of a one-element tensor, one counted read."""
    return bool(read_list(t.reshape(()), site))


def to_device(t: Tensor, device) -> Tensor:
    """A tensor built on the host, copied to `device` without waiting (counted in `uploads`)."""
    for c in _counters():
        c.uploads += 1
    if torch.device(device).type == "cpu":
        return t
    return t.to(device, non_blocking=True)


def upload(values, dtype: torch.dtype, device) -> Tensor:
    """A host list as a device tensor, copied without waiting for the device (see the module's
    docstring); counted in `uploads`."""
    return to_device(torch.tensor(values, dtype=dtype), device)
