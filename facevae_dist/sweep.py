"""The hypothesis grid as one Slurm job array (submitit): one requeueable element per (hypothesis, seed).

    submit_sweep()  resolve the grid x seeds -> one TrainConfig per element -> snapshot the code -> one job array
    HypothesisTask  one (hypothesis, seed): train (resume=auto) then evaluate; on the preemption signal the trainer
                    saves a checkpoint and the element requeues itself, so the requeued run continues from that step
    ElementGroup    --elements-per-gpu K: one array element runs K of them as K Slurm tasks sharing its GPU
    sweep_status()  per element: state (a dead job shows as killed/failed), step, last loss, images/s, ETA, log
    collect_sweep() the report (report.make_report) over every finished element, all seeds

Layout of SWEEP_DIR:
    sweep.json             manifest: element -> hypothesis, seed, run dir, every submission's job ids (atomic JSON)
    code/<stamp>/          the facevae_dist package as it was at submit time (first on the jobs' PYTHONPATH)
    logs/                  submitit's folder: <jobid>_<index>_<task>_log.{out,err}
    <hypothesis-slug>/     the run directory (config.toml, checkpoints/, metrics.jsonl, eval/) + element.json;
                           with --seeds: <hypothesis-slug>/seed-<s>/ per seed
    report/                `facevae sweep collect`
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import atomic_write_json, atomic_write_text
from facevae_dist.progress import info
from facevae_dist.runinfo import REVISION_FILE, git_revision
from facevae_dist.seeds import seed_problem

RENDEZVOUS_PORTS = (20000, 32767)  # below Linux's default ephemeral range (ip_local_port_range 32768-60999)

CLUSTERS = ("slurm", "local", "debug")
MANIFEST = "sweep.json"
ELEMENT_FILE = "element.json"
# Slurm states in which an element still holds (or will hold) a slot: a resubmission must not start it twice
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


@dataclass
class SlurmOptions:
    """Resources of ONE array element. Ranks inside an element: nodes x tasks_per_node, all training one run; or,
    with elements_per_gpu K > 1, K independent single-rank runs (K Slurm tasks) sharing one GPU (or the CPUs)."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU; otherwise one task (rank) per GPU
    tasks_per_node: int | None = None  # ranks per node; None = one per GPU (1 on CPU); >1 on CPU = gloo ranks
    cpus_per_task: int = 2
    mem_gb: float | None = None
    timeout_min: int = 24 * 60
    array_parallelism: int = 15  # elements running at once
    signal_delay_s: int = 120  # preemption signal this long before the time limit: room for a step + checkpoint
    max_num_timeout: int = 30  # requeues after time limits (preemptions do not count)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    elements_per_gpu: int = 1  # runs sharing one element's GPU: a batch-32 run uses a fraction of an H100

    def validate(self) -> "SlurmOptions":
        for name in ("nodes", "cpus_per_task", "timeout_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node {self.gpus_per_node}: must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise UsageError(f"--tasks-per-node {self.tasks_per_node}: must be >= 1")
        if self.tasks_per_node and self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise UsageError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                             "the trainer runs one rank per GPU; leave --tasks-per-node out")
        if self.signal_delay_s < 0 or self.max_num_timeout < 0:
            raise UsageError("--signal-delay-s and --max-num-timeout must be >= 0")
        if self.elements_per_gpu < 1:
            raise UsageError(f"--elements-per-gpu {self.elements_per_gpu}: must be >= 1")
        if self.elements_per_gpu > 1 and (self.nodes > 1 or self.gpus_per_node > 1 or self.tasks_per_node):
            raise UsageError(f"--elements-per-gpu {self.elements_per_gpu}: each shared run has one rank on one GPU; "
                             "use it with --nodes 1, --gpus-per-node 0 or 1 and no --tasks-per-node")
        return self

    @property
    def ranks_per_node(self) -> int:
        """Slurm tasks per node: the ranks of one run, or the K runs sharing the element (elements_per_gpu)."""
        if self.elements_per_gpu > 1:
            return self.elements_per_gpu
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def srun_args(self) -> list[str]:
        """Slurm 22.05-23.02 do not pass the job's --cpus-per-task to srun's steps: without it every rank (and its
        data workers) may be bound to one core. --kill-on-bad-exit: a rank that dies ends its peers at once instead
        of leaving them in a collective until the process-group timeout; not for shared elements, whose runs are
        independent (one failing must not end the others)."""
        args = [f"--cpus-per-task={self.cpus_per_task}"]
        if self.elements_per_gpu == 1:
            args.append("--kill-on-bad-exit=1")
        return args


