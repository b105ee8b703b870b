"""`pidec.bench.ceiling`: the machine's own matmul rate, timed at the workload's shape, and the
best of two measurements."""

import pytest
import torch

from pidec import packing
from pidec.bench import ceiling
from pidec.bench.ceiling import best_ceiling, measure_ceiling


def test_best_rate_counts_calls_over_the_clock(monkeypatch):
    clock = [0.0]

    def product():  # each call takes 10 ms of the fake clock
        clock[0] += 0.01

    monkeypatch.setattr(ceiling.time, "perf_counter", lambda: clock[0])
    # at least 0.05 s per trial: 5 calls of 120 FLOPs in 0.05 s
    assert ceiling.best_rate(product, 120, torch.device("cpu"), 0.05, trials=2) == pytest.approx(5 * 120 / 0.05)


def test_measure_ceiling_times_the_workload_shape(monkeypatch):
    seen = []

    def fake_rate(fn, flops, device, min_time_s, trials):
        out = fn()
        seen.append((flops, out.dtype, tuple(out.shape)))
        return 1e9 * len(seen)

    monkeypatch.setattr(ceiling, "best_rate", fake_rate)
    ceil = measure_ceiling(32, 64, 48)
    flops = 2 * 32 * 64 * 48
    assert seen[0] == (flops, torch.float32, (32, 48))  # 2mkn FLOPs, float product (BLAS)
    if packing.available():  # the same product through the oneDNN-packed weight
        assert seen[1] == (flops, torch.float32, (32, 48))
        kernels = {"blas": 1.0, "onednn_packed": 2.0}
    else:
        kernels = {"blas": 1.0}
    assert seen[-1] == (flops, torch.int32, (32, 48))  # int8 product, int32 result
    assert ceil == {
        "shape": [32, 64, 48],
        "dtype": "float32",
        "float_gflops": max(kernels.values()),  # the faster float kernel is the ceiling
        "float_kernels": kernels,
        "int8_gops": float(len(seen)),
        "int8_error": None,
        "trials": 3,
    }


def test_measure_ceiling_packed_product_is_the_same_product():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=gen), torch.randn(64, 48, generator=gen)
    if not packing.available():
        pytest.skip("torch without oneDNN")
    torch.testing.assert_close(packing.packed_product(a, b.t().contiguous()), a @ b, rtol=1e-4, atol=1e-4)


def test_best_ceiling_keeps_the_faster_of_each_kernel():
    a = {
        "shape": [1, 1, 1],
        "dtype": "float32",
        "float_gflops": 5.0,
        "float_kernels": {"blas": 5.0, "onednn_packed": 3.0},
        "int8_gops": None,
        "int8_error": "none here",
        "trials": 3,
    }
    b = dict(a, float_gflops=6.0, float_kernels={"blas": 2.0, "onednn_packed": 6.0}, int8_gops=9.0, int8_error=None)
    out = best_ceiling(a, b)
    assert out["float_gflops"] == 6.0 and out["float_kernels"] == {"blas": 5.0, "onednn_packed": 6.0}
    assert out["int8_gops"] == 9.0 and out["int8_error"] is None and out["trials"] == 6


def test_measure_ceiling_for_real_is_positive():
    ceil = measure_ceiling(32, 64, 64, min_time_s=0.01, trials=1)
    assert ceil["float_gflops"] > 0 and ceil["int8_gops"] > 0


def test_best_ceiling_keeps_the_faster_of_two_measurements():
    a = {"shape": [4, 4, 4], "dtype": "float32", "float_gflops": 5.0, "int8_gops": None, "int8_error": "x", "trials": 3}
    b = dict(a, float_gflops=4.0, int8_gops=9.0, int8_error=None)
    assert best_ceiling(a, b) == dict(a, float_gflops=5.0, int8_gops=9.0, int8_error=None, trials=6)
    assert best_ceiling(a, a)["int8_gops"] is None and best_ceiling(a, a)["int8_error"] == "x"
