"""`facevae demo`: the main job on the embedded default (synthetic shards -> train -> eval -> report)."""

from __future__ import annotations

from pathlib import Path


def _run(args) -> int:
    from facevae_dist.pipeline import DemoOptions, run_demo
    from facevae_dist.progress import console, is_quiet

    opts = DemoOptions(root=Path(args.root), n=args.n, hypotheses=tuple(h for h in args.hypotheses.split(",") if h),
                       steps=args.steps, batch_size=args.batch_size, width=args.width, seed=args.seed,
                       workers=args.workers, eval_limit=args.eval_limit, overrides=args.set or [])
    summary = run_demo(opts)
    if not is_quiet():
        table = Path(summary["report"]["table_md"])
        console.print(f"\n[bold green]done[/] in {summary['seconds']:.0f} s. Report: {table}\n")
        # the report's main table (scored as the paper did) and the mask-minus-no-mask differences: everything
        # from the first table row to the next section heading
        lines = table.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
        console.print("\n".join(lines[start:end]).strip(), markup=False, highlight=False, soft_wrap=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job on synthetic faces: shards -> train -> eval -> report",
        description="Builds the embedded synthetic face set as shards, trains the l2 loss without and with the "
        "face mask (the paper's question), evaluates both on the test split and writes the paper-style report "
        "(reports/demo/table.md, figures/). Re-running resumes: built shards and finished runs are reused.")
    p.add_argument("--root", default=".", help="where shards/, runs/ and reports/ go (default: current directory)")
    p.add_argument("--n", type=int, default=3000, help="synthetic images to generate (default 3000)")
    p.add_argument("--hypotheses", default="l2/none,l2/mask+decoder",
                   help="comma-separated grid names (default l2/none,l2/mask+decoder)")
    p.add_argument("--steps", type=int, default=200, help="training steps per hypothesis (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32 (the paper)")
    p.add_argument("--width", type=float, default=0.5,
                   help="channel multiplier (default 0.5: the paper's layout at half the channels, ~4x less compute, "
                   "so the demo takes ~10 minutes on a 2-core CPU; 1.0 = the paper's network)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="shard build and data loader workers (default 2)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training override for every run, "
                   "e.g. --set mixed_precision=no (repeatable)")
    p.set_defaults(func=_run, _parser=p)
