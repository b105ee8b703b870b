"""`pidec serve`: an HTTP service that batches concurrent requests into shared-cache PiD decoding.

    POST /v1/generate   {"document", "prompts", "max_new_tokens"?, "num_beams"?, "layout"?}
                        -> {"outputs", "usage", "timings"}, one output per prompt, in prompt order
    GET  /healthz       alive: the decoding thread runs
    GET  /readyz        ready: model loaded, not shutting down
    GET  /metrics       Prometheus text: requests, errors by kind, queue depth, batch sizes,
                        latency histograms, tokens
    GET  /openapi.json  the schema (and /docs)

The outputs are those of `Model.generate` for the same input; the batching (`batcher.py`) only
decides which requests share the decoder's steps.

Every answer other than 200 is JSON `{"error": {"kind", "message", "limit"?}}` and is counted
under its kind in `pidec_errors_total`:

    401 unauthorized         missing or wrong bearer token
    404 not_found            no such path
    405 method_not_allowed   (with Allow)
    408 body_timeout         the body did not arrive within body_timeout_s (connection closed)
    413 too_large            body, document, prompt count or prompt length above its limit
    415 unsupported_media_type  a body that is not Content-Type: application/json
    422 invalid_json         not UTF-8, malformed, or nested too deeply
    422 invalid_request      wrong types, unknown fields, empty document or prompts, text that
                             is not valid Unicode (a lone surrogate)
    422 limit_exceeded       max_new_tokens or num_beams above its limit
    429 queue_full           with Retry-After
    499 disconnected         the client went away (mid-body or while waiting); nothing is sent
    500 internal             the batch it was in failed, or a bug; the service goes on
    503 unavailable          shutting down, or max_connections connections open
    504 timeout              not answered within request_timeout_s

Each request is counted once when it arrives (`pidec_http_requests_received_total`) and once
with the status it got (`pidec_http_requests_total`, 499 for a client that left): when the
service is idle the two sums are equal. One access line per request (method, path, status,
milliseconds) goes to the `pidec.access` logger.

Bounded against slow or hostile clients: a connection must deliver a request's head within
header_timeout_s and its body within body_timeout_s; at most max_connections are open (more
get 503 and are closed); tokenizing runs on tokenizer_threads threads, decoding on one.

On SIGTERM the service stops accepting connections, closes the idle ones, answers 503 to bodies
still arriving, and finishes the requests it holds; what is not answered within
shutdown_timeout_s gets 503 (its rows leave the batch), then the process exits.

This module is the application: `create_app` builds it around one `Service` (the model, its
batcher, the metrics, the tokenizer threads and the state of a shutdown), with its lifespan and
routes. The rest of the service is in its neighbours: settings.py (the limits), schema.py (the
wire format and `ServiceError`), requests.py (a body -> a checked job), gate.py (auth, body,
counting: before the app), server.py (uvicorn, connections, signals).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import allocator
from ..api import Model
from ..causal import CausalModel
from . import causal
from .batcher import Batcher, BatchFailed, Cancelled, Job, QueueFull, ShuttingDown
from .gate import Gate
from .prometheus import LATENCY_BUCKETS, Registry
from .requests import job_from_body
from .schema import ERROR_RESPONSES, GenerateRequest, GenerateResponse, ServiceError, error_response
from .settings import ServeSettings

log = logging.getLogger("pidec.serve")


class Service:
    """What the endpoints, the gate (as a `gate.GatedService`) and the server share: the model,
    its batcher, the metrics, the tokenizer threads, and the state of a shutdown."""

    def __init__(self, model: Model, settings: ServeSettings, access_log: bool = True):
        self.model = model
        self.settings = settings.checked(model)
        self.key = settings.api_key.encode("utf-8") if settings.api_key is not None else b""
        self.access_log = access_log
        self.metrics = Registry()
        self.draining = False
        self.in_progress = 0
        self.arrivals = 0  # requests seen since start: the idle trimmer's clock
        self.connections_open = lambda: 0  # set by the server (server.connection_class)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_started: asyncio.Event | None = None  # set on SIGTERM: bodies still arriving get 503
        self.drain_expired: asyncio.Event | None = None  # set shutdown_timeout_s later: waiters get 503
        self.executor: ThreadPoolExecutor | None = None
        m = self.metrics
        m.counter("pidec_http_requests_received_total", "requests that arrived, by path", ("path",))
        m.counter(
            "pidec_http_requests_total", "answers by path and status code (499: the client left)", ("path", "code")
        )
        m.counter("pidec_errors_total", "answers other than 200, by error kind", ("kind",))
        m.histogram("pidec_request_duration_seconds", "arrival to answer", LATENCY_BUCKETS, ("path",))
        m.histogram("pidec_queue_seconds", "arrival until the decoding thread took the request", LATENCY_BUCKETS)
        m.counter("pidec_malloc_trims_total", "times freed heap was given back to the OS after an idle spell")
        engine = causal.CausalBatcher if isinstance(model, CausalModel) else Batcher
        self.batcher = engine(
            model,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_batch_documents=self.settings.max_batch_documents,
            max_wait_ms=self.settings.max_wait_ms,
            max_queue=self.settings.max_queue,
            metrics=m,
        )
        m.gauge("pidec_queue_depth", "requests waiting to start", lambda: self.batcher.queue_depth)
        m.gauge("pidec_active_requests", "requests being decoded", lambda: self.batcher.active_requests)
        m.gauge("pidec_active_rows", "decoder rows in the running batch", lambda: self.batcher.active_rows)
        m.gauge("pidec_http_requests_in_progress", "requests arrived and not yet answered", lambda: self.in_progress)
        m.gauge("pidec_open_connections", "HTTP connections open", lambda: self.connections_open())

    # -- counting
    def request_arrived(self, path: str) -> None:
        self.in_progress += 1
        self.arrivals += 1
        self.metrics.inc("pidec_http_requests_received_total", path=path)

    def request_answered(self, path: str, status: int, kind: str | None, seconds: float) -> None:
        self.in_progress -= 1
        self.metrics.inc("pidec_http_requests_total", path=path, code=str(status))
        if kind is not None:
            self.metrics.inc("pidec_errors_total", kind=kind)
        self.metrics.observe("pidec_request_duration_seconds", seconds, path=path)

    def connection_refused(self) -> None:
        """A connection over max_connections, answered 503 by the server before any request was read."""
        self.request_arrived("other")
        self.request_answered("other", 503, "unavailable", 0.0)

    # -- lifetime
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.drain_started, self.drain_expired = asyncio.Event(), asyncio.Event()
        self.executor = ThreadPoolExecutor(self.settings.tokenizer_threads, thread_name_prefix="pidec-tokenize")
        self.batcher.start()

    def begin_drain(self) -> None:
        """Stop taking requests: new ones and bodies still arriving get 503 now; requests held
        get until shutdown_timeout_s from now. Call on the event loop; once is enough."""
        self.draining = True
        if self.drain_started is None or self.drain_started.is_set():
            return
        self.drain_started.set()
        self.loop.call_later(self.settings.shutdown_timeout_s, self.drain_expired.set)

    async def stop(self) -> None:
        self.begin_drain()
        left = self.settings.shutdown_timeout_s + 1.0
        t0 = time.monotonic()
        # on our own threads: anyio's idle workers would hold the interpreter's exit for 10 s
        if not await self.loop.run_in_executor(self.executor, self.batcher.stop, left):
            log.error("the decoding thread did not stop within %.0f s; exiting without it", left)
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped: the decoding thread ended %.1f s after the last request", time.monotonic() - t0)

    async def trim_when_idle(self) -> None:
        """Once the service has been idle for trim_after_idle_s, give freed heap back to the OS
        (allocator.trim), once per idle spell."""
        every = self.settings.trim_after_idle_s
        seen, trimmed = -1, -1
        while True:
            await asyncio.sleep(every / 2)
            busy = self.in_progress or self.batcher.queue_depth or self.batcher.active_requests
            if busy or self.arrivals != seen:
                seen = -1 if busy else self.arrivals  # idle from now: trim if still idle next time
                continue
            if trimmed != seen:
                trimmed = seen
                await self.loop.run_in_executor(self.executor, allocator.trim)
                self.metrics.inc("pidec_malloc_trims_total")

    @property
    def ready(self) -> bool:
        return self.batcher.alive and not self.draining


def create_app(model: Model, settings: ServeSettings | None = None, access_log: bool = True) -> FastAPI:
    """The FastAPI application; its lifespan starts the decoding thread and, on shutdown,
    lets it finish what it holds (within shutdown_timeout_s)."""
    service = Service(model, settings or ServeSettings(), access_log=access_log)
    app = FastAPI(
        title="pidec",
        summary="Prompt-in-decoder T5: each document encoded once, its prompts decoded in parallel",
        version="0.1.0",
        lifespan=lifespan(service),
    )
    app.state.service = service
    app.add_middleware(Gate, service=service)
    add_error_handlers(app)
    add_generate_route(app, service)
    add_status_routes(app, service)
    app.openapi = lambda: openapi_schema(app)
    return app


def lifespan(service: Service):
    """The app's lifespan: start the decoding thread (and the idle trimmer, if trim_after_idle_s);
    on shutdown, stop the trimmer and let the service finish what it holds."""

    @asynccontextmanager
    async def running(app: FastAPI):
        await service.start()
        trim = service.settings.trim_after_idle_s
        trimmer = asyncio.ensure_future(service.trim_when_idle()) if trim else None
        try:
            yield
        finally:
            if trimmer is not None:
                trimmer.cancel()
            await service.stop()

    return running


def add_error_handlers(app: FastAPI) -> None:
    """Refusals (ServiceError) and the framework's own 404 / 405 answered in the error shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            return error_response(404, "not_found", f"no such path: {path}", headers=exc.headers)
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{method} is not allowed on {path}" + (f" (allowed: {allowed})" if allowed else "")
            return error_response(405, "method_not_allowed", message, headers=exc.headers)
        return error_response(exc.status_code, "http_error", str(exc.detail), headers=exc.headers)


