"""pidec.serving with a decoder-only checkpoint (a tiny random Llama): answers equal to
`CausalModel.generate` alone, batched or not, the same error contract and metrics as for T5,
deadlines, a failing batch, and `pidec serve` taking the checkpoint."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from typer.testing import CliRunner

import pidec
from pidec import allocator
from pidec.serving.server import describe
from pidec.serving.settings import ServeSettings
from tests.causal_tiny import family_for_tests
from tests.serving.helpers import PROMPTS, error_of, offline, request_bodies, run, serving, slowed

torch.set_num_threads(1)
DOC = "User: I need a cheap hotel in the north for 3 nights. System: The Acorn has rooms."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return family_for_tests("llama", tmp_path_factory)[0]


@pytest.fixture(scope="module")
def model(folder):
    return pidec.load(folder)


def bodies(n: int) -> list[dict]:
    """Documents of different lengths, 1-4 prompts, one budget or one per prompt, both layouts."""
    return request_bodies(n, DOC, 4, layout_of=lambda i: "pie" if i % 3 == 2 else None)


def test_one_request_equals_generate_with_usage_and_timings(model):
    body = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 6}

    async def go():
        async with serving(model, access_log=False) as c:
            return await c.post("/v1/generate", json=body)

    r = run(go())
    assert r.status_code == 200, r.text
    data, details = r.json(), offline(model, body, return_details=True)
    assert data["outputs"] == details.outputs and data["usage"] == details.usage
    assert data["usage"]["document_tokens"] > 0 and data["usage"]["output_tokens"] > 0
    assert set(data["timings"]) == {"queue_ms", "encode_ms", "decode_ms", "total_ms"}
    assert data["timings"]["total_ms"] >= data["timings"]["decode_ms"] > 0


@pytest.mark.parametrize("batched", [False, True])
def test_concurrent_requests_each_equal_generate(model, batched):
    mix = bodies(8)
    settings = {"max_wait_ms": 100.0} if batched else {"max_batch_documents": 1, "max_wait_ms": 0}

    async def go():
        async with serving(model, access_log=False, **settings) as c:
            replies = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in mix))
            return replies, c.service.metrics

    replies, metrics = run(go())
    for body, r in zip(mix, replies):
        assert r.status_code == 200, r.text
        details = offline(model, body, return_details=True)
        assert r.json()["outputs"] == details.outputs and r.json()["usage"] == details.usage, body
    batches = metrics.value("pidec_batch_requests")
    assert batches == len(mix) if not batched else 2 <= batches < len(mix)  # two layouts: two batches at least
    assert metrics.value("pidec_batch_steps_total") > 0
    out = sum(r.json()["usage"]["output_tokens"] for r in replies)
    assert metrics.value("pidec_tokens_total", kind="output") == out


BAD = [
    ({"document": DOC, "prompts": PROMPTS, "layout": "seq"}, 422, "invalid_request", "unknown layout 'seq'"),
    ({"document": DOC, "prompts": PROMPTS, "num_beams": 2}, 422, "invalid_request", "num_beams=2"),
    ({"document": DOC * 3, "prompts": PROMPTS}, 413, "too_large", "document + prompts[0] is"),
    ({"document": DOC, "prompts": PROMPTS, "max_new_tokens": 250}, 422, "invalid_request", "over the model's"),
    ({"document": DOC, "prompts": ["a " * 40]}, 413, "too_large", "max_prompt_tokens=16"),
    ({"document": " ", "prompts": PROMPTS}, 422, "invalid_request", "document is empty"),
    ({"document": DOC, "prompts": PROMPTS, "max_new_tokens": 300}, 422, "limit_exceeded", "max_new_tokens_limit"),
]


def test_bad_requests_get_the_same_clear_errors(model):
    limits = {"max_document_tokens": 150, "max_prompt_tokens": 16, "max_new_tokens_limit": 256}

    async def go():
        async with serving(model, access_log=False, **limits) as c:
            replies = [await c.post("/v1/generate", json=body) for body, *_ in BAD]
            good = await c.post("/v1/generate", json={"document": DOC, "prompts": PROMPTS[:1], "max_new_tokens": 2})
            return replies, good, c.service.metrics

    replies, good, metrics = run(go())
    for (body, status, kind, text), r in zip(BAD, replies):
        assert r.status_code == status, (body, r.text)
        err = error_of(r)
        assert err["kind"] == kind and text in err["message"], (body, err)
        if kind == "too_large":
            assert err["limit"] in err["message"]
    assert good.status_code == 200
    assert metrics.value("pidec_errors_total", kind="too_large") == 2
    assert metrics.value("pidec_errors_total", kind="invalid_request") == 4


def test_a_failing_batch_gets_500_and_the_service_keeps_serving(model):
    mix = bodies(3)
    failing = {"on": True}
    inner = model.decode_plan

    def flaky(*args, **kwargs):
        if failing["on"]:
            raise RuntimeError("injected fault")
        return inner(*args, **kwargs)

    async def go():
        async with serving(model, access_log=False, max_wait_ms=50) as c:
            model.decode_plan = flaky
            try:
                broken = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in mix))
                failing["on"] = False
                healed = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in mix))
            finally:
                del model.decode_plan
            return broken, healed, await c.get("/healthz"), c.service.metrics

    broken, healed, health, metrics = run(go())
    for r in broken:
        assert r.status_code == 500 and "injected fault" in error_of(r)["message"]
    for body, r in zip(mix, healed):
        assert r.status_code == 200 and r.json()["outputs"] == offline(model, body, return_details=True).outputs
    assert health.status_code == 200 and metrics.value("pidec_batch_failures_total") >= 1


def test_a_batch_whose_callers_have_gone_stops_and_the_next_is_answered(model):
    slow = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": 100}
    quick = {"document": DOC, "prompts": PROMPTS[:2], "max_new_tokens": 4}

    async def go():
        async with serving(model, access_log=False, request_timeout_s=0.3, max_wait_ms=0) as c:
            with slowed(model.model, "forward_hidden", 0.05):
                late = await c.post("/v1/generate", json=slow)
                t0 = time.monotonic()
                await asyncio.sleep(0.1)
                while c.service.batcher.active_requests:  # the abandoned batch stops at its next step
                    await asyncio.sleep(0.01)
                waited = time.monotonic() - t0
            return late, await c.post("/v1/generate", json=quick), waited, c.service.metrics

    late, after, waited, metrics = run(go())
    assert late.status_code == 504 and error_of(late)["limit"] == "request_timeout_s"
    assert after.status_code == 200 and after.json()["outputs"] == offline(model, quick, return_details=True).outputs
    assert waited < 2.0, f"the abandoned batch ran on for {waited:.1f} s"
    assert metrics.value("pidec_errors_total", kind="timeout") == 1


def test_describe_names_the_decoder_only_model(model):
    text = describe(model, ServeSettings().checked(model), "ckpt/llama", "http://127.0.0.1:8123")
    assert "ckpt/llama (llama, decoder-only, hidden_size=64, 2 layers, 4 query / 2 KV heads" in text
    assert f"max_document_tokens={model.config.max_input_length}" in text


def test_cli_serve_takes_a_decoder_only_checkpoint(folder, monkeypatch):
    from pidec.cli import app
    from pidec.cli import serve as serve_cli

    for name in allocator.PRIMITIVE_CACHE_VARIABLES:  # serve sets them if unset: not in this process
        monkeypatch.setenv(name, "1024")
    monkeypatch.setattr(allocator, "limit_arenas", lambda n: None)
    seen = {}

    class Served(Exception):
        pass

    def fake_run_server(model, settings, **kwargs):
        seen.update(model=model, settings=settings)
        raise Served()

    monkeypatch.setattr(serve_cli, "run_server", fake_run_server)
    res = CliRunner().invoke(app, ["serve", "--model", str(folder), "--max-prompts", "5", "--chat-template"])
    assert isinstance(res.exception, Served), res.output
    assert isinstance(seen["model"], pidec.CausalModel) and seen["settings"].max_prompts == 5
    assert seen["model"].template.chat  # the service builds rows with the chat template
    bad = CliRunner().invoke(app, ["serve", "--model", str(folder), "--prefix-template", "no field"])
    assert bad.exit_code == 2 and "has no {document} field" in bad.output
