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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Literal

import torch
from fastapi import FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import layouts
from ..api import Model
from ..causal import CausalModel
from ..errors import InputError
from ..settings import setting
from . import allocator, causal
from .batcher import Batcher, BatchFailed, Cancelled, Job, QueueFull, ShuttingDown
from .prometheus import LATENCY_BUCKETS, Registry

log = logging.getLogger("pidec.serve")
access_log = logging.getLogger("pidec.access")

PROTECTED = ("/v1/", "/metrics")  # paths that need the bearer token when one is set
PATHS = ("/v1/generate", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")  # metric labels; else "other"
OPTIONAL_SETTINGS = ("max_document_tokens", "malloc_arena_max", "trim_after_idle_s", "primitive_cache")  # None allowed


@dataclass
class ServeSettings:
    """Limits and batching of the service. Sizes are in tokens of the model's tokenizer. Each
    field is also its `pidec serve` option (`pidec.settings.setting`: flag, help, panel)."""

    api_key: str | None = setting(
        None,
        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (prefer PIDEC_API_KEY); none: open",
        panel="Server",
        envvar="PIDEC_API_KEY",
    )
    max_document_tokens: int | None = setting(
        None, help="an encoder row, EOS included (default: the model's max_input_length)", panel="Limits"
    )
    max_prompts: int = setting(64, help="prompts per request", panel="Limits")
    max_prompt_tokens: int = setting(64, help="tokens per prompt", panel="Limits")
    max_new_tokens_limit: int = setting(
        256, help="the most max_new_tokens a request may ask for, per prompt", panel="Limits"
    )
    default_max_new_tokens: int = setting(32, help="max_new_tokens of a request that gives none", panel="Limits")
    max_num_beams: int = setting(8, help="the most num_beams a request may ask for", panel="Limits")
    max_body_bytes: int = setting(1 << 20, help="request body size", panel="Limits")
    max_queue: int = setting(64, help="requests waiting to start; more get 429", panel="Limits")
    max_connections: int = setting(256, help="connections open at once; more get 503 and are closed", panel="Limits")
    max_batch_documents: int = setting(32, help="requests decoded together; 1 turns batching off", panel="Batching")
    max_batch_tokens: int = setting(
        32768, help="cache slots the batch may hold (see batcher.footprint)", panel="Batching"
    )
    max_wait_ms: float = setting(
        5.0, help="how long an idle service waits for more requests to batch", panel="Batching"
    )
    tokenizer_threads: int = setting(2, help="threads that parse and tokenize request bodies", panel="Batching")
    request_timeout_s: float = setting(
        120.0, help="seconds from arrival to answer; then 504", panel="Timeouts", flag="--request-timeout"
    )
    retry_after_s: int = setting(1, help="the Retry-After of a 429", panel="Timeouts", cli=False)
    body_timeout_s: float = setting(
        30.0,
        help="seconds to receive a request's whole body; then 408 and the connection closes",
        panel="Timeouts",
        flag="--body-timeout",
    )
    header_timeout_s: float = setting(
        10.0,
        help="seconds for a connection to deliver a request's head; then it is closed",
        panel="Timeouts",
        flag="--header-timeout",
    )
    shutdown_timeout_s: float = setting(
        30.0,
        help="after SIGTERM, seconds to finish what is held; the rest get 503",
        panel="Timeouts",
        flag="--shutdown-timeout",
    )
    malloc_arena_max: int | None = setting(
        2,
        help="glibc malloc arenas, set before loading (bounds RSS, see allocator.py); 0: glibc's default",
        panel="Memory",
        off=0,
    )
    trim_after_idle_s: float | None = setting(
        2.0,
        help="seconds idle before freed heap goes back to the OS; 0: never",
        panel="Memory",
        flag="--trim-after-idle",
        off=0,
    )
    primitive_cache: int | None = setting(
        32,
        help="oneDNN primitives kept per cache, set before loading (bounds RSS, see allocator.py); 0: oneDNN's 1024",
        panel="Memory",
        off=0,
    )

    def checked(self, model: Model) -> ServeSettings:
        """Validate every field (naming it) and fill max_document_tokens from the model."""
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string (or None for no authentication)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key" or (value is None and f.name in OPTIONAL_SETTINGS):
                continue
            if f.name == "max_wait_ms" or (f.name.endswith("_s") and f.name != "retry_after_s"):
                number = not isinstance(value, bool) and isinstance(value, (int, float))
                if not number or not (value >= 0 if f.name == "max_wait_ms" else value > 0):
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
        (408, "the body did not arrive within body_timeout_s"),
        (413, "body, document, prompt count or prompt length above a limit"),
        (415, "the body is not Content-Type: application/json"),
        (422, "malformed JSON, wrong types, empty document or prompts, a parameter above its limit"),
        (429, "queue full; retry after Retry-After seconds"),
        (500, "the batch this request was in failed"),
        (503, "shutting down, or too many connections open"),
        (504, "not answered within the request timeout"),
    )
}


