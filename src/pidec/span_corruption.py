"""T5's pre-training objective, span corruption, on token ids.

A run of `tokens_length` text tokens is split into alternating kept and noise spans: about
`noise_density` of the tokens are noise, in about `noise_tokens / mean_span_length` spans, the
first span always kept. The input keeps the kept tokens and puts one sentinel in place of each
noise span; the target lists each sentinel followed by the tokens it replaced. Sentinels are the
tokenizer's `<extra_id_0>`, `<extra_id_1>`, ... in that order, which in T5's vocabulary are
descending ids. Both sequences end with EOS:

    text     a b c d e f g h i j
    noise        ^ ^       ^
    input    a b <X0> e f g <X1> i j </s>
    target   <X0> c d <X1> h </s>

`lengths(inputs_length, ...)` finds, as T5 does, the longest `tokens_length` whose corrupted
input (with EOS) fits `inputs_length`, so that packed examples fill the encoder without padding;
every example cut from a packed stream then has exactly that input and target length.

The noise mask is drawn with a `random.Random` the caller seeds, so an example's corruption is a
function of (seed, epoch, position) and a resumed run sees the same examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class SpanLengths:
    tokens: int  # text tokens consumed per example
    inputs: int  # corrupted input length, EOS included
    targets: int  # target length, EOS included
    noise_tokens: int
    noise_spans: int


def _counts(tokens_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    noise = min(max(round(tokens_length * noise_density), 1), tokens_length - 1)
    spans = max(round(noise / mean_span_length), 1)
    return noise, spans


def lengths(inputs_length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> SpanLengths:
    """The example shape for an encoder of `inputs_length` tokens (T5's
    `compute_input_and_target_lengths`, with the noise and span counts of `noise_mask`)."""
    check(noise_density, mean_span_length)
    if inputs_length < 4:
        raise InputError(f"input length {inputs_length}: span corruption needs at least 4 tokens")

    def shape(tokens: int) -> SpanLengths:
        noise, spans = _counts(tokens, noise_density, mean_span_length)
        return SpanLengths(tokens, tokens - noise + spans + 1, noise + spans + 1, noise, spans)

    tokens = 2
    while shape(tokens + 1).inputs <= inputs_length:
        tokens += 1
    return shape(tokens)


def check(noise_density: float, mean_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise InputError(f"noise density {noise_density}: expected a fraction strictly between 0 and 1")
    if not mean_span_length >= 1.0:
        raise InputError(f"mean noise span length {mean_span_length}: expected at least 1")


def _segments(items: int, segments: int, rng: random.Random) -> list[int]:
    """`items` split into `segments` non-empty runs, uniformly among all such splits."""
    cuts = sorted(rng.sample(range(1, items), segments - 1))
    bounds = [0, *cuts, items]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def noise_mask(length: int, noise_density: float, mean_span_length: float, rng: random.Random) -> list[bool]:
    """Which of `length` tokens are noise: kept and noise spans alternate, a kept span first."""
    noise, spans = _counts(max(length, 2), noise_density, mean_span_length)
    spans = min(spans, noise, max(length, 2) - noise)
    mask: list[bool] = []
    for kept, dropped in zip(_segments(max(length, 2) - noise, spans, rng), _segments(noise, spans, rng)):
        mask += [False] * kept + [True] * dropped
    return mask[:length]


def corrupt(tokens: list[int], mask: list[bool], sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """The input and the target of `tokens` under `mask` (see the module docstring)."""
    if len(mask) != len(tokens):
        raise ValueError(f"mask of {len(mask)} for {len(tokens)} tokens")
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (token, noisy) in enumerate(zip(tokens, mask)):
        if not noisy:
            inputs.append(token)
            continue
        if i == 0 or not mask[i - 1]:
            span += 1
            if span >= len(sentinels):
                raise InputError(f"{span + 1} noise spans but the tokenizer has {len(sentinels)} sentinel tokens")
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        targets.append(token)
    return inputs + [eos], targets + [eos]


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of `<extra_id_0>`, `<extra_id_1>`, ... in the tokenizer, in that order. A
    tokenizer without them cannot express the objective: the error says how to get them."""
    vocab = tokenizer.get_vocab()
    ids = []
    while f"<extra_id_{len(ids)}>" in vocab:
        ids.append(vocab[f"<extra_id_{len(ids)}>"])
    if not ids:
        raise InputError(
            "the tokenizer has no sentinel tokens <extra_id_0>, <extra_id_1>, ...: span corruption needs "
            "them (T5's tokenizer has 100; add them to a tokenizer of your own as additional special tokens)"
        )
    return ids
