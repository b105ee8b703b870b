"""The service's path for a decoder-only checkpoint (a `CausalModel`: Llama, Qwen2, Qwen3, Mistral).

The HTTP contract, the limits, the timeouts and the metrics are the rest of the package's (app.py,
settings.py, requests.py); this module holds the two places where a decoder-only model differs
from T5:

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

import time
from dataclasses import dataclass

from ..causal.api import CausalModel, check_beams, usage
from ..causal.layouts import CausalPlan, concat
from ..errors import InputError
from ..generate import Aborted
from .batcher import Job, JobQueue
from .schema import GenerateRequest
from .settings import ServeSettings


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


def build_job(model: CausalModel, settings: ServeSettings, req: GenerateRequest, budgets: list[int]) -> CausalJob:
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


class CausalBatcher(JobQueue):
    """`JobQueue` for a `CausalModel`: jobs go in with `submit`, results come out via their
    `on_done`; a batch is taken whole and decoded to its end (no continuous batching)."""

    def __init__(self, model: CausalModel, **limits):
        """`limits`: `JobQueue`'s (max_batch_tokens, max_batch_documents, max_wait_ms, max_queue, metrics)."""
        super().__init__(**limits)
        self.model = model
        self.steps = 0  # decoding steps run so far

    @property
    def active_rows(self) -> int:
        return sum(j.decoder_rows for j in self._active)

    # -- the decoding thread ----------------------------------------------------------------

    def _decode(self, jobs: list[CausalJob]) -> None:
        try:
            self._run(jobs)
        finally:
            self._active = []

    def _recover(self, jobs: list[CausalJob], error: Exception) -> None:
        self._fail(jobs, error)

    def _select(self) -> list[CausalJob]:
        """The next batch, in arrival order: one layout, within the budgets."""
        taken = [self._pending.popleft()]
        while self._pending and len(taken) < self.max_batch_documents:
            job = self._pending[0]
            if job.plan.layout != taken[0].plan.layout or footprint([*taken, job]) > self.max_batch_tokens:
                break  # in arrival order: a job is not overtaken by later ones
            taken.append(self._pending.popleft())
        self._active = taken
        return taken

    def _footprint(self, jobs) -> int:
        return footprint(jobs)

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
        if not self._expired(job):
            super()._finish(job)

    def _answers(self, job: CausalJob) -> list[str]:
        return self.model.answers(job.plan, job.tokens)[0]

    def _account(self, job: CausalJob) -> None:
        job.usage = usage(job.plan, job.tokens)
