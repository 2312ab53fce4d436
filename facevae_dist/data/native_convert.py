"""Host batches: row gather + uint8 -> float32 in [0, 1] in one pass, with non-temporal (streaming) stores.

Why a C kernel: on the CPU the host placement is bound by writing the float32 batch (332 KB per 144-px image and
mask). Ordinary stores first read each destination cache line from memory (read-for-ownership), so every byte
written costs two bytes of memory traffic; torch emits no streaming stores, so its best (one fused inductor
kernel, `--compile`) stays near that limit. Streaming stores skip the read; measured here ~1.3-1.5x the fused
torch kernel (see `facevae bench data`). The batch is consumed by the next training step, so bypassing the cache
costs nothing.

The source below is compiled once per machine kind with the system C compiler (`cc`, the same requirement as
torch.compile on a CPU) into ~/.cache/facevae (or $FACEVAE_CACHE_DIR) under a name hashed from the source, the
compiler and the platform, written atomically; x86 code paths are chosen at run time (AVX-512, AVX2, plain), so
one build serves every node of a cluster that shares the home directory. Without a compiler, or if anything
fails, `load()` returns None and the caller converts with torch: the batches are the same either way, bit for bit
(the same cast and the same float32 multiply by 1/255, `scale` passed in from torch's own rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* dst[i*n + k] = src[index[i]*n + k] * scale for i < b, k < n: rows of uint8 gathered and converted to float32. */
static void rows_plain(const uint8_t *src, const int64_t *index, int64_t b, int64_t n, float *dst, float scale) {
    for (int64_t i = 0; i < b; i++) {
        const uint8_t *s = src + index[i] * n;
        float *d = dst + i * n;
        for (int64_t k = 0; k < n; k++) d[k] = (float)s[k] * scale;
    }
}

#if defined(__x86_64__)
__attribute__((target("avx512f")))
static void rows_avx512(const uint8_t *src, const int64_t *index, int64_t b, int64_t n, float *dst, float scale) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < b; i++) {
        const uint8_t *s = src + index[i] * n;
        float *d = dst + i * n;
        int64_t k = 0;
        for (; k < n && ((uintptr_t)(d + k) & 63); k++) d[k] = (float)s[k] * scale;  /* stream stores: 64-B aligned */
        for (; k + 16 <= n; k += 16) {
            __m128i u = _mm_loadu_si128((const __m128i *)(s + k));
            _mm512_stream_ps(d + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(u)), vs));
        }
        for (; k < n; k++) d[k] = (float)s[k] * scale;
    }
    _mm_sfence();
}

__attribute__((target("avx2")))
static void rows_avx2(const uint8_t *src, const int64_t *index, int64_t b, int64_t n, float *dst, float scale) {
    const __m256 vs = _mm256_set1_ps(scale);
    for (int64_t i = 0; i < b; i++) {
        const uint8_t *s = src + index[i] * n;
        float *d = dst + i * n;
        int64_t k = 0;
        for (; k < n && ((uintptr_t)(d + k) & 31); k++) d[k] = (float)s[k] * scale;
        for (; k + 8 <= n; k += 8) {
            __m128i u = _mm_loadl_epi64((const __m128i *)(s + k));
            _mm256_stream_ps(d + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(u)), vs));
        }
        for (; k < n; k++) d[k] = (float)s[k] * scale;
    }
    _mm_sfence();
}
#endif

/* Returns the path taken: 2 AVX-512, 1 AVX2, 0 plain C. */
int facevae_gather_u8_f32(const uint8_t *src, const int64_t *index, int64_t b, int64_t n, float *dst, float scale) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) { rows_avx512(src, index, b, n, dst, scale); return 2; }
    if (__builtin_cpu_supports("avx2")) { rows_avx2(src, index, b, n, dst, scale); return 1; }
#endif
    rows_plain(src, index, b, n, dst, scale);
    return 0;
}
"""

_FLAGS = ["-O2", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off"]
_NOT_LOADED = object()
_kernel = _NOT_LOADED
_why_not = ""
SCALE = float(torch.tensor(1 / 255, dtype=torch.float32))  # what torch's x * (1/255) multiplies float32 data by


def cache_dir() -> Path:
    return Path(os.environ.get("FACEVAE_CACHE_DIR") or Path.home() / ".cache" / "facevae")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([_SOURCE, cc, *version, *_FLAGS, platform.machine(), platform.system()])
                         .encode()).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"native_convert-{key}.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "native_convert.c", Path(tmp) / "native_convert.so"
        src.write_text(_SOURCE)
        done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.replace(out, lib)  # atomic: a concurrent rank building the same file renames an identical one
    return lib


def load():
    """The C function, or None (then `why_not()` says why). Built or found once per process."""
    global _kernel, _why_not
    if _kernel is _NOT_LOADED:
        _kernel = None
        cc = _compiler()
        if cc is None:
            _why_not = "no C compiler (cc) on PATH"
        else:
            try:
                fn = ctypes.CDLL(str(_build(cc))).facevae_gather_u8_f32
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_float]
                fn.restype = ctypes.c_int
                _kernel = fn
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                _why_not = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    return _kernel


def why_not() -> str:
    return _why_not


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows src[index] * (1/255) for a contiguous uint8 `src` [N, ...] on the CPU and an integer `index` [B]
    with every value in [0, N) (checked: C reads no bounds)."""
    fn = load()
    if fn is None:
        raise RuntimeError(f"native host kernel unavailable ({_why_not})")
    if src.dtype != torch.uint8 or not src.is_contiguous() or src.device.type != "cpu":
        raise ValueError("gather_rows needs a contiguous uint8 CPU tensor")
    index = index.to(torch.int64).contiguous()
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(src)):
        raise IndexError(f"row index out of range [0, {len(src)})")
    if out is None:
        out = torch.empty((len(index), *src.shape[1:]), dtype=torch.float32)
    row = src[0].numel() if len(src) else 0
    fn(src.data_ptr(), index.data_ptr(), len(index), row, out.data_ptr(), SCALE)
    return out
