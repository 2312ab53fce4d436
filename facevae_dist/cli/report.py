"""`facevae report RUN_DIRS... --out DIR`."""

from __future__ import annotations


def _run(args) -> int:
    from facevae_dist.progress import info
    from facevae_dist.report import make_report

    res = make_report(args.run_dirs, args.out)
    info(f"wrote {res['table_md']}, {res['table_csv']} and {len(res['figures'])} figure(s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="the paper's results table, bar charts and visual comparisons from evaluated runs",
        description="From run directories evaluated with `facevae eval`: table.md and table.csv in the paper's "
        "layout (loss x mask mode; 1-SSIM, 1-MS-SSIM, LPIPS, 1-VIF, 10*l1, 10*RMSE (the paper's '10*l2'); best "
        "per column in bold; the paper's own numbers beside ours), figures/metrics_<region>.png (one panel per "
        "metric, mask modes side by side) and figures/comparison_*.png (the same test images through every run). "
        "The main table scores outputs as the paper did (composited onto the input's background); face-region and "
        "whole-image tables follow.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated run directories (or their metrics.json)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.set_defaults(func=_run, _parser=p)
