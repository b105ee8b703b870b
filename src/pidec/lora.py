"""LoRA adapters for our T5, through PEFT, saved in the layout PEFT and transformers read.

`add_lora` injects PEFT's LoRA layers into the `T5` itself (`peft.inject_adapter_in_model`), not
into a `PeftModel` wrapper: the decoding engine calls `model.encode`, `model.cross_cache`,
`model.decoder.layers[i]`... and a wrapper would hide them. Each targeted `Linear` becomes a
`peft` LoRA layer around it; everything else is unchanged, so the same object trains
(teacher-forced forward) and decodes (`pidec.generate`).

On disk an adapter is what `PeftModel.save_pretrained` writes for a transformers T5:
`adapter_config.json` + `adapter_model.safetensors`, tensors named
`base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`, so that
`PeftModel.from_pretrained(T5ForConditionalGeneration..., folder)` loads it; and adapters
trained that way load here. `merge` folds the deltas into the weights for plain, fast decoding.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint, packing
from .checkpoint import CheckpointError
from .model import T5

ADAPTER = "default"  # PEFT's adapter name inside the modules; files carry no name
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # older PEFT
PREFIX = "base_model.model."  # what PeftModel puts before the transformers names
TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # attention and feed-forward linears
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")
# adapter_config.json fields whose non-default values change the computation in ways we do not build
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
}


# -- adding, merging ------------------------------------------------------------------------


def add_lora(
    model: T5,
    r: int,
    alpha: float | None = None,
    targets: list[str] | tuple[str, ...] = ("q", "v"),
    dropout: float = 0.0,
) -> T5:
    """Inject LoRA adapters into `model` (in place; the same object is returned) and freeze
    everything else: only the adapters' lora_A / lora_B require grad afterwards.

    targets: short layer names, matched in every encoder and decoder layer (q, k, v, o attention
    projections, self and cross; wi or wi_0/wi_1 and wo feed-forward). alpha: the LoRA alpha,
    the delta is scaled by alpha / r (default alpha = r, scale 1)."""
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of layer names from {', '.join(TARGETS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA r must be an integer >= 1, got {r!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if lora_layers(model):
        raise ValueError("model already has LoRA adapters: merge() them or start from the base model")
    present = _target_names(model)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}: valid names are {', '.join(TARGETS)}")
        if not any(name.rsplit(".", 1)[-1] == t for name in present):
            have = sorted({name.rsplit(".", 1)[-1] for name in present}, key=TARGETS.index)
            raise ValueError(
                f"LoRA target {t!r} matches no layer of this model "
                f"(feed_forward_proj={model.config.feed_forward_proj}); its layers are {', '.join(have)}"
            )
    return _inject(model, r, float(r if alpha is None else alpha), sorted(set(targets)), dropout, False)


def _target_names(model: T5) -> list[str]:
    """Module names of the layers LoRA may target, plain or already adapted (not the LM head)."""
    adapted = lora_layers(model)
    return [
        name
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS and (isinstance(m, nn.Linear) or name in adapted)
    ]


def _inject(model: T5, r: int, alpha: float, targets: list[str], dropout: float, rslora: bool) -> T5:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError(f"LoRA needs the peft package (pip install peft): {e}") from e

    # targets: short names (matched as name suffixes) or full module names (matched exactly)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_rslora=rslora, bias="none"
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of `model`, by module name (empty for a plain model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no model can have its layers
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge(model: T5) -> T5:
    """Fold every LoRA delta into its base weight and put the plain `Linear` back, in place: the
    result has no PEFT layer left, saves as a plain checkpoint and decodes at full speed. All
    parameters require grad again, as in a freshly loaded model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA adapters to merge")
    for name, layer in layers.items():
        layer.merge(safe_merge=True)  # raises on NaN instead of writing it into the weights
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    if packing.is_packed(model):  # PEFT may write the merged weight through .data, which no stamp sees
        packing.pack(model)
    return model


# -- saving -------------------------------------------------------------------------------


