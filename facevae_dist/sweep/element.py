"""What runs on a node: one array element of a sweep.

    HypothesisTask  one (hypothesis, seed): train (resume=auto) then evaluate; on the preemption signal the trainer
                    saves a checkpoint and the element requeues itself, so the requeued run continues from that step
    ElementGroup    --elements-per-gpu K: one array element runs K of them as K Slurm tasks sharing its GPU
"""

from __future__ import annotations

import os
import random
import signal
import time
import traceback
from pathlib import Path

import submitit

from facevae_dist.fileio import atomic_write_json
from facevae_dist.sweep.records import (
    ELEMENT_FILE,
    is_finished,
    live_owner,
    pid_alive,
    process_start,
    read_json,
    slurm_state,
)

RENDEZVOUS_PORTS = (20000, 32767)  # below Linux's default ephemeral range (ip_local_port_range 32768-60999)


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
                   "pid": os.getpid(), "pid_start": process_start(os.getpid()),
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
            from facevae_dist.evaluate.scoring import evaluate
            from facevae_dist.train.loop import train

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
                from facevae_dist.train.distributed import close_process_group

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

        return submitit.helpers.DelayedSubmission(type(self)([m.checkpoint().function for m in self.members]))


def _run_is_live(run_dir: Path, job_id: str, restarts: int, start_wait_s: float = 600.0) -> bool:
    """Is this run of the element (job_id, restarts) still training or evaluating? One that has not written its
    element.json in this run yet counts as live for start_wait_s (importing torch on a loaded node is slow)."""
    if is_finished(run_dir):
        return False
    element = read_json(run_dir / ELEMENT_FILE)
    if element.get("job_id") != job_id or element.get("restarts") != restarts:
        return time.time() - _GROUP_T0 < start_wait_s  # not started in this run yet
    return element.get("state") in ("training", "evaluating") and pid_alive(element) is not False


_GROUP_T0 = time.time()  # import time of this module in the job: about when its tasks started


def _preempt_signal() -> int:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def rendezvous_port(job_id: str, purpose: str) -> int:
    """The rendezvous port of an element's process group ("train" or "eval"): the same on every rank (derived from
    the job id), different for the two purposes, and below 32768. Linux takes the local ports of outgoing
    connections from 32768-60999; submitit's default (20000-60000) overlaps that range, and a connection holding
    the port failed a 2-rank run with EADDRINUSE on a loaded machine."""
    ports = random.Random(job_id).sample(range(RENDEZVOUS_PORTS[0], RENDEZVOUS_PORTS[1] + 1), 2)
    return ports[0] if purpose == "train" else ports[1]


def _latest_checkpoint_step(run_dir: Path) -> int:
    from facevae_dist.train.checkpoint import latest_checkpoint, step_of

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
