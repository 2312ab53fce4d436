"""The main job end to end on synthetic faces: shards -> train (2 hypotheses x seeds) -> eval -> report + claims.

Each step is the same library function its own `facevae` subcommand calls, reading only what the previous step
wrote, so a rerun resumes: finished shards are kept, finished runs are not retrained (`resume=auto` continues an
interrupted one) and the report is rebuilt from the evaluations.

The profile is sized for a few minutes on a 2-core CPU (36 px, a quarter of the paper's channels, lr 2e-3): long
enough to measure the mask effect with intervals, far too short to reconstruct faces (the outputs are colour
blobs). The reference experiment (docs/reference/) is the long version of the same question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from facevae_dist.config import TrainConfig, apply_overrides
from facevae_dist.data.shards import ShardOptions, build_shards, shards_info
from facevae_dist.data.sources import make_source
from facevae_dist.errors import RunError, UsageError
from facevae_dist.evaluate.scoring import evaluate
from facevae_dist.fileio import atomic_write_json
from facevae_dist.hypotheses import resolve_hypothesis
from facevae_dist.progress import info
from facevae_dist.report.build import make_report
from facevae_dist.train.loop import train

# The paper's question in its simplest form: the same loss with and without the face mask.
DEMO_HYPOTHESES = ("l2/none", "l2/mask+decoder")


@dataclass
class DemoOptions:
    root: Path = Path(".")  # shards/, runs/, reports/ are created under it
    n: int = 3000  # synthetic images (80/10/10 split: 300 test images)
    hypotheses: tuple[str, ...] = DEMO_HYPOTHESES
    seeds: tuple[int, ...] = (0, 1)  # two seeds per hypothesis: intervals across seeds, not one lucky run
    steps: int = 600
    batch_size: int = 32
    image_size: int = 36  # small images learn fastest per CPU second (docs/reference: the learning curves)
    width: float = 0.25  # channel multiplier (1.0 = the paper's network)
    lr: float = 2e-3
    workers: int = 2
    eval_limit: int | None = None
    overrides: list[str] = field(default_factory=list)  # --set a.b=value for every run


def demo_run_dir(root: Path, hypothesis_slug: str, seed: int) -> Path:
    return Path(root) / "runs" / "demo" / f"{hypothesis_slug}--seed{seed}"


def run_demo(opts: DemoOptions) -> dict:

    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        raise UsageError(f"--seeds {','.join(map(str, opts.seeds))}: give distinct seeds, e.g. --seeds 0,1")
    t0 = time.time()
    root = Path(opts.root)
    shards = root / "shards" / f"synthetic-{opts.image_size}px"
    reports = root / "reports" / "demo"
    hyps = [resolve_hypothesis(h) for h in opts.hypotheses]

    info(f"[bold]1/4[/] synthetic shards: {opts.n} images at {opts.image_size} px -> {shards}")
    # shard_size keeps >= 4 train shards so 2 ranks x 2 workers can read them (loader checks shards >= ranks x workers)
    shard_size = max(50, opts.n // 8)
    build_shards(make_source("synthetic", n=opts.n, seed=0), shards,
                 ShardOptions(image_size=opts.image_size, shard_size=shard_size, image_format="png"),
                 workers=opts.workers)
    shards_info(shards, grid=reports / "dataset_contact_sheet.png")

    run_dirs = []
    jobs = [(hyp, seed) for seed in opts.seeds for hyp in hyps]  # seed-major: a cut-short demo has both arms
    for i, (hyp, seed) in enumerate(jobs, 1):
        run_dir = demo_run_dir(root, hyp.slug, seed)
        info(f"[bold]2/4[/] train {hyp.name} seed {seed} ({i}/{len(jobs)}), {opts.steps} steps -> {run_dir}")
        every = max(1, opts.steps // 3)
        cfg = TrainConfig.from_hypothesis(
            hyp.name, run_dir=str(run_dir), seed=seed, max_steps=opts.steps,
            val_every=every, ckpt_every=every, sample_every=every, val_batches=4, log_every=10,
            data={"shards": str(shards), "batch_size": opts.batch_size, "workers": opts.workers, "seed": seed},
            model={"width": opts.width, "image_size": opts.image_size}, optim={"lr": opts.lr})
        cfg = apply_overrides(cfg, opts.overrides).validate()
        result = train(cfg)
        if result.get("stopped") == "preempted":  # a signal stopped the run (checkpoint saved): stop here too
            raise RunError(f"demo interrupted while training {run_dir} (checkpoint saved at step "
                           f"{result.get('step')}); run `facevae demo` again with the same options to resume")
        run_dirs.append(run_dir)

    for run_dir in run_dirs:
        info(f"[bold]3/4[/] evaluate {run_dir} on the test split")
        evaluate(run_dir, shards, split="test", limit=opts.eval_limit)

    info(f"[bold]4/4[/] report -> {reports}")
    result = make_report(run_dirs, reports)
    summary = {"shards": str(shards), "runs": [str(r) for r in run_dirs], "report": result,
               "profile": {"image_size": opts.image_size, "width": opts.width, "lr": opts.lr,
                           "batch_size": opts.batch_size, "steps": opts.steps, "seeds": list(opts.seeds)},
               "seconds": round(time.time() - t0, 1)}
    atomic_write_json(reports / "demo.json", summary)
    return summary
