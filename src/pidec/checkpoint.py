"""Hugging Face T5 checkpoint folders in and out.

A folder holds `config.json` and the weights as `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` (read with weights_only=True). Our module
names are short (`decoder.layers.3.cross_attn.k`); `hf_to_ours` / `ours_to_hf` translate to
and from the names transformers writes (`decoder.block.3.layer.1.EncDecAttention.k`), so a
folder saved here loads in `transformers.T5ForConditionalGeneration` and the reverse.

Hostile or broken folders are refused with one `CheckpointError` naming the file, the field or
the tensor, before anything large is allocated:

- a path that looks local (starts with `.`, `/` or `~`, holds a backslash or more than one
  `/`, or whose first part names a local folder, as in `runs/nope` beside `runs/`) is never
  sent to the Hugging Face hub: it is "no such folder". Only `NAME` or `ORG/NAME` where ORG is
  not a local folder goes to the hub. A pidec training run folder (run_config.json, final/,
  best/, checkpoint-N/) is named as such, with the checkpoints inside it to pass instead.
- config.json must be a JSON object whose sizes are integers (`T5Config.validate`); the
  parameter count it implies is compared with the tensors on disk (read from the safetensors
  header, without reading the weights) and with the memory of the target device, so a
  `num_layers` of a million is refused by name instead of being built.
- weights must be floating point and finite (integer or bool tensors, NaN or Inf are refused);
  the finiteness check is one pass over the weights when loading.
- the tokenizer must have a vocabulary file (tokenizer.json, spiece.model, ...; transformers
  otherwise builds a 104-token T5 tokenizer that turns every word into `<unk>`), no more tokens
  than the embedding has rows, not fewer than the embedding rounded to 128 rows would explain,
  and the config's EOS and pad ids (`check_tokenizer`).

Files are written through a temporary file in the same folder and renamed into place, with
the permissions an ordinary write gives (`write_atomic`, `write_safetensors`): safetensors
alone writes 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .model import T5, T5Config, config_fields, on_meta_without_init

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# What `pidec train` writes in its output folder (pidec.training.loop: RUN_CONFIG, final/,
# best/, checkpoint-N/); named here only to recognise a run folder passed as a checkpoint.
RUN_CONFIG = "run_config.json"
RUN_CHECKPOINTS = ("final", "best")
# Files that hold a tokenizer's vocabulary; tokenizer_config.json alone holds none.
TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)
# Tokenizer classes that need no vocabulary file (one token per byte).
VOCABULARY_FREE_TOKENIZERS = ("ByT5Tokenizer",)
# An embedding may have more rows than its tokenizer has tokens (T5: 32128 rows for 32100
# tokens, rounded up to a multiple of 128); fewer unused rows than this.
SPARE_EMBEDDING_ROWS = 128


class CheckpointError(InputError):
    """A checkpoint folder that cannot be turned into a model: says which file or tensor."""


class NameMap:
    """Two-way translation between transformers' parameter names and ours, from one table of
    (transformers name, our name) templates: `{field}` stands for a part that differs from one
    tensor to the next (a layer index, a projection) and matches the pattern `fields` gives it.
    `to_ours` and `to_hf` read the same table, so the two directions cannot drift apart."""

    def __init__(self, table: list[tuple[str, str]], fields: dict[str, str]):
        self.fields = fields
        self.table = table
        self._hf = [(self._compile(hf), ours) for hf, ours in table]
        self._ours = [(self._compile(ours), hf) for hf, ours in table]

    def _compile(self, template: str) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
        return re.compile(
            "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{self.fields[p]})" for k, p in enumerate(parts))
        )

    @staticmethod
    def _translate(rules, name: str) -> str | None:
        for pattern, template in rules:
            m = pattern.fullmatch(name)
            if m:
                return template.format(**m.groupdict())
        return None

    def to_ours(self, name: str) -> str | None:
        """Our name for a transformers tensor name; None for a name the table does not hold."""
        return self._translate(self._hf, name)

    def to_hf(self, name: str) -> str:
        """The transformers name for one of ours; KeyError for a name the table does not hold."""
        hf = self._translate(self._ours, name)
        if hf is None:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
        return hf


# {i}: a layer index; {s}: encoder or decoder
T5_NAMES = NameMap(
    [
        ("shared.weight", "embed.weight"),
        ("{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "{s}.rel_bias.weight"),
        ("encoder.block.{i}.layer.0.SelfAttention.{p}.weight", "encoder.layers.{i}.attn.{p}.weight"),
        ("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.layers.{i}.attn_norm.weight"),
        ("encoder.block.{i}.layer.1.DenseReluDense.{ff}.weight", "encoder.layers.{i}.ff.{ff}.weight"),
        ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.layers.{i}.ff_norm.weight"),
        ("{s}.final_layer_norm.weight", "{s}.final_norm.weight"),
        ("decoder.block.{i}.layer.0.SelfAttention.{p}.weight", "decoder.layers.{i}.self_attn.{p}.weight"),
        ("decoder.block.{i}.layer.0.layer_norm.weight", "decoder.layers.{i}.self_attn_norm.weight"),
        ("decoder.block.{i}.layer.1.EncDecAttention.{p}.weight", "decoder.layers.{i}.cross_attn.{p}.weight"),
        ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.layers.{i}.cross_attn_norm.weight"),
        ("decoder.block.{i}.layer.2.DenseReluDense.{ff}.weight", "decoder.layers.{i}.ff.{ff}.weight"),
        ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.layers.{i}.ff_norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
    {"i": r"\d+", "s": "encoder|decoder", "p": "q|k|v|o", "ff": "wi|wi_0|wi_1|wo"},
)
# Copies transformers keeps of the shared embedding; we have one.
EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_to_ours(name: str) -> str | None:
    # mT5/T5 checkpoints are sometimes saved from the T5Model base (no prefix change) or with a
    # leading "model." / "transformer."; accept both.
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix) and not name.startswith("model.safetensors"):
            name = name[len(prefix) :]
    return T5_NAMES.to_ours(name)


def ours_to_hf(name: str) -> str:
    return T5_NAMES.to_hf(name)


# -- config -------------------------------------------------------------------------------

_HF_ONLY = {"n_positions"}


def config_from_hf(d: dict, source: str = "config.json") -> T5Config:
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: expected a JSON object of config fields, found a JSON {_json_kind(d)}")
    model_type = d.get("model_type", "t5")
    if model_type not in ("t5", "mt5", "umt5") and "T5" not in str(d.get("architectures", "")):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a T5-family model")
    if model_type == "umt5":
        raise CheckpointError(f"{source}: umT5 (per-layer relative bias) is not supported")
    known = config_fields() - {"extra"}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    if isinstance(kwargs.get("eos_token_id"), list) and kwargs["eos_token_id"]:
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if "n_positions" in d and "max_input_length" not in d:
        kwargs["max_input_length"] = d["n_positions"]
    kwargs.setdefault("tie_word_embeddings", True)
    # transformers >= 5 writes scale_decoder_outputs for T5; older T5 configs signal it through
    # tie_word_embeddings. mT5 never scales in transformers 5 (its configs say tie=True all the same),
    # and Google's mT5 configs are untied, so mT5 without the key is unscaled.
    default_scale = kwargs["tie_word_embeddings"] is True and model_type != "mt5"
    kwargs["scale_decoder_outputs"] = d.get("scale_decoder_outputs", default_scale)
    kwargs.setdefault("decoder_start_token_id", kwargs.get("pad_token_id", 0))
    extra = {k: v for k, v in d.items() if k not in known}
    try:
        return T5Config(**kwargs, extra=extra)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


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
    """A JSON file of a checkpoint folder; invalid JSON (or binary, or nested too deep to parse)
    is an error naming the file and line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}): expected JSON") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to be a config") from None


