"""Hugging Face decoder-only checkpoint folders in and out: LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM and MistralForCausalLM.

A folder holds `config.json`, the weights (safetensors single or sharded, or `pytorch_model.bin`:
read by `checkpoint.read_state_dict`) and optionally `generation_config.json`, whose
`eos_token_id` (an id or a list of ids) is what generation stops on, as in transformers.
Our module names are short (`layers.3.attn.q`); `hf_to_ours` / `ours_to_hf` translate to and
from transformers' (`model.layers.3.self_attn.q_proj`). Every tensor is checked by name and
shape before the model is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import (
    SAFE_WEIGHTS,
    CheckpointError,
    NameMap,
    assign_checked,
    check_tensor_names,
    read_json,
    read_state_dict,
    rename_tensors,
)
from ..model import on_meta_without_init
from .model import CausalConfig, CausalLM, inverse_frequencies

# model_type -> the transformers class that writes it
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
T5_TYPES = ("t5", "mt5")


def supported_text() -> str:
    causal = ", ".join(f"{t} ({a})" for t, a in ARCHITECTURES.items())
    return f"{causal}; encoder-decoder: t5, mt5 (T5ForConditionalGeneration, MT5ForConditionalGeneration)"


def model_type_of(folder: str | os.PathLike) -> str | None:
    """config.json's model_type (None when the folder has no config.json)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    d = read_json(path)
    return d.get("model_type") if isinstance(d, dict) else None


def is_causal(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a checkpoint for this module: a config.json whose model_type is not
    T5's (an unsupported one is then refused by `read_config`, naming the supported ones)."""
    model_type = model_type_of(folder)
    return model_type is not None and model_type not in T5_TYPES


# {i}: a layer index
CAUSAL_NAMES = NameMap(
    [
        ("model.embed_tokens.weight", "embed.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        ("model.layers.{i}.self_attn.{p}_proj.{w}", "layers.{i}.attn.{p}.{w}"),
        ("model.layers.{i}.self_attn.{n}_norm.weight", "layers.{i}.attn.{n}_norm.weight"),
        ("model.layers.{i}.mlp.{m}_proj.{w}", "layers.{i}.mlp.{m}.{w}"),
    ],
    {"i": r"\d+", "p": "q|k|v|o", "n": "q|k", "m": "gate|up|down", "w": "weight|bias"},
)
hf_to_ours = CAUSAL_NAMES.to_ours
ours_to_hf = CAUSAL_NAMES.to_hf


# -- config -------------------------------------------------------------------------------

# config.json keys read and written as they are: our field -> transformers' key
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


def _rope(d: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and the scaling dict, from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:  # older configs spell it "type"
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return theta, None
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
    need = need + (("original_max_position_embeddings",) if kind == "llama3" else ())
    missing = [k for k in need if k not in scaling]
    if missing:
        raise CheckpointError(f"{source}: rope scaling {kind!r} lacks {', '.join(missing)}")
    return theta, scaling


def config_from_hf(d: dict, source: str = "config.json") -> CausalConfig:
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = ", ".join(d.get("architectures") or []) or "no architectures listed"
        raise CheckpointError(
            f"{source}: unsupported architecture model_type={model_type!r} ({arch}); supported: {supported_text()}"
        )
    theta, scaling = _rope(d, source)
    bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window that is off unless use_sliding_window says so
    kwargs = dict(
        {ours: d.get(hf) for ours, hf in CONFIG_KEYS.items()},
        model_type=model_type,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bias or model_type == "qwen2",
        o_bias=bias and model_type != "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        hidden_act=d.get("hidden_act", "silu"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        sliding_window=window,
    )
    for key in ("vocab_size", "hidden_size", "num_layers"):
        if kwargs[key] is None:
            raise CheckpointError(f"{source}: {CONFIG_KEYS[key]} is missing")
    for key in ("intermediate_size", "num_heads"):
        if kwargs[key] is None:
            raise CheckpointError(f"{source}: {key} is missing")
    extra = {k: v for k, v in d.items()}
    try:
        return CausalConfig(**kwargs, extra=extra)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def read_config(folder: str | os.PathLike) -> CausalConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json not found")
    config = config_from_hf(read_json(path), str(path))
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():  # what transformers' generate stops on
        eos = read_json(gen).get("eos_token_id")
        if eos is not None:
            config.eos_token_id = eos
    return config


def eos_ids(config: CausalConfig, tokenizer=None) -> list[int]:
    """The ids generation stops on: the config's (generation_config.json's) id or list, else the
    tokenizer's EOS."""
    eos = config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def config_to_hf(config: CausalConfig) -> dict:
    d = {k: v for k, v in config.extra.items() if k not in ("transformers_version", "dtype", "torch_dtype")}
    d.update(
        model_type=config.model_type,
        architectures=[ARCHITECTURES[config.model_type]],
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_theta": config.rope_theta, **(config.rope_scaling or {"rope_type": "default"})},
        hidden_act=config.hidden_act,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        **{hf: getattr(config, ours) for ours, hf in CONFIG_KEYS.items()},
    )
    d.pop("rope_scaling", None)
    d.pop("rope_theta", None)
    if config.model_type in ("llama", "qwen3"):
        d["attention_bias"] = config.o_bias or (config.qkv_bias and config.model_type != "qwen2")
    if config.model_type == "llama":
        d["mlp_bias"] = config.mlp_bias
    return d


# -- weights ------------------------------------------------------------------------------


def state_dict_to_model(config: CausalConfig, hf_sd: dict[str, Tensor], source: str = "checkpoint") -> CausalLM:
    """Build a CausalLM from transformers-named tensors, checking every name and shape."""
    # older checkpoints store the rotary frequencies; they are recomputed
    ours = rename_tensors(hf_sd, hf_to_ours, source, skip=lambda name: name.endswith("rotary_emb.inv_freq"))
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    with on_meta_without_init():
        model = CausalLM(config)
    expected = dict(model.state_dict())
    check_tensor_names(
        ours,
        expected,
        source,
        ours_to_hf,
        f"num_hidden_layers={config.num_layers}, model_type={config.model_type}",
        hint=lambda name: " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else "",
    )
    assign_checked(model, ours, expected, source, ours_to_hf)
    model.rotary.inv_freq = inverse_frequencies(config)  # a computed buffer, not in the checkpoint
    return model


def load_model(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides
) -> CausalLM:
    """A CausalLM from a local checkpoint folder, in `dtype` (default float32)."""
    config = read_config(folder)
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise ValueError(f"unknown config override {k!r}")
        setattr(config, k, v)
    model = state_dict_to_model(config, read_state_dict(folder), str(folder))
    model = model.to(device=device, dtype=dtype or torch.float32)
    model.rotary.inv_freq = model.rotary.inv_freq.float()  # frequencies stay float32 in any dtype
    return model.eval()


def save(model: CausalLM, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json + model.safetensors in transformers' layout."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {ours_to_hf(k): t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()}
    hf = config_to_hf(model.config)
    hf["dtype"] = str(model.dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file(sd, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
