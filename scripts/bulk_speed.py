"""Documents/s of `pidec run` against its baselines, and its peak memory as the corpus grows.

    PYTHONPATH=src python scripts/bulk_speed.py --docs 64 --rounds 1 --hf-docs 4 --out bulk-speed

The corpus has the dst workload's shape (`pidec.bench.harness.WORKLOADS["dst"]`: 512-token
documents, 30 slots) drawn with `draw_documents` and written as text through the T5 vocabulary
(../shared/tokenizers/t5); the model is T5 base with random weights (`build_random_model`),
saved as a checkpoint folder. `pidec run` reads the corpus as a folder of 8 JSONL shards (the
loop reads the same records from one file): Ray Data spreads a corpus over its actors by input
blocks, and one file is one block.

Answer lengths (`--budgets`): random weights do not stop early, so every answer runs to its field's
budget. `dst` (the default) gives the fields file dst's answer lengths as `max_new_tokens`, drawn as
the bench draws them (24 of the 30 slots 2 tokens, "none" and EOS; the other 6 3-10 tokens: here 5,
6, 6, 6, 8 and 9); `uniform` gives every slot `--max-new-tokens`. Every configuration makes the same
tokens: the loop passes the fields' budgets to `Model.generate`, the transformers baseline makes
one `generate` call per distinct budget (it takes one budget per call).

Configurations, each a fresh process, measured round-robin (`--rounds` times, best kept);
`--quantize int8` loads pidec's model with int8 linear layers in the loop and the runs alike:

- loop:       `Model.generate` one document at a time (model load included, as in the others)
- hf-pie:     transformers `generate`, prompt in encoder, the 30 rows of one document batched
              (over the first `--hf-docs` documents: it is slow)
- loop-keep:  the loop, with `pidec.allocator.keep_freed_blocks()` after the load (as `pidec run`)
- run-w1:     `pidec run --workers 1`
- run-w1-glibc: `pidec run --workers 1 --malloc default` (glibc's own malloc thresholds)
- run-w2:     `pidec run --workers 2`
- ray-a2:     `pidec run --engine ray --actors 2 --actor-cpus C` (a local Ray started by the run)
- ray-a2-idle1s: the same with Ray's own idle-worker threshold (1 s) in the environment, in place
              of the hour `pidec run` gives a local Ray (`pidec.bulk.ray.local_system_config`)

Documents/s is documents over the wall time of the work inside the process (model load, reading,
decoding, writing; not the Python start-up and imports: `pidec run`'s own `wall_s`). Memory: the peak RSS of `pidec run --workers 1` on
the tiny preset over 64 and 4,096 documents of the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 8  # `pidec run` reads the corpus as a folder of this many JSONL shards (Ray spreads work by them)
TOKENIZER = Path(os.environ.get("PIDEC_SHARED", ROOT.parent / "shared")) / "tokenizers" / "t5"

LOOP = """
import json, sys, time
import pidec
t0 = time.perf_counter()
m = pidec.load(sys.argv[1], quantize=None if sys.argv[6] == "-" else sys.argv[6])
if sys.argv[5] == "keep":
    from pidec import allocator
    allocator.keep_freed_blocks()
fields = json.load(open(sys.argv[3]))
prompts = [f["prompt"] for f in fields]
budgets = [f.get("max_new_tokens") or int(sys.argv[4]) for f in fields]
n = 0
with open(sys.argv[2]) as f:
    for line in f:
        r = json.loads(line)
        m.generate(r["document"], prompts, max_new_tokens=budgets, truncate="right")
        n += 1
print(json.dumps({"docs": n, "wall_s": time.perf_counter() - t0}))
"""

HF = """
import json, sys, time
import torch, transformers
from pidec import checkpoint
t0 = time.perf_counter()
tok = checkpoint.load_tokenizer(sys.argv[1])
hf = transformers.T5ForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
fields = json.load(open(sys.argv[3]))
groups = {}  # one generate call per budget, so that every row makes as many tokens as in pidec's runs
for fl in fields:
    groups.setdefault(fl.get("max_new_tokens") or int(sys.argv[4]), []).append(fl["prompt"])
