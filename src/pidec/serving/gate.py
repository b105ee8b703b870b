"""The gate every HTTP request passes before the application sees it: `Gate`, pure ASGI
middleware. It checks the bearer token on the PROTECTED paths, reads the whole body within its
bounds (size, time, the drain), answers in the error shape what the application lets escape,
and counts each request once in and once out with one `pidec.access` line (its docstring says
each in turn).

It keeps no state between requests: what it counts and the drain it watches are the service's
(`GatedService`: the part of app.py's `Service` it uses), so it imports nothing of the app.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Protocol

from .schema import ServiceError
from .settings import ServeSettings

log = logging.getLogger("pidec.serve")
access_log = logging.getLogger("pidec.access")

PROTECTED = ("/v1/", "/metrics")  # paths that need the bearer token when one is set
PATHS = ("/v1/generate", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")  # metric labels; else "other"


class GatedService(Protocol):
    """What the gate reads of the service and tells it."""

    settings: ServeSettings
    key: bytes  # the API key's UTF-8 bytes
    access_log: bool
    drain_started: asyncio.Event | None
    drain_expired: asyncio.Event | None

    def request_arrived(self, path: str) -> None: ...

    def request_answered(self, path: str, status: int, kind: str | None, seconds: float) -> None: ...


class _Gone(Exception):
    """The client closed the connection before its body arrived."""


class Gate:
    """Pure ASGI middleware, so that it runs before the app sees anything:

    - checks the bearer token, comparing the header's bytes with the key's UTF-8 bytes;
    - reads the whole body itself, within max_body_bytes and body_timeout_s, and stops reading
      when the service starts draining (408, 413 or 503, the connection closed after; a client
      that leaves mid-body is counted as disconnected); the app then reads it from memory;
    - answers 500 internal, in the error shape, for anything the app lets escape;
    - counts each request once in and once out (by path, status and error kind) and writes one
      access line."""

    def __init__(self, app, service: GatedService):
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
