"""The roofline floor (`roofline.phase_work`, `roofline.floor`) against values worked out by
hand on a model small enough to count on paper, its agreement with the benchmark's other
counters, and the bench header's CPU lines on forced feature sets (no timing anywhere)."""

import pytest
import torch

from pidec import cpu
from pidec.bench import harness, roofline
from pidec.bench.configs import CONFIGS, config_flops, config_step_bytes
from pidec.bench.report import floor_lines, format_table
from pidec.bench.workloads import WORKLOADS, draw_documents
from pidec.model import T5Config

from ..conftest import HAND_COUNTED

CFG = HAND_COUNTED


def work():
    # one document of 3 tokens encoded once, 2 rows after a prefix of 2, writing 2 and 3 tokens
    return roofline.phase_work(CFG, 1, 3, 1, 2, [2, 3], True, 4)


def test_phase_work_by_hand():
    w = work()
    # encode: 3 tokens x 368 FLOPs (test_roofline's encoder_token_flops); weights: 160 linear
    # elements x 4 bytes = 640 + 2 norms of 4 floats (32) = 672, + the final norm 16 -> 688
    assert w["encode"] == [(1104, 688)]
    # cross K/V: 3 tokens x 2 projections x 2*4*4 = 192 FLOPs; weights 2 x 16 x 4 = 128 bytes
    assert w["cross_kv"] == [(192, 128)]
    # prefill: 2 rows x 2 positions x 464 (self 128 + 4*2*4 scores, cross q/o 64 + 4*3*4, ffn 192)
    # + 2 LM-head rows of 80 = 2016; bytes: one decoder pass's weights (992) + the cross cache
    # (2 x 1 layer x 2 heads x 3 positions x 2 x 4 bytes = 96) -> 1088
    assert w["prefill"] == [(2016, 1088)]
    # step 1: 2 rows alive, self over 3 positions: 2 x (480 + 80) = 1120; bytes 992 + 96 + self 192
    # step 2: 1 row alive, self over 4: 496 + 80 = 576; bytes 992 + 96 + 128
    assert w["decode"] == [(1120, 1280), (576, 1216)]


def test_floor_by_hand():
    # 20 FLOP/s and 20 B/s: encode, cross K/V and prefill are compute-bound (their FLOPs exceed
    # their bytes), the two decoding steps memory-bound
    f = roofline.floor(work(), 20.0, 20.0)
    assert f["encode"]["floor_s"] == pytest.approx(1104 / 20) and f["encode"]["bound"] == "compute"
    assert f["cross_kv"]["floor_s"] == pytest.approx(192 / 20)
    assert f["prefill"]["floor_s"] == pytest.approx(2016 / 20)
    assert f["decode"]["floor_s"] == pytest.approx((1280 + 1216) / 20) and f["decode"]["bound"] == "memory"
    assert f["decode"]["passes"] == 2 and f["decode"]["flops"] == 1696 and f["decode"]["bytes"] == 2496
    assert f["total_s"] == pytest.approx(55.2 + 9.6 + 100.8 + 124.8)
    # a faster memory turns the steps compute-bound: 1120/20 and 576/20
    fast = roofline.floor(work(), 20.0, 1000.0)
    assert fast["decode"]["floor_s"] == pytest.approx((1120 + 576) / 20) and fast["decode"]["bound"] == "compute"
    with pytest.raises(ValueError, match="positive"):
        roofline.floor(work(), 0.0, 1.0)


@pytest.mark.parametrize("name", CONFIGS + ["pidec-pid-int8", "ct2-pie-int8"])
def test_phases_add_up_to_the_other_counters(name):
    cfg = T5Config.from_name("tiny")
    d = draw_documents(WORKLOADS["dst"], 1, 0, cfg.vocab_size, 40, 5)[0]
    w = harness.phase_work(name, cfg, d, 4)
    assert sum(f for p in w.values() for f, _ in p) == config_flops(name, cfg, d)
    steps = config_step_bytes(name, cfg, d, 4)
    assert len(w["decode"]) == steps["passes"]
    assert sum(b for _, b in w["decode"]) / len(w["decode"]) == pytest.approx(steps["total"])


