"""`pidec loadtest`: N concurrent clients against a running `pidec serve`, for a fixed time.

Each client sends one request after another, each with a new document drawn in the shape of
`pidec bench`'s workload (`workloads.WORKLOADS`): for dst a 512-token dialogue with 30 prompts of
4-8 tokens whose answers get budgets of 2 tokens (80 % of them) or 3-10, for qa a 512-token
passage with 14 prompts of 8-16 tokens and budgets of 3-20. The words are common English words
that the T5 vocabulary holds as one token each, so a document of n words is n tokens plus EOS.
Budgets are sent per prompt: a random-weight model rarely writes EOS, so its rows run to their
budget, which gives every row the length the workload asks for.

After `duration_s` no client starts a new request; the ones in flight are awaited (up to the
client timeout) and counted. Only loopback addresses are targeted unless `allow_remote` is set:
a load generator pointed at someone else's server by mistake is a denial of service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
from urllib.parse import urlparse

from .workloads import WORKLOADS

_COMMON_WORDS = """
the hotel room night train time day week city north south east west centre cheap expensive moderate
price area guest house book stay people table restaurant food type name phone address leave arrive
depart destination ticket taxi car museum park college church theatre cinema pool free wifi parking
star rating breakfast dinner lunch morning evening afternoon please thank you would like need want
find help there here have has with from for about into over under after before near good great
small large family friend trip plan station bus airport street road bridge river garden market shop
music art history open close early late first last next other same new old long short quick slow
happy sure yes no maybe also just only very much many more most some any every each
"""
WORDS = _COMMON_WORDS.split()  # each one T5 token


def check_url(url: str, allow_remote: bool = False) -> str:
    """The URL without a trailing slash; refuses anything but http(s) to a loopback host unless allowed."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"url {url!r}: expected http://HOST:PORT")
    host = parsed.hostname
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not loopback and not allow_remote:
        raise ValueError(
            f"url {url!r} is not a loopback address (127.0.0.1, ::1, localhost); "
            "pass allow_remote (--allow-remote) to load a server you are responsible for"
        )
    return url.rstrip("/")


def draw_request(workload: str, rng: random.Random) -> dict:
    """One request body in the shape of the workload."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    w = WORKLOADS[workload]

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    k = w.subtasks
    return {
        "document": words(w.doc_tokens - 1),  # + EOS = doc_tokens
        "prompts": [words(rng.randint(*w.prompt_range)) for _ in range(k)],
        "max_new_tokens": w.output_lengths(rng, k),
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _client(client, url: str, stop_at: float, rng: random.Random, workload: str, record) -> None:
    import httpx

    while time.monotonic() < stop_at:
        body = draw_request(workload, rng)
        t0 = time.monotonic()
        try:
            r = await client.post(f"{url}/v1/generate", json=body)
        except httpx.TimeoutException:
            record(time.monotonic() - t0, "client_timeout", 0)
            continue
        except httpx.TransportError as e:
            record(time.monotonic() - t0, f"connection:{type(e).__name__}", 0)
            await asyncio.sleep(0.1)  # a server that is down should not be hammered in a tight loop
            continue
        elapsed = time.monotonic() - t0
        if r.status_code == 200:
            record(elapsed, None, r.json()["usage"]["output_tokens"])
            continue
        try:
            kind = r.json()["error"]["kind"]
        except Exception:  # noqa: BLE001 - not our JSON: name it by the status
            kind = "other"
        record(elapsed, f"{r.status_code}:{kind}", 0)
        if r.status_code == 429:
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))


async def _run(url, concurrency, duration_s, workload, api_key, seed, timeout_s) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    tokens = [0]

    def record(elapsed: float, error: str | None, output_tokens: int) -> None:
        if error is None:
            latencies.append(elapsed)
            tokens[0] += output_tokens
        else:
            errors[error] = errors.get(error, 0) + 1

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits, trust_env=False) as client:
        start = time.monotonic()
        stop_at = start + duration_s
        await asyncio.gather(
            *(_client(client, url, stop_at, random.Random(f"{seed}:{i}"), workload, record) for i in range(concurrency))
        )
        elapsed = time.monotonic() - start
    latencies.sort()
    ok, failed = len(latencies), sum(errors.values())
    ms = [x * 1e3 for x in latencies]
    return {
        "url": url,
        "workload": workload,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 3),
        "requests": ok + failed,
        "succeeded": ok,
        "errors": dict(sorted(errors.items())),
        "requests_per_s": round((ok + failed) / elapsed, 3),
        "documents_per_s": round(ok / elapsed, 3),
        "output_tokens_per_s": round(tokens[0] / elapsed, 1),
        "latency_ms": {
            "p50": _round(percentile(ms, 50)),
            "p95": _round(percentile(ms, 95)),
            "p99": _round(percentile(ms, 99)),
            "mean": _round(sum(ms) / len(ms) if ms else None),
            "max": _round(ms[-1] if ms else None),
        },
    }


def _round(x):
    return None if x is None else round(x, 1)


def run_loadtest(
    url: str,
    concurrency: int = 16,
    duration_s: float = 60.0,
    workload: str = "dst",
    api_key: str | None = None,
    allow_remote: bool = False,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> dict:
    """Run the clients for `duration_s` seconds and return the report (see `format_report`)."""
    url = check_url(url, allow_remote)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if not duration_s > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration_s!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s!r}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    return asyncio.run(_run(url, concurrency, duration_s, workload, api_key, seed, timeout_s))


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"

    def show(x):
        return "-" if x is None else f"{x:.1f}"

    head = f"{r['workload']} against {r['url']}: {r['concurrency']} clients, {r['duration_s']:.1f} s"
    rates = (
        f"requests: {r['requests']} ({r['succeeded']} ok), {r['requests_per_s']:.2f} requests/s, "
        f"{r['documents_per_s']:.2f} documents/s, {r['output_tokens_per_s']:.1f} output tokens/s"
    )
    latency = (
        f"latency ms: p50 {show(lat['p50'])}, p95 {show(lat['p95'])}, p99 {show(lat['p99'])}, "
        f"mean {show(lat['mean'])}, max {show(lat['max'])}"
    )
    return "\n".join([head, rates, latency, f"errors: {errors}"])
