"""What the machine computes fast, for defaults that are right on every CPU.

CPU autocast to bfloat16 pays only where the CPU has bfloat16 instructions (AMX or AVX-512 BF16): on
such a CPU the slice network trains 1.8x faster in bf16, 3.6x with channels-last as well
(``benchmarks/bench_slice_train.py``). On AVX2-only CPUs bf16 is emulated and slower than float32.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags Linux reports in ``cpuinfo`` (empty elsewhere)."""
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU computes bfloat16 natively (AMX or AVX-512 BF16)."""
    return any(flag in cpu_flags(cpuinfo) for flag in BF16_CPU_FLAGS)