def save_adapter(
    model: T5, folder: str | os.PathLike, base_model_path: str | os.PathLike | None, tokenizer=None
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as PEFT does for a transformers T5.

    base_model_path: the base checkpoint (a local folder is recorded as an absolute path, so the
    adapter loads from any working directory; a hub id as is)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA adapters to save: call add_lora first")
    peft_config = getattr(model, "peft_config", {}).get(ADAPTER)
    if peft_config is None:
        raise ValueError("model has LoRA layers but no peft_config: it was not made by add_lora / load_adapter")
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if ".lora_" not in name:
            continue
        m = re.fullmatch(rf"(.+)\.(lora_A|lora_B)\.{ADAPTER}\.weight", name)
        if m is None:
            raise ValueError(f"adapter tensor {name}: only plain LoRA (lora_A, lora_B weights) can be saved")
        hf_module = checkpoint.ours_to_hf(m.group(1) + ".weight").removesuffix(".weight")
        tensors[f"{PREFIX}{hf_module}.{m.group(2)}.weight"] = t.detach().to("cpu").contiguous()

    config = copy.deepcopy(peft_config)
    config.target_modules = _saved_targets(model, set(layers))
    config.base_model_name_or_path = _base_path(base_model_path)
    config.task_type = "SEQ_2_SEQ_LM"  # PeftModel.from_pretrained then builds PeftModelForSeq2SeqLM
    config.inference_mode = True
    folder = Path(folder)
    config.save_pretrained(str(folder))
    for stale in (ADAPTER_WEIGHTS, ADAPTER_BIN):
        if (folder / stale).exists():
            (folder / stale).unlink()
    checkpoint.write_safetensors(tensors, folder / ADAPTER_WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def _saved_targets(model: T5, adapted: set[str]) -> list[str]:
    """Short names (q, v, ...) when the adapted layers are every layer of those names, as add_lora
    makes them; otherwise the transformers names of exactly the adapted layers."""
    short = {name.rsplit(".", 1)[-1] for name in adapted}
    if {name for name in _target_names(model) if name.rsplit(".", 1)[-1] in short} == adapted:
        return sorted(short, key=TARGETS.index)
    return sorted(checkpoint.ours_to_hf(n + ".weight").removesuffix(".weight") for n in adapted)


def _base_path(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p.resolve()) if p.is_dir() else str(path)


# -- loading ------------------------------------------------------------------------------


def is_adapter(folder: str | os.PathLike) -> bool:
    """A LoRA adapter folder: adapter_config.json and no config.json of its own."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """adapter_config.json, checked: a LoRA adapter with only the features `_inject` builds."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} not found")
    d = checkpoint.read_json(path)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    for key, default in _UNSUPPORTED.items():
        if d.get(key, default) not in (default, None, {}, [], False):
            raise CheckpointError(f"{path}: {key}={d[key]!r} is not supported (expected {default!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(d.get(key), (int, float)) or isinstance(d.get(key), bool) or d[key] <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, got {d.get(key)!r}")
    return d


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The adapter's tensors under our module names: `decoder.layers.0.self_attn.q.lora_A.weight`."""
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        path = folder / ADAPTER_WEIGHTS
        raw = checkpoint.read_safetensors(path)
    elif (folder / ADAPTER_BIN).is_file():
        path = folder / ADAPTER_BIN
        raw = checkpoint.read_bin(path)
    else:
        raise CheckpointError(f"{folder}: no adapter weights found (looked for {ADAPTER_WEIGHTS}, {ADAPTER_BIN})")
    ours: dict[str, Tensor] = {}
    for key, t in raw.items():
        name = key.removeprefix(PREFIX)
        m = _LORA_KEY.fullmatch(name)
        module = None if m is None else checkpoint.hf_to_ours(m.group(1) + ".weight")
        if module is None:
            raise CheckpointError(f"{path}: tensor {key} is not a LoRA weight of a T5 attention/feed-forward layer")
        ours[f"{module.removesuffix('.weight')}.{m.group(2)}.weight"] = t
    if not ours:
        raise CheckpointError(f"{path}: no LoRA tensors")
    return ours


def load_adapter(
    folder: str | os.PathLike,
    base: T5 | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> T5:
    """A base T5 with the adapter of `folder` injected (adapters trainable, the rest frozen).

    base: a T5 (adapted in place), a checkpoint folder, or None to load the adapter config's
    base_model_name_or_path. overrides: config overrides for a base loaded here
    (e.g. max_input_length)."""
    folder = checkpoint.resolve(folder)
    config = read_adapter_config(folder)
    weights = read_adapter_weights(folder)
    model = _adapter_base(folder, config, base, device, dtype, overrides)
    if lora_layers(model):
        raise ValueError("base model already has LoRA adapters: merge() them or pass the plain base")
    modules = sorted({name.rsplit(".", 2)[0] for name in weights})
    linears = set(_target_names(model))
    for name in modules:
        if name not in linears:
            raise CheckpointError(
                f"{folder}: the adapter has weights for {checkpoint.ours_to_hf(name + '.weight')}, "
                "which the base model does not have"
            )
    _inject(
        model,
        int(config["r"]),
        float(config["lora_alpha"]),
        modules,
        float(config.get("lora_dropout") or 0.0),
        bool(config.get("use_rslora")),
    )
    _copy_adapter_weights(model, weights, folder, config)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _adapter_base(folder: Path, config: dict, base, device, dtype, overrides: dict) -> T5:
    """The T5 an adapter goes into: `base` itself, or the checkpoint it names, or the adapter
    config's base_model_name_or_path; overrides apply only to a base loaded here."""
    if isinstance(base, T5):
        if overrides:
            raise ValueError(f"config overrides {sorted(overrides)} apply to a base loaded here, not to a given T5")
        return base
    source = base if base is not None else config.get("base_model_name_or_path")
    if not source:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is empty; pass base=FOLDER")
    try:
        return checkpoint.load_model(source, device=device or "cpu", dtype=dtype, **overrides)
    except CheckpointError as e:
        where = "base" if base is not None else f"{folder / ADAPTER_CONFIG}: base_model_name_or_path"
        raise CheckpointError(f"{where} {str(source)!r} cannot be loaded ({e}); pass base=FOLDER") from e


def _copy_adapter_weights(model: T5, weights: dict, folder: Path, config: dict) -> None:
    """Copy the adapter's tensors into the injected layers, refusing one whose shape the rank and
    the base model do not imply."""
    state = model.state_dict()
    with torch.no_grad():
        for name, t in weights.items():
            ours = f"{name.removesuffix('.weight')}.{ADAPTER}.weight"
            if tuple(t.shape) != tuple(state[ours].shape):
                hf_name = checkpoint.ours_to_hf(name.rsplit(".", 2)[0] + ".weight").removesuffix(".weight")
                raise CheckpointError(
                    f"{folder}: adapter tensor {hf_name}.{name.split('.')[-2]} has shape {tuple(t.shape)}, "
                    f"r={config['r']} and the base model imply {tuple(state[ours].shape)}"
                )
            state[ours].copy_(t)


def load_merged(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> T5:
    """Base + adapter merged into a plain T5: merged in float32, then cast to `dtype` (default:
    the dtype the base checkpoint was stored in), so a bfloat16 model gets one rounding, not two."""
    model = merge(load_adapter(folder, device=device, dtype=torch.float32, **overrides))
    return model.to(dtype=dtype or stored_dtype(model)).eval()


# -- exporting ----------------------------------------------------------------------------


def stored_dtype(model: T5) -> torch.dtype:
    """The dtype config.json says the checkpoint was saved in (float32 when it does not say)."""
    name = model.config.extra.get("dtype") or model.config.extra.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.float32)


def tokenizer_folder(adapter_folder: str | os.PathLike) -> Path | None:
    """Where an adapter's tokenizer is: the adapter folder, else its local base folder, else None."""
    adapter_folder = Path(adapter_folder)
    candidates = [adapter_folder]
    try:
        base = read_adapter_config(adapter_folder).get("base_model_name_or_path")
    except CheckpointError:
        base = None
    if base and Path(base).is_dir():
        candidates.append(Path(base))
    for c in candidates:
        if any((c / f).exists() for f in TOKENIZER_FILES):
            return c
    return None


def export_merged(
    adapter_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge an adapter into its base and save a plain Hugging Face checkpoint folder.

    tokenizer: a tokenizer or a folder holding one; by default the adapter folder's, else the
    base folder's (none is written when neither has one). dtype: default the base's stored dtype."""
    adapter_folder = checkpoint.resolve(adapter_folder)
    _check_out(adapter_folder, out_folder)
    model = load_merged(adapter_folder, dtype=dtype)
    if tokenizer is None:
        tokenizer = tokenizer_folder(adapter_folder)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = checkpoint.load_tokenizer(tokenizer)
    return checkpoint.save(model, out_folder, tokenizer=tokenizer)


def export(src: str | os.PathLike, out_folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `src` as a plain Hugging Face checkpoint in `out_folder`: a LoRA adapter folder is
    merged into its base; a plain checkpoint is re-saved (in `dtype`, default as stored), with
    its tokenizer when it has one."""
    src = checkpoint.resolve(src)
    if is_adapter(src):
        return export_merged(src, out_folder, dtype=dtype)
    _check_out(src, out_folder)
    model = checkpoint.load_model(src)
    model.to(dtype=dtype or stored_dtype(model))
    tok = checkpoint.load_tokenizer(src) if any((src / f).exists() for f in TOKENIZER_FILES) else None
    return checkpoint.save(model, out_folder, tokenizer=tok)


def _check_out(src: Path, out: str | os.PathLike) -> None:
    if Path(out).resolve() == Path(src).resolve():
        raise CheckpointError(f"{out}: the output folder must differ from the checkpoint folder {src}")
