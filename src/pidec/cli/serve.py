"""`pidec serve` and its load generator, `pidec loadtest`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

from ..api import load
from ..bench.loadtest import format_report, run_loadtest
from ..causal import use_template
from ..serving import allocator
from ..serving.app import ServeSettings, run_server
from .common import (
    ChatTemplate,
    Device,
    Dtype,
    NoPack,
    PrefixTemplate,
    Quantize,
    RowTemplate,
    Tokenizer,
    app,
    fail,
    input_errors_fail,
    template_of,
    write_json,
)


@app.command()
def serve(
    model: str = typer.Option(..., "--model", help="checkpoint folder or hub id"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind: loopback unless told otherwise"),
    port: int = typer.Option(8000, "--port", help="0 picks a free port"),
    device: Device = "cpu",
    dtype: Dtype = "auto",
    quantize: Quantize = None,
    tokenizer: Tokenizer = None,
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="PIDEC_API_KEY", help="require 'Authorization: Bearer KEY' (prefer PIDEC_API_KEY)"
    ),
    max_batch_documents: Optional[int] = typer.Option(
        None, "--max-batch-documents", help="requests decoded together (default 32); 1 turns batching off"
    ),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="batch token budget (32768)"),
    max_wait_ms: Optional[float] = typer.Option(None, "--max-wait-ms", help="idle wait to gather a batch (5)"),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="requests waiting before 429 (64)"),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="seconds before 504 (120)"),
    max_document_tokens: Optional[int] = typer.Option(
        None, "--max-document-tokens", help="default: the model's max_input_length"
    ),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="prompts per request (64)"),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", help="tokens per prompt (64)"),
    max_new_tokens_limit: Optional[int] = typer.Option(None, "--max-new-tokens-limit", help="per prompt (256)"),
    default_max_new_tokens: Optional[int] = typer.Option(None, "--default-max-new-tokens", help="(32)"),
    max_num_beams: Optional[int] = typer.Option(None, "--max-num-beams", help="(8)"),
    max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes", help="(1 MiB)"),
    body_timeout: Optional[float] = typer.Option(
        None, "--body-timeout", help="seconds to receive a body; then 408 and the connection closes (30)"
    ),
    header_timeout: Optional[float] = typer.Option(
        None, "--header-timeout", help="seconds for a connection to send a request's head; then closed (10)"
    ),
    shutdown_timeout: Optional[float] = typer.Option(
        None, "--shutdown-timeout", help="after SIGTERM, seconds to finish what is held; the rest get 503 (30)"
    ),
    max_connections: Optional[int] = typer.Option(
        None, "--max-connections", help="connections open at once; more get 503 (256)"
    ),
    tokenizer_threads: Optional[int] = typer.Option(None, "--tokenizer-threads", help="threads that tokenize (2)"),
    malloc_arena_max: int = typer.Option(
        2, "--malloc-arena-max", help="glibc malloc arenas, set before loading (bounds RSS); 0: glibc's default"
    ),
    trim_after_idle: float = typer.Option(
        2.0, "--trim-after-idle", help="seconds idle before freed heap goes back to the OS; 0: never"
    ),
    primitive_cache: int = typer.Option(
        32,
        "--primitive-cache",
        help="oneDNN primitives kept per cache (bounds RSS; see allocator.py); 0: oneDNN's 1024",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no access line per request"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical | error | warning | info | debug"),
    no_pack: NoPack = False,
    prefix_template: PrefixTemplate = None,
    row_template: RowTemplate = None,
    chat_template: ChatTemplate = None,
) -> None:
    """HTTP service: POST /v1/generate batches concurrent requests into shared-cache decoding;
    GET /healthz, /readyz, /metrics. On SIGTERM it stops accepting, finishes what it holds, exits."""

    if not 0 <= port <= 65535:
        fail(f"--port {port}: expected 0-65535")
    template = template_of(prefix_template, row_template, chat_template)
    given = dict(
        api_key=api_key,
        max_batch_documents=max_batch_documents,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_document_tokens=max_document_tokens,
        max_prompts=max_prompts,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens_limit=max_new_tokens_limit,
        default_max_new_tokens=default_max_new_tokens,
        max_num_beams=max_num_beams,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
        shutdown_timeout_s=shutdown_timeout,
        max_connections=max_connections,
        tokenizer_threads=tokenizer_threads,
    )
    settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    if malloc_arena_max < 0 or trim_after_idle < 0 or primitive_cache < 0:
        fail("--malloc-arena-max, --trim-after-idle and --primitive-cache must be >= 0 (0 turns them off)")
    if primitive_cache:
        allocator.limit_primitive_caches(primitive_cache)  # before loading: packing makes the first primitives
    settings.malloc_arena_max = malloc_arena_max or None
    settings.trim_after_idle_s = trim_after_idle or None
    if settings.malloc_arena_max is not None:
        allocator.limit_arenas(settings.malloc_arena_max)  # before the model and the threads allocate
    if threads is not None:
        import torch

        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    with input_errors_fail():
        m = load(
            model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            quantize=quantize,
            pack_weights=False if no_pack else None,
        )
        use_template(m, template)
        settings.checked(m)
    run_server(m, settings, host=host, port=port, log_level=log_level, quiet=quiet, source=model)
    # Stopped gracefully: everything held was answered, nothing is left to write. Skip the
    # interpreter's teardown of torch and the model, which takes seconds on a busy machine and
    # which an orchestrator's kill timer would count against the shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def loadtest(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="a running `pidec serve`"),
    concurrency: int = typer.Option(16, "--concurrency", help="clients, each sending one request after another"),
    duration: float = typer.Option(60.0, "--duration", help="seconds; then requests in flight are awaited"),
    workload: str = typer.Option("dst", "--workload", help="dst | qa | summ: the shapes of `pidec bench`"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PIDEC_API_KEY"),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="allow a URL that is not loopback"),
    timeout: float = typer.Option(300.0, "--timeout", help="client timeout per request, seconds"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the report as JSON here"),
) -> None:
    """Load a running service for --duration seconds; print requests/s, documents/s, latency
    p50/p95/p99 and errors by kind."""

    with input_errors_fail():
        report = run_loadtest(
            url,
            concurrency=concurrency,
            duration_s=duration,
            workload=workload,
            api_key=api_key,
            allow_remote=allow_remote,
            seed=seed,
            timeout_s=timeout,
        )
    typer.echo(format_report(report))
    write_json(json_out, report)
