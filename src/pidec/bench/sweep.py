"""Per-document latency against the number of subtasks K: `pidec bench --sweep-k 1,2,4,...`.

For each K the workload is drawn with K prompts (same document length, prompt lengths and
output-length distribution; `workloads.draw_documents(subtasks=K)`) and `harness.run_bench` times the
configurations side by side on it, round-robin, as a normal run does. One random-weight model
is built once and shared by every K (saved to a temporary checkpoint folder that each run
loads), so the lines of the plot differ only in K and in the configuration.

What to expect: prompt-in-encoder (hf-pie, ct2-pie, pidec-pie) encodes the document K times,
so its cost grows linearly in K from the start; prompt-in-decoder encodes it once and its
decoding steps stream the weights once for all K rows, so its cost stays nearly flat until the
rows' own work (prefill, attention over the shared cache) catches up with the encoder's.
"""

from __future__ import annotations

import tempfile

from .. import checkpoint
from .harness import run_bench
from .workloads import WORKLOADS, build_random_model

SWEEP_CONFIGS = ["hf-pie", "ct2-pie-int8", "pidec-pie", "pidec-pid", "pidec-pid-int8"]
DEFAULT_KS = [1, 2, 4, 8, 16, 32, 64]


def parse_ks(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: positive integers, each once, in the order given."""
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep-k {text!r}: expected a comma list of integers, e.g. 1,2,4,8") from None
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--sweep-k {text!r}: expected integers >= 1, e.g. 1,2,4,8")
    return list(dict.fromkeys(ks))


def run_sweep(
    ks: list[int] | None = None,
    configs: list[str] | None = None,
    workload: str = "dst",
    model_size: str = "small",
    model_dir: str | None = None,
    docs: int = 1,
    repeats: int = 1,
    dtype: str = "float32",
    seed: int = 0,
    threads: int | None = None,
    doc_tokens: int | None = None,
    progress=None,
    pack: bool = True,
) -> dict:
    """Time `configs` on `workload` with K prompts per document, for each K in `ks`.
    Returns {"ks", "configs", "latency_s": {config: [seconds per document, one per K]}, "runs": [...]}.
    `progress(k, result)`, when given, is called after each K (the CLI prints a line). `pack`:
    as in `run_bench`."""

    ks = list(DEFAULT_KS if ks is None else ks)
    configs = list(SWEEP_CONFIGS if configs is None else configs)
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {ks!r}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="pidec-sweep-") as tmp:
        folder = model_dir
        if folder is None:  # one model for every K, as `run_bench` would build it
            checkpoint.save(build_random_model(model_size, seed), tmp)
            folder = tmp
        for k in ks:
            result = run_bench(
                workload,
                model_size,
                folder,
                configs,
                docs=docs,
                repeats=repeats,
                dtype=dtype,
                seed=seed,
                threads=threads,
                doc_tokens=doc_tokens,
                subtasks=k,
                ceiling=False,
                pack=pack,
            )
            runs.append({"k": k, "result": result})
            if progress is not None:
                progress(k, result)
    return _collect(runs, workload, model_size, model_dir, dtype, docs, repeats, ks)


def _collect(runs: list[dict], workload, model_size, model_dir, dtype, docs, repeats, ks) -> dict:
    """The sweep's result: one latency list per configuration, the runs themselves kept."""
    names = [r["config"] for r in runs[0]["result"]["results"]]
    latency = {
        name: [next(r["latency_s_median"] for r in run["result"]["results"] if r["config"] == name) for run in runs]
        for name in names
    }
    first = runs[0]["result"]
    model = {"size": model_size} if model_dir is None else {"path": str(model_dir)}
    model.update(params=first["model"]["params"])
    return {
        "workload": workload,
        "model": model,
        "dtype": dtype,
        "device": first["device"],
        "torch_threads": first["torch_threads"],
        "docs": docs,
        "repeats": repeats,
        "ks": ks,
        "configs": names,
        "skipped": first["skipped"],
        "latency_s": latency,
        "runs": runs,
    }


def format_sweep(sweep: dict) -> str:
    """Seconds per document, one row per configuration, one column per K."""
    model = sweep["model"].get("size") or sweep["model"].get("path")
    title = (
        f"K sweep: workload {sweep['workload']}  model {model}  dtype {sweep['dtype']}  "
        f"threads {sweep['torch_threads']}  docs {sweep['docs']} x repeats {sweep['repeats']}  "
        "(seconds per document)"
    )
    lines = [title]
    header = f"{'config':<16}" + "".join(f"{'K=' + str(k):>10}" for k in sweep["ks"])
    lines += [header, "-" * len(header)]
    for name in sweep["configs"]:
        lines.append(f"{name:<16}" + "".join(f"{s:>10.3f}" for s in sweep["latency_s"][name]))
    for s in sweep.get("skipped") or []:
        lines.append(f"skipped {', '.join(s['configs'])}: {s['reason']}")
    return "\n".join(lines)


def plot_sweep(sweep: dict, path: str, title: str | None = None) -> None:
    """Log-log plot of seconds per document against K, one line per configuration (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"hf": "--", "ct2": ":", "pidec": "-"}
    for name in sweep["configs"]:
        ax.plot(
            sweep["ks"],
            sweep["latency_s"][name],
            styles.get(name.split("-")[0], "-"),
            marker="o",
            markersize=4,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sweep["ks"])
    ax.set_xticklabels([str(k) for k in sweep["ks"]])
    ax.set_xlabel("subtasks per document (K)")
    ax.set_ylabel("latency per document (s)")
    model = sweep["model"].get("size") or sweep["model"].get("path")
    ax.set_title(title or f"{sweep['workload']}, T5 v1.1 {model}, {sweep['torch_threads']} CPU threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