limit, n = int(sys.argv[5]), 0
with open(sys.argv[2]) as f, torch.inference_mode():
    for line in f:
        if n >= limit:
            break
        r = json.loads(line)
        for budget, prompts in groups.items():
            enc = tok([p + " " + r["document"] for p in prompts], return_tensors="pt", padding=True,
                      truncation=True, max_length=512)
            hf.generate(**enc, max_new_tokens=budget, num_beams=1, do_sample=False)
        n += 1
print(json.dumps({"docs": n, "wall_s": time.perf_counter() - t0}))
"""

MAXRSS = """
import atexit, resource, sys
atexit.register(lambda: sys.stderr.write(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n"))
from pidec.cli import main
sys.argv = ["pidec"] + sys.argv[1:]
main()
"""


def env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def build(
    out: Path,
    size: str,
    docs: int,
    seed: int = 0,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
    budgets: str = "uniform",
) -> tuple[Path, Path, Path]:
    """A random checkpoint of `size`, a dst-shaped corpus of `docs` records and its fields file
    (doc_tokens, subtasks: another document length or number of fields than dst's; budgets: "dst"
    gives each field the answer length the first document's draw has, "uniform" none)."""
    from pidec import checkpoint
    from pidec.bench.harness import WORKLOADS, build_random_model, draw_documents

    tok = checkpoint.load_tokenizer(TOKENIZER)
    ckpt = out / f"model-{size}"
    if not (ckpt / "config.json").exists():
        checkpoint.save(build_random_model(size, seed), ckpt, tokenizer=tok)
    workload = WORKLOADS["dst"]
    corpus = out / f"corpus-{docs}-{doc_tokens or workload.doc_tokens}.jsonl"
    draws = draw_documents(workload, min(docs, 64), seed, doc_tokens=doc_tokens, subtasks=subtasks)
    with corpus.open("w") as f:
        for i in range(docs):
            d = draws[i % len(draws)]
            f.write(json.dumps({"id": f"doc-{i}", "document": tok.decode(d.document[:-1])}) + "\n")
    shards = out / f"{corpus.stem}-shards"  # the same records as a sharded corpus, as large ones are
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir()
    lines = corpus.read_text().splitlines(keepends=True)
    per = -(-len(lines) // SHARDS)
    for k in range(0, len(lines), per):
        (shards / f"part-{k // per:05d}.jsonl").write_text("".join(lines[k : k + per]))
    fields = out / f"fields-{len(draws[0].prompts)}{'-dst' if budgets == 'dst' else ''}.json"
    items = [{"name": f"slot_{j}", "prompt": tok.decode(p)} for j, p in enumerate(draws[0].prompts)]
    if budgets == "dst":
        for item, n in zip(items, draws[0].out_lens):
            item["max_new_tokens"] = n
    fields.write_text(json.dumps(items))
    return ckpt, corpus, fields


def timed_run(args: list[str], out: Path, extra_env: dict | None = None) -> dict:
    summary = out / "summary.json"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "pidec", "run", *args, "--output", str(out), "--json-summary", str(summary)]
    r = subprocess.run(cmd + ["--progress", "off"], env=env() | (extra_env or {}), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    return {"docs": s["records"], "wall_s": s["wall_s"], "errors": s["errors"]}


def script_run(code: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss(args: list[str]) -> int:
    r = subprocess.run([sys.executable, "-c", MAXRSS, "run", *args], env=env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return int(next(x for x in r.stderr.splitlines() if x.startswith("MAXRSS_KB")).split()[1]) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--hf-docs", type=int, default=4, help="documents for the transformers baseline (it is slow)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--size", default="base")
    p.add_argument("--budgets", choices=["dst", "uniform"], default="dst", help="answer lengths (see above)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="every slot's budget with --budgets uniform")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--configs", default="run-w1,loop,run-w2,ray-a2,hf-pie")
    p.add_argument("--quantize", choices=["int8"], default=None, help="for pidec's configurations (run, loop)")
    p.add_argument("--memory-docs", default="64,4096", help="corpus sizes for the peak-memory check ('' to skip)")
    p.add_argument("--memory-doc-tokens", type=int, default=None, help="document length there (default: dst's)")
    p.add_argument("--memory-subtasks", type=int, default=None, help="fields there (default: dst's)")
    p.add_argument("--out", default="bulk-speed")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, corpus, fields = build(out, a.size, a.docs, budgets=a.budgets)
    sharded = corpus.parent / f"{corpus.stem}-shards"
    common = ["--model", str(ckpt), "--input", str(sharded), "--fields", str(fields), "--truncate", "right"]
    common += ["--max-new-tokens", str(a.max_new_tokens), "--batch-tokens", str(a.batch_tokens)]
    if a.quantize:
        if "hf-pie" in a.configs.split(","):
            p.error("--quantize applies to pidec's configurations only: leave hf-pie out")
        common += ["--quantize", a.quantize]
    cores = len(os.sched_getaffinity(0))
    ray_args = common + ["--engine", "ray", "--actors", "2", "--actor-cpus", str(max(1, cores // 2))]
    configs = {
        "loop": lambda: script_run(LOOP, ckpt, corpus, fields, a.max_new_tokens, "-", a.quantize or "-"),
        "loop-keep": lambda: script_run(LOOP, ckpt, corpus, fields, a.max_new_tokens, "keep", a.quantize or "-"),
        "hf-pie": lambda: script_run(HF, ckpt, corpus, fields, a.max_new_tokens, a.hf_docs),
        "run-w1": lambda: timed_run(common + ["--workers", "1"], out / "o-w1"),
        "run-w1-glibc": lambda: timed_run(common + ["--workers", "1", "--malloc", "default"], out / "o-w1"),
        "run-w2": lambda: timed_run(common + ["--workers", "2"], out / "o-w2"),
        "ray-a2": lambda: timed_run(ray_args, out / "o-ray"),
        "ray-a2-idle1s": lambda: timed_run(
            ray_args, out / "o-ray", {"RAY_idle_worker_killing_time_threshold_ms": "1000"}
        ),
    }
    names = [c for c in a.configs.split(",") if c]
    best: dict[str, dict] = {}
    for r in range(a.rounds):
        for name in names:
            res = configs[name]()
            res["docs_per_s"] = res["docs"] / res["wall_s"]
            print(
                f"round {r + 1} {name}: {res['docs']} docs in {res['wall_s']:.1f} s, {res['docs_per_s']:.3f} docs/s",
                flush=True,
            )
            if name not in best or res["docs_per_s"] > best[name]["docs_per_s"]:
                best[name] = res
    result = {"size": a.size, "docs": a.docs, "cores": cores, "quantize": a.quantize, "budgets": a.budgets}
    result["configs"] = best
    if "run-w1" in best:
        w1 = best["run-w1"]["docs_per_s"]
        ratios = {}
        if "loop" in best:
            ratios["run-w1 / loop"] = w1 / best["loop"]["docs_per_s"]
        if "hf-pie" in best:
            ratios["run-w1 / hf-pie"] = w1 / best["hf-pie"]["docs_per_s"]
        for k in ("run-w2", "ray-a2"):
            if k in best:
                ratios[f"{k} / run-w1"] = best[k]["docs_per_s"] / w1
        if "ray-a2" in best and "run-w2" in best:
            ratios["ray-a2 / run-w2"] = best["ray-a2"]["docs_per_s"] / best["run-w2"]["docs_per_s"]
        result["ratios"] = ratios
    if a.memory_docs:
        shape = dict(doc_tokens=a.memory_doc_tokens, subtasks=a.memory_subtasks, budgets=a.budgets)
        tiny, _, tiny_fields = build(out, "tiny", 1, **shape)
        result["peak_rss_mib"] = {}
        for n in map(int, a.memory_docs.split(",")):
            _, c, _ = build(out, "tiny", n, **shape)
            shutil.rmtree(out / "o-mem", ignore_errors=True)
            rss = peak_rss(["--model", str(tiny), "--input", str(c), "--output", str(out / "o-mem"), "--fields",
                            str(tiny_fields), "--truncate", "right", "--max-new-tokens", str(a.max_new_tokens),
                            "--progress", "off"])  # fmt: skip
            result["peak_rss_mib"][n] = round(rss / 2**20, 1)
            print(f"memory: {n} docs, peak RSS {rss / 2**20:.1f} MiB", flush=True)
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
