"""Soak and fault test of `pidec serve`, on loopback only, bounded in time and in count.

Starts `python -m pidec serve` on 127.0.0.1 (a free port) with a checkpoint (--model) or a random
T5 built here (--random tiny|small, with --tokenizer), then for --duration seconds, split into
--rounds rounds, runs:

- --clients clients in a loop, mixed: greedy requests of varied shapes (documents of 20-500
  words, 1-30 prompts, budgets 2-12), beam requests (2-4 beams), and impatient clients whose
  timeout is shorter than the answer (the server sees them leave: "disconnected");
- one fault client cycling through a slow client (half a body, then silence: 408), a client
  that leaves mid-body, and hostile bodies (not UTF-8, nested too deeply, a lone surrogate,
  malformed JSON, unknown fields, a path that does not exist), each with the answer it must get;
- once a round, a retry storm: 3 x max_queue requests at once, each retrying at once on 429
  (ignoring Retry-After) up to 5 tries.

After each round it waits for the service to go idle, then records the server's RSS and checks
its metrics: requests in equal answers out. At the end it sends SIGTERM under load (requests in
flight and a client holding half a body) and times the exit.

The report (markdown, --out; JSON with --json) has per-round latency percentiles and RSS,
outcomes by kind, the server's accounting beside what the clients saw, the SIGTERM result, and
PASS/FAIL for each promise. The exit status is 1 when a promise fails.

    python scripts/soak.py --random small --tokenizer ../shared/tokenizers/t5 --duration 600 --out soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from pidec.bench.loadtest import WORDS, percentile
from pidec.serving.prometheus import parse, total

HOST = "127.0.0.1"  # never anything else
MODEL_SHAPES = {  # random T5 v1.1 shapes: tiny is what the tests use, small is about 38 MB of float32
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "small": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
}


# -- the server ---------------------------------------------------------------------------------


def random_model(shape: str, tokenizer: str, folder: Path) -> Path:
    import torch

    from pidec import checkpoint
    from pidec.model import T5, T5Config

    tok = checkpoint.load_tokenizer(tokenizer)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        **MODEL_SHAPES[shape],
    )  # fmt: skip
    model = T5(cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 2.0  # some rows end early, some run to their budget
    checkpoint.save(model, folder, tokenizer=tok)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`pidec serve` in a subprocess, with its RSS sampled every second."""

    def __init__(self, model: Path, port: int, args, log_path: Path):
        self.port, self.url = port, f"http://{HOST}:{port}"
        self.settings = dict(
            body_timeout=2, header_timeout=2, request_timeout=args.request_timeout, shutdown_timeout=5,
            max_queue=args.max_queue, max_connections=args.max_connections, trim_after_idle=1,
        )  # fmt: skip
        cmd = [sys.executable, "-m", "pidec", "serve", "--model", str(model), "--host", HOST, "--port", str(port)]
        for name, value in self.settings.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        cmd += ["--quiet"] + (["--threads", str(args.threads)] if args.threads else [])
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.t0 = time.monotonic()
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MB)
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            mb = self.rss_mb()
            if mb is not None:
                self.rss.append((round(time.monotonic() - self.t0, 1), round(mb, 1)))

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready within {timeout_s:.0f} s; see {self.log.name}")

    def metrics(self) -> dict:
        return parse(httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text)

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- traffic ------------------------------------------------------------------------------------


def mixed_request(rng: random.Random) -> tuple[dict, str]:
    """A request of a varied shape, and its mode: greedy, beam or impatient."""
    k = rng.randint(1, 30)
    body = {
        "document": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 500))),
        "prompts": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(k)],
        "max_new_tokens": [rng.randint(2, 12) for _ in range(k)],
    }
    roll = rng.random()
    if roll < 0.2:
        body["num_beams"] = rng.randint(2, 4)
        body["prompts"], body["max_new_tokens"] = body["prompts"][:4], body["max_new_tokens"][:4]
        return body, "beam"
    return body, "impatient" if roll < 0.3 else "greedy"


