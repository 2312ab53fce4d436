"""Evaluated runs grouped by (hypothesis, seed), with their per-image scores aligned on common test images.

Groups come from what `facevae eval` recorded (the config's `hypothesis` and training `seed`), never from paths, so
a sweep's elements, a demo's runs and exported models handed over by someone else group the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facevae_dist.errors import UsageError
from facevae_dist.evaluate.metrics import REGIONS
from facevae_dist.evaluate.scoring import load_eval, load_per_image
from facevae_dist.hypotheses import LOSS_ORDER, MODE_ORDER

# The paper's six columns: (key, Markdown header, our metric, transform). All lower is better.
COLUMNS = (
    ("1-ssim", "1−SSIM", "ssim", "one_minus"),
    ("1-ms-ssim", "1−MS-SSIM", "ms_ssim", "one_minus"),
    ("lpips", "LPIPS", "lpips", "identity"),
    ("1-vif", "1−VIF", "vif", "one_minus"),
    ("10*l1", "10·l1", "l1", "times10"),
    ("10*l2", "10·RMSE (paper: 10·l2)", "rmse", "times10"),
)
COLUMN_KEYS = tuple(c[0] for c in COLUMNS)


def transform(values: np.ndarray, how: str) -> np.ndarray:
    if how == "one_minus":
        return 1.0 - values
    if how == "times10":
        return 10.0 * values
    return values


@dataclass
class Run:
    ev: dict
    keys: list[str]
    scores: dict[str, np.ndarray]  # "region.metric" -> [n] per image, aligned with keys

    @property
    def seed(self):
        return self.ev.get("seed")


@dataclass
class Group:
    hypothesis: str
    loss: str
    mask_mode: str
    runs: list[Run] = field(default_factory=list)  # sorted by seed

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def regions(self) -> list[str]:
        """Regions every run of the group was scored on (legacy evals lack `composite-face`)."""
        return [r for r in REGIONS if all(f"{r}.ssim" in run.scores for run in self.runs)]

    def has_appearance(self) -> bool:
        """Every run was scored with the label-map colour and hair measures (appearance.py; older evals lack them,
        or hold the measures they replaced)."""
        return all("appearance.skin_da" in run.scores for run in self.runs)

    def appearance(self, keys: list[str], measures: tuple[str, ...]) -> np.ndarray:
        """[n_seeds, n_images, len(measures)] of appearance measures (appearance.MEASURES) on `keys`, as recorded
        (signed shifts; hair_detail is higher-is-sharper); NaN where a measure is undefined for an image."""
        out = np.empty((len(self.runs), len(keys), len(measures)))
        for i, run in enumerate(self.runs):
            index = {k: j for j, k in enumerate(run.keys)}
            rows = np.array([index[k] for k in keys], dtype=np.int64)
            for c, m in enumerate(measures):
                out[i, :, c] = run.scores[f"appearance.{m}"][rows]
        return out

    def matrix(self, keys: list[str], region: str) -> np.ndarray:
        """[n_seeds, n_images, len(COLUMNS)] of lower-is-better values (1−SSIM, ..., 10·RMSE) on `keys`."""
        out = np.empty((len(self.runs), len(keys), len(COLUMNS)))
        for i, run in enumerate(self.runs):
            index = {k: j for j, k in enumerate(run.keys)}
            rows = np.array([index[k] for k in keys], dtype=np.int64)
            for c, (_, _, metric, how) in enumerate(COLUMNS):
                out[i, :, c] = transform(run.scores[f"{region}.{metric}"][rows], how)
        return out


def _order(g: Group):
    li = LOSS_ORDER.index(g.loss) if g.loss in LOSS_ORDER else len(LOSS_ORDER)
    mi = MODE_ORDER.index(g.mask_mode) if g.mask_mode in MODE_ORDER else len(MODE_ORDER)
    return li, g.loss, mi, g.hypothesis


def load_groups(run_dirs) -> tuple[list[Group], list[str], list[str]]:
    """(groups in the paper's order, keys common to every run, notes). Refuses two runs of one (hypothesis, seed)
    and runs scored on different splits, with the two paths and the fix in one line."""
    if not run_dirs:
        raise UsageError("no run directories given; pass one or more directories evaluated with `facevae eval`")
    runs = []
    for d in run_dirs:
        ev = load_eval(d)
        keys, scores = load_per_image(ev)
        runs.append(Run(ev, keys, scores))
    splits = {(r.ev["split"]) for r in runs}
    if len(splits) > 1:
        raise UsageError(f"the runs were evaluated on different splits ({', '.join(sorted(splits))}); evaluate them "
                         "all on one split (`facevae eval DIR --split test`)")
    seen: dict[tuple, Run] = {}
    groups: dict[str, Group] = {}
    for r in runs:
        hyp = r.ev.get("hypothesis") or f"{r.ev['loss']}/{r.ev['mask_mode']}"
        # An eval without a recorded seed (legacy or an export without export.json) is its own seed.
        key = (hyp, r.seed if r.seed is not None else r.ev["run_dir"])
        if key in seen:
            raise UsageError(f"{seen[key].ev['path']} and {r.ev['path']} are both hypothesis {hyp} seed {key[1]}: "
                             "pass only one of them (or train the other with another --seed)")
        seen[key] = r
        g = groups.setdefault(hyp, Group(hyp, r.ev["loss"], r.ev["mask_mode"]))
        g.runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed is None, str(r.seed) if r.seed is None else r.seed))
    common = set(runs[0].keys)
    for r in runs[1:]:
        common &= set(r.keys)
    notes = []
    if not common:
        raise UsageError("the runs share no scored test image (different shards?); evaluate them on the same "
                         "shards with `facevae eval DIR --shards DIR`")
    sizes = sorted({len(r.keys) for r in runs})
    if len(sizes) > 1 or sizes[0] != len(common):
        notes.append(f"runs were scored on {'/'.join(map(str, sizes))} images; every statistic here uses the "
                     f"{len(common)} images common to all runs")
    return sorted(groups.values(), key=_order), sorted(common), notes
