"""A loaded T5 made ready for inference: int8, compiled decoding steps and packed weights, in the
one order that works. `pidec.load` and the benchmark both go through `prepare_for_inference`, so
a benchmark row runs the model a user gets.

The order: quantize first (the int8 layers replace float linear layers), then compile (a
compiled model is unpacked: inductor lays out the weights its own way), then pack what is left
in float32 (all linear layers, or an int8 model's float LM head). Cost: quantizing and packing
each read every linear weight once and, packed, the float32 linear weights are held twice
(`pidec.packing`); compiling costs nothing here and about a minute on the first steps decoded.
"""

from __future__ import annotations

from . import packing
from . import quantize as quant
from .errors import InputError
from .generate import compile_steps
from .model import T5


def check_inference_options(quantize: str | None, compile: bool) -> str | None:
    """`quantize` checked (None or "int8"; `quantize.QuantizeError`, an InputError, otherwise),
    and refused together with `compile`. Cheap: callers run it before loading any weight."""
    if compile and quantize is not None:
        raise InputError("compile=True and quantize='int8' do not go together: pick one")
    return quant.check_method(quantize)


def prepare_for_inference(
    model: T5, quantize: str | None = None, compile: bool = False, pack_weights: bool | None = None
) -> T5:
    """Put `model` in eval mode and set it up in place; returns it.

    quantize: None or "int8" (`pidec.quantize.quantize_model`, LM head float).
    compile: decode the steps through torch.compile (`generate.compile_steps`); not with quantize.
    pack_weights: keep oneDNN-packed copies of the float32 linear weights (`pidec.packing`).
    None: on where that applies (float32 on the CPU, not compiled, oneDNN present); True where it
    does not apply is an InputError; False: off."""
    quantize = check_inference_options(quantize, compile)
    model.eval()
    can_pack = packing.supported(model.device, model.dtype) and not compile
    if pack_weights and not can_pack:
        raise InputError("pack_weights=True needs a float32 model on the CPU, not compiled, and torch with oneDNN")
    if quantize is not None:
        quant.quantize_model(model, quantize)
    if compile:
        compile_steps(model)
    if can_pack if pack_weights is None else pack_weights:
        packing.pack(model)
    return model
