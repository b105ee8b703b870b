"""pidec.serving.batcher without HTTP: greedy and beam jobs share one continuous session, step by
step, and the budget counts the cache slots the session really holds."""

from __future__ import annotations

import threading
import time

from pidec import layouts
from pidec.generate import encode
from pidec.serving.batcher import Batcher, Job, footprint
from pidec.session import DecodeSession

from .helpers import DOC, PROMPTS, slow_decoder


def plan(model, document: str, prompts: list[str], max_new_tokens) -> layouts.Plan:
    cfg = model.config
    return layouts.build(
        model.tokenizer, [(document, prompts)], "pid", max_new_tokens, cfg.max_input_length, cfg.decoder_start_token_id
    )


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def test_a_greedy_job_admitted_while_a_long_beam_job_runs_finishes_first(steady):
    """Counted in decoding steps, not wall time: the greedy job needs its 5 steps (and the few the
    loop takes to pick it up), not the rest of the beam job's 150."""
    batcher = Batcher(steady, max_wait_ms=0)
    ended_at: dict[str, int] = {}
    done = threading.Event()

    def record(name):
        def on_done(job):
            ended_at[name] = batcher.steps
            if len(ended_at) == 2:
                done.set()

        return on_done

    beams = Job(plan(steady, DOC, PROMPTS, 150), num_beams=4, on_done=record("beams"))
    greedy = Job(plan(steady, DOC + " Another one.", PROMPTS[:2], 5), on_done=record("greedy"))
    batcher.start()
    try:
        with slow_decoder(steady, 0.002):
            batcher.submit(beams)
            wait_for(lambda: batcher.steps >= 3)
            submitted_at = batcher.steps
            batcher.submit(greedy)
            assert done.wait(60)
    finally:
        batcher.stop(10)
    assert beams.error is None and greedy.error is None
    assert ended_at["greedy"] - submitted_at <= 5 + 10, (submitted_at, ended_at)
    assert ended_at["greedy"] < ended_at["beams"] - 100, (submitted_at, ended_at)
    assert greedy.outputs == steady.generate(DOC + " Another one.", PROMPTS[:2], max_new_tokens=5)
    assert beams.outputs == steady.generate(DOC, PROMPTS, max_new_tokens=150, num_beams=4)


def test_footprint_is_what_the_session_holds(steady):
    """Jobs joining a running session at different steps: the footprint predicted before each
    admission is the cross-attention plus self-attention cache slots held right after it."""
    session = DecodeSession(steady.model)
    docs = [DOC, DOC + " More words." * 3, "A short one.", DOC + " Trains on monday."]
    for i, document in enumerate(docs):
        job = Job(plan(steady, document, PROMPTS[i % 3 :], 6 + 5 * (i % 2)), num_beams=1 + i % 2)
        predicted = footprint([job], session)
        session.admit(encode(steady.model, job.plan.docs), job.plan.rows, job.num_beams)
        held = session.docs * session.document_length + session.rows * session.capacity
        assert predicted == held, i
        for _ in range(3):
            session.step()
    assert session.rows  # the last ones still run


def test_a_busy_batcher_holds_a_bounded_cache(steady):
    """Requests keep arriving so the session never empties: the slots it holds stay within what
    its live requests need, and do not grow with the steps run. Sampled in the decoding thread
    (each job's completion callback), where the session is between steps."""
    batcher = Batcher(steady, max_wait_ms=0)
    held = []

    def sample(job):
        held.append((batcher.steps, batcher.active_rows, batcher.cache_slots))

    jobs = []
    batcher.start()
    try:
        with slow_decoder(steady, 0.001):
            for i in range(24):
                job = Job(plan(steady, f"Request {i}: a cheap hotel.", PROMPTS[: 1 + i % 4], 8 + i % 5), on_done=sample)
                jobs.append(job)
                batcher.submit(job)
                wait_for(lambda: batcher.steps >= 4 * (i + 1) or job.settled, 120)
            wait_for(lambda: all(j.settled for j in jobs), 120)
    finally:
        batcher.stop(10)
    assert all(j.error is None for j in jobs)
    assert held[-1][0] >= 80  # ran long enough for an unbounded cache to show
    longest_doc = max(len(d) for j in jobs for d in j.plan.docs)
    longest = max(len(r.prefix) + r.max_new_tokens for j in jobs for r in j.plan.rows)
    for steps, rows, slots in held:  # a row's cache is at most twice the longest span; under two documents a row
        assert slots <= rows * (2 * longest + 2 * longest_doc), (steps, rows, slots)
