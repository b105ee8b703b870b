"""`pidec serve`: an HTTP service that batches concurrent requests into shared-cache PiD decoding.

    POST /v1/generate   {"document", "prompts", "max_new_tokens"?, "num_beams"?, "layout"?}
                        -> {"outputs", "usage", "timings"}, one output per prompt, in prompt order
    GET  /healthz       alive: the decoding thread runs
    GET  /readyz        ready: model loaded, not shutting down
    GET  /metrics       Prometheus text: requests, errors by kind, queue depth, batch sizes,
                        latency histograms, tokens
    GET  /openapi.json  the schema (and /docs)

The outputs are those of `Model.generate` for the same input; the batching (`batcher.py`) only
decides which requests share the decoder's steps. Every refusal is JSON
`{"error": {"kind", "message", "limit"?}}` with its status: 401 unauthorized, 413 too_large
(body, document, prompt count, prompt length), 422 invalid_json / invalid_request /
limit_exceeded (max_new_tokens, num_beams), 429 queue_full (with Retry-After), 500 internal (the
batch it was in failed; the service goes on), 503 unavailable (shutting down), 504 timeout.
A client that disconnects has its rows dropped from the batch (counted as "disconnected").

On SIGTERM the service stops accepting connections, finishes the requests it holds, then exits.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Literal

from fastapi import FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .. import layouts
from ..api import Model
from ..errors import InputError
from .batcher import Batcher, BatchFailed, Cancelled, Job, QueueFull, ShuttingDown
from .prometheus import LATENCY_BUCKETS, Registry

log = logging.getLogger("pidec.serve")

PROTECTED = ("/v1/", "/metrics")  # paths that need the bearer token when one is set


@dataclass
class ServeSettings:
    """Limits and batching of the service. Sizes are in tokens of the model's tokenizer."""

    api_key: str | None = None  # bearer token required on /v1/* and /metrics; None: open
    max_document_tokens: int | None = None  # an encoder row, EOS included; None: the model's max_input_length
    max_prompts: int = 64
    max_prompt_tokens: int = 64
    max_new_tokens_limit: int = 256  # the most max_new_tokens a request may ask for, per prompt
    default_max_new_tokens: int = 32
    max_num_beams: int = 8
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests waiting to start; more get 429
    max_batch_documents: int = 32  # requests decoded together; 1 turns batching off
    max_batch_tokens: int = 32768  # cache slots the batch may hold: see batcher.footprint
    max_wait_ms: float = 5.0  # how long an idle service waits for more requests to batch
    request_timeout_s: float = 120.0  # from arrival to answer; then 504
    retry_after_s: int = 1  # the Retry-After of a 429

    def checked(self, model: Model) -> ServeSettings:
        """Validate every field (naming it) and fill max_document_tokens from the model."""
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string (or None for no authentication)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key" or (f.name == "max_document_tokens" and value is None):
                continue
            if f.name in ("max_wait_ms", "request_timeout_s"):
                low_ok = value >= 0 if f.name == "max_wait_ms" else value > 0
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not low_ok:
                    bound = ">= 0" if f.name == "max_wait_ms" else "> 0"
                    raise ValueError(f"{f.name} must be a number {bound}, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")
        limit = model.config.max_input_length
        if self.max_document_tokens is None:
            self.max_document_tokens = limit
        elif self.max_document_tokens > limit:
            raise ValueError(
                f"max_document_tokens={self.max_document_tokens} is above the model's max_input_length={limit}"
            )
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens={self.default_max_new_tokens} is above "
                f"max_new_tokens_limit={self.max_new_tokens_limit}"
            )
        return self


# -- the schema ------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document: StrictStr = Field(description="the shared input, encoded once")
    prompts: list[StrictStr] = Field(description="one subtask prompt per output")
    max_new_tokens: StrictInt | list[StrictInt] | None = Field(
        None, description="one budget for every prompt, or one per prompt; default: the service's"
    )
    num_beams: StrictInt = Field(1, description="1: greedy (continuous batching); more: beam search")
    layout: Literal["pid", "pie", "seq"] = Field("pid", description="how the prompts meet the model")


class Usage(BaseModel):
    document_tokens: int
    prompt_tokens: int
    output_tokens: int


