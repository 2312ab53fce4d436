"""`facevae report`: tables across seeds, the mask effect as paired differences, the paper's claims, figures.

Reads only what `facevae eval` wrote (eval/metrics.json, per_image.csv, examples.safetensors), so a report can be
rebuilt anywhere. Runs are grouped by (hypothesis, seed) as eval recorded them (groups.py). Writes into OUT:
- table.md / table.csv: per hypothesis and region, the mean over seeds of each metric with a 95% hierarchical
  bootstrap interval over seeds and images, the paper's value beside it (every region: its protocol is unknown);
- the mask effect per loss (mask+decoder minus none), paired per test image, with the same kind of interval;
- the colour cast and hair sharpness of each hypothesis (appearance.py), the measures behind C9 and C10;
- claims.md / claims.json: the paper's claims C1-C12 judged on these runs (claims.py);
- figures/mask_effect.png, figures/metrics_<region>.png, figures/appearance.png,
  figures/comparison_{raw,composite}.png.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from facevae_dist.appearance import DEFINITIONS as APPEARANCE_DEFINITIONS
from facevae_dist.claims import check_claims, claims_markdown
from facevae_dist.errors import UsageError
from facevae_dist.evaluate import load_examples
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from facevae_dist.groups import COLUMN_KEYS, COLUMNS, LOSS_ORDER, MODE_ORDER, Group, in_order, load_groups
from facevae_dist.metrics import REGIONS
from facevae_dist.paper_results import SOURCE, paper_result
from facevae_dist.progress import warn
from facevae_dist.stats import RESAMPLES, Interval, group_intervals, paired_differences

LOSS_LABELS = {"l1": "l1", "l2": "l2", "ssim": "SSIM", "ssim+l1": "SSIM + l1", "ssim+l2": "SSIM + l2"}
MODE_LABELS = {"none": "no", "mask": "GT mask only (ablation)", "mask+decoder": "yes (mask decoder)"}
MODE_COLORS = {"none": "#E07B54", "mask": "#9DA9B5", "mask+decoder": "#2F7F8C"}
REGION_TITLES = {
    "face": "Face pixels, raw decoder output",
    "composite-face": "Face pixels of the composite",
    "composite": "Composite: the output pasted onto the input's own background, every pixel",
    "whole": "Whole image, raw decoder output",
}
PAPER_MARKER_LABEL = "paper (CelebA, protocol unknown)"
# The appearance table's columns: (measure, header, digits)
APPEARANCE_COLUMNS = (("da", "Δa* (+ magenta/red)", 2), ("db", "Δb* (+ yellow)", 2),
                      ("colour_shift", "colour cast", 2), ("delta_e", "ΔE", 2),
                      ("hair_sharpness", "hair sharpness (1 = input)", 3))
REGION_COLORS = {"face": "#2F7F8C", "composite-face": "#7FB7BE", "composite": "#E07B54", "whole": "#8C6BB1"}
PROTOCOL_NOTE = (
    "(in brackets) = the paper's test-set value, shown beside every region because the paper never published which "
    "pixels it scored: its released SSIM+l1+mask checkpoint name implies a validation 1−SSIM of about 0.12 on "
    "GT-mask composites, against 0.311 in its test table, so no region here is known to be its protocol.")
L2_NOTE = ("10·RMSE is reported where the paper writes \"10·l2\": the paper's 10·l2 exceeds its 10·l1 in every row, "
           "which a per-pixel MSE of [0,1] images cannot do, and its l2/l1 ratio (1.38-1.45) matches RMSE/MAE "
           "(reference/paper.md §4.3). Our MSE is in the per-run evals (metric l2).")


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(iv: Interval, digits: int = 3, signed: bool = False) -> str:
    if iv.mean is None:
        return "n/a"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
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
    """Every statistic of one report, computed once (deterministic: seeded bootstrap)."""

    def __init__(self, run_dirs, resamples: int = RESAMPLES, seed: int = 0):
        self.groups, self.keys, self.notes = load_groups([Path(d) for d in run_dirs])
        self.notes += check_one_test_set([r.ev for g in self.groups for r in g.runs])
        self.resamples, self.seed = resamples, seed
        self.regions = [r for r in REGIONS if all(r in g.regions() for g in self.groups)]
        missing = [r for r in REGIONS if r not in self.regions]
        if missing:
            self.notes.append(f"region(s) {', '.join(missing)} missing from some (older) evals; re-run `facevae "
                              "eval` on them to get every region")
        # (hypothesis, region) -> {column: Interval}
        self.tables: dict[tuple[str, str], dict[str, Interval]] = {}
        for g in self.groups:
            for region in self.regions:
                ivs = group_intervals(g.matrix(self.keys, region), resamples=resamples, seed=seed)
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
                                                                     resamples=resamples, seed=seed)))
                    for region in self.regions}
        # hypothesis -> {measure: Interval} of the colour and hair measures (evals that recorded them)
        self.looks: dict[str, dict[str, Interval]] = {}
        measures = tuple(m for m, _, _ in APPEARANCE_COLUMNS)
        for g in self.groups:
            if g.has_appearance():
                ivs = group_intervals(g.appearance(self.keys, measures), resamples=resamples, seed=seed)
                self.looks[g.hypothesis] = dict(zip(measures, ivs))
        self.claims = check_claims(self.groups, self.keys, resamples=resamples, seed=seed)

    @property
    def seeds_note(self) -> str:
        counts = sorted({len(g.runs) for g in self.groups})
        return f"{'/'.join(map(str, counts))} seed(s) per hypothesis"


# ---------------------------------------------------------------------------------------------------------------
# Tables

def separated_best(intervals: dict[str, Interval]) -> str | None:
    """The name whose mean is lowest, when its 95% interval lies wholly below the runner-up's (else None: the data
    do not single out a best)."""
    ranked = sorted(((iv.mean, name) for name, iv in intervals.items() if iv.mean is not None), key=lambda t: t[0])
    if len(ranked) < 2:
        return None
    best, second = intervals[ranked[0][1]], intervals[ranked[1][1]]
    return ranked[0][1] if best.hi < second.lo else None


def region_table(agg: Aggregate, region: str) -> str:
    header = ["Loss", "Mask", "seeds"] + [c[1] for c in COLUMNS]
    best = {key: separated_best({g.hypothesis: agg.tables[(g.hypothesis, region)][key] for g in agg.groups})
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


def appearance_table(agg: Aggregate) -> str | None:
    """Per hypothesis: the colour and hair measures on the raw output (mean over seeds [95% interval])."""
    if not agg.looks:
        return None
    lines = ["| Loss | Mask | seeds | " + " | ".join(h for _, h, _ in APPEARANCE_COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(APPEARANCE_COLUMNS)]
    for g in agg.groups:
        if g.hypothesis not in agg.looks:
            continue
        ivs = agg.looks[g.hypothesis]
        cells = [LOSS_LABELS.get(g.loss, g.loss), MODE_LABELS.get(g.mask_mode, g.mask_mode), _seeds_text(g)]
        cells += [_ci(ivs[m], digits, signed=m in ("da", "db")) for m, _, digits in APPEARANCE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(agg: Aggregate, figures: list[str]) -> str:
    evs = [r.ev for g in agg.groups for r in g.runs]
    n_runs = len(evs)
    shards = sorted({e["shards_dir"] for e in evs})
    settings = evs[0]["settings"]
    out = [f"# Reconstruction metrics: {len(agg.groups)} hypothesis(es), {n_runs} run(s)", "",
           f"{evs[0]['split']} split, {len(agg.keys)} images scored in every run; {agg.seeds_note}. Each cell: mean "
           f"over seeds [95% hierarchical bootstrap interval over seeds and images, {agg.resamples} resamples]. "
           f"Lower is better; **bold** = the best of a column, only where its interval lies wholly below the "
           f"runner-up's. {PROTOCOL_NOTE}", ""]
    out += [f"- Note: {n}" for n in agg.notes] + ([""] if agg.notes else [])
    for region in agg.regions:
        out += [f"## {REGION_TITLES[region]} (`{region}`)", "", f"Region `{region}`: {REGIONS[region]}.", "",
                region_table(agg, region), ""]
    if agg.effects:
        out += ["## Mask effect: mask+decoder minus no mask, paired per image (negative: the mask helps)", "",
                "Mean over seeds of the per-image difference on the same test images [95% hierarchical bootstrap "
                "interval: the seeds of each arm and the images resampled]; seeds: the i-th seed of each arm side "
                "by side; paper: the paper's difference (protocol unknown).", ""]
        for region in agg.regions:
            out += [f"### `{region}`", "", effect_table(agg, region), ""]
    looks = appearance_table(agg)
    if looks:
        out += ["## Colour cast and hair sharpness (raw output)", "",
                "The measures behind the paper's C9 and C10 (appearance.py), per image, then mean over seeds [95% "
                "hierarchical bootstrap interval]:", ""]
        out += [f"- {h}: {APPEARANCE_DEFINITIONS[m]}." for m, h, _ in APPEARANCE_COLUMNS] + ["", looks, ""]
    tested = [c for c in agg.claims if "comparisons" in c]
    out += ["## The paper's claims", "",
            f"{len(tested)} of C1-C10 and C12 tested with these runs; C11 is shown; details in claims.md.", ""]
    for c in agg.claims:
        if "comparisons" in c:
            comp = c["other_regions"].get("composite", {}).get("verdict")
            out.append(f"- **{c['id']}**: {c['verdict']} ({c['region']} pixels)"
                       + (f", {comp} (composite)" if comp else "") + f" — {c['scope']}")
        else:
            out.append(f"- **{c['id']}**: {c['verdict']} — {c.get('needs') or c.get('note')}")
    out.append("")
    out += ["## Notes", "",
            f"- Shards: {', '.join(f'`{s}`' for s in shards)}. Runs: "
            + "; ".join(f"{g.hypothesis} seed {r.seed} step {r.ev['checkpoint']['step']} ({r.ev['run_dir']})"
                        for g in agg.groups for r in g.runs) + ".",
            f"- Paper values: {SOURCE}. The paper has no counterpart for the 'GT mask only' ablation (—).",
            f"- {L2_NOTE}",
            "- Intervals: with few seeds the seed level of the bootstrap draws from very few values and understates "
            "between-seed spread; the claims therefore also require every seed to agree.", "",
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


def _csv(agg: Aggregate) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["hypothesis", "loss", "mask_mode", "region", "seeds", "n_images"]
    for key in COLUMN_KEYS:
        name = "10*rmse" if key == "10*l2" else key
        head += [name, f"{name}_ci_lo", f"{name}_ci_hi", f"paper_{key}"]
    w.writerow(head)
    for g in agg.groups:
        paper = paper_result(g.loss, g.mask_mode) if g.loss in LOSS_ORDER else None
        for region in agg.regions:
            ivs = agg.tables[(g.hypothesis, region)]
            line = [g.hypothesis, g.loss, g.mask_mode, region, _seeds_text(g), ivs[COLUMN_KEYS[0]].n_images]
            for key in COLUMN_KEYS:
                iv = ivs[key]
                line += [_num(iv.mean), _num(iv.lo), _num(iv.hi), "" if paper is None else f"{paper[key]:.3f}"]
            w.writerow(line)
    return buf.getvalue()


def _num(v) -> str:
    return "" if v is None else f"{v:.6f}"


# ---------------------------------------------------------------------------------------------------------------
# Figures

def _style():
    import matplotlib  # lazy, like every matplotlib import here: it adds ~0.5 s to every CLI start

    matplotlib.use("Agg")
    return {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
            "axes.edgecolor": "#444444", "axes.linewidth": 0.6}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _loss_tick(loss: str) -> str:
    """A loss's name under a group of bars, "SSIM + l1" on two lines so that five fit side by side."""
    return LOSS_LABELS.get(loss, loss).replace(" + ", "\n+ ")


