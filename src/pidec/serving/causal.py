"""The service's path for a decoder-only checkpoint (a `CausalModel`: Llama, Qwen2, Qwen3, Mistral).

The HTTP contract, the limits, the timeouts and the metrics are app.py's; this module holds the
two places where a decoder-only model differs from T5:

- `build_job`: a request's rows as `CausalModel.generate` builds them (the model's template, the
  rows' common prefix), checked against the service's limits: every row, document + prompt in
  the template, within max_document_tokens (413), and row + budget within the model's context;
- `CausalBatcher`: the decoding thread. It takes the requests waiting, in arrival order, while
  they share a layout and stay within max_batch_documents and max_batch_tokens (counted by
  `footprint`), and decodes them as one ragged batch (`CausalModel.decode_plan`: their prefixes
  prefilled together, every row leaving the batch when it ends). A request's answer is the one
  `CausalModel.generate` gives for it alone.

Unlike T5's `Batcher` there is no continuous batching: a batch runs to its end, and requests
arriving meanwhile wait for the next one. So a request whose caller has gone (deadline passed,
client disconnected) leaves the queue at once; one already decoding goes on with its batch (its
answer is dropped) unless every request of the batch has gone, which stops the batch at the next
step. The batch histograms (`pidec_batch_requests`, `pidec_batch_rows`) count
each batch once, at its start; `pidec_batch_steps_total` counts its decoding steps. An exception
while decoding fails the requests of that batch only (500); the next batch starts afresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..causal.api import CausalModel, check_beams, usage
from ..causal.layouts import CausalPlan, concat
from ..errors import InputError
from ..generate import Aborted
from .batcher import BatchFailed, Cancelled, Job, QueueFull, ShuttingDown, declare_metrics
from .prometheus import Registry

log = logging.getLogger("pidec.serve")


class DocumentTooLong(InputError):
    """A row (document + prompt in the model's template) above max_document_tokens: a 413."""


@dataclass
class CausalJob(Job):
    """One request for a decoder-only model: `plan` is its `CausalPlan` (one example)."""

    plan: CausalPlan

    @property
    def encoder_tokens(self) -> int:
        return self.plan.document_tokens

    @property
    def decoder_rows(self) -> int:
        return len(self.plan.rows)


def build_job(model: CausalModel, settings, req, budgets: list[int]) -> CausalJob:
    """A checked request (`GenerateRequest`, its budgets already within the service's limits)
    as a job: the rows `CausalModel.generate` would decode for it. InputError: a bad request
    (422); DocumentTooLong: a row above settings.max_document_tokens (413)."""
    check_beams(req.num_beams)
    plan = model.plan([(req.document, req.prompts)], [budgets], req.layout, check_length=False)
    for (_, j), row in zip(plan.owner, plan.rows):
        length = len(plan.prefixes[row.doc]) + len(row.tokens)
        if length > settings.max_document_tokens:
            raise DocumentTooLong(
                f"document + prompts[{j}] is {length} tokens in the model's template, above the limit "
                f"max_document_tokens={settings.max_document_tokens}"
            )
        if length + row.max_new_tokens > model.config.context_length:
            raise InputError(
                f"prompts[{j}]: {length} tokens + max_new_tokens {row.max_new_tokens} = "
                f"{length + row.max_new_tokens}, over the model's {model.context_name}"
            )
    return CausalJob(plan=plan, num_beams=req.num_beams)


def footprint(jobs) -> int:
    """Cache slots a batch of these jobs holds: every shared prefix once, and each row's own
    cache, rows x (the longest suffix + the largest budget), as `decode` allocates it."""
    rows = [r for j in jobs for r in j.plan.rows]
    if not rows:
        return 0
    prefixes = sum(len(p) for j in jobs for p in j.plan.prefixes)
    return prefixes + len(rows) * (max(len(r.tokens) for r in rows) + max(r.max_new_tokens for r in rows))


def describe_model(model: CausalModel) -> str:
    """What `describe` says of the model on the service's first line."""
    cfg = model.config
    params = sum(p.numel() for p in model.model.parameters())
    return (
        f"{cfg.model_type}, decoder-only, hidden_size={cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads} query / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}, {params / 1e6:.1f}M parameters"
    )


class CausalBatcher:
    """`Batcher`'s verbs (submit, cancel, start, stop and the gauges app.py reads) for a
    `CausalModel`: jobs go in with `submit`, results come out via their `on_done`."""

    def __init__(
        self,
        model: CausalModel,
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
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_documents = max_batch_documents
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        if metrics is not None:
            declare_metrics(metrics)
        self.steps = 0  # decoding steps run so far
        self._cond = threading.Condition()
        self._pending: deque[CausalJob] = deque()
        self._active: list[CausalJob] = []  # the batch decoding now
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
        return self._thread is not None and not self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_requests(self) -> int:
        return len(self._active)

    @property
    def active_rows(self) -> int:
        return sum(j.decoder_rows for j in self._active)

    def submit(self, job: CausalJob) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (max_queue={self.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: CausalJob, reason: str) -> None:
        """The caller gives up on `job`: a waiting job leaves the queue now; a decoding one
        goes on with its batch (which stops once all its callers have gone) and is dropped."""
        job.cancelled = reason
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return
        self._settle(job, Cancelled(reason))

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new jobs, finish the ones held, then end the thread. Returns whether it
        ended within `timeout`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the decoding thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._run(jobs)
            except Exception as e:  # noqa: BLE001 - a bug here must not end the service
                self._fail(jobs, e)
            finally:
                self._active = []

    def _take(self) -> list[CausalJob] | None:
        """The next batch, in arrival order: one layout, within the budgets. Waits while there is
        nothing to do, then up to max_wait_ms for more. None: stopped and nothing left."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            if self.max_wait_s > 0 and not self._stopping:
                until = self._pending[0].arrived + self.max_wait_s
                while not self._full() and not self._stopping:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            taken = [self._pending.popleft()]
            while self._pending and len(taken) < self.max_batch_documents:
                job = self._pending[0]
                if job.plan.layout != taken[0].plan.layout or footprint([*taken, job]) > self.max_batch_tokens:
                    break  # in arrival order: a job is not overtaken by later ones
                taken.append(self._pending.popleft())
            self._active = taken
            return taken

    def _full(self) -> bool:
        return len(self._pending) >= self.max_batch_documents or footprint(self._pending) >= self.max_batch_tokens

    def _run(self, jobs: list[CausalJob]) -> None:
        started = time.monotonic()
        for job in jobs:
            job.started = started
        jobs = [j for j in jobs if not self._expired(j)]
        if not jobs:
            return
        plan = concat([j.plan for j in jobs])
        if self.metrics is not None:
            self.metrics.observe("pidec_batch_requests", len(jobs))
            self.metrics.observe("pidec_batch_rows", len(plan.rows))

        def gone() -> bool:  # every caller of the batch has given up: stop decoding it
            now = time.monotonic()
            return all(j.cancelled is not None or now > j.deadline for j in jobs)

        try:
            tokens, stats = self.model.decode_plan(plan, should_stop=gone)
        except Aborted:
            for job in jobs:
                self._expired(job)
            return
        except Exception as e:  # noqa: BLE001 - the batch fails, the service goes on
            self._fail(jobs, e)
            return
        self.steps += stats.steps
        if self.metrics is not None:
            self.metrics.inc("pidec_batch_steps_total", stats.steps)
        k = 0
        for job in jobs:
            job.tokens = tokens[k : k + len(job.plan.rows)]
            k += len(job.plan.rows)
            job.encode_s = stats.encode_s
            job.timings = {
                "queue_ms": round((job.started - job.arrived) * 1e3, 3),
                "encode_ms": round(stats.encode_s * 1e3, 3),
                "decode_ms": round(stats.decode_s * 1e3, 3),
            }
            self._finish(job)

    def _finish(self, job: CausalJob) -> None:
        if self._expired(job):
            return
        try:
            job.outputs = self.model.answers(job.plan, job.tokens)[0]
        except Exception as e:
            log.exception("decoding tokens to text failed")
            self._settle(job, BatchFailed(f"detokenizing failed: {type(e).__name__}: {e}"))
            return
        job.usage = usage(job.plan, job.tokens)
        if self.metrics is not None:
            for kind in ("document", "prompt", "output"):
                self.metrics.inc("pidec_tokens_total", job.usage[f"{kind}_tokens"], kind=kind)
        self._settle(job, None)

    def _expired(self, job: CausalJob) -> bool:
        """Settle the job as cancelled if its caller gave up or its deadline passed."""
        if job.cancelled is None and time.monotonic() > job.deadline:
            job.cancelled = "timeout"
        if job.cancelled is not None:
            self._settle(job, Cancelled(job.cancelled))
            return True
        return False

    def _fail(self, jobs: list[CausalJob], error: Exception) -> None:
        log.error("decoding a batch failed", exc_info=error)
        if self.metrics is not None:
            self.metrics.inc("pidec_batch_failures_total")
        for job in jobs:
            self._settle(job, BatchFailed(f"decoding failed: {type(error).__name__}: {error}"))

    def _settle(self, job: CausalJob, error: Exception | None) -> None:
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
