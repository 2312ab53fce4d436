"""The report's figures (matplotlib, imported lazily: it adds about half a second to every start): the mask effect,
bar charts per region, colour and hair measures, example reconstructions; the shared style the learning curves use
too."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np

from facevae_dist.evaluate.appearance import JND_DELTA_E
from facevae_dist.evaluate.scoring import load_examples
from facevae_dist.fileio import atomic_write_bytes
from facevae_dist.hypotheses import LOSS_LABELS, LOSS_ORDER, MODE_LABELS, MODE_ORDER, in_order
from facevae_dist.report.claims import NOT_TESTABLE
from facevae_dist.report.paper import paper_result
from facevae_dist.report.results import COLUMNS
from facevae_dist.report.tables import REGION_TITLES, Aggregate
from facevae_dist.stats import POOL_BELOW

MODE_COLORS = {"none": "#E07B54", "mask": "#9DA9B5", "mask+decoder": "#2F7F8C"}
# Regions (the mask-effect figure, where colour cannot be the mask mode): blues for face pixels, purples for whole
# images, none of them a mask mode's colour
REGION_COLORS = {"face": "#2B59C3", "composite-face": "#8DA7E8", "composite": "#6A3D9A", "composite-gt-face": "#5FA8D3",
                 "composite-gt": "#C38BD6", "whole": "#3D3D3D"}
# The paper's values sit on another scale than ours in most regions (its protocol is unknown): under each bar panel
# they get a strip of their own, and the legend says not to compare heights across the two
PAPER_STRIP_LABEL = ("paper (CelebA, protocol unknown): the strip under each panel, on its own scale;\n"
                     "compare its order, not its height, with the bars")


def interval_caption(agg: Aggregate) -> str:
    """What the drawn error bars are (stats.py), for a figure's subtitle: a seed-level t interval whose seed variance
    is pooled over the report's hypotheses when they have fewer than POOL_BELOW seeds."""
    counts = sorted({len(g.runs) for g in agg.groups})
    if counts[-1] < 2:
        return "no interval (one seed per hypothesis, no seed variance to pool)"
    if counts[-1] < POOL_BELOW:
        pooled = f"seed variance pooled over the hypotheses, fewer than {POOL_BELOW} seeds each"
    elif counts[0] < POOL_BELOW:
        pooled = f"seed variance pooled for hypotheses with fewer than {POOL_BELOW} seeds"
    else:
        pooled = "each hypothesis's own seed variance"
    return f"95% seed-level t interval ({pooled})"


def _yerr(iv) -> list | None:
    """An Interval's error bar for matplotlib; None (no bar) without an interval (one seed, nothing pooled)."""
    if iv.lo is None:
        return None
    return [[max(iv.mean - iv.lo, 0)], [max(iv.hi - iv.mean, 0)]]


def figure_style():
    import matplotlib  # lazy, like every matplotlib import here: it adds ~0.5 s to every CLI start

    matplotlib.use("Agg")
    return {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
            "axes.edgecolor": "#444444", "axes.linewidth": 0.6}


def figure_words(fig) -> str:
    """Every title, label, note and legend entry of a figure, one per line: stored in the PNG (its Description text
    chunk) as a text alternative to the image, which tests read too."""
    texts = [fig.get_suptitle(), *(t.get_text() for t in fig.texts)]
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_ylabel(), ax.get_xlabel(), *(t.get_text() for t in ax.texts)]
    for leg in legends:
        texts += [leg.get_title().get_text(), *(t.get_text() for t in leg.get_texts())]
    return "\n".join(dict.fromkeys(t for t in texts if t and t.strip()))


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Title": fig.get_suptitle() or path.stem,
                                                      "Description": figure_words(fig)})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def loss_tick(loss: str) -> str:
    """A loss's name under a group of bars, "SSIM + l1" on two lines so that five fit side by side."""
    return LOSS_LABELS.get(loss, loss).replace(" + ", "\n+ ")


