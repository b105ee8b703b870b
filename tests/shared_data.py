"""Where the tests find ../shared (the real T5 vocabulary). In CI (CI=true) a missing folder is a
failure; elsewhere the tests that need it are skipped with the reason."""

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("PIDEC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
T5_TOKENIZER = SHARED / "tokenizers" / "t5"
DATA = SHARED / "data"
MULTIWOZ = DATA / "multiwoz21"
MULTIWOZ_RAW = DATA / "multiwoz21-raw" / "val.json.zip"
ACI_BENCH = DATA / "aci-bench"
COVID_QA = DATA / "covid-qa" / "covidQA-200423.json"


def require(path: Path) -> Path:
    if path.exists():
        return path
    message = f"{path} is missing (the repository expects ../shared beside it; set PIDEC_SHARED to move it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def tiny_checkpoint(folder: Path, seed: int, max_input_length: int, eos_boost: float = 1.0) -> Path:
    """A tiny random T5 v1.1 saved with the real T5 vocabulary, as a user's checkpoint folder.
    eos_boost scales the EOS row of the head, so that rows end at different steps."""
    import torch

    from pidec import checkpoint
    from pidec.model import T5, T5Config

    tok = checkpoint.load_tokenizer(require(T5_TOKENIZER))
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=32128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        max_input_length=max_input_length,
    )
    model = T5(cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= eos_boost
    checkpoint.save(model, folder, tokenizer=tok)
    return folder
