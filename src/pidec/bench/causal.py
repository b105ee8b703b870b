"""Decoder-only speed: `pidec bench --arch smollm2-135m|qwen2.5-0.5b|tiny`.

A random-weight model at a real shape (`causal.PRESETS`) answers the T5 workloads' documents
(`harness.WORKLOADS`: dst, qa, summ; the same drawn token ids): each row is the document's
tokens followed by one prompt's, and every row writes exactly its drawn number of tokens (no
EOS), so every configuration generates the same number of tokens. Configurations, timed
round-robin (each pass runs every configuration on every document, so a machine's drift falls
on all alike), median over the passes:

- hf-pie: transformers `generate` on each full row (document + prompt), the K rows of a
  document batched with left padding; a batch runs to its longest row.
- hf-prefix-copied: transformers with the document's cache computed once and copied into each
  of the K rows' caches (`DynamicCache.batch_repeat_interleave`), then `generate` on the
  prompts (padded between document and prompt, masked).
- ct2-static-prompt (+ -int8): CTranslate2's Generator with the document as `static_prompt`
  (its cache computed once and reused), the K prompts a batch; skipped, with the reason, when
  ctranslate2 is missing or cannot convert the model.
- pidec-pie, pidec-pid (+ -int8): this package's engine, rows whole or over one shared prefix.

Beside the time, the bytes one decoding step reads, analytically: the weights (once per step,
whatever the number of rows), the shared prefix cache (pid: one copy per document) and the
rows' own caches (pid: each row's prompt and answer so far; pie: each row's document too).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .. import checkpoint, packing
from .. import quantize as quant
from ..causal import checkpoint as causal_checkpoint
from ..causal.generate import SuffixRow, decode
from ..causal.model import CausalConfig, CausalLM
from ..generate import sync
from .harness import WORKLOADS, DocDraw, draw_documents
from .sweep import plot_sweep

ARCHES = ("smollm2-135m", "qwen2.5-0.5b", "tiny")
CONFIGS = ["hf-pie", "hf-prefix-copied", "ct2-static-prompt", "pidec-pie", "pidec-pid"]
ALL_CONFIGS = CONFIGS + ["ct2-static-prompt-int8", "pidec-pie-int8", "pidec-pid-int8"]
PAD = 0


def build_random(arch: str, seed: int = 0) -> CausalLM:
    config = CausalConfig.from_name(arch, eos_token_id=2, bos_token_id=1, pad_token_id=PAD)
    with torch.device("cpu"):
        model = CausalLM(config)
    return model.init_weights(torch.Generator().manual_seed(seed)).eval()


def step_bytes(cfg: CausalConfig, name: str, d: DocDraw, element_size: int = 4) -> dict:
    """Bytes read by the first decoding step of document `d` under `name` (analytic)."""
    weights = sum(
        n * element_size
        for n in (
            cfg.num_layers
            * (
                cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                + 3 * cfg.hidden_size * cfg.intermediate_size
            ),
            cfg.vocab_size * cfg.hidden_size,
        )
    )
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * element_size
    S, prompts = len(d.document), sum(len(p) + 1 for p in d.prompts)
    if name.startswith("pidec-pid") or name in ("hf-prefix-copied",) or name.startswith("ct2"):
        shared = S * per_token if name.startswith("pidec-pid") else 0
        rows = prompts * per_token + (0 if name.startswith("pidec-pid") else d.k * S * per_token)
    else:
        shared, rows = 0, (prompts + d.k * S) * per_token
    return {"weights": weights, "shared_prefix": shared, "row_caches": rows}


# -- runners: each decodes one document, returns tokens per row ------------------------------


def run_pidec(model: CausalLM, d: DocDraw, pid: bool) -> list[list[int]]:
    if pid:
        prefix = model.prefill_prefix([d.document])
        rows = [SuffixRow(0, p, n) for p, n in zip(d.prompts, d.out_lens)]
    else:
        prefix = None
        rows = [SuffixRow(0, d.document + p, n) for p, n in zip(d.prompts, d.out_lens)]
    return decode(model, prefix, rows, eos_token_ids=[]).tokens


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = torch.tensor(r)
        mask[i, L - len(r) :] = 1
    return ids, mask


def run_hf_pie(hf, d: DocDraw) -> list[list[int]]:
    ids, mask = left_pad([d.document + p for p in d.prompts])
    L = d.longest
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=L, min_new_tokens=L, do_sample=False, eos_token_id=None
    )
    return out[:, ids.shape[1] :].tolist()


def run_hf_prefix_copied(hf, d: DocDraw) -> list[list[int]]:
    from transformers import DynamicCache

    S, K = len(d.document), d.k
    with torch.no_grad():
        cache = DynamicCache(config=hf.config)
        hf(input_ids=torch.tensor([d.document]), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(K)  # the document's cache copied into every row's
    P = max(len(p) for p in d.prompts)
    ids = torch.full((K, S + P), PAD, dtype=torch.long)
    mask = torch.zeros((K, S + P), dtype=torch.long)
    ids[:, :S] = torch.tensor(d.document)
    mask[:, :S] = 1
    for i, p in enumerate(d.prompts):  # prompts padded on their left, after the document
        ids[i, S + P - len(p) :] = torch.tensor(p)
        mask[i, S + P - len(p) :] = 1
    L = d.longest
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=L,
        min_new_tokens=L,
        do_sample=False,
        eos_token_id=None,
    )
    return out[:, S + P :].tolist()


class IdVocabulary:
    """What ctranslate2's converter asks of a tokenizer: a name per id ("t123") and the specials."""

    def __init__(self, size: int):
        self.vocab_size = size
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = "t1", "t2", "t0", "t0"
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = 1, 2, 0, 0

    def __len__(self):
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.vocab_size)}

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids] if isinstance(ids, (list, tuple, range)) else f"t{ids}"

    def convert_tokens_to_ids(self, t):
        return int(t[1:])


