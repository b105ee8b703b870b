"""What this CPU can do, and the inference dtype that follows from it.

`features()` reads the processor's model name, its core count and the instruction sets that
decide which kernels pay: AMX (bf16 and int8 tile products), AVX-512 bf16 and VNNI, AVX2. It
asks the operating system (`/proc/cpuinfo` flags on Linux) and PyTorch's own dispatch level
(`torch.backends.cpu.get_cpu_capability()`), and it never fails: an unknown CPU reports no
features and gets float32.

`auto_dtype()` is the choice behind `dtype="auto"`: bfloat16 where the CPU multiplies bf16 in
hardware (AMX or AVX-512 bf16) and float32 everywhere else, because on a CPU without those
instructions bf16 products are emulated and slower than float32. `PIDEC_CPU_FEATURES` (a comma
list such as `amx_bf16,avx512_bf16`, or `none`) overrides the detection, for tests and for
trying a path on purpose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

ENV_OVERRIDE = "PIDEC_CPU_FEATURES"
KNOWN = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")


@dataclass(frozen=True)
class CPUFeatures:
    model: str
    cores: int
    flags: frozenset[str] = field(default_factory=frozenset)
    torch_capability: str = ""

    @property
    def bf16_in_hardware(self) -> bool:
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def int8_dot_products(self) -> bool:
        return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & self.flags)

    def describe(self) -> str:
        """One line for headers and start-up messages."""
        isa = [f for f in KNOWN if f in self.flags] or ["no AVX2/AVX-512/AMX"]
        return f"{self.model}, {self.cores} cores, {' '.join(isa)}"

    def instruction_sets(self) -> str:
        """The four instruction sets that decide pidec's kernels, each with yes or no:
        'AMX no, AVX-512 bf16 no, VNNI no, AVX2 yes'."""
        has = {
            "AMX": bool({"amx_bf16", "amx_int8", "amx_tile"} & self.flags),
            "AVX-512 bf16": "avx512_bf16" in self.flags,
            "VNNI": bool({"avx512_vnni", "avx_vnni"} & self.flags),
            "AVX2": "avx2" in self.flags,
        }
        return ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in has.items())


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


@lru_cache(maxsize=1)
def _detected() -> CPUFeatures:
    import platform

    model, flags = _cpuinfo()
    return CPUFeatures(
        model=model or platform.processor() or "unknown CPU",
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        flags=frozenset(f for f in flags if f in KNOWN),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
    )


def features() -> CPUFeatures:
    """This CPU's features, or the ones `PIDEC_CPU_FEATURES` names."""
    found = _detected()
    forced = os.environ.get(ENV_OVERRIDE)
    if forced is None:
        return found
    names = {f.strip() for f in forced.split(",") if f.strip() and f.strip() != "none"}
    unknown = names - set(KNOWN)
    if unknown:
        raise ValueError(f"{ENV_OVERRIDE}: unknown feature(s) {', '.join(sorted(unknown))}; known: {', '.join(KNOWN)}")
    return CPUFeatures(found.model, found.cores, frozenset(names), found.torch_capability)


def auto_reason(device: str | torch.device = "cpu") -> str:
    """Why `dtype="auto"` picks what it picks on `device`, in a few words, for `details`, the
    service's start-up line and the bench header."""
    device = torch.device(device)
    picked = str(auto_dtype(device)).removeprefix("torch.")
    if device.type == "cuda":
        why = "the GPU supports bf16" if picked == "bfloat16" else "the GPU has no bf16 support"
    elif device.type == "cpu":
        f = features()
        found = [n for n, flag in (("AMX", "amx_bf16"), ("AVX-512 bf16", "avx512_bf16")) if flag in f.flags]
        why = (
            f"the CPU multiplies bf16 in hardware ({', '.join(found)})"
            if found
            else "the CPU has no AMX or AVX-512 bf16 (bf16 would be emulated, slower than float32)"
        )
        if os.environ.get(ENV_OVERRIDE) is not None:
            why += f"; features forced by {ENV_OVERRIDE}"
    else:
        why = f"float32 on {device.type}"
    return f"{picked}: {why}"


def dtype_choice(dtype, device: str | torch.device = "cpu") -> str:
    """Why a model runs in the dtype it does, for `details`, the service's start-up line and
    the bench header: for `dtype="auto"`, what the device has ("auto, the CPU has no AMX or
    AVX-512 bf16 ..."); for a dtype named by the caller, "asked for"."""
    if isinstance(dtype, str) and dtype == "auto":
        return "auto, " + auto_reason(device).split(": ", 1)[1]
    return "asked for"


def last_level_cache_bytes() -> int:
    """The largest CPU cache (the last level) in bytes, from sysfs; 32 MiB where it cannot be read.
    The bandwidth measurement streams more than this, so that what it reads comes from memory."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(f"{base}/{entry}/size", encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text.rstrip("KkMmGg")
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best or 32 * 2**20


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype `dtype="auto"` means on `device`: bf16 on a CUDA device that supports it or a
    CPU with bf16 in hardware, float32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if features().bf16_in_hardware else torch.float32
    return torch.float32


def kernel_summary(dtype: torch.dtype, packed: bool, int8: str | None = None) -> str:
    """Which products pidec's linear layers run, in words: `dtype` the model's, `packed` whether
    its float32 weights are oneDNN-packed (`pidec.packing`), `int8` the int8 path where a model
    is quantized (`pidec.quantize.describe`). Says where bf16 or int8 lack the instructions
    that make them pay on this CPU."""
    f = features()
    if dtype == torch.float32:
        parts = ["float32: oneDNN-packed weights" if packed else "float32: BLAS (weights unpacked)"]
    elif dtype == torch.bfloat16:
        hw = [n for n, flag in (("AMX", "amx_bf16"), ("AVX-512 bf16", "avx512_bf16")) if flag in f.flags]
        parts = [f"bf16: torch's bf16 linear ({'on ' + ' and '.join(hw) if hw else 'emulated: no bf16 instructions'})"]
    else:
        parts = [f"{str(dtype).removeprefix('torch.')}: torch's linear"]
    if int8:
        vnni = (
            "VNNI/AMX int8"
            if {"avx512_vnni", "amx_int8"} & f.flags
            else "no VNNI: u8 x s8 pair sums in int16, 7-bit activations"
        )
        parts.append(f"int8: {int8} ({vnni})")
    return "; ".join(parts)
