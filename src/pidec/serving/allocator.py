"""How the service keeps its resident memory from creeping up under load (glibc's malloc).

A long-running service allocates tensors of a different shape at nearly every decoding step
(rows join and leave the batch) and strings of every size while it tokenizes. glibc's malloc
gives each thread that allocates concurrently an arena of its own (up to eight per core), and
blocks below its mmap threshold (which grows by itself up to 32 MiB as large blocks are freed)
come from those arenas and stay mapped after they are freed. The process then holds the sum of
every arena's high-water mark, fragmented, long after the load has gone: the resident set grows
round after round although nothing is leaked.

Three settings bound it, all applied by `pidec serve` before the model is loaded:

- `limit_arenas(n)`: `mallopt(M_ARENA_MAX, n)`, what `MALLOC_ARENA_MAX=n` does, so that the
  decoding thread, the tokenizer threads and the event loop share a few arenas. It only takes
  effect if called before glibc has fixed its arena limit, which it does when a ninth arena is
  first needed: early in the process, before threads start.
- `trim()`: `malloc_trim(0)`, which gives every whole free page of every arena back to the
  operating system. The service calls it once each time it has been idle for a while
  (`ServeSettings.trim_after_idle_s`), in a worker thread; it costs a walk over the heaps
  (milliseconds), never a request's latency.
- `limit_primitive_caches(n)`: oneDNN (the packed float32 linear layers, `pidec.packing`)
  keeps a compiled primitive, with its buffers, for every input shape it has seen, up to 1024
  of them in each of its two caches (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, and torch's
  `LRU_CACHE_CAPACITY` for ideep). A continuous batch changes its row count at nearly every
  step, so the service would fill both over hours. A few dozen entries keep the shapes in use;
  a new shape costs one primitive creation (well under a millisecond). The variables are read
  once, when the first primitive is made: set them before the model is loaded (packing makes
  primitives); a value already in the environment is left as it is.

On a C library other than glibc (musl, macOS) both are no-ops that return False."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_ARENA_MAX = -8  # glibc's malloc.h


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only: AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(n: int) -> bool:
    """Cap the number of malloc arenas at `n` (>= 1). True if glibc took the setting."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"malloc_arena_max must be an integer >= 1, got {n!r}")
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, n) == 1)


def trim() -> bool:
    """Give the free pages of every arena back to the OS. True if glibc released some memory."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)


PRIMITIVE_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_primitive_caches(n: int) -> dict[str, str]:
    """Set oneDNN's and ideep's primitive cache capacities to `n` unless already set in the
    environment; returns the values in force."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"primitive_cache must be an integer >= 1, got {n!r}")
    for name in PRIMITIVE_CACHE_VARIABLES:
        os.environ.setdefault(name, str(n))
    return {name: os.environ[name] for name in PRIMITIVE_CACHE_VARIABLES}
