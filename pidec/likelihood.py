"""How likely the model finds given answers: the mean log-probability of each answer's tokens
and the EOS after them, teacher-forced in the layout's own rows.

Used to choose between the answers that different windows of one long document gave to the
same question. Greedy decoding keeps no scores, and beam scores depend on the beam settings;
one teacher-forced pass gives every decoding mode the same, comparable number. In the `seq`
layout a window writes every answer in one row, so all its answers share that row's score.
"""

from __future__ import annotations

import torch

from .layouts import check_layout, format_seq
from .model import RowGroups


@torch.inference_mode()
def answer_scores(
    model,
    document: str,
    prompts: list[str],
    answers: list[str],
    layout: str = "pid",
    seq_instruction: str | None = None,
) -> list[float]:
    """One mean log-probability per answer, for one document (a `pidec.api.Model`)."""
    check_layout(layout)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    tok, cfg = model.tokenizer, model.config
    eos, start = tok.eos_token_id, cfg.decoder_start_token_id

    def ids(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    if layout == "pie":
        docs = tok([f"{p} {document}" for p in prompts], verbose=False)["input_ids"]
        rows = [(j, [start], a) for j, a in enumerate(ids(answers))]
    elif layout == "pid":
        docs = [ids([document])[0] + [eos]]
        rows = [(0, [start] + p, a) for p, a in zip(ids(prompts), ids(answers))]
    else:
        text = document if not seq_instruction else f"{seq_instruction} {document}"
        docs = [ids([text])[0] + [eos]]
        rows = [(0, [start], ids([format_seq(prompts, answers)])[0])]
    scores = _row_scores(model.model, docs, rows, eos)
    return scores * len(prompts) if layout == "seq" else scores


def _row_scores(t5, docs: list[list[int]], rows: list[tuple[int, list[int], list[int]]], eos: int) -> list[float]:
    """rows: (document, prefix, continuation) -> mean log p(continuation + EOS | prefix, document)."""
    device, pad = t5.device, t5.config.pad_token_id
    S = max(len(d) for d in docs)
    input_ids = torch.full((len(docs), S), pad, dtype=torch.long)
    keep = torch.zeros((len(docs), S), dtype=torch.bool)
    for i, d in enumerate(docs):
        input_ids[i, : len(d)] = torch.tensor(d)
        keep[i, : len(d)] = True
    input_ids, keep = input_ids.to(device), keep.to(device)
    cross = t5.cross_cache(t5.encode(input_ids, keep), keep)

    seqs = [prefix + cont for _, prefix, cont in rows]  # decoder input; labels are seqs[1:] + EOS
    T = max(len(s) for s in seqs)
    dec = torch.full((len(rows), T), pad, dtype=torch.long)
    dec_keep = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, s in enumerate(seqs):
        dec[r, : len(s)] = torch.tensor(s)
        dec_keep[r, : len(s)] = True
    dec, dec_keep = dec.to(device), dec_keep.to(device)
    groups = RowGroups.from_doc(torch.tensor([d for d, _, _ in rows], device=device), len(docs))
    pos = torch.arange(T, device=device)
    hidden = t5.decode(dec, cross, groups, t5.self_attention_mask(pos, pos, dec_keep))  # [R, T, d_model]
    scores = []
    for r, (_, prefix, cont) in enumerate(rows):
        first = len(prefix) - 1  # the position whose output is the continuation's first token
        labels = torch.tensor(cont + [eos], device=device)
        logp = torch.log_softmax(t5.logits(hidden[r, first : first + len(labels)]).float(), dim=-1)
        scores.append(float(logp.gather(1, labels[:, None]).mean()))
    return scores
