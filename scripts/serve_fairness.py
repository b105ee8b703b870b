"""A greedy request's latency under concurrent beam-search traffic against under the same amount of
greedy traffic (issue 20, defect 1), on a random model served on the loopback interface.

    python scripts/serve_fairness.py [--size tiny] [--clients 4] [--rounds 5] [--samples 3]
        [--max-new-tokens 32] [--num-beams 4] [--time-limit-s 600]

Builds a random T5 v1.1 of `--size` with the T5 tokenizer (/work/shared/tokenizers/t5, or
--tokenizer), its EOS logit zeroed so that every row runs to its budget, starts `pidec serve` on
127.0.0.1 in a subprocess, and in each round measures the latency of one greedy request (4
prompts, --max-new-tokens each), `--samples` times in a row:

    alone    nothing else running
    beams    while `--clients` clients each send the same request with num_beams=--num-beams,
             one after another, without pause
    greedy   while `--clients` clients each send the same request greedily
    rows     while `--clients` clients each send a greedy request with --num-beams times the
             prompts: as many decoder rows as a beam request holds (the same work per step)

and prints the median of each per round, then the medians over rounds and the ratios
beams / greedy (the same number of requests) and beams / rows (the same decoder rows): a beam
request holds num_beams rows per prompt, so at the same number of requests each step under beam
traffic computes more rows; at the same rows what is left is how the two are scheduled. Only the loopback interface is used; the run stops after --time-limit-s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from pidec import checkpoint
from pidec.model import T5, T5Config

DOC = "User: I need a cheap hotel in the north for three nights. System: The Acorn guest house has rooms."
PROMPTS = ["hotel price range", "hotel area", "hotel book stay", "train day"]


def build_model(folder: Path, size: str, tokenizer: str) -> None:
    tok = checkpoint.load_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = T5(T5Config.from_name(size))
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0  # rows run to their budget: latency is length-bound
    checkpoint.save(model, folder, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not become ready")
        time.sleep(0.2)


def post(url: str, body: dict) -> float:
    """Seconds to the answer; inf when the service gave up on it (504 after its request timeout)."""
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=300)
    if r.status_code == 504:
        return float("inf")
    r.raise_for_status()
    return time.perf_counter() - t0


def latency_under(url: str, background: dict | None, clients: int, probe: dict, samples: int) -> float:
    """Median latency of `probe` while `clients` threads send `background` back to back."""
    stop = threading.Event()

    def client():
        while not stop.is_set():
            post(url, background)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients if background else 0)]
    for t in threads:
        t.start()
    try:
        if threads:
            time.sleep(0.5)  # the background traffic is running
        return statistics.median(post(url, probe) for _ in range(samples))
    finally:
        stop.set()
        for t in threads:
            t.join(300)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", help="model preset: tiny, small, base")
    p.add_argument("--tokenizer", default="/work/shared/tokenizers/t5")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--time-limit-s", type=float, default=600)
    a = p.parse_args()
    if not (1 <= a.clients <= 16 and 1 <= a.rounds <= 20 and 1 <= a.samples <= 20):
        raise SystemExit("--clients 1-16, --rounds 1-20, --samples 1-20")
    probe = {"document": DOC, "prompts": PROMPTS, "max_new_tokens": a.max_new_tokens}
    beams = dict(probe, document=DOC + " Beam traffic.", num_beams=a.num_beams)
    greedy = dict(probe, document=DOC + " Greedy traffic.")
    wide = dict(greedy, prompts=[f"{q} {i}" for i in range(a.num_beams) for q in PROMPTS])
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), a.size, a.tokenizer)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "pidec", "serve", "--model", tmp, "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(
            cmd + ["--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_ready(url, proc, 300)
            post(url, probe)  # warm-up
            rows = {"alone": [], "beams": [], "greedy": [], "rows": []}
            for r in range(a.rounds):
                if time.monotonic() - started > a.time_limit_s:
                    print(f"time limit reached after {r} rounds")
                    break
                rows["alone"].append(latency_under(url, None, a.clients, probe, a.samples))
                rows["beams"].append(latency_under(url, beams, a.clients, probe, a.samples))
                rows["greedy"].append(latency_under(url, greedy, a.clients, probe, a.samples))
                rows["rows"].append(latency_under(url, wide, a.clients, probe, a.samples))
                print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    print(
        f"median over {len(rows['alone'])} rounds ({a.size}, {a.clients} clients, {len(PROMPTS)} prompts x "
        f"{a.max_new_tokens} tokens, num_beams={a.num_beams}): alone {med['alone']:.3f} s, under beams "
        f"{med['beams']:.3f} s, under greedy {med['greedy']:.3f} s, under greedy with as many rows "
        f"{med['rows']:.3f} s; beams / greedy = {med['beams'] / med['greedy']:.2f}, "
        f"beams / rows = {med['beams'] / med['rows']:.2f}"
    )


if __name__ == "__main__":
    main()