# ---------------------------------------------------------------------------------------------------------------
# The array element


class HypothesisTask:
    """One (hypothesis, seed): train (resuming whatever its run directory holds), then evaluate. Requeueable:
    submitit calls checkpoint() on the preemption signal / time limit and resubmits the returned copy of this task."""

    def __init__(self, config: dict, eval_split: str = "test", eval_limit: int | None = None):
        self.config = config  # TrainConfig.to_dict(); run_dir = SWEEP_DIR/<slug>[/seed-<s>]
        self.eval_split = eval_split
        self.eval_limit = eval_limit

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # ranks of this element (nodes x tasks_per_node) -> RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT, which
            # Accelerate reads like torchrun's. Every rank keeps all GPUs visible and uses cuda:LOCAL_RANK.
            # overwrite: stale RANK/MASTER_* inherited from the submitting shell must not win over this job's ranks
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            os.environ["MASTER_PORT"] = str(rendezvous_port(env.job_id, "train"))
        return self.run(rank=env.global_rank, world=env.num_tasks, job_id=env.job_id, hostname=env.hostname)

    def run(self, *, rank: int, world: int, job_id: str, hostname: str, requeue: bool = True) -> dict:
        """Train + evaluate as rank `rank` of `world`. requeue=False: on preemption only save and report it (the
        caller requeues: ElementGroup)."""
        is_main = rank == 0
        head = {"hypothesis": self.config.get("hypothesis"), "seed": self.config.get("seed")}
        if is_finished(self.run_dir):
            # a duplicate or late run of a finished element (array task started twice, manual resubmission):
            # leave the results as they are
            return {**head, "state": "finished", "skipped": True,
                    "metrics_json": str(self.run_dir / "eval" / "metrics.json")}
        owner = live_owner(self.run_dir)
        if owner is not None and owner != os.getpid():
            # a second copy of an element that still trains here (a resubmission while it ran): leave the run and
            # its element.json to the live process; the run-directory lock would refuse this copy anyway
            return {**head, "state": "duplicate", "skipped": True,
                    "error": f"{self.run_dir} is being trained by pid {owner}; this copy did nothing"}
        preempt_signal = _preempt_signal()
        submitit_handler = signal.getsignal(preempt_signal)  # submitit's checkpoint-and-requeue handler
        element = {**head, "job_id": job_id, "hostname": hostname,
                   "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "world_size": world,
                   # who trains: `sweep status` tells a killed job (pid gone) from one that trains
                   "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                   # the cores this rank may run on: srun --cpus-per-task worked (Slurm binds tasks to them)
                   "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                   # the package this element imports: SWEEP_DIR/code/<stamp>/ (the snapshot), not the live checkout
                   "code": str(Path(__import__("facevae_dist").__file__).resolve().parent)}
        try:
            # where this run of the element starts: > 0 after a requeue (the proof that it resumed, not restarted)
            element["start_step"] = _latest_checkpoint_step(self.run_dir)
            if is_main:  # before the heavy imports: a run that dies while importing is seen as dead, not pending
                self._write_element({**element, "state": "training", "started": time.time()})
            from facevae_dist.config import TrainConfig
            from facevae_dist.evaluate import evaluate
            from facevae_dist.train import train

            summary = train(TrainConfig.from_dict(self.config, source="sweep element").validate())
            if summary["stopped"] == "preempted":
                if is_main:
                    self._write_element({**element, "state": "preempted", "step": summary["step"],
                                         "signal": summary.get("signal")})
                if requeue and callable(submitit_handler) and _should_requeue(summary.get("signal"), preempt_signal):
                    # The trainer took the signal and saved; now submitit checkpoint()s this task and requeues it
                    # (rank 0 only; on other ranks the handler returns). The requeued element resumes from there.
                    submitit_handler(preempt_signal, None)
                return {**head, "state": "preempted", **summary}
            if is_main:
                self._write_element({**element, "state": "evaluating", "step": summary["step"]})
            if world > 1:
                # train() leaves the process group open and evaluate() reuses it; should none be open, evaluate()
                # opens a new one, on its own port (not the training rendezvous' store).
                os.environ["MASTER_PORT"] = str(rendezvous_port(job_id, "eval"))
            result = evaluate(self.run_dir, self.config["data"]["shards"], split=self.eval_split,
                              limit=self.eval_limit)
            if world > 1:  # the element's process exits next: close the group (not at interpreter teardown)
                from facevae_dist.evaluate import close_process_group

                close_process_group()
            if is_main:
                self._write_element({**element, "state": "finished", "step": summary["step"],
                                     "finished": time.time()})
            return {**head, "state": "finished", "step": summary["step"],
                    "metrics_json": str(self.run_dir / "eval" / "metrics.json"), "n_images": result.get("n_images")}
        except SystemExit:
            raise  # submitit's requeue exits the process
        except BaseException as exc:
            if is_main:
                self._write_element({**element, "state": "failed", "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            raise

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/time limit: the trainer has saved (or saves at the next step boundary);
        the same task resumes from the run directory's latest checkpoint (resume=auto)."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.eval_split, self.eval_limit))

    def _write_element(self, record: dict) -> None:
        atomic_write_json(self.run_dir / ELEMENT_FILE, {**record, "updated": time.time()})


# how long task 0 of a shared element waits for the other runs to save after a preemption signal
GROUP_SAVE_WAIT_S = 120.0


class ElementGroup:
    """--elements-per-gpu K: K runs in one array element, one per Slurm task (each with its own --cpus-per-task
    cores, all on the element's GPU: one rank each, cuda:0 of what Slurm gave the job).

    Slurm signals every task; each run saves on its own. submitit requeues only from task 0, so task 0 stays until
    every run has ended (also when its own run finished first) and requeues the element after the others saved;
    the requeued element skips the finished runs and resumes the others. A failing run is recorded in its
    element.json and does not end the others (no --kill-on-bad-exit for shared elements)."""

    def __init__(self, members: list[HypothesisTask]):
        self.members = members

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        # each run is a world of one: no launcher variables may reach Accelerate (a LOCAL_RANK, or an MPI-style
        # size > 1, makes it start a process group)
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                    "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"):
            os.environ.pop(var, None)
        preempt_signal = _preempt_signal()
        submitit_handler = signal.getsignal(preempt_signal)
        rank = env.global_rank
        result: dict = {"state": "idle"}  # a task beyond the last run (the last group may be smaller)
        if rank < len(self.members):
            try:
                result = self.members[rank].run(rank=0, world=1, job_id=env.job_id, hostname=env.hostname,
                                                 requeue=False)
            except Exception as exc:  # recorded in its element.json; the other runs go on
                result = {"hypothesis": self.members[rank].config.get("hypothesis"), "state": "failed",
                          "error": f"{type(exc).__name__}: {exc}"}
        if rank != 0:
            return result
        signal_name = result.get("signal") if result.get("state") == "preempted" else None
        signal_name = self._wait_for_others(env.job_id, signal_name)
        if signal_name and callable(submitit_handler) and _should_requeue(signal_name, preempt_signal):
            submitit_handler(preempt_signal, None)  # checkpoint() -> requeue -> exit
        return result

    def _wait_for_others(self, job_id: str, signal_name: str | None) -> str | None:
        """Until the other runs have ended (or, after a preemption signal, GROUP_SAVE_WAIT_S at most); returns the
        preemption signal seen, if any."""
        seen = {"signal": signal_name}

        def note(signum, _frame):
            seen["signal"] = signal.Signals(signum).name

        watched = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        previous = {s: signal.signal(s, note) for s in watched}
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        signalled_at = None
        try:
            while any(_run_is_live(m.run_dir, job_id, restarts) for m in self.members[1:]):
                if seen["signal"]:
                    signalled_at = signalled_at or time.time()
                    if time.time() - signalled_at > GROUP_SAVE_WAIT_S:
                        break
                time.sleep(0.5)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return seen["signal"]

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)([m.checkpoint().function for m in self.members]))


