"""`pidec.load` on decoder-only checkpoints: dispatch by model_type, int8 and packed weights,
the command line, and bad input named clearly."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import pidec
from pidec import packing
from pidec.causal.api import CausalModel
from pidec.causal.layouts import Template
from pidec.cli import app
from pidec.errors import InputError
from tests.causal_tiny import family_for_tests
from tests.shared_data import tiny_checkpoint

torch.set_num_threads(1)
DOC = "User: I need a cheap hotel in the north for 3 nights. System: The Acorn has rooms."
PROMPTS = ["hotel price range", "hotel area"]


@pytest.fixture
def llama(tmp_path_factory):
    return family_for_tests("llama", tmp_path_factory)[0]


def test_load_picks_the_model_by_model_type(llama, tmp_path_factory):
    model = pidec.load(llama)
    assert isinstance(model, CausalModel) and model.config.model_type == "llama"
    for family in ("qwen2", "qwen3", "mistral"):
        assert pidec.load(family_for_tests(family, tmp_path_factory)[0]).config.model_type == family


def test_packed_and_unpacked_agree(llama):
    packed = pidec.load(llama)
    plain = pidec.load(llama, pack_weights=False)
    if packing.available():
        assert packing.is_packed(packed.model)
    assert not packing.is_packed(plain.model)
    assert packed.generate(DOC, PROMPTS, max_new_tokens=6) == plain.generate(DOC, PROMPTS, max_new_tokens=6)


def test_int8_loads_and_decodes(tmp_path_factory):
    folder, _ = family_for_tests("qwen2", tmp_path_factory)  # q/k/v biases go through the int8 layers too
    model = pidec.load(folder, quantize="int8")
    assert model.model.quantization["layers"] == 2 * 7
    out = model.generate(DOC, PROMPTS, max_new_tokens=5, return_details=True)
    assert len(out.outputs) == 2 and out.usage["output_tokens"] > 0  # one document: a flat list


def test_too_long_is_an_error_or_cut_and_reported(llama):
    model = pidec.load(llama, max_input_length=40)
    long_doc = DOC * 3
    with pytest.raises(InputError, match=r"document \+ prompt is \d+ tokens, longer than the model's limit of 40"):
        model.generate(long_doc, PROMPTS, max_new_tokens=4)
    for side in ("left", "right"):
        result = model.generate(long_doc, PROMPTS, max_new_tokens=4, truncate=side, return_details=True)
        (cut,) = result.truncations
        assert cut.side == side and cut.kept_tokens <= 40 < cut.original_tokens
    with pytest.raises(InputError, match=r"document prefix is \d+ tokens, longer than the model's limit of 40"):
        model.encode(long_doc)
    enc = model.encode(long_doc, truncate="right")
    assert len(enc.tokens) <= 40 < enc.truncation.original_tokens
    with pytest.raises(InputError, match=r"prompt 0: document \+ prompt is \d+ tokens, longer than .* 40"):
        model.generate(enc, ["a prompt long enough to go past the limit of forty tokens here"])


def test_sliding_window_is_refused_by_name(tmp_path_factory):
    folder, _ = family_for_tests("mistral", tmp_path_factory)  # sliding_window 160
    model = pidec.load(folder)
    with pytest.raises(InputError, match=r"limit of 160 \(the model's sliding_window of 160"):
        model.generate(DOC * 5, PROMPTS, max_new_tokens=4)
    with pytest.raises(InputError, match=r"max_new_tokens 150 = \d+, over the model's sliding_window of 160"):
        model.generate(DOC, PROMPTS, max_new_tokens=150)


def test_bad_input_is_named(llama, tmp_path):
    model = pidec.load(llama)
    with pytest.raises(InputError, match="empty prompt list"):
        model.generate(DOC, [])
    with pytest.raises(InputError, match=r"prefix_template .* has no \{document\} field"):
        model.generate(DOC, PROMPTS, prefix_template="Read this:\n")
    with pytest.raises(InputError, match=r"row_template .* has no \{prompt\} field"):
        model.generate(DOC, PROMPTS, row_template="Answer:")
    with pytest.raises(InputError, match="beam search is not implemented for decoder-only models"):
        model.generate(DOC, PROMPTS, num_beams=2)
    with pytest.raises(InputError, match="unknown layout 'seq'"):
        model.generate(DOC, PROMPTS, layout="seq")
    with pytest.raises(InputError, match="unknown option"):
        model.generate(DOC, PROMPTS, temprature=0.5)
    # a tokenizer without a chat template, asked for one
    model.tokenizer.chat_template = None
    try:
        with pytest.raises(InputError, match="tokenizer has no chat template"):
            model.generate(DOC, PROMPTS, chat=True)
    finally:
        model.tokenizer = pidec.load(llama).tokenizer


def test_save_pretrained_round_trips(llama, tmp_path):
    model = pidec.load(llama, pack_weights=False)
    model.save_pretrained(tmp_path / "out")
    again = pidec.load(tmp_path / "out")
    assert isinstance(again, CausalModel)
    assert again.generate(DOC, PROMPTS, max_new_tokens=6) == model.generate(DOC, PROMPTS, max_new_tokens=6)


def test_cli_generate(llama, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    args = ["generate", "--model", str(llama), "--document", str(doc), "--max-new-tokens", "5"]
    res = CliRunner().invoke(app, args + ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["outputs"] == pidec.load(llama).generate(DOC, PROMPTS, max_new_tokens=5)
    bad = CliRunner().invoke(app, args + ["--prompt", "x", "--num-beams", "3"])
    assert bad.exit_code == 2 and "beam search" in bad.output


def test_template_defaults_and_chat_rows_are_the_models_view(llama):
    model = pidec.load(llama)
    tok = model.tokenizer
    chat = Template(chat=True)
    ids = chat.ids(tok, DOC, PROMPTS[0])
    assert (
        ids
        == tok.apply_chat_template(
            [{"role": "user", "content": f"{DOC}\n\n{PROMPTS[0]}"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )
    assert Template().ids(tok, DOC, PROMPTS[0])[0] == tok.bos_token_id  # plain rows get the tokenizer's BOS


def test_cli_bench_arch_tiny(tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", "--arch", "tiny", "--workload", "qa", "--docs", "1", "--repeats", "1"]
    res = CliRunner().invoke(app, args + ["--configs", "pidec-pie,pidec-pid,hf-pie", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    rows = {r["config"]: r for r in result["results"]}
    # the same tokens from every configuration (greedy, random weights), and pid reads the document once
    assert all(r["greedy_agreement_with_pidec_pie"] == 1.0 for r in rows.values())
    assert rows["pidec-pid"]["step_bytes"]["shared_prefix"] > 0 == rows["pidec-pie"]["step_bytes"]["shared_prefix"]
    bad = CliRunner().invoke(app, ["bench", "--arch", "gpt2"])
    assert bad.exit_code == 2 and "unknown --arch 'gpt2'" in bad.output


def test_load_names_an_unsupported_architecture(llama, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    for f in llama.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pidec.CheckpointError, match=r"'phi3' \(Phi3ForCausalLM\); supported: llama .*mistral.* t5"):
        pidec.load(dest)


def test_cli_template_options(llama, tmp_path, tmp_path_factory):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    args = ["generate", "--model", str(llama), "--document", str(doc), "--max-new-tokens", "5", "--prompt", PROMPTS[0]]
    model = pidec.load(llama)
    plain = Template(prefix_template="Text: {document}\n", row_template="Q: {prompt}\nA:")
    for extra, template in (
        (["--prefix-template", plain.prefix_template, "--row-template", plain.row_template], plain),
        (["--chat-template"], Template(chat=True)),
    ):
        res = CliRunner().invoke(app, args + extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["outputs"] == model.generate(
            DOC, PROMPTS[:1], max_new_tokens=5, template=template
        )
    for extra, named in (
        (["--prefix-template", "Text:\n"], "prefix_template 'Text:\\n' has no {document} field"),
        (["--row-template", "Q:"], "row_template 'Q:' has no {prompt} field"),
        (["--chat-template", "--row-template", "{prompt}"], "do not apply with --chat-template"),
    ):
        res = CliRunner().invoke(app, args + extra)
        assert res.exit_code == 2 and named in res.output, res.output
    t5 = tiny_checkpoint(tmp_path_factory.mktemp("t5"), seed=0, max_input_length=128)
    res = CliRunner().invoke(
        app, ["generate", "--model", str(t5), "--document", str(doc), "--prompt", "x"] + ["--chat-template"]
    )
    assert res.exit_code == 2 and "for decoder-only checkpoints" in res.output and "T5" in res.output, res.output
