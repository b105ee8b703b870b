"""pidec.checkpoint: transformers folders in, transformers folders out, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pidec.checkpoint import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    CheckpointError,
    hf_to_ours,
    load_model,
    ours_to_hf,
    read_state_dict,
    save,
)

from .conftest import SPECS, padded_batch, random_tokens

ATOL = 1e-4


def _inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = padded_batch([random_tokens(g, n, vocab) for n in (37, 12)])
    dec = torch.tensor([[0] + random_tokens(g, 7, vocab, low=0) for _ in range(2)])
    return ids, mask, dec


def _ours(model, vocab, seed=0):
    ids, mask, dec = _inputs(vocab, seed)
    with torch.no_grad():
        return model(ids, dec, attention_mask=mask).float()


def _theirs(hf, vocab, seed=0):
    ids, mask, dec = _inputs(vocab, seed)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits.float()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, fn) -> None:
    path = folder / SAFE_WEIGHTS
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


# -- transformers -> pidec ----------------------------------------------------------------


def test_load_transformers_folder(t5, v11):
    for v in (t5, v11):
        assert (v.folder / SAFE_WEIGHTS).is_file()
        model = load_model(v.folder)
        assert not model.training and model.dtype == torch.float32
        torch.testing.assert_close(_ours(model, v.vocab), _theirs(v.hf, v.vocab), rtol=0, atol=ATOL)


def test_load_transformers_folder_gives_the_same_parameters(variant):
    """The loaded model holds exactly the tensors transformers wrote (the reader, not the config)."""
    model = load_model(variant.folder)
    expected = variant.pid.state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_load_mt5_folder_written_by_transformers_5(mt5):
    cfg = json.loads((mt5.folder / "config.json").read_text())
    assert cfg["model_type"] == "mt5" and cfg["tie_word_embeddings"] is True and "scale_decoder_outputs" not in cfg
    model = load_model(mt5.folder)
    assert model.config.scale_decoder_outputs is False
    torch.testing.assert_close(_ours(model, mt5.vocab), _theirs(mt5.hf, mt5.vocab), rtol=0, atol=ATOL)


def test_load_mt5_folder_with_original_config(mt5, tmp_path):
    """Google's mT5 configs say tie_word_embeddings=false: no scaling, untied head."""
    folder = _copy(mt5.folder, tmp_path / "mt5")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_model(folder)
    assert model.config.scale_decoder_outputs is False and model.lm_head is not None
    torch.testing.assert_close(_ours(model, mt5.vocab), _theirs(mt5.hf, mt5.vocab), rtol=0, atol=ATOL)


def test_name_mapping_round_trips(variant):
    for ours in variant.pid.state_dict():
        hf = ours_to_hf(ours)
        assert hf_to_ours(hf) == ours
        assert hf_to_ours("model." + hf) == ours
    assert hf_to_ours("decoder.block.2.layer.1.EncDecAttention.k.weight") == "decoder.layers.2.cross_attn.k.weight"
    assert hf_to_ours("encoder.block.1.layer.1.DenseReluDense.wi_0.weight") == "encoder.layers.1.ff.wi_0.weight"
    assert hf_to_ours("decoder.block.0.layer.2.DenseReluDense.wo.weight") == "decoder.layers.0.ff.wo.weight"
    assert hf_to_ours("nonsense.weight") is None
    with pytest.raises(KeyError):
        ours_to_hf("nonsense.weight")


# -- pidec -> transformers ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5", "v11"])
def test_save_loads_in_transformers(name, request, tmp_path):
    v = request.getfixturevalue(name)
    folder = save(v.pid, tmp_path / "out")
    assert (folder / SAFE_WEIGHTS).is_file() and (folder / "config.json").is_file()
    hf = v.hf_cls.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(_theirs(hf, v.vocab), _theirs(v.hf, v.vocab), rtol=0, atol=ATOL)
    torch.testing.assert_close(_theirs(hf, v.vocab), _ours(v.pid, v.vocab), rtol=0, atol=ATOL)


