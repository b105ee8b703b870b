"""What the benchmark runs on: synthetic fixed-length workloads of random token ids and
random-weight T5 v1.1 models. No tokenizer is involved and speed does not depend on the weights,
so every configuration decodes the same documents, prompts and output lengths with the same
weights, and what differs is only how the work is laid out. The workloads and their shapes are
described in docs/performance.md ("Method").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..model import T5, T5Config, on_meta_without_init

TOKEN_LOW, TOKEN_HIGH = 100, 32000  # token ids are drawn in [TOKEN_LOW, TOKEN_HIGH)
DOC_EOS = 1  # every document ends with EOS


@dataclass(frozen=True)
class Workload:
    """What one document asks for: its length, how many subtasks, their prompt lengths and the
    distribution of their output lengths (a fraction `short_fraction` of the rows writes
    `short_len` tokens, the others a length uniform in `long_range`)."""

    name: str
    doc_tokens: int
    subtasks: int
    prompt_range: tuple[int, int]
    long_range: tuple[int, int]
    short_fraction: float = 0.0
    short_len: int = 2
    description: str = ""

    def output_lengths(self, rng: random.Random, k: int) -> list[int]:
        """k output lengths; with a short fraction, at least one row is long."""
        lengths = [rng.randint(*self.long_range) for _ in range(k)]
        if self.short_fraction > 0:
            n_long = min(k, max(1, round((1 - self.short_fraction) * k)))
            long_rows = set(rng.sample(range(k), n_long))
            lengths = [n if i in long_rows else self.short_len for i, n in enumerate(lengths)]
        return lengths


WORKLOADS: dict[str, Workload] = {
    "dst": Workload(
        "dst",
        512,
        30,
        (4, 8),
        (3, 10),
        short_fraction=0.8,
        short_len=2,
        description="dialogue state tracking: 30 slots, mostly 'none'",
    ),
    "summ": Workload("summ", 1500, 4, (3, 5), (100, 250), description="4 summaries of a long document"),
    "qa": Workload("qa", 512, 14, (8, 16), (3, 20), description="14 questions about a passage"),
}


@dataclass
class DocDraw:
    """One document of a workload: its tokens (ending with EOS), the K prompts and the number
    of tokens each subtask's answer has."""

    document: list[int]
    prompts: list[list[int]]
    out_lens: list[int]

    @property
    def k(self) -> int:
        return len(self.prompts)

    @property
    def longest(self) -> int:
        return max(self.out_lens)

    @property
    def answer_tokens(self) -> int:
        return sum(self.out_lens)

    @property
    def seq_len(self) -> int:
        """The single pidec-seq row writes "prompt: answer; " for every subtask."""
        return sum(len(p) + n + 1 for p, n in zip(self.prompts, self.out_lens))

    @property
    def pie_len(self) -> int:
        """Encoder length of the pie batch (the longest prompt + document)."""
        return max(len(p) for p in self.prompts) + len(self.document)

    @property
    def pid_prefix(self) -> int:
        """Decoder prefix length of the pid batch ([0] + the longest prompt)."""
        return 1 + max(len(p) for p in self.prompts)


def draw_documents(
    workload: Workload,
    docs: int,
    seed: int,
    vocab_size: int = 32128,
    doc_tokens: int | None = None,
    subtasks: int | None = None,
) -> list[DocDraw]:
    """`docs` documents of `workload`, each its own seeded draw; `doc_tokens` / `subtasks`
    replace the workload's document length and K (tests, the K sweep)."""
    rng = random.Random(f"pidec-bench:{workload.name}:{seed}")
    high = min(TOKEN_HIGH, vocab_size)
    n_doc = workload.doc_tokens if doc_tokens is None else doc_tokens
    k = workload.subtasks if subtasks is None else subtasks
    out = []
    for _ in range(docs):
        document = [rng.randrange(TOKEN_LOW, high) for _ in range(n_doc - 1)] + [DOC_EOS]
        prompts = [
            [rng.randrange(TOKEN_LOW, high) for _ in range(rng.randint(*workload.prompt_range))] for _ in range(k)
        ]
        out.append(DocDraw(document, prompts, workload.output_lengths(rng, k)))
    return out


def largest_draw(workload: Workload, doc_tokens: int | None = None, subtasks: int | None = None) -> DocDraw:
    """The workload's largest document: every prompt and every output at its longest."""
    S = workload.doc_tokens if doc_tokens is None else doc_tokens
    K = workload.subtasks if subtasks is None else subtasks
    longest = max(workload.long_range[1], workload.short_len if workload.short_fraction > 0 else 0)
    return DocDraw([TOKEN_LOW] * (S - 1) + [DOC_EOS], [[TOKEN_LOW] * workload.prompt_range[1]] * K, [longest] * K)


def build_random_model(size: str, seed: int = 0) -> T5:
    """A T5 v1.1 of preset `size` with fast seeded init: linears N(0, fan_in**-0.5), embedding
    N(0, 1), relative biases N(0, 0.1), norms 1. Activations stay finite through every layer."""
    cfg = T5Config.from_name(size)
    with on_meta_without_init():
        model = T5(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed.weight":
                p.normal_(0.0, 1.0, generator=gen)
            elif "rel_bias" in name:
                p.normal_(0.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return model.eval()
