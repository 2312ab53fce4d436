"""The seed-level intervals (stats.py): exact on hand-made numbers, and calibrated on simulated grids, together with
the claims' verdict rules (claims.judge).

The simulation is the report's situation: ten hypotheses scored on the same images, each image's score = the
hypothesis's true mean + a shared image difficulty (large: what pairing removes) + a hypothesis x image interaction
+ a seed effect + seed x image noise. Every simulated grid is one column of the statistics, so a thousand grids are
one vectorized call."""

from __future__ import annotations

import numpy as np
import pytest

from facevae_dist import student_t
from facevae_dist.report.claims import ONE_SEED, Comparison, _verdict, judge
from facevae_dist.stats import (
    POOL_BELOW,
    Pooled,
    difference_of_differences,
    group_interval,
    group_intervals,
    holm,
    paired_difference,
    paired_differences,
    pool,
)

T975 = {1: 12.706204736174707, 4: 2.7764451051977987}  # Student t 0.975 quantiles


def test_a_paired_difference_is_a_t_interval_on_the_seed_differences():
    """No image-level spread (every image differs by the same amount): only the seeds vary. Arm b's seeds sit at
    +1 and +3 over arm a, so se² = var(1, 3) / 2 = 1 on 1 df (Welch; arm a's seeds agree exactly)."""
    a = np.zeros((2, 4))
    b = np.array([[1.0] * 4, [3.0] * 4])
    d = paired_difference(a, b)
    assert d.mean == 2.0 and d.se == pytest.approx(1.0) and d.df == pytest.approx(1.0)
    assert (d.lo, d.hi) == pytest.approx((2 - T975[1], 2 + T975[1]))
    assert d.p == pytest.approx(0.2951672353)  # P(|T_1| > 2)
    assert d.per_seed == (1.0, 3.0) and d.seed_sd == (0.0, pytest.approx(np.sqrt(2)))
    assert not d.pooled and not d.one_seed