class Record:
    """What the clients saw."""

    def __init__(self):
        self.outcomes: dict[str, int] = {}  # "200", "429:queue_full", "client_timeout", ...
        self.codes: dict[int, int] = {}  # answers received, by status
        self.latencies: list[list[float]] = [[]]  # per round: seconds of 200 answers
        self.unexpected: list[str] = []
        self.faults_sent = 0

    def answer(self, r: httpx.Response, elapsed: float | None = None) -> str:
        """Count an answer; the latency of a 200 goes into this round's percentiles when given."""
        self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1
        if r.status_code == 200:
            if elapsed is not None:
                self.latencies[-1].append(elapsed)
            key = "200"
        else:
            try:
                key = f"{r.status_code}:{r.json()['error']['kind']}"
            except (ValueError, KeyError, TypeError):
                key = f"{r.status_code}:unshaped"
        self.count(key)
        return key

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


async def client(c: httpx.AsyncClient, url: str, stop_at: float, rng: random.Random, rec: Record, args) -> None:
    while time.monotonic() < stop_at:
        body, mode = mixed_request(rng)
        timeout = rng.uniform(0.05, 0.5) if mode == "impatient" else args.request_timeout + 10
        t0 = time.monotonic()
        try:
            r = await c.post(f"{url}/v1/generate", json=body, timeout=timeout)
        except httpx.TimeoutException:
            rec.count("client_timeout" if mode == "impatient" else "client_timeout:unexpected")
            continue
        except httpx.TransportError as e:
            rec.count(f"connection:{type(e).__name__}")
            await asyncio.sleep(0.2)
            continue
        key = rec.answer(r, time.monotonic() - t0)
        if key.startswith("429"):
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))


