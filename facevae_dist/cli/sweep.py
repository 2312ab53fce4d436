"""`facevae sweep submit|status|collect`: the hypothesis grid as one Slurm job array (submitit)."""

from __future__ import annotations

import argparse

from facevae_dist.presets import add_preset_argument

SUBMIT_EPILOG = """\
Each array element trains one hypothesis (nodes x gpus-per-node ranks inside the element), then evaluates it, in
SWEEP_DIR/<hypothesis>/ (with --seeds: one element per hypothesis and seed, in SWEEP_DIR/<hypothesis>/seed-<s>/;
with --elements-per-gpu K: K runs share one element's GPU, one process each). On preemption or time limit the
element saves a checkpoint and is requeued; the requeued element resumes from that checkpoint. Rerunning the
same command skips finished elements and resubmits the others (queued/running ones are left alone). The
code is snapshotted into SWEEP_DIR/code/ at submit time. The jobs run the python that submits (it must exist
at that path on every node) unless --python / --setup point them at another environment; --dry-run prints
the sbatch script first.

examples:
  # the paper's 10 hypotheses + our 5 GT-mask ablations, one 8-GPU node per hypothesis, bf16, 4 at a time
  facevae sweep submit --grid paper15 --shards /shared/shards/celeba --out /shared/sweeps/paper15 \\
      --partition gpu --gpus-per-node 8 --cpus-per-task 8 --mem-gb 200 --timeout-min 1440 \\
      --array-parallelism 4 --set max_steps=100000 --set mixed_precision=bf16
  # the released code's setup (grid paper10, every element with `facevae train --preset paper`), one GPU each
  facevae sweep submit --preset paper --shards /shared/shards/celeba-paper --out /shared/sweeps/paper \\
      --partition gpu --gpus-per-node 1 --cpus-per-task 8 --mem-gb 64 --timeout-min 1440
  # three seeds per hypothesis, four runs sharing each GPU (a batch-32 run uses a fraction of an H100)
  facevae sweep submit --grid paper10 --seeds 0,1,2 --elements-per-gpu 4 --gpus-per-node 1 --cpus-per-task 8 \\
      --shards /shared/shards/celeba --out /shared/sweeps/paper10-seeds --partition gpu
  # GPUs by type, an environment on shared storage, mail at the end, read the script before submitting
  facevae sweep submit --grid paper10 --shards /shared/shards/celeba --out /shared/sweeps/paper10 \\
      --partition gpu --gres gpu:a100:1 --cpus-per-task 8 --python /shared/envs/facevae/bin/python \\
      --slurm-option mail-type=END,FAIL --slurm-option mail-user=me@lab.org --dry-run
  # a tiny grid on this machine, no Slurm
  facevae sweep submit --hypotheses l2/none,l2/mask+decoder --shards shards/synthetic --out sweeps/try \\
      --cluster local --set max_steps=50 --set model.width=0.25 --wait
"""


def _submit(args) -> int:
    from facevae_dist.presets import sweep_overrides
    from facevae_dist.progress import info
    from facevae_dist.sweep.submit import SlurmOptions, dry_run_sweep, parse_hypotheses, parse_seeds, submit_sweep

    slurm = SlurmOptions(partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         tasks_per_node=args.tasks_per_node,
                         cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
                         array_parallelism=args.array_parallelism, signal_delay_s=args.signal_delay_s,
                         max_num_timeout=args.max_num_timeout, account=args.account, qos=args.qos,
                         constraint=args.constraint, elements_per_gpu=args.elements_per_gpu, gres=args.gres,
                         slurm_options=args.slurm_option or [], python=args.python, setup=args.setup or [])
    if args.cluster != "slurm":
        given = [flag for flag, value in (("--gres", args.gres), ("--slurm-option", args.slurm_option),
                                          ("--python", args.python), ("--setup", args.setup)) if value]
        if given:
            info(f"{', '.join(given)}: for --cluster slurm only; ignored with --cluster {args.cluster}")
    hyps = parse_hypotheses(args.hypotheses)
    seeds = parse_seeds(args.seeds)
    world = 1 if getattr(slurm, "elements_per_gpu", 1) > 1 else slurm.nodes * slurm.ranks_per_node  # ranks per run
    overrides, warnings = sweep_overrides(args.preset, args.set or [], world)
    for line in warnings:
        info(line)
    request = dict(grid=args.grid, hypotheses=hyps, seeds=seeds, cluster=args.cluster, slurm=slurm,
                   overrides=overrides)
    if args.dry_run:
        _print_dry_run(dry_run_sweep(args.out, args.shards, **request))
        return 0
    submit_sweep(args.out, args.shards, **request, eval_split=args.eval_split, eval_limit=args.eval_limit,
                 wait=args.wait)
    if args.wait:
        return _status(argparse.Namespace(sweep_dir=args.out, json=False))
    return 0


