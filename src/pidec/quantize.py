"""int8 inference: a T5's linear layers with int8 weights (one scale per output channel) and
activations quantized to int8 on the fly, through a quantization library, not kernels of our own.

`quantize_model(model, "int8")` changes the model in place. Two backends do the work:

- ``torch``: torch's dynamically quantized Linear (`torch.ao.nn.quantized.dynamic.Linear`,
  FBGEMM / oneDNN x86 kernels on weights packed once at load). CPU and float32 only. An
  activation gets one scale per call (per tensor: a row's rounding depends a little on the
  other rows decoded with it), over `activation_bits()` bits: 8 where the CPU has VNNI, 7
  without it (AVX2 only: the u8 x s8 pair sums of those kernels saturate int16 at full range;
  torch's own module always uses 7). Without VNNI the activation step is twice as coarse, so
  the int8 outputs sit about twice as far from float32. torch marks the `torch.ao` quantization
  API deprecated in favour of torchao, but it still ships and runs in torch 2.13.
- ``torchao``: `torchao.quantization.quantize_` with `Int8DynamicActivationInt8WeightConfig`
  (one scale per token, symmetric). Any device and dtype. On the CPU in eager mode its per-call
  work around the int8 product (quantizing the activation in several passes, converting it to
  uint8, summing the weight's columns for the u8s8 kernel) costs about what the int8 product
  saves (pytorch/ao#1930): it is meant to run under `torch.compile`.

``auto`` (the default) takes ``torch`` for a float32 model on the CPU and ``torchao`` otherwise:
in eager mode on the CPU the torch backend is the one that is faster than float32. The
measurements behind that choice, the agreement of int8 with float32 on trained models, and how
far the outputs move without VNNI are in docs/performance.md ("int8"), with their commands.

The LM head stays in float32 (`head=False`): it is a tenth of a base model's weights, and it is
where int8 rounding turns directly into a different argmax over the vocabulary. The embedding
is a lookup and stays as it is too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch import nn

from .cpu import features
from .errors import InputError
from .model import T5

METHODS = ("int8",)
BACKENDS = ("auto", "torch", "torchao")
INSTALL_HINT = 'pip install ".[int8]"  (the int8 extra, from a pidec checkout)'


class QuantizeError(InputError):
    """A quantization request that cannot be met: says what and how to fix it."""


def check_method(method) -> str | None:
    """None or 'int8'; anything else is an error naming the accepted values."""
    if method is None or method == "none":
        return None
    if method not in METHODS:
        raise QuantizeError(f"unknown quantize={method!r}: expected one of {', '.join(METHODS)} (or None)")
    return method


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "quantization", None))


def _targets(model: T5, head: bool) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, linear) for every linear layer to quantize."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and (head or child is not model.lm_head):
                out.append((parent, name, child))
    return out


@contextlib.contextmanager
def quiet_import():
    """torchao logs a warning for each CUDA extension it cannot load on a CPU-only machine, and
    torch one for an enum it registers; neither concerns int8 on the CPU."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_torchao():
    """torchao's quantization module, or a QuantizeError naming the extra to install."""
    try:
        with quiet_import():
            import torchao.quantization as tq
    except ImportError as e:
        raise QuantizeError(f"quantize='int8' with the torchao backend needs torchao: {INSTALL_HINT} ({e})") from e
    return tq


def torch_backend_available() -> bool:
    try:
        import torch.ao.nn.quantized.dynamic
    except ImportError:  # pragma: no cover - a torch without torch.ao quantization
        return False
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn", "qnnpack"))