def _run_is_live(run_dir: Path, job_id: str, restarts: int, start_wait_s: float = 600.0) -> bool:
    """Is this run of the element (job_id, restarts) still training or evaluating? One that has not written its
    element.json in this run yet counts as live for start_wait_s (importing torch on a loaded node is slow)."""
    if is_finished(run_dir):
        return False
    element = _read_json(run_dir / ELEMENT_FILE)
    if element.get("job_id") != job_id or element.get("restarts") != restarts:
        return time.time() - _GROUP_T0 < start_wait_s  # not started in this run yet
    return element.get("state") in ("training", "evaluating") and _pid_alive(element) is not False


_GROUP_T0 = time.time()  # import time of this module in the job: about when its tasks started


def _preempt_signal() -> int:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (Linux): [state, ppid, ...]; None where there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # the name in (...) may hold spaces
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, so a reused pid is not taken for the element's."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None  # field 22


def _pid_alive(element: dict) -> bool | None:
    """Is the process that wrote this element.json alive? None when this machine cannot tell (another host, no
    pid recorded)."""
    import socket

    pid = element.get("pid")
    if not pid or element.get("hostname") not in (socket.gethostname(), socket.gethostname().split(".")[0]):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: kill(0) is all we know
    return stat[0] != "Z" and (element.get("pid_start") in (None, stat[19]))  # a zombie or a reused pid: dead


