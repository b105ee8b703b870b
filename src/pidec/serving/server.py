"""Running the service as a process: `run_server` serves the app (app.py) with uvicorn until
SIGTERM or SIGINT, then lets it finish what it holds and returns.

- `prepare_process`: what must be set before the model loads (oneDNN's primitive cache,
  glibc's malloc arenas, torch's threads);
- `connection_class`: uvicorn's HTTP/1.1 connection bounded by the service: at most
  max_connections open (one more gets `connection_refusal`, a 503 in the error shape, and is
  closed) and a request's head within header_timeout_s;
- the server class drains the service on the signal (readyz says so at once, bodies still
  arriving get 503) and logs `describe`'s banner once listening; uvicorn raises the signal
  again after its shutdown, which is ignored here so that a graceful stop returns instead of
  killing the process.

uvicorn is imported where it is used: it is needed only to serve, not to build the app.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
from collections.abc import Callable

import torch

from .. import allocator
from ..api import Model
from ..causal import CausalModel
from . import causal
from .app import Service, create_app
from .schema import error_response
from .settings import ServerSettings, ServeSettings

log = logging.getLogger("pidec.serve")


def connection_class(service: Service):
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
    service: Service = app.state.service
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


def _server_class(service: Service, banner: Callable[[str], str]):
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
