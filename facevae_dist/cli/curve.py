"""`facevae curve RUN_DIRS... --out DIR`: learning curves from the step checkpoints of runs."""

from __future__ import annotations

from facevae_dist.cli.argtypes import add_device_argument, positive_int
from facevae_dist.progress import info


def _run(args) -> int:
    from facevae_dist.report.curves import learning_curve  # imports torch: not at `facevae --help` time

    res = learning_curve(args.run_dirs, args.out, shards=args.shards, split=args.split, limit=args.limit,
                         device=args.device, lpips_weights=args.lpips_weights, bootstrap=args.bootstrap,
                         target=args.target)
    info(f"{len(res['rows'])} checkpoint(s) scored -> {res['csv']}, {res['png']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "curve", help="learning curves: score every kept step checkpoint of runs, plot face 1-SSIM vs steps and "
        "CPU-hours",
        description="Score every complete checkpoints/step_N of each run with `facevae eval` (the first --limit "
        "images of the split, the same for every checkpoint) and write OUT/curve.csv, curve.json and "
        "learning_curve.png: the face-pixel 1-SSIM of the raw output (with its 95%% interval over images) against "
        "optimizer steps and against CPU-hours (counted by the trainer, summed over resumes). Runs keep "
        "`--keep-last` step checkpoints (default 2): train with e.g. --keep-last 100 to keep a whole curve. "
        "Scores are cached in OUT/evals/ and reused, so rerunning while the runs train scores only new "
        "checkpoints.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `facevae train` "
                   "(e.g. a sweep's SWEEP_DIR/<hypothesis>/seed-<s>)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--shards", help="shards directory (default: the one each run was trained on)")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--limit", type=positive_int, default=300, help="images scored per checkpoint (default 300)")
    add_device_argument(p)
    p.add_argument("--lpips-weights", metavar="FILE", help="LPIPS weights as safetensors (see `facevae eval`)")
    p.add_argument("--bootstrap", type=positive_int, default=200, help="bootstrap resamples per checkpoint (default 200)")
    p.add_argument("--target", type=float, help="draw this face 1-SSIM as a dashed target line")
    p.set_defaults(func=_run, _parser=p)