def rendezvous_port(job_id: str, purpose: str) -> int:
    """The rendezvous port of an element's process group ("train" or "eval"): the same on every rank (derived from
    the job id), different for the two purposes, and below 32768. Linux takes the local ports of outgoing
    connections from 32768-60999; submitit's default (20000-60000) overlaps that range, and a connection holding
    the port failed a 2-rank run with EADDRINUSE on a loaded machine."""
    ports = random.Random(job_id).sample(range(RENDEZVOUS_PORTS[0], RENDEZVOUS_PORTS[1] + 1), 2)
    return ports[0] if purpose == "train" else ports[1]


def _latest_checkpoint_step(run_dir: Path) -> int:
    from facevae_dist.checkpoint import latest_checkpoint, step_of

    latest = latest_checkpoint(run_dir)
    return step_of(latest) if latest is not None else 0


PREEMPT_GRACE_S = 3.0


def _should_requeue(signal_name: str | None, preempt_signal: int) -> bool:
    """After the trainer stopped on `signal_name` and saved: requeue this element?

    The preemption signal (USR1/USR2) says "requeue". SIGTERM alone is ambiguous: submitit's _interrupt (and
    clusters that preempt that way) send SIGTERM and then USR2, while `scancel` sends SIGTERM and then SIGKILL, and
    Slurm's own preemption requeues the job itself. So give a USR2 a moment to land (submitit's handler is
    installed again: it requeues and exits by itself), then requeue only if slurmctld still says RUNNING: a
    cancelled job is COMPLETING/CANCELLED there at once, one Slurm requeues is no longer RUNNING."""
    if signal_name != "SIGTERM":
        return True  # USR1/USR2 (or a peer rank's signal): a preemption
    deadline = time.time() + PREEMPT_GRACE_S
    while time.time() < deadline:
        time.sleep(0.2)  # the preemption signal lands here -> submitit requeues and exits; scancel -> SIGKILL
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return slurm_state(job_id, live=True) == "RUNNING"


# ---------------------------------------------------------------------------------------------------------------
# Submission