def _panel(ax) -> None:
    ax.set_facecolor("#F4F4F4")
    ax.grid(axis="y", color="white", linewidth=1.0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _mask_effect_figure(agg: Aggregate, path: Path) -> bool:
    """One panel per metric: the paired mask effect per loss, one marker per region with its 95% interval, the
    per-seed values as small dots and the paper's difference as an open diamond. Below zero: the mask helps."""
    if not agg.effects:
        return False
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    losses = list(agg.effects)
    regions = [r for r in ("face", "composite-face", "composite") if r in agg.regions]
    with plt.rc_context(_style()):
        fig, axes = plt.subplots(2, 3, figsize=(11.5, 6.6), constrained_layout=True)
        x = np.arange(len(losses))
        step = min(0.22, 0.8 / max(len(regions), 1))
        for ax, (key, title, _, _) in zip(axes.flat, COLUMNS):
            _panel(ax)
            ax.axhline(0, color="#222222", linewidth=0.8)
            for j, region in enumerate(regions):
                off = (j - (len(regions) - 1) / 2) * step
                for i, loss in enumerate(losses):
                    iv = agg.effects[loss][region][key]
                    if iv.mean is None:
                        continue
                    ax.errorbar(x[i] + off, iv.mean, yerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], fmt="o",
                                color=REGION_COLORS[region], markersize=5, capsize=3, elinewidth=1.2)
                    if iv.per_seed:
                        ax.plot([x[i] + off + step * 0.3] * len(iv.per_seed), iv.per_seed, ".", color="#555555",
                                markersize=3)
            for i, loss in enumerate(losses):
                pa, pb = (paper_result(loss, m) for m in ("none", "mask+decoder")) if loss in LOSS_ORDER \
                    else (None, None)
                if pa and pb:
                    ax.plot(x[i] + (len(regions) / 2 + 0.2) * step, pb[key] - pa[key], "D", markersize=5,
                            markerfacecolor="white", markeredgecolor="black", markeredgewidth=0.9)
            ax.set_title(title)
            ax.set_xticks(x, [_loss_tick(l) for l in losses])
            ax.set_xlim(-0.7, len(losses) - 0.3)
            ax.tick_params(axis="x", length=0)
        handles = [Line2D([], [], marker="o", color=REGION_COLORS[r], linestyle="none", label=f"{r}")
                   for r in regions]
        handles += [Line2D([], [], marker=".", color="#555555", linestyle="none", label="single seed"),
                    Line2D([], [], marker="D", markerfacecolor="white", markeredgecolor="black", linestyle="none",
                           label=PAPER_MARKER_LABEL)]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(f"Mask effect: mask+decoder minus no mask, paired per image (below 0 = the mask helps)\n"
                     f"{len(agg.keys)} test images, {agg.seeds_note}; bars: 95% hierarchical bootstrap over seeds "
                     "and images", fontsize=10)
        _save(fig, path)
    return True


