"""`facevae curve`: learning curves from the step checkpoints a run kept.

Every complete checkpoints/step_N of each run is scored by `facevae eval` (the same images for every checkpoint and
run: the first --limit of the split in shard order), and the face-pixel 1-SSIM of the raw output is plotted
against optimizer steps and against CPU-hours (the trainer's cost counters, checkpoint meta.json). A run keeps
only `keep_last` step checkpoints: train with e.g. `--keep-last 100` to keep a whole curve.

Incremental: each (run, step) evaluation is written to OUT/evals/<run>/step_N/metrics.json and reused when the
command runs again (e.g. while the runs are still training) on the same test set (eval's fingerprint of the shards:
shards rebuilt in between are scored again), so only new checkpoints are scored.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from facevae_dist.data.shards import read_manifest
from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.evaluate.scoring import evaluate, scored_test_set
from facevae_dist.fileio import atomic_write_json, atomic_write_text, read_json
from facevae_dist.hypotheses import LOSS_LABELS, LOSS_ORDER, MODE_LABELS, MODE_ORDER, in_order
from facevae_dist.progress import info
from facevae_dist.report.figures import MODE_COLORS, figure_style, panel_style, save_figure
from facevae_dist.train import checkpoint as ckpt

CURVE_CSV = "curve.csv"
CURVE_JSON = "curve.json"
CURVE_PNG = "learning_curve.png"
SEED_STYLES = ("-", "--", ":", "-.")  # line style per seed; colour tells hypotheses (or mask modes) apart
FIELDS = ("run", "hypothesis", "seed", "step", "samples_seen", "train_hours", "cpu_hours", "n_images",
          "face_1-ssim", "face_1-ssim_lo", "face_1-ssim_hi", "face_lpips", "composite_1-ssim")


def _run_label(run_dir: Path, seen: set[str]) -> str:
    """A name for the run's files under OUT/evals: the run directory's name, with its parent's when two runs share
    one (sweep layout <hypothesis-slug>/seed-<s>)."""
    label = run_dir.name if run_dir.name not in seen else f"{run_dir.parent.name}--{run_dir.name}"
    if label.startswith("seed-"):
        label = f"{run_dir.parent.name}--{label}"
    seen.add(label)
    return label


def _score(run_dir: Path, step_dir: Path, target: Path, *, shards, split: str, limit: int, device,
           lpips_weights, bootstrap: int) -> dict:
    try:
        cached = read_json(target, fix="scored again") if target.is_file() else {}
    except FaceVAEError:
        cached = {}  # damaged: scored again, the file replaced
    fields = cached if isinstance(cached, dict) else {}
    checkpoint, test_set = fields.get("checkpoint"), fields.get("test_set")
    if (isinstance(checkpoint, dict) and isinstance(test_set, dict) and isinstance(fields.get("shards_dir"), str)
            and checkpoint.get("step") == ckpt.step_of(step_dir) and fields.get("limit") == limit
            and fields.get("split") == split and (shards is None or str(shards) == fields["shards_dir"])
            and test_set.get("fingerprint") == _fingerprint(fields["shards_dir"], split)):
        return cached
    return evaluate(run_dir, shards, split=split, limit=limit, which=step_dir.name, device=device,
                    lpips_weights=lpips_weights, out=target, bootstrap=bootstrap)


def _fingerprint(shards_dir, split: str) -> str | None:
    """The test-set fingerprint an eval of `split` of `shards_dir` records now (None: unreadable, so not reused)."""
    try:
        return scored_test_set(read_manifest(shards_dir), split, None)["fingerprint"]
    except (FaceVAEError, KeyError, TypeError, OSError):
        return None


def learning_curve(run_dirs: list[str | Path], out: str | Path, *, shards: str | Path | None = None,
                   split: str = "test", limit: int = 300, device: str | None = None,
                   lpips_weights: str | Path | None = None, bootstrap: int = 200,
                   target: float | None = None) -> dict:
    """Score every kept step checkpoint of `run_dirs`; write OUT/curve.csv, curve.json and learning_curve.png."""
    out = Path(out)
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not (r / ckpt.CHECKPOINTS).is_dir():
            raise UsageError(f"{r}: no checkpoints/ directory; pass run directories written by `facevae train` "
                             "(an exported model has one step only: use `facevae eval`)")
    rows: list[dict] = []
    seen: set[str] = set()
    for run_dir in runs:
        label = _run_label(run_dir, seen)
        steps = [c for c in ckpt.list_checkpoints(run_dir) if ckpt.is_complete(c)]
        if not steps:
            info(f"{run_dir}: no complete step checkpoint yet; skipped")
            continue
        for step_dir in steps:
            meta = ckpt.read_meta(step_dir)
            res = _score(run_dir, step_dir, out / "evals" / label / step_dir.name / "metrics.json", shards=shards,
                         split=split, limit=limit, device=device, lpips_weights=lpips_weights, bootstrap=bootstrap)
            face, comp = res["metrics"]["face"], res["metrics"]["composite"]
            train_s, cpu_s = meta.get("train_seconds"), meta.get("cpu_seconds")
            rows.append({
                "run": label, "hypothesis": res.get("hypothesis"), "seed": res.get("seed"),
                "step": int(meta["step"]), "samples_seen": meta.get("samples_seen"),
                "train_hours": None if train_s is None else train_s / 3600,
                "cpu_hours": None if cpu_s is None else cpu_s / 3600,
                "n_images": res["n_images"],
                "face_1-ssim": 1 - face["ssim"]["mean"],
                "face_1-ssim_lo": 1 - face["ssim"]["ci95"][1], "face_1-ssim_hi": 1 - face["ssim"]["ci95"][0],
                "face_lpips": face["lpips"]["mean"], "composite_1-ssim": 1 - comp["ssim"]["mean"],
            })
        last = rows[-1]
        info(f"{label}: {len(steps)} checkpoint(s), step {last['step']}: face-pixel 1-SSIM "
             f"{last['face_1-ssim']:.4f}")
    if not rows:
        raise UsageError("no run has a complete step checkpoint to score yet")
    return write_curve(rows, out, {"split": split, "limit": limit, "shards": str(shards) if shards else None},
                       target)


def write_curve(rows: list[dict], out: str | Path, meta: dict, target: float | None) -> dict:
    """OUT/curve.csv, curve.json (`meta` beside the rows) and learning_curve.png from scored rows (FIELDS); also
    used to draw runs scored earlier, whose run directories are gone, beside new ones (docs/reference)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in FIELDS})
    atomic_write_text(out / CURVE_CSV, buf.getvalue())
    metric = "1-SSIM of the raw decoder output on ground-truth face pixels"
    atomic_write_json(out / CURVE_JSON, {**meta, "metric": metric, "target": target, "rows": rows})
    _plot(rows, out / CURVE_PNG, target)
    return {"rows": rows, "csv": str(out / CURVE_CSV), "png": str(out / CURVE_PNG)}


