"""LoRA through PEFT on our T5: training touches only the adapters, merging and saving keep the
logits, and the files are PEFT's own layout (transformers + PEFT load them, and the reverse)."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import pidec
from pidec import checkpoint, lora
from pidec.checkpoint import CheckpointError
from pidec.cli import app
from pidec.generate import Row, decode, encode
from pidec.packing import Linear

from .conftest import get_variant
from .shared_data import tiny_checkpoint

runner = CliRunner()
DOC = "User: a cheap hotel in the north please. System: The Acorn it is."


def batch(vocab: int, seed: int = 0):
    """Two documents (the second padded) and two teacher-forced decoder rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    dec = torch.randint(2, vocab, (2, 5), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


def logits(model, ids, mask, dec) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids, dec, mask)


def perturb(model, seed: int = 0, scale: float = 0.5):
    """Give lora_B (zero at init) large random values, so the adapter changes the outputs a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("lora_base"), seed=3, max_input_length=40)


@pytest.fixture(scope="module")
def adapter_folder(base_folder, tmp_path_factory):
    """An adapter on the tiny checkpoint, saved without a tokenizer (the base folder has it)."""
    model = perturb(lora.add_lora(checkpoint.load_model(base_folder), r=4, alpha=8, targets=["q", "v", "wi_0"]))
    return lora.save_adapter(model, tmp_path_factory.mktemp("lora_adapter") / "adapter", base_folder), model


def test_training_moves_only_the_adapters(v11):
    model = lora.add_lora(copy.deepcopy(v11.pid), r=4, targets=["q", "v", "wo"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    # 2 encoder layers x (q, v, wo) + 3 decoder layers x (self q, v, cross q, v, wo), A and B each
    assert trainable == lora_names and len(trainable) == 2 * (2 * 3 + 3 * 5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    ids, mask, dec = batch(v11.vocab)
    labels = torch.randint(2, v11.vocab, dec.shape, generator=torch.Generator().manual_seed(1))
    before = logits(model, ids, mask, dec)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(ids, dec, mask).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (logits(model, ids, mask, dec) - before).abs().max() > 1e-3
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n


def test_decoding_engine_uses_the_adapters(v11):
    base = copy.deepcopy(v11.pid)
    adapted = perturb(lora.add_lora(copy.deepcopy(v11.pid), r=4, targets=["q", "k", "v", "o", "wi_0", "wo"]))
    merged = lora.merge(copy.deepcopy(adapted))
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(2, v11.vocab, (n,), generator=g).tolist() for n in (12, 7)]
    rows = [Row(0, [0, 5, 6], 6), Row(0, [0, 9], 6), Row(1, [0, 7, 8, 3], 6)]

    def run(model):
        return decode(model.eval(), encode(model, docs), rows, eos_token_id=None).tokens

    out = run(adapted)
    assert out == run(merged)
    assert out != run(base)
    assert decode(adapted, encode(adapted, docs), rows, num_beams=2, eos_token_id=None).tokens


def test_merge_gives_a_plain_model_with_the_same_logits(v11):
    adapted = perturb(lora.add_lora(copy.deepcopy(v11.pid), r=8, alpha=4.0, targets=["q", "v", "wi_1"]))
    ids, mask, dec = batch(v11.vocab)
    expected = logits(adapted, ids, mask, dec)
    assert (expected - logits(v11.pid, ids, mask, dec)).abs().max() > 1e-2
    merged = lora.merge(adapted)
    torch.testing.assert_close(logits(merged, ids, mask, dec), expected, rtol=1e-5, atol=1e-5)
    assert not lora.lora_layers(merged) and not hasattr(merged, "peft_config")
    assert type(merged.decoder.layers[0].cross_attn.v) is Linear
    assert merged.state_dict().keys() == v11.pid.state_dict().keys()
    assert all(p.requires_grad for p in merged.parameters())
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, v11.pid.state_dict()[n])}
    assert changed and all(n.split(".")[-2] in ("q", "v", "wi_1") for n in changed)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.merge(merged)


def test_save_and_load_round_trip(v11, tmp_path):
    model = perturb(lora.add_lora(copy.deepcopy(v11.pid), r=4, alpha=16, targets=["k", "o"], dropout=0.1))
    folder = lora.save_adapter(model, tmp_path / "adapter", v11.folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(v11.folder.resolve())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA",
        "SEQ_2_SEQ_LM",
        4,
        16,
    )
    assert config["target_modules"] == ["k", "o"] and config["lora_dropout"] == 0.1
    names = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert "base_model.model.decoder.block.2.layer.1.EncDecAttention.k.lora_A.weight" in names
    assert "base_model.model.encoder.block.0.layer.0.SelfAttention.o.lora_B.weight" in names
    assert len(names) == 2 * 2 * (2 + 3 * 2)

    ids, mask, dec = batch(v11.vocab)
    expected = logits(model, ids, mask, dec)
    loaded = lora.load_adapter(folder)
    torch.testing.assert_close(logits(loaded, ids, mask, dec), expected, rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, _ in loaded.named_parameters() if ".lora_" in n
    }
    given = lora.load_adapter(folder, base=copy.deepcopy(v11.pid), dtype=torch.float64)
    assert given.dtype == torch.float64
    torch.testing.assert_close(logits(given, ids, mask, dec).float(), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_errors(v11, tmp_path):
    model = perturb(lora.add_lora(copy.deepcopy(v11.pid), r=2))
    folder = lora.save_adapter(model, tmp_path / "adapter", tmp_path / "gone")
    with pytest.raises(CheckpointError, match=r"base_model_name_or_path .*gone.* cannot be loaded.*pass base="):
        lora.load_adapter(folder)
    lora.save_adapter(model, folder, None)
    with pytest.raises(CheckpointError, match="base_model_name_or_path is empty"):
        lora.load_adapter(folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
        lora.load_adapter(folder, base=v11.folder)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.load_adapter(folder, base=model)
    small = copy.deepcopy(v11.pid)
    small.decoder.layers = small.decoder.layers[:2]
    with pytest.raises(CheckpointError, match=r"decoder\.block\.2\..* which the base model does not have"):
        lora.load_adapter(folder, base=small)


@pytest.mark.parametrize(
    "name, targets", [("t5", ["q", "k", "v", "o", "wi", "wo"]), ("v11", ["q", "v", "wi_0", "wi_1", "wo"])]
)
def test_transformers_and_peft_read_our_adapter_and_we_read_theirs(name, targets, tmp_path_factory, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    v = get_variant(name, tmp_path_factory)
    ids, mask, dec = batch(v.vocab)

    ours = perturb(lora.add_lora(checkpoint.load_model(v.folder), r=4, alpha=8, targets=targets))
    lora.save_adapter(ours, tmp_path / "ours", v.folder)
    hf = PeftModel.from_pretrained(v.hf_cls.from_pretrained(str(v.folder)), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    expected = logits(ours, ids, mask, dec)
    assert (expected - logits(v.pid, ids, mask, dec)).abs().max() > 1e-2
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)

    # an adapter PEFT trained on the transformers model, on the cross-attention only (a regex)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=r".*EncDecAttention\.(q|v)", task_type="SEQ_2_SEQ_LM")
    hf = perturb(get_peft_model(v.hf_cls.from_pretrained(str(v.folder)), cfg), seed=1).eval()
    hf.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    loaded = lora.load_adapter(tmp_path / "theirs", base=v.folder)
    assert all(".cross_attn." in n for n in lora.lora_layers(loaded)) and len(lora.lora_layers(loaded)) == 6
    torch.testing.assert_close(logits(loaded, ids, mask, dec), theirs, rtol=1e-5, atol=1e-5)
    # re-saved, only those layers are named: full transformers names, not q, v everywhere
    lora.save_adapter(loaded, tmp_path / "again", v.folder)
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())["target_modules"]
    assert again == sorted(f"decoder.block.{i}.layer.1.EncDecAttention.{p}" for i in range(3) for p in "qv")


def test_export_merged_and_pidec_load(adapter_folder, base_folder, tmp_path):
    folder, adapted = adapter_folder
    ids, mask, dec = batch(1000)
    expected = logits(adapted, ids, mask, dec)
    assert lora.is_adapter(folder) and not lora.is_adapter(base_folder)

    m = pidec.load(folder)  # base + adapter, merged; the tokenizer comes from the base folder
    assert not lora.lora_layers(m.model)
    torch.testing.assert_close(logits(m.model, ids, mask, dec), expected, rtol=1e-5, atol=1e-5)
    answers = m.generate(DOC, ["hotel area", "hotel price range"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # in bfloat16 the merge is still done in float32: one rounding of the merged weights
    bf16 = pidec.load(folder, dtype="bfloat16").model
    assert bf16.dtype == torch.bfloat16
    for name, w in m.model.state_dict().items():
        assert torch.equal(bf16.state_dict()[name], w.bfloat16()), name

    out = lora.export_merged(folder, tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert any((out / f).is_file() for f in lora.TOKENIZER_FILES) and not lora.is_adapter(out)
    exported = pidec.load(out)
    torch.testing.assert_close(logits(exported.model, ids, mask, dec), expected, rtol=1e-5, atol=1e-5)
    assert exported.generate(DOC, ["hotel area", "hotel price range"], max_new_tokens=3) == answers


def _one_line_error(args) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.stderr.strip().count("\n") == 0, r.stderr
    return r.stderr


def test_cli_export(adapter_folder, base_folder, tmp_path):
    folder, adapted = adapter_folder
    ids, mask, dec = batch(1000)
    r = runner.invoke(app, ["export", "--checkpoint", str(folder), "--out", str(tmp_path / "m"), "--merge-lora"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout
    torch.testing.assert_close(
        logits(checkpoint.load_model(tmp_path / "m"), ids, mask, dec),
        logits(adapted, ids, mask, dec),
        rtol=1e-5,
        atol=1e-5,
    )

    # a plain checkpoint re-saved in bfloat16, tokenizer included
    r = runner.invoke(
        app, ["export", "--checkpoint", str(base_folder), "--out", str(tmp_path / "b"), "--dtype", "bf16"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    saved = load_file(str(tmp_path / "b" / "model.safetensors"))
    base = checkpoint.read_state_dict(base_folder)
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k].bfloat16()) for k in base)
    assert (tmp_path / "b" / "tokenizer.json").is_file() or (tmp_path / "b" / "spiece.model").is_file()


def test_cli_export_errors(adapter_folder, base_folder, tmp_path):
    folder, _ = adapter_folder
    out = str(tmp_path / "out")
    assert "must be merged" in _one_line_error(["export", "--checkpoint", str(folder), "--out", out])
    assert "not a LoRA adapter" in _one_line_error(
        ["export", "--checkpoint", str(base_folder), "--out", out, "--merge-lora"]
    )
    assert "no such folder" in _one_line_error(["export", "--checkpoint", str(tmp_path / "nope"), "--out", out])
    assert "must differ" in _one_line_error(["export", "--checkpoint", str(base_folder), "--out", str(base_folder)])
    assert "dtype" in _one_line_error(["export", "--checkpoint", str(base_folder), "--out", out, "--dtype", "int3"])
    orphan = tmp_path / "orphan"
    shutil.copytree(folder, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted_base")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    err = _one_line_error(["export", "--checkpoint", str(orphan), "--out", out, "--merge-lora"])
    assert "deleted_base" in err and "cannot be loaded" in err
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_rank(v11, t5):
    model = copy.deepcopy(v11.pid)
    with pytest.raises(ValueError, match=r"unknown LoRA target 'qq': valid names are q, k, v, o, wi, wi_0"):
        lora.add_lora(model, r=4, targets=["q", "qq"])
    with pytest.raises(ValueError, match=r"'wi' matches no layer .*gated-gelu.*wi_0, wi_1, wo"):
        lora.add_lora(model, r=4, targets=["wi"])
    with pytest.raises(ValueError, match=r"'wi_0' matches no layer .*relu.*layers are q, k, v, o, wi, wo"):
        lora.add_lora(copy.deepcopy(t5.pid), r=4, targets=["wi_0"])
    for r in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="r must be an integer >= 1"):
            lora.add_lora(model, r=r)
    with pytest.raises(ValueError, match="non-empty list"):
        lora.add_lora(model, r=4, targets="q")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lora.add_lora(model, r=4, alpha=0)
    assert not lora.lora_layers(model), "a refused call must leave the model untouched"
    lora.add_lora(model, r=4)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(model, r=4)


def test_adapter_files_get_ordinary_permissions(adapter_folder):
    import os
    import pathlib
    import stat

    folder, _ = adapter_folder
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((pathlib.Path(folder) / "adapter_model.safetensors").stat().st_mode)
    assert mode == 0o666 & ~umask  # what an ordinary write gives, not safetensors' 0600