async def raw(port: int, data: bytes, read: bool, close_after: float = 0.0) -> bytes:
    """Send `data` on a fresh connection; read until the server closes (read) or hang up after `close_after`."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        if not read:
            await asyncio.sleep(close_after)
            return b""
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def post(body: bytes, length: int | None = None, ctype: str = "application/json") -> bytes:
    head = f"POST /v1/generate HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\nContent-Length: "
    return (head + f"{len(body) if length is None else length}\r\nConnection: close\r\n\r\n").encode() + body


GOOD = json.dumps({"document": "the hotel is in the north", "prompts": ["hotel area"], "max_new_tokens": 2}).encode()
FAULTS = [  # name, bytes sent, read the answer?, the answer's status line and kind it must have
    ("slow client (half a body)", post(GOOD[:15], len(GOOD)), True, "408", "body_timeout"),
    ("not UTF-8", post(b'{"document": "caf\xe9", "prompts": ["a"]}'), True, "422", "invalid_json"),
    ("nested too deeply", post(b"[" * 5000), True, "422", "invalid_json"),
    ("lone surrogate", post(b'{"document": "a \\ud800", "prompts": ["b"]}'), True, "422", "invalid_request"),
    ("malformed JSON", post(b'{"document": '), True, "422", "invalid_json"),
    ("unknown field", post(b'{"document": "a", "prompts": ["b"], "x": 1}'), True, "422", "invalid_request"),
    ("not JSON", post(b"document=a", ctype="text/plain"), True, "415", "unsupported_media_type"),
    ("no such path", f"GET /nope HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(), True, "404", "not_found"),
    ("gone mid-body", post(GOOD[:15], len(GOOD)), False, None, "disconnected"),
]  # fmt: skip


async def faults(port: int, stop_at: float, rec: Record) -> None:
    while time.monotonic() < stop_at:
        name, data, read, status, kind = FAULTS[rec.faults_sent % len(FAULTS)]  # on from where the last round stopped
        rec.faults_sent += 1
        answer = await raw(port, data, read, close_after=0.2)
        rec.count(f"fault:{kind}")
        if read:
            head = answer.split(b"\r\n", 1)[0].decode("latin-1")
            if head.startswith("HTTP/1.1 "):
                code = int(head.split()[1])
                rec.codes[code] = rec.codes.get(code, 0) + 1
            if f" {status} " not in head + " " or f'"kind":"{kind}"'.encode() not in answer:
                rec.unexpected.append(f"{name}: got {head!r}")
        await asyncio.sleep(0.5)


async def retry_storm(c: httpx.AsyncClient, url: str, n: int, rec: Record) -> dict:
    """n requests at once, each retrying at once on 429, up to 5 tries; bounded."""
    rng = random.Random(n)
    tries = {"429": 0, "ok": 0, "other": 0}

    async def one(i: int) -> None:
        body = {
            "document": " ".join(rng.choice(WORDS) for _ in range(60)),
            "prompts": ["hotel area"],
            "max_new_tokens": 3,
        }
        for _ in range(5):
            try:
                r = await c.post(f"{url}/v1/generate", json=body)
            except httpx.TransportError as e:
                rec.count(f"storm:connection:{type(e).__name__}")
                return
            key = rec.answer(r)
            if r.status_code != 429:
                tries["ok" if key == "200" else "other"] += 1
                return
            tries["429"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return tries


async def one_round(url: str, port: int, seconds: float, rnd: int, args, rec: Record) -> dict:
    stop_at = time.monotonic() + seconds
    # idle connections dropped before the server's keep-alive timeout (5 s) can close them under us
    limits = httpx.Limits(max_connections=args.clients * 4 + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=args.request_timeout + 10) as c:
        tasks = [
            client(c, url, stop_at, random.Random(f"{args.seed}:{rnd}:{i}"), rec, args) for i in range(args.clients)
        ]
        tasks.append(faults(port, stop_at, rec))

        async def storm_midway():
            await asyncio.sleep(seconds / 2)
            return await retry_storm(c, url, 3 * args.max_queue, rec)

        *_, storm = await asyncio.gather(*tasks, storm_midway())
    return storm


async def sigterm_under_load(server: Server, n: int, rec: Record) -> dict:
    """n requests in flight and one client holding half a body; SIGTERM; how it ends."""
    rng = random.Random(7)
    results: dict[str, int] = {}
    async with httpx.AsyncClient(trust_env=False, timeout=60) as c:

        async def one():
            body, _ = mixed_request(rng)
            body.pop("num_beams", None)
            try:
                r = await c.post(f"{server.url}/v1/generate", json=body)
                key = rec.answer(r)
            except httpx.TransportError as e:
                key = f"connection:{type(e).__name__}"
            results[key] = results.get(key, 0) + 1

        flight = [asyncio.ensure_future(one()) for _ in range(n)]
        stalled = asyncio.ensure_future(raw(server.port, post(GOOD[:15], len(GOOD)), True))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*flight)
        try:
            answer = await stalled
        except (OSError, asyncio.TimeoutError) as e:
            answer = repr(e).encode()
    code = await asyncio.to_thread(server.proc.wait, 60)
    return {
        "answers": dict(sorted(results.items())),
        "stalled_client": answer.split(b"\r\n", 1)[0].decode("latin-1"),
        "stalled_got_503": answer.startswith(b"HTTP/1.1 503"),
        "exit_code": code,
        "exit_s": round(time.monotonic() - t0, 2),
    }


def cache_stats(samples: dict, before: dict | None) -> dict:
    """The decoding steps of a round and the self-attention cache per row over them: its mean and
    the smallest histogram bound at or above every step's (from the batcher's
    pidec_batch_cache_slots histogram, the round's part: its counts minus those of `before`)."""

    def delta(name: str, **labels) -> float:
        return total(samples, name, **labels) - (total(before, name, **labels) if before else 0.0)

    steps = delta("pidec_batch_cache_slots_count")
    bounds = sorted(
        float(dict(labels)["le"])
        for (name, labels), _ in samples.items()
        if name == "pidec_batch_cache_slots_bucket" and dict(labels)["le"] != "+Inf"
    )
    top = next((b for b in bounds if delta("pidec_batch_cache_slots_bucket", le=f"{b:g}") >= steps), float("inf"))
    mean = delta("pidec_batch_cache_slots_sum") / steps if steps else 0.0
    return {"steps": int(steps), "cache_mean": mean, "cache_max_le": top if steps else 0.0}


