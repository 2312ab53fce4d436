"""Statistics across seeds and test images (the report), and over one run's images (`facevae eval`).

Across runs: seed-level t intervals. Every run of a hypothesis is scored on the same test images, so each statistic
(a hypothesis mean; a paired difference b − a; a difference of differences) is a signed sum over arms of each arm's
mean over seeds of its per-seed image mean. The seed is the unit of replication, so the variance has two parts:
- seeds: each arm's sample variance of its per-seed values / k (this also carries the seed × image noise);
- images: the test set is a sample too, and the part of the per-image values common to every seed (the image
  difficulty for a mean, the hypothesis × image interaction for a difference) moves all seeds alike, unseen in their
  spread. Its variance is that of the seed-averaged per-image statistic over images / n, less the seed × image noise
  already counted in the seed part (the two-way residual mean square of each arm / k).
The interval is mean ± t·se, with Welch–Satterthwaite degrees of freedom over the parts; `p` is the two-sided p-value
of "the statistic is 0" from the same t (the claims' Holm correction uses it).

Few seeds: with two seeds an arm's variance has one degree of freedom (t quantile 12.7), so an arm with fewer than
POOL_BELOW seeds takes the seed variance pooled over the grid's hypotheses for that column (`pool`, sum(k_j − 1)
degrees of freedom), which assumes equal seed variance across hypotheses. With POOL_BELOW seeds or more every arm
uses its own (Welch), which stays calibrated when the seed variances differ. Why, from simulated grids of ten
hypotheses (tests/test_stats.py): both cover 94-96% under equal seed variance at 2-5 seeds, but Welch's intervals at
two seeds are up to 2.4x wider; with seed SDs spread over a factor 4 across hypotheses the pooled interval covers the
most variable pair only 81-89% while Welch keeps 94-97% at three seeds and more. `seed_sd` reports each arm's own
spread so the report can show whether equal variance is plausible. An arm with one seed and nothing pooled gives no
interval (`one_seed`). Closed form: deterministic, nothing resampled.

One run: `image_summary`, a seeded percentile bootstrap over images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facevae_dist import student_t

IMAGE_RESAMPLES = 1000  # image_summary: one run's interval over its test images (facevae eval)
CI = 0.95
POOL_BELOW = 3  # an arm with fewer seeds borrows the grid's pooled seed variance


@dataclass(frozen=True)
class Interval:
    mean: float | None  # point estimate (mean over seeds of the per-seed image mean); None: no image defined
    lo: float | None  # None: no interval (no image defined, or one seed and nothing pooled)
    hi: float | None
    n_seeds: int
    n_images: int
    per_seed: tuple[float, ...]  # one value per seed (a mean, or the i-th seeds of the arms side by side)
    se: float | None = None
    df: float | None = None
    p: float | None = None  # two-sided p-value of "the statistic is 0" (t on df)
    seed_sd: tuple[float | None, ...] = ()  # per arm: SD of its per-seed values (None with one seed)
    pooled: bool = False  # the seed variance is the grid's pooled one
    one_seed: bool = False  # an arm has one seed and nothing is pooled: no interval

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": None if self.lo is None else [self.lo, self.hi], "n_seeds": self.n_seeds,
                "n_images": self.n_images, "per_seed": list(self.per_seed), "se": self.se, "df": self.df,
                "p": self.p, "seed_sd": list(self.seed_sd), "pooled": self.pooled, "one_seed": self.one_seed}


@dataclass(frozen=True)
class Pooled:
    """Per column: the seed variance of one run's image mean pooled over a grid's hypotheses, and its df."""
    var: np.ndarray  # [C]; NaN where no hypothesis has two seeds
    df: np.ndarray  # [C] sum over hypotheses of (k_j − 1)

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(self.var)


def _as_3d(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v[..., None] if v.ndim == 2 else v  # [k, n] -> [k, n, 1]


def _seed_means(v: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """[C, k] per-seed means over the images `ok` [C, n] of values v [C, k, n]."""
    return np.where(ok[:, None], v, 0.0).sum(-1) / np.maximum(ok.sum(-1), 1)[:, None]


def pool(groups) -> Pooled:
    """The pooled seed variance per column over every hypothesis of a grid: groups are values [k_j, n(, C)] (each
    hypothesis on its own defined images); hypotheses with one seed add nothing."""
    groups = [np.moveaxis(_as_3d(g), 2, 0) for g in groups]  # [C, k, n]
    num = np.zeros(groups[0].shape[0])
    den = np.zeros(groups[0].shape[0])
    for v in groups:
        if v.shape[1] < 2:
            continue
        ok = ~np.isnan(v).any(axis=1)
        defined = ok.any(-1)
        s2 = _seed_means(v, ok).var(axis=1, ddof=1)
        num += np.where(defined, (v.shape[1] - 1) * s2, 0.0)
        den += np.where(defined, v.shape[1] - 1, 0)
    return Pooled(np.where(den > 0, num / np.maximum(den, 1), np.nan), den)


def _estimate(arms: list[tuple[float, np.ndarray]], pooled: Pooled | None, ci: float) -> list[Interval]:
    """sum_j sign_j * (arm j's mean over seeds of its per-seed image mean) per column, with its seed-level t
    interval. arms: (sign, values [k_j, n, C]) on the same n images; an image undefined (NaN) in any seed of any arm
    is left out of that column."""
    vs = [np.moveaxis(v, 2, 0) for _, v in arms]  # [C, k, n]: columns are a batch axis throughout
    ws = [w for w, _ in arms]
    ks = [v.shape[1] for v in vs]
    ok = np.logical_and.reduce([~np.isnan(v).any(axis=1) for v in vs])  # [C, n]
    okf = ok.astype(np.float64)
    n_ok = ok.sum(-1)
    mean = np.zeros(len(n_ok))
    per_image = np.zeros(ok.shape)  # the seed-averaged per-image statistic
    noise = np.zeros(len(n_ok))  # the seed x image noise in var(per_image), counted in the seed part already
    welch = np.zeros(len(n_ok))
    welch_den = np.zeros(len(n_ok))
    seed_means, seed_sd = [], []
    for w, v, k in zip(ws, vs, ks):
        m = _seed_means(v, ok)
        vbar = np.where(ok[:, None], v, 0.0).mean(axis=1)
        mean += w * m.mean(axis=1)
        per_image += w * vbar
        seed_means.append(m)
        if k > 1:
            s2 = m.var(axis=1, ddof=1)
            resid = (np.where(ok[:, None], v, 0.0) - m[:, :, None] - vbar[:, None, :]
                     + m.mean(axis=1)[:, None, None]) * okf[:, None]
            noise += w * w * (resid**2).sum(axis=(1, 2)) / ((k - 1) * np.maximum(n_ok - 1, 1)) / k
            part = w * w * s2 / k
            welch += part
            welch_den += part**2 / (k - 1)
            seed_sd.append(np.sqrt(s2))
        else:
            seed_sd.append(None)
    var_images = (((per_image - mean[:, None]) ** 2) * okf).sum(-1) / np.maximum(n_ok - 1, 1)
    image = np.maximum(var_images - noise, 0.0) / np.maximum(n_ok, 1)  # 0 with one image: nothing to tell
    image_den = image**2 / np.maximum(n_ok - 1, 1)
    use_pool = np.zeros(len(n_ok), dtype=bool)
    if pooled is not None and min(ks) < POOL_BELOW:
        use_pool = pooled.df > 0
        part = np.where(use_pool, pooled.var, 0.0) * sum(w * w / k for w, k in zip(ws, ks))
        welch = np.where(use_pool, part, welch)
        welch_den = np.where(use_pool, part**2 / np.where(use_pool, pooled.df, 1), welch_den)
    one_seed = ~use_pool & (min(ks) < 2)  # [C]
    se2 = welch + image
    with np.errstate(invalid="ignore", divide="ignore"):
        df = se2**2 / (welch_den + image_den)
        t = mean / np.sqrt(se2)
    good = (n_ok > 0) & ~one_seed & (se2 > 0)
    q = np.zeros(len(n_ok))
    p = np.where(mean == 0, 1.0, 0.0)  # se 0 (identical runs): the difference is exact
    if good.any():
        q[good] = student_t.quantile((1 + ci) / 2, df[good])
        p[good] = student_t.two_sided_p(t[good], df[good])
    half = q * np.sqrt(se2)
    same_k = len(set(ks)) == 1
    out = []
    for c in range(len(n_ok)):
        n_seeds = min(ks)
        if n_ok[c] == 0:
            out.append(Interval(None, None, None, n_seeds, 0, ()))
            continue
        per_seed = tuple(float(sum(w * m[c, i] for w, m in zip(ws, seed_means))) for i in range(ks[0])) \
            if same_k else ()
        sds = tuple(None if s is None else float(s[c]) for s in seed_sd)
        mu = float(mean[c])
        if one_seed[c]:
            out.append(Interval(mu, None, None, n_seeds, int(n_ok[c]), per_seed, seed_sd=sds, one_seed=True))
            continue
        exact = se2[c] == 0
        out.append(Interval(mu, float(mean[c] - half[c]), float(mean[c] + half[c]), n_seeds, int(n_ok[c]), per_seed,
                            se=float(np.sqrt(se2[c])), df=None if exact else float(df[c]), p=float(p[c]),
                            seed_sd=sds, pooled=bool(use_pool[c])))
    return out


def group_intervals(values, *, pooled: Pooled | None = None, ci: float = CI) -> list[Interval]:
    """Mean and seed-level interval of one hypothesis per column: values [n_seeds, n_images(, C)] (the same images in
    every row; NaN = undefined for that image, left out for every seed). pooled: the grid's `pool`, used when the
    hypothesis has fewer than POOL_BELOW seeds."""
    return _estimate([(1.0, _as_3d(values))], pooled, ci)


def paired_differences(a, b, *, pooled: Pooled | None = None, ci: float = CI) -> list[Interval]:
    """b minus a per column, image by image (b's seed-mean minus a's seed-mean), with a seed-level interval.
    a [k_a, n(, C)], b [k_b, n(, C)]: the same n images in the same order. `per_seed` sets the i-th seed of each
    arm side by side (independent runs: a display of the spread, not a pairing the interval relies on)."""
    a, b = _as_3d(a), _as_3d(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"paired difference needs the same images and columns in both arms, got {a.shape[1:]} "
                         f"and {b.shape[1:]}")
    return _estimate([(-1.0, a), (1.0, b)], pooled, ci)


def difference_of_differences(a0, a1, b0, b1, *, pooled: Pooled | None = None, ci: float = CI) -> list[Interval]:
    """(a1 − a0) − (b1 − b0) per column, image by image: whether an effect (0 -> 1) is larger in one setting (a)
    than in another (b), e.g. the mask effect of l2 against that of SSIM. Four arms on the same images."""
    arms = [_as_3d(v) for v in (a0, a1, b0, b1)]
    if len({v.shape[1:] for v in arms}) != 1:
        raise ValueError(f"difference of differences needs the same images and columns in all four arms, got "
                         f"{[v.shape[1:] for v in arms]}")
    return _estimate(list(zip((-1.0, 1.0, 1.0, -1.0), arms)), pooled, ci)


def group_interval(values, **kw) -> Interval:
    return group_intervals(np.asarray(values, dtype=np.float64)[..., None], **kw)[0]


def paired_difference(a, b, **kw) -> Interval:
    return paired_differences(np.asarray(a, dtype=np.float64)[..., None], np.asarray(b, dtype=np.float64)[..., None],
                              **kw)[0]


def holm(p: Sequence[float], alpha: float = 1 - CI) -> list[bool]:
    """Holm's step-down rejections at family-wise level alpha: the i-th smallest p is rejected while every smaller one
    was and it is <= alpha / (m − i)."""
    out = [False] * len(p)
    for rank, i in enumerate(sorted(range(len(p)), key=lambda j: p[j])):
        if p[i] > alpha / (len(p) - rank):
            break
        out[i] = True
    return out


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
