"""Span corruption: exact on hand-made cases, T5's lengths, and the noise statistics."""

import random

import pytest

from pidec.errors import InputError
from pidec.span_corruption import corrupt, lengths, noise_mask, sentinel_ids

X0, X1, X2 = 999, 998, 997  # sentinels descend, as in T5's vocabulary
EOS = 1


def test_corrupt_hand_made():
    tokens = list(range(10, 20))
    mask = [False, False, True, True, False, False, False, True, False, False]
    inputs, targets = corrupt(tokens, mask, [X0, X1, X2], EOS)
    assert inputs == [10, 11, X0, 14, 15, 16, X1, 18, 19, EOS]
    assert targets == [X0, 12, 13, X1, 17, EOS]


def test_adjacent_spans_are_one_sentinel_and_a_span_may_end_the_text():
    inputs, targets = corrupt([5, 6, 7, 8], [False, True, True, True], [X0], EOS)
    assert inputs == [5, X0, EOS] and targets == [X0, 6, 7, 8, EOS]


def test_more_spans_than_sentinels_is_an_error():
    with pytest.raises(InputError, match="2 noise spans but the tokenizer has 1 sentinel"):
        corrupt([5, 6, 7, 8], [False, True, False, True], [X0], EOS)


def test_lengths_match_t5():
    # T5 (and Hugging Face's run_t5_mlm) for a 512-token encoder: 568 text tokens, 114 targets
    shape = lengths(512)
    assert (shape.tokens, shape.inputs, shape.targets) == (568, 512, 114)
    assert (shape.noise_tokens, shape.noise_spans) == (85, 28)
    for n in (16, 64, 128, 256, 1024):
        s = lengths(n)
        assert s.inputs <= n and lengths(n).tokens == s.tokens
        assert s.inputs == s.tokens - s.noise_tokens + s.noise_spans + 1
        assert s.targets == s.noise_tokens + s.noise_spans + 1


@pytest.mark.parametrize("length", [64, 568])
def test_every_mask_of_a_fixed_length_gives_the_planned_lengths(length):
    shape = lengths(512) if length == 568 else None
    rng = random.Random(0)
    for _ in range(50):
        mask = noise_mask(length, 0.15, 3.0, rng)
        assert len(mask) == length and not mask[0]  # a kept span comes first
        tokens = list(range(100, 100 + length))
        inputs, targets = corrupt(tokens, mask, list(range(2000, 1900, -1)), EOS)
        if shape:
            assert (len(inputs), len(targets)) == (shape.inputs, shape.targets)
        # nothing lost: the kept tokens and the targets' tokens together are the text, in order
        kept = [t for t in inputs if 100 <= t < 100 + length]
        dropped = [t for t in targets if 100 <= t < 100 + length]
        assert sorted(kept + dropped) == tokens
        assert [t for t in inputs if t >= 1900] == [t for t in targets if t >= 1900]  # same sentinels
        used = [t for t in inputs if t >= 1900]
        assert used == list(range(2000, 2000 - len(used), -1))  # <extra_id_0>, <extra_id_1>, ... in order


@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.3, 8.0), (0.5, 1.0)])
def test_noise_density_and_span_length_match_their_settings(density, span):
    rng = random.Random(1)
    noise = spans = total = 0
    for _ in range(300):
        mask = noise_mask(500, density, span, rng)
        total += len(mask)
        noise += sum(mask)
        spans += sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert abs(noise / total - density) < 0.01
    assert abs(noise / spans - span) < 0.1 * span
    # span lengths are spread, not all equal (a uniform random segmentation)
    lengths_seen = set()
    mask = noise_mask(500, density, span, random.Random(2))
    run = 0
    for m in mask + [False]:
        if m:
            run += 1
        elif run:
            lengths_seen.add(run)
            run = 0
    assert len(lengths_seen) > 1 or span == 1.0


def test_the_mask_is_a_function_of_the_seed():
    a = noise_mask(100, 0.15, 3.0, random.Random("7/0/3"))
    b = noise_mask(100, 0.15, 3.0, random.Random("7/0/3"))
    c = noise_mask(100, 0.15, 3.0, random.Random("7/0/4"))
    assert a == b and a != c


def test_bad_settings_name_the_setting():
    with pytest.raises(InputError, match="noise density 1.5"):
        lengths(512, noise_density=1.5)
    with pytest.raises(InputError, match="mean noise span length 0"):
        lengths(512, mean_span_length=0)
    with pytest.raises(InputError, match="input length 2"):
        lengths(2)


def test_sentinels_in_order_from_the_t5_tokenizer_and_a_clear_error_without_them():
    from .shared_data import T5_TOKENIZER, require

    with pytest.raises(InputError, match="no sentinel tokens"):
        sentinel_ids(type("Tok", (), {"get_vocab": lambda self: {"a": 3}})())
    require(T5_TOKENIZER)
    from pidec.checkpoint import load_tokenizer

    ids = sentinel_ids(load_tokenizer(T5_TOKENIZER))
    assert len(ids) == 100 and ids[0] == 32099 and ids == sorted(ids, reverse=True)
