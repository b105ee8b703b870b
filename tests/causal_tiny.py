"""Tiny random decoder-only checkpoints of each supported family, saved by transformers, and a
tiny byte-level BPE tokenizer with a chat template, for the test_causal* modules.

- ``llama``:   GQA (4 query heads, 2 KV heads), untied head, Llama 3 rope scaling
- ``smollm``:  Llama without grouping (4 and 4), tied head (SmolLM's shape of things)
- ``qwen2``:   q/k/v biases, GQA, tied head
- ``qwen3``:   q/k norms, head_dim 32 (not hidden/heads), GQA, untied head
- ``mistral``: no grouping, untied, a sliding window of 160 positions (refused beyond it)

The weights are drawn with a large std and the EOS row of the head is amplified, so that greedy
choices are well separated and rows sometimes end early and sometimes run to their budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast

FAMILIES = ("llama", "smollm", "qwen2", "qwen3", "mistral")
VOCAB = 320
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The hotel is in the north and costs 90 pounds a night.",
    "User: I need a cheap restaurant in the centre for 4 people on Friday.",
    "System: The Golden Curry serves Indian food; shall I book it?",
    "What is the price range? Which area? How many people? Which day?",
    "Answer: cheap, north, 4, friday, none, yes, no.",
] * 20


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok


def build_hf(family: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.15,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        hf = transformers.LlamaForCausalLM(cfg)
    elif family == "smollm":
        cfg = transformers.LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=True)
        hf = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        hf = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
        hf = transformers.Qwen3ForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(
            **{**common, "num_key_value_heads": 4}, sliding_window=160, tie_word_embeddings=False
        )
        hf = transformers.MistralForCausalLM(cfg)
    else:
        raise KeyError(family)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)  # transformers zeroes biases: make Qwen2's matter
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
        head = hf.get_output_embeddings().weight
        head[tok.eos_token_id] *= 2.5
        head[tok.convert_tokens_to_ids("<|im_end|>")] *= 2.0
    hf.eval()
    return hf


def save_family(family: str, folder: Path, tok, dtype=torch.float32):
    """Save the family's tiny model (and the tokenizer) to folder; returns the transformers model."""
    hf = build_hf(family, tok)
    hf.generation_config = GenerationConfig(
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    hf.to(dtype).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return hf.float().eval()


_CACHE: dict = {}


def tokenizer_for_tests(tmp_path_factory) -> PreTrainedTokenizerFast:
    if "tok" not in _CACHE:
        _CACHE["tok"] = build_tokenizer(tmp_path_factory.mktemp("causal_tok"))
    return _CACHE["tok"]


def family_for_tests(family: str, tmp_path_factory):
    """(folder, transformers model in float32) for `family`, built once per test session."""
    if family not in _CACHE:
        tok = tokenizer_for_tests(tmp_path_factory)
        folder = tmp_path_factory.mktemp(f"causal_{family}")
        _CACHE[family] = (folder, save_family(family, folder, tok))
    return _CACHE[family]


def hf_greedy(hf, row: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy continuation of one row alone, final EOS removed."""
    ids = torch.tensor([row])
    out = hf.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )[0, len(row) :].tolist()
    return out[:-1] if out and out[-1] in eos else out