def add_generate_route(app: FastAPI, service: Service) -> None:
    """POST /v1/generate: check and tokenize the body on the tokenizer threads, hand the job to
    the batcher, wait for it (or the deadline, the drain, the client leaving), answer."""
    bearer = HTTPBearer(auto_error=False)  # documents the scheme in the schema; Gate enforces it
    request_body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
    }

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses=ERROR_RESPONSES,
        dependencies=[Security(bearer)] if service.settings.api_key else [],
        openapi_extra={"requestBody": request_body},
    )
    async def generate(request: Request):
        """Answer every prompt about the document; outputs in prompt order. The body is a
        GenerateRequest, UTF-8 JSON with Content-Type: application/json."""
        arrived = time.monotonic()
        if service.draining:
            raise ServiceError(503, "unavailable", "the service is shutting down")
        _check_content_type(request)
        body = await request.body()
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(service.executor, job_from_body, service.model, service.settings, body)
        job.arrived = arrived
        job.deadline = arrived + service.settings.request_timeout_s
        outcome = await _submit_and_wait(service, job, request)
        return _answer(service, job, outcome, arrived)


def _check_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (application/json or application/*+json)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
        raise ServiceError(
            415, "unsupported_media_type", f"Content-Type {ctype or '(none)'}: expected application/json"
        )


async def _submit_and_wait(service: Service, job: Job, request: Request) -> str:
    """Queue the job and wait for it: "done", "timeout", "shutdown" or "disconnected" (see
    `_wait`); a job not done is cancelled in the batcher. 429 / 503 when it cannot be queued."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    job.on_done = lambda j: loop.call_soon_threadsafe(_settle, future, j)
    try:
        service.batcher.submit(job)
    except QueueFull as e:
        retry = {"Retry-After": str(service.settings.retry_after_s)}
        raise ServiceError(429, "queue_full", f"{e}; retry later", "max_queue", retry) from e
    except ShuttingDown as e:
        raise ServiceError(503, "unavailable", str(e)) from e
    outcome = "disconnected"  # unless _wait returns: the request's task was cancelled
    try:
        outcome = await _wait(future, request, job.deadline - time.monotonic(), service.drain_expired)
    finally:
        if outcome != "done":
            service.batcher.cancel(job, "timeout" if outcome == "shutdown" else outcome)
    return outcome


def _answer(service: Service, job: Job, outcome: str, arrived: float):
    """The answer to a job that `_submit_and_wait` saw end as `outcome`: its outputs, or the
    error that says why there are none."""
    settings = service.settings
    if outcome == "disconnected":
        return error_response(499, "disconnected", "the client closed the connection")
    if outcome == "shutdown":
        raise ServiceError(
            503,
            "unavailable",
            f"the service is shutting down: not answered within shutdown_timeout_s={settings.shutdown_timeout_s:g}",
            "shutdown_timeout_s",
        )
    if outcome == "timeout" or isinstance(job.error, Cancelled):
        raise ServiceError(
            504,
            "timeout",
            f"not answered within request_timeout_s={settings.request_timeout_s:g}",
            "request_timeout_s",
        )
    if job.error is not None:
        message = str(job.error) if isinstance(job.error, BatchFailed) else "internal error"
        raise ServiceError(500, "internal", message)
    service.metrics.observe("pidec_queue_seconds", job.timings["queue_ms"] / 1e3)
    timings = dict(job.timings, total_ms=round((time.monotonic() - arrived) * 1e3, 3))
    return {"outputs": job.outputs, "usage": job.usage, "timings": timings}


def add_status_routes(app: FastAPI, service: Service) -> None:
    """GET /healthz, /readyz and /metrics."""

    @app.get("/healthz")
    async def healthz():
        """Alive: the decoding thread runs (or has not been started yet)."""
        if service.batcher.stopped:
            return error_response(503, "unavailable", "the decoding thread has stopped")
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        """Ready: the model is loaded, the decoding thread runs and the service is not shutting down."""
        if not service.ready:
            why = "shutting down" if service.draining else "the decoding thread is not running"
            return error_response(503, "unavailable", why)
        return {"status": "ready", "queue_depth": service.batcher.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text format."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")


def openapi_schema(app: FastAPI) -> dict:
    """The app's OpenAPI schema, made once, with GenerateRequest among its schemas (the
    generate route reads its body itself, so FastAPI would leave it out)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["GenerateRequest"] = (
            GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        app.openapi_schema = schema
    return app.openapi_schema


def _settle(future: asyncio.Future, job: Job) -> None:
    if not future.done():
        future.set_result(job)


async def _wait(future: asyncio.Future, request: Request, timeout: float, expired: asyncio.Event) -> str:
    """Wait for the job: "done", "timeout", "shutdown" (the drain ran out), or "disconnected"
    when the client goes away first."""
    gone = asyncio.ensure_future(_disconnect(request))
    stop = asyncio.ensure_future(expired.wait())
    try:
        done, _ = await asyncio.wait(
            {future, gone, stop}, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        stop.cancel()
    if future in done:
        return "done"
    if gone in done:
        return "disconnected"
    return "shutdown" if stop in done else "timeout"


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
