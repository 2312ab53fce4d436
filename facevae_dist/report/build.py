"""`facevae report`: tables across seeds, the mask effect as paired differences, the paper's claims, figures.

Reads only what `facevae eval` wrote (eval/metrics.json, per_image.csv, examples.safetensors), so a report can be
rebuilt anywhere. Runs are grouped by (hypothesis, seed) as eval recorded them (results.py). Writes into OUT:
- table.md / table.csv: per hypothesis and region, the mean over seeds of each metric with a 95% seed-level t
  interval (stats.py), the paper's value beside it (every region: its protocol is unknown), and each hypothesis's
  seed spread beside the pooled one;
- the mask effect per loss (mask+decoder minus none), paired per test image, with the same kind of interval;
- the colour cast and hair sharpness of each hypothesis (appearance.py), the measures behind C9 and C10;
- claims.md / claims.json: the paper's claims C1-C12 judged on these runs (claims.py);
- figures/mask_effect.png, figures/metrics_<region>.png, figures/appearance.png,
  figures/comparison_{raw,composite}.png.
"""

from __future__ import annotations

from pathlib import Path

from facevae_dist.fileio import atomic_write_json, atomic_write_text
from facevae_dist.report.claims import claims_markdown
from facevae_dist.report.figures import appearance_figure, bar_chart, comparison_figure, mask_effect_figure
from facevae_dist.report.tables import Aggregate, csv_table, markdown_report
from facevae_dist.stats import CI, POOL_BELOW


def make_report(run_dirs, out_dir: str | Path, *, figures: str = "all") -> dict:
    """Write table.md, table.csv, claims.md, claims.json and figures/*.png for the evaluated `run_dirs` into
    `out_dir`; returns their paths and the claims. figures: "all" | "effect" (the mask-effect figure only) |
    "none"."""
    agg = Aggregate(run_dirs)
    out = Path(out_dir)
    fig_dir = out / "figures"
    written = []
    if figures != "none" and mask_effect_figure(agg, fig_dir / "mask_effect.png"):
        written.append(fig_dir / "mask_effect.png")
    if figures == "all":
        for field, name in (("recon_raw", "comparison_raw.png"), ("composite", "comparison_composite.png")):
            if comparison_figure(agg, field, fig_dir / name):
                written.append(fig_dir / name)
        for region in agg.regions:
            p = fig_dir / f"metrics_{region}.png"
            bar_chart(agg, region, p)
            written.append(p)
        if appearance_figure(agg, fig_dir / "appearance.png"):
            written.append(fig_dir / "appearance.png")
    figures = written
    rel = [str(p.relative_to(out)) for p in figures]
    atomic_write_text(out / "table.csv", csv_table(agg))
    claims_doc = {"format": "facevae-dist/claims-v2", "split": agg.groups[0].runs[0].ev["split"],
                  "n_images": len(agg.keys), "seeds": {g.hypothesis: g.seeds for g in agg.groups},
                  "intervals": {"method": "seed-level t (per-seed spread + shared image-sampling variance, "
                                          "Welch-Satterthwaite df)",
                                "pooled_below_seeds": POOL_BELOW, "ci": CI,
                                "verdicts": "supported: every interval excludes 0 the claimed way; contradicted: "
                                            "one excludes 0 the other way after Holm over the claim"},
                  "primary_region": "face", "claims": agg.claims}
    atomic_write_json(out / "claims.json", claims_doc)
    atomic_write_text(out / "claims.md", claims_markdown(agg.claims, len(agg.keys), agg.seeds_note))
    atomic_write_text(out / "table.md", markdown_report(agg, rel))
    return {"table_md": str(out / "table.md"), "table_csv": str(out / "table.csv"),
            "claims_md": str(out / "claims.md"), "claims_json": str(out / "claims.json"),
            "figures": [str(p) for p in figures], "claims": agg.claims}
