"""What the service's tests share (tests/serving: test_serve, test_causal, test_batcher): the app
with an in-process client, a model made slow so requests stay in flight, waiting for a
condition, the error body of a reply, and the offline answer a request must equal."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager, contextmanager

import httpx

from pidec.serving.app import create_app
from pidec.serving.settings import ServeSettings

DOC = "User: I need a cheap hotel in the north for three nights. System: The Acorn guest house has rooms."
PROMPTS = ["hotel price range", "hotel area", "hotel book stay", "train day"]


@asynccontextmanager
async def serving(model, access_log=True, **settings):
    """The app with its lifespan running, and an in-process client (`client.service`: its state)."""
    app = create_app(model, ServeSettings(**settings), access_log=access_log)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pidec", timeout=60) as client:
            client.service = app.state.service
            yield client


def run(coro):
    return asyncio.run(coro)


def offline(model, body: dict, return_details: bool = False):
    """What `generate` answers for a request body alone."""
    return model.generate(
        body["document"],
        body["prompts"],
        max_new_tokens=body.get("max_new_tokens", 32),
        num_beams=body.get("num_beams", 1),
        layout=body.get("layout", "pid"),
        return_details=return_details,
    )


@contextmanager
def slowed(owner, method: str, delay_s: float):
    """`owner.method` sleeps `delay_s` before every call (a model's decoder pass, say), so
    requests stay in flight; the instance attribute goes afterwards and the method is back."""
    inner = getattr(owner, method)

    def slow(*args, **kwargs):
        time.sleep(delay_s)
        return inner(*args, **kwargs)

    setattr(owner, method, slow)
    try:
        yield
    finally:
        delattr(owner, method)


def slow_decoder(model, delay_s: float):
    """Every decoder pass (prefill or step) of a T5 `Model` sleeps first."""
    return slowed(model.model, "decode", delay_s)


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


def request_bodies(n: int, document: str, lengths: int, layout_of=lambda i: None, num_beams_of=lambda i: None):
    """`n` request bodies: `document` grown by one of `lengths` amounts, 1-4 prompts, one budget or
    one per prompt; `layout_of(i)` and `num_beams_of(i)` give request i's layout and beams (None:
    the default, left out of the body)."""
    out = []
    for i in range(n):
        prompts = PROMPTS[i % 4 :] + PROMPTS[: i % 3]
        body = {"document": document + " More words." * (i % lengths) + f" Request {i}.", "prompts": prompts}
        body["max_new_tokens"] = [2 + (i + j) % 7 for j in range(len(prompts))] if i % 2 else 3 + i % 6
        if num_beams_of(i) is not None:
            body["num_beams"] = num_beams_of(i)
        if layout_of(i) is not None:
            body["layout"] = layout_of(i)
        out.append(body)
    return out