# -- the report ---------------------------------------------------------------------------------


def ms(x):
    return "-" if x is None else f"{x * 1e3:.0f}"


def report(args, server: Server, rounds: list[dict], rec: Record, server_codes: dict, term: dict, checks) -> str:
    s = server.settings
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())  # fmt: skip
    lines = [
        f"## pidec serve soak: {args.duration:.0f} s, {args.clients} clients, {len(rounds)} rounds",
        "",
        f"Model {args.model or 'random ' + args.random}; CPU {cpu} ({os.cpu_count()} cores); settings "
        + ", ".join(f"{k}={v}" for k, v in s.items()),
        f"Command: `python scripts/soak.py {' '.join(sys.argv[1:])}`",
        "",
        "| round | requests answered | 200 | 429 | other | p50 ms | p95 ms | p99 ms | storm 429s | RSS after (MB) | vs round 1 "
        "| steps | cache slots/row, mean | max <= |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = rounds[0]["rss_mb"] if rounds else None
    for i, r in enumerate(rounds, 1):
        lat = sorted(r["latencies"])
        vs = f"{(r['rss_mb'] / first - 1) * 100:+.0f}%" if first else "-"
        lines.append(
            f"| {i} | {r['answered']} | {r['ok']} | {r['c429']} | {r['answered'] - r['ok'] - r['c429']} "
            f"| {ms(percentile(lat, 50))} | {ms(percentile(lat, 95))} | {ms(percentile(lat, 99))} "
            f"| {r['storm']['429']} | {r['rss_mb']:.0f} | {vs} | {r['steps']} | {r['cache_mean']:.0f} "
            f"| {r['cache_max_le']:g} |"
        )
    lines += ["", "| outcome (client's view) | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(rec.outcomes.items())]
    lines += [
        "",
        "Server's counts from /metrics when idle, before SIGTERM; clients' counts include the SIGTERM phase,",
        "and a client that gave up (timeout, hang-up) is 499 on the server.",
        "",
        "| status | server counted | clients received |",
        "|---|---|---|",
    ]
    for code in sorted(set(server_codes) | {str(c) for c in rec.codes}):
        lines.append(f"| {code} | {server_codes.get(code, 0):.0f} | {rec.codes.get(int(code), 0)} |")
    lines += [
        "",
        f"SIGTERM under load: answers {term['answers']}; the client holding half a body got "
        f"`{term['stalled_client']}`; exit code {term['exit_code']} after {term['exit_s']} s.",
        "",
        f"RSS over time (s, MB): {', '.join(f'{t:.0f}:{mb:.0f}' for t, mb in server.rss[:: max(1, len(server.rss) // 30)])}",
        "",
        "| promise | result |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'}{': ' + why if why else ''} |" for name, ok, why in checks]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder")
    p.add_argument("--random", choices=sorted(MODEL_SHAPES), help="build a random T5 of this shape instead")
    p.add_argument("--tokenizer", default=os.path.join(os.environ.get("PIDEC_SHARED", "../shared"), "tokenizers/t5"))
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load, all rounds together")
    p.add_argument("--rounds", type=int, default=0, help="default: one a minute, at least 2")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server (default: torch's)")
    p.add_argument("--rss-growth", type=float, default=0.20, help="allowed RSS growth after a round over round 1")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown report here too")
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    if (args.model is None) == (args.random is None):
        p.error("give --model or --random")
    if not 0 < args.duration <= 3600 or not 1 <= args.clients <= 512:
        p.error("--duration must be in (0, 3600] seconds and --clients in [1, 512]: the soak is bounded")
    n_rounds = args.rounds or max(2, round(args.duration / 60))

    with tempfile.TemporaryDirectory(prefix="pidec-soak-") as tmp:
        model = Path(args.model) if args.model else random_model(args.random, args.tokenizer, Path(tmp) / "model")
        port = free_port()
        server = Server(model, port, args, Path(tmp) / "server.log")
        rec, rounds = Record(), []
        scraped = None  # the metrics at the end of the round before
        try:
            server.wait_ready(args.ready_timeout)
            for rnd in range(n_rounds):
                before = dict(rec.codes)
                storm = asyncio.run(one_round(server.url, port, args.duration / n_rounds, rnd, args, rec))
                idle_deadline = time.monotonic() + 60
                while total(server.metrics(), "pidec_http_requests_in_progress") > 1:  # the scrape itself
                    if time.monotonic() > idle_deadline:
                        break
                    time.sleep(0.2)
                time.sleep(3.0)  # trim_after_idle=1: the service gives its freed heap back
                answered = {k: v - before.get(k, 0) for k, v in rec.codes.items()}
                now = server.metrics()
                cache = cache_stats(now, scraped)
                scraped = now
                rounds.append(
                    dict(
                        answered=sum(answered.values()), ok=answered.get(200, 0), c429=answered.get(429, 0),
                        latencies=rec.latencies[-1], storm=storm, rss_mb=server.rss_mb(), **cache,
                    )
                )  # fmt: skip
                print(
                    f"round {rnd + 1}/{n_rounds}: {rounds[-1]['answered']} answered, RSS {rounds[-1]['rss_mb']:.0f} MB",
                    flush=True,
                )
                rec.latencies.append([])
            samples = server.metrics()
            received = total(samples, "pidec_http_requests_received_total")
            answered = total(samples, "pidec_http_requests_total")
            server_codes = {}
            for (name, labels), v in samples.items():
                if name == "pidec_http_requests_total":
                    code = dict(labels)["code"]
                    server_codes[code] = server_codes.get(code, 0) + v
            unshaped = total(samples, "pidec_errors_total", kind="unshaped")
            term = asyncio.run(sigterm_under_load(server, args.clients, rec))
        finally:
            server.close()
            log_tail = Path(server.log.name).read_text()[-3000:]
    first = rounds[0]["rss_mb"]
    worst = max(r["rss_mb"] / first - 1 for r in rounds)
    cache_first, cache_worst = rounds[0]["cache_max_le"], max(r["cache_max_le"] for r in rounds)
    bad_kinds = {k: v for k, v in rec.outcomes.items() if ":unshaped" in k or k.startswith(("500", "connection", "storm:connection")) or k.endswith(":unexpected")}  # fmt: skip
    term_bad = {k: v for k, v in term["answers"].items() if k not in ("200", "503:unavailable")}
    checks = [
        ("every fault got its documented answer", not rec.unexpected, "; ".join(rec.unexpected[:5])),
        ("no 500, no answer outside the error shape, no refused connection", not bad_kinds and not unshaped, str(bad_kinds or "")),
        ("requests in = answers out (server metrics, idle)", received == answered + 1, f"{received:.0f} in, {answered:.0f} out + this scrape"),
        (f"RSS after each round within {args.rss_growth:.0%} of round 1", worst <= args.rss_growth, f"worst {worst:+.0%}"),
        ("self-attention cache per row bounded: no round above 2x round 1's", cache_worst <= 2 * cache_first, f"round 1 <= {cache_first:g}, worst <= {cache_worst:g} slots"),
        ("SIGTERM: held requests answered 200 or 503", not term_bad, str(term_bad or "")),
        ("SIGTERM: the half-sent body got 503", term["stalled_got_503"], ""),
        ("SIGTERM: exit 0 within shutdown_timeout + 5 s", term["exit_code"] == 0 and term["exit_s"] < server.settings["shutdown_timeout"] + 5, ""),
    ]  # fmt: skip
    text = report(args, server, rounds, rec, server_codes, term, checks)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        raw_rounds = [{k: v for k, v in r.items() if k != "latencies"} for r in rounds]
        Path(args.json).write_text(json.dumps(dict(rounds=raw_rounds, outcomes=rec.outcomes, server_codes=server_codes, sigterm=term, rss=server.rss, checks=checks), indent=1))  # fmt: skip
    if not all(ok for _, ok, _ in checks):
        print("server log tail:\n" + log_tail, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
