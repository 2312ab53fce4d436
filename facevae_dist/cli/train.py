"""`facevae train` (also what launchers start: `python -m facevae_dist train`): parse arguments into a TrainConfig
and call facevae_dist.train.loop.train (no training logic here; this module imports train.py, never the reverse)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from facevae_dist.config import TrainConfig, apply_dict, apply_overrides, load_toml
from facevae_dist.errors import FaceVAEError, from_os_error
from facevae_dist.presets import add_preset_argument, apply_preset
from facevae_dist.progress import stdout_for_result_only
from facevae_dist.seeds import SEED_MAX, seed_arg

EXAMPLES = """\
examples:
  facevae train --hypothesis H9 --shards shards/synthetic --run-dir runs/h9 --max-steps 300
  facevae train --hypothesis ssim/none --shards shards/celeba --mixed-precision no --set optim.clip=global
  facevae train --config runs/h9/config.toml --max-steps 2000           # continue a run for longer
  facevae train --hypothesis H9 --preset paper --shards shards/celeba-paper   # the released code's setup
  torchrun --standalone --nproc_per_node 2 -m facevae_dist train --hypothesis H9 --shards shards/synthetic
  accelerate launch --config_file launch/8gpu-bf16.yaml -m facevae_dist train --hypothesis H9 --shards ...

precedence: defaults < --hypothesis < --preset < --config FILE < flags < --set KEY=VALUE (later wins).
The resolved config is written to RUN_DIR/config.toml. A run directory with checkpoints is resumed
automatically (--resume auto), so rerunning the same command after a crash or preemption continues
exactly where the last checkpoint left off. SIGTERM / SIGUSR1 / SIGUSR2 save a checkpoint and exit 0.
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `facevae train`."""
    what = p.add_argument_group("what to train")
    what.add_argument("--hypothesis", metavar="NAME",
                      help="grid hypothesis <loss>/<mask mode>, e.g. ssim+l2/mask+decoder, l1/none, or an alias "
                           "H1 H5 H6 H9 (see `facevae sweep --help` for the grid); sets loss terms and mask mode")
    add_preset_argument(what, what="sampling bug, Keras Adam, sampled-z validation, 100 epochs of 4000 steps x "
                                   "batch 32, best-by-validation checkpoint, fp32, one process")
    what.add_argument("--config", metavar="FILE.toml", help="a TOML config (full, or only the fields to change)")
    what.add_argument("--shards", metavar="DIR", help="shards directory from `facevae shards build` "
                                                      "(default shards/synthetic)")
    what.add_argument("--run-dir", metavar="DIR", help="output directory (default runs/<hypothesis>)")
    what.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override any config field, e.g. --set optim.lr=2e-4 --set loss.terms=ssim,l1 "
                           "--set model.width=0.5 (repeatable; TOML values; see config.toml of a run for all keys)")

    how = p.add_argument_group("schedule (all counted in optimizer steps)")
    how.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps (default 1000)")
    how.add_argument("--batch-size", type=int, metavar="N", help="per process and micro-step (default 32, the paper)")
    how.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per step (default 1)")
    how.add_argument("--val-every", type=int, metavar="N", help="validate every N steps, keep best/ (0 = never; "
                                                               "default 500)")
    how.add_argument("--val-batches", type=int, metavar="N", help="batches per rank per validation (default 20)")
    how.add_argument("--ckpt-every", type=int, metavar="N", help="checkpoint every N steps (default 500; one is "
                                                                "always written at the end)")
    how.add_argument("--keep-last", type=int, metavar="K", help="step checkpoints to keep (default 2)")
    how.add_argument("--log-every", type=int, metavar="N", help="metrics.jsonl line every N steps (default 10)")
    how.add_argument("--sample-every", type=int, metavar="N",
                     help="write samples/step_N.png (input | recon | predicted mask | true mask) every N steps "
                          "(0 = never; default 500)")
    how.add_argument("--seed", type=seed_arg, metavar="S",
                     help=f"seeds model init, noise and data order: 0..{SEED_MAX} (default 0)")
    how.add_argument("--workers", type=int, metavar="N", help="data loader workers per process (default 2)")
    how.add_argument("--resume", metavar="auto|none|DIR",
                     help="auto (default): continue from the newest complete checkpoint in the run dir if any; "
                          "none: start fresh; DIR: a checkpoints/step_<n> directory (the run's later checkpoints "
                          "then move to checkpoints/retired-<time>/)")
    how.add_argument("--allow-new-shards", action="store_true", default=None,
                     help="let a resume continue on other --shards than the run was trained on (another folder, or "
                          "the same folder rebuilt); refused without it. Recorded in metrics.jsonl; best/ restarts")

    speed = p.add_argument_group("precision and speed")
    speed.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"),
                       help="auto (default): the launch profile's setting, else bf16 autocast on CUDA GPUs with bf16, "
                            "else fp32 (on the 2-core dev CPU bf16 autocast was slower than fp32); losses are always "
                            "fp32; fp16 uses loss scaling")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory layout for convolutions (default on)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (default off; ~40-60 s first-step compile on CPU)")
    speed.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                       help="torch.compile mode with --compile: reduce-overhead = CUDA graphs (one GPU, fixed batch; "
                            "cuts the per-step launch overhead of the paper's batch 32)")
    speed.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                       help="deterministic cuDNN/cuBLAS kernels (bit-exact resume on GPUs too; slower); default off: "
                            "cudnn.benchmark autotunes convolutions")
    speed.add_argument("--deepspeed", metavar="JSON",
                       help="run under DeepSpeed ZeRO with this config, e.g. launch/ds_zero2.json (needs "
                            "--set optim.clip=global --set optim.eps_form=torch); the JSON sets the ZeRO stage and "
                            "buckets, while batch size, accumulation, clip value, lr and precision always come from "
                            "the training config")
    logs = p.add_argument_group("logs and experiment tracking")
    logs.add_argument("--log-with", metavar="TRACKERS",
                      help="auto (default): TensorBoard when installed, else none; or any of tensorboard, wandb, "
                           "mlflow, comma-separated (extras facevae-dist[tensorboard|wandb|mlflow]); none: "
                           "metrics.jsonl only. Logs go inside the run dir (W&B offline unless $WANDB_MODE, MLflow "
                           "a file store unless $MLFLOW_TRACKING_URI)")
    logs.add_argument("--progress-every", type=float, metavar="S",
                      help="seconds between plain progress lines when stderr is not a terminal, e.g. a Slurm log "
                           "(default 30; 0 = at every log step; $FACEVAE_PROGRESS_EVERY overrides)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks for errors")


_FLAG_FIELDS = {  # argparse dest -> TrainConfig path
    "shards": "data.shards", "batch_size": "data.batch_size", "workers": "data.workers",
    "run_dir": "run_dir", "max_steps": "max_steps", "grad_accum": "grad_accum", "val_every": "val_every",
    "val_batches": "val_batches", "ckpt_every": "ckpt_every", "keep_last": "keep_last", "log_every": "log_every",
    "sample_every": "sample_every", "resume": "resume", "allow_new_shards": "allow_new_shards",
    "mixed_precision": "mixed_precision",
    "channels_last": "channels_last", "compile": "compile", "compile_mode": "compile_mode",
    "deterministic": "deterministic", "deepspeed": "deepspeed",
    "log_with": "log_with", "progress_every": "progress_every",
}


def config_from_args(args: argparse.Namespace):
    """defaults < hypothesis < --preset < --config < flags < --set; validated. Launched by `accelerate launch` with
    a DeepSpeed profile (launch/deepspeed-zero2.yaml), the profile's JSON is the default for --deepspeed."""
    cfg = TrainConfig.from_hypothesis(args.hypothesis) if args.hypothesis else TrainConfig()
    cfg = apply_preset(cfg, getattr(args, "preset", None))
    if args.config:
        cfg = load_toml(args.config, base=cfg)
    flags: dict = {}
    for dest, path in _FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        section, _, name = path.rpartition(".")
        (flags.setdefault(section, {}) if section else flags)[name] = value
    if args.seed is not None:
        flags["seed"] = args.seed
        flags.setdefault("data", {})["seed"] = args.seed
    cfg = apply_dict(cfg, flags, source="command line")
    cfg = apply_overrides(cfg, args.overrides)
    if not cfg.deepspeed:
        cfg.deepspeed = deepspeed_config_from_env(os.environ)
    return cfg.validate()