def read_config(folder: str | os.PathLike) -> T5Config:
    path = Path(folder) / "config.json"
    if not path.is_file():
        run = run_folder_hint(folder)
        if run:
            raise CheckpointError(run)
        raise CheckpointError(f"{folder}: config.json not found")
    return config_from_hf(read_json(path), str(path))


def run_folder_hint(folder: str | os.PathLike) -> str | None:
    """For a folder written by `pidec train` (its run config, or final/, best/, checkpoint-N/
    holding checkpoints): a one-line message naming the checkpoints to pass instead; else None."""
    folder = Path(folder)
    inside = [folder / name for name in RUN_CHECKPOINTS]
    steps = []
    for p in folder.glob("checkpoint-*"):
        if p.name.removeprefix("checkpoint-").isdigit():
            steps.append((int(p.name.removeprefix("checkpoint-")), p))
    inside += [p for _, p in sorted(steps, reverse=True)]
    found = [p for p in inside if p.is_dir() and any((p / f).is_file() for f in ("config.json", "adapter_config.json"))]
    if not found and not (folder / RUN_CONFIG).is_file():
        return None
    if not found:
        return (
            f"{folder} is a pidec training run folder with no checkpoint in it yet (no final/, best/ or checkpoint-N/)"
        )
    names = ", ".join(str(p) for p in found[:3]) + (" ..." if len(found) > 3 else "")
    return f"{folder} is a pidec training run folder, not a checkpoint: pass one of its checkpoints, {names}"


