"""pidec.bench.loadtest: the target guard, the workload shapes and the percentiles (the run itself is
exercised against a live server in test_serve)."""

import random

import pytest

from pidec.bench.loadtest import check_url, draw_request, percentile
from pidec.bench.workloads import WORKLOADS

from .shared_data import T5_TOKENIZER, require


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:8000", "http://127.5.0.1"]
)
def test_loopback_urls_pass(url):
    assert check_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"])
def test_other_hosts_need_allow_remote(url):
    with pytest.raises(ValueError, match="not a loopback address"):
        check_url(url)
    assert check_url(url, allow_remote=True) == url


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://127.0.0.1", "http://"])
def test_malformed_urls(url):
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        check_url(url)


@pytest.mark.parametrize("workload", ["dst", "qa"])
def test_requests_have_the_bench_shapes(workload):
    from pidec.checkpoint import load_tokenizer

    tok = load_tokenizer(require(T5_TOKENIZER))
    w = WORKLOADS[workload]
    rng = random.Random(0)
    for _ in range(3):
        body = draw_request(workload, rng)
        assert len(tok(body["document"])["input_ids"]) == w.doc_tokens  # one token a word, plus EOS
        assert len(body["prompts"]) == len(body["max_new_tokens"]) == w.subtasks
        for p in body["prompts"]:
            assert w.prompt_range[0] <= len(tok(p, add_special_tokens=False)["input_ids"]) <= w.prompt_range[1]
    with pytest.raises(ValueError, match="unknown workload"):
        draw_request("chat", rng)


def test_percentile_is_nearest_rank():
    values = sorted(float(x) for x in range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
