"""`pidec.packing`: oneDNN-packed float32 linear weights for CPU inference.

The packed path must compute the same products as the plain one (to float32 rounding), be
taken only where it applies (CPU, float32, autograd off, a plain weight), never multiply by a
stale copy after the weight changes, and be what `pidec.load` sets up by default."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pidec
from pidec import packing
from pidec.generate import compile_steps, decode, encode
from pidec.packing import Linear

from .conftest import random_docs, random_rows
from .shared_data import tiny_checkpoint

pytestmark = pytest.mark.skipif(not packing.available(), reason="torch without oneDNN (torch.backends.mkldnn)")


def _teacher_forced(model, gen_seed: int = 0):
    gen = torch.Generator().manual_seed(gen_seed)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (2, 11), generator=gen)
    dec = torch.randint(2, vocab, (2, 6), generator=gen)
    with torch.no_grad():
        return model(ids, dec)


@pytest.fixture
def pair(variant):
    """(plain, packed) float32 copies of one tiny model."""
    plain = copy.deepcopy(variant.pid).float().eval()
    packed = copy.deepcopy(plain)
    n = packing.pack(packed)
    layers = [m for m in packed.modules() if isinstance(m, Linear)]
    assert n == len(layers) + (1 if packed.lm_head is None else 0)  # the tied head counts once more
    return variant, plain, packed


def test_packed_forward_matches_plain(pair):
    _, plain, packed = pair
    assert packing.is_packed(packed) and not packing.is_packed(plain)
    want, got = _teacher_forced(plain), _teacher_forced(packed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_path_is_really_taken(pair, monkeypatch):
    _, plain, packed = pair
    calls = []
    real = packing.packed_product
    monkeypatch.setattr(packing, "packed_product", lambda x, w: calls.append(tuple(w.shape)) or real(x, w))
    _teacher_forced(plain)
    assert calls == []  # an unpacked model never goes there
    _teacher_forced(packed)
    layers = [m for m in packed.modules() if isinstance(m, Linear)]
    assert len(calls) >= len(layers)  # every linear layer at least once, the head included
    head = packed.embed.weight if packed.lm_head is None else packed.lm_head.weight
    assert tuple(head.shape) in calls


def test_packed_greedy_decoding_gives_the_same_tokens(pair):
    v, plain, packed = pair
    docs = random_docs(v.vocab, seed=140)
    rows = random_rows(v.vocab, seed=240)
    with torch.inference_mode():
        want = decode(plain, encode(plain, docs), rows).tokens
        got = decode(packed, encode(packed, docs), rows).tokens
    assert got == want
    assert len({tuple(t) for t in got}) > 3  # the rows really differ


def test_training_and_other_dtypes_take_the_plain_path(pair, monkeypatch):
    _, _, packed = pair

    def fail(x, w):
        raise AssertionError("packed path taken")

    monkeypatch.setattr(packing, "packed_product", fail)
    gen = torch.Generator().manual_seed(3)
    vocab = packed.config.vocab_size
    ids = torch.randint(2, vocab, (2, 9), generator=gen)
    dec = torch.randint(2, vocab, (2, 5), generator=gen)
    packed.train()
    packed(ids, dec).sum().backward()  # autograd on: the weight itself, so gradients flow
    assert packed.decoder.layers[0].ff.wo.weight.grad is not None
    packed.eval()
    with torch.no_grad():
        copy.deepcopy(packed).double()(ids, dec)  # float64: plain path


def test_a_weight_changed_after_packing_is_packed_again(pair):
    _, plain, packed = pair
    before = _teacher_forced(packed)
    with torch.no_grad():  # in place (an optimizer step does this): the version counter moves
        for model in (plain, packed):
            model.decoder.layers[0].ff.wo.weight.mul_(3.0)
    changed = _teacher_forced(packed)
    assert not torch.allclose(changed, before, atol=1e-3)
    torch.testing.assert_close(changed, _teacher_forced(plain), rtol=1e-4, atol=1e-4)
    # a new tensor in the layer's place
    for model in (plain, packed):
        layer = model.decoder.layers[-1].ff.wo
        layer.weight = nn.Parameter(layer.weight.detach() * -1.0)
    torch.testing.assert_close(_teacher_forced(packed), _teacher_forced(plain), rtol=1e-4, atol=1e-4)
    # a write through .data bumps no version counter: pack() again takes it in
    for model in (plain, packed):
        model.decoder.layers[0].ff.wo.weight.data.mul_(0.5)
    packing.pack(packed)
    torch.testing.assert_close(_teacher_forced(packed), _teacher_forced(plain), rtol=1e-4, atol=1e-4)


def test_unpack_frees_the_copies_and_compile_unpacks(pair):
    _, _, packed = pair
    weights = sum(m.weight.numel() * 4 for m in packed.modules() if isinstance(m, Linear))
    if packed.lm_head is None:
        weights += packed.embed.weight.numel() * 4
    assert packing.packed_bytes(packed) == weights  # the copy is as large as the weights
    packing.unpack(packed)
    assert not packing.is_packed(packed) and packing.packed_bytes(packed) == 0
    packing.pack(packed)
    compile_steps(packed)  # inductor takes its own layout: the packed ops are eager-only
    assert not packing.is_packed(packed) and packing.packed_bytes(packed) == 0


def test_load_packs_by_default_on_the_cpu(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt", seed=0, max_input_length=64, eos_boost=4.0)
    packed = pidec.load(folder)
    plain = pidec.load(folder, pack_weights=False)
    assert packing.is_packed(packed.model) and not packing.is_packed(plain.model)
    doc = "User: I need a cheap hotel in the north. System: The Acorn guest house has rooms."
    prompts = ["hotel price range", "hotel area", "train day"]
    assert packed.generate(doc, prompts, max_new_tokens=4) == plain.generate(doc, prompts, max_new_tokens=4)
    assert not packing.is_packed(pidec.load(folder, dtype="bfloat16").model)  # only float32 is packed
    with pytest.raises(pidec.InputError, match="float32"):
        pidec.load(folder, dtype="bfloat16", pack_weights=True)


def test_merging_lora_into_a_packed_model_uses_the_merged_weights(pair):
    pytest.importorskip("peft")
    from pidec import lora

    _, plain, packed = pair
    for model in (plain, packed):
        lora.add_lora(model, r=2, alpha=4.0)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():  # the same trained adapter in both (B no longer zero)
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.eval()
    with_adapter = _teacher_forced(packed)  # the frozen base weight packed, the deltas beside it
    torch.testing.assert_close(with_adapter, _teacher_forced(plain), rtol=1e-4, atol=1e-4)
    for model in (plain, packed):
        lora.merge(model)
    merged = _teacher_forced(packed)
    torch.testing.assert_close(merged, _teacher_forced(plain), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)