def panel_style(ax) -> None:
    ax.set_facecolor("#F4F4F4")
    ax.grid(axis="y", color="white", linewidth=1.0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def mask_effect_figure(agg: Aggregate, path: Path) -> bool:
    """One panel per metric: the paired mask effect per loss, one marker per region with its 95% interval, the
    per-seed values as small dots and the paper's difference as an open diamond. Below zero: the mask helps."""
    if not agg.effects:
        return False
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    losses = list(agg.effects)
    regions = [r for r in ("face", "composite-face", "composite", "composite-gt") if r in agg.regions]
    with plt.rc_context(figure_style()):
        fig, axes = plt.subplots(2, 3, figsize=(11.5, 6.6), constrained_layout=True)
        x = np.arange(len(losses))
        step = min(0.22, 0.8 / max(len(regions), 1))
        for ax, (key, title, _, _) in zip(axes.flat, COLUMNS):
            panel_style(ax)
            ax.axhline(0, color="#222222", linewidth=0.8)
            for j, region in enumerate(regions):
                off = (j - (len(regions) - 1) / 2) * step
                for i, loss in enumerate(losses):
                    iv = agg.effects[loss][region][key]
                    if iv.mean is None:
                        continue
                    ax.errorbar(x[i] + off, iv.mean, yerr=_yerr(iv), fmt="o",
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
            ax.set_xticks(x, [loss_tick(l) for l in losses])
            ax.set_xlim(-0.7, len(losses) - 0.3)
            ax.tick_params(axis="x", length=0)
        handles = [Line2D([], [], marker="o", color=REGION_COLORS[r], linestyle="none", label=f"{r}")
                   for r in regions]
        handles += [Line2D([], [], marker=".", color="#555555", linestyle="none", label="single seed"),
                    Line2D([], [], marker="D", markerfacecolor="white", markeredgecolor="black", linestyle="none",
                           label="paper's difference (CelebA, protocol unknown), same axis")]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(f"Mask effect: mask+decoder minus no mask, paired per image (below 0 = the mask helps)\n"
                     f"{len(agg.keys)} test images, {agg.seeds_note}; bars: {interval_caption(agg)}",
                     fontsize=10)
        save_figure(fig, path)
    return True


def bar_chart(agg: Aggregate, region: str, path: Path) -> None:
    """One panel per metric: our mean over seeds per (loss, mask mode) with its interval, on an axis of its own
    (from 0); the paper's values, where it has the run, as diamonds in a strip under the panel on their own scale
    (under its unknown protocol they are many times ours on the composite regions: on one axis they flattened our
    bars)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    groups = agg.groups
    losses = in_order((g.loss for g in groups), LOSS_ORDER)
    modes = in_order((g.mask_mode for g in groups), MODE_ORDER)
    papers = {(loss, mode): paper_result(loss, mode) for loss in losses for mode in modes
              if loss in LOSS_ORDER and any(g.loss == loss and g.mask_mode == mode for g in groups)}
    papers = {k: v for k, v in papers.items() if v is not None}
    with plt.rc_context(figure_style()):
        fig = plt.figure(figsize=(11.5, 7.4 if papers else 6.4), layout="constrained")
        cells = fig.add_gridspec(2, 3, hspace=0.06)
        width = min(0.8 / max(len(modes), 1), 0.3)
        x = np.arange(len(losses))
        offsets = {mode: (j - (len(modes) - 1) / 2) * width for j, mode in enumerate(modes)}
        for cell, (key, title, _, _) in zip(cells, COLUMNS):
            rows = cell.subgridspec(2, 1, height_ratios=(3.6, 1), hspace=0.0) if papers else [cell]
            ax = fig.add_subplot(rows[0])
            panel_style(ax)
            top = 0.0
            for mode in modes:
                for i, loss in enumerate(losses):
                    g = next((g for g in groups if g.loss == loss and g.mask_mode == mode), None)
                    if g is None:
                        continue
                    iv = agg.tables[(g.hypothesis, region)][key]
                    if iv.mean is None:
                        continue
                    ax.bar(x[i] + offsets[mode], iv.mean, width * 0.92, color=MODE_COLORS.get(mode, "#777777"),
                           yerr=_yerr(iv), capsize=2,
                           error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
                    top = max(top, iv.mean if iv.hi is None else iv.hi)
            ax.set_title(title)
            ax.set_xlim(-0.6, len(losses) - 0.4)
            ax.set_ylim(0, top * 1.12 if top > 0 else 1)
            ax.set_xticks(x, [loss_tick(l) for l in losses])
            ax.tick_params(axis="x", length=0)
            if not papers:
                continue
            ax.tick_params(axis="x", labelbottom=False)
            strip = fig.add_subplot(rows[1], sharex=ax)
            strip.set_facecolor("#FBFBFB")
            strip.grid(axis="y", color="#E4E4E4", linewidth=0.6)
            strip.set_axisbelow(True)
            for side in ("top", "right"):
                strip.spines[side].set_visible(False)
            values = []
            for (loss, mode), paper in papers.items():
                strip.plot(x[losses.index(loss)] + offsets[mode], paper[key], marker="D", markersize=4.5,
                           markerfacecolor=MODE_COLORS.get(mode, "#777777"), markeredgecolor="black",
                           markeredgewidth=0.7, linestyle="none")
                values.append(paper[key])
            pad = max(0.2 * (max(values) - min(values)), 0.01 * max(values), 1e-3)
            strip.set_ylim(min(values) - pad, max(values) + pad)
            strip.yaxis.set_major_locator(MaxNLocator(3))
            strip.tick_params(axis="y", labelsize=7)
            strip.tick_params(axis="x", length=0)
            strip.set_ylabel("paper\n(own scale)", fontsize=7, color="#444444")
            plt.setp(strip.get_xticklabels(), visible=True)
        handles = [Patch(color=MODE_COLORS.get(m, "#777777"), label=f"mask: {MODE_LABELS.get(m, m)}") for m in modes]
        if papers:
            handles.append(Line2D([], [], marker="D", markersize=5, markerfacecolor="#BBBBBB",
                                  markeredgecolor="black", linestyle="none", label=PAPER_STRIP_LABEL))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False,
                   title="training loss on the x axis", title_fontsize=8)
        what = REGION_TITLES[region][0].lower() + REGION_TITLES[region][1:]
        fig.suptitle(f"Region `{region}`: {what}\nn = {len(agg.keys)}, {agg.seeds_note}; "
                     f"lower is better; bars: mean over seeds\nerror bars: {interval_caption(agg)}", fontsize=10)
        save_figure(fig, path)


def _hair_not_testable(agg: Aggregate) -> str | None:
    """Why C10 has no verdict on these test images (claims.py's reason), or None when it can be judged: then the
    hair panel's bars would look like a result the data cannot give."""
    c10 = next((c for c in agg.claims if c["id"] == "C10"), None)
    return c10["reason"] if c10 and c10["verdict"] == NOT_TESTABLE else None


def appearance_figure(agg: Aggregate, path: Path) -> bool:
    """Signed skin a* and b* shifts and hair detail per hypothesis: bars grouped by loss, the mask variants side by
    side, 95% intervals, the single seeds as dots; the shifts beside ± a just-noticeable difference. Where C10 is
    not testable on these images (hair without interior texture), the hair panel says why instead of drawing bars."""
    if not any(iv.mean is not None for ivs in agg.looks.values() for iv in ivs.values()):
        return False  # no label maps in the shards: nothing to draw
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = [g for g in agg.groups if g.hypothesis in agg.looks]
    losses = in_order((g.loss for g in groups), LOSS_ORDER)
    modes = [m for m in MODE_ORDER if any(g.mask_mode == m for g in groups)]
    panels = (("skin_da", "Skin a* shift\n(+: toward red/magenta)", "mean Δa* on skin"),
              ("skin_db", "Skin b* shift\n(+: toward yellow)", "mean Δb* on skin"),
              ("hair_detail", "Hair-interior detail kept\n(1 = the input's; images with hair texture)",
               "hair detail"))
    untestable = _hair_not_testable(agg)
    with plt.rc_context(figure_style()):
        fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.6), layout="constrained")
        width = min(0.8 / max(len(modes), 1), 0.3)
        x = np.arange(len(losses))
        for ax, (measure, title, ylabel) in zip(axes, panels):
            ax.set_title(title, fontsize=9)
            if measure == "hair_detail" and untestable:
                ax.axis("off")
                ax.text(0.5, 0.5, textwrap.fill(f"Not drawn: C10 (sharper hair with the mask) is not testable on "
                                                f"this data. {untestable[0].upper() + untestable[1:]}.", 46),
                        transform=ax.transAxes, ha="center", va="center", fontsize=8.5, color="#333333",
                        bbox={"boxstyle": "round,pad=0.8", "facecolor": "#F4F4F4", "edgecolor": "#BBBBBB"})
                continue
            panel_style(ax)
            for j, mode in enumerate(modes):
                off = (j - (len(modes) - 1) / 2) * width
                for i, loss in enumerate(losses):
                    g = next((g for g in groups if g.loss == loss and g.mask_mode == mode), None)
                    iv = agg.looks[g.hypothesis][measure] if g else None
                    if iv is None or iv.mean is None:
                        continue
                    ax.bar(x[i] + off, iv.mean, width * 0.92, color=MODE_COLORS.get(mode, "#777777"),
                           yerr=_yerr(iv), capsize=2,
                           error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
                    if iv.per_seed:
                        ax.plot([x[i] + off] * len(iv.per_seed), iv.per_seed, ".", color="#333333", markersize=3)
            if measure == "hair_detail":
                ax.axhline(1.0, color="#222222", linewidth=0.8, linestyle="--")
            else:
                ax.axhline(0.0, color="#222222", linewidth=0.8)
                for jnd in (-JND_DELTA_E, JND_DELTA_E):  # about the smallest visible colour difference
                    ax.axhline(jnd, color="#888888", linewidth=0.7, linestyle=":")
            ax.set_ylabel(ylabel)
            ax.set_xticks(x, [loss_tick(l) for l in losses])
            ax.tick_params(axis="x", length=0)
        handles = [Patch(color=MODE_COLORS.get(m, "#777777"), label=f"mask: {MODE_LABELS.get(m, m)}") for m in modes]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(f"Skin colour and hair detail of the raw output (the paper's C9 and C10); n = {len(agg.keys)}, "
                     f"{agg.seeds_note}\nbars: mean over seeds, error bars: {interval_caption(agg)}\n"
                     f"dots: single seeds; dotted: ±{JND_DELTA_E} (a just-noticeable colour difference)",
                     fontsize=10)
        save_figure(fig, path)
    return True


def comparison_figure(agg: Aggregate, field: str, path: Path, max_images: int = 6) -> bool:
    """Grid: one row per test image, input first, then each run's output (every seed; same keys everywhere)."""
    import matplotlib.pyplot as plt

    runs = [(g, r) for g in agg.groups for r in g.runs]
    through = "every run"
    if len(runs) > 12:  # a big grid: the first seed of each hypothesis
        runs = [(g, g.runs[0]) for g in agg.groups]
        through = "every hypothesis (its first seed)"
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
    fig.suptitle(f"The same {agg.groups[0].runs[0].ev['split']} images through {through}\n{what}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return True
