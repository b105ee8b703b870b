"""CPU feature detection and the dtype `auto` picks, on forced feature sets (independent of the CPU)."""

import pytest
import torch

from pidec import cpu


def test_detection_never_fails_and_describes_the_machine():
    found = cpu.features()
    assert found.cores >= 1 and found.model
    assert found.flags <= set(cpu.KNOWN)
    assert str(found.cores) in found.describe()


@pytest.mark.parametrize(
    "forced,dtype,int8",
    [
        ("amx_bf16,amx_int8,avx512_bf16,avx512_vnni,avx2", torch.bfloat16, True),
        ("avx512_bf16,avx2", torch.bfloat16, False),
        ("avx512_vnni,avx2", torch.float32, True),
        ("avx2", torch.float32, False),
        ("none", torch.float32, False),
    ],
)
def test_auto_dtype_follows_the_features(monkeypatch, forced, dtype, int8):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, forced)
    assert cpu.auto_dtype("cpu") == dtype
    assert cpu.features().int8_dot_products == int8
    described = cpu.features().describe()
    assert ("avx2" in described) == ("avx2" in forced)


def test_unknown_forced_feature_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu.ENV_OVERRIDE, "avx2,warp_drive")
    with pytest.raises(ValueError, match="unknown feature.*warp_drive"):
        cpu.features()


def test_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test Xeon\nflags\t\t: fpu avx2 amx_bf16 sse\n\nprocessor\t: 1\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    model, flags = cpu._cpuinfo()
    assert model == "Test Xeon" and {"avx2", "amx_bf16"} <= flags
