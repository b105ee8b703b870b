"""The service's settings: `ServeSettings` (its limits, batching, timeouts and memory) and
`ServerSettings` (where and how `server.run_server` runs it).

Both are plain dataclasses whose every field is also its `pidec serve` option (declared once
with `pidec.settings.setting`: flag, help, panel). `checked` validates every field, naming it
in a ValueError; `ServeSettings.checked` also takes max_document_tokens from the model when it
is not given, so it needs the loaded model. Nothing here touches HTTP, torch or the process.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..api import Model
from ..settings import setting

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
