"""The service's scheduler: one thread that turns concurrent requests into shared-cache batches.

Requests (`Job`s, one document with its prompts, already tokenized into a `layouts.Plan`) wait
in a bounded queue. The decoding thread admits them in arrival order while the batch stays
within a token budget (`max_batch_tokens`, counted by `footprint`: the cache slots the batch
holds as the session will hold them) and a number of documents (`max_batch_documents`; 1 turns
batching off). When it has nothing running it first waits up to `max_wait_ms` for more requests,
so that requests arriving close together start together.

Every job, greedy or beam search, joins one `DecodeSession` between decoding steps (continuous
batching): its documents are encoded one job at a time, exactly as `Model.generate` encodes them,
its rows prefilled and merged into the running batch, and each row leaves when it ends. Greedy
and beam rows advance together, one step of the session at a time, so a long beam request does
not hold up a greedy one that arrives while it runs (nor the other way round).

A job whose caller has gone (deadline passed, client disconnected) is dropped at the next step
boundary: its rows leave the batch, nothing else changes. An exception fails the jobs it
touched only: while encoding, that job; while admitting, the jobs joining (the running batch is
left whole); during a step, the jobs of the running batch, and the next ones start a fresh
session. Torch runs in this thread
alone, so the event loop that serves HTTP is never blocked by a decoding step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import layouts
from ..api import Model, token_usage
from ..generate import Row, budget_ranges, encode, sync
from ..model import CrossCache
from ..session import DecodeSession, concat_cross
from .prometheus import Registry

log = logging.getLogger("pidec.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new requests."""


