"""Hugging Face T5 checkpoint folders in and out.

A folder holds `config.json` and the weights as `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` (read with weights_only=True). Our module
names are short (`decoder.layers.3.cross_attn.k`); `hf_to_ours` / `ours_to_hf` translate to
and from the names transformers writes (`decoder.block.3.layer.1.EncDecAttention.k`), so a
folder saved here loads in `transformers.T5ForConditionalGeneration` and the reverse.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .model import T5, T5Config, config_fields

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(InputError):
    """A checkpoint folder that cannot be turned into a model: says which file or tensor."""


# (HF pattern, our pattern); {i} is a layer index
_ENC_FF = r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight"
_RULES = [
    (r"shared\.weight", "embed.weight"),
    (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "encoder.rel_bias.weight"),
    (r"decoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "decoder.rel_bias.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", r"encoder.layers.\1.attn.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"encoder.layers.\1.attn_norm.weight"),
    (_ENC_FF, r"encoder.layers.\1.ff.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"encoder.layers.\1.ff_norm.weight"),
    (r"encoder\.final_layer_norm\.weight", "encoder.final_norm.weight"),
    (r"decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", r"decoder.layers.\1.self_attn.\2.weight"),
    (r"decoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"decoder.layers.\1.self_attn_norm.weight"),
    (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.(q|k|v|o)\.weight", r"decoder.layers.\1.cross_attn.\2.weight"),
    (r"decoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"decoder.layers.\1.cross_attn_norm.weight"),
    (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", r"decoder.layers.\1.ff.\2.weight"),
    (r"decoder\.block\.(\d+)\.layer\.2\.layer_norm\.weight", r"decoder.layers.\1.ff_norm.weight"),
    (r"decoder\.final_layer_norm\.weight", "decoder.final_norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
# Copies transformers keeps of the shared embedding; we have one.
_ALIASES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def hf_to_ours(name: str) -> str | None:
    # mT5/T5 checkpoints are sometimes saved from the T5Model base (no prefix change) or with a
    # leading "model." / "transformer."; accept both.
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix) and not name.startswith("model.safetensors"):
            name = name[len(prefix) :]
    for pattern, repl in _RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


_OURS_TO_HF = [
    (r"embed\.weight", "shared.weight"),
    (r"encoder\.rel_bias\.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"decoder\.rel_bias\.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"encoder\.layers\.(\d+)\.attn\.(q|k|v|o)\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"encoder\.layers\.(\d+)\.attn_norm\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"encoder\.layers\.(\d+)\.ff\.(wi|wi_0|wi_1|wo)\.weight", r"encoder.block.\1.layer.1.DenseReluDense.\2.weight"),
    (r"encoder\.layers\.(\d+)\.ff_norm\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"encoder\.final_norm\.weight", "encoder.final_layer_norm.weight"),
    (r"decoder\.layers\.(\d+)\.self_attn\.(q|k|v|o)\.weight", r"decoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"decoder\.layers\.(\d+)\.self_attn_norm\.weight", r"decoder.block.\1.layer.0.layer_norm.weight"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(q|k|v|o)\.weight", r"decoder.block.\1.layer.1.EncDecAttention.\2.weight"),
    (r"decoder\.layers\.(\d+)\.cross_attn_norm\.weight", r"decoder.block.\1.layer.1.layer_norm.weight"),
    (r"decoder\.layers\.(\d+)\.ff\.(wi|wi_0|wi_1|wo)\.weight", r"decoder.block.\1.layer.2.DenseReluDense.\2.weight"),
    (r"decoder\.layers\.(\d+)\.ff_norm\.weight", r"decoder.block.\1.layer.2.layer_norm.weight"),
    (r"decoder\.final_norm\.weight", "decoder.final_layer_norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def ours_to_hf(name: str) -> str:
    for pattern, repl in _OURS_TO_HF:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


# -- config -------------------------------------------------------------------------------

_HF_ONLY = {"n_positions"}


def config_from_hf(d: dict, source: str = "config.json") -> T5Config:
    model_type = d.get("model_type", "t5")
    if model_type not in ("t5", "mt5", "umt5") and "T5" not in str(d.get("architectures", "")):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a T5-family model")
    if model_type == "umt5":
        raise CheckpointError(f"{source}: umT5 (per-layer relative bias) is not supported")
    known = config_fields() - {"extra"}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if "n_positions" in d and "max_input_length" not in d:
        kwargs["max_input_length"] = int(d["n_positions"])
    kwargs.setdefault("tie_word_embeddings", True)
    # transformers >= 5 writes scale_decoder_outputs for T5; older T5 configs signal it through
    # tie_word_embeddings. mT5 never scales in transformers 5 (its configs say tie=True all the same),
    # and Google's mT5 configs are untied, so mT5 without the key is unscaled.
    default_scale = kwargs["tie_word_embeddings"] and model_type != "mt5"
    kwargs["scale_decoder_outputs"] = d.get("scale_decoder_outputs", default_scale)
    kwargs.setdefault("decoder_start_token_id", kwargs.get("pad_token_id", 0))
    extra = {k: v for k, v in d.items() if k not in known}
    try:
        return T5Config(**kwargs, extra=extra)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(config: T5Config) -> dict:
    d = {
        k: v
        for k, v in config.extra.items()
        if k not in ("transformers_version", "architectures", "dtype", "torch_dtype")
    }
    d.update(config.to_dict())
    d["model_type"] = d.get("model_type", "t5") if d.get("model_type") in ("t5", "mt5") else "t5"
    d["architectures"] = ["MT5ForConditionalGeneration" if d["model_type"] == "mt5" else "T5ForConditionalGeneration"]
    d["n_positions"] = config.max_input_length
    d["is_encoder_decoder"] = True
    d["dense_act_fn"] = "gelu_new" if config.activation == "gelu" else config.activation
    d["is_gated_act"] = config.is_gated
    if config.tie_word_embeddings and not config.scale_decoder_outputs:
        # Readers before transformers 5 derive scaling from tying; write this case as untied
        # with a copy of the embedding (see save()), which every version reads the same way.
        d["tie_word_embeddings"] = False
    return d


# -- reading weights ----------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e


def read_bin(path: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read PyTorch weights (weights_only=True): {e}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _read_index(folder: Path, index_name: str, reader) -> dict[str, Tensor]:
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from e
    sd: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is listed but missing")
        sd.update(reader(shard_path))
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not in their shards: {missing[:5]}")
    return sd


def read_state_dict(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The raw (Hugging Face named) tensors of a checkpoint folder."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        return read_safetensors(folder / SAFE_WEIGHTS)
    if (folder / SAFE_INDEX).is_file():
        return _read_index(folder, SAFE_INDEX, read_safetensors)
    if (folder / BIN_WEIGHTS).is_file():
        return read_bin(folder / BIN_WEIGHTS)
    if (folder / BIN_INDEX).is_file():
        return _read_index(folder, BIN_INDEX, read_bin)
    raise CheckpointError(
        f"{folder}: no weights found (looked for {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS}, {BIN_INDEX})"
    )


def read_json(path: Path):
    """A JSON file of a checkpoint folder; invalid JSON is an error naming the file and line."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def read_config(folder: str | os.PathLike) -> T5Config:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json not found")
    return config_from_hf(read_json(path), str(path))