def resolve_grid(grid: str | None, hypotheses: list[str] | None = None) -> list[str]:
    """Hypothesis names to run: the named grid (None: the default grid), or the explicit list (names or aliases),
    de-duplicated in order."""
    from facevae_dist import hypotheses as hyp_module
    from facevae_dist.hypotheses import GRIDS, resolve_hypothesis

    if hypotheses:
        names = [resolve_hypothesis(h).name for h in hypotheses]
    else:
        grid = grid or getattr(hyp_module, "DEFAULT_GRID", "paper15")
        if grid not in GRIDS:
            raise UsageError(f"--grid {grid!r} is not a known grid; choose one of {', '.join(sorted(GRIDS))}")
        names = [resolve_hypothesis(h).name for h in GRIDS[grid]]
    return list(dict.fromkeys(names))


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; None/"" -> None (one run per hypothesis). A seed outside 0..2**32-1 or a
    repeated seed is a UsageError (a repeat would silently run fewer elements than asked)."""
    if not text or not text.strip():
        return None
    parts = [s.strip() for s in text.split(",") if s.strip()]
    seeds = [int(s) if s.lstrip("-").isdigit() else s for s in parts]
    bad = next((p for p in (seed_problem(s) for s in seeds) if p), None) if seeds else "no seed given"
    if bad:
        raise UsageError(f"--seeds {text!r}: {bad}; e.g. --seeds 0,1,2")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UsageError(f"--seeds {text!r}: {', '.join(map(str, repeated))} given more than once; list each seed once")
    return seeds


def element_key(hypothesis: str, seed: int | None) -> str:
    """The manifest's name of one element: the hypothesis, plus the seed when the sweep runs several."""
    return hypothesis if seed is None else f"{hypothesis} seed={seed}"


def element_configs(names: list[str], shards: str | Path, out: Path, overrides: list[str],
                    seeds: list[int] | None = None) -> dict[str, dict]:
    """One resolved, validated TrainConfig (as a dict) per (hypothesis, seed), keyed by element_key. Run dirs:
    SWEEP_DIR/<slug> without seeds, SWEEP_DIR/<slug>/seed-<s> with them. A seed sets both the model's seed
    (init, sampling noise) and the data order's: seeds are independent repeats of the whole run."""
    from facevae_dist.config import TrainConfig, apply_overrides
    from facevae_dist.hypotheses import resolve_hypothesis

    configs = {}
    for name in names:
        hyp = resolve_hypothesis(name)
        for seed in seeds or [None]:
            run_dir = out / hyp.slug if seed is None else out / hyp.slug / f"seed-{seed}"
            cfg = TrainConfig.from_hypothesis(name, run_dir=str(run_dir.resolve()),
                                              data={"shards": str(Path(shards).resolve())})
            cfg = apply_overrides(cfg, overrides)
            # the grid fixes these per element: an override must not silently turn the grid into copies of one run
            cfg.model.mask_mode = hyp.mask_mode
            cfg.loss.terms = hyp.loss_terms
            if seed is not None:
                cfg.seed = cfg.data.seed = seed
            cfg.resume = "auto"
            if cfg.deepspeed:  # jobs start in the code snapshot directory: relative paths would not resolve there
                cfg.deepspeed = str(Path(cfg.deepspeed).resolve())
            configs[element_key(name, seed)] = cfg.validate().to_dict()
    return configs


def live_owner(run_dir: Path) -> int | None:
    """The pid of a live process on this machine that trains or evaluates this element (element.json), else
    None (none, dead, or on another host: then Slurm's own state is what tells)."""
    element = _read_json(run_dir / ELEMENT_FILE)
    if element.get("state") in ("training", "evaluating") and _pid_alive(element) is True:
        return element.get("pid")
    return None


def is_finished(run_dir: Path) -> bool:
    element = _read_json(run_dir / ELEMENT_FILE)
    return element.get("state") == "finished" and (run_dir / "eval" / "metrics.json").is_file()


def snapshot_code(out: Path) -> Path:
    """Copy the facevae_dist package into SWEEP_DIR/code/<stamp>/ so edits made while the sweep runs do not change
    the running or requeued jobs (they import from the snapshot: it is first on their PYTHONPATH)."""
    import facevae_dist

    src = Path(facevae_dist.__file__).resolve().parent
    dest = out / "code" / time.strftime("%Y%m%d-%H%M%S")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp / "facevae_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    revision = git_revision(src.parent)  # the copy is outside git: its runs record the revision it was taken from
    if revision:
        atomic_write_text(tmp / "facevae_dist" / REVISION_FILE, revision + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _make_executor(cluster: str, folder: Path, slurm: SlurmOptions, code_dir: Path, name: str):
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=slurm.max_num_timeout)
    params = dict(name=name, timeout_min=slurm.timeout_min, nodes=slurm.nodes, tasks_per_node=slurm.ranks_per_node,
                  cpus_per_task=slurm.cpus_per_task)
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb:
        params["mem_gb"] = slurm.mem_gb
    if cluster == "slurm":
        params.update(slurm_array_parallelism=slurm.array_parallelism, slurm_signal_delay_s=slurm.signal_delay_s,
                      slurm_srun_args=slurm.srun_args(),
                      slurm_setup=[f"export PYTHONPATH={code_dir}${{PYTHONPATH:+:$PYTHONPATH}}",
                                   "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"])
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(slurm, key):
                params[f"slurm_{key}"] = getattr(slurm, key)
    executor.update_parameters(**params)
    return executor