def test_save_mt5_loads_in_transformers_mt5(mt5, tmp_path):
    folder = save(mt5.pid, tmp_path / "out")
    hf = mt5.hf_cls.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(_theirs(hf, mt5.vocab), _theirs(mt5.hf, mt5.vocab), rtol=0, atol=ATOL)


def test_round_trip_pidec_to_pidec(variant, tmp_path):
    folder = save(variant.pid, tmp_path / "a")
    again = load_model(folder)
    assert again.config.tie_word_embeddings == variant.pid.config.tie_word_embeddings
    assert again.config.scale_decoder_outputs == variant.pid.config.scale_decoder_outputs
    assert again.config.feed_forward_proj == variant.pid.config.feed_forward_proj
    assert again.config.num_decoder_layers == 3 and again.config.num_layers == 2
    a, b = variant.pid.state_dict(), again.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a second save of the loaded model writes the same tensors
    folder2 = save(again, tmp_path / "b")
    s1, s2 = load_file(str(folder / SAFE_WEIGHTS)), load_file(str(folder2 / SAFE_WEIGHTS))
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


# -- sharded and .bin folders -------------------------------------------------------------


def test_sharded_safetensors(v11, tmp_path):
    total = sum(p.numel() * p.element_size() for p in v11.pid.state_dict().values())
    folder = save(v11.pid, tmp_path / "sharded", max_shard_bytes=total // 4)
    assert not (folder / SAFE_WEIGHTS).exists()
    index = json.loads((folder / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    assert shards == sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert index["metadata"]["total_size"] == total
    # every tensor is in the shard the index says, and in no other
    for shard in shards:
        names = set(load_file(str(folder / shard)))
        assert names == {k for k, s in index["weight_map"].items() if s == shard}
    assert "lm_head.weight" in index["weight_map"]
    ours = load_model(folder)
    torch.testing.assert_close(_ours(ours, v11.vocab), _ours(v11.pid, v11.vocab), rtol=0, atol=0)
    hf = v11.hf_cls.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(_theirs(hf, v11.vocab), _theirs(v11.hf, v11.vocab), rtol=0, atol=ATOL)


def test_resave_unsharded_over_sharded_and_back(t5, tmp_path):
    folder = tmp_path / "f"
    save(t5.pid, folder, max_shard_bytes=4096)
    assert (folder / SAFE_INDEX).is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    save(t5.pid, folder)
    assert (folder / SAFE_WEIGHTS).is_file()
    assert not (folder / SAFE_INDEX).exists() and not list(folder.glob("model-*-of-*.safetensors"))
    save(t5.pid, folder, max_shard_bytes=4096)
    assert not (folder / SAFE_WEIGHTS).exists()  # a stale single file would shadow the shards
    torch.testing.assert_close(_ours(load_model(folder), t5.vocab), _ours(t5.pid, t5.vocab), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["t5", "v11"])
def test_pytorch_model_bin_folder(name, request, tmp_path):
    v = request.getfixturevalue(name)
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(v.folder / "config.json", folder / "config.json")
    sd = {k: t.clone() for k, t in v.hf.state_dict().items()}
    assert "encoder.embed_tokens.weight" in sd  # the aliases transformers keeps are accepted
    torch.save(sd, folder / "pytorch_model.bin")
    model = load_model(folder)
    assert (model.lm_head is None) is SPECS[name]["tie"]
    torch.testing.assert_close(_ours(model, v.vocab), _theirs(v.hf, v.vocab), rtol=0, atol=ATOL)


def test_pytorch_model_bin_that_is_not_a_state_dict(t5, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(t5.folder / "config.json", folder / "config.json")
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*expected a state dict"):
        load_model(folder)


# -- errors -------------------------------------------------------------------------------


def test_missing_tensor(v11, tmp_path):
    folder = _copy(v11.folder, tmp_path / "m")
    name = "decoder.block.2.layer.1.EncDecAttention.v.weight"
    _edit_weights(folder, lambda sd: sd.pop(name))
    with pytest.raises(
        CheckpointError, match="missing tensor decoder\\.block\\.2\\.layer\\.1\\.EncDecAttention\\.v\\.weight"
    ):
        load_model(folder)


def test_missing_embedding(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.pop("shared.weight"))
    with pytest.raises(CheckpointError, match="shared\\.weight"):
        load_model(folder)


def test_mismatched_shape(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "s")
    name = "encoder.block.1.layer.0.SelfAttention.q.weight"

    def shrink(sd):
        sd[name] = torch.zeros(16, 32)

    _edit_weights(folder, shrink)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    msg = str(err.value)
    assert name in msg and "(16, 32)" in msg and "(32, 32)" in msg


def test_unexpected_tensor(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "u")
    _edit_weights(folder, lambda sd: sd.__setitem__("encoder.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*encoder\\.mystery\\.weight"):
        load_model(folder)


def test_tensor_of_a_layer_the_config_does_not_have(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "u")
    extra = "decoder.block.3.layer.0.SelfAttention.q.weight"  # the decoder has 3 layers: 0..2
    _edit_weights(folder, lambda sd: sd.__setitem__(extra, torch.zeros(32, 32)))
    with pytest.raises(CheckpointError, match="decoder\\.block\\.3\\.layer\\.0\\.SelfAttention\\.q\\.weight"):
        load_model(folder)


def test_missing_config(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config\\.json not found"):
        load_model(folder)


def test_invalid_json_config(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "j")
    (folder / "config.json").write_text('{"d_model": 32,\n  "num_layers": }')
    with pytest.raises(CheckpointError, match="config\\.json: invalid JSON at line 2"):
        load_model(folder)


def test_bad_config_values(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "b")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["feed_forward_proj"] = "gated-gelu-new"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config\\.json: feed_forward_proj"):
        load_model(folder)


def test_not_a_t5_config(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "b")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "bert", ["BertModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'bert' is not a T5-family model"):
        load_model(folder)


def test_folder_without_weights(t5, tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(t5.folder / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="no weights found"):
        read_state_dict(folder)


def test_shard_listed_but_absent(t5, tmp_path):
    folder = save(t5.pid, tmp_path / "sh", max_shard_bytes=4096)
    index = json.loads((folder / SAFE_INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim} is listed but missing"):
        load_model(folder)


def test_corrupt_safetensors(t5, tmp_path):
    folder = _copy(t5.folder, tmp_path / "x")
    (folder / SAFE_WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="model\\.safetensors: cannot read safetensors file"):
        load_model(folder)


def test_path_that_is_a_file(t5):
    with pytest.raises(CheckpointError, match="is a file, expected a checkpoint folder"):
        load_model(t5.folder / "config.json")


def test_missing_local_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "does" / "not" / "exist")


# -- tying and scaling --------------------------------------------------------------------


def test_v11_untied_head_survives_both_directions(v11, tmp_path):
    # transformers -> pidec
    model = load_model(v11.folder)
    assert model.config.tie_word_embeddings is False and model.config.scale_decoder_outputs is False
    assert model.lm_head is not None
    assert torch.equal(model.lm_head.weight, v11.hf.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.embed.weight)
    # pidec -> transformers
    folder = save(model, tmp_path / "v11")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["scale_decoder_outputs"] is False
    assert cfg["feed_forward_proj"] == "gated-gelu" and cfg["dense_act_fn"] == "gelu_new"
    sd = load_file(str(folder / SAFE_WEIGHTS))
    assert torch.equal(sd["lm_head.weight"], v11.hf.lm_head.weight)
    hf = v11.hf_cls.from_pretrained(str(folder)).eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, v11.hf.lm_head.weight)
    assert not hf.config.scale_decoder_outputs
    # and back into pidec once more
    again = load_model(folder)
    assert torch.equal(again.lm_head.weight, v11.hf.lm_head.weight)


def test_original_t5_stays_tied_and_scaled(t5, tmp_path):
    model = load_model(t5.folder)
    assert model.config.tie_word_embeddings is True and model.config.scale_decoder_outputs is True
    assert model.lm_head is None
    folder = save(model, tmp_path / "t5")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["scale_decoder_outputs"] is True
    sd = load_file(str(folder / SAFE_WEIGHTS))
    assert "lm_head.weight" not in sd
    hf = t5.hf_cls.from_pretrained(str(folder)).eval()
    assert hf.config.scale_decoder_outputs
    assert hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()
    again = load_model(folder)
    assert again.lm_head is None and again.config.scale_decoder_outputs is True
    torch.testing.assert_close(_ours(again, t5.vocab), _theirs(t5.hf, t5.vocab), rtol=0, atol=ATOL)


def test_tied_checkpoint_with_a_copy_of_the_head_stays_tied(t5, tmp_path):
    """A tied checkpoint that stores lm_head.weight equal to the embedding is still tied."""
    folder = _copy(t5.folder, tmp_path / "t")
    _edit_weights(folder, lambda sd: sd.__setitem__("lm_head.weight", sd["shared.weight"].clone()))
    model = load_model(folder)
    assert model.lm_head is None and model.config.scale_decoder_outputs is True
    torch.testing.assert_close(_ours(model, t5.vocab), _theirs(t5.hf, t5.vocab), rtol=0, atol=ATOL)


def test_tied_but_unscaled_model_saves_loadably(t5, tmp_path):
    """tie=True with scale=False is written untied with a copy of the embedding."""
    import copy

    model = copy.deepcopy(t5.pid)
    model.config = copy.deepcopy(model.config)
    model.config.scale_decoder_outputs = False
    folder = save(model, tmp_path / "u")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    sd = load_file(str(folder / SAFE_WEIGHTS))
    assert torch.equal(sd["lm_head.weight"], sd["shared.weight"])
    again = load_model(folder)
    torch.testing.assert_close(_ours(again, t5.vocab), _ours(model, t5.vocab), rtol=0, atol=ATOL)
    hf = t5.hf_cls.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(_theirs(hf, t5.vocab), _ours(model, t5.vocab), rtol=0, atol=ATOL)
    # and it really is a different model from the scaled original
    assert (_ours(model, t5.vocab) - _ours(t5.pid, t5.vocab)).abs().max() > 0.1


# -- dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5", "v11"])
def test_bfloat16_load(name, request):
    v = request.getfixturevalue(name)
    model = load_model(v.folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ours = _ours(model, v.vocab)
    ref = _theirs(v.hf, v.vocab)
    assert torch.isfinite(ours).all()
    # bfloat16 has ~3 significant digits: close, not equal
    err = (ours - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item()
    assert err > 0  # it really ran in reduced precision
    # greedy next tokens mostly agree
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75


@pytest.mark.parametrize("name", ["t5", "v11"])
def test_bfloat16_generation_runs(name, request):
    from pidec.generate import Row, decode, encode

    v = request.getfixturevalue(name)
    model = load_model(v.folder, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    docs = [random_tokens(g, n, v.vocab) for n in (30, 11)]
    rows = [Row(0, [0, 4, 5], 6), Row(0, [0], 4), Row(1, [0, 9], 5)]
    cross = encode(model, docs)
    assert cross.k[0].dtype == torch.bfloat16
    for nb in (1, 2):
        out = decode(model, cross, rows, num_beams=nb)
        assert len(out.tokens) == 3
        assert all(len(t) <= r.max_new_tokens and all(0 <= x < v.vocab for x in t) for t, r in zip(out.tokens, rows))
    # the first greedy token (one step, no accumulated drift) agrees with float32 on most rows
    fp32 = load_model(v.folder)
    first = [Row(r.doc, r.prefix, 1) for r in rows]
    a = decode(model, cross, first, eos_token_id=None).tokens
    b = decode(fp32, encode(fp32, docs), first, eos_token_id=None).tokens
    assert sum(x == y for x, y in zip(a, b)) >= 2


def test_bfloat16_save_and_reload(t5, tmp_path):
    model = load_model(t5.folder, dtype=torch.bfloat16)
    folder = save(model, tmp_path / "bf16")
    sd = load_file(str(folder / SAFE_WEIGHTS))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    again = load_model(folder, dtype=torch.bfloat16)
    for k, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], t), k


# -- hostile folders (issue 20) and first-hour mistakes (issue 19) ----------------------------


def _write_config(folder: Path, text: str | bytes) -> None:
    path = folder / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2, 3]", "expected a JSON object of config fields, found a JSON array"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8 text"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('"t5"', "found a JSON string"),
    ],
    ids=["array", "binary", "deeply-nested", "string"],
)
def test_config_json_that_is_not_a_config(t5, tmp_path, text, match):
    folder = _copy(t5.folder, tmp_path / "c")
    _write_config(folder, text)
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


@pytest.mark.parametrize(
    "field, value",
    [("num_layers", 2.5), ("d_model", "32"), ("num_heads", True), ("d_ff", None), ("eos_token_id", 10**6)],
)
def test_config_sizes_must_be_integers_in_range(t5, tmp_path, field, value):
    folder = _copy(t5.folder, tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    if value is None:
        cfg[field] = [64]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config\\.json: config {field}"):
        load_model(folder)


@pytest.mark.parametrize(
    "field, value, held",
    [
        ("num_layers", 10**6, "2 encoder layers"),
        ("num_decoder_layers", 10**5, "3 decoder layers"),
        ("d_model", 10**6, "32 embedding columns"),
    ],
)
def test_absurd_config_size_is_refused_by_name_before_building(t5, tmp_path, field, value, held):
    import time

    folder = _copy(t5.folder, tmp_path / "big")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"config\\.json {field}={value}, but the weights hold {held}"):
        load_model(folder)
    assert time.perf_counter() - t0 < 10  # refused from the header, not built layer by layer


def test_config_that_does_not_fit_memory_is_refused(t5, monkeypatch):
    from pidec import checkpoint

    monkeypatch.setattr(checkpoint, "available_memory", lambda device: 1000)
    with pytest.raises(CheckpointError, match="GiB for its weights in float32 .* are free on cpu"):
        load_model(t5.folder)


def test_parameter_count_matches_the_built_model(variant):
    assert variant.pid.config.parameter_count() == sum(p.numel() for p in variant.pid.parameters())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_weights_are_refused(t5, tmp_path, dtype):
    folder = _copy(t5.folder, tmp_path / "i")
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    _edit_weights(folder, lambda sd: sd.__setitem__(name, torch.ones(sd[name].shape, dtype=dtype)))
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored as"):
        load_model(folder)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder / "config.json")
    torch.save(load_file(str(folder / SAFE_WEIGHTS)), bin_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored as torch"):
        load_model(bin_folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused(t5, tmp_path, bad):
    folder = _copy(t5.folder, tmp_path / "n")
    name = "decoder.block.1.layer.2.DenseReluDense.wo.weight"

    def poison(sd):
        sd[name][3, 4] = bad

    _edit_weights(folder, poison)
    with pytest.raises(CheckpointError, match=f"tensor {name} holds 1 NaN or Inf value"):
        load_model(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_matches_the_element_check(dtype):
    from pidec.checkpoint import all_finite

    big = torch.finfo(dtype).max
    cases = [
        torch.zeros(0, dtype=dtype),
        torch.randn(64, 32).to(dtype),
        torch.full((1000,), big, dtype=dtype),  # finite, but its sum overflows
        torch.tensor([big, -big, big], dtype=dtype),
    ]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(64, 32).to(dtype)
        t[5, 7] = bad
        cases.append(t)
    mixed = torch.randn(8).to(dtype)
    mixed[1], mixed[2] = float("inf"), -float("inf")  # their sum is NaN
    cases.append(mixed)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


def test_loading_does_not_import_dynamo(t5):
    """Building the model on meta skips torch.nn.init (whose first call on meta tensors imports
    torch._dynamo, seconds of every load)."""
    import subprocess
    import sys

    code = (
        "import sys, pidec; from pidec.checkpoint import load_model; "
        f"load_model({str(t5.folder)!r}); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_meta_build_restores_init():
    from torch import nn

    from pidec.model import on_meta_without_init

    before = nn.init.normal_
    with on_meta_without_init():
        layer = nn.Linear(4, 3)
    assert layer.weight.is_meta and nn.init.normal_ is before
    t = torch.zeros(1000)
    nn.init.normal_(t)
    assert t.std() > 0.5  # real init works again after the block


@pytest.mark.parametrize("device, match", [("foo", "not a device name"), ("cuda:7", "cuda:7")])
def test_unknown_or_absent_device(t5, device, match):
    from pidec.checkpoint import check_device
    from pidec.errors import InputError

    with pytest.raises(InputError, match=match):
        load_model(t5.folder, device=device)
    with pytest.raises(InputError, match=match):
        check_device(device)


def test_path_that_looks_local_never_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from pidec.checkpoint import looks_local, resolve

    def no_network(*a, **k):
        raise AssertionError("sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/nope", "./nope", "../nope", "/nope/x", "a/b/c", "nope/", "~/nope", "runs\\nope", "a b"):
        assert looks_local(path), path
        with pytest.raises(CheckpointError, match="no such checkpoint folder"):
            resolve(path)
    with pytest.raises(CheckpointError, match="runs/nope: no such checkpoint folder \\(runs exists, nope does not\\)"):
        resolve("runs/nope")
    for hub_id in ("t5-small", "google/flan-t5-small"):
        assert not looks_local(hub_id)


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    from pidec.checkpoint import resolve

    def offline(*a, **k):
        raise OSError("Cannot connect.\nCheck your connection\n  and retry")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve("someone/model")
    assert "\n" not in str(err.value) and "hub failed: Cannot connect. Check your connection and retry" in str(
        err.value
    )


def test_run_folder_given_as_a_checkpoint_names_its_checkpoints(t5, tmp_path):
    run = tmp_path / "prod"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="training run folder with no checkpoint in it yet"):
        load_model(run)
    _copy(t5.folder, run / "final")
    _copy(t5.folder, run / "best")
    _copy(t5.folder, run / "checkpoint-20")
    with pytest.raises(CheckpointError) as err:
        load_model(run)
    msg = str(err.value)
    assert "is a pidec training run folder, not a checkpoint" in msg
    assert str(run / "final") in msg and str(run / "best") in msg and str(run / "checkpoint-20") in msg
    (run / "run_config.json").unlink()  # recognised by its checkpoints alone
    with pytest.raises(CheckpointError, match="training run folder"):
        load_model(run)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_permissions_of_an_ordinary_write(t5, tmp_path, umask):
    import os
    import stat

    from pidec.checkpoint import file_mode, write_atomic

    old = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        folders = [save(t5.pid, tmp_path / "one"), save(t5.pid, tmp_path / "sharded", max_shard_bytes=4096)]
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_atomic(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == expected
    for folder in folders:
        files = list(folder.iterdir())
        assert any(f.suffix == ".safetensors" for f in files)
        assert not [f.name for f in files if f.name.startswith(".")]  # no temporary file left
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == expected, f.name


def test_tokenizer_config_alone_is_refused(tmp_path):
    from pidec.checkpoint import load_tokenizer

    from .shared_data import T5_TOKENIZER, require

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(require(T5_TOKENIZER) / "tokenizer_config.json", folder / "tokenizer_config.json")
    with pytest.raises(
        CheckpointError, match="tokenizer_config.json but no vocabulary \\(tokenizer.json or spiece.model"
    ):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
        load_tokenizer(folder)


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    from transformers import ByT5Tokenizer

    from pidec.checkpoint import check_tokenizer, load_tokenizer
    from pidec.model import T5Config

    from .shared_data import T5_TOKENIZER, require

    t5_tok = load_tokenizer(require(T5_TOKENIZER))
    cfg = T5Config(vocab_size=32128)
    check_tokenizer(t5_tok, cfg)  # 32100 tokens, 28 spare rows: the T5 checkpoints' own
    with pytest.raises(CheckpointError, match="the tokenizer has 384 tokens but the model's embedding has 32128 rows"):
        check_tokenizer(ByT5Tokenizer(), cfg)
    with pytest.raises(CheckpointError, match="32100 tokens but the model's embedding has 1000 rows"):
        check_tokenizer(t5_tok, T5Config(vocab_size=1000))
    with pytest.raises(CheckpointError, match="the tokenizer's eos_token_id is 1, config.json says 5"):
        check_tokenizer(t5_tok, T5Config(vocab_size=32128, eos_token_id=5))
    with pytest.raises(CheckpointError, match="the tokenizer's pad_token_id is 0, config.json says 7"):
        check_tokenizer(t5_tok, T5Config(vocab_size=32128, pad_token_id=7))
