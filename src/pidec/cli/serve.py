"""`pidec serve` and its load generator, `pidec loadtest`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import typer

from ..bench.loadtest import format_report, run_loadtest
from ..serving.server import prepare_process, run_server
from ..serving.settings import ServerSettings, ServeSettings
from .common import app, input_errors_fail, load_model, runtime_template, write_json
from .options import build_config, command, declared_options, keyword, runtime_options

MODEL = Annotated[str, typer.Option("--model", help="checkpoint folder or hub id")]


@command(
    "serve",
    [
        keyword("model", MODEL),
        *runtime_options(),
        *declared_options(ServerSettings),
        *declared_options(ServeSettings),
    ],
    """HTTP service: POST /v1/generate batches concurrent requests into shared-cache decoding;
    GET /healthz, /readyz, /metrics. On SIGTERM it stops accepting, finishes what it holds, exits.""",
)
def serve(ctx: typer.Context, **options) -> None:
    with input_errors_fail():
        server = build_config(ServerSettings, options).checked()
        template = runtime_template(options)
        settings = build_config(ServeSettings, options)
        prepare_process(settings, server)  # before loading
        m = load_model(options["model"], options, template)
        settings.checked(m)
    run_server(
        m,
        settings,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        quiet=server.quiet,
        source=options["model"],
    )
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
