"""Training precision: fp32, or bf16 autocast where the hardware computes bf16 natively.

``KDSEARCH_PRECISION=auto`` (the default) resolves per device: bf16 on a CUDA device that supports it, and on a
CPU with native bf16 instructions (AVX512-BF16 or AMX); fp32 everywhere else. On a CPU without them bf16 is
emulated and many times slower than fp32 (an AVX2-only EPYC here: a 5120x128 @ 128x512 matmul takes 20 ms in fp32
and 780 ms in bf16), so ``bf16`` asked for by name there runs, with a warning. Autocast covers the student's
forward pass only: the loss (softmax-KL, MSE), the optimizer's update and the metrics stay in fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PrecisionSetting = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names for native bf16 arithmetic


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), by torch's own CPU probe where this
    torch has it, else by the kernel's CPU flags."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(bool(probe()) for probe in probes if callable(probe))
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """The precision a trial on ``device`` trains in for ``setting`` (auto, fp32 or bf16)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {setting!r}")
    if setting == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return "bf16" if setting == "bf16" else "fp32"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[object]:
    """The context the student's forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
