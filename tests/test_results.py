"""Evaluated runs grouped by (hypothesis, seed) (report/results.py): the groups in the paper's order with their seeds
sorted, per-image scores aligned by test-image key as the paper's lower-is-better columns, the images common to every
run, and the inputs it refuses in one line. Evaluations are written directly in eval's format (test_report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_report import KEYS, N_IMAGES, scores_for, write_eval

from facevae_dist.cli import main
from facevae_dist.errors import UsageError
from facevae_dist.evaluate import metrics as M
from facevae_dist.evaluate.scoring import PER_IMAGE_FILE
from facevae_dist.report.results import COLUMN_KEYS, load_groups, transform


def _edit_metrics(run: Path, **fields) -> None:
    path = run / "eval" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _rewrite_per_image(run: Path, edit) -> None:
    """Apply `edit` to the data rows of a written per_image.csv, and record the new image count beside it."""
    path = run / "eval" / PER_IMAGE_FILE
    header, *rows = list(csv.reader(path.open()))
    rows = edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    _edit_metrics(run, n_images=len(rows))


def test_groups_come_in_the_papers_order_with_seeds_sorted_and_scores_aligned_by_key(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, N_IMAGES)
    scores, dirs = {}, {}
    for name, hyp, seed in (("a", "ssim/none", 0), ("b", "l2/mask+decoder", 1), ("c", "l2/none", 1),
                            ("d", "l2/none", 0)):
        scores[(hyp, seed)] = scores_for(rng, base, 0.0)
        dirs[(hyp, seed)] = write_eval(tmp_path / name, hyp, seed, scores[(hyp, seed)])
    # passed out of the paper's order: the groups and their order come from what eval recorded
    groups, keys, notes = load_groups(list(dirs.values()))
    assert [(g.hypothesis, g.loss, g.mask_mode, g.seeds) for g in groups] == [
        ("l2/none", "l2", "none", [0, 1]), ("l2/mask+decoder", "l2", "mask+decoder", [1]),
        ("ssim/none", "ssim", "none", [0])]
    assert keys == sorted(KEYS) and notes == []
    none = groups[0]
    assert none.regions() == list(M.REGIONS) and not none.has_appearance()
    m = none.matrix(keys, "face")
    assert m.shape == (2, N_IMAGES, len(COLUMN_KEYS))
    seed1 = scores[("l2/none", 1)]
    index = {k: i for i, k in enumerate(KEYS)}
    rows = [index[k] for k in keys]
    np.testing.assert_allclose(m[1, :, COLUMN_KEYS.index("1-ssim")], 1 - seed1["face.ssim"][rows], atol=1e-5)
    np.testing.assert_allclose(m[1, :, COLUMN_KEYS.index("lpips")], seed1["face.lpips"][rows], atol=1e-5)
    np.testing.assert_allclose(m[1, :, COLUMN_KEYS.index("10*l2")], 10 * seed1["face.rmse"][rows], atol=1e-4)
    # rows follow the keys asked for, whatever order each run's file lists them in
    np.testing.assert_array_equal(none.matrix(keys[::-1], "face"), m[:, ::-1])
    v = np.array([0.25, 0.5])
    assert transform(v, "one_minus").tolist() == [0.75, 0.5] and transform(v, "times10").tolist() == [2.5, 5.0]
    assert transform(v, "identity") is v


def test_evals_without_a_seed_are_each_their_own_seed(tmp_path):
    """An eval that recorded no training seed (an older eval, an export without export.json) is told apart by its
    run directory, not refused as a duplicate."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0.4, 0.8, N_IMAGES)
    runs = [write_eval(tmp_path / name, "l2/none", None, scores_for(rng, base, 0.0)) for name in ("x", "y")]
    groups, _, _ = load_groups(runs)
    assert len(groups) == 1 and groups[0].seeds == [None, None] and len(groups[0].runs) == 2


def test_runs_scored_on_different_images_are_compared_on_the_common_ones_with_a_note(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.uniform(0.4, 0.8, N_IMAGES)
    full = write_eval(tmp_path / "full", "l2/none", 0, scores_for(rng, base, 0.0))
    part = write_eval(tmp_path / "part", "l2/mask+decoder", 0, scores_for(rng, base, 0.0))
    _rewrite_per_image(part, lambda rows: rows[10:])
    groups, keys, notes = load_groups([full, part])
    assert keys == sorted(KEYS[10:])
    assert notes == [f"runs were scored on {N_IMAGES - 10}/{N_IMAGES} images; every statistic here uses the "
                     f"{N_IMAGES - 10} images common to all runs"]
    assert [g.matrix(keys, "face").shape for g in groups] == [(1, N_IMAGES - 10, len(COLUMN_KEYS))] * 2


@pytest.mark.parametrize("case, expected", [
    ("no runs", "no run directories given"),
    ("other split", "evaluated on different splits (test, val)"),
    ("no common image", "share no scored test image"),
])
def test_what_cannot_be_grouped_is_one_usage_error(tmp_path, case, expected):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.4, 0.8, N_IMAGES)
    runs = [write_eval(tmp_path / mode, f"l2/{mode}", 0, scores_for(rng, base, 0.0))
            for mode in ("none", "mask+decoder")]
    if case == "no runs":
        runs = []
    elif case == "other split":
        _edit_metrics(runs[1], split="val")
    else:
        _rewrite_per_image(runs[1], lambda rows: [[f"other-{r[0]}", *r[1:]] for r in rows])
    with pytest.raises(UsageError, match="^[^\n]*$") as err:
        load_groups(runs)
    assert expected in str(err.value)


def test_duplicate_hypothesis_seed_is_one_clear_line(tmp_path, capsys):
    rng = np.random.default_rng(2)
    runs = [write_eval(tmp_path / f"none-{s}", "l2/none", s, scores_for(rng, np.full(N_IMAGES, .5), 0))
            for s in (0, 1)]
    dup = write_eval(tmp_path / "dup", "l2/none", 0, scores_for(rng, np.full(N_IMAGES, .5), 0))
    assert main(["report", *map(str, runs), str(dup), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "both hypothesis l2/none seed 0" in err[0]
    assert str(runs[0] / "eval" / "metrics.json") in err[0] and str(dup / "eval" / "metrics.json") in err[0]
