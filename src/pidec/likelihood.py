"""How likely the model finds given answers: the mean log-probability of each answer's tokens
and the EOS after them, teacher-forced in the layout's own rows.

Used to choose between the answers that different windows of one long document gave to the
same question. Greedy decoding keeps no scores, and beam scores depend on the beam settings;
one teacher-forced pass gives every decoding mode the same, comparable number. In the `seq`
layout a window writes every answer in one row, so all its answers share that row's score.
"""

from __future__ import annotations

import torch

from .forcing import IGNORE, Part, collate, target_logits
from .layouts import TrainTokenizer


@torch.inference_mode()
def answer_scores(
    model,
    document: str,
    prompts: list[str],
    answers: list[str],
    layout: str = "pid",
    seq_instruction: str | None = None,
) -> list[float]:
    """One mean log-probability per answer, for one document (a `pidec.api.Model`). The rows are
    the training rows of the layout (`TrainTokenizer`), scored with the trainer's forward pass."""

    if len(prompts) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    cfg = model.config
    coder = TrainTokenizer(
        model.tokenizer, layout, cfg.max_input_length, cfg.decoder_start_token_id, None, seq_instruction
    )
    items = [coder.item(0, document, prompts, answers)]
    batch = collate(items, [Part.of(items, 0, list(range(len(items[0].rows))))], cfg.pad_token_id).to(model.device)
    logits, labels = target_logits(model.model, batch)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None])[:, 0]
    per_row = logp.split((batch.labels != IGNORE).sum(1).tolist())
    scores = [float(x.mean()) for x in per_row]
    return scores * len(prompts) if layout == "seq" else scores
