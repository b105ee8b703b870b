"""`pidec.bench.workloads`: the seeded draws of each workload and its largest document."""

import random

from pidec.bench.workloads import WORKLOADS, build_random_model, draw_documents, largest_draw


def test_workload_draws():
    w = WORKLOADS["dst"]
    draws = draw_documents(w, 2, seed=5)
    assert draws[0].document != draws[1].document  # each document its own draw
    for d in draws:
        assert len(d.document) == 512 and d.document[-1] == 1 and all(100 <= t < 32000 for t in d.document[:-1])
        assert d.k == 30 and all(4 <= len(p) <= 8 for p in d.prompts)
        assert sum(n == 2 for n in d.out_lens) == 24 and all(3 <= n <= 10 for n in d.out_lens if n != 2)
        assert d.seq_len == sum(len(p) + n + 1 for p, n in zip(d.prompts, d.out_lens))
    assert draw_documents(w, 2, seed=5)[1].out_lens == draws[1].out_lens  # seeded
    s = draw_documents(WORKLOADS["summ"], 1, seed=0)[0]
    assert len(s.document) == 1500 and s.k == 4 and all(100 <= n <= 250 for n in s.out_lens)
    q = draw_documents(WORKLOADS["qa"], 1, seed=0)[0]
    assert q.k == 14 and all(8 <= len(p) <= 16 for p in q.prompts) and all(3 <= n <= 20 for n in q.out_lens)
    assert WORKLOADS["dst"].output_lengths(random.Random(0), 1)[0] >= 3  # at least one long row


def test_largest_draw_and_random_model():
    d = largest_draw(WORKLOADS["qa"], doc_tokens=10, subtasks=3)
    assert len(d.document) == 10 and d.document[-1] == 1 and [len(p) for p in d.prompts] == [16] * 3
    assert d.out_lens == [20] * 3
    a, b = build_random_model("tiny", seed=1), build_random_model("tiny", seed=1)
    assert all(x.equal(y) for x, y in zip(a.parameters(), b.parameters())) and not a.training