class Cancelled(Exception):
    """The job was dropped before it finished: `reason` is "timeout" or "disconnected"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BatchFailed(Exception):
    """Decoding the batch this job was in raised an exception."""


@dataclass
class Job:
    """One request: a document and its prompts as a plan of encoder and decoder rows.

    `on_done(job)` is called exactly once, from whichever thread settles the job, after
    `outputs` (success) or `error` is set."""

    plan: layouts.Plan
    num_beams: int = 1
    deadline: float = math.inf  # time.monotonic() after which the job is dropped
    on_done: Callable[[Job], None] | None = None
    arrived: float = field(default_factory=time.monotonic)
    outputs: list[str] | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    error: Exception | None = None
    cancelled: str | None = None  # why the caller gave up, set from its thread
    started: float = 0.0  # when the decoding thread took it
    encode_s: float = 0.0
    encoded: float = 0.0  # when its encoding ended
    tokens: list = field(default_factory=list)  # per decoder row, once it ends
    row_ids: list[int] = field(default_factory=list)
    left: int = 0  # rows still decoding
    settled: bool = False

    @property
    def encoder_tokens(self) -> int:
        return sum(len(d) for d in self.plan.docs)

    @property
    def decoder_rows(self) -> int:
        return len(self.plan.rows) * self.num_beams


def footprint(jobs, session: DecodeSession | None = None) -> int:
    """Cache slots the decoding batch holds once these jobs have joined `session` (None: an empty
    one): the cross-attention cache, documents x the longest document (they are padded side by
    side), and the self-attention cache, decoder rows x its length as the session will set it
    (`DecodeSession.capacity_after`: the live rows' window or the new prompts, whichever is
    longer, plus the most slots any row may still write)."""
    jobs = list(jobs)
    lengths = [len(d) for j in jobs for d in j.plan.docs]
    rows = [r for j in jobs for r in j.plan.rows]
    prefix = max((len(r.prefix) for r in rows), default=0)
    budget = max((r.max_new_tokens for r in rows), default=0)
    if session is None or not session.rows:
        return len(lengths) * max(lengths, default=0) + sum(j.decoder_rows for j in jobs) * (prefix + budget)
    docs = session.docs + len(lengths)
    decoder_rows = session.rows + sum(j.decoder_rows for j in jobs)
    return docs * max([session.document_length, *lengths]) + decoder_rows * session.capacity_after(prefix, budget)


def declare_metrics(metrics: Registry) -> None:
    metrics.counter("pidec_batch_steps_total", "decoding steps run by the batcher")
    metrics.histogram("pidec_batch_requests", "requests in the batch at each decoding step", (1, 2, 4, 8, 16, 32, 64))
    metrics.histogram("pidec_batch_rows", "decoder rows computed at each decoding step", (1, 4, 16, 64, 256, 1024))
    metrics.histogram(
        "pidec_batch_cache_slots",
        "self-attention cache slots per row at each decoding step",
        (16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    )
    metrics.counter("pidec_tokens_total", "tokens of finished requests", ("kind",))
    metrics.counter("pidec_batch_failures_total", "batches whose decoding raised an exception")


class JobQueue:
    """What both batchers share (T5's `Batcher`, the decoder-only `serving.causal.CausalBatcher`):
    the bounded queue of jobs, the decoding thread, and the verbs app.py calls (submit, cancel,
    start, stop and the gauges). A subclass says how a batch decodes (`_loop`), which waiting
    jobs join it (`_select`, called under the lock in arrival order), what a set of jobs costs in
    cache slots (`_footprint`), and how a finished job's answers and usage are read (`_answers`,
    `_account`). Settling a job (success, cancellation or failure) is done here, exactly once."""

    def __init__(
        self,
        max_batch_tokens: int = 32768,
        max_batch_documents: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
        metrics: Registry | None = None,
    ):
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_batch_documents", max_batch_documents),
            ("max_queue", max_queue),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_documents = max_batch_documents
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        if metrics is not None:
            declare_metrics(metrics)
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []  # the jobs decoding now
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the caller's side ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pidec-decode", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        """Started once and no longer running."""
        return self._thread is not None and not self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_requests(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (max_queue={self.max_queue})")
            job.left = len(job.plan.rows)
            job.tokens = [None] * len(job.plan.rows)
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str) -> None:
        """The caller gives up on `job`: a waiting job leaves the queue now; a decoding one is
        dropped as the subclass says (T5: at the next step boundary; decoder-only: its batch goes
        on, and stops once all its callers have gone)."""
        job.cancelled = reason
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return
        self._settle(job, Cancelled(reason))

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new jobs, finish the ones held (queued and running), then end the thread.
        Returns whether it ended within `timeout`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- what a subclass says ---------------------------------------------------------------

    def _decode(self, jobs: list[Job]) -> None:
        """Start the jobs just taken (possibly none) and decode (T5: one step; decoder-only: the
        whole batch)."""
        raise NotImplementedError

    def _recover(self, jobs: list[Job], error: Exception) -> None:
        """`_decode(jobs)` raised: fail the jobs it touched, leave the thread ready for more."""
        raise NotImplementedError

    def _select(self) -> list[Job]:
        """The waiting jobs to start now, popped from the queue's front (called under the lock)."""
        raise NotImplementedError

    def _footprint(self, jobs) -> int:
        """Cache slots a batch of these jobs alone would hold."""
        raise NotImplementedError

    def _answers(self, job: Job) -> list[str]:
        """The finished job's answers as text."""
        raise NotImplementedError

    def _account(self, job: Job) -> None:
        """Set the finished job's `usage` (and `timings`, where not set yet)."""
        raise NotImplementedError

    # -- the decoding thread: admission and settling ----------------------------------------

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._decode(jobs)
            except Exception as e:  # noqa: BLE001 - a bug here must not end the service
                self._recover(jobs, e)

    def _take(self) -> list[Job] | None:
        """The jobs to start now, in arrival order, within the budgets (`_select`); waits while
        there is nothing to do and, when nothing runs, up to max_wait_ms for more requests so
        that requests arriving close together start together. None: stopped and nothing left."""
        with self._cond:
            while not self._pending and not self._active:
                if self._stopping:
                    return None
                self._cond.wait()
            if not self._active and self.max_wait_s > 0 and not self._stopping:
                until = self._pending[0].arrived + self.max_wait_s
                while not self._full() and not self._stopping:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._select()

    def _full(self) -> bool:
        return len(self._pending) >= self.max_batch_documents or self._footprint(self._pending) >= self.max_batch_tokens

    def _expired(self, job: Job) -> bool:
        """Settle the job as cancelled if its caller gave up or its deadline passed."""
        if job.cancelled is None and time.monotonic() > job.deadline:
            job.cancelled = "timeout"
        if job.cancelled is not None:
            self._settle(job, Cancelled(job.cancelled))
            return True
        return False

    def _count_failure(self, error: Exception) -> None:
        log.error("decoding a batch failed", exc_info=error)
        if self.metrics is not None:
            self.metrics.inc("pidec_batch_failures_total")

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """Decoding these jobs raised: count the failure once and fail each of them."""
        self._count_failure(error)
        for job in jobs:
            self._settle(job, BatchFailed(f"decoding failed: {type(error).__name__}: {error}"))

    def _finish(self, job: Job) -> None:
        """The job's rows have all ended: its answers, usage and token counts, then settle it."""
        try:
            job.outputs = self._answers(job)
        except Exception as e:
            log.exception("decoding tokens to text failed")
            self._settle(job, BatchFailed(f"detokenizing failed: {type(e).__name__}: {e}"))
            return
        self._account(job)
        if self.metrics is not None:
            for kind in ("document", "prompt", "output"):
                self.metrics.inc("pidec_tokens_total", job.usage[f"{kind}_tokens"], kind=kind)
        self._settle(job, None)

    def _settle(self, job: Job, error: Exception | None) -> None:
        with self._cond:
            if job.settled:
                return
            job.settled = True
        job.error = error
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:  # a caller's callback must not stop the decoding thread
                log.exception("a request's completion callback failed")


