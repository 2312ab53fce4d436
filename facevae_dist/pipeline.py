"""The main job end to end on the embedded default: synthetic shards -> train -> eval -> report.

Each step is the same library function its own `facevae` subcommand calls, reading only what the previous step
wrote, so a rerun resumes: finished shards are kept, finished runs are not retrained (`resume=auto` continues an
interrupted one), and evaluation is redone only for runs whose checkpoint changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from facevae_dist.fileio import atomic_write_json
from facevae_dist.progress import info

# The paper's question in its simplest form: the same loss with and without the face mask.
DEMO_HYPOTHESES = ("l2/none", "l2/mask+decoder")


@dataclass
class DemoOptions:
    root: Path = Path(".")  # shards/, runs/, reports/ are created under it
    n: int = 3000  # synthetic images (80/10/10 split)
    hypotheses: tuple[str, ...] = DEMO_HYPOTHESES
    steps: int = 200
    batch_size: int = 32
    width: float = 0.5  # 1.0 = the paper's network; half the channels keeps the demo to ~10 CPU minutes
    seed: int = 0
    workers: int = 2
    eval_limit: int | None = None
    overrides: list[str] = field(default_factory=list)  # --set a.b=value for every run


def run_demo(opts: DemoOptions) -> dict:
    from facevae_dist.config import TrainConfig, apply_overrides
    from facevae_dist.data.shards import ShardOptions, build_shards, shards_info
    from facevae_dist.data.sources import make_source
    from facevae_dist.evaluate import evaluate
    from facevae_dist.hypotheses import resolve_hypothesis
    from facevae_dist.report import make_report
    from facevae_dist.train import train

    t0 = time.time()
    root = Path(opts.root)
    shards = root / "shards" / "synthetic"
    reports = root / "reports" / "demo"
    hyps = [resolve_hypothesis(h) for h in opts.hypotheses]

    info(f"[bold]1/4[/] synthetic shards: {opts.n} images -> {shards}")
    # shard_size keeps >= 4 train shards so 2 ranks x 2 workers can read them (loader checks shards >= ranks x workers)
    shard_size = max(50, opts.n // 8)
    build_shards(make_source("synthetic", n=opts.n, seed=opts.seed), shards,
                 ShardOptions(shard_size=shard_size), workers=opts.workers)
    shards_info(shards, grid=reports / "dataset_contact_sheet.png")

    run_dirs = []
    for i, hyp in enumerate(hyps, 1):
        run_dir = root / "runs" / "demo" / hyp.slug
        info(f"[bold]2/4[/] train {hyp.name} ({i}/{len(hyps)}), {opts.steps} steps -> {run_dir}")
        cfg = TrainConfig.from_hypothesis(
            hyp.name, run_dir=str(run_dir), seed=opts.seed, max_steps=opts.steps,
            val_every=max(1, opts.steps // 3), ckpt_every=max(1, opts.steps // 3), sample_every=max(1, opts.steps // 3),
            val_batches=4, log_every=10,
            data={"shards": str(shards), "batch_size": opts.batch_size, "workers": opts.workers, "seed": opts.seed},
            model={"width": opts.width})
        cfg = apply_overrides(cfg, opts.overrides).validate()
        train(cfg)
        run_dirs.append(run_dir)

    for run_dir in run_dirs:
        info(f"[bold]3/4[/] evaluate {run_dir} on the test split")
        evaluate(run_dir, shards, split="test", limit=opts.eval_limit)

    info(f"[bold]4/4[/] report -> {reports}")
    result = make_report(run_dirs, reports)
    summary = {"shards": str(shards), "runs": [str(r) for r in run_dirs], "report": result,
               "seconds": round(time.time() - t0, 1)}
    atomic_write_json(reports / "demo.json", summary)
    return summary
