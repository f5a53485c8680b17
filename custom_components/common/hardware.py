"""What the machine computes fast, for defaults that are right on every CPU.

CPU autocast to bfloat16 pays only where the CPU has bfloat16 instructions (AMX or AVX-512 BF16); on
AVX2-only CPUs bf16 is emulated and slower than float32 (``benchmarks/bench_slice_train.py``; figures: the
Performance section of ``bundles/slice_cnn_brainage/docs/README.md``), so a cap set by the user
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) counts as well as the CPU's flags.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below its bfloat16 kernels
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})


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
    """True when this CPU computes bfloat16 natively (AMX or AVX-512 BF16) and PyTorch may use it: its
    kernels not capped below AVX-512 (``ATEN_CPU_CAPABILITY``) nor oneDNN's below bf16 (``ONEDNN_MAX_CPU_ISA``)."""
    return (any(flag in cpu_flags(cpuinfo) for flag in BF16_CPU_FLAGS)
            and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() not in ONEDNN_ISAS_WITHOUT_BF16)


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` trainings run side by side: an equal share of the cores (at least
    one). On 2 cores two slice trainings with one thread each finish about twice as many runs per hour as
    one training with two (the slice bundle's docs, Speed)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(jobs)))