def load_ct2(folder: str, out_dir: str, size: int, kinds: list[str]) -> tuple[dict, str | None]:
    """CTranslate2 generators by precision, or ({}, the reason they cannot run)."""
    try:
        import ctranslate2
    except ImportError as e:
        return {}, f"ctranslate2 is not installed ({e}): pip install 'pidec[ct2]'"
    vocab = IdVocabulary(size)

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return vocab

    try:
        with checkpoint.quiet_transformers(), quant.quiet_import():
            Converter(folder).convert(out_dir, force=True)
        gens = {
            k: ctranslate2.Generator(
                out_dir, device="cpu", compute_type=k, inter_threads=1, intra_threads=torch.get_num_threads()
            )
            for k in kinds
        }
    except Exception as e:  # the converter's own errors: reported, the other configurations run
        return {}, f"ctranslate2 could not convert or load the model: {type(e).__name__}: {e}"
    return gens, None


def run_ct2(gen, d: DocDraw) -> list[list[int]]:
    L = d.longest
    res = gen.generate_batch(
        [[f"t{t}" for t in p] for p in d.prompts],
        static_prompt=[f"t{t}" for t in d.document],
        max_length=L,
        min_length=L,
        sampling_topk=1,
        include_prompt_in_result=False,
    )
    return [[int(t[1:]) for t in r.sequences[0]] for r in res]


def run_causal_bench(
    arch: str = "smollm2-135m",
    workload: str = "dst",
    configs: list[str] | None = None,
    docs: int = 1,
    repeats: int = 1,
    seed: int = 0,
    threads: int | None = None,
    subtasks: int | None = None,
    doc_tokens: int | None = None,
    progress=None,
) -> dict:
    """Time `configs` on `workload` at the random-weight `arch` shape; float32 on the CPU."""
    configs = checked_configs(arch, workload, configs)
    if threads:
        torch.set_num_threads(threads)
    model = build_random(arch, seed)
    cfg = model.config
    draws = draw_documents(WORKLOADS[workload], docs, seed, cfg.vocab_size, doc_tokens, subtasks)
    # warm-up, untimed: a short document with two prompts (first calls, lazy set-up)
    small = draw_documents(WORKLOADS[workload], 1, seed + 1, cfg.vocab_size, 32, 2)[0]
    with tempfile.TemporaryDirectory() as tmp:
        engines, skipped = build_engines(model, arch, seed, configs, tmp)
        timed = [c for c in configs if c not in skipped]
        times, outputs = time_configs(engines, timed, draws, small, repeats, progress)
    check_lengths(timed, outputs, draws[0])
    return {
        "arch": arch,
        "model": {"size": arch, "params": model.num_parameters(), **cfg.to_dict()},
        "workload": workload,
        "subtasks": draws[0].k,
        "doc_tokens": len(draws[0].document),
        "docs": docs,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "results": result_rows(cfg, timed, times, outputs, draws),
        "skipped": skipped,
    }


