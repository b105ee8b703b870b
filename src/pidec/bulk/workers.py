"""Who decodes the batches: this process (one worker), or N worker processes on this machine.

Both take `submit(key, jobs, options)` and hand back `(key, output records)` from `next_result`;
the runner decides what goes in a batch and in which order results are written, so the output
does not depend on the number of workers.

Worker processes are started with `spawn`, each loads the model once, with its share of the
CPU cores (`torch.set_num_threads(cores // N)`) or, on CUDA without a device index, one device
each (`cuda:i`). A worker that dies (killed, out of memory) stops the run with a message naming
it, rather than waiting forever; a worker whose parent is gone (the run was killed) exits
within a second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from collections import deque
from dataclasses import dataclass, replace

import torch

from .. import allocator, checkpoint, lora
from ..api import load
from ..causal import Template, use_template
from ..errors import InputError
from .extract import Options, decode

MALLOC = ("keep", "default")


@dataclass(frozen=True)
class ModelSpec:
    """How each worker loads the model (the arguments of `pidec.load`)."""

    path: str
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str | None = None
    tokenizer: str | None = None
    max_input_length: int | None = None
    pack_weights: bool | None = None
    threads: int | None = None  # torch threads in this worker (None: torch's default)
    template: Template | None = None  # decoder-only checkpoints: how rows are built (None: the default)
    malloc: str = "keep"  # keep: freed blocks stay for the next batch (`allocator.keep_freed_blocks`) | default

    def __post_init__(self):
        if self.malloc not in MALLOC:
            raise InputError(f"--malloc {self.malloc!r}: expected {' or '.join(MALLOC)}")

    def load(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        model = load(
            self.path,
            device=self.device,
            dtype=self.dtype,
            tokenizer=self.tokenizer,
            max_input_length=self.max_input_length,
            quantize=self.quantize,
            pack_weights=self.pack_weights,
        )
        use_template(model, self.template)
        if self.malloc == "keep" and model.device.type == "cpu":  # after the load: its buffers go back
            allocator.keep_freed_blocks()
        return model

    def load_tokenizer(self):
        """The tokenizer alone, found as `pidec.load` finds it (for a parent that decodes nothing)."""
        folder = checkpoint.resolve(self.path)
        source = self.tokenizer or (lora.tokenizer_folder(folder) if lora.is_adapter(folder) else None) or folder
        return checkpoint.load_tokenizer(source)

    def for_worker(self, i: int, workers: int) -> ModelSpec:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        device = self.device
        if device == "cuda" and workers > 1:
            device = f"cuda:{i % max(1, torch.cuda.device_count())}"
        return replace(self, device=device, threads=self.threads or max(1, cores // workers))


class WorkerFailed(RuntimeError):
    pass


class InProcess:
    """One worker: this process decodes each batch when it is submitted."""

    def __init__(self, spec: ModelSpec):
        self.model = spec.load()
        self.tokenizer = self.model.tokenizer
        self.max_input_length = self.model.config.max_input_length
        self.results: deque = deque()
        self.workers = 1
        self.malloc = allocator.batch_setting()

    def submit(self, key, jobs, options: Options) -> None:
        self.results.append((key, decode(self.model, jobs, options)))

    def next_result(self):
        return self.results.popleft()

    def close(self) -> None:
        pass


def _worker_main(spec: ModelSpec, tasks, results, parent: int) -> None:
    try:
        model = spec.load()
    except Exception as e:  # reported to the parent, which stops the run with it
        results.put(("failed", None, f"{type(e).__name__}: {e}" if not isinstance(e, InputError) else str(e)))
        return
    results.put(("ready", None, (model.config.max_input_length, allocator.batch_setting())))
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        key, jobs, options = task
        results.put(("done", key, decode(model, jobs, options)))


class Pool:
    """N worker processes, each with the model loaded once."""

    def __init__(self, spec: ModelSpec, workers: int):
        ctx = mp.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.workers = workers
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(spec.for_worker(i, workers), self.tasks, self.results, os.getpid()),
                daemon=True,
                name=f"pidec-run-worker-{i}",
            )
            for i in range(workers)
        ]
        for p in self.procs:
            p.start()
        self.tokenizer = spec.load_tokenizer()
        ready = []
        try:
            for _ in self.procs:
                kind, _, value = self._get()
                if kind == "failed":
                    raise InputError(f"a worker could not load the model: {value}")
                ready.append(value)
        except BaseException:
            self.close()
            raise
        self.max_input_length, self.malloc = ready[0]  # (the workers' limits and settings are alike)

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    p = dead[0]
                    raise WorkerFailed(f"worker {p.name} (pid {p.pid}) died with exit code {p.exitcode}")

    def submit(self, key, jobs, options: Options) -> None:
        self.tasks.put((key, jobs, options))

    def next_result(self):
        kind, key, records = self._get()
        return key, records

    def close(self) -> None:
        for _ in self.procs:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
