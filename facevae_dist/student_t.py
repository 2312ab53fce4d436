"""Student's t tail probability and quantile for real (Satterthwaite) degrees of freedom, vectorized, numpy only
(scipy is a test dependency, not a runtime one).

P(|T| >= t) = I_x(df/2, 1/2) with x = df / (df + t²): the regularized incomplete beta function, evaluated by its
continued fraction. The quantile inverts it by Newton steps from a Cornish-Fisher start. Both agree with scipy to
~1e-12 for df up to a few thousand (tests/test_stats.py).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
_TINY = 1e-300


def _clamp(v: np.ndarray) -> np.ndarray:
    return np.where(np.abs(v) < _TINY, _TINY, v)


def _beta_fraction(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_terms: int = 2000) -> np.ndarray:
    """The continued fraction of I_x(a, b) by the modified Lentz method; converges for x < (a + 1) / (a + b + 2),
    in O(sqrt(max(a, b))) terms."""
    c = np.ones_like(x)
    d = 1.0 / _clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d.copy()
    for m in range(1, max_terms + 1):
        even = m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))
        for coef in (even, odd):
            d = 1.0 / _clamp(1.0 + coef * d)
            c = _clamp(1.0 + coef / c)
            h = h * c * d
        if np.all(np.abs(c * d - 1.0) < 1e-15):
            break
    return h


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b), elementwise, for 0 < x < 1."""
    flip = x > (a + 1) / (a + b + 2)  # the fraction converges on this side only: I_x(a, b) = 1 - I_(1-x)(b, a)
    a, b, x = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    front = np.exp(_lgamma(a + b) - _lgamma(a) - _lgamma(b) + a * np.log(x) + b * np.log1p(-x)) / a
    v = front * _beta_fraction(a, b, x)
    return np.where(flip, 1 - v, v)


def two_sided_p(t, df) -> np.ndarray:
    """P(|T_df| >= |t|) (df > 0; t may be ±inf)."""
    t, df = np.broadcast_arrays(np.abs(np.asarray(t, dtype=np.float64)), np.asarray(df, dtype=np.float64))
    out = np.where(t == 0, 1.0, 0.0)
    inner = (t > 0) & np.isfinite(t)
    if inner.any():
        tt, dd = t[inner], df[inner]
        out[inner] = _betainc(dd / 2, np.full_like(dd, 0.5), dd / (dd + tt * tt))
    return out


def quantile(q: float, df) -> np.ndarray:
    """The q-quantile of T_df for 0.5 < q < 1 and df >= 1 (Satterthwaite df is never below its smallest part's,
    here >= 1). Newton on log(tail) against log(t): the tail is convex, so from the Cornish-Fisher start three steps
    reach double precision; five are taken."""
    df = np.asarray(df, dtype=np.float64)
    z = NormalDist().inv_cdf(q)
    t = (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
         + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))
    log_c = _lgamma((df + 1) / 2) - _lgamma(df / 2) - 0.5 * np.log(df * np.pi)
    for _ in range(5):
        tail = two_sided_p(t, df) / 2
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        t = t * np.exp((np.log(tail) - math.log(1 - q)) * tail / (pdf * t))
    return t