def test_a_hypothesis_mean_counts_the_image_sample_when_the_seeds_agree():
    """Two identical seeds: nothing varies between seeds, and the interval is the one-sample t over images."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    iv = group_interval(np.stack([x, x]))
    assert iv.mean == 3.0 and iv.se == pytest.approx(np.sqrt(2.5 / 5)) and iv.df == pytest.approx(4.0)
    assert (iv.lo, iv.hi) == pytest.approx((3 - T975[4] * np.sqrt(0.5), 3 + T975[4] * np.sqrt(0.5)))


def test_seed_by_image_noise_is_not_counted_twice():
    """Seeds that differ image by image but not on average: that noise lives in the seed spread (here 0), not in the
    image-sampling part, which only holds what the seeds share (here nothing: the seed-averaged images are equal)."""
    iv = group_interval(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert iv.mean == 2.0 and iv.se == 0.0 and iv.lo == iv.hi == 2.0


def test_pooled_seed_variance_stands_in_below_pool_below_seeds():
    pooled = Pooled(np.array([0.5]), np.array([4.0]))
    one = group_interval(np.full((1, 6), 3.0), pooled=pooled)  # one seed: the pooled variance / 1, df 4
    assert one.pooled and one.se == pytest.approx(np.sqrt(0.5)) and one.df == pytest.approx(4.0)
    assert (one.lo, one.hi) == pytest.approx((3 - T975[4] * np.sqrt(0.5), 3 + T975[4] * np.sqrt(0.5)))
    pair = paired_difference(np.zeros((2, 6)), np.ones((2, 6)), pooled=pooled)  # 0.5 * (1/2 + 1/2)
    assert pair.pooled and pair.se == pytest.approx(np.sqrt(0.5)) and pair.mean == 1.0
    enough = group_interval(np.array([[1.0] * 6, [2.0] * 6, [3.0] * 6][:POOL_BELOW]), pooled=pooled)
    assert not enough.pooled and enough.se == pytest.approx(np.sqrt(1.0 / 3))  # its own: var(1, 2, 3) / 3


def test_pool_weights_each_hypothesis_by_its_degrees_of_freedom():
    g2 = np.array([[0.0] * 3, [2.0] * 3])  # seed variance 2, 1 df
    g3 = np.array([[0.0] * 3, [1.0] * 3, [2.0] * 3])  # seed variance 1, 2 df
    p = pool([g2, g3, np.zeros((1, 3))])  # the one-seed hypothesis adds nothing
    assert p.var[0] == pytest.approx((1 * 2 + 2 * 1) / 3) and p.df[0] == 3
    assert np.isnan(pool([np.zeros((1, 3))]).var[0]) and pool([np.zeros((1, 3))]).df[0] == 0


def test_one_seed_and_nothing_pooled_gives_no_interval_and_no_verdict():
    iv = group_intervals(np.ones((1, 5, 2)))[0]
    assert iv.mean == 1.0 and iv.lo is None and iv.hi is None and iv.one_seed and iv.p is None
    d = paired_difference(np.zeros((1, 5)), np.ones((1, 5)) + np.arange(5), pooled=pool([np.zeros((1, 5))]))
    assert d.one_seed and d.lo is None  # a pool of one-seed hypotheses has nothing to lend
    comp = Comparison(("l2", "mask+decoder"), ("l2", "none"), "1-ssim")
    assert judge([comp], [d]) == [ONE_SEED] and _verdict([ONE_SEED]) == ONE_SEED


def test_undefined_images_are_left_out_of_their_column_in_every_arm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 8, 2)), rng.normal(size=(3, 8, 2))
    a[1, 2, 0] = np.nan  # image 2 undefined in one seed of arm a, column 0 only
    b[:, :, 1] = np.nan  # column 1 undefined everywhere
    d0, d1 = paired_differences(a, b)
    keep = [i for i in range(8) if i != 2]
    ref = paired_differences(a[:, keep, :1], b[:, keep, :1])[0]
    assert d0.n_images == ref.n_images == 7 and d0.mean == pytest.approx(ref.mean)
    assert (d0.lo, d0.hi, d0.p) == pytest.approx((ref.lo, ref.hi, ref.p))
    assert d1.mean is None and d1.lo is None and d1.n_images == 0


def test_difference_of_differences_is_the_difference_of_the_paired_effects():
    rng = np.random.default_rng(1)
    arms = [rng.normal(size=(2, 30)) for _ in range(4)]
    d = difference_of_differences(*arms)[0]
    e_a, e_b = paired_difference(arms[0], arms[1]), paired_difference(arms[2], arms[3])
    assert d.mean == pytest.approx(e_a.mean - e_b.mean) and d.per_seed == pytest.approx(
        tuple(x - y for x, y in zip(e_a.per_seed, e_b.per_seed)))


def test_student_t_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    df = np.array([1.0, 1.3, 2.0, 3.7, 10.0, 47.5, 300.0, 2999.0])
    for q in (0.6, 0.95, 0.975, 0.995):
        assert student_t.quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-10)
    t = np.array([0.0, 0.3, 1.0, 1.96, 2.5, 4.0, 12.7, 80.0])
    assert student_t.two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), abs=1e-12)
    assert student_t.two_sided_p(np.inf, 3.0) == 0.0


def test_holm_steps_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.03 > 0.05 / 2 stops the rest
    assert holm([0.01, 0.02]) == [True, True] and holm([]) == []


# ---------------------------------------------------------------------------------------------------------------
# Calibration on simulated grids

H, N_IMAGES, GRIDS = 10, 40, 1500
SE_IMAGES = 1.0  # SE of one run's image mean from the image-level terms; the seed SD is `ratio` times it
COVERAGE = (0.93, 0.97)
FALSE_VERDICTS = 0.05 + 0.015  # 5% plus about 3 Monte-Carlo SEs at 1500 grids


def _grids(rng, k: int, ratio: float, null: bool, spread: float = 1.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Per hypothesis values [k, n, GRIDS] and the true means [H, GRIDS]; spread: the seed SD of hypothesis h runs
    geometrically from ratio / spread to ratio * spread."""
    s_inter = s_noise = np.sqrt(N_IMAGES / 2) * SE_IMAGES  # half the image-level variance each
    mu = np.zeros((H, GRIDS)) if null else rng.normal(0, 3 * SE_IMAGES, (H, GRIDS))
    difficulty = 20 * s_inter * rng.standard_normal((1, N_IMAGES, GRIDS))
    seed_sd = ratio * SE_IMAGES * np.geomspace(1 / spread, spread, H)
    return [mu[h] + difficulty + s_inter * rng.standard_normal((1, N_IMAGES, GRIDS))
            + seed_sd[h] * rng.standard_normal((k, 1, GRIDS)) + s_noise * rng.standard_normal((k, N_IMAGES, GRIDS))
            for h in range(H)], mu