class Timings(BaseModel):
    queue_ms: float = Field(description="from arrival until the decoding thread took the request")
    encode_ms: float = Field(description="encoding its document")
    decode_ms: float = Field(description="from its encoding until its last row ended (steps shared with others)")
    total_ms: float = Field(description="from arrival to answer")


class GenerateResponse(BaseModel):
    outputs: list[str]
    usage: Usage
    timings: Timings


class ErrorBody(BaseModel):
    kind: str
    message: str
    limit: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "missing or wrong bearer token"),
        (413, "body, document, prompt count or prompt length above a limit"),
        (422, "malformed JSON, wrong types, empty document or prompts, a parameter above its limit"),
        (429, "queue full; retry after Retry-After seconds"),
        (500, "the batch this request was in failed"),
        (503, "shutting down"),
        (504, "not answered within the request timeout"),
    )
}


class ServiceError(Exception):
    def __init__(self, status: int, kind: str, message: str, limit: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.limit, self.headers = status, kind, message, limit, headers


def _error_response(status: int, kind: str, message: str, limit: str | None = None, headers=None) -> JSONResponse:
    body = {"kind": kind, "message": message}
    if limit is not None:
        body["limit"] = limit
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# -- requests -> jobs --------------------------------------------------------------------------


def build_job(model: Model, settings: ServeSettings, req: GenerateRequest) -> Job:
    """Check a request against the limits and tokenize it as `Model.generate` would."""
    if not req.document.strip():
        raise ServiceError(422, "invalid_request", "document is empty")
    if not req.prompts:
        raise ServiceError(422, "invalid_request", "prompts is empty: give at least one prompt")
    k = len(req.prompts)
    if k > settings.max_prompts:
        raise ServiceError(
            413, "too_large", f"{k} prompts, above the limit max_prompts={settings.max_prompts}", "max_prompts"
        )
    for j, p in enumerate(req.prompts):
        if not p.strip():
            raise ServiceError(422, "invalid_request", f"prompts[{j}] is empty or whitespace")
    budgets = _budgets(req.max_new_tokens, k, settings)
    if not 1 <= req.num_beams <= settings.max_num_beams:
        raise ServiceError(
            422,
            "limit_exceeded",
            f"num_beams={req.num_beams}: must be between 1 and the limit max_num_beams={settings.max_num_beams}",
            "max_num_beams",
        )
    tok = model.tokenizer
    for j, ids in enumerate(tok(req.prompts, add_special_tokens=False)["input_ids"]):
        if len(ids) > settings.max_prompt_tokens:
            raise ServiceError(
                413,
                "too_large",
                f"prompts[{j}] is {len(ids)} tokens, above the limit max_prompt_tokens={settings.max_prompt_tokens}",
                "max_prompt_tokens",
            )
    try:
        # no cut here: a document above the limit is refused below, with the service's limit named
        plan = layouts.build(
            tok, [(req.document, req.prompts)], req.layout, [budgets], 1 << 30, model.config.decoder_start_token_id
        )
    except InputError as e:
        raise ServiceError(422, "invalid_request", str(e)) from e
    for i, doc in enumerate(plan.docs):
        if len(doc) > settings.max_document_tokens:
            what = "document" if req.layout != "pie" else f"prompts[{i}] + document"
            raise ServiceError(
                413,
                "too_large",
                f"{what} is {len(doc)} tokens with EOS, above the limit max_document_tokens={settings.max_document_tokens}",
                "max_document_tokens",
            )
    return Job(plan, num_beams=req.num_beams)


def _budgets(value, k: int, settings: ServeSettings) -> list[int]:
    limit = settings.max_new_tokens_limit
    if value is None:
        return [settings.default_max_new_tokens] * k
    values = [value] * k if isinstance(value, int) else value
    name = "max_new_tokens" if isinstance(value, int) else "max_new_tokens[{}]"
    if len(values) != k:
        raise ServiceError(422, "invalid_request", f"{len(values)} max_new_tokens values for {k} prompts")
    for j, n in enumerate(values):
        if n < 1:
            raise ServiceError(422, "invalid_request", f"{name.format(j)}={n}: must be >= 1")
        if n > limit:
            raise ServiceError(
                422,
                "limit_exceeded",
                f"{name.format(j)}={n}: above the limit max_new_tokens_limit={limit}",
                "max_new_tokens_limit",
            )
    return values


def _field(loc) -> str:
    """("body", "prompts", 1) -> "prompts[1]"; pydantic's union branches ("int", "list[int]") dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "list[int]", "str"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _validation_message(errors) -> tuple[str, str]:
    for e in errors:
        if e.get("type") == "json_invalid":
            where = e["loc"][-1] if isinstance(e["loc"][-1], int) else "?"
            return "invalid_json", f"malformed JSON at character {where}: {e.get('ctx', {}).get('error', e['msg'])}"
    parts, seen = [], set()
    for e in errors:
        name = _field(e.get("loc", ()))
        if name in seen:
            continue  # a union field fails once per branch: report it once
        seen.add(name)
        if e.get("type") == "extra_forbidden":
            parts.append(f"{name}: unknown field")
        elif e.get("type") == "missing":
            parts.append(f"{name}: required")
        elif name == "body" and e.get("type") == "model_attributes_type":
            parts.append("body: expected a JSON object (Content-Type: application/json)")
        elif name == "max_new_tokens":
            parts.append("max_new_tokens: expected an integer or a list of integers")
        else:
            parts.append(f"{name}: {e.get('msg', 'invalid')}")
    return "invalid_request", "; ".join(parts)


# -- the gate: authentication, body size, request counting --------------------------------------


class _Gate:
    """Pure ASGI middleware, so that it runs before the body is read: checks the bearer token,
    refuses bodies above max_body_bytes (by Content-Length, or while a chunked body streams in),
    counts responses by status and times /v1/generate."""

    def __init__(self, app, service: _Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service, settings = self.service, self.service.settings
        path = scope.get("path", "")
        t0 = time.monotonic()
        status = {"code": 0}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def reply(response: JSONResponse) -> None:
            status["code"] = response.status_code
            await response(scope, receive, send)

        try:
            if settings.api_key is not None and path.startswith(PROTECTED):
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                ok = scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), settings.api_key.encode()
                )
                if not ok:
                    service.error("unauthorized")
                    return await reply(
                        _error_response(
                            401,
                            "unauthorized",
                            "missing or wrong bearer token (Authorization: Bearer KEY)",
                            headers={"WWW-Authenticate": "Bearer"},
                        )
                    )
            length = headers.get("content-length")
            limit = settings.max_body_bytes
            if length is not None and length.isdigit() and int(length) > limit:
                service.error("too_large")
                return await reply(
                    _error_response(
                        413,
                        "too_large",
                        f"body is {length} bytes, above the limit max_body_bytes={limit}",
                        "max_body_bytes",
                    )
                )
            seen = {"bytes": 0, "over": False, "replaced": False}

            async def counted_receive():
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > limit:
                        seen["over"] = True
                        raise _BodyTooLarge()
                return message

            async def checked_send(message):
                if message["type"] == "http.response.start":
                    if seen["over"]:
                        seen["replaced"] = True
                        service.error("too_large")
                        return await reply(
                            _error_response(
                                413, "too_large", f"body is above the limit max_body_bytes={limit}", "max_body_bytes"
                            )
                        )
                    status["code"] = message["status"]
                elif seen["replaced"]:
                    return
                await send(message)

            try:
                await self.app(scope, counted_receive, checked_send)
            except _BodyTooLarge:
                if status["code"]:
                    raise
                service.error("too_large")
                await reply(
                    _error_response(
                        413, "too_large", f"body is above the limit max_body_bytes={limit}", "max_body_bytes"
                    )
                )
        finally:
            if path.startswith("/v1/") and status["code"]:
                service.metrics.inc("pidec_http_requests_total", path=path, code=str(status["code"]))
                service.metrics.observe("pidec_request_duration_seconds", time.monotonic() - t0, path=path)


class _BodyTooLarge(Exception):
    pass


# -- the application ----------------------------------------------------------------------------


class _Service:
    """What the endpoints share: the model, its batcher, the metrics, and whether we are draining."""

    def __init__(self, model: Model, settings: ServeSettings):
        self.model = model
        self.settings = settings.checked(model)
        self.metrics = Registry()
        self.draining = False
        m = self.metrics
        m.counter("pidec_http_requests_total", "responses by path and status code", ("path", "code"))
        m.counter("pidec_errors_total", "refused or failed requests by kind", ("kind",))
        m.histogram("pidec_request_duration_seconds", "arrival to answer", LATENCY_BUCKETS, ("path",))
        m.histogram("pidec_queue_seconds", "arrival until the decoding thread took the request", LATENCY_BUCKETS)
        self.batcher = Batcher(
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

    def error(self, kind: str) -> None:
        self.metrics.inc("pidec_errors_total", kind=kind)

    @property
    def ready(self) -> bool:
        return self.batcher.alive and not self.draining


def create_app(model: Model, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application; its lifespan starts the decoding thread and, on shutdown,
    lets it finish what it holds."""
    service = _Service(model, settings or ServeSettings())
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        try:
            yield
        finally:
            service.draining = True
            await run_in_threadpool(service.batcher.stop)

    app = FastAPI(
        title="pidec",
        summary="Prompt-in-decoder T5: each document encoded once, its prompts decoded in parallel",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_Gate, service=service)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        service.error(exc.kind)
        return _error_response(exc.status, exc.kind, exc.message, exc.limit, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        kind, message = _validation_message(exc.errors())
        service.error(kind)
        return _error_response(422, kind, message)

    bearer = HTTPBearer(auto_error=False)  # documents the scheme in the schema; _Gate enforces it

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses=ERROR_RESPONSES,
        dependencies=[Security(bearer)] if settings.api_key else [],
    )
    async def generate(body: GenerateRequest, request: Request):
        """Answer every prompt about the document; outputs in prompt order."""
        arrived = time.monotonic()
        if service.draining:
            raise ServiceError(503, "unavailable", "the service is shutting down")
        job = await run_in_threadpool(build_job, model, settings, body)
        job.arrived = arrived
        job.deadline = arrived + settings.request_timeout_s
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job.on_done = lambda j: loop.call_soon_threadsafe(_settle, future, j)
        try:
            service.batcher.submit(job)
        except QueueFull as e:
            raise ServiceError(
                429, "queue_full", f"{e}; retry later", "max_queue", {"Retry-After": str(settings.retry_after_s)}
            ) from e
        except ShuttingDown as e:
            raise ServiceError(503, "unavailable", str(e)) from e
        outcome = "disconnected"  # unless _wait returns: the request's task was cancelled
        try:
            outcome = await _wait(future, request, job.deadline - time.monotonic())
        finally:
            if outcome != "done":
                service.batcher.cancel(job, outcome)  # its rows leave the batch at the next step
            if outcome == "disconnected":
                service.error("disconnected")
        if outcome == "disconnected":
            return _error_response(499, "disconnected", "the client closed the connection")
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

    @app.get("/healthz")
    async def healthz():
        """Alive: the decoding thread runs (or has not been started yet)."""
        if service.batcher.stopped:
            return _error_response(503, "unavailable", "the decoding thread has stopped")
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        """Ready: the model is loaded, the decoding thread runs and the service is not shutting down."""
        if not service.ready:
            why = "shutting down" if service.draining else "the decoding thread is not running"
            return _error_response(503, "unavailable", why)
        return {"status": "ready", "queue_depth": service.batcher.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text format."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _settle(future: asyncio.Future, job: Job) -> None:
    if not future.done():
        future.set_result(job)


async def _wait(future: asyncio.Future, request: Request, timeout: float) -> str:
    """Wait for the job; "done", "timeout", or "disconnected" when the client goes away first."""
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        return "done"
    return "disconnected" if gone in done else "timeout"


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- running it ---------------------------------------------------------------------------------


def run_server(
    model: Model,
    settings: ServeSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish the requests held, and return."""
    import uvicorn

    app = create_app(model, settings)
    service: _Service = app.state.service
    if service.settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.draining = True  # readyz says so at once; requests arriving now get 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = Server(config)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn raises the caught signal again once it has shut down; with these handlers in place
    # that is a no-op, so a graceful stop returns here instead of killing the process
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _ignore(sig, frame) -> None:
    pass
