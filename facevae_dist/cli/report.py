"""`facevae report RUN_DIRS... --out DIR`."""

from __future__ import annotations

from facevae_dist.progress import info


def _run(args) -> int:
    from facevae_dist.report.build import make_report  # imports torch: not at `facevae --help` time

    res = make_report(args.run_dirs, args.out)
    tested = [c for c in res["claims"] if c["verdict"] not in ("not tested", "not testable on this data")]
    info(f"wrote {res['table_md']}, {res['table_csv']}, {res['claims_md']} ({len(tested)} claim(s) tested: "
         + (", ".join(f"{c['id']} {c['verdict']}" for c in tested) or "none") + f") and {len(res['figures'])} "
         "figure(s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="tables across seeds, the paired mask effect, the paper's claims and figures from evaluated "
        "runs",
        description="From directories evaluated with `facevae eval` (run directories or exported models), grouped "
        "by (hypothesis, seed) as eval recorded them: table.md / table.csv with, per hypothesis and region "
        "(face, composite-face, composite, composite-gt-face, composite-gt, whole), the mean over seeds of 1-SSIM, 1-MS-SSIM, LPIPS, 1-VIF, 10*l1 "
        "and 10*RMSE (the paper's '10*l2') with a 95% seed-level t interval (the seed spread plus the "
        "image-sampling variance the seeds share; the seed variance pooled over the report's hypotheses where one "
        "has fewer than 3 seeds) and the paper's numbers beside every region (its protocol is unknown); the mask "
        "effect per loss as paired "
        "per-image differences; claims.md / claims.json: the paper's claims C1-C8 these runs can test "
        "(supported: every interval excludes 0 the claimed way | contradicted: one excludes 0 the other way after a "
        "Holm correction | inconclusive, with the numbers and the region), the others marked "
        "'not tested' with what would be needed (or 'not testable on this data', with why); figures/mask_effect.png, metrics_<region>.png and "
        "comparison_{raw,composite}.png. Deterministic (closed-form intervals).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated run directories or exported models "
                   "(or their metrics.json)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.set_defaults(func=_run, _parser=p)
