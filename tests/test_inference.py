"""`pidec.inference.prepare_for_inference`: quantize, compile and pack in the one order that
works, the refusals before anything changes, and `pidec.load` going through it."""

import copy

import pytest
import torch

import pidec
from pidec import api, packing
from pidec import quantize as quant
from pidec.generate import is_compiled
from pidec.inference import check_inference_options, prepare_for_inference

from .shared_data import tiny_checkpoint


def test_float32_on_the_cpu_is_packed_by_default(v11):
    m = prepare_for_inference(copy.deepcopy(v11.pid).train())
    assert not m.training and packing.is_packed(m) is packing.available()
    assert not packing.is_packed(prepare_for_inference(copy.deepcopy(v11.pid), pack_weights=False))


def test_int8_then_pack_what_is_left_float(v11):
    m = prepare_for_inference(copy.deepcopy(v11.pid), quantize="int8")
    assert quant.is_quantized(m) and m.quantization["head"] is False
    assert packing.is_packed(m) is packing.available()  # the float LM head, packed after quantizing


def test_compile_leaves_the_model_unpacked(v11):
    m = prepare_for_inference(copy.deepcopy(v11.pid), compile=True)
    assert is_compiled(m) and not packing.is_packed(m)


def test_refusals_change_nothing(v11):
    m = copy.deepcopy(v11.pid)
    with pytest.raises(pidec.InputError, match="do not go together"):
        prepare_for_inference(m, quantize="int8", compile=True)
    with pytest.raises(pidec.InputError, match="pack_weights=True needs a float32 model"):
        prepare_for_inference(m.to(torch.bfloat16), quantize="int8", pack_weights=True)
    assert not quant.is_quantized(m)  # refused before quantizing
    with pytest.raises(pidec.InputError, match="expected one of int8"):
        check_inference_options("int4", False)
    assert check_inference_options("none", False) is None


def test_load_goes_through_it(tmp_path, monkeypatch):
    folder = tiny_checkpoint(tmp_path / "ckpt", seed=0, max_input_length=64)
    seen = []
    real = api.prepare_for_inference
    monkeypatch.setattr(api, "prepare_for_inference", lambda *a: seen.append(a[1:]) or real(*a))
    m = pidec.load(folder, quantize="int8")
    assert seen == [("int8", False, None)] and quant.is_quantized(m.model)