def test_config_floor_uses_the_precisions_own_ceiling_and_bandwidth():
    cfg = T5Config.from_name("tiny")
    draws = draw_documents(WORKLOADS["dst"], 2, 0, cfg.vocab_size, 40, 5)

    class Built:
        config = cfg

    Built.draws = draws
    spec = harness.make_spec("dst", "tiny", None, ["pidec-pid"], 1, 1, "cpu", "float32", None)
    ceil = {"float_gflops": 10.0, "int8_gops": 40.0}
    bw = {"float": {"best_gbps": 2.0}, "int8": {"best_gbps": 3.0}}
    got = harness.config_floor("pidec-pid", spec, Built, ceil, bw)
    want = [roofline.floor(harness.phase_work("pidec-pid", cfg, d, 4), 10e9, 2e9)["total_s"] for d in draws]
    assert got["total_s"] == pytest.approx(sum(want) / 2)
    want8 = [roofline.floor(harness.phase_work("pidec-pid-int8", cfg, d, 4), 40e9, 3e9)["total_s"] for d in draws]
    assert harness.config_floor("pidec-pid-int8", spec, Built, ceil, bw)["total_s"] == pytest.approx(sum(want8) / 2)
    assert harness.config_floor("pidec-pid-int8", spec, Built, ceil, {"float": bw["float"]}) is None
    assert harness.config_floor("pidec-pid", spec, Built, None, bw) is None


@pytest.mark.parametrize(
    "forced,sets,bf16",
    [
        ("amx_bf16,amx_int8,avx512_bf16,avx512_vnni,avx2", "AMX yes, AVX-512 bf16 yes, VNNI yes, AVX2 yes", "on AMX"),
        ("avx512_bf16,avx2", "AMX no, AVX-512 bf16 yes, VNNI no, AVX2 yes", "on AVX-512 bf16"),
        ("avx2", "AMX no, AVX-512 bf16 no, VNNI no, AVX2 yes", "emulated"),
    ],
)
def test_header_says_the_cpu_and_kernels_on_forced_features(monkeypatch, forced, sets, bf16):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, forced)
    f = cpu.features()
    assert f.instruction_sets() == sets
    assert bf16 in cpu.kernel_summary(torch.bfloat16, packed=False)
    int8 = cpu.kernel_summary(torch.float32, packed=True, int8="int8 (torch)")
    assert int8.startswith("float32: oneDNN-packed weights; int8: int8 (torch)")
    assert ("no VNNI" in int8) == ("vnni" not in forced)
    result = {
        "workload": "dst",
        "model": {"size": "base", "params": 247.6e6},
        "device": "cpu",
        "dtype": "bfloat16" if "bf16" in forced else "float32",
        "dtype_reason": "auto, " + cpu.auto_reason("cpu").split(": ", 1)[1],
        "cpu": {"model": f.model, "cores": f.cores, "instruction_sets": sets, "kernels": "K"},
        "torch_threads": 2,
        "docs": 1,
        "repeats": 1,
        "results": [],
    }
    table = format_table(result)
    assert f"cpu: {f.model}, {f.cores} cores; {sets}" in table and "kernels: K" in table
    assert ("multiplies bf16 in hardware" in table) == ("bf16" in forced)
    assert f"features forced by {cpu.ENV_OVERRIDE}" in table


def test_floor_lines_show_each_phase():
    r = {
        "config": "pidec-pid",
        "latency_s_median": 2.0,
        "floor_s": 1.5,
        "floor_phases_s": {"encode": 0.5, "cross_kv": 0.1, "prefill": 0.2, "decode": 0.7},
        "floor_bound": {"encode": "compute", "cross_kv": "compute", "prefill": "compute", "decode": "memory"},
    }
    lines = floor_lines([r, {"config": "hf-pie", "floor_phases_s": None}])
    assert len(lines) == 3 and "decode" in lines[1]
    assert lines[2].split() == ["pidec-pid", "0.5000c", "0.1000c", "0.2000c", "0.7000m", "1.5000", "2.0000"]