class ServiceError(Exception):
    """A refusal: answered as `{"error": {"kind", "message", "limit"?}}` with `status`.
    close: the connection is closed after the answer (the body was not read to its end)."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        limit: str | None = None,
        headers: dict | None = None,
        close: bool = False,
    ):
        super().__init__(message)
        self.status, self.kind, self.message, self.limit = status, kind, message, limit
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"

    def response(self) -> JSONResponse:
        return error_response(self.status, self.kind, self.message, self.limit, self.headers)


def error_response(status: int, kind: str, message: str, limit: str | None = None, headers=None) -> JSONResponse:
    body = {"kind": kind, "message": message}
    if limit is not None:
        body["limit"] = limit
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# -- requests -> jobs --------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_request(body: bytes) -> GenerateRequest:
    """The request body, strict UTF-8 JSON, as a GenerateRequest; a ServiceError naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServiceError(
            422, "invalid_json", f"body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ServiceError(422, "invalid_json", f"malformed JSON at character {e.pos}: {e.msg}") from None
    except RecursionError:
        raise ServiceError(422, "invalid_json", "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_request", "body: expected a JSON object (Content-Type: application/json)")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as e:
        raise ServiceError(422, "invalid_request", _validation_message(e.errors())) from None
    except RecursionError:  # a deep value under a known field
        raise ServiceError(422, "invalid_json", "JSON nested too deeply") from None


def _check_text(name: str, text: str) -> None:
    """A lone surrogate (a JSON escape like \\ud800 with no partner) is not text: refuse it by name."""
    m = _SURROGATE.search(text)
    if m is not None:
        raise ServiceError(
            422,
            "invalid_request",
            f"{name} holds a lone surrogate U+{ord(m.group()):04X} at character {m.start()}: not valid Unicode text",
        )


def build_job(model: Model, settings: ServeSettings, req: GenerateRequest) -> Job:
    """Check a request against the limits and tokenize it as `Model.generate` would."""
    budgets = _check_request(model.tokenizer, settings, req)
    try:
        if isinstance(model, CausalModel):  # decoder-only: its rows and limits are serving/causal.py's
            return causal.build_job(model, settings, req, budgets)
        # no cut here: a document above the limit is refused below, with the service's limit named
        plan = layouts.build(
            model.tokenizer,
            [(req.document, req.prompts)],
            req.layout,
            [budgets],
            1 << 30,
            model.config.decoder_start_token_id,
        )
    except causal.DocumentTooLong as e:
        raise ServiceError(413, "too_large", str(e), "max_document_tokens") from e
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


def _check_request(tok, settings: ServeSettings, req: GenerateRequest) -> list[int]:
    """A request's text, prompt count and lengths, budgets and beams against the limits (a
    ServiceError naming the first one broken); returns its budget per prompt."""
    _check_text("document", req.document)
    for j, p in enumerate(req.prompts):
        _check_text(f"prompts[{j}]", p)
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
    for j, ids in enumerate(tok(req.prompts, add_special_tokens=False)["input_ids"]):
        if len(ids) > settings.max_prompt_tokens:
            raise ServiceError(
                413,
                "too_large",
                f"prompts[{j}] is {len(ids)} tokens, above the limit max_prompt_tokens={settings.max_prompt_tokens}",
                "max_prompt_tokens",
            )
    return budgets


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


def _validation_message(errors) -> str:
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
        elif name == "max_new_tokens":
            parts.append("max_new_tokens: expected an integer or a list of integers")
        else:
            parts.append(f"{name}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


# -- the gate: every HTTP request passes here ---------------------------------------------------


class _Gone(Exception):
    """The client closed the connection before its body arrived."""


class _Gate:
    """Pure ASGI middleware, so that it runs before the app sees anything:

    - checks the bearer token, comparing the header's bytes with the key's UTF-8 bytes;
    - reads the whole body itself, within max_body_bytes and body_timeout_s, and stops reading
      when the service starts draining (408, 413 or 503, the connection closed after; a client
      that leaves mid-body is counted as disconnected); the app then reads it from memory;
    - answers 500 internal, in the error shape, for anything the app lets escape;
    - counts each request once in and once out (by path, status and error kind) and writes one
      access line."""

    def __init__(self, app, service: _Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service
        t0 = time.monotonic()
        path = scope.get("path", "")
        label = path if path in PATHS else "other"
        out = {"status": 0, "kind": None, "body": b""}
        service.request_arrived(label)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                out["status"] = message["status"]
            elif message["type"] == "http.response.body" and out["status"] != 200 and len(out["body"]) < 65536:
                out["body"] += message.get("body", b"")
            await send(message)

        try:
            await self._check_and_run(scope, receive, counted_send, out)
        except asyncio.CancelledError:  # the caller went away, or the server gave up on it at shutdown
            if not out["status"]:
                shutdown = service.drain_expired is not None and service.drain_expired.is_set()
                out["status"], out["kind"] = 499, "aborted" if shutdown else "disconnected"
            raise
        finally:
            self._count(scope, label, out, time.monotonic() - t0)

    async def _check_and_run(self, scope, receive, send, out: dict) -> None:
        """Check the token, read the body, run the app on it; every refusal, and anything the app
        lets escape before its answer began, is answered through `send` in the error shape."""
        service, settings = self.service, self.service.settings
        path = scope.get("path", "")

        async def answer(error: ServiceError) -> None:
            await error.response()(scope, receive, send)

        if settings.api_key is not None and path.startswith(PROTECTED) and not _authorized(scope, service.key):
            return await answer(
                ServiceError(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token (Authorization: Bearer KEY)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
        try:
            body = await self._read_body(scope, receive)
        except ServiceError as e:
            return await answer(e)
        except _Gone:
            out["status"], out["kind"] = 499, "disconnected"
            return
        try:
            await self.app(scope, _replay(body, receive), send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if out["status"]:
                raise  # the answer has begun: the server closes the connection
            await answer(ServiceError(500, "internal", "internal error"))

    def _count(self, scope, label: str, out: dict, elapsed: float) -> None:
        """Count the request's answer (499 when none was sent) and write its access line."""
        service = self.service
        status = out["status"] or 499
        kind = None if status == 200 else out["kind"] or _kind_of(out["body"])
        service.request_answered(label, status, kind, elapsed)
        if service.access_log:
            access_log.info("%s %s %d %.1fms", scope.get("method", "-"), scope.get("path", ""), status, elapsed * 1e3)

    async def _read_body(self, scope, receive) -> bytes:
        service, settings = self.service, self.service.settings
        limit = settings.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ServiceError(
                413,
                "too_large",
                f"body is {int(length)} bytes, above the limit max_body_bytes={limit}",
                "max_body_bytes",
                close=True,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        chunks, size = [], 0
        while True:
            message = await self._next_message(receive, deadline - loop.time(), service.drain_started)
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ServiceError(
                    413, "too_large", f"body is above the limit max_body_bytes={limit}", "max_body_bytes", close=True
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _next_message(self, receive, timeout: float, stop: asyncio.Event) -> dict:
        """The next ASGI message, unless `timeout` passes (408) or `stop` is set (503) first."""
        settings = self.service.settings
        if stop.is_set():
            raise ServiceError(503, "unavailable", "the service is shutting down", close=True)
        getter = asyncio.ensure_future(receive())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, stopper}, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if stopper in done:
            raise ServiceError(503, "unavailable", "the service is shutting down", close=True)
        raise ServiceError(
            408,
            "body_timeout",
            f"the body did not arrive within body_timeout_s={settings.body_timeout_s:g}",
            "body_timeout_s",
            close=True,
        )


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def _authorized(scope, key: bytes) -> bool:
    """`Authorization: Bearer KEY`, the header's bytes against the key's UTF-8 bytes, in constant time."""
    value = _header(scope, b"authorization")
    if value is None:
        return False
    scheme, _, token = value.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then the connection's own messages."""
    first = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return first.pop() if first else await receive()

    return replay


def _kind_of(body: bytes) -> str:
    """The error kind of an answer in the error shape; "unshaped" for anything else (a bug)."""
    try:
        kind = json.loads(body)["error"]["kind"]
    except (ValueError, TypeError, KeyError):
        return "unshaped"
    return kind if isinstance(kind, str) else "unshaped"


# -- the application ----------------------------------------------------------------------------


class _Service:
    """What the endpoints share: the model, its batcher, the metrics, the tokenizer threads, and
    the state of a shutdown."""

    def __init__(self, model: Model, settings: ServeSettings, access_log: bool = True):
        self.model = model
        self.settings = settings.checked(model)
        self.key = settings.api_key.encode("utf-8") if settings.api_key is not None else b""
        self.access_log = access_log
        self.metrics = Registry()
        self.draining = False
        self.in_progress = 0
        self.arrivals = 0  # requests seen since start: the idle trimmer's clock
        self.connections_open = lambda: 0  # set by the server (connection_class)
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
    service = _Service(model, settings or ServeSettings(), access_log=access_log)
    app = FastAPI(
        title="pidec",
        summary="Prompt-in-decoder T5: each document encoded once, its prompts decoded in parallel",
        version="0.1.0",
        lifespan=lifespan(service),
    )
    app.state.service = service
    app.add_middleware(_Gate, service=service)
    add_error_handlers(app)
    add_generate_route(app, service)
    add_status_routes(app, service)
    app.openapi = lambda: openapi_schema(app)
    return app


def lifespan(service: _Service):
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


def add_generate_route(app: FastAPI, service: _Service) -> None:
    """POST /v1/generate: check and tokenize the body on the tokenizer threads, hand the job to
    the batcher, wait for it (or the deadline, the drain, the client leaving), answer."""
    bearer = HTTPBearer(auto_error=False)  # documents the scheme in the schema; _Gate enforces it
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
        job = await loop.run_in_executor(service.executor, _job_from_body, service.model, service.settings, body)
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


async def _submit_and_wait(service: _Service, job: Job, request: Request) -> str:
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


def _answer(service: _Service, job: Job, outcome: str, arrived: float):
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


def add_status_routes(app: FastAPI, service: _Service) -> None:
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


def _job_from_body(model: Model, settings: ServeSettings, body: bytes) -> Job:
    return build_job(model, settings, parse_request(body))


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


# -- running it ---------------------------------------------------------------------------------


def connection_class(service: _Service):
    """uvicorn's HTTP/1.1 connection (h11) with the service's bounds: at most max_connections
    open (one more is answered 503 and closed), and a connection that has not delivered a
    request's head within header_timeout_s is closed (a fresh one; after an answer, uvicorn's
    keep-alive timeout plus header_timeout_s). Clients should keep idle connections for less
    than the keep-alive timeout (5 s), or a reused one may be closed under them."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings = service.settings
    refusal = connection_refusal(settings)

    class Connection(H11Protocol):
        refused = False
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            service.connections_open = lambda: len(self.connections)
            self.refused = len(self.connections) > settings.max_connections
            self._await_head()

        def data_received(self, data: bytes) -> None:
            if self.refused:  # answered once its request starts arriving, so that the client reads it
                if not self.transport.is_closing():
                    service.connection_refused()
                    self.transport.write(refusal)
                    self.transport.close()
                return
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # idle keep-alive is uvicorn's to end (timeout_keep_alive); ours bounds a head begun late
            self._await_head(self.timeout_keep_alive)

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self, idle_s: float = 0.0) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            cycle = self.cycle

            def check():
                waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
                if waiting and not self.transport.is_closing():
                    self.transport.close()  # no request came: a stalled or idle client

            self.head_timer = self.loop.call_later(idle_s + settings.header_timeout_s, check)

    return Connection


def connection_refusal(settings: ServeSettings) -> bytes:
    """The whole HTTP answer (503, in the error shape, closing) to a connection over max_connections."""
    body = error_response(
        503,
        "unavailable",
        f"too many connections open: the limit is max_connections={settings.max_connections}",
        "max_connections",
    ).body
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def raise_open_files_limit(needed: int) -> None:
    """Raise the soft limit on open files to `needed` if it is lower (up to the hard limit);
    a ValueError if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(
                f"max_connections needs about {needed} open files, above this process's hard limit {hard}: "
                "lower max_connections or raise the limit (ulimit -n)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def describe(model: Model, settings: ServeSettings, source: str | None, url: str) -> str:
    """What the service serves, in a few lines: printed on start."""
    cfg = model.config
    params = sum(p.numel() for p in model.model.parameters())
    quant = getattr(model.model, "quantization", None) or "none"
    what = (
        causal.describe_model(model)
        if isinstance(model, CausalModel)
        else f"T5, d_model={cfg.d_model}, {cfg.num_layers}+{cfg.num_decoder_layers} layers, vocab {cfg.vocab_size}, "
        f"{params / 1e6:.1f}M parameters"
    )
    lines = [
        f"pidec serve: {source or 'model'} ({what})",
        f"  device {model.device}, dtype {str(model.model.dtype).removeprefix('torch.')} "
        f"({getattr(model, 'dtype_choice', 'as loaded')}), quantization {quant}",
        "  limits: "
        + ", ".join(
            f"{name}={getattr(settings, name)}"
            for name in (
                "max_document_tokens",
                "max_prompts",
                "max_prompt_tokens",
                "max_new_tokens_limit",
                "max_num_beams",
                "max_body_bytes",
                "max_queue",
                "max_connections",
            )
        ),
        "  batching: "
        + ", ".join(f"{n}={getattr(settings, n)}" for n in ("max_batch_documents", "max_batch_tokens", "max_wait_ms")),
        "  timeouts (s): "
        + ", ".join(
            f"{n.removesuffix('_s')}={getattr(settings, n):g}"
            for n in ("request_timeout_s", "body_timeout_s", "header_timeout_s", "shutdown_timeout_s")
        ),
        f"  memory: malloc_arena_max={settings.malloc_arena_max}, trim_after_idle_s={settings.trim_after_idle_s}",
        f"  authentication: {'bearer token' if settings.api_key else 'none'}",
        f"  listening on {url}",
    ]
    return "\n".join(lines)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServerSettings:
    """Where and how `run_server` runs the service: the address, torch's threads, the log.
    Each field is also its `pidec serve` option."""

    host: str = setting("127.0.0.1", help="address to bind: loopback unless told otherwise", panel="Server")
    port: int = setting(8000, help="0 picks a free port", panel="Server")
    threads: int | None = setting(None, help="torch threads (default: torch's choice)", panel="Server")
    log_level: str = setting("info", help="uvicorn's: " + " | ".join(LOG_LEVELS), panel="Server")
    quiet: bool = setting(False, help="no access line per request", panel="Server")

    def checked(self) -> ServerSettings:
        """Validate every field, naming it."""
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in 0-65535, got {self.port!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        return self


def prepare_process(settings: ServeSettings, server: ServerSettings) -> None:
    """What must be set before the model is loaded: oneDNN's primitive cache capacity (packing
    makes the first primitives), glibc's malloc arenas (before the model and the threads
    allocate), and torch's threads."""
    if settings.primitive_cache is not None:
        allocator.limit_primitive_caches(settings.primitive_cache)
    if settings.malloc_arena_max is not None:
        allocator.limit_arenas(settings.malloc_arena_max)
    if server.threads is not None:
        torch.set_num_threads(server.threads)


def run_server(
    model: Model,
    settings: ServeSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    quiet: bool = False,
    source: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish the requests held (within
    shutdown_timeout_s), and return. Prints what it serves once listening; one access line per
    request at info level unless `quiet`."""
    import uvicorn

    app = create_app(model, settings, access_log=not quiet)
    service: _Service = app.state.service
    settings = service.settings
    raise_open_files_limit(settings.max_connections + 64)
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    _log_to_stderr(log_level)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=connection_class(service),
        access_log=False,  # ours is pidec.access, with the latency
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 2,  # a backstop: the service answers first
    )
    server = _server_class(service, lambda url: describe(model, settings, source, url))(config)
    _run_until_stopped(server)
    log.info("stopped")


def _server_class(service: _Service, banner: Callable[[str], str]):
    """uvicorn's Server, draining the service on SIGTERM or SIGINT (readyz says so at once and
    requests arriving then get 503) and logging `banner(url)` once listening on url."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.draining = True
            if service.loop is not None:
                service.loop.call_soon_threadsafe(service.begin_drain)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                h = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                log.info("%s", banner(f"http://{h}:{bound[1]}"))

    return Server


def _run_until_stopped(server) -> None:
    """Run the uvicorn server until it stops. uvicorn raises the caught signal again once it has
    shut down; with these handlers in place that is a no-op, so a graceful stop returns here
    instead of killing the process (handlers can be set only from the main thread)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _log_to_stderr(level: str) -> None:
    """pidec's loggers (pidec.serve, pidec.access) to stderr at uvicorn's level, once."""
    root = logging.getLogger("pidec")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())


def _ignore(sig, frame) -> None:
    pass