def submit_sweep(out: str | Path, shards: str | Path, *, grid: str | None = None,
                 hypotheses: list[str] | None = None, seeds: list[int] | None = None, cluster: str = "slurm",
                 slurm: SlurmOptions | None = None, overrides: list[str] | None = None, eval_split: str = "test",
                 eval_limit: int | None = None, wait: bool = False) -> dict:
    """Submit the unfinished (hypothesis, seed) elements of the grid as one job array; returns the manifest.
    Rerunning skips the finished ones and those still queued/running, and resubmits the rest (which resume from
    their checkpoints)."""
    if cluster not in CLUSTERS:
        raise UsageError(f"--cluster {cluster!r}: choose one of {', '.join(CLUSTERS)}")
    slurm = (slurm or SlurmOptions()).validate()
    if slurm.elements_per_gpu > 1 and cluster == "debug":
        raise UsageError("--elements-per-gpu > 1 runs one process per run: use --cluster slurm or local")
    out = Path(out).resolve()
    shards = Path(shards)
    if not (shards / "manifest.json").is_file():
        raise UsageError(f"--shards {shards}: no manifest.json there; build shards first "
                         "(facevae shards build --source ... --out DIR)")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--cluster slurm: `sbatch` is not on PATH; run on a Slurm login node, use --cluster local, "
                         "or start a one-node cluster with slurm/local-cluster/start.sh")
    names = resolve_grid(grid, hypotheses)
    configs = element_configs(names, shards, out, overrides or [], seeds)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_json(out / MANIFEST) or {"created": time.time(), "elements": {}, "submissions": []}
    elements = manifest["elements"] = _elements(manifest)
    manifest.pop("hypotheses", None)  # an older manifest's name for the same table

    todo = _elements_to_submit(configs, elements, cluster)
    if not todo:
        info("nothing to submit: every element is finished or still queued/running")
        atomic_write_json(out / MANIFEST, manifest)
        return manifest

    code_dir = snapshot_code(out)
    executor = _make_executor(cluster, out / "logs", slurm, code_dir, name=f"facevae-{out.name}")
    k = slurm.elements_per_gpu
    groups = [todo[i:i + k] for i in range(0, len(todo), k)]  # one array element each
    tasks = [HypothesisTask(configs[key], eval_split, eval_limit) for key in todo]
    if k > 1:
        tasks = [ElementGroup(tasks[i:i + k]) for i in range(0, len(tasks), k)]
    # batch() = one job array; each element's function is the task itself, so submitit finds its checkpoint()
    # (map_array(fn, args) would hide it behind fn)
    with _job_environment(code_dir, cluster, slurm.cpus_per_task), executor.batch():
        jobs = [executor.submit(task) for task in tasks]

    _record_submission(manifest, configs, groups, jobs, cluster=cluster, code_dir=code_dir, slurm=slurm, seeds=seeds,
                       overrides=overrides, eval_split=eval_split, eval_limit=eval_limit)
    manifest.update(shards=str(shards.resolve()), grid=grid, out=str(out))
    atomic_write_json(out / MANIFEST, manifest)
    info(f"submitted {len(todo)} run(s) as {len(jobs)} element(s) of job array {jobs[0].job_id.split('_')[0]} on "
         f"{cluster}; watch with: facevae sweep status {out}")
    if wait:
        wait_for_jobs(jobs)
    return manifest