def pick_backend(model: T5, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown int8 backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    on_cpu_fp32 = model.device.type == "cpu" and model.dtype == torch.float32
    if backend == "auto":
        return "torch" if on_cpu_fp32 and torch_backend_available() else "torchao"
    if backend == "torch" and not on_cpu_fp32:
        raise QuantizeError(
            f"the torch int8 backend runs float32 models on the CPU (this one: {model.dtype} on {model.device}); "
            "use backend='torchao'"
        )
    if backend == "torch" and not torch_backend_available():  # pragma: no cover
        raise QuantizeError("this torch has no dynamic int8 Linear (torch.ao.nn.quantized.dynamic): use 'torchao'")
    return backend


def quantize_model(model: T5, method: str = "int8", backend: str = "auto", head: bool = False) -> T5:
    """Quantize `model`'s linear layers to int8 in place (inference only) and return it.
    `model.quantization` records what was done: {"method", "backend", "layers", "head"}."""
    if check_method(method) is None:
        return model
    if is_quantized(model):
        raise QuantizeError("the model is already quantized")
    if model.training:
        raise QuantizeError("int8 quantization is for inference: call model.eval() first")
    backend = pick_backend(model, backend)
    targets = _targets(model, head)
    bits = 8
    if backend == "torch":
        bits = _quantize_torch(targets)
    else:
        _quantize_torchao(model, head)
    model.quantization = {
        "method": method,
        "backend": backend,
        "layers": len(targets),
        "head": head,
        "activation_bits": bits,
    }
    return model


def cpu_has_vnni() -> bool:
    """AVX512-VNNI / AMX-int8 (`pidec.cpu.features`, so `PIDEC_CPU_FEATURES` forces it either
    way): int8 products accumulate in int32 without saturating, so activations can use the full
    8-bit range. Without them, FBGEMM's and oneDNN's u8 x s8 pair sums (`vpmaddubsw`) overflow
    int16: torch reduces activations to 7 bits. AVX-VNNI alone (256-bit) does not count: torch's
    int8 kernels take their AVX2 path there."""
    return bool({"avx512_vnni", "amx_int8"} & features().flags)


def activation_bits() -> int:
    """Bits an activation is quantized to by the ``torch`` backend on this CPU: 8 with VNNI, else
    7 (`cpu_has_vnni`). With 8 bits and no VNNI the kernels' int16 pair sums saturate and the
    outputs go wrong, several times further from float32 than with 7 (docs/performance.md)."""
    return 8 if cpu_has_vnni() else 7


@functools.cache
def _dynamic_linear_class():
    import torch.ao.nn.quantized.dynamic as nnqd

    class DynamicInt8Linear(nnqd.Linear):
        """torch's dynamic int8 Linear with the activation range chosen per machine (torch's own
        always reduces it to 7 bits; on this task's model that cost 0.5 points of agreement)."""

        reduce_range = True

        def forward(self, x):
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=self.reduce_range).to(x.dtype)

    return DynamicInt8Linear


def _quantize_torch(targets) -> int:
    """Swap each target for torch's dynamic int8 Linear; returns the activation bits chosen."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    cls = _dynamic_linear_class()
    bits = activation_bits()
    reduce_range = bits < 8

    with warnings.catch_warnings():
        # "quantized tensor creation functions ... are deprecated" (torch 2.13): still the
        # supported way to build these modules; said once in the module docstring instead
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for parent, name, lin in targets:
            plain = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
            plain.weight = lin.weight
            if lin.bias is not None:
                plain.bias = lin.bias
            plain.qconfig = per_channel_dynamic_qconfig
            q = cls.from_float(plain)
            q.reduce_range = reduce_range
            setattr(parent, name, q)
    return bits


def _quantize_torchao(model: T5, head: bool) -> None:
    tq = import_torchao()
    config = tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)  # no global side effects

    def wanted(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (head or module is not model.lm_head)

    with quiet_import():
        tq.quantize_(model, config, filter_fn=wanted)


def describe(model: nn.Module) -> str:
    q = getattr(model, "quantization", None)
    if not q:
        return "float"
    bits = f", {q['activation_bits']}-bit activations" if "activation_bits" in q else ""
    return f"{q['method']} ({q['backend']}, {q['layers']} linear layers{bits}, head {'int8' if q['head'] else 'float'})"


__all__ = [
    "BACKENDS",
    "INSTALL_HINT",
    "METHODS",
    "activation_bits",
    "QuantizeError",
    "check_method",
    "cpu_has_vnni",
    "describe",
    "import_torchao",
    "is_quantized",
    "pick_backend",
    "quantize_model",
]
