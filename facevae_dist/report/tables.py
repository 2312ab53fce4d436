"""The report's numbers: every evaluated run grouped by hypothesis (Aggregate), intervals over seeds and images, and
the Markdown and CSV tables."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from facevae_dist.errors import UsageError
from facevae_dist.evaluate.appearance import DEFINITIONS as APPEARANCE_DEFINITIONS
from facevae_dist.evaluate.appearance import HAIR_TEXTURE_FLOOR, JND_DELTA_E
from facevae_dist.evaluate.metrics import REGIONS
from facevae_dist.hypotheses import LOSS_LABELS, LOSS_ORDER, MODE_LABELS
from facevae_dist.progress import warn
from facevae_dist.report.claims import OTHER_REGIONS, PRIMARY_REGION, check_claims
from facevae_dist.report.paper import SOURCE, paper_result
from facevae_dist.report.results import COLUMN_KEYS, COLUMNS, Group, load_groups
from facevae_dist.stats import POOL_BELOW, Interval, Pooled, group_intervals, paired_differences, pool

REGION_TITLES = {
    "face": "Face pixels, raw decoder output",
    "composite-face": "Face pixels of the composite",
    "composite": "Composite: the output pasted onto the input's own background, every pixel",
    "composite-gt-face": "Face pixels of the GT-mask composite",
    "composite-gt": "GT-mask composite: every output pasted onto the input's background through the binary GT mask",
    "whole": "Whole image, raw decoder output",
}
# The appearance table's columns: (measure, header, digits); hair detail only on images whose hair has texture
APPEARANCE_COLUMNS = (("skin_dl", "skin ΔL*", 2), ("skin_da", "skin Δa* (+ red/magenta)", 2),
                      ("skin_db", "skin Δb* (+ yellow)", 2), ("hair_detail", "hair detail (1 = input)", 3))
PROTOCOL_NOTE = (
    "(in brackets) = the paper's test-set value, shown beside every region because the paper never published which "
    "pixels it scored: its released SSIM+l1+mask checkpoint name implies a validation 1−SSIM of about 0.12 on "
    "GT-mask composites, against 0.311 in its test table, so no region here is known to be its protocol.")
L2_NOTE = ("10·RMSE is reported where the paper writes \"10·l2\": the paper's 10·l2 exceeds its 10·l1 in every row, "
           "which a per-pixel MSE of [0,1] images cannot do, and its l2/l1 ratio (1.38-1.45) matches RMSE/MAE "
           "(docs/paper.md). Our MSE is in the per-run evals (metric l2).")


INTERVAL_NOTE = (
    "the seed is the unit of replication: the spread of the per-seed values (t on their degrees of freedom) plus the "
    f"image-sampling variance all seeds share; a hypothesis with fewer than {POOL_BELOW} seeds takes the seed "
    "variance pooled over every hypothesis of the report (see Seed spread), one with more its own (Welch); one seed "
    "and nothing to pool: no interval")


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(iv: Interval, digits: int = 3, signed: bool = False) -> str:
    if iv.mean is None:
        return "n/a"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if iv.lo is None:
        return f"{f.format(iv.mean)} [one seed]"
    return f"{f.format(iv.mean)} [{f.format(iv.lo)}, {f.format(iv.hi)}]"


def _seeds_text(g: Group) -> str:
    return ",".join("?" if s is None else str(s) for s in g.seeds)


def check_one_test_set(evs: list[dict]) -> list[str]:
    """Refuse, in one line naming both evals, to pair evals that scored different test sets (eval's `test_set`
    fingerprint: the split's shards by content, split and image size); the image size is checked for every eval (old
    ones record the model's). Evals from before the fingerprint cannot be checked: they are paired by sample key as
    before, and the returned note (also warned) says which."""
    def size(ev):
        return (ev.get("test_set") or {}).get("image_size") or (ev.get("model") or {}).get("image_size")

    fix = "evaluate them on the same shards (`facevae eval DIR --shards DIR`)"
    first = evs[0]
    for ev in evs[1:]:
        if size(ev) != size(first):
            raise UsageError(f"{first['path']} ({size(first)} px) and {ev['path']} ({size(ev)} px) scored different "
                             f"test sets and cannot be paired image by image; {fix}")
    known = [ev for ev in evs if (ev.get("test_set") or {}).get("fingerprint")]
    for ev in known[1:]:
        a, b = known[0]["test_set"]["fingerprint"], ev["test_set"]["fingerprint"]
        if a != b:
            raise UsageError(f"{known[0]['path']} (shards {known[0]['shards_dir']}, test set {a[:12]}) and {ev['path']} "
                             f"(shards {ev['shards_dir']}, test set {b[:12]}) scored different images under the same "
                             f"split (shards rebuilt or other shards) and cannot be paired; {fix}")
    unknown = [ev["path"] for ev in evs if ev not in known]
    if not unknown:
        return []
    note = (f"{len(unknown)} eval(s) recorded no test-set fingerprint (written before `facevae eval` recorded one): "
            f"paired by sample key without checking that they scored the same images ({', '.join(unknown)}); re-run "
            "`facevae eval` on them to check")
    warn(note)
    return [note]


class Aggregate:
    """Every statistic of one report, computed once (closed form: deterministic)."""

    def __init__(self, run_dirs):
        self.groups, self.keys, self.notes = load_groups([Path(d) for d in run_dirs])
        self.notes += check_one_test_set([r.ev for g in self.groups for r in g.runs])
        self.regions = [r for r in REGIONS if all(r in g.regions() for g in self.groups)]
        missing = [r for r in REGIONS if r not in self.regions]
        if missing:
            self.notes.append(f"region(s) {', '.join(missing)} missing from some (older) evals; re-run `facevae "
                              "eval` on them to get every region")
        # region -> the seed variance pooled over every hypothesis, per column (used by arms with < 3 seeds)
        self.pooled: dict[str, Pooled] = {region: pool([g.matrix(self.keys, region) for g in self.groups])
                                          for region in self.regions}
        # (hypothesis, region) -> {column: Interval}
        self.tables: dict[tuple[str, str], dict[str, Interval]] = {}
        for g in self.groups:
            for region in self.regions:
                ivs = group_intervals(g.matrix(self.keys, region), pooled=self.pooled[region])
                self.tables[(g.hypothesis, region)] = dict(zip(COLUMN_KEYS, ivs))
        # loss -> region -> {column: Interval} of mask+decoder minus none, paired per image
        self.effects: dict[str, dict[str, dict[str, Interval]]] = {}
        by = {(g.loss, g.mask_mode): g for g in self.groups}
        for loss in LOSS_ORDER + tuple(sorted({g.loss for g in self.groups} - set(LOSS_ORDER))):
            a, b = by.get((loss, "none")), by.get((loss, "mask+decoder"))
            if a and b:
                self.effects[loss] = {
                    region: dict(zip(COLUMN_KEYS, paired_differences(a.matrix(self.keys, region),
                                                                     b.matrix(self.keys, region),
                                                                     pooled=self.pooled[region])))
                    for region in self.regions}
        # hypothesis -> {measure: Interval} of the colour and hair measures (evals that recorded them)
        self.looks: dict[str, dict[str, Interval]] = {}
        measures = tuple(m for m, _, _ in APPEARANCE_COLUMNS)
        looks = [g for g in self.groups if g.has_appearance()]
        values = {g.hypothesis: self._appearance(g, measures) for g in looks}
        pooled_looks = pool(list(values.values())) if looks else None
        for g in looks:
            self.looks[g.hypothesis] = dict(zip(measures, group_intervals(values[g.hypothesis], pooled=pooled_looks)))
        self.claims = check_claims(self.groups, self.keys, pooled=self.pooled)
        self._paired: dict = {}

    def _appearance(self, g: Group, measures: tuple[str, ...]) -> np.ndarray:
        """[k, n, len(measures)]; hair detail NaN where the input's hair interior has no texture (as C10 judges)."""
        v = g.appearance(self.keys, measures)
        if "hair_detail" in measures:
            texture = g.appearance(self.keys, ("hair_texture",))[..., 0]
            v[..., measures.index("hair_detail")][~(texture >= HAIR_TEXTURE_FLOOR)] = np.nan
        return v

    def difference(self, better: str, other: str, region: str) -> dict[str, Interval]:
        """better − other, paired per image, every column (cached)."""
        key = (better, other, region)
        if key not in self._paired:
            by = {g.hypothesis: g for g in self.groups}
            self._paired[key] = dict(zip(COLUMN_KEYS, paired_differences(
                by[other].matrix(self.keys, region), by[better].matrix(self.keys, region),
                pooled=self.pooled[region])))
        return self._paired[key]

    @property
    def seeds_note(self) -> str:
        counts = sorted({len(g.runs) for g in self.groups})
        return f"{'/'.join(map(str, counts))} seed(s) per hypothesis"


# ---------------------------------------------------------------------------------------------------------------
# Tables

def separated_best(intervals: dict[str, Interval], difference) -> str | None:
    """The name whose mean is lowest, when its paired difference to every other (`difference(best, other)`:
    best − other, an Interval) has a 95% interval wholly below 0, the test a claim "best of all" gets (else None: the
    data do not single out a best)."""
    ranked = sorted(((iv.mean, name) for name, iv in intervals.items() if iv.mean is not None), key=lambda t: t[0])
    if len(ranked) < 2:
        return None
    best = ranked[0][1]
    return best if all((d := difference(best, other)).hi is not None and d.hi < 0
                       for _, other in ranked[1:]) else None


def region_table(agg: Aggregate, region: str) -> str:
    header = ["Loss", "Mask", "seeds"] + [c[1] for c in COLUMNS]
    best = {key: separated_best({g.hypothesis: agg.tables[(g.hypothesis, region)][key] for g in agg.groups},
                                lambda b, o, key=key: agg.difference(b, o, region)[key])
            for key in COLUMN_KEYS}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(COLUMNS)) + "|"]
    for g in agg.groups:
        paper = paper_result(g.loss, g.mask_mode) if g.loss in LOSS_ORDER else None
        cells = [LOSS_LABELS.get(g.loss, g.loss), MODE_LABELS.get(g.mask_mode, g.mask_mode), _seeds_text(g)]
        for key in COLUMN_KEYS:
            iv = agg.tables[(g.hypothesis, region)][key]
            text = _ci(iv)
            if best[key] == g.hypothesis:
                text = f"**{text}**"
            text += f" ({paper[key]:.3f})" if paper else " (—)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def effect_table(agg: Aggregate, region: str) -> str | None:
    if not agg.effects:
        return None
    lines = ["| Loss | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for loss, per_region in agg.effects.items():
        pa, pb = (paper_result(loss, m) for m in ("none", "mask+decoder")) if loss in LOSS_ORDER else (None, None)
        ivs = per_region[region]
        cells = [LOSS_LABELS.get(loss, loss), str(ivs[COLUMN_KEYS[0]].n_seeds)]
        for key in COLUMN_KEYS:
            text = _ci(ivs[key], 4, signed=True)
            if ivs[key].per_seed:
                text += " · seeds " + ", ".join(f"{v:+.4f}" for v in ivs[key].per_seed)
            text += f" · paper {pb[key] - pa[key]:+.3f}" if pa and pb else ""
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_spread_table(agg: Aggregate, region: str) -> str:
    """Per hypothesis and column: the SD of the per-seed means, and the pooled SD the intervals of hypotheses with
    fewer than POOL_BELOW seeds use (equal seed variance across hypotheses is what pooling assumes)."""
    lines = ["| Loss | Mask | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(COLUMNS)]
    for g in agg.groups:
        ivs = agg.tables[(g.hypothesis, region)]
        cells = [LOSS_LABELS.get(g.loss, g.loss), MODE_LABELS.get(g.mask_mode, g.mask_mode), _seeds_text(g)]
        cells += [_fmt(ivs[key].seed_sd[0] if ivs[key].seed_sd else None) for key in COLUMN_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    pooled = agg.pooled[region]
    lines.append("| **pooled** | | " + "/".join(map(str, sorted({len(g.runs) for g in agg.groups}))) + " | "
                 + " | ".join(f"{_fmt(float(sd))} (df {int(d)})" if d > 0 else "n/a"
                              for sd, d in zip(pooled.sd, pooled.df)) + " |")
    return "\n".join(lines)


def appearance_table(agg: Aggregate) -> str | None:
    """Per hypothesis: the colour and hair measures on the raw output (mean over seeds [95% interval])."""
    if not agg.looks:
        return None
    lines = ["| Loss | Mask | seeds | " + " | ".join(h for _, h, _ in APPEARANCE_COLUMNS) + " | ΔE of the mean shift |",
             "|---|---|---|" + "---:|" * (len(APPEARANCE_COLUMNS) + 1)]
    for g in agg.groups:
        if g.hypothesis not in agg.looks:
            continue
        ivs = agg.looks[g.hypothesis]
        cells = [LOSS_LABELS.get(g.loss, g.loss), MODE_LABELS.get(g.mask_mode, g.mask_mode), _seeds_text(g)]
        cells += [_ci(ivs[m], digits, signed=m.startswith("skin_")) for m, _, digits in APPEARANCE_COLUMNS]
        shift = [ivs[m].mean for m in ("skin_dl", "skin_da", "skin_db")]
        cells.append("n/a" if None in shift else f"{math.sqrt(sum(v * v for v in shift)):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alpha_note(agg: Aggregate, region: str) -> str | None:
    """The line under a composite table: which mask each arm's output is pasted through, and for predicted masks
    their mean alpha on face and background pixels (1 − alpha on face pixels: the input showing through)."""
    if region in ("composite-gt", "composite-gt-face"):
        return "Alpha: the binary GT mask (>= 0.5), for every arm alike."
    if region not in ("composite", "composite-face"):
        return None
    gt, soft = [], []
    for g in agg.groups:
        if g.mask_mode != "mask+decoder":
            gt.append(g.hypothesis)
            continue
        cover = [np.nanmean(r.scores[f"alpha.{m}"]) for r in g.runs for m in ("face", "background")
                 if f"alpha.{m}" in r.scores]
        soft.append(g.hypothesis + (f" (mean {np.mean(cover[0::2]):.2f} on face pixels, {np.mean(cover[1::2]):.2f} on "
                                    "the background)" if len(cover) == 2 * len(g.runs) else ""))
    parts = ([f"the binary GT mask for {', '.join(gt)}"] if gt else []) + (
        [f"its own predicted soft mask for {', '.join(soft)}"] if soft else [])
    return "Alpha: " + "; ".join(parts) + (". `composite-gt` pastes every arm through the GT mask instead."
                                           if soft else ".")


def appearance_regions_note(agg: Aggregate) -> str:
    """How many pixels the label-map regions hold on the test images (the same in every run: input properties)."""
    g = next(g for g in agg.groups if g.has_appearance())
    skin, hair, texture = (g.appearance(agg.keys, (m,))[0, :, 0] for m in ("skin_px", "hair_px", "hair_texture"))
    with_hair = ~np.isnan(texture)
    if not (skin > 0).any():
        why = (g.runs[0].ev.get("appearance") or {}).get("label_maps") or "no label maps"
        return f"none: {why}"
    return (f"skin pixels per image median {np.median(skin):.0f} (10-90%: {np.percentile(skin, 10):.0f}-"
            f"{np.percentile(skin, 90):.0f}); a hair interior in {int(with_hair.sum())} of {len(agg.keys)} images "
            + (f"(median {np.median(hair[with_hair]):.0f} px), {int((texture >= HAIR_TEXTURE_FLOOR).sum())} of them "
               f"with texture (input RMS Laplacian >= {HAIR_TEXTURE_FLOOR}; median "
               f"{np.median(texture[with_hair]):.4f}): hair detail is scored on those only"
               if with_hair.any() else ""))


def markdown_report(agg: Aggregate, figures: list[str]) -> str:
    evs = [r.ev for g in agg.groups for r in g.runs]
    n_runs = len(evs)
    shards = sorted({e["shards_dir"] for e in evs})
    settings = evs[0]["settings"]
    out = [f"# Reconstruction metrics: {len(agg.groups)} hypothesis(es), {n_runs} run(s)", "",
           f"{evs[0]['split']} split, {len(agg.keys)} images scored in every run; {agg.seeds_note}. Each cell: mean "
           f"over seeds [95% interval, seed-level t: {INTERVAL_NOTE}]. Lower is better; **bold** = the best of a "
           f"column, only where its paired difference to every other hypothesis has an interval below 0 (the same "
           f"test as a claim that it is best). {PROTOCOL_NOTE}", ""]
    out += [f"- Note: {n}" for n in agg.notes] + ([""] if agg.notes else [])
    for region in agg.regions:
        out += [f"## {REGION_TITLES[region]} (`{region}`)", "", f"Region `{region}`: {REGIONS[region]}.", "",
                region_table(agg, region), ""]
        alpha = alpha_note(agg, region)
        out += [alpha, ""] if alpha else []
    if agg.effects:
        out += ["## Mask effect: mask+decoder minus no mask, paired per image (negative: the mask helps)", "",
                "Mean over seeds of the per-image difference on the same test images [95% seed-level t interval, "
                "as above]; seeds: the i-th seed of each arm side by side; paper: the paper's difference (protocol "
                "unknown).", ""]
        for region in agg.regions:
            out += [f"### `{region}`", "", effect_table(agg, region), ""]
    looks = appearance_table(agg)
    if looks:
        out += ["## Skin colour shift and hair detail (raw output)", "",
                "The measures behind the paper's C9 and C10 (appearance.py), on regions of the label maps the shards "
                "hold, per image, then mean over seeds [95% seed-level t interval]:", ""]
        out += [f"- {h}: {APPEARANCE_DEFINITIONS[m]}." for m, h, _ in APPEARANCE_COLUMNS]
        out += [f"- ΔE of the mean shift: the CIE76 size of (ΔL*, Δa*, Δb*); about {JND_DELTA_E} is just noticeable.",
                f"- Regions: {appearance_regions_note(agg)}.", "", looks, ""]
    spread = [r for r in (PRIMARY_REGION, *OTHER_REGIONS) if r in agg.regions]
    if spread:
        out += ["## Seed spread", "",
                f"SD over seeds of each run's image mean, per hypothesis, and pooled over all hypotheses (what the "
                f"intervals of hypotheses with fewer than {POOL_BELOW} seeds use: it assumes the seed variance is "
                "about equal across hypotheses; with two seeds each SD rests on one difference).", ""]
        for region in spread:
            out += [f"### `{region}`", "", seed_spread_table(agg, region), ""]
    tested = [c for c in agg.claims if "comparisons" in c]
    out += ["## The paper's claims", "",
            f"{len(tested)} of C1-C10 and C12 tested with these runs; C11 is shown; details in claims.md.", ""]
    for c in agg.claims:
        if "comparisons" in c:
            others = ", ".join(f"{v['verdict']} ({r})" for r, v in c["other_regions"].items())
            out.append(f"- **{c['id']}**: {c['verdict']} ({c['region']} pixels)"
                       + (f", {others}" if others else "") + f" — {c['scope']}")
        else:
            out.append(f"- **{c['id']}**: {c['verdict']} — {c.get('needs') or c.get('reason') or c.get('note')}")
    out.append("")
    out += ["## Notes", "",
            f"- Shards: {', '.join(f'`{s}`' for s in shards)}. Runs: "
            + "; ".join(f"{g.hypothesis} seed {r.seed} step {r.ev['checkpoint']['step']} ({r.ev['run_dir']})"
                        for g in agg.groups for r in g.runs) + ".",
            f"- Paper values: {SOURCE}. The paper has no counterpart for the 'GT mask only' ablation (—).",
            f"- {L2_NOTE}",
            f"- Intervals: {INTERVAL_NOTE}.", "",
            "## Metric settings", "",
            f"- SSIM / MS-SSIM: Gaussian window {settings['ssim_window']} (sigma {settings['ssim_sigma']}), "
            f"MS-SSIM with {settings.get('ms_ssim_scales')} scales at {settings.get('image_size')} px. "
            f"Why: {settings['ssim_window_justification']}.",
            f"- VIF: pixel-domain VIFp, {settings.get('vif_scales')} scales, sigma_n^2 {settings['vif_sigma_n_sq']}, "
            f"on {settings['vif_color']}.",
            f"- LPIPS: {settings['lpips_net']}; weights: {settings['lpips_weights']}.",
            f"- Face region: {settings['face_region']}. Latent: {settings['latent']}.", ""]
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(out)


def csv_table(agg: Aggregate) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["hypothesis", "loss", "mask_mode", "region", "seeds", "n_images"]
    for key in COLUMN_KEYS:
        name = "10*rmse" if key == "10*l2" else key
        head += [name, f"{name}_ci_lo", f"{name}_ci_hi", f"{name}_seed_sd", f"paper_{key}"]
    w.writerow(head)
    for g in agg.groups:
        paper = paper_result(g.loss, g.mask_mode) if g.loss in LOSS_ORDER else None
        for region in agg.regions:
            ivs = agg.tables[(g.hypothesis, region)]
            line = [g.hypothesis, g.loss, g.mask_mode, region, _seeds_text(g), ivs[COLUMN_KEYS[0]].n_images]
            for key in COLUMN_KEYS:
                iv = ivs[key]
                line += [_num(iv.mean), _num(iv.lo), _num(iv.hi), _num(iv.seed_sd[0] if iv.seed_sd else None),
                         "" if paper is None else f"{paper[key]:.3f}"]
            w.writerow(line)
    return buf.getvalue()


def _num(v) -> str:
    return "" if v is None else f"{v:.6f}"