def _print_dry_run(plan: dict) -> None:
    """The element list, then the sbatch script, on stdout (the command's output); notes on stderr."""
    from facevae_dist.progress import info, warn

    runs = sum(len(element["runs"]) for element in plan["elements"])
    print(f"# dry run: nothing submitted, nothing written; {runs} run(s) as {len(plan['elements'])} element(s) "
          f"on {plan['cluster']}, SWEEP_DIR {plan['out']}")
    for element in plan["elements"]:
        for run in element["runs"]:
            print(f"# element {element['index']}: {run['element']} -> {run['run_dir']}")
    if plan["script"]:
        print(plan["script"], end="" if plan["script"].endswith("\n") else "\n")
    elif plan["elements"]:
        info(f"--cluster {plan['cluster']}: no sbatch script; the elements run on this machine")
    else:
        info("nothing to submit: every element is finished or still queued/running")
    if plan["missing"]:
        warn(f"{' and '.join(plan['missing'])} not on PATH here: a real submission from this machine is refused")


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _status(args) -> int:
    import json

    from rich.table import Table

    from facevae_dist.progress import output_console
    from facevae_dist.sweep.status import sweep_status

    rows = sweep_status(args.sweep_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"sweep {args.sweep_dir}")
    for col in ("hypothesis", "seed", "job", "state", "step", "loss", "img/s", "ETA", "log"):
        table.add_column(col, overflow="fold")
    colours = {"finished": "green", "failed": "red", "killed": "red", "cancelled": "yellow", "training": "cyan"}
    for r in rows:
        state = r["state"]
        if r["slurm_state"] and r["slurm_state"].lower() not in state:
            state += f" ({r['slurm_state']})"
        if r["error"]:
            state += f"\n{r['error']}"
        step = f"{r['step']}/{r['max_steps']}" if r["step"] is not None else ""
        seed = "" if r["seed"] is None else str(r["seed"])
        table.add_row(r["hypothesis"], seed, r["job_id"], f"[{colours.get(r['state'], 'white')}]{state}[/]", step,
                      f"{r['loss']:.4f}" if r["loss"] is not None else "",
                      f"{r['images_per_s']:.1f}" if r["images_per_s"] else "", _fmt_eta(r["eta_s"]), r["log"] or "")
    # the table is the command's output: stdout (progress and status lines go to stderr), unsqueezed when piped
    output_console().print(table)
    return 0


def _collect(args) -> int:
    from facevae_dist.progress import info
    from facevae_dist.sweep.status import collect_sweep

    result = collect_sweep(args.sweep_dir, args.out)
    info(f"report: {result['table_md']}")
    return 0


