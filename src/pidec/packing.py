"""Pre-packed float32 linear weights for CPU inference (oneDNN).

A float32 `F.linear` on the CPU goes to MKL's sgemm, which re-lays-out ("packs") the weight on
every call. oneDNN can pack a weight once, ahead of time, into the blocked layout its kernels
read (`torch.ops.mkldnn._reorder_linear_weight`), and then multiply by it directly
(`torch.ops.mkldnn._linear_pointwise`); this is the path torch's own inductor takes for
float32 linears on the CPU. On the two-core machine of docs/performance.md a T5-base linear
layer ran 1.2-1.4x faster this way at encoder shapes (512 rows) and 1.4-3.2x faster at the few
rows of a decoding step, where the time is the weight streaming from memory.

The cost is memory: the packed copy sits next to the weight (training, checkpoints, LoRA and
quantization keep using the weight itself), so a packed model holds its linear weights twice.

Use: `pack(model)` marks a model's linear layers and packs their weights now; `unpack(model)`
undoes it. A packed layer uses its packed copy only on the CPU, in float32, with autograd off;
anything else (training, another dtype, a quantized weight) takes the usual path. A weight
changed after packing (an optimizer step, `load_state_dict`, a new tensor put in its place) is
packed again on its next use, so a stale copy is not multiplied. The one write this cannot see
is through `weight.data` (`weight.data.copy_(...)` bumps no version counter): call `pack(model)`
again after such a write.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

# weight -> (its stamp when packed, packed copy); weak, so a dropped model frees its copies
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()

PACK_ROWS_HINT = 512  # the row count oneDNN is told to expect; measured best over 1-512 rows


def available() -> bool:
    """Whether this torch has the oneDNN linear ops packing needs."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def packable(weight: Tensor) -> bool:
    """A plain (not quantized, not a tensor subclass) float32 CPU weight."""
    return type(weight) in (nn.Parameter, Tensor) and weight.dtype == torch.float32 and weight.device.type == "cpu"


def _stamp(weight: Tensor) -> tuple:
    """What changes when the weight does: its storage, and the version counter that every
    in-place write bumps (an inference-mode tensor has none: its storage alone)."""
    return (weight.data_ptr(), None if weight.is_inference() else weight._version)


def _packed_copy(weight: Tensor) -> Tensor:
    entry = _packed.get(weight)
    stamp = _stamp(weight)
    if entry is None or entry[0] != stamp:
        with torch.no_grad():
            entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT))
        _packed[weight] = entry
    return entry[1]


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `packed_product(x, weight)` may take the packed path now."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and packable(weight)


def packed_product(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T through the packed copy of `weight` (made now if it has none or is stale).
    The caller checks `usable` first."""
    return torch.ops.mkldnn._linear_pointwise(x, _packed_copy(weight), None, "none", [], "")


FEW_ROWS = 16  # up to this many rows, CPU inference computes a linear layer as W @ x^T


def linear(x: Tensor, weight: Tensor, packed: bool = False) -> Tensor:
    """x @ weight^T. `packed` (a layer of a model given to `pack`): on the CPU in
    float32 at inference, through the weight's oneDNN-packed copy. Otherwise, with few rows on
    the CPU at inference (decoding steps), the product is taken the other way round,
    weight @ x^T: CPU BLAS then streams a weight that is not in cache about 1.3x (6 rows) to 3x
    (2 rows) faster, and decoding steps are bound by streaming the weights."""
    if packed and usable(x, weight):
        return packed_product(x, weight)
    rows = x.numel() // x.shape[-1]
    plain = type(weight) in (nn.Parameter, Tensor)  # a quantized weight (tensor subclass) has its own F.linear
    if plain and rows <= FEW_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled():
        return torch.mm(weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free nn.Linear (so PEFT, quantizers and checkpoints see the usual module) whose
    forward takes the packed or few-rows path above."""

    packed = False  # set by pack

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.packed)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` can be packed here: float32 on the CPU, oneDNN present."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and available()


def _marked(model: nn.Module, packed: bool | None) -> list[Tensor]:
    """The weights the `packed` flag covers: every linear layer's and, when the LM head is tied
    to the embedding, the embedding's. `packed` True or False also sets the flag on each layer
    and on the model; None leaves the flags as they are."""
    weights = []
    for layer in model.modules():
        if isinstance(layer, Linear):
            if packed is not None:
                layer.packed = packed
            weights.append(layer.weight)
    if packed is not None:
        model.packed = packed
    if getattr(model, "lm_head", 0) is None:  # `T5.logits` multiplies by the embedding
        weights.append(model.embed.weight)
    return weights


def pack(model: nn.Module) -> int:
    """Mark every linear layer of `model` (and a tied LM head) to use packed weights, and pack
    the float32 CPU ones now. Returns how many weights were packed. Raises RuntimeError where
    this torch has no oneDNN."""
    if not available():
        raise RuntimeError("weight packing needs torch built with oneDNN (torch.backends.mkldnn)")
    n = 0
    for w in _marked(model, True):
        _packed.pop(w, None)  # packed afresh: pack() is also how a write the stamp cannot see is taken in
        if packable(w):
            _packed_copy(w)
            n += 1
    return n


def unpack(model: nn.Module) -> None:
    """Back to the usual path for every layer of `model`; the packed copies are freed."""
    for w in _marked(model, False):
        _packed.pop(w, None)


def is_packed(model: nn.Module) -> bool:
    return bool(getattr(model, "packed", False))


def packed_bytes(model: nn.Module) -> int:
    """Memory held by `model`'s packed copies (the same element count as the weights)."""
    return sum(w.numel() * w.element_size() for w in _marked(model, None) if w in _packed)
