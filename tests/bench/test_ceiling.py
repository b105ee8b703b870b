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
    assert seen[-2] == (flops, torch.int32, (32, 48))  # int8 product, int32 result
    assert seen[-1] == (flops, torch.float32, (32, 48))  # dynamic int8 linear: float in, float out
    int8 = {"int_mm": float(len(seen) - 1), "dynamic_linear": float(len(seen))}
    assert ceil == {
        "shape": [32, 64, 48],
        "dtype": "float32",
        "float_gflops": max(kernels.values()),  # the faster float kernel is the ceiling
        "float_kernels": kernels,
        "int8_gops": max(int8.values()),  # likewise the faster int8 kernel
        "int8_kernels": int8,
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


@pytest.mark.parametrize("int8", [False, True])
def test_measure_bandwidth_streams_more_than_asked_through_pidecs_product(int8):
    bw = ceiling.measure_bandwidth(64, 128, [1, 3], int8=int8, min_bytes=200_000, trials=1)
    element = 1 if int8 else 4
    count = -(-200_000 // (64 * 128 * element))  # distinct weights, together at least min_bytes
    assert bw["bytes_streamed"] == count * 64 * 128 * element >= 200_000
    assert bw["shape"] == [64, 128] and bw["dtype"] == ("int8" if int8 else "float32")
    assert bw["kernel"] == ("int8_dynamic" if int8 else "onednn_packed" if packing.available() else "linear")
    assert set(bw["gbps"]) == {1, 3} and bw["best_gbps"] == max(bw["gbps"].values()) > 0


def test_int8_streamer_is_the_float_product_within_int8_rounding():
    gen = torch.Generator().manual_seed(0)
    _, (product,) = ceiling._int8_streamers(64, 32, 1, torch.Generator().manual_seed(1))
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))  # the streamer's weight
    x = torch.randn(5, 64, generator=gen)
    exact = x @ w.t()
    assert (product(x) - exact).norm() / exact.norm() < 0.05


def test_best_bandwidth_keeps_the_faster_per_row_count():
    a = {"gbps": {1: 5.0, 8: 3.0}, "best_gbps": 5.0, "trials": 3, "kernel": "k"}
    b = dict(a, gbps={1: 4.0, 8: 6.0}, best_gbps=6.0)
    assert ceiling.best_bandwidth(a, b) == dict(a, gbps={1: 5.0, 8: 6.0}, best_gbps=6.0, trials=6)
    assert ceiling.best_bandwidth(a, None) is a and ceiling.best_bandwidth(None, None) is None
