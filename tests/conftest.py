"""Tiny random T5-family models, built with transformers and saved to temporary folders.

Three variants, each a few thousand parameters so that every test runs in milliseconds:

- ``t5``:   original T5 (ReLU feed-forward, LM head tied to the embedding, outputs scaled)
- ``v11``:  T5 v1.1 / Flan-T5 (gated-GELU, untied LM head, no scaling)
- ``mt5``:  mT5 (MT5ForConditionalGeneration, gated-GELU, untied head, larger vocabulary)

Encoder and decoder have different depths on purpose (2 vs 3), and the relative-position
buckets saturate at distance 20 so that ~40-token documents reach the log-spaced and the
"beyond max_distance" buckets. The EOS row of the output projection is amplified so that
greedy and beam decoding sometimes stop early and sometimes run to max_new_tokens.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

# Tests compare with float32 references, so `dtype="auto"` (pidec.load's default) must mean float32
# whatever CPU runs them, an AMX one included; the tests of the choice itself force their own
# feature sets (tests/test_cpu_auto.py, tests/test_quantize.py). Subprocesses inherit this.
os.environ.setdefault("PIDEC_CPU_FEATURES", "none")

from pidec.checkpoint import state_dict_to_model
from pidec.generate import Row
from pidec.model import T5, T5Config

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)  # the models are tiny: threads cost more than they save
try:  # transformers >= 5 draws progress bars while saving/loading weights
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/NAME.py imported as a module (the scripts are not a package), for tests of them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A model small enough to count its FLOPs and bytes on paper (tests/bench: roofline, configs, roofline_floor):
# 1 encoder and 1 decoder layer, d_model 4, 2 heads of d_kv 2 (inner 4), gated d_ff 8, vocabulary 10
HAND_COUNTED = T5Config(
    vocab_size=10,
    d_model=4,
    d_kv=2,
    d_ff=8,
    num_layers=1,
    num_heads=2,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
VARIANTS = ("t5", "v11", "mt5")
EOS = 1
PAD = 0

TINY = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    pad_token_id=PAD,
    eos_token_id=EOS,
    decoder_start_token_id=PAD,
)

# vocabulary, feed-forward, tied head, how much the EOS row of the output projection is scaled
SPECS = {
    "t5": dict(vocab_size=64, feed_forward_proj="relu", tie=True, eos_boost=1.8),
    "v11": dict(vocab_size=96, feed_forward_proj="gated-gelu", tie=False, eos_boost=2.5),
    "mt5": dict(vocab_size=1000, feed_forward_proj="gated-gelu", tie=False, eos_boost=2.6),
}

SEEDS = {"t5": 11, "v11": 22, "mt5": 33}


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_hf(variant: str):
    """A tiny transformers model of `variant`, in float32, eval mode, seeded."""
    spec = SPECS[variant]
    seed_all(SEEDS[variant])
    if variant == "mt5":
        cfg = transformers.MT5Config(
            vocab_size=spec["vocab_size"],
            feed_forward_proj=spec["feed_forward_proj"],
            tie_word_embeddings=spec["tie"],
            **TINY,
        )
        hf = transformers.MT5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.T5Config(
            vocab_size=spec["vocab_size"],
            feed_forward_proj=spec["feed_forward_proj"],
            tie_word_embeddings=spec["tie"],
            **TINY,
        )
        hf = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        # transformers' init gives the relative biases tiny values; make them matter
        for stack in (hf.encoder, hf.decoder):
            bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias
            bias.weight.normal_(0.0, 1.0)
        if spec["tie"]:
            hf.shared.weight[EOS] *= spec["eos_boost"]
        else:
            # transformers 5 ties lm_head to shared whatever the config says: untie by hand
            head = torch.randn(spec["vocab_size"], TINY["d_model"]) * TINY["d_model"] ** -0.5
            head[EOS] *= spec["eos_boost"]
            hf.lm_head.weight = nn.Parameter(head)
    hf.eval()
    if not spec["tie"]:
        assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    return hf


def pidec_config(variant: str, hf) -> T5Config:
    """Our config for `hf`, written out explicitly (not through config.json), so that model and
    generation tests do not depend on the checkpoint reader."""
    spec = SPECS[variant]
    return T5Config(
        vocab_size=spec["vocab_size"],
        feed_forward_proj=spec["feed_forward_proj"],
        tie_word_embeddings=spec["tie"],
        # original T5 scales before the head; v1.1 does not; transformers' MT5 never does
        scale_decoder_outputs=spec["tie"],
        **TINY,
    )


def pidec_from_hf(variant: str, hf) -> T5:
    model = state_dict_to_model(pidec_config(variant, hf), dict(hf.state_dict()), f"hf:{variant}")
    return model.eval()


@dataclass
class Variant:
    name: str
    hf: object  # transformers model, float32
    pid: T5  # our model, float32, same weights
    folder: Path  # transformers.save_pretrained output (model.safetensors + config.json)
    hf_cls: type

    @property
    def vocab(self) -> int:
        return SPECS[self.name]["vocab_size"]

    def hf64(self):
        if not hasattr(self, "_hf64"):
            self._hf64 = copy.deepcopy(self.hf).double().eval()
        return self._hf64

    def pid64(self) -> T5:
        if not hasattr(self, "_pid64"):
            self._pid64 = copy.deepcopy(self.pid).to(torch.float64).eval()
        return self._pid64


_CACHE: dict[str, Variant] = {}


def get_variant(name: str, tmp_path_factory) -> Variant:
    if name not in _CACHE:
        hf = build_hf(name)
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        hf.save_pretrained(str(folder))
        _CACHE[name] = Variant(name, hf, pidec_from_hf(name, hf), folder, type(hf))
    return _CACHE[name]


@pytest.fixture(params=VARIANTS)
def variant(request, tmp_path_factory) -> Variant:
    return get_variant(request.param, tmp_path_factory)


@pytest.fixture
def t5(tmp_path_factory) -> Variant:
    return get_variant("t5", tmp_path_factory)


@pytest.fixture
def v11(tmp_path_factory) -> Variant:
    return get_variant("v11", tmp_path_factory)


@pytest.fixture
def mt5(tmp_path_factory) -> Variant:
    return get_variant("mt5", tmp_path_factory)


def random_tokens(gen: torch.Generator, n: int, vocab: int, low: int = 2) -> list[int]:
    """n ids in [low, vocab): no pad and no EOS unless low is lowered."""
    return torch.randint(low, vocab, (n,), generator=gen).tolist()


def padded_batch(seqs: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ids [n, L] and bool mask [n, L]."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


# -- ragged documents and rows for the decoding tests -------------------------------------------

DOC_LENGTHS = [40, 17, 6]
# (document, prompt length, max_new_tokens): 1-4 rows per document, prompts of 0-5 tokens, 1-12 new tokens
LAYOUT = [
    (0, 0, 12),
    (0, 3, 1),
    (0, 5, 9),
    (1, 2, 12),
    (2, 1, 7),
    (2, 4, 12),
    (2, 0, 3),
    (2, 5, 10),
]


def random_docs(vocab: int, seed: int, lengths=DOC_LENGTHS) -> list[list[int]]:
    """Documents of random tokens, one per length (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [random_tokens(g, n, vocab) for n in lengths]


def random_rows(vocab: int, seed: int, layout=LAYOUT) -> list[Row]:
    """Decoder rows over `random_docs`: [decoder start] + a random prompt, per `layout` entry."""
    g = torch.Generator().manual_seed(seed)
    return [Row(d, [0] + random_tokens(g, p, vocab), n) for d, p, n in layout]
