"""Decoder-only model and checkpoint loading: teacher-forced logits against transformers for
every supported family, and the checkpoint errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pidec.causal.checkpoint import load_model, read_config
from pidec.causal.generate import SuffixRow, prefill_suffixes
from pidec.causal.model import CausalConfig, CausalLM
from pidec.checkpoint import CheckpointError
from pidec.model import KVCache
from tests.causal_tiny import FAMILIES, family_for_tests, save_family, tokenizer_for_tests

torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path_factory):
    folder, hf = family_for_tests(request.param, tmp_path_factory)
    return request.param, folder, hf


def test_teacher_forced_logits_match_transformers(family):
    name, folder, hf = family
    model = load_model(folder)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 300, (3, 50), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # a right-padded row: its real positions must not see the padding
    with torch.no_grad():
        ours = model(ids, mask.bool())
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4, name


def test_shared_prefix_attention_equals_whole_rows(family):
    """Rows decoded over a prefilled prefix (log-sum-exp merge) give the logits of the whole rows."""
    name, folder, _ = family
    model = load_model(folder)
    gen = torch.Generator().manual_seed(2)
    doc = torch.randint(6, 300, (20,), generator=gen).tolist()
    tails = [torch.randint(6, 300, (n,), generator=gen).tolist() for n in (3, 7, 1)]
    prefix = model.prefill_prefix([doc])
    rows = [SuffixRow(0, t, 1) for t in tails]
    cache = KVCache(model.config.num_layers, 3, model.config.num_kv_heads, 8, model.config.head_dim, model.dtype, "cpu")
    with torch.inference_mode():
        shared = prefill_suffixes(model, prefix, rows, cache, 7)
        whole = torch.stack([model(torch.tensor([doc + t]))[0, -1] for t in tails])
    assert (shared - whole).abs().max().item() < 1e-4, name


def test_llama3_rope_scaling_is_applied(tmp_path_factory):
    folder, hf = family_for_tests("llama", tmp_path_factory)
    config = read_config(folder)
    assert config.rope_scaling["rope_type"] == "llama3"
    plain = load_model(folder)
    config.rope_scaling = None
    unscaled = CausalLM(config)
    unscaled.load_state_dict(plain.state_dict())
    ids = torch.arange(6, 66)[None]
    with torch.no_grad():
        assert (plain(ids) - unscaled(ids)).abs().max() > 1e-3  # the scaling changes the function


def test_bfloat16_weights_load(tmp_path, tmp_path_factory):
    tok = tokenizer_for_tests(tmp_path_factory)
    save_family("qwen2", tmp_path, tok, dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert next(iter(load_file(str(tmp_path / "model.safetensors")).values())).dtype == torch.bfloat16
    model = load_model(tmp_path)  # float32 by default
    assert model.dtype == torch.float32
    ids = torch.randint(6, 300, (1, 30))
    with torch.no_grad():
        ref = hf(ids).logits  # the bf16 weights, computed in float32
        assert (model(ids) - ref).abs().max().item() < 1e-4
        bf = load_model(tmp_path, dtype=torch.bfloat16)
        assert bf.dtype == torch.bfloat16
        assert (bf(ids).float() - ref).abs().max().item() < 0.5  # bf16 arithmetic, same function


def test_sharded_safetensors_load(tmp_path, tmp_path_factory):
    folder, hf = family_for_tests("smollm", tmp_path_factory)
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path)
    ids = torch.randint(6, 300, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def edited_copy(family: str, tmp_path, tmp_path_factory, weights=None, config=None):
    """A copy of `family`'s test checkpoint, its tensors edited in place by `weights(state_dict)`
    and its config.json by `config(dict)`."""
    folder, _ = family_for_tests(family, tmp_path_factory)
    dest = tmp_path / "m"
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    if weights is not None:
        sd = load_file(str(dest / "model.safetensors"))
        weights(sd)
        save_file(sd, str(dest / "model.safetensors"))
    if config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        config(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_missing_tensor_is_named(tmp_path, tmp_path_factory):
    dest = edited_copy(
        "qwen3", tmp_path, tmp_path_factory, weights=lambda sd: sd.pop("model.layers.1.self_attn.k_norm.weight")
    )
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_model(dest)


def test_misshapen_tensor_is_named(tmp_path, tmp_path_factory):
    def misshape(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # GQA: should be (32, 64)

    dest = edited_copy("llama", tmp_path, tmp_path_factory, weights=misshape)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \(64, 64\), config\.json implies \(32, 64\)"):
        load_model(dest)


def test_untied_head_missing_is_named(tmp_path, tmp_path_factory):
    dest = edited_copy("mistral", tmp_path, tmp_path_factory, weights=lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight.*tie_word_embeddings=false"):
        load_model(dest)


def test_unsupported_architecture_names_it_and_the_supported(tmp_path, tmp_path_factory):
    def other(cfg):
        cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])

    dest = edited_copy("llama", tmp_path, tmp_path_factory, config=other)
    with pytest.raises(CheckpointError, match=r"gpt_neox.*GPTNeoXForCausalLM.*llama.*qwen2.*qwen3.*mistral.*t5"):
        load_model(dest)


def test_unsupported_rope_type_is_named(tmp_path, tmp_path_factory):
    def yarn(cfg):
        cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}

    dest = edited_copy("llama", tmp_path, tmp_path_factory, config=yarn)
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        load_model(dest)


def test_generation_config_eos_list_is_read(tmp_path_factory):
    folder, _ = family_for_tests("llama", tmp_path_factory)
    tok = tokenizer_for_tests(tmp_path_factory)
    assert read_config(folder).eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_config_validation():
    with pytest.raises(ValueError, match="not a multiple"):
        CausalConfig(hidden_size=64, num_heads=4, num_kv_heads=3)


def test_attend_fused_and_written_out_agree_on_strided_inputs(monkeypatch):
    """The CPU flash kernel misreads a strided last dimension; attend copies such inputs."""
    import pidec.causal.model as causal
    from pidec.model import additive_mask

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 14, 16, generator=gen)
    k = torch.randn(3, 2, 16, 7, generator=gen).transpose(-1, -2)  # last dimension strided
    v = torch.randn(3, 2, 16, 7, generator=gen).transpose(-1, -2)
    keep = torch.rand(3, 1, 14, 7, generator=gen) > 0.3
    keep[..., 0] = True
    mask = additive_mask(keep, torch.float32)
    fused = causal.attend(q, k, v, mask, 0.25)
    monkeypatch.setattr(causal, "FLASH_CPU", None)
    plain = causal.attend(q, k, v, mask, 0.25)
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() < 1e-5
