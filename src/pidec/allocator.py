"""glibc malloc settings for pidec's own processes: the service's bounds on resident memory,
and batch runs' reuse of freed blocks.

**The service** (`pidec serve`) keeps its resident memory from creeping up under load.

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

**Batch runs** (`pidec run`, each worker process and each Ray actor) face the opposite problem.
A batch of 8 documents of 512 tokens makes tensors of 4-16 MiB in every layer (the encoder's
feed-forward activations are 4,096 x 2,048), freed at the end of the layer and made again in
the next. With glibc's defaults the top of the heap is given back to the kernel whenever more
than twice the (dynamic) mmap threshold is free there, and blocks over that threshold are
mapped and unmapped on every allocation: each new tensor then lands on fresh pages, and the
kernel faults in and zeroes every 4 KiB of it. Measured on a 2-core AMD EPYC (bf16, T5 base):
about 20,000 page faults per document encoded in batches of 8, and batched encoding 30-40%
slower per document than one document at a time, where the tensors are small enough to be
reused. `keep_freed_blocks()` raises both thresholds (`mallopt(M_MMAP_THRESHOLD)` and
`mallopt(M_TRIM_THRESHOLD)`, what `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` do), so
that freed blocks stay in the heap and the next batch reuses them: no faults after the first
batch. The cost is that the process keeps its heap's high-water mark (the largest batch's
working set) instead of returning it between batches, which a run that goes from batch to batch
holds anyway. It is applied after the model is loaded, so that the loading's temporary buffers
are still returned. It does all of this for allocations made on the process's main thread
(where `pidec run` and its `--workers` decode); a thread of its own (Ray runs an actor's calls
off the main thread) allocates from per-thread heaps of at most 64 MiB, where blocks of 16 MiB
are kept either way (about 400 faults a call in a test of that pattern, raised thresholds or
not) and 64 MiB blocks are mapped afresh every time whatever the thresholds. A process that
decodes off its main thread is therefore started with `one_heap_environment()`
(`MALLOC_ARENA_MAX=1`: every thread allocates from the main heap, where the thresholds hold; a
Ray actor of `pidec run --engine ray`). Measured on a 2-core AMD EPYC (AVX2, float32, T5 base,
512-token documents with 30 fields): in batches of 8 documents the first batch made 343,630
page faults on a thread of its own, 162,011 on a thread with `MALLOC_ARENA_MAX=1` and 164,517
on the main thread, the later ones next to none in all three; in batches of 16 (`--batch-tokens
8192`, the default), where a feed-forward activation is 96 MiB, every batch on a thread of its
own made about a million faults (1,010,800 in the second, 3.6 s of kernel time, 43.3 s for the
batch) against 10,068 with `MALLOC_ARENA_MAX=1` (0.13 s; 40.2 s). A value the user set (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` in the environment) is left as
it is.

On a C library other than glibc (musl, macOS) every setting is a no-op that returns False
(`keep_freed_blocks`: a sentence saying so)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h


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


# Batch runs: blocks up to this size come from the heap (a 16 MiB activation at --batch-tokens
# 4096, 64 MiB at 16384), and up to this much free memory stays at the heap's top.
BATCH_MMAP_THRESHOLD = 256 << 20
BATCH_TRIM_THRESHOLD = 1 << 30
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # what older glibc accepts
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
ARENA_MAX_VARIABLE = "MALLOC_ARENA_MAX"  # set by `one_heap_environment`; not one that stops `keep_freed_blocks`


def keep_freed_blocks(
    mmap_threshold: int = BATCH_MMAP_THRESHOLD, trim_threshold: int = BATCH_TRIM_THRESHOLD
) -> tuple[bool, str]:
    """Let freed blocks up to `mmap_threshold` bytes stay in the heap for the next batch, and up
    to `trim_threshold` bytes free at its top (both at most 2 GiB - 1, glibc takes an int).
    Returns (applied, what was done in words); the words are also this process's
    `batch_setting()` from then on (the run's summary reports them)."""
    global _batch_setting
    applied, said = _keep_freed_blocks(mmap_threshold, trim_threshold)
    _batch_setting = said
    return applied, said


_batch_setting = "malloc: glibc's own thresholds"


def batch_setting() -> str:
    """What `keep_freed_blocks` did in this process, in words (glibc's own thresholds if it was
    not called). Malloc's settings belong to the process, so this does too."""
    return _batch_setting


def one_heap_environment() -> dict[str, str]:
    """Environment variables for a process of a batch run that decodes off its main thread:
    `MALLOC_ARENA_MAX=1`, so that the decoding thread allocates from the main heap, where
    `keep_freed_blocks` holds (a thread's own heap is at most 64 MiB, and larger blocks are
    mapped afresh for every tensor). Empty where the user set any malloc variable (this one
    included) or the C library is not glibc."""
    if any(os.environ.get(name) for name in (*USER_MALLOC_VARIABLES, ARENA_MAX_VARIABLE)) or _libc() is None:
        return {}
    return {ARENA_MAX_VARIABLE: "1"}


def _keep_freed_blocks(mmap_threshold: int, trim_threshold: int) -> tuple[bool, str]:
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
            raise ValueError(f"{name} must be an integer in 1 .. 2**31 - 1 bytes, got {value!r}")
    user = [name for name in USER_MALLOC_VARIABLES if os.environ.get(name)]
    if user:
        return False, f"malloc: left as set by {', '.join(user)}"
    libc = _libc()
    if libc is None:
        return False, "malloc: not glibc, left as it is"
    if libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:  # some glibc versions take at most 32 MiB
        mmap_threshold = min(mmap_threshold, GLIBC_MAX_MMAP_THRESHOLD)
        if libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
            return False, "malloc: glibc refused the mmap threshold, left as it is"
    if libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        return False, "malloc: glibc refused the trim threshold, left as it is"
    return (
        True,
        f"malloc: freed blocks kept for reuse (mmap threshold {mmap_threshold >> 20} MiB, trim threshold {trim_threshold >> 20} MiB)",
    )
