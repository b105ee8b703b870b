"""`pidec.bench.crosscheck`: the first-token comparison, the float64 logits gap (which must see
a different model) and the token-count check."""

import pytest
import torch

from pidec import checkpoint
from pidec.bench.crosscheck import LOGITS_RTOL, agree, check_lengths, logits_gap
from pidec.bench.engines import load_models
from pidec.bench.workloads import WORKLOADS, DocDraw, build_random_model, draw_documents

K, DOC = 4, 64


def test_logits_gap_sees_a_different_model(tmp_path):
    checkpoint.save(build_random_model("tiny"), tmp_path)
    ours, hf = load_models(tmp_path, torch.device("cpu"), torch.float32, True)
    d = draw_documents(WORKLOADS["dst"], 1, 0, ours.config.vocab_size, DOC, K)[0]
    assert logits_gap(ours, hf, d, torch.device("cpu")) <= LOGITS_RTOL
    with torch.no_grad():
        ours.decoder.layers[0].ff.wo.weight.mul_(1.5)  # one layer off: no longer the same function
    assert logits_gap(ours, hf, d, torch.device("cpu")) > LOGITS_RTOL


def test_agree_compares_first_tokens_up_to_eos():
    ours = [[5, 6, 7], [1, 9, 9], [8, 8, 8], [4, 1, 3]]
    assert agree(ours, [[5, 6, 0], [2, 2, 2], [8, 8, 0], [4, 7, 7]], eos=1)  # rows 0, 2, 3; row 3 up to EOS
    assert not agree(ours, [[5, 6], [0], [8, 9], [4]], eos=1)
    assert not agree(ours, [[5, 0], [0], [8, 8], [4]], eos=1)


def test_check_lengths_names_the_configuration():
    d = DocDraw([100, 101, 1], [[5], [6, 7]], [2, 4])
    check_lengths("pidec-pid", [[0, 0], [0] * 4], d)  # each row its own length
    check_lengths("hf-pie", [[0] * 4, [0] * 4], d)  # every row the longest
    with pytest.raises(RuntimeError, match=r"hf-pie generated \[2, 4\] tokens per row"):
        check_lengths("hf-pie", [[0, 0], [0] * 4], d)
