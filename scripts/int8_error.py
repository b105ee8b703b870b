"""How far int8 moves the tiny v11 test model from float32, with 7- and 8-bit activations, and
what broken quantizers look like: the table in docs/performance.md ("int8 without VNNI").

    PYTHONPATH=src python scripts/int8_error.py

Rows: torch's kernels as `pidec.quantize` sets them up on this CPU (`activation_bits()`), the
same per-channel weights and per-tensor activations emulated in float at 8 and 7 bits, torch's
kernels forced to 8-bit activations (they saturate without VNNI), and three broken quantizers.
Columns: teacher-forced logits error over the logits' norm, share of equal argmaxes, greedy
token agreement (tests/test_quantize.py's measures)."""

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pidec import quantize as quant  # noqa: E402
from tests.conftest import build_hf, pidec_from_hf  # noqa: E402
from tests.test_quantize import agreement, draws, greedy, logits_error  # noqa: E402

torch.set_num_threads(1)


class Emulated(nn.Module):
    """A linear layer with int8 weights (symmetric, one scale per output channel) and activations
    quantized per tensor (affine) to `bits`, computed in float."""

    def __init__(self, lin: nn.Linear, bits: int):
        super().__init__()
        w = lin.weight.detach()
        s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127.5
        self.w = (w / s).round().clamp(-128, 127) * s
        self.levels = 2**bits - 1

    def forward(self, x):
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (hi - lo) / self.levels or 1.0
        zp = round(-lo / scale)
        return (((x / scale).round() + zp).clamp(0, self.levels) - zp) * scale @ self.w.t()


def emulated(model, bits: int):
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not m.lm_head:
                setattr(parent, name, Emulated(child, bits))
    return m


ref = pidec_from_hf("v11", build_hf("v11"))
docs, prompts = draws(96)
with torch.inference_mode():
    want = greedy(ref, docs, prompts)


def report(label, q):
    rel, same = logits_error(q, ref, 96)
    with torch.inference_mode():
        agree = agreement(greedy(q, docs, prompts), want)
    print(f"{label:<44} {rel:>7.4f} {same:>7.3f} {agree:>7.3f}")


print(f"{'quantizer':<44} {'error':>7} {'argmax':>7} {'greedy':>7}   (activation_bits: {quant.activation_bits()})")
report("torch's kernels, as pidec.quantize sets them", quant.quantize_model(copy.deepcopy(ref), "int8", "torch"))
report("emulated, 8-bit activations", emulated(ref, 8))
report("emulated, 7-bit activations", emulated(ref, 7))
q = quant.quantize_model(copy.deepcopy(ref), "int8", "torch")
for layer in q.modules():
    if hasattr(layer, "reduce_range"):
        layer.reduce_range = False
report("torch's kernels, 8-bit activations", q)
bad = emulated(ref, 8)
for layer in bad.modules():
    if isinstance(layer, Emulated):
        layer.w = layer.w * 1.1
report("every weight scale 10% off", bad)
bad = emulated(ref, 8)
bad.decoder.layers[0].ff.wo.w = bad.decoder.layers[0].ff.wo.w.flip(0)
report("one layer's output channels reversed", bad)
