"""The benchmark's checks that its configurations compute the same function: first greedy tokens
compared between pidec and a peer (`agree`), and logits teacher-forced through float64 copies of
pidec and transformers (`logits_gap`). Random weights leave near-ties between the top logits,
where two correct float32 stacks that round differently can choose differently; in float64 the
same function agrees to rounding, far below `LOGITS_RTOL`, and a wrong one does not.
docs/performance.md ("Packed weights") has the measured gaps.
"""

from __future__ import annotations

import copy

import torch

from ..model import T5
from .configs import config_shape
from .workloads import DocDraw

LOGITS_RTOL = 1e-6  # max |pidec - transformers| over the largest |logit|, teacher-forced in float64


def checked_rows(k: int) -> list[int]:
    """The rows compared: first, middle, last."""
    return sorted({0, k // 2, k - 1})


def agree(ours: list[list[int]], theirs: list[list[int]], eos: int, n_tokens: int = 2) -> bool:
    """First `n_tokens` of the `checked_rows`. transformers and CTranslate2 cannot emit EOS
    before their minimum length, so a pidec row is compared only up to its first EOS."""
    for i in checked_rows(len(ours)):
        mine = ours[i][:n_tokens]
        if eos in mine:
            mine = mine[: mine.index(eos)]
        if theirs[i][: len(mine)] != mine:
            return False
    return True


def logits_gap(ours: T5, hf, d: DocDraw, device) -> float:
    """The `checked_rows` of document `d`, teacher-forced through float64 copies of both stacks
    on the document and [start] + prompt: the largest logit difference over the largest logit
    magnitude."""
    start = ours.config.decoder_start_token_id
    doc = torch.tensor([d.document], device=device)
    a_model, b_model = copy.deepcopy(ours).double(), copy.deepcopy(hf).double()
    worst = 0.0
    with torch.inference_mode():
        for i in checked_rows(d.k):
            dec = torch.tensor([[start] + d.prompts[i]], device=device)
            a = a_model(doc, dec)
            b = b_model(input_ids=doc, decoder_input_ids=dec).logits
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    del a_model, b_model
    return worst


def check_lengths(name: str, tokens: list[list[int]], d: DocDraw) -> None:
    """Every configuration must generate exactly what the workload asks for, or the timings
    compare different work: RuntimeError naming the configuration otherwise."""
    got = [len(t) for t in tokens]
    want = config_shape(name, d).lengths
    if got != want:
        raise RuntimeError(f"{name} generated {got} tokens per row, the workload asks for {want}")