def _covered(ivs, truth) -> float:
    return float(np.mean([iv.lo <= t <= iv.hi for iv, t in zip(ivs, truth)]))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_intervals_cover_and_verdicts_hold_their_level(k):
    """For each seed count and seed-SD / image-SE ratio: the 95% interval of a paired difference (and of a
    hypothesis mean) covers the truth 93-97% of the time, whichever way the seed variance is taken (pooled below
    POOL_BELOW seeds, each hypothesis's own above); with no difference anywhere a one-comparison claim gets a verdict
    (supported or contradicted) at most 5% of the time, and a nine-comparison "best of all" claim too (Holm)."""
    rng = np.random.default_rng(k)
    better = Comparison(("a", "-"), ("b", "-"), "m")
    for ratio in (0.3, 1.0, 2.0, 6.0):
        values, mu = _grids(rng, k, ratio, null=False)
        pooled = pool(values)
        diff = paired_differences(values[0], values[1], pooled=pooled)
        assert all(d.pooled == (k < POOL_BELOW) for d in diff)
        cover = _covered(diff, mu[1] - mu[0])
        mean_cover = _covered(group_intervals(values[0], pooled=pooled), mu[0])
        assert COVERAGE[0] <= cover <= COVERAGE[1], (k, ratio, cover)
        assert COVERAGE[0] <= mean_cover <= COVERAGE[1], (k, ratio, mean_cover)

        values, _ = _grids(rng, k, ratio, null=True)
        pooled = pool(values)
        one = paired_differences(values[1], values[0], pooled=pooled)  # "0 is better than 1"
        false_one = np.mean([_verdict(judge([better], [d])) != "inconclusive" for d in one])
        nine = [paired_differences(values[h], values[0], pooled=pooled) for h in range(1, H)]  # "0 is best"
        false_nine = np.mean([_verdict(judge([better] * (H - 1), list(ds))) != "inconclusive" for ds in zip(*nine)])
        assert false_one <= FALSE_VERDICTS, (k, ratio, false_one)
        assert false_nine <= FALSE_VERDICTS, (k, ratio, false_nine)


def test_own_seed_variance_stays_calibrated_when_hypotheses_differ():
    """Why pooling stops at POOL_BELOW seeds: with seed SDs spread over a factor 4 across hypotheses, the pooled
    variance understates the most variable pair's, while each hypothesis's own (Welch) still covers."""
    rng = np.random.default_rng(7)
    values, mu = _grids(rng, POOL_BELOW, 2.0, null=False, spread=2.0)
    own = _covered(paired_differences(values[H - 2], values[H - 1]), mu[H - 1] - mu[H - 2])
    assert COVERAGE[0] <= own <= COVERAGE[1], own
    forced = Pooled(pool(values).var, pool(values).df)
    a, b = values[H - 2][:2], values[H - 1][:2]  # two seeds: the pooled variance is used
    assert _covered(paired_differences(a, b, pooled=forced), mu[H - 1] - mu[H - 2]) < COVERAGE[0]