def _elements_to_submit(configs: dict, elements: dict, cluster: str) -> list[str]:
    """The keys of the elements to (re)submit: not finished, not queued or running on Slurm, not alive here. Adds a
    manifest entry for each new element."""
    todo = []
    for key, cfg in configs.items():
        run_dir = Path(cfg["run_dir"])
        entry = elements.setdefault(key, {"hypothesis": cfg["hypothesis"], "seed": cfg["seed"],
                                          "slug": run_dir.name, "run_dir": str(run_dir), "job_ids": []})
        if is_finished(run_dir):
            info(f"skip {key}: finished ({run_dir / 'eval' / 'metrics.json'})")
            continue
        last = entry["job_ids"][-1] if entry["job_ids"] else None
        state = slurm_state(last) if last and entry.get("cluster") == "slurm" == cluster else ""
        if state in ACTIVE_STATES:
            info(f"skip {key}: job {last} is still {state}")
            continue
        owner = live_owner(run_dir)
        if owner is not None:  # a local job (or one on this node) still at it: a second copy would only fail
            info(f"skip {key}: still running here as pid {owner}")
            continue
        todo.append(key)
    return todo


@contextlib.contextmanager
def _job_environment(code_dir: Path, cluster: str, cpus_per_task: int):
    """The environment the jobs are submitted from. Local jobs inherit this process's environment: the snapshot
    goes first on PYTHONPATH (debug runs in this process and imports the live package). Jobs start in the submitting
    directory, and `python -m submitit...` puts that directory first on sys.path, so a submission from the checkout
    would import the live package: submit from the snapshot directory instead (every path in the element configs is
    absolute). Restores the environment afterwards; a failed submission is one line."""
    import submitit

    old_path, old_threads = os.environ.get("PYTHONPATH"), os.environ.get("OMP_NUM_THREADS")
    os.environ["PYTHONPATH"] = str(code_dir) + (os.pathsep + old_path if old_path else "")
    if cluster == "local" and old_threads is None:
        # what the Slurm jobs get from slurm_setup: a local element uses its --cpus-per-task cores, not every core
        # (four 2-thread elements on 2 cores would each fight the others for them)
        os.environ["OMP_NUM_THREADS"] = str(cpus_per_task)
    try:
        # clean_env: submitting from inside an allocation must not hand its SLURM_* variables to the new jobs
        with contextlib.chdir(code_dir), submitit.helpers.clean_env():
            yield
    except submitit.core.utils.FailedJobError as exc:
        raise FaceVAEError(f"submission failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        if old_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _record_submission(manifest: dict, configs: dict, groups: list[list[str]], jobs, *, cluster: str, code_dir: Path,
                       slurm: SlurmOptions, seeds, overrides, eval_split: str, eval_limit) -> None:
    """Each submitted element's job id, array index and log paths into the manifest, and the submission itself."""
    elements = manifest["elements"]
    submission = {"time": time.time(), "cluster": cluster, "code": str(code_dir), "slurm": asdict(slurm),
                  "seeds": seeds, "overrides": overrides or [], "eval_split": eval_split, "eval_limit": eval_limit,
                  "elements": {}}
    for index, (group, job) in enumerate(zip(groups, jobs)):
        for task_index, key in enumerate(group):
            paths = job.task(task_index).paths if slurm.elements_per_gpu > 1 else job.paths
            elements[key].update(cluster=cluster, array_index=index, task=task_index, log_out=str(paths.stdout),
                                 log_err=str(paths.stderr), max_steps=configs[key]["max_steps"])
            elements[key]["job_ids"].append(job.job_id)
        submission["elements"][str(index)] = {"elements": group, "job_id": job.job_id}
    manifest["submissions"].append(submission)


def wait_for_jobs(jobs) -> None:
    """Block until every job ends (a failed element does not stop the wait for the others)."""
    from facevae_dist.progress import make_progress

    with make_progress() as progress:
        bar = progress.add_task("sweep", total=len(jobs))
        pending = list(jobs)
        while pending:
            for job in list(pending):
                if job.done():
                    pending.remove(job)
                    progress.advance(bar)
            time.sleep(2)


# ---------------------------------------------------------------------------------------------------------------
# Status and collection


def slurm_state(job_id: str, *, live: bool = False) -> str:
    """Slurm's state of one job / array element ("RUNNING", "CANCELLED", ...; '' if unknown). From sacct (it also
    knows finished jobs; needs accounting), falling back to squeue; live=True asks squeue (slurmctld) first, since
    sacct can lag a second or two behind."""
    def from_sacct() -> str:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True,
                             text=True, timeout=20)
        for line in out.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid == job_id and state:
                return state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
        return ""

    def from_squeue() -> str:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""

    try:
        first, second = (from_squeue, from_sacct) if live else (from_sacct, from_squeue)
        return first() or second()
    except (OSError, subprocess.SubprocessError):
        return ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _last_train_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if "loss" in rec and not rec.get("split"):
                last = rec
    return last


