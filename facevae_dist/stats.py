"""Statistics across seeds and test images: a seeded hierarchical bootstrap.

Every run of a hypothesis is scored on the same test images (per-image scores keyed by sample key), so two
hypotheses can be compared image by image (paired). Two sources of noise matter: which images were drawn (the test
set is a sample) and which seed trained the model (training is a sample too). The hierarchical bootstrap resamples
both: seeds with replacement within each hypothesis, then images with replacement (the same resampled images for
both arms of a comparison: the pairing). With few seeds the seed level is resampled from very few values, so the
interval is narrower than the truth would be; verdicts therefore also require every seed to agree (see claims.py).

Everything is deterministic given `seed` (numpy's PCG64).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
IMAGE_RESAMPLES = 1000  # image_summary: one run's interval over its test images (facevae eval)
CI = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float | None  # point estimate (mean over seeds of the per-seed image mean)
    lo: float | None
    hi: float | None
    n_seeds: int
    n_images: int
    per_seed: tuple[float, ...]  # one value per seed (a mean, or a paired mean difference)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": None if self.lo is None else [self.lo, self.hi], "n_seeds": self.n_seeds,
                "n_images": self.n_images, "per_seed": list(self.per_seed)}


def _counts(rng: np.random.Generator, k: int, resamples: int) -> np.ndarray:
    """[R, k] counts of k items resampled with replacement (each row sums to k)."""
    out = np.empty((resamples, k), dtype=np.int64)
    chunk = max(1, min(resamples, 4_000_000 // max(k, 1)))
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        idx = rng.integers(0, k, size=(m, k)) + (np.arange(m) * k)[:, None]
        out[start:start + m] = np.bincount(idx.ravel(), minlength=m * k).reshape(m, k)
    return out


@functools.lru_cache(maxsize=2)
def _image_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """The image resamples, uint8 [R, n] (a count above 255 has probability ~0 for any n): one draw per
    (n, resamples, seed), shared by every statistic of a report, so every comparison uses the same image sets."""
    rng = np.random.default_rng([seed, 1])
    return _counts(rng, n, resamples).astype(np.uint8)


def _as_3d(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v[..., None] if v.ndim == 2 else v  # [k, n] -> [k, n, 1]


def _bootstrap(arms: list[tuple[float, np.ndarray]], *, resamples: int, seed: int, ci: float) -> list[Interval]:
    """Hierarchical bootstrap of sum_j sign_j * (seed-mean of arm j), averaged over images, for every column.
    arms: (sign, values [k_j, n, C]); all arms hold the same n images in the same order. An image undefined (NaN)
    in any seed of any arm is left out of that column (pairing needs both sides).
    Per resample r: sum_j sign_j sum_s ws_j[r,s] (wi[r] . V_js) / (wi[r] . ok), i.e. matrix products only."""
    n, cols = arms[0][1].shape[1:]
    ok = np.ones((n, cols), dtype=bool)
    for _, v in arms:
        ok &= ~np.isnan(v).any(axis=0)
    okf = ok.astype(np.float64)
    filled = [(sgn, np.where(ok[None], v, 0.0)) for sgn, v in arms]
    point = sum(sgn * v.mean(axis=0) for sgn, v in filled)  # [n, C]
    n_ok = ok.sum(axis=0)
    rng = np.random.default_rng([seed, 0])
    seed_w = [_counts(rng, v.shape[0], resamples) / v.shape[0] for _, v in filled]  # [R, k_j]
    counts = _image_counts(n, resamples, seed)
    num = np.zeros((resamples, cols))
    den = np.empty((resamples, cols))
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        sl = slice(start, min(resamples, start + chunk))
        wi = counts[sl].astype(np.float64)
        den[sl] = wi @ okf
        for (sgn, v), ws in zip(filled, seed_w):
            for s_i in range(v.shape[0]):
                num[sl] += sgn * ws[sl, s_i:s_i + 1] * (wi @ v[s_i])
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num / den
    same_k = len({v.shape[0] for _, v in filled}) == 1
    out = []
    for c in range(cols):
        if n_ok[c] == 0:
            out.append(Interval(None, None, None, min(v.shape[0] for _, v in filled), 0, tuple()))
            continue
        col_ok = ok[:, c]
        per_seed = ()
        if same_k:  # the i-th seed of each arm side by side: shows the spread between seeds
            per_seed = tuple(float(sum(sgn * v[i, col_ok, c] for sgn, v in filled).mean())
                             for i in range(filled[0][1].shape[0]))
        b = boot[:, c][~np.isnan(boot[:, c])]
        lo, hi = np.percentile(b, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])
        out.append(Interval(float(point[col_ok, c].mean()), float(lo), float(hi),
                            min(v.shape[0] for _, v in filled), int(n_ok[c]), per_seed))
    return out


def group_intervals(values, *, resamples: int = RESAMPLES, seed: int = 0, ci: float = CI) -> list[Interval]:
    """Mean and hierarchical-bootstrap interval of one hypothesis per column: values [n_seeds, n_images(, C)]
    (the same images in every row; NaN = undefined for that image, left out for every seed)."""
    return _bootstrap([(1.0, _as_3d(values))], resamples=resamples, seed=seed, ci=ci)


def paired_differences(a, b, *, resamples: int = RESAMPLES, seed: int = 0, ci: float = CI) -> list[Interval]:
    """b minus a per column, image by image (b's seed-mean minus a's seed-mean), with a hierarchical bootstrap
    interval: each arm's seeds resampled on their own, the images resampled once for both arms (paired).
    a [k_a, n(, C)], b [k_b, n(, C)]: the same n images in the same order. `per_seed` sets the i-th seed of each
    arm side by side (independent runs: a display of the spread, not a pairing the interval relies on)."""
    a, b = _as_3d(a), _as_3d(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"paired difference needs the same images and columns in both arms, got {a.shape[1:]} "
                         f"and {b.shape[1:]}")
    return _bootstrap([(-1.0, a), (1.0, b)], resamples=resamples, seed=seed, ci=ci)


def difference_of_differences(a0, a1, b0, b1, *, resamples: int = RESAMPLES, seed: int = 0,
                              ci: float = CI) -> list[Interval]:
    """(a1 − a0) − (b1 − b0) per column, image by image: whether an effect (0 -> 1) is larger in one setting (a)
    than in another (b), e.g. the mask effect of l2 against that of SSIM. Four arms on the same images, each arm's
    seeds resampled on its own, the images once for all four (paired)."""
    arms = [_as_3d(v) for v in (a0, a1, b0, b1)]
    if len({v.shape[1:] for v in arms}) != 1:
        raise ValueError(f"difference of differences needs the same images and columns in all four arms, got "
                         f"{[v.shape[1:] for v in arms]}")
    return _bootstrap(list(zip((-1.0, 1.0, 1.0, -1.0), arms)), resamples=resamples, seed=seed, ci=ci)


def group_interval(values, **kw) -> Interval:
    return group_intervals(np.asarray(values, dtype=np.float64)[..., None], **kw)[0]


def paired_difference(a, b, **kw) -> Interval:
    return paired_differences(np.asarray(a, dtype=np.float64)[..., None], np.asarray(b, dtype=np.float64)[..., None],
                              **kw)[0]


def image_summary(values: np.ndarray, resamples: int = IMAGE_RESAMPLES, seed: int = 0,
                      ci: float = 0.95) -> list[dict]:
    """One run (one seed): mean and percentile-bootstrap CI over images for each column of values [n, k]; NaNs (e.g. no face pixels) are left out
    of the means and counted. The same resampled image sets serve every column (paired resampling)."""
    values = np.asarray(values, dtype=np.float64)
    n, k = values.shape
    valid = ~np.isnan(values)
    filled = np.where(valid, values, 0.0)
    rng = np.random.default_rng(seed)
    boot = np.empty((resamples, k))
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64)  # [m, n]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot[start:start + m] = (counts @ filled) / (counts @ valid.astype(np.float64))
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    out = []
    for j in range(k):
        col = values[valid[:, j], j]
        b = boot[:, j][~np.isnan(boot[:, j])]
        out.append({
            "mean": float(col.mean()) if col.size else None,
            "std": float(col.std(ddof=1)) if col.size > 1 else None,
            "ci95": [float(np.percentile(b, lo)), float(np.percentile(b, hi))] if b.size else None,
            "n": int(col.size),
            "n_undefined": int(n - col.size),
        })
    return out