def _loss_and_mode(hypothesis) -> tuple[str, str]:
    loss, _, mode = str(hypothesis).partition("/")
    return loss, mode


# What the curves plot: the face pixels of the raw output (the target's measure) and, below it, the composite (the
# output pasted onto the input's background: the image the mask method delivers); older rows may lack the composite
CURVE_METRICS = (("face_1-ssim", "face-pixel 1−SSIM\n(raw output)"),
                 ("composite_1-ssim", "composite 1−SSIM\n(output on the input's background)"))


def _metrics(rows: list[dict]) -> list[tuple[str, str]]:
    return [(key, label) for key, label in CURVE_METRICS if any(r.get(key) is not None for r in rows)]


def _plot(rows: list[dict], path: Path, target: float | None) -> None:
    """One panel per (metric, axis) for a few runs; a grid of several losses gets a column per loss instead (twenty
    lines on one panel cannot be read)."""
    losses = in_order((_loss_and_mode(r["hypothesis"])[0] for r in rows), LOSS_ORDER)
    if len(losses) > 1:
        _plot_by_loss(rows, losses, path, target)
    else:
        _plot_runs(rows, path, target)


def _plot_by_loss(rows: list[dict], losses: list[str], path: Path, target: float | None) -> None:
    """Columns: losses; rows: each metric vs optimizer steps, then each vs CPU-hours; colour: mask mode (as in the
    report's figures); line style: seed. A metric shares its y axis across every panel, an x quantity its x axis,
    so that losses compare across columns."""
    import matplotlib.pyplot as plt  # lazy: matplotlib adds ~0.5 s to every CLI start
    from matplotlib.lines import Line2D

    runs = list(dict.fromkeys(r["run"] for r in rows))
    seeds = list(dict.fromkeys(str(r["seed"]) for r in rows))
    modes = in_order((_loss_and_mode(r["hypothesis"])[1] for r in rows), MODE_ORDER)
    metrics = _metrics(rows)
    panels = [(x, xlabel, key, label) for x, xlabel in (("step", "optimizer steps"), ("cpu_hours", "CPU-hours"))
              for key, label in metrics]
    with plt.rc_context(figure_style()):
        fig, axes = plt.subplots(len(panels), len(losses), figsize=(2.6 * len(losses) + 1.0, 2.3 * len(panels) + 1.2),
                                 squeeze=False)
        for i, (x, _, key, _) in enumerate(panels):  # one y axis per metric, one x axis per quantity
            y_first = axes[next(j for j, p in enumerate(panels) if p[2] == key), 0]
            x_first = axes[next(j for j, p in enumerate(panels) if p[0] == x), 0]
            for ax in axes[i]:
                if ax is not y_first:
                    ax.sharey(y_first)
                if ax is not x_first:
                    ax.sharex(x_first)
        for run in runs:
            pts = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
            loss, mode = _loss_and_mode(pts[0]["hypothesis"])
            col = losses.index(loss)
            kw = dict(color=MODE_COLORS.get(mode, "#777777"), marker="o", markersize=2, linewidth=1.1,
                      linestyle=SEED_STYLES[seeds.index(str(pts[0]["seed"])) % len(SEED_STYLES)])
            for i, (x, _, key, _) in enumerate(panels):
                xy = [(p[x], p[key]) for p in pts if p.get(x) is not None and p.get(key) is not None]
                if xy:
                    axes[i, col].plot(*zip(*xy), **kw)
        for col, loss in enumerate(losses):
            axes[0, col].set_title(LOSS_LABELS.get(loss, loss))
            for i, (x, xlabel, key, label) in enumerate(panels):
                ax = axes[i, col]
                panel_style(ax)
                last_of_x = i + 1 == len(panels) or panels[i + 1][0] != x
                if last_of_x:
                    ax.set_xlabel(xlabel)
                else:
                    ax.tick_params(axis="x", labelbottom=False)
                if col == 0:
                    ax.set_ylabel(f"{label}\nlower is better")
                else:
                    ax.tick_params(axis="y", labelleft=False)
                if target is not None and key == "face_1-ssim":
                    ax.axhline(target, color="#555555", linewidth=0.8, linestyle=(0, (4, 3)))
        _log_steps(axes[0, 0], rows)  # shared x: one call sets every steps panel
        handles = [Line2D([], [], color=MODE_COLORS.get(m, "#777777"), label=f"mask: {MODE_LABELS.get(m, m)}")
                   for m in modes]
        handles += [Line2D([], [], color="#333333", linestyle=SEED_STYLES[i % len(SEED_STYLES)], label=f"seed {s}")
                    for i, s in enumerate(seeds)]
        if target is not None:
            handles.append(Line2D([], [], color="#555555", linewidth=0.8, linestyle=(0, (4, 3)),
                                  label=f"target {target:g} (face pixels)"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
        what = " and ".join(label.split("\n")[0] for _, label in metrics)
        rows_each = "row" if len(metrics) == 1 else f"{len(metrics)} rows"
        fig.suptitle(f"Learning curves per loss: {what}\nvs optimizer steps (top {rows_each}) and vs compute (bottom "
                     f"{rows_each})", fontweight="bold", fontsize=10)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        save_figure(fig, path)


def _log_steps(ax, rows: list[dict]) -> None:
    """Steps on a log axis with round ticks (1k, 2k, 5k, ...) inside the range of the rows."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = min(r["step"] for r in rows), max(r["step"] for r in rows)
    ax.set_xticks([t for t in (100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000)
                   if lo <= t <= hi] or [lo, hi])


def _plot_runs(rows: list[dict], path: Path, target: float | None) -> None:
    """A few runs of one loss: a row per metric (face pixels, composite), vs steps (left) and vs CPU-hours (right);
    colour: mask mode (as in the report's figures) unless two runs share a hypothesis; line style: seed."""
    import matplotlib.pyplot as plt  # lazy: matplotlib adds ~0.5 s to every CLI start

    metrics = _metrics(rows)
    with plt.rc_context(figure_style()):
        fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.4 * len(metrics) + 0.4), sharey="row",
                                 sharex="col", squeeze=False)
        runs = list(dict.fromkeys(r["run"] for r in rows))
        first = {run: next(r for r in rows if r["run"] == run) for run in runs}
        names = {run: f"{first[run]['hypothesis']} seed {first[run]['seed']}" for run in runs}
        by_run = len(set(names.values())) < len(runs)  # two runs of one (hypothesis, seed): tell them by run name
        if by_run:
            names = {run: run for run in runs}
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        hyps = list(dict.fromkeys(str(first[run]["hypothesis"]) for run in runs))
        modes = [_loss_and_mode(h)[1] for h in hyps]
        by_mode = not by_run and len(set(modes)) == len(hyps) and all(m in MODE_COLORS for m in modes)
        for i, run in enumerate(runs):
            pts = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
            hyp = str(first[run]["hypothesis"])
            seeds = list(dict.fromkeys(str(first[x]["seed"]) for x in runs if str(first[x]["hypothesis"]) == hyp))
            colour = (MODE_COLORS[_loss_and_mode(hyp)[1]] if by_mode
                      else palette[(i if by_run else hyps.index(hyp)) % len(palette)])
            style = "-" if by_run else SEED_STYLES[seeds.index(str(first[run]["seed"])) % len(SEED_STYLES)]
            kw = dict(color=colour, linestyle=style, marker="o", markersize=3, label=names[run])
            for row, (key, _) in enumerate(metrics):
                steps = [(p["step"], p[key]) for p in pts if p.get(key) is not None]
                if steps:
                    axes[row, 0].plot(*zip(*steps), **kw)
                if key == "face_1-ssim":  # eval's interval over images, recorded for the face pixels only
                    axes[row, 0].fill_between([p["step"] for p in pts], [p["face_1-ssim_lo"] for p in pts],
                                              [p["face_1-ssim_hi"] for p in pts], color=colour, alpha=0.12,
                                              linewidth=0)
                cpu = [(p["cpu_hours"], p[key]) for p in pts if p["cpu_hours"] is not None and p.get(key) is not None]
                if cpu:
                    axes[row, 1].plot(*zip(*cpu), **kw)
        for row, (key, label) in enumerate(metrics):
            for col, xlabel in enumerate(("optimizer steps", "CPU-hours (all threads, all ranks)")):
                ax = axes[row, col]
                panel_style(ax)
                if row == len(metrics) - 1:
                    ax.set_xlabel(xlabel)
                if target is not None and key == "face_1-ssim":
                    ax.axhline(target, color="#555555", linewidth=0.8, linestyle=(0, (4, 3)))
                    # at the left edge: the curves start well above the target, so they leave it free there
                    ax.text(0.01, target, f"target {target:g}", va="bottom", ha="left", fontsize=8, color="#555555",
                            transform=ax.get_yaxis_transform())
            axes[row, 0].set_ylabel(f"{label}\nlower is better")
        _log_steps(axes[0, 0], rows)
        axes[0, 0].set_title("Learning curve vs steps (band: 95% interval over images)")
        axes[0, 1].set_title("Learning curve vs compute")
        if not any(r["cpu_hours"] is not None for r in rows):
            for ax in axes[:, 1]:
                ax.text(0.5, 0.5, "no CPU-hours recorded\n(checkpoints written before the trainer counted them)",
                        transform=ax.transAxes, ha="center", va="center", fontsize=8, color="#555555")
        axes[0, 0].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        save_figure(fig, path)