def _read_manifest(sweep_dir: str | Path) -> dict:
    manifest = _read_json(Path(sweep_dir) / MANIFEST)
    if not manifest:
        raise UsageError(f"{sweep_dir}: no {MANIFEST}; is this a directory written by `facevae sweep submit`?")
    return manifest


def _elements(manifest: dict) -> dict[str, dict]:
    """element key -> entry; a manifest from before --seeds named the same table "hypotheses" (one per name)."""
    if "elements" in manifest:
        return manifest["elements"]
    return {name: {"hypothesis": name, **entry} for name, entry in manifest.get("hypotheses", {}).items()}


# Slurm states of a job that has ended without finishing its work
DEAD_STATES = ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _element_state(element: dict, job_id: str, sstate: str) -> str:
    """What `sweep status` says about one element: its own record, corrected by what Slurm knows and by whether
    the process that claims to train is still alive (a killed job cannot update its own element.json)."""
    state = element.get("state", "not started" if job_id else "not submitted")
    if state == "finished":
        return state
    if sstate in DEAD_STATES:
        return sstate.lower()
    if sstate == "FAILED":
        return "failed"
    if sstate in ("PENDING", "REQUEUED"):
        return "queued" if state == "not started" else f"{state}, requeued"
    if state in ("training", "evaluating"):
        if sstate == "COMPLETED":  # the job ended, and this run never said it stopped: killed (e.g. OOM, SIGKILL)
            return "killed"
        if _pid_alive(element) is False:  # local jobs (and shared elements) on this machine: the process is gone
            return "killed"
    return state


def sweep_status(sweep_dir: str | Path) -> list[dict]:
    """One row per element (hypothesis, seed): state (Slurm's where known, else the element's own; a dead job is
    "killed"/"failed"/"cancelled", never "training"), step, loss, images/s, ETA while it trains."""
    manifest = _read_manifest(sweep_dir)
    rows = []
    for key, entry in _elements(manifest).items():
        run_dir = Path(entry["run_dir"])
        element = _read_json(run_dir / ELEMENT_FILE)
        job_id = entry["job_ids"][-1] if entry.get("job_ids") else ""
        sstate = slurm_state(job_id) if job_id and entry.get("cluster") == "slurm" else ""
        state = _element_state(element, job_id, sstate)
        rec = _last_train_record(run_dir)
        step, max_steps = rec.get("step", element.get("step")), entry.get("max_steps")
        ips = rec.get("images_per_s")
        eta = None
        if step and max_steps and ips and rec.get("samples_seen") and state == "training":
            eta = (max_steps - step) * (rec["samples_seen"] / step) / ips  # images per step from the counters
        rows.append({"element": key, "hypothesis": entry.get("hypothesis", key), "seed": entry.get("seed"),
                     "job_id": job_id, "slurm_state": sstate, "state": state,
                     "step": step, "max_steps": max_steps, "loss": rec.get("loss"), "images_per_s": ips,
                     "eta_s": eta, "log": entry.get("log_err"), "error": element.get("error"),
                     "restarts": element.get("restarts"), "run_dir": str(run_dir)})
    return rows


def collect_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """The report (tables, figures; seeds aggregated by the report) over every finished element, all seeds;
    unfinished ones are listed."""
    from facevae_dist.report import make_report

    sweep_dir = Path(sweep_dir)
    # only the run directories are needed here: no Slurm queries, unlike sweep_status
    run_dirs = {key: Path(entry["run_dir"]) for key, entry in _elements(_read_manifest(sweep_dir)).items()}
    finished = [d for d in run_dirs.values() if is_finished(d)]
    if not finished:
        raise FaceVAEError(f"{sweep_dir}: no finished element yet (see `facevae sweep status {sweep_dir}`)")
    missing = [key for key, d in run_dirs.items() if d not in finished]
    if missing:
        info(f"not in the report (unfinished): {', '.join(missing)}")
    return make_report(finished, Path(out) if out else sweep_dir / "report")
