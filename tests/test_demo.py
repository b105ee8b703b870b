"""`pidec demo`'s pieces: the tokenizer it trains, and the whole pipeline at toy scale."""

import json

from pidec.demo import synthetic
from pidec.demo.run import build_tokenizer, format_result, run_demo


def test_tokenizer_round_trips_and_appends_eos(tmp_path):
    from transformers import AutoTokenizer

    train, test = synthetic.make_splits(200, 20, seed=1)
    build_tokenizer(train, tmp_path / "tok", vocab_size=600)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    for ex in test:
        ids = tok(ex.document, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == ex.document  # byte-level BPE: exact, no unknown tokens
        assert len(ids) < len(ex.document.encode()) / 2  # far fewer tokens than bytes
        assert tok(ex.document)["input_ids"] == ids + [1]
        for s in ex.subtasks:
            assert tok.decode(tok(s.target, add_special_tokens=False)["input_ids"]) == s.target


def test_demo_pipeline_at_toy_scale(tmp_path):
    result = run_demo(tmp_path, train_examples=40, test_examples=6, steps=2, batch_tokens=2048, time_docs=2)
    assert [r["config"] for r in result["decoding"]] == ["pidec-pid", "pidec-pie", "hf-pie"]
    by = {r["config"]: r for r in result["decoding"]}
    # the same model decoded by pidec and by transformers in pie agrees
    assert by["pidec-pie"]["slot_accuracy"] == by["hf-pie"]["slot_accuracy"]
    assert (tmp_path / "speed.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo.json").read_text())["test_examples"] == 6
    assert "joint accuracy" in format_result(result)
