"""pidec.serving: the HTTP contract with an in-process client, every refusal and fault, batching
that leaves each answer equal to `Model.generate`, disconnects, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

import pidec
from pidec import allocator
from pidec.serving.app import create_app
from pidec.serving.prometheus import parse, total
from pidec.serving.server import connection_class, describe
from pidec.serving.settings import ServerSettings, ServeSettings

from ..shared_data import tiny_checkpoint
from .helpers import DOC, PROMPTS, error_of, offline, request_bodies, run, serving, slow_decoder, until


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"), seed=0, max_input_length=600, eos_boost=4.0)


@pytest.fixture(scope="module")
def model(folder):
    return pidec.load(folder)


def requests_mix(n: int) -> list[dict]:
    """Documents of different lengths, 1-4 prompts, one budget or one per prompt, every layout,
    greedy and beams."""
    return request_bodies(
        n,
        DOC,
        5,
        layout_of=lambda i: {2: "pie", 5: "seq"}.get(i % 7),
        num_beams_of=lambda i: 2 + i % 2 if i % 5 == 3 else None,
    )


def assert_accounted(metrics, replies) -> None:
    """Every request counted once in and once out; every answer other than 200 counted under the
    kind its body names, none outside the error shape."""
    s = parse(metrics.render())
    assert total(s, "pidec_http_requests_received_total") == total(s, "pidec_http_requests_total")
    assert total(s, "pidec_errors_total", kind="unshaped") == 0
    kinds = {}
    for r in replies:
        if r.status_code != 200:
            kinds[error_of(r)["kind"]] = kinds.get(error_of(r)["kind"], 0) + 1
    for kind, n in kinds.items():
        assert total(s, "pidec_errors_total", kind=kind) >= n, kind
    non_200 = sum(
        v for (name, labels), v in s.items() if name == "pidec_http_requests_total" and ("code", "200") not in labels
    )
    assert total(s, "pidec_errors_total") == non_200


# -- the contract --------------------------------------------------------------------------------


def test_generate_equals_offline_with_usage_and_timings(model):
    body = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 6}

    async def go():
        async with serving(model) as c:
            return await c.post("/v1/generate", json=body)

    r = run(go())
    assert r.status_code == 200, r.text
    data = r.json()
    details = model.generate(DOC, PROMPTS, max_new_tokens=6, return_details=True)
    assert data["outputs"] == details.outputs
    assert data["usage"] == details.usage
    assert set(data["timings"]) == {"queue_ms", "encode_ms", "decode_ms", "total_ms"}
    assert data["timings"]["total_ms"] >= data["timings"]["decode_ms"] > 0


def test_openapi_probes_and_metrics(model):
    async def go():
        async with serving(model) as c:
            schema = (await c.get("/openapi.json")).json()
            probes = [await c.get(p) for p in ("/healthz", "/readyz")]
            await c.post("/v1/generate", json={"document": DOC, "prompts": PROMPTS[:2], "max_new_tokens": 3})
            await c.post("/v1/generate", json={"document": "", "prompts": PROMPTS})
            return schema, probes, await c.get("/metrics")

    schema, probes, metrics = run(go())
    op = schema["paths"]["/v1/generate"]["post"]
    assert {"200", "413", "422", "429", "504"} <= set(op["responses"])
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert set(fields) == {"document", "prompts", "max_new_tokens", "num_beams", "layout"}
    assert [p.status_code for p in probes] == [200, 200]
    assert probes[1].json()["status"] == "ready"
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    for line in (
        'pidec_http_requests_total{path="/v1/generate",code="200"} 1',
        'pidec_http_requests_total{path="/v1/generate",code="422"} 1',
        'pidec_errors_total{kind="invalid_request"} 1',
        "pidec_queue_depth 0",
        'pidec_request_duration_seconds_count{path="/v1/generate"} 2',
        "pidec_batch_rows_count",
        'pidec_batch_cache_slots_bucket{le="16"}',
        'pidec_tokens_total{kind="document"}',
        "pidec_queue_seconds_bucket",
    ):
        assert line in text, line


@pytest.mark.parametrize(
    "settings, batched",
    [
        ({"max_wait_ms": 50}, True),
        ({"max_wait_ms": 50, "max_batch_documents": 1}, False),  # batching off
        ({"max_wait_ms": 50, "max_batch_tokens": 20}, False),  # each request alone is above the budget
    ],
)
def test_concurrent_requests_each_equal_offline(model, settings, batched):
    bodies = requests_mix(24 if batched else 8)

    async def go():
        async with serving(model, **settings) as c:
            replies = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))
            return replies, c.service.metrics

    replies, metrics = run(go())
    for body, r in zip(bodies, replies):
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == offline(model, body), body
    steps = metrics.value("pidec_batch_requests")
    alone = int(metrics.render().split('pidec_batch_requests_bucket{le="1"} ')[1].split("\n")[0])
    assert steps > 0
    assert (alone < steps) == batched  # batched: some steps decoded several requests together


def test_documents_join_a_running_batch_without_changing_answers(steady):
    """Continuous batching through the service: later requests join while earlier ones decode."""
    long = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 40}
    later = requests_mix(6)

    async def go():
        async with serving(steady, max_wait_ms=0) as c:
            with slow_decoder(steady, 0.005):
                first = asyncio.ensure_future(c.post("/v1/generate", json=long))
                await until(lambda: c.service.batcher.active_rows > 0)
                rest = []
                for b in later:
                    rest.append(asyncio.ensure_future(c.post("/v1/generate", json=b)))
                    await asyncio.sleep(0.03)
                return await first, await asyncio.gather(*rest)

    first, rest = run(go())
    assert first.json()["outputs"] == offline(steady, long)
    for body, r in zip(later, rest):
        assert r.json()["outputs"] == offline(steady, body)


# -- refusals ------------------------------------------------------------------------------------

BAD = [
    (b"{not json", 422, "invalid_json", "malformed JSON"),
    (b"[1, 2]", 422, "invalid_request", "expected a JSON object"),
    (
        json.dumps({"document": 1, "prompts": PROMPTS}),
        422,
        "invalid_request",
        "document: Input should be a valid string",
    ),
    (
        json.dumps({"document": DOC, "prompts": "hotel area"}),
        422,
        "invalid_request",
        "prompts: Input should be a valid list",
    ),
    (json.dumps({"document": DOC, "prompts": ["a", 2]}), 422, "invalid_request", "prompts[1]"),
    (json.dumps({"prompts": PROMPTS}), 422, "invalid_request", "document: required"),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "max_tokens": 3}), 422, "invalid_request", "max_tokens: unknown"),
    (
        json.dumps({"document": DOC, "prompts": PROMPTS, "max_new_tokens": 2.5}),
        422,
        "invalid_request",
        "max_new_tokens",
    ),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "num_beams": True}), 422, "invalid_request", "num_beams"),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "layout": "xyz"}), 422, "invalid_request", "layout"),
    (json.dumps({"document": "  \n", "prompts": PROMPTS}), 422, "invalid_request", "document is empty"),
    (json.dumps({"document": DOC, "prompts": []}), 422, "invalid_request", "prompts is empty"),
    (json.dumps({"document": DOC, "prompts": ["a", " "]}), 422, "invalid_request", "prompts[1] is empty"),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "max_new_tokens": 0}), 422, "invalid_request", ">= 1"),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "max_new_tokens": [1, 2]}), 422, "invalid_request", "2 max_new"),
    (json.dumps({"document": DOC, "prompts": ["a"] * 9}), 413, "too_large", "max_prompts=8"),
    (json.dumps({"document": DOC, "prompts": ["hotel " * 20]}), 413, "too_large", "max_prompt_tokens=16"),
    (json.dumps({"document": "hotel " * 60, "prompts": PROMPTS}), 413, "too_large", "max_document_tokens=50"),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "max_new_tokens": 65}), 422, "limit_exceeded", "limit=64"),
    (json.dumps({"document": DOC, "prompts": ["a"], "max_new_tokens": [65]}), 422, "limit_exceeded", "[0]=65"),
    (json.dumps({"document": DOC, "prompts": PROMPTS, "num_beams": 5}), 422, "limit_exceeded", "max_num_beams=4"),
    (json.dumps({"document": DOC * 30, "prompts": PROMPTS}), 413, "too_large", "max_body_bytes=2000"),
    # not text, or not JSON the way a parser is safe with: the error shape too, never 400 or 500
    (b'{"document": "caf\xe9", "prompts": ["a"]}', 422, "invalid_json", "not UTF-8: byte 0xe9 at offset 17"),
    (b"[" * 1500, 422, "invalid_json", "nested too deeply"),
    (
        b'{"document": "x \\ud800 y", "prompts": ["a"]}',
        422,
        "invalid_request",
        "document holds a lone surrogate U+D800",
    ),
    (b'{"document": "x", "prompts": ["a", "\\udfff"]}', 422, "invalid_request", "prompts[1] holds a lone surrogate"),
]


def test_bad_requests_get_clear_errors(model):
    limits = {
        "max_prompts": 8,
        "max_prompt_tokens": 16,
        "max_document_tokens": 50,
        "max_new_tokens_limit": 64,
        "max_num_beams": 4,
        "max_body_bytes": 2000,
    }

    async def go():
        async with serving(model, **limits) as c:
            headers = {"content-type": "application/json"}
            replies = [await c.post("/v1/generate", content=body, headers=headers) for body, *_ in BAD]

            async def chunks():  # no Content-Length: the limit is checked as the body streams in
                for _ in range(10):
                    yield b" " * 500

            chunked = await c.post("/v1/generate", content=chunks(), headers=headers)
            good = await c.post("/v1/generate", json={"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2})
            return replies, chunked, good, c.service.metrics

    replies, chunked, good, metrics = run(go())
    for (body, status, kind, text), r in zip(BAD, replies):
        assert r.status_code == status, (body, r.text)
        err = error_of(r)
        assert err["kind"] == kind and text in err["message"], (body, err)
        if kind in ("too_large", "limit_exceeded"):
            assert err["limit"] in err["message"]
    assert chunked.status_code == 413 and error_of(chunked)["limit"] == "max_body_bytes"
    assert good.status_code == 200  # refusals leave the service serving
    assert metrics.value("pidec_errors_total", kind="too_large") == 5
    assert metrics.value("pidec_errors_total", kind="invalid_json") == 3
    assert metrics.value("pidec_errors_total", kind="invalid_request") == 16
    assert_accounted(metrics, replies + [chunked, good])


def test_every_other_answer_has_the_error_shape_and_is_counted(model, monkeypatch):
    """404, 405, 415 and a bug in the request path answer {"error": {"kind", "message"}}, counted."""

    def broken(*args):
        raise TypeError("a bug")

    async def go():
        async with serving(model) as c:
            replies = [
                await c.get("/nope"),
                await c.post("/healthz"),
                await c.get("/v1/generate"),
                await c.post("/v1/generate", content=json.dumps({"document": DOC, "prompts": PROMPTS})),  # no type
                await c.post("/v1/generate", content=b"{}", headers={"content-type": "text/plain"}),
            ]
            monkeypatch.setattr("pidec.serving.requests.build_job", broken)
            replies.append(await c.post("/v1/generate", json={"document": DOC, "prompts": PROMPTS}))
            monkeypatch.undo()
            replies.append(await c.post("/v1/generate", json={"document": DOC, "prompts": PROMPTS[:1]}))
            return replies, c.service.metrics

    replies, metrics = run(go())
    got = [
        (r.status_code, r.headers["content-type"], error_of(r)["kind"] if r.status_code != 200 else None)
        for r in replies
    ]
    json_type = "application/json"
    assert got == [
        (404, json_type, "not_found"),
        (405, json_type, "method_not_allowed"),
        (405, json_type, "method_not_allowed"),
        (415, json_type, "unsupported_media_type"),
        (415, json_type, "unsupported_media_type"),
        (500, json_type, "internal"),
        (200, json_type, None),
    ]
    assert replies[1].headers["allow"] == "GET" and "allowed: POST" in error_of(replies[2])["message"]
    assert error_of(replies[5])["message"] == "internal error"  # the bug's text stays in the log
    assert_accounted(metrics, replies)
    s = parse(metrics.render())
    assert total(s, "pidec_http_requests_total", path="other", code="404") == 1


def test_access_lines_and_quiet(model, caplog):
    async def go(access_log):
        async with serving(model, access_log=access_log) as c:
            await c.post("/v1/generate", json={"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2})
            await c.get("/nope")

    with caplog.at_level(logging.INFO, logger="pidec.access"):
        run(go(True))
        lines = [r.getMessage() for r in caplog.records if r.name == "pidec.access"]
        caplog.clear()
        run(go(False))
        quiet = [r for r in caplog.records if r.name == "pidec.access"]
    assert len(lines) == 2 and not quiet
    assert re.fullmatch(r"POST /v1/generate 200 \d+\.\dms", lines[0]), lines[0]
    assert re.fullmatch(r"GET /nope 404 \d+\.\dms", lines[1]), lines[1]


def test_describe_names_what_is_served(model):
    text = describe(model, ServeSettings().checked(model), "ckpt/folder", "http://127.0.0.1:8123")
    for part in (
        "ckpt/folder",
        "device cpu",
        "dtype float32",
        "quantization none",
        "max_document_tokens=600",
        "max_connections=256",
        "shutdown_timeout=30",
        "malloc_arena_max=2",
        "authentication: none",
        "listening on http://127.0.0.1:8123",
    ):
        assert part in text, part


def test_bearer_token(model):
    body = {"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2}

    async def go():
        async with serving(model, api_key="s3cret") as c:
            return [
                await c.post("/v1/generate", json=body),
                await c.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"}),
                await c.post("/v1/generate", content=b"{bad", headers={"Authorization": "Basic s3cret"}),
                await c.get("/metrics"),
                await c.get("/healthz"),
                await c.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"}),
                await c.get("/metrics", headers={"Authorization": "Bearer s3cret"}),
            ]

    r = run(go())
    assert [x.status_code for x in r] == [401, 401, 401, 401, 200, 200, 200]
    assert error_of(r[0])["kind"] == "unauthorized" and r[0].headers["www-authenticate"] == "Bearer"
    assert 'pidec_errors_total{kind="unauthorized"} 4' in r[6].text


@pytest.mark.parametrize("key", ["clé", "ключ-🔑"])
def test_a_utf8_api_key(model, key):
    """The header's bytes are compared with the key's UTF-8 bytes; the key's latin-1 bytes (what a
    latin-1 decode of the header would have matched) are refused."""
    body = {"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2}
    utf8 = b"Bearer " + key.encode("utf-8")

    async def go():
        async with serving(model, api_key=key) as c:
            replies = [await c.post("/v1/generate", json=body, headers={"Authorization": utf8})]
            if key.isascii() or all(ord(ch) < 256 for ch in key):
                latin1 = b"Bearer " + key.encode("latin-1")
                replies.append(await c.post("/v1/generate", json=body, headers={"Authorization": latin1}))
            return replies

    replies = run(go())
    assert replies[0].status_code == 200, replies[0].text
    assert all(r.status_code == 401 for r in replies[1:])


def test_settings_are_checked(model):
    with pytest.raises(ValueError, match="max_queue must be an integer >= 1"):
        ServeSettings(max_queue=0).checked(model)
    with pytest.raises(ValueError, match="above the model's max_input_length=600"):
        ServeSettings(max_document_tokens=601).checked(model)
    with pytest.raises(ValueError, match="default_max_new_tokens=40 is above max_new_tokens_limit=20"):
        ServeSettings(max_new_tokens_limit=20, default_max_new_tokens=40).checked(model)
    with pytest.raises(ValueError, match="api_key"):
        ServeSettings(api_key="").checked(model)
    with pytest.raises(ValueError, match="body_timeout_s must be a number > 0, got 'x'"):
        ServeSettings(body_timeout_s="x").checked(model)
    with pytest.raises(ValueError, match="max_connections must be an integer >= 1"):
        ServeSettings(max_connections=0).checked(model)


# -- faults --------------------------------------------------------------------------------------


def test_queue_full_is_429_with_retry_after(steady):
    body = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 60}

    async def go():
        async with serving(steady, max_queue=1, max_batch_documents=1, max_wait_ms=0, retry_after_s=3) as c:
            with slow_decoder(steady, 0.01):
                running = asyncio.ensure_future(c.post("/v1/generate", json=body))
                await until(lambda: c.service.batcher.active_requests == 1)
                waiting = asyncio.ensure_future(c.post("/v1/generate", json=body))
                await until(lambda: c.service.batcher.queue_depth == 1)
                refused = await c.post("/v1/generate", json=body)
                return refused, await running, await waiting

    refused, running, waiting = run(go())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert error_of(refused)["kind"] == "queue_full" and "max_queue=1" in error_of(refused)["message"]
    assert running.status_code == waiting.status_code == 200
    assert running.json()["outputs"] == offline(steady, body)


def test_deadline_is_504_and_the_rows_leave_the_batch(steady):
    slow = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 200}  # 4 s of steps at 20 ms
    quick = {"document": DOC, "prompts": PROMPTS[:2], "max_new_tokens": 4}

    async def go():
        async with serving(steady, request_timeout_s=0.3, max_wait_ms=0) as c:
            with slow_decoder(steady, 0.02):
                late = await c.post("/v1/generate", json=slow)
                await until(lambda: c.service.batcher.active_rows == 0, 1.0)  # dropped, not run to the end
            return late, await c.post("/v1/generate", json=quick), c.service.metrics

    late, after, metrics = run(go())
    assert late.status_code == 504
    err = error_of(late)
    assert err["kind"] == "timeout" and err["limit"] == "request_timeout_s"
    assert after.status_code == 200 and after.json()["outputs"] == offline(steady, quick)
    assert metrics.value("pidec_errors_total", kind="timeout") == 1


def test_a_beam_batch_whose_callers_have_gone_stops_early(steady):
    slow = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 200, "num_beams": 2}  # 4 s at 20 ms a step
    quick = {"document": DOC, "prompts": PROMPTS[:2], "max_new_tokens": 4}

    async def go():
        async with serving(steady, request_timeout_s=0.3, max_wait_ms=0) as c:
            with slow_decoder(steady, 0.02):
                late = await c.post("/v1/generate", json=slow)
                t0 = time.monotonic()
                after = await c.post("/v1/generate", json=quick)  # the thread is free again soon
                waited = time.monotonic() - t0
            return late, after, waited

    late, after, waited = run(go())
    assert late.status_code == 504 and error_of(late)["kind"] == "timeout"
    assert after.status_code == 200 and after.json()["outputs"] == offline(steady, quick)
    assert waited < 2.0, f"the abandoned beam batch ran on for {waited:.1f} s"


def test_a_failing_batch_gets_500_and_the_service_keeps_serving(model):
    bodies = requests_mix(4)
    failing = {"on": True}
    inner = model.model.decode

    def flaky(*args, **kwargs):
        if failing["on"]:
            raise RuntimeError("injected fault")
        return inner(*args, **kwargs)

    async def go():
        async with serving(model, max_wait_ms=50) as c:
            model.model.decode = flaky
            try:
                broken = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))
                failing["on"] = False
                healed = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))
            finally:
                del model.model.decode
            return broken, healed, await c.get("/healthz"), c.service.metrics

    broken, healed, health, metrics = run(go())
    for r in broken:
        assert r.status_code == 500 and error_of(r)["kind"] == "internal"
        assert "injected fault" in error_of(r)["message"]
    for body, r in zip(bodies, healed):
        assert r.status_code == 200 and r.json()["outputs"] == offline(model, body)
    assert health.status_code == 200
    assert metrics.value("pidec_batch_failures_total") >= 1
    assert metrics.value("pidec_errors_total", kind="internal") == len(bodies)


def test_a_request_failing_to_join_gets_500_and_the_running_one_goes_on(steady):
    running = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 40}
    joining = {"document": DOC + " Another one.", "prompts": PROMPTS[1:], "max_new_tokens": 5}
    inner = steady.model.decode

    def no_prefill(tokens, *args):
        if tokens.shape[1] > 1:  # a prefill (steps feed one token a row)
            raise RuntimeError("injected prefill fault")
        time.sleep(0.005)
        return inner(tokens, *args)

    async def go():
        async with serving(steady, max_wait_ms=0) as c:
            first = asyncio.ensure_future(c.post("/v1/generate", json=running))
            await until(lambda: c.service.batcher.active_rows > 0)
            steady.model.decode = no_prefill
            try:
                failed = await c.post("/v1/generate", json=joining)
            finally:
                del steady.model.decode
            return failed, await first

    failed, first = run(go())
    assert failed.status_code == 500 and "injected prefill fault" in error_of(failed)["message"]
    assert first.status_code == 200 and first.json()["outputs"] == offline(steady, running)


def test_a_cancelled_request_leaves_the_batch_and_others_are_unaffected(steady):
    gone = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 200}
    stays = {"document": DOC + " Another one.", "prompts": PROMPTS[1:], "max_new_tokens": 12}

    async def go():
        async with serving(steady, max_wait_ms=0, max_new_tokens_limit=256) as c:
            with slow_decoder(steady, 0.005):
                doomed = asyncio.ensure_future(c.post("/v1/generate", json=gone))
                await until(lambda: c.service.batcher.active_requests == 1)
                other = asyncio.ensure_future(c.post("/v1/generate", json=stays))
                await until(lambda: c.service.batcher.active_requests == 2)
                doomed.cancel()  # the in-process client's way of hanging up
                await until(lambda: c.service.batcher.active_rows <= 3, 0.5)  # its 4 rows are gone
                return await other, c.service.metrics

    other, metrics = run(go())
    assert other.status_code == 200 and other.json()["outputs"] == offline(steady, stays)
    assert metrics.value("pidec_errors_total", kind="disconnected") == 1


# -- a real server: a socket that closes, SIGTERM, the load generator -----------------------------


@contextmanager
def live_server(model, **settings):
    """uvicorn on a free loopback port, in a thread."""
    import uvicorn

    app = create_app(model, ServeSettings(**settings), access_log=False)
    http = connection_class(app.state.service)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http=http)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.service
    finally:
        server.should_exit = True
        thread.join(20)


def test_client_disconnect_drops_its_rows(steady):
    stays = {"document": DOC + " Another one.", "prompts": PROMPTS[1:], "max_new_tokens": 12}
    body = json.dumps({"document": DOC, "prompts": PROMPTS, "max_new_tokens": 200}).encode()
    with live_server(steady, max_wait_ms=0) as (url, service), slow_decoder(steady, 0.005):
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        head = f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        run(until(lambda: service.batcher.active_requests == 1))
        result = {}
        other = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/generate", json=stays, timeout=60))
        )
        other.start()
        run(until(lambda: service.batcher.active_requests == 2))
        sock.close()
        run(until(lambda: service.metrics.value("pidec_errors_total", kind="disconnected") == 1))
        run(until(lambda: service.batcher.active_rows <= 3, 0.5))  # its 4 rows are gone, long before their end
        other.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["outputs"] == offline(steady, stays)


def read_all(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """What the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return out
        if not chunk:
            return out
        out += chunk