def state_dict_to_model(config: T5Config, hf_sd: dict[str, Tensor], source: str = "checkpoint") -> T5:
    """Build a T5 from Hugging Face named tensors, checking every name and shape."""
    ours: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in hf_sd.items():
        if name in _ALIASES:
            continue
        if name.endswith("EncDecAttention.relative_attention_bias.weight"):
            continue  # some old checkpoints carry an unused cross-attention bias
        mapped = hf_to_ours(name)
        if mapped is None:
            unknown.append(name)
        else:
            ours[mapped] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if "embed.weight" not in ours:
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in hf_sd:
                ours["embed.weight"] = hf_sd[alias]
                break
    # Tying: an lm_head that differs from the embedding is kept (as transformers 5 does).
    head = ours.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None and "embed.weight" in ours:
        if head.shape != ours["embed.weight"].shape or not torch.equal(head, ours["embed.weight"]):
            config.tie_word_embeddings = False
    if not config.tie_word_embeddings and head is None and "embed.weight" in ours:
        ours["lm_head.weight"] = ours["embed.weight"]  # an untied head saved tied by transformers 5
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)

    with torch.device("meta"):
        model = T5(config)
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in ours]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {ours_to_hf(missing[0])} (ours: {missing[0]})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    extra = [k for k in ours if k not in expected]
    if extra:
        raise CheckpointError(
            f"{source}: tensor {ours_to_hf(extra[0])} does not fit this config "
            f"(num_layers={config.num_layers}, num_decoder_layers={config.num_decoder_layers}, "
            f"feed_forward_proj={config.feed_forward_proj})"
        )
    for k, param in expected.items():
        if tuple(ours[k].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: tensor {ours_to_hf(k)} has shape {tuple(ours[k].shape)}, "
                f"config.json implies {tuple(param.shape)}"
            )
    model.load_state_dict(ours, assign=True, strict=True)
    return model


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides
) -> T5:
    """Load a T5 from a local checkpoint folder or a Hugging Face hub id."""
    folder = resolve(path)
    config = read_config(folder)
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise ValueError(f"unknown config override {k!r}")
        setattr(config, k, v)
    model = state_dict_to_model(config, read_state_dict(folder), str(folder))
    if dtype is None:
        dtype = torch.float32
    return model.to(device=device, dtype=dtype).eval()


def resolve(path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is taken as a hub id and fetched by huggingface_hub."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: is a file, expected a checkpoint folder")
    s = str(path)
    if s.startswith((".", "/", "~")) or os.sep in s.strip("/").replace("/", "", 1) or s.count("/") > 1:
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as e:
        raise CheckpointError(f"{path}: not a local folder, and fetching it from the hub failed: {e}") from e


# -- writing ------------------------------------------------------------------------------


def save(model: T5, folder: str | os.PathLike, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json + model.safetensors (sharded above max_shard_bytes) in transformers' layout."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = config_to_hf(config)
    sd: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        sd[ours_to_hf(name)] = tensor.detach().to("cpu").contiguous()
    if hf_config["tie_word_embeddings"] is False and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["shared.weight"].clone()
    # transformers also stores the two embedding aliases; they are not needed to load.
    hf_config["dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "config.json")
    for stale in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX):
        if (folder / stale).exists():
            (folder / stale).unlink()
    for old in folder.glob("model-*-of-*.safetensors"):
        old.unlink()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(sd, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for name, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        (folder / SAFE_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored with a checkpoint (or a tokenizer folder), through transformers."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer: {e}") from e


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for the block, as they were after it."""
    import transformers
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
