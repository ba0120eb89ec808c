"""The machine a figure was measured on: the CPU's name and whether it computes bf16 natively, and the host's load.

Every latency kdsearch records (a trial's profile, an export's deployment table) and every bench figure names them:
CPUs that share a model name differ here (some AVX2-only, some with AVX512-BF16/AMX), and a loaded host inflates
any timing.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

from distill.precision import cpu_has_native_bf16


@lru_cache(maxsize=1)
def machine() -> str:
    """The CPU that latencies are measured on, and whether it computes bf16 natively (CPUs with one model name
    differ here), e.g. ``Intel(R) Xeon(R) Processor (x86_64, 2 cores, native bf16: avx512_bf16/amx_bf16)``."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    bf16 = "native bf16: avx512_bf16/amx_bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{name} ({platform.machine()}, {os.cpu_count()} cores, {bf16})"


def load_1min() -> float:
    """The host's 1-minute load average now: stated beside every latency, which a busy host inflates."""
    return round(os.getloadavg()[0], 2)
