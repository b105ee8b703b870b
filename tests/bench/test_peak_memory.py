"""`pidec.bench.peak_memory`: the peak above the level at entry sees a block held for a moment."""

import time

import torch

from pidec.bench.peak_memory import PeakMemory


def test_peak_sees_an_allocation_and_not_the_baseline():
    with PeakMemory(torch.device("cpu"), interval_s=0.001) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert 48 * 2**20 < mem.peak_bytes < 256 * 2**20
    with PeakMemory(torch.device("cpu")) as idle:
        time.sleep(0.02)
    assert idle.peak_bytes < 32 * 2**20
