"""`facevae demo`: the main job on synthetic faces (shards -> train 2 hypotheses x seeds -> eval -> report, claims)."""

from __future__ import annotations

from pathlib import Path


def _seeds(text: str) -> tuple[int, ...]:
    """The sweep's --seeds parser (integers 0..2**32-1, each once, none empty)."""
    from facevae_dist.sweep.submit import parse_seeds

    return tuple(parse_seeds(text))


def _section(lines: list[str], heading_prefix: str) -> list[str]:
    """A report section: its heading line up to the next heading of the same or a higher level."""
    start = next((i for i, line in enumerate(lines) if line.startswith(heading_prefix)), None)
    if start is None:
        return []
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return lines[start:end]


def _run(args) -> int:
    from facevae_dist.demo import DemoOptions, run_demo
    from facevae_dist.progress import console, is_quiet
    from facevae_dist.report.claims import summary_lines
    from facevae_dist.sweep.submit import parse_hypotheses

    opts = DemoOptions(root=Path(args.root), n=args.n, hypotheses=tuple(parse_hypotheses(args.hypotheses)),
                       seeds=_seeds(args.seeds), steps=args.steps, batch_size=args.batch_size,
                       image_size=args.image_size, width=args.width, lr=args.lr, workers=args.workers, eval_limit=args.eval_limit,
                       overrides=args.set or [])
    summary = run_demo(opts)
    if not is_quiet():
        table = Path(summary["report"]["table_md"])
        lines = table.read_text().splitlines()
        console.print(f"\n[bold green]done[/] in {summary['seconds']:.0f} s. Report: {table}, claims: "
                      f"{summary['report']['claims_md']}\n")
        # Face pixels of the raw output first (what the model reconstructs), then the composite, named as such,
        # then the paired mask effect on both.
        shown = []
        for heading in ("## Face pixels, raw decoder output", "## Composite:", "### `face`", "### `composite`"):
            section = _section(lines, heading)
            if heading.startswith("### ") and section:
                section = [f"Mask effect (mask+decoder minus none, paired per image) on {heading[4:]}:"] + section[1:]
            shown += section
        console.print("\n".join(shown).strip(), markup=False, highlight=False, soft_wrap=True)
        console.print("\n[bold]The paper's claims these runs can test[/] (95% seed-level intervals; supported: "
                      "every interval excludes 0 the claimed way; contradicted: one the other way after Holm):")
        for line in summary_lines(summary["report"]["claims"]):
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        console.print("A few CPU minutes at 36 px give colour blobs, not faces: these verdicts are about this tiny "
                      "profile, not the paper's setting (docs/evaluation.md: 'Example: the demo's report').", markup=False)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job on synthetic faces: shards -> train (2 seeds) -> eval -> report + claims",
        description="Builds the embedded synthetic face set as shards (36 px), trains the l2 loss without and with "
        "the face mask (the paper's question) for each seed, evaluates every run on the same test images and writes "
        "the report (reports/demo/table.md, claims.md, claims.json, figures/): face-pixel scores of the raw "
        "output first, the composite beside them, the mask effect as paired per-image differences with 95% "
        "intervals over seeds and images, and the paper's claims these runs can test. A few minutes on a quiet "
        "2-core CPU. Re-running resumes: built shards and finished runs are reused.")
    p.add_argument("--root", default=".", help="where shards/, runs/ and reports/ go (default: current directory)")
    p.add_argument("--n", type=int, default=3000, help="synthetic images to generate (default 3000, 300 for test)")
    p.add_argument("--hypotheses", default=",".join(("l2/none", "l2/mask+decoder")),
                   help="comma-separated grid names (default l2/none,l2/mask+decoder)")
    p.add_argument("--seeds", default="0,1", help="training seeds per hypothesis (default 0,1)")
    p.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32 (the paper)")
    p.add_argument("--image-size", type=int, default=36, help="image side in px (default 36; the paper: 144)")
    p.add_argument("--width", type=float, default=0.25,
                   help="channel multiplier (default 0.25: the paper's layout at a quarter of the channels; 1.0 = "
                   "the paper's network)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3; the paper: 1e-4 over "
                   "400k steps)")
    p.add_argument("--workers", type=int, default=2, help="shard build and data loader workers (default 2)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training override for every run, "
                   "e.g. --set mixed_precision=no (repeatable)")
    p.set_defaults(func=_run, _parser=p)