def deepspeed_config_from_env(environ) -> str:
    """The DeepSpeed JSON that `accelerate launch --config_file launch/deepspeed-zero2.yaml` names, or ""."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    return ""


def _run(args: argparse.Namespace) -> int:
    # torch and Accelerate load here, when training, not at every `facevae` start
    from facevae_dist.cli import user_paths
    from facevae_dist.train.loop import train

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _print_summary(_train_quietly(train, args))
        return 0
    try:  # under a multi-process launcher: leave without the interpreter's teardown, whatever happened
        _print_summary(_train_quietly(train, args))
        rc = 0
    except (FaceVAEError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        error = from_os_error(exc, user_paths(args)) if isinstance(exc, OSError) else exc
        print(f"facevae: error: {error}", file=sys.stderr)
        rc = error.exit_code
    _exit_without_teardown(rc)


def _train_quietly(train, args: argparse.Namespace) -> dict:
    """Train with stdout pointed at stderr: stdout carries the JSON summary only (libraries print to it, e.g.
    DeepSpeed's logger)."""
    with stdout_for_result_only():
        return train(config_from_args(args))


def _print_summary(summary: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, rank 0 alone prints
        print(json.dumps(summary))


def _exit_without_teardown(rc: int) -> None:
    """Under a multi-process launcher, gloo's threads occasionally abort the interpreter during teardown
    ("terminate called without an active exception", SIGABRT), after every file is written, and
    the launcher then reports the whole run as failed. Everything is saved by now: leave without that teardown, and
    without destroy_process_group(): destroying a gloo group joins its worker threads while holding the GIL, and a
    worker still releasing the tensors of the last collective needs the GIL (a deadlock seen under load)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train one hypothesis (plain, torchrun, accelerate launch or DeepSpeed)",
        description="Train the paper's VAE on WebDataset shards: Accelerate DDP (gloo on CPU, NCCL on GPU) or "
                    "DeepSpeed ZeRO, mixed precision, step-based validation/checkpoints, exact resume.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=_run, _parser=p)