def checked_configs(arch: str, workload: str, configs: list[str] | None) -> list[str]:
    """The configurations to time (default CONFIGS); a ValueError naming an unknown arch,
    workload or configuration."""
    if arch not in ARCHES:
        raise ValueError(f"unknown --arch {arch!r}: expected one of {', '.join(ARCHES)}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    configs = list(CONFIGS if configs is None else configs)
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}: expected some of {', '.join(ALL_CONFIGS)}")
    return configs


def build_engines(model, arch: str, seed: int, configs: list[str], tmp: str) -> tuple[dict, dict[str, str]]:
    """The engines `configs` need, by key ("hf", "ct2-...", "pidec", "pidec-int8"), the peers
    loaded from `model` saved under `tmp`; and the configurations skipped, with why."""
    skipped: dict[str, str] = {}
    engines: dict = {}
    folder = os.path.join(tmp, "hf")
    if any(c.startswith(("hf-", "ct2-")) for c in configs):
        causal_checkpoint.save(model, folder)
    if any(c.startswith("hf-") for c in configs):
        from transformers import AutoModelForCausalLM

        with checkpoint.quiet_transformers():
            engines["hf"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ct2_kinds = sorted({"int8" if c.endswith("-int8") else "float32" for c in configs if c.startswith("ct2")})
    if ct2_kinds:
        gens, why = load_ct2(folder, os.path.join(tmp, "ct2"), model.config.vocab_size, ct2_kinds)
        for c in [c for c in configs if c.startswith("ct2")]:
            if why:
                skipped[c] = why
            else:
                engines[c] = gens["int8" if c.endswith("-int8") else "float32"]
    if any(c.startswith("pidec") and not c.endswith("-int8") for c in configs) and packing.supported(
        model.device, model.dtype
    ):
        packing.pack(model)
    engines["pidec"] = model
    if any(c.startswith("pidec") and c.endswith("-int8") for c in configs):
        int8 = build_random(arch, seed)
        quant.quantize_model(int8, "int8")
        if packing.supported(int8.device, int8.dtype):
            packing.pack(int8)  # the float LM head
        engines["pidec-int8"] = int8
    return engines, skipped


def run_config(engines: dict, name: str, d: DocDraw):
    """One document through configuration `name`: its rows' generated tokens."""
    if name == "hf-pie":
        return run_hf_pie(engines["hf"], d)
    if name == "hf-prefix-copied":
        return run_hf_prefix_copied(engines["hf"], d)
    if name.startswith("ct2"):
        return run_ct2(engines[name], d)
    m = engines["pidec-int8" if name.endswith("-int8") else "pidec"]
    return run_pidec(m, d, name.startswith("pidec-pid"))


def time_configs(engines: dict, timed: list[str], draws: list[DocDraw], small: DocDraw, repeats: int, progress):
    """After one untimed warm-up on `small`, `repeats` passes over `draws`, the configurations
    interleaved: seconds per document of each pass by configuration, and each configuration's
    tokens for the first document."""
    times: dict[str, list[float]] = {c: [] for c in timed}
    outputs: dict[str, list] = {}
    with torch.inference_mode():
        for c in timed:
            run_config(engines, c, small)
        for _ in range(repeats):
            for c in timed:
                t0 = time.perf_counter()
                for i, d in enumerate(draws):
                    tokens = run_config(engines, c, d)
                    if i == 0:
                        outputs[c] = tokens
                sync(torch.device("cpu"))
                times[c].append((time.perf_counter() - t0) / len(draws))
            if progress:
                progress({c: times[c][-1] for c in timed})
    return times, outputs


def check_lengths(timed: list[str], outputs: dict[str, list], first: DocDraw) -> None:
    """Every configuration generated the tokens per row the workload asks (a RuntimeError if not)."""
    for c in timed:
        want = first.out_lens
        got = [len(t) for t in outputs[c]]
        if c.startswith(("hf-", "ct2")):
            got = [min(g, w) for g, w in zip(got, want)]  # a transformers batch runs to its longest row
        if got != want:
            raise RuntimeError(f"{c}: generated {got} tokens per row, the workload asks {want}")


def result_rows(cfg, timed: list[str], times: dict, outputs: dict, draws: list[DocDraw]) -> list[dict]:
    """One row per configuration: latency, tokens/s, speed-up against hf-pie, the bytes a step
    reads, and greedy agreement with pidec-pie on the first document."""
    ref = outputs.get("pidec-pie")
    first = draws[0]
    agree = {
        c: sum(a[:n] == b[:n] for a, b, n in zip(outputs[c], ref, first.out_lens)) / first.k
        for c in timed
        if ref is not None and not c.endswith("-int8")
    }
    base = statistics.median(times["hf-pie"]) if "hf-pie" in times else None
    results = []
    for c in timed:
        lat = statistics.median(times[c])
        results.append(
            {
                "config": c,
                "latency_s_median": lat,
                "latency_s_all": times[c],
                "output_tok_s": sum(d.answer_tokens for d in draws) / len(draws) / lat,
                "speedup_vs_hf_pie": None if base is None else base / lat,
                "step_bytes": step_bytes(cfg, c, first),
                "greedy_agreement_with_pidec_pie": agree.get(c),
            }
        )
    return results


def format_causal_table(result: dict) -> str:
    lines = [
        f"workload {result['workload']} (document {result['doc_tokens']} tokens, K={result['subtasks']})  "
        f"arch {result['arch']} ({result['model']['params'] / 1e6:.1f}M params, random weights)  float32  "
        f"threads {result['torch_threads']}  docs {result['docs']} x repeats {result['repeats']}",
        f"{'config':<22} {'latency_s':>10} {'tok/s':>8} {'speedup':>8} "
        f"{'weights_MB':>10} {'prefix_MB':>9} {'rows_MB':>8}  (bytes read by one decoding step)",
    ]
    for r in result["results"]:
        b = r["step_bytes"]
        sp = "" if r["speedup_vs_hf_pie"] is None else f"{r['speedup_vs_hf_pie']:.2f}x"
        lines.append(
            f"{r['config']:<22} {r['latency_s_median']:>10.3f} {r['output_tok_s']:>8.1f} {sp:>8} "
            f"{b['weights'] / 2**20:>10.1f} {b['shared_prefix'] / 2**20:>9.1f} {b['row_caches'] / 2**20:>8.1f}"
        )
    for c, why in result["skipped"].items():
        lines.append(f"{c}: skipped: {why}")
    return "\n".join(lines)


def run_causal_sweep(ks: list[int], configs: list[str] | None = None, **kwargs) -> dict:
    """Latency per document against K, each K one `run_causal_bench`."""
    configs = configs or ["hf-pie", "pidec-pie", "pidec-pid"]
    runs = [run_causal_bench(configs=configs, subtasks=k, **kwargs) for k in ks]
    timed = [r["config"] for r in runs[0]["results"]]
    return {
        "ks": ks,
        "configs": timed,
        "latency_s": {
            c: [next(x for x in r["results"] if x["config"] == c)["latency_s_median"] for r in runs] for c in timed
        },
        "model": runs[0]["model"],
        "workload": runs[0]["workload"],
        "torch_threads": runs[0]["torch_threads"],
        "runs": runs,
    }


def plot_causal_sweep(sweep: dict, path: str) -> None:
    plot_sweep(
        sweep,
        path,
        title=f"{sweep['workload']}, {sweep['model']['size']} (random weights), {sweep['torch_threads']} threads",
    )
