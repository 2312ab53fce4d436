"""`cv2.resize(..., interpolation=INTER_LINEAR)` in numpy, so shards can be squashed exactly as the paper's code did
without OpenCV at build time.

cv2's INTER_LINEAR is plain bilinear with half-pixel centers and NO antialiasing: shrinking 218 -> 144 rows reads
two source rows per output row, whatever the scale (PIL's BILINEAR widens its filter when shrinking, which smooths).
Source coordinates are computed as cv2 does (double, then rounded to float32), and edges clamp. For uint8 cv2 uses
11-bit fixed-point weights; we do its arithmetic step by step (that of its vectorised kernels, which round the
vertical pass in stages), so results agree within 1 level of 255 and are almost always identical. float32 input uses float weights, as cv2 does.
"""

from __future__ import annotations

import numpy as np

_COEF_BITS = 11  # cv2's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: left source index, right source index, weight of the right one (float32 in [0, 1))."""
    scale = src / dst
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    low, high = i0 < 0, i0 >= src - 1
    frac[low | high] = 0
    i0 = np.clip(i0, 0, src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, frac


def resize_linear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize HxW or HxWxC `a` (uint8 or float32) to size = (width, height), like cv2.resize INTER_LINEAR."""
    w, h = size
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC array, got shape {a.shape}")
    if (a.shape[1], a.shape[0]) == (w, h):
        return a.copy()
    x0, x1, fx = _taps(a.shape[1], w)
    y0, y1, fy = _taps(a.shape[0], h)
    if a.dtype == np.uint8:
        # cv2 rounds each weight to 11 bits separately (saturate_cast<short>(cbuf[k] * 2048))
        # int32 suffices: a row sum is <= 255 * 2^11, and (row >> 4) * 2^11 < 2^31
        ax1 = np.rint(fx * _COEF_SCALE).astype(np.int32)
        ax0 = np.rint((1 - fx) * _COEF_SCALE).astype(np.int32)
        ay1 = np.rint(fy * _COEF_SCALE).astype(np.int32)
        ay0 = np.rint((1 - fy) * _COEF_SCALE).astype(np.int32)
        src = a.astype(np.int32)
        shape = (1, -1) + (1,) * (a.ndim - 2)
        rows = src[:, x0] * ax0.reshape(shape) + src[:, x1] * ax1.reshape(shape)  # H x w (x C), scaled by 2^11
        col = (-1,) + (1,) * (a.ndim - 1)
        # cv2's vectorised vertical pass (VResizeLinearVec_32s8u): rows >> 4, 16-bit high multiplies, then
        # (sum + 2) >> 2: the same 2^22 overall, rounded in its steps
        rows >>= 4
        out = ((rows[y0] * ay0.reshape(col)) >> 16) + ((rows[y1] * ay1.reshape(col)) >> 16)
        return ((out + 2) >> 2).clip(0, 255).astype(np.uint8)
    if a.dtype != np.float32:
        raise ValueError(f"resize_linear supports uint8 and float32 arrays, got {a.dtype}")
    shape = (1, -1) + (1,) * (a.ndim - 2)
    rows = a[:, x0] * (1 - fx).reshape(shape) + a[:, x1] * fx.reshape(shape)
    col = (-1,) + (1,) * (a.ndim - 1)
    return (rows[y0] * (1 - fy).reshape(col) + rows[y1] * fy.reshape(col)).astype(np.float32)
