"""`allocator.keep_freed_blocks`: batch runs reuse freed blocks instead of faulting in new pages."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pidec import allocator

SRC = Path(__file__).resolve().parents[1] / "src"
GLIBC = platform.libc_ver()[0] == "glibc"

# A feed-forward layer's pattern at batch size: activations of 64 MiB (8,192 document tokens by
# 2,048 in float32; above the 32 MiB that glibc's own threshold can reach) made and freed in
# every call.
PATTERN = textwrap.dedent(
    """
    import resource, sys, threading, torch
    from pidec import allocator
    if sys.argv[1] == "keep":
        applied, said = allocator.keep_freed_blocks()
        assert applied, said
    torch.manual_seed(0)
    x, w = torch.randn(2048, 64), torch.randn(64, 8192)
    def layer(x):
        a, b = x @ w, x @ w
        return (torch.nn.functional.gelu(a) * b)[:, :64].contiguous()
    def calls():  # the median call's faults: now and then the heap still grows once after the warm-up
        layer(x), layer(x)
        faults = []
        for _ in range(11):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            layer(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(sorted(faults)[5])
    if sys.argv[2:] == ["thread"]:  # as a Ray actor runs its calls
        t = threading.Thread(target=calls)
        t.start(), t.join()
    else:
        calls()
    """
)


def faults_per_call(mode: str, thread: bool = False, env: dict | None = None) -> float:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"} | (env or {})
    args = [sys.executable, "-c", PATTERN, mode] + (["thread"] if thread else [])
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, keep = faults_per_call("default"), faults_per_call("keep")
    # glibc's defaults map each 64 MiB block afresh and fault in its 16,384 pages (x4 a call);
    # kept, the next call reuses the same pages
    assert default > 10_000, f"glibc's defaults faulted only {default} pages a call: the check shows nothing"
    assert keep < 20, f"{keep} page faults a call with freed blocks kept"


@pytest.mark.skipif(not GLIBC, reason="malloc arenas are glibc's")
def test_a_thread_keeps_freed_blocks_with_one_heap(monkeypatch):
    for name in (*allocator.USER_MALLOC_VARIABLES, allocator.ARENA_MAX_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    one_heap = allocator.one_heap_environment()
    assert one_heap == {"MALLOC_ARENA_MAX": "1"}
    # a thread's own heap is at most 64 MiB: its 64 MiB blocks are mapped afresh whatever the thresholds
    thread = faults_per_call("keep", thread=True)
    assert thread > 10_000, f"a thread of its own faulted only {thread} pages a call: the check shows nothing"
    assert faults_per_call("keep", thread=True, env=one_heap) < 20


def test_one_heap_leaves_the_users_malloc_settings(monkeypatch):
    for name in (*allocator.USER_MALLOC_VARIABLES, allocator.ARENA_MAX_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_libc", lambda: object())
    assert allocator.one_heap_environment() == {"MALLOC_ARENA_MAX": "1"}
    for name in (*allocator.USER_MALLOC_VARIABLES, allocator.ARENA_MAX_VARIABLE):
        monkeypatch.setenv(name, "4")
        assert allocator.one_heap_environment() == {}, name
        monkeypatch.delenv(name)
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.one_heap_environment() == {}


def test_thresholds_are_checked_and_the_users_settings_win(monkeypatch):
    for bad in (0, -1, 1 << 31, 2.5, True):
        with pytest.raises(ValueError, match="must be an integer in 1 .. 2\\*\\*31 - 1 bytes"):
            allocator.keep_freed_blocks(mmap_threshold=bad)
        with pytest.raises(ValueError, match="trim_threshold"):
            allocator.keep_freed_blocks(trim_threshold=bad)
    monkeypatch.setattr(allocator, "_libc", lambda: pytest.fail("mallopt called over the user's setting"))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_freed_blocks() == (False, "malloc: left as set by MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert allocator.keep_freed_blocks() == (False, "malloc: left as set by GLIBC_TUNABLES")
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.keep_freed_blocks() == (False, "malloc: not glibc, left as it is")


def test_a_glibc_that_takes_at_most_32_mib_gets_32_mib(monkeypatch):
    class Libc:
        def __init__(self):
            self.calls = []

        def mallopt(self, param, value):
            self.calls.append((param, value))
            return int(param != allocator.M_MMAP_THRESHOLD or value <= allocator.GLIBC_MAX_MMAP_THRESHOLD)

    libc = Libc()
    monkeypatch.setattr(allocator, "_libc", lambda: libc)
    for name in allocator.USER_MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    applied, said = allocator.keep_freed_blocks()
    assert applied and "mmap threshold 32 MiB, trim threshold 1024 MiB" in said
    assert libc.calls == [
        (allocator.M_MMAP_THRESHOLD, 256 << 20),
        (allocator.M_MMAP_THRESHOLD, 32 << 20),
        (allocator.M_TRIM_THRESHOLD, 1 << 30),
    ]