def weight_shapes(folder: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """Name -> (shape, dtype) of every tensor of a safetensors checkpoint, from the file headers
    (no weight is read); None for PyTorch .bin weights, which have no header to read."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        files = [folder / SAFE_WEIGHTS]
    elif (folder / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
            files = [folder / shard for shard in sorted(set(weight_map.values()))]
        except Exception:
            return None  # read_state_dict names what is wrong with the index
    else:
        return None
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    shapes[name] = (tuple(piece.get_shape()), str(piece.get_dtype()))
        except Exception:
            return None  # read_state_dict names the file that cannot be read
    return shapes


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}


def check_weights_fit(config: T5Config, shapes: dict[str, tuple], source: str = "checkpoint") -> None:
    """Refuse a config that implies more parameters than the tensors given (name -> shape, or
    (shape, dtype) from a safetensors header) hold, naming the field that asks for more layers,
    rows or width than the weights have (or, failing that, the two counts when the config asks
    for more than twice the weights), and refuse integer or bool tensors. Cheap: run before a
    model of `config` is built, so a config of a million layers is refused, not built."""
    sizes: dict[str, tuple[int, ...]] = {}
    for name, value in shapes.items():
        shape, dtype = (
            value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str) else (value, None)
        )
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{source}: tensor {name} is stored as {dtype}; weights must be floating point")
        mapped = hf_to_ours(name) if name not in EMBEDDING_ALIASES else None
        if mapped is not None:
            sizes[mapped] = tuple(shape)
    on_disk = sum(_numel(s) for s in sizes.values())
    implied = config.parameter_count()
    if config.tie_word_embeddings and "lm_head.weight" in sizes:
        on_disk -= _numel(sizes["lm_head.weight"])  # a copy of the embedding kept by some writers
    if implied <= on_disk:
        return  # the exact names and shapes are checked once the tensors are read
    layers = {
        stack: len({int(m.group(1)) for k in sizes if (m := re.match(rf"{stack}\.layers\.(\d+)\.", k))})
        for stack in ("encoder", "decoder")
    }
    checks = [
        ("num_layers", config.num_layers, layers["encoder"], "encoder layers"),
        ("num_decoder_layers", config.num_decoder_layers, layers["decoder"], "decoder layers"),
    ]
    embed = sizes.get("embed.weight")
    if embed is not None and len(embed) == 2:
        checks += [
            ("vocab_size", config.vocab_size, embed[0], "embedding rows"),
            ("d_model", config.d_model, embed[1], "embedding columns"),
        ]
    q = sizes.get("encoder.layers.0.attn.q.weight")
    if q is not None and len(q) == 2:
        checks.append(("num_heads * d_kv", config.inner_dim, q[0], "attention width"))
    wo = sizes.get("encoder.layers.0.ff.wo.weight")
    if wo is not None and len(wo) == 2:
        checks.append(("d_ff", config.d_ff, wo[1], "feed-forward width"))
    bias = sizes.get("encoder.rel_bias.weight")
    if bias is not None and len(bias) == 2:
        checks.append(
            ("relative_attention_num_buckets", config.relative_attention_num_buckets, bias[0], "position buckets")
        )
    for field_name, wanted, held, what in checks:
        if wanted > held:
            raise CheckpointError(
                f"{source}: config.json {field_name}={wanted}, but the weights hold {held} {what} "
                f"(the config implies {implied:,} parameters, the weights hold {on_disk:,})"
            )
    if implied > 2 * on_disk + 2**20:
        raise CheckpointError(f"{source}: config.json implies {implied:,} parameters, the weights hold {on_disk:,}")
    # else a tensor or two are missing: the check by name, once the tensors are read, names them


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CPU: MemAvailable of /proc/meminfo), or None where
    it cannot be told."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None


def check_memory(config: T5Config, dtype: torch.dtype, device: torch.device, source: str = "checkpoint") -> None:
    """Refuse a model that cannot fit in the memory `device` has free (weights only)."""
    need = config.parameter_count() * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if free is not None and need > free:
        raise CheckpointError(
            f"{source}: the model needs {need / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')}"
            f" (config.json: d_model={config.d_model}, num_layers={config.num_layers}, "
            f"num_decoder_layers={config.num_decoder_layers}, vocab_size={config.vocab_size}), "
            f"{free / 2**30:.1f} GiB are free on {device}"
        )


def check_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or InputError naming it: `foo`, `cuda` without CUDA, `cuda:7`
    with two GPUs."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cpu":
        return d
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: this machine has no CUDA device (use cpu)")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise InputError(f"device {device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return d
    if d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r}: MPS is not available here (use cpu)")
    try:
        torch.empty(0, device=d)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"device {device!r}: not usable here ({first})") from None
    return d


def _not_ours(name: str) -> bool:
    """Tensors a T5 checkpoint may hold that we do not keep: the embedding's copies, and the
    unused cross-attention bias some old checkpoints carry."""
    return name in EMBEDDING_ALIASES or name.endswith("EncDecAttention.relative_attention_bias.weight")


def all_finite(tensor: Tensor) -> bool:
    """No NaN or Inf in `tensor`. A sum is NaN or infinite when any element is, so a finite sum
    (one read of the tensor, no mask the size of it) settles the common case; only a sum that
    overflowed or met a NaN or Inf is checked element by element."""
    if not tensor.numel():
        return True
    acc = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(tensor.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(tensor).all())


def state_dict_to_model(config: T5Config, hf_sd: dict[str, Tensor], source: str = "checkpoint") -> T5:
    """Build a T5 from Hugging Face named tensors, checking every name, shape and value: the
    config must not imply more parameters than the tensors hold (checked before anything is
    built), and every tensor must be floating point and finite (one pass over the weights)."""
    for name, tensor in hf_sd.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"{source}: {name} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {name} is stored as {tensor.dtype}; weights must be floating point"
            )
    check_weights_fit(config, {k: tuple(t.shape) for k, t in hf_sd.items()}, source)
    for name, tensor in hf_sd.items():
        if not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN or Inf value(s) of {tensor.numel()}")
    ours = rename_tensors(hf_sd, hf_to_ours, source, _not_ours)
    if "embed.weight" not in ours:
        for alias in EMBEDDING_ALIASES:
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

    with on_meta_without_init():
        model = T5(config)
    expected = dict(model.state_dict())
    fit = (
        f"num_layers={config.num_layers}, num_decoder_layers={config.num_decoder_layers}, "
        f"feed_forward_proj={config.feed_forward_proj}"
    )
    check_tensor_names(ours, expected, source, ours_to_hf, fit, hint=lambda name: f" (ours: {name})")
    assign_checked(model, ours, expected, source, ours_to_hf)
    return model


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides
) -> T5:
    """Load a T5 from a local checkpoint folder or a Hugging Face hub id.

    Before the weights are read: the device must exist here, the config must be valid, must not
    imply more parameters than the safetensors headers list, and must fit the device's free
    memory. Then every tensor is checked by name, shape, dtype and finiteness."""
    device = check_device(device)
    folder = resolve(path)
    config = read_config(folder)
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise ValueError(f"unknown config override {k!r}")
        setattr(config, k, v)
    try:
        config.validate()
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    if dtype is None:
        dtype = torch.float32
    shapes = weight_shapes(folder)
    if shapes is not None:
        check_weights_fit(config, shapes, str(folder))
    check_memory(config, dtype, device, str(folder))
    model = state_dict_to_model(config, read_state_dict(folder), str(folder))
    return model.to(device=device, dtype=dtype).eval()


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def looks_local(path: str | os.PathLike) -> bool:
    """True for a path that must never be sent to the hub: it starts with `.`, `/` or `~`,
    holds a backslash or more than one `/`, ends with `/`, is not of the hub's `NAME` or
    `ORG/NAME` form, or its first part names a local folder (`runs/nope` beside `runs/`)."""
    s = os.fspath(path)
    if not isinstance(s, str) or s.startswith((".", "/", "~")) or "\\" in s or s.endswith("/"):
        return True
    if s.count("/") > 1 or (os.sep != "/" and os.sep in s) or not _HUB_ID.fullmatch(s) or ".." in s or "--" in s:
        return True
    return "/" in s and Path(s.split("/", 1)[0]).is_dir()


def resolve(path: str | os.PathLike) -> Path:
    """A local folder as is; a hub id (`NAME` or `ORG/NAME`, see `looks_local`) is fetched by
    huggingface_hub; anything else is "no such checkpoint folder"."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: is a file, expected a checkpoint folder")
    if looks_local(path):
        parent = next((q for q in p.parents if q.is_dir() and str(q) != "." and q.parent != q), None)
        where = f" ({parent} exists, {p.relative_to(parent)} does not)" if parent is not None else ""
        raise CheckpointError(f"{path}: no such checkpoint folder{where}")
    s = str(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(
            f"{path}: no such local folder, and fetching it from the Hugging Face hub failed: {reason[:300]}"
        ) from None


# -- writing ------------------------------------------------------------------------------


def file_mode() -> int:
    """The permissions an ordinary `open(path, "w")` gives a new file: 0o666 less the umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; when the block ends without error the file written
    there is given ordinary permissions (`file_mode`) and renamed onto `path`, so a reader sees
    the old file or the new one, never half of one. On error the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` through a temporary file (`atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """safetensors' save_file through `atomic_path`: the file ends with ordinary permissions
    (save_file alone leaves 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata if metadata is not None else {"format": "pt"})
    return Path(path)


def save(model: T5, folder: str | os.PathLike, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json + model.safetensors (sharded above max_shard_bytes) in transformers'
    layout, each file atomically and with the permissions an ordinary write gives."""
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
    write_atomic(folder / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for stale in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX):
        if (folder / stale).exists():
            (folder / stale).unlink()
    for old in folder.glob("model-*-of-*.safetensors"):
        old.unlink()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(sd, folder / SAFE_WEIGHTS)
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
            write_safetensors(shard, folder / fname)
            weight_map.update({name: fname for name in shard})
        write_atomic(
            folder / SAFE_INDEX,
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """Refuse a tokenizer folder without a readable vocabulary: with tokenizer_config.json alone
    transformers builds a T5 tokenizer of 104 tokens (special tokens only) that encodes every
    word as `<unk>`."""
    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id: transformers fetches what it needs
    present = [f for f in TOKENIZER_VOCAB_FILES if (folder / f).exists()]
    for f in present:
        try:
            with open(folder / f, "rb") as handle:
                handle.read(1)
        except OSError as e:
            raise CheckpointError(f"{folder / f}: cannot read the tokenizer ({e.strerror or e})") from None
    if present:
        return
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        tok_config = read_json(config_path)
        cls = tok_config.get("tokenizer_class") if isinstance(tok_config, dict) else None
        if cls in VOCABULARY_FREE_TOKENIZERS:
            return
        raise CheckpointError(
            f"{folder}: tokenizer_config.json but no vocabulary ({' or '.join(TOKENIZER_VOCAB_FILES[:2])} is missing); "
            "copy it from the tokenizer the model was trained with, or pass a tokenizer folder"
        )
    raise CheckpointError(
        f"{folder}: no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES[:2])}, tokenizer_config.json)"
    )


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored with a checkpoint (or a tokenizer folder), through transformers; a
    folder without a vocabulary file is refused (`check_tokenizer_files`)."""
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: cannot load a tokenizer: {reason[:300]}") from None


def check_tokenizer(tokenizer, config: T5Config, source: str = "tokenizer") -> None:
    """Refuse a tokenizer that does not belong to the model: more tokens than embedding rows,
    SPARE_EMBEDDING_ROWS or more rows without a token, or an EOS / pad id other than config.json's."""
    n = len(tokenizer)
    if n > config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {n} tokens but the model's embedding has {config.vocab_size} rows (vocab_size)"
        )
    if config.vocab_size - n >= SPARE_EMBEDDING_ROWS:
        raise CheckpointError(
            f"{source}: the tokenizer has {n} tokens but the model's embedding has {config.vocab_size} rows "
            f"(vocab_size): not the tokenizer this model was trained with"
        )
    for name in ("eos_token_id", "pad_token_id"):
        theirs = getattr(tokenizer, name, None)
        if theirs is None:
            if name == "eos_token_id":
                raise CheckpointError(
                    f"{source}: the tokenizer has no EOS token (config.json eos_token_id={config.eos_token_id})"
                )
            continue
        if theirs != getattr(config, name):
            raise CheckpointError(
                f"{source}: the tokenizer's {name} is {theirs}, config.json says {getattr(config, name)}"
            )


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


def rename_tensors(hf_sd: dict[str, Tensor], hf_to_ours, source: str, skip=lambda name: False) -> dict[str, Tensor]:
    """The tensors under our names (`hf_to_ours`), leaving out those `skip` names; a tensor the
    table does not know is an error naming the first five."""
    ours: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in hf_sd.items():
        if skip(name):
            continue
        mapped = hf_to_ours(name)
        if mapped is None:
            unknown.append(name)
        else:
            ours[mapped] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return ours


def check_tensor_names(ours: dict, expected: dict, source: str, name_in_file, fit: str, hint=lambda name: "") -> None:
    """Every tensor the model (`expected`) has is among `ours`, and none more: the first missing
    one is named as the file names it (plus `hint(its name)`), the first extra one with `fit`,
    the config fields that decide which tensors there are."""
    missing = [k for k in expected if k not in ours]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {name_in_file(missing[0])}{hint(missing[0])}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    extra = [k for k in ours if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: tensor {name_in_file(extra[0])} does not fit this config ({fit})")


def assign_checked(model, ours: dict, expected: dict, source: str, name_in_file) -> None:
    """Put `ours` into a model built on the meta device (its `expected` state dict), after checking
    every tensor's shape against the config's; a wrong one is named as the file names it."""
    for k, param in expected.items():
        if tuple(ours[k].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: tensor {name_in_file(k)} has shape {tuple(ours[k].shape)}, "
                f"config.json implies {tuple(param.shape)}"
            )
    model.load_state_dict(ours, assign=True, strict=True)