class Batcher(JobQueue):
    """Owns the model while it runs: jobs go in with `submit`, results come out via `on_done`.
    Jobs join one running `DecodeSession` between its steps (continuous batching)."""

    def __init__(self, model: Model, **limits):
        """`limits`: `JobQueue`'s (max_batch_tokens, max_batch_documents, max_wait_ms, max_queue, metrics)."""
        super().__init__(**limits)
        self.model = model
        self._rows: dict[int, tuple[Job, int]] = {}  # session row id -> (job, row index in its plan)
        self._session = DecodeSession(model.model)

    @property
    def active_rows(self) -> int:
        return self._session.rows

    @property
    def steps(self) -> int:
        """Decoding steps run so far (by the current session: a failed batch starts a new one)."""
        return self._session.steps

    @property
    def cache_slots(self) -> int:
        """Cache slots the running batch holds now, counted as `footprint` counts them."""
        return footprint([], self._session)

    # -- the decoding thread ----------------------------------------------------------------

    def _decode(self, jobs: list[Job]) -> None:
        for nb in sorted({j.num_beams for j in jobs}):  # one admission (one search) per beam count
            self._admit([j for j in jobs if j.num_beams == nb], nb)
        self._drop_cancelled()
        if self._session.rows:
            self._step()

    def _recover(self, jobs: list[Job], error: Exception) -> None:
        self._fail_session(error, [j for j in jobs if not j.settled and j not in self._active])

    def _select(self) -> list[Job]:
        taken = []
        while self._pending:
            candidate = taken + [self._pending[0]]
            if (self._active or taken) and (
                len(self._active) + len(candidate) > self.max_batch_documents
                or footprint(candidate, self._session) > self.max_batch_tokens
            ):
                break  # in arrival order: a large job is not overtaken by smaller ones
            taken.append(self._pending.popleft())
        return taken

    def _footprint(self, jobs) -> int:
        return footprint(jobs)

    def _encode(self, job: Job) -> CrossCache:
        """The job's documents encoded as `Model.generate` encodes them (same chunks, same shapes)."""
        model = self.model
        docs = job.plan.docs
        t0 = time.perf_counter()
        parts = [
            encode(model.model, docs[lo:hi]) for lo, hi in budget_ranges([len(d) for d in docs], model.max_batch_tokens)
        ]
        sync(model.device)
        job.encode_s = time.perf_counter() - t0
        job.encoded = time.monotonic()
        return concat_cross(parts)

    def _prepare(self, jobs: list[Job]) -> tuple[list[Job], list[CrossCache], list[Row], list[tuple[Job, int]]]:
        """Encode each job (a failure fails that job alone) and lay their rows side by side."""
        ready, crosses, rows, owners = [], [], [], []
        base = 0
        for job in jobs:
            job.started = time.monotonic()
            if self._expired(job):
                continue
            try:
                cross = self._encode(job)
            except Exception as e:  # reported to this job's caller as a 500
                log.exception("encoding a request failed")
                self._settle(job, BatchFailed(f"encoding failed: {type(e).__name__}: {e}"))
                continue
            ready.append(job)
            crosses.append(cross)
            for k, r in enumerate(job.plan.rows):
                rows.append(Row(r.doc + base, r.prefix, r.max_new_tokens))
                owners.append((job, k))
            base += cross.docs
        return ready, crosses, rows, owners

    def _admit(self, jobs: list[Job], num_beams: int) -> None:
        ready, crosses, rows, owners = self._prepare(jobs)
        if not ready:
            return
        try:
            ids = self._session.admit(concat_cross(crosses), rows, num_beams)
        except Exception as e:  # noqa: BLE001 - the joining requests fail, the running ones go on
            self._fail(ready, e)
            return
        for rid, (job, k) in zip(ids, owners):
            self._rows[rid] = (job, k)
            job.row_ids.append(rid)
        self._active.extend(ready)

    def _step(self) -> None:
        if self.metrics is not None:
            self.metrics.inc("pidec_batch_steps_total")
            self.metrics.observe("pidec_batch_requests", len(self._active))
            self.metrics.observe("pidec_batch_rows", self._session.rows)
            self.metrics.observe("pidec_batch_cache_slots", self._session.capacity)
        try:
            done = self._session.step()
        except Exception as e:  # noqa: BLE001 - the batch fails, the service goes on
            self._fail_session(e, [])
            return
        for rid, tokens in done:
            job, k = self._rows.pop(rid)
            job.tokens[k] = tokens
            job.left -= 1
            if job.left == 0:
                self._active.remove(job)
                self._finish(job)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._active if j.cancelled or time.monotonic() > j.deadline]:
            self._session.drop(job.row_ids)
            for rid in job.row_ids:
                self._rows.pop(rid, None)
            self._active.remove(job)
            self._expired(job)

    def _fail_session(self, error: Exception, extra: list[Job]) -> None:
        """The running batch raised: fail its jobs (and those joining it), start a fresh session."""
        failed = self._active + extra
        self._active, self._rows = [], {}
        self._session = DecodeSession(self.model.model)
        self._fail(failed, error)

    def _answers(self, job: Job) -> list[str]:
        return layouts.collect(job.plan, job.tokens, self.model.tokenizer)[0]

    def _account(self, job: Job) -> None:
        plan = job.plan
        now = time.monotonic()
        job.usage = token_usage(sum(len(d) for d in plan.docs), plan.prompt_tokens, job.tokens)
        job.timings = {
            "queue_ms": round((job.started - job.arrived) * 1e3, 3),
            "encode_ms": round(job.encode_s * 1e3, 3),
            "decode_ms": round((now - job.encoded) * 1e3, 3),
        }