def register(sub) -> None:
    sweep = sub.add_parser("sweep", help="run the hypothesis grid as a Slurm job array (submitit)",
                           description="Submit the paper's hypothesis grid as one Slurm job array, watch it, and "
                           "collect the paper-style report.")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", metavar="ACTION", parser_class=type(sweep))
    sweep.set_defaults(_parser=sweep)

    p = sweep_sub.add_parser("submit", help="submit (or resume) a sweep", epilog=SUBMIT_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="Submit every unfinished hypothesis of a grid as one job array.")
    p.add_argument("--grid", default="paper10", help="paper10 (the paper's 10 runs: 5 losses x {none, "
                   "mask+decoder}; default), paper15 (paper10 + our 5 GT-mask-without-decoder ablations) or named4 "
                   "(H1, H5, H6, H9)")
    add_preset_argument(p, what="every element trained as `facevae train --preset paper`, grid paper10")
    p.add_argument("--hypotheses", help="comma-separated names/aliases instead of a grid, e.g. l2/none,H9")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one element per (hypothesis, seed); a seed "
                   "sets the model's and the data order's seed (default: one run per hypothesis, the config's seed)")
    p.add_argument("--shards", required=True, help="shards directory (shared by all nodes)")
    p.add_argument("--out", required=True, help="sweep directory (shared by all nodes); rerun to resume")
    p.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="slurm (default), local (subprocesses on this machine) or debug (in this process)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--nodes", type=int, default=1, help="nodes per hypothesis (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node = ranks per node (default 0: CPU, 1 rank)")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU, 1 on CPU); set it "
                   "only for multi-rank CPU training over gloo")
    p.add_argument("--cpus-per-task", type=int, default=2, help="CPUs per rank (data workers + 1; default 2)")
    p.add_argument("--elements-per-gpu", type=int, default=1, metavar="K",
                   help="K runs share one array element and its GPU (K processes, one rank each, each with "
                   "--cpus-per-task cores); with --nodes 1 and --gpus-per-node 0 or 1 (default 1)")
    p.add_argument("--mem-gb", type=float, help="memory per node in GB")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="time limit per run of an element (default 1440)")
    p.add_argument("--array-parallelism", type=int, default=15, help="elements running at once (default 15)")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="preemption signal this long before the time limit (default 120)")
    p.add_argument("--max-num-timeout", type=int, default=30, help="requeues after time limits (default 30)")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--qos", help="Slurm quality of service")
    p.add_argument("--constraint", help="Slurm node feature constraint, e.g. a100")
    p.add_argument("--gres", metavar="SPEC", help="GPUs as a generic resource instead of --gpus-per-node, e.g. "
                   "gpu:a100:8 (8 GPUs = 8 ranks per node); gpu:a100 takes the count from --gpus-per-node")
    p.add_argument("--slurm-option", action="append", metavar="KEY[=VALUE]",
                   help="any other sbatch option, passed as --KEY[=VALUE] (repeatable), e.g. mail-type=END, "
                   "mail-user=me@lab.org, reservation=grid, exclude=node07, exclusive; recorded in sweep.json")
    p.add_argument("--python", metavar="CMD", help="the command that runs python on the nodes (default: this "
                   "interpreter, which must then exist at the same path on every node), e.g. "
                   "/shared/envs/facevae/bin/python, or python with --setup 'module load ...'")
    p.add_argument("--setup", action="append", metavar="LINE",
                   help="a shell line the job runs before srun (repeatable), e.g. --setup 'module load cuda/12.1' "
                   "--setup 'source /shared/envs/facevae/bin/activate'")
    p.add_argument("--dry-run", action="store_true", help="print the elements and the sbatch script a submission "
                   "would use; submit nothing, write nothing")
    p.add_argument("--eval-split", default="test", help="split evaluated after training (default test)")
    p.add_argument("--eval-limit", type=int, help="evaluate only the first N images")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="training override for every element, e.g. --set max_steps=100000 (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for every element to end, then print the status")
    p.set_defaults(func=_submit, _parser=p)

    p = sweep_sub.add_parser("status", help="table of every element (hypothesis, seed): state, step, loss, "
                             "images/s, ETA, log",
                             description="State from Slurm (sacct) and from each element's own record (a job that "
                             "died shows as killed/failed/cancelled), progress from its metrics.jsonl, and where its "
                             "log is.")
    p.add_argument("sweep_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status, _parser=p)

    p = sweep_sub.add_parser("collect", help="the paper-style report over the finished elements (all seeds)",
                             description="Runs `facevae report` over every finished element (default out: "
                             "SWEEP_DIR/report).")
    p.add_argument("sweep_dir")
    p.add_argument("--out", help="report directory (default SWEEP_DIR/report)")
    p.set_defaults(func=_collect, _parser=p)