def _bar_chart(agg: Aggregate, region: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = agg.groups
    losses = in_order((g.loss for g in groups), LOSS_ORDER)
    modes = in_order((g.mask_mode for g in groups), MODE_ORDER)
    with plt.rc_context(_style()):
        fig, axes = plt.subplots(2, 3, figsize=(11.5, 6.4), constrained_layout=True)
        width = min(0.8 / max(len(modes), 1), 0.3)
        x = np.arange(len(losses))
        for ax, (key, title, _, _) in zip(axes.flat, COLUMNS):
            _panel(ax)
            top = 0.0
            for j, mode in enumerate(modes):
                off = (j - (len(modes) - 1) / 2) * width
                for i, loss in enumerate(losses):
                    g = next((g for g in groups if g.loss == loss and g.mask_mode == mode), None)
                    if g is None:
                        continue
                    iv = agg.tables[(g.hypothesis, region)][key]
                    if iv.mean is None:
                        continue
                    ax.bar(x[i] + off, iv.mean, width * 0.92, color=MODE_COLORS.get(mode, "#777777"),
                           yerr=[[max(iv.mean - iv.lo, 0)], [max(iv.hi - iv.mean, 0)]], capsize=2,
                           error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
                    top = max(top, iv.hi)
                    paper = paper_result(loss, mode) if loss in LOSS_ORDER else None
                    if paper is not None:
                        ax.plot(x[i] + off, paper[key], marker="D", markersize=4.5, markerfacecolor="white",
                                markeredgecolor="black", markeredgewidth=0.9, linestyle="none", zorder=5)
                        top = max(top, paper[key])
            ax.set_title(title)
            ax.set_xticks(x, [_loss_tick(l) for l in losses])
            ax.set_xlim(-0.6, len(losses) - 0.4)
            ax.set_ylim(0, top * 1.12 if top > 0 else 1)
            ax.tick_params(axis="x", length=0)
        handles = [Patch(color=MODE_COLORS.get(m, "#777777"), label=f"mask: {MODE_LABELS.get(m, m)}") for m in modes]
        handles.append(Line2D([], [], marker="D", markersize=5, markerfacecolor="white", markeredgecolor="black",
                              linestyle="none", label=PAPER_MARKER_LABEL))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False,
                   title="training loss on the x axis", title_fontsize=8)
        fig.suptitle(f"Region `{region}`: {REGION_TITLES[region].lower()}\nn = {len(agg.keys)}, {agg.seeds_note} "
                     "(lower is better; bars: mean over seeds, 95% hierarchical bootstrap)", fontsize=10)
        _save(fig, path)


def _appearance_figure(agg: Aggregate, path: Path) -> bool:
    """Colour cast, signed a* shift and hair sharpness per hypothesis: bars grouped by loss, the mask variants side
    by side, 95% intervals, the single seeds as dots."""
    if not agg.looks:
        return False
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = [g for g in agg.groups if g.hypothesis in agg.looks]
    losses = in_order((g.loss for g in groups), LOSS_ORDER)
    modes = [m for m in MODE_ORDER if any(g.mask_mode == m for g in groups)]
    panels = (("colour_shift", "Colour cast on face pixels (CIELAB; lower: truer colour)"),
              ("da", "Mean a* shift on face pixels (+: toward magenta/red)"),
              ("hair_sharpness", "Hair sharpness (reconstruction / input; 1 = as sharp)"))
    with plt.rc_context(_style()):
        fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.9), constrained_layout=True)
        width = min(0.8 / max(len(modes), 1), 0.3)
        x = np.arange(len(losses))
        for ax, (measure, title) in zip(axes, panels):
            _panel(ax)
            for j, mode in enumerate(modes):
                off = (j - (len(modes) - 1) / 2) * width
                for i, loss in enumerate(losses):
                    g = next((g for g in groups if g.loss == loss and g.mask_mode == mode), None)
                    iv = agg.looks[g.hypothesis][measure] if g else None
                    if iv is None or iv.mean is None:
                        continue
                    ax.bar(x[i] + off, iv.mean, width * 0.92, color=MODE_COLORS.get(mode, "#777777"),
                           yerr=[[max(iv.mean - iv.lo, 0)], [max(iv.hi - iv.mean, 0)]], capsize=2,
                           error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
                    if iv.per_seed:
                        ax.plot([x[i] + off] * len(iv.per_seed), iv.per_seed, ".", color="#333333", markersize=3)
            if measure == "hair_sharpness":
                ax.axhline(1.0, color="#222222", linewidth=0.8, linestyle="--")
            if measure == "da":
                ax.axhline(0.0, color="#222222", linewidth=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xticks(x, [_loss_tick(l) for l in losses])
            ax.tick_params(axis="x", length=0)
        handles = [Patch(color=MODE_COLORS.get(m, "#777777"), label=f"mask: {MODE_LABELS.get(m, m)}") for m in modes]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(f"Colour and hair (the paper's C9 and C10), raw output; n = {len(agg.keys)}, {agg.seeds_note}; "
                     "bars: mean over seeds, 95% hierarchical bootstrap; dots: single seeds", fontsize=10)
        _save(fig, path)
    return True


def _comparison(agg: Aggregate, field: str, path: Path, max_images: int = 6) -> bool:
    """Grid: one row per test image, input first, then each run's output (every seed; same keys everywhere)."""
    import matplotlib.pyplot as plt

    runs = [(g, r) for g in agg.groups for r in g.runs]
    if len(runs) > 12:  # a big grid: the first seed of each hypothesis
        runs = [(g, g.runs[0]) for g in agg.groups]
    loaded = [load_examples(r.ev) for _, r in runs]
    if any(not keys for keys, _ in loaded):
        return False
    common = sorted(set.intersection(*(set(k) for k, _ in loaded)))[:max_images]
    if not common:
        return False

    def img(keys, tensors, name, key):
        a = tensors[name][keys.index(key)]
        return np.repeat(a, 3, 0).transpose(1, 2, 0) if a.shape[0] == 1 else a.transpose(1, 2, 0)

    cols = 1 + len(runs)
    fig, axes = plt.subplots(len(common), cols, figsize=(max(1.45 * cols, 5.0), 1.55 * len(common) + 0.8),
                             squeeze=False)
    for i, key in enumerate(common):
        keys0, t0 = loaded[0]
        axes[i, 0].imshow(img(keys0, t0, "input", key))
        for j, (keys, tensors) in enumerate(loaded, start=1):
            name = field if field in tensors else "recon_raw"
            axes[i, j].imshow(img(keys, tensors, name, key))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
        axes[i, 0].set_ylabel(key, fontsize=6)
    axes[0, 0].set_title("input", fontsize=8, fontweight="bold")
    for j, (g, r) in enumerate(runs, start=1):
        axes[0, j].set_title(f"{LOSS_LABELS.get(g.loss, g.loss)}\nmask: {MODE_LABELS.get(g.mask_mode, g.mask_mode)}"
                             f"\nseed {r.seed}", fontsize=6.5)
    # two short lines: one long line ran off both edges of a 4-run figure
    what = ("composite: the output pasted onto the input's own background\n(alpha: the predicted mask for "
            "mask-decoder models, the GT mask otherwise)" if field == "composite"
            else "raw decoder output (what the model itself reconstructs)")
    fig.suptitle(f"The same {agg.groups[0].runs[0].ev['split']} images through every run\n{what}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def make_report(run_dirs, out_dir: str | Path, *, resamples: int = RESAMPLES, seed: int = 0,
                figures: str = "all") -> dict:
    """Write table.md, table.csv, claims.md, claims.json and figures/*.png for the evaluated `run_dirs` into
    `out_dir`; returns their paths and the claims. figures: "all" | "effect" (the mask-effect figure only) |
    "none"."""
    agg = Aggregate(run_dirs, resamples=resamples, seed=seed)
    out = Path(out_dir)
    fig_dir = out / "figures"
    written = []
    if figures != "none" and _mask_effect_figure(agg, fig_dir / "mask_effect.png"):
        written.append(fig_dir / "mask_effect.png")
    if figures == "all":
        for field, name in (("recon_raw", "comparison_raw.png"), ("composite", "comparison_composite.png")):
            if _comparison(agg, field, fig_dir / name):
                written.append(fig_dir / name)
        for region in agg.regions:
            p = fig_dir / f"metrics_{region}.png"
            _bar_chart(agg, region, p)
            written.append(p)
        if _appearance_figure(agg, fig_dir / "appearance.png"):
            written.append(fig_dir / "appearance.png")
    figures = written
    rel = [str(p.relative_to(out)) for p in figures]
    atomic_write_text(out / "table.csv", _csv(agg))
    claims_doc = {"format": "facevae-dist/claims-v1", "split": agg.groups[0].runs[0].ev["split"],
                  "n_images": len(agg.keys), "seeds": {g.hypothesis: g.seeds for g in agg.groups},
                  "bootstrap": {"method": "hierarchical (seeds per arm, then images, paired)",
                                "resamples": resamples, "seed": seed, "ci": 0.95},
                  "primary_region": "face", "claims": agg.claims}
    atomic_write_json(out / "claims.json", claims_doc)
    atomic_write_text(out / "claims.md", claims_markdown(agg.claims, len(agg.keys), agg.seeds_note))
    atomic_write_text(out / "table.md", _markdown(agg, rel))
    return {"table_md": str(out / "table.md"), "table_csv": str(out / "table.csv"),
            "claims_md": str(out / "claims.md"), "claims_json": str(out / "claims.json"),
            "figures": [str(p) for p in figures], "claims": agg.claims}
