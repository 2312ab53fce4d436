"""Process-level CPU performance settings for training and benchmarks, and what the CPU is (/proc/cpuinfo).

glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free. A training step at batch 32
allocates and frees dozens of 40-170 MB activation buffers, so each step page-faults ~1 M times and spends a large
share of its time in the kernel zeroing pages (measured here: ~1 M minor faults and 1.5-6 s of system time per
step of the paper's model). Keeping freed memory in the heap for reuse removes most of that; resident memory then
stays at the peak, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Ask glibc malloc to serve large blocks from the heap and not to return freed memory to the OS.
    Idempotent; returns True when applied (Linux with glibc), False elsewhere (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in /proc/cpuinfo (None where there is no such file or line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC ...")."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_has_native_bf16() -> bool:
    """bf16 dot products in hardware (AVX-512 BF16 or AMX): there bf16 autocast trains faster than fp32 (measure with
    `facevae bench train`); elsewhere it is emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