def post_head(length: int) -> bytes:
    return (
        f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_stalled_body_gets_408_and_a_client_gone_mid_body_counts_as_disconnected(model):
    body = json.dumps({"document": DOC, "prompts": PROMPTS}).encode()
    with live_server(model, body_timeout_s=0.5) as (url, service):
        port = int(url.rsplit(":", 1)[1])
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(post_head(len(body)) + body[:20])
            answer = read_all(stalled)  # and the server closes it
        waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"kind":"body_timeout"' in answer and b'"limit":"body_timeout_s"' in answer
        assert 0.4 < waited < 8
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(post_head(len(body)) + body[:20])
            time.sleep(0.1)
        run(until(lambda: service.metrics.value("pidec_errors_total", kind="disconnected") == 1))
        ok = httpx.post(f"{url}/v1/generate", json={"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2})
        assert ok.status_code == 200
        run(until(lambda: service.in_progress == 0))  # counted just after the answer is sent
        s = parse(service.metrics.render())
    assert total(s, "pidec_http_requests_total", code="400") == 0
    assert total(s, "pidec_http_requests_total", code="499") == 1 and total(s, "pidec_errors_total") == 2
    assert total(s, "pidec_http_requests_received_total") == total(s, "pidec_http_requests_total")


def test_connections_are_limited_and_a_silent_one_is_closed(model):
    with live_server(model, max_connections=2, header_timeout_s=2.0) as (url, service):
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # a head that never ends
        run(until(lambda: service.connections_open() == 2))
        with socket.create_connection(("127.0.0.1", port)) as third:
            third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_all(third)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"kind":"unavailable"' in answer and b'"limit":"max_connections"' in answer
        t0 = time.monotonic()
        assert read_all(silent) == b"" and read_all(partial) == b""  # closed by the server
        assert time.monotonic() - t0 < 8
        silent.close()
        partial.close()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200  # their slots are free again
        run(until(lambda: service.in_progress == 0))
        s = parse(service.metrics.render())
    assert total(s, "pidec_errors_total", kind="unavailable") == 1
    assert total(s, "pidec_http_requests_received_total") == total(s, "pidec_http_requests_total")


def test_after_shutdown_timeout_what_is_left_gets_503_and_leaves_the_batch(steady):
    slow = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 200}
    quick = {"document": DOC, "prompts": PROMPTS[:2], "max_new_tokens": 4}

    async def go():
        async with serving(steady, shutdown_timeout_s=0.5, max_wait_ms=0) as c:
            with slow_decoder(steady, 0.02):
                held = asyncio.ensure_future(c.post("/v1/generate", json=slow))
                await until(lambda: c.service.batcher.active_requests == 1)
                c.service.begin_drain()
                refused = await c.post("/v1/generate", json=quick)  # arriving while draining
                t0 = time.monotonic()
                late = await held
                waited = time.monotonic() - t0
                await until(lambda: c.service.batcher.active_rows == 0, 1.0)  # dropped, not run to the end
            return refused, late, waited, c.service.metrics

    refused, late, waited, metrics = run(go())
    assert refused.status_code == 503 and error_of(refused)["kind"] == "unavailable"
    assert late.status_code == 503 and error_of(late)["limit"] == "shutdown_timeout_s"
    assert waited < 2.0
    assert_accounted(metrics, [refused, late])


def test_trims_the_heap_once_per_idle_spell(model):
    body = {"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2}

    async def go():
        async with serving(model, trim_after_idle_s=0.1) as c:
            m = c.service.metrics
            await c.post("/v1/generate", json=body)
            await until(lambda: m.value("pidec_malloc_trims_total") == 1)
            await asyncio.sleep(0.5)
            once = m.value("pidec_malloc_trims_total")
            await c.post("/v1/generate", json=body)
            await until(lambda: m.value("pidec_malloc_trims_total") == 2)
            return once

    assert run(go()) == 1


def test_allocator_settings():
    with pytest.raises(ValueError, match="malloc_arena_max must be an integer >= 1"):
        allocator.limit_arenas(0)
    glibc = platform.libc_ver()[0] == "glibc"
    assert allocator.limit_arenas(64) is glibc  # above what a test process has: changes nothing
    assert isinstance(allocator.trim(), bool)


def test_sigterm_finishes_what_it_holds_then_exits(folder, model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pidec", "serve", "--model", str(folder), "--port", str(port), "--threads", "1"]
    cmd += ["--max-wait-ms", "2000", "--shutdown-timeout", "20"]
    env = dict(os.environ, PIDEC_API_KEY="k3y")
    auth = {"Authorization": "Bearer k3y"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180  # a loaded machine takes a while to import torch
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        bodies = requests_mix(5)
        replies = [None] * len(bodies)
        assert httpx.post(f"{url}/v1/generate", json=bodies[0], timeout=10).status_code == 401  # PIDEC_API_KEY

        def send(i):
            replies[i] = httpx.post(f"{url}/v1/generate", json=bodies[i], headers=auth, timeout=60)

        clients = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in clients:
            t.start()

        def held() -> int:
            text = httpx.get(f"{url}/metrics", headers=auth, timeout=5).text
            gauges = [line.split() for line in text.splitlines() if line.startswith(("pidec_queue_", "pidec_active_r"))]
            return sum(int(float(v)) for name, v in gauges if name in ("pidec_queue_depth", "pidec_active_requests"))

        while held() < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        body = json.dumps(bodies[0]).encode()
        stalled = socket.create_connection(("127.0.0.1", port))  # half a body, then nothing
        stalled.sendall(post_head(len(body)).replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer k3y") + body[:10])
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the five are held: waiting for the batch to start, or in it
        answer = read_all(stalled)  # answered at once, not left to hold the process
        stalled.close()
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/readyz", timeout=2)  # no longer accepting
        for t in clients:
            t.join(60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.communicate()[1]
    assert answer.startswith(b"HTTP/1.1 503 ") and b"shutting down" in answer, answer
    for body, r in zip(bodies, replies):
        assert r is not None and r.status_code == 200 and r.json()["outputs"] == offline(model, body)
    assert f"listening on http://127.0.0.1:{port}" in err and "device cpu, dtype float32" in err
    assert len(re.findall(r"pidec.access: POST /v1/generate 200 \d+\.\dms", err)) == 5, err


def test_short_load_test_has_no_errors(model):
    from pidec.bench.loadtest import format_report, run_loadtest

    with live_server(model, max_wait_ms=2) as (url, service):
        report = run_loadtest(url, concurrency=4, duration_s=2.0, workload="qa", timeout_s=60)
    assert report["errors"] == {} and report["succeeded"] >= 4
    assert report["requests_per_s"] > 0 and report["documents_per_s"] > 0
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "mean", "max"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["duration_s"] >= 2.0
    assert "p99" in format_report(report) and "errors: none" in format_report(report)
    assert service.metrics.value("pidec_batch_steps_total") > 0


def test_cli_serve_refuses_a_bad_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pidec.cli import app

    for name in allocator.PRIMITIVE_CACHE_VARIABLES:  # serve sets them if unset: not in this process
        monkeypatch.setenv(name, "1024")

    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "error:" in r.output
    if os.environ.get("PIDEC_API_KEY") is None:
        r = CliRunner().invoke(app, ["loadtest", "--url", "http://10.1.2.3:8000", "--duration", "1"])
        assert r.exit_code == 2 and "loopback" in r.output


def test_serve_options_come_from_the_settings(model, monkeypatch):
    """Every ServeSettings / ServerSettings field with a command-line form is a `pidec serve`
    option with the field's default and panel, and the command builds the settings from them
    (0 turning a memory bound off, a value below it refused by its flag)."""
    import dataclasses

    import typer.main
    from click.testing import CliRunner

    import pidec.cli.common as cli_common
    import pidec.cli.serve as serve_cli
    from pidec.cli import app, command

    params = {p.name: p for p in typer.main.get_command(app).commands["serve"].params}
    for cls in (ServeSettings, ServerSettings):
        for f in dataclasses.fields(cls):
            if not f.metadata["cli"]:
                assert f.name not in params, f.name
                continue
            assert params[f.name].rich_help_panel == f.metadata["panel"], f.name
            assert params[f.name].default == f.default, f.name
    assert params["api_key"].envvar == "PIDEC_API_KEY"

    seen = {}

    class Served(Exception):
        pass

    def fake_run_server(m, settings, **kw):
        seen.update(settings=settings, **kw)
        raise Served

    monkeypatch.setattr(cli_common, "load", lambda *a, **kw: model)
    monkeypatch.setattr(serve_cli, "prepare_process", lambda settings, server: seen.update(server=server))
    monkeypatch.setattr(serve_cli, "run_server", fake_run_server)
    args = ["serve", "--model", "m", "--port", "0", "--max-queue", "3", "--malloc-arena-max", "0"]
    result = CliRunner().invoke(command(), args + ["--trim-after-idle", "0", "--request-timeout", "9"])
    assert isinstance(result.exception, Served), result.output
    s = seen["settings"]
    assert (s.max_queue, s.malloc_arena_max, s.trim_after_idle_s, s.request_timeout_s) == (3, None, None, 9.0)
    assert s.max_document_tokens == 600 and s.primitive_cache == 32  # checked against the model; the default
    assert seen["port"] == 0 and seen["server"].port == 0 and seen["host"] == "127.0.0.1"

    for bad, message in (
        (["--primitive-cache", "-1"], "--primitive-cache must be >= 0 (0 turns it off), got -1"),
        (["--port", "70000"], "port must be an integer in 0-65535, got 70000"),
        (["--max-queue", "0"], "max_queue must be an integer >= 1, got 0"),
    ):
        result = CliRunner().invoke(command(), ["serve", "--model", "m", *bad])
        assert result.exit_code == 2 and message in result.output, result.output
