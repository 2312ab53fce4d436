"""The hypothesis grid as one Slurm job array (submitit): one requeueable element per hypothesis.

    submit_sweep()  resolve the grid -> one TrainConfig per hypothesis -> snapshot the code -> executor.map_array
    HypothesisTask  the array element: train (resume=auto) then evaluate; on the preemption signal the trainer saves
                    a checkpoint and the element requeues itself, so the requeued run continues from that step
    sweep_status()  per hypothesis: Slurm state, element state, step, last loss, images/s, ETA, log path
    collect_sweep() the report (report.make_report) over the finished elements

Layout of SWEEP_DIR:
    sweep.json             manifest: array index -> hypothesis, every submission's job ids, options (atomic JSON)
    code/<stamp>/          the facevae_dist package as it was at submit time (first on the jobs' PYTHONPATH)
    logs/                  submitit's folder: <jobid>_<index>_0_log.{out,err}
    <hypothesis-slug>/     the run directory (config.toml, checkpoints/, metrics.jsonl, eval/) + element.json
    report/                `facevae sweep collect`
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import atomic_write_json
from facevae_dist.progress import info

CLUSTERS = ("slurm", "local", "debug")
MANIFEST = "sweep.json"
ELEMENT_FILE = "element.json"
# Slurm states in which an element still holds (or will hold) a slot: a resubmission must not start it twice
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


@dataclass
class SlurmOptions:
    """Resources of ONE array element (one hypothesis). Ranks inside an element: nodes x tasks_per_node."""

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
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


# ---------------------------------------------------------------------------------------------------------------
# The array element


class HypothesisTask:
    """One hypothesis: train (resuming whatever its run directory holds), then evaluate. Requeueable: submitit
    calls checkpoint() on the preemption signal / time limit and resubmits the returned copy of this task."""

    def __init__(self, config: dict, eval_split: str = "test", eval_limit: int | None = None):
        self.config = config  # TrainConfig.to_dict(); run_dir = SWEEP_DIR/<slug>
        self.eval_split = eval_split
        self.eval_limit = eval_limit

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    def __call__(self) -> dict:
        import submitit

        from facevae_dist.config import TrainConfig
        from facevae_dist.evaluate import evaluate
        from facevae_dist.train import train

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # ranks of this element (nodes x tasks_per_node) -> RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT, which
            # Accelerate reads like torchrun's. Every rank keeps all GPUs visible and uses cuda:LOCAL_RANK.
            # overwrite: stale RANK/MASTER_* inherited from the submitting shell must not win over this job's ranks
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        is_main = env.global_rank == 0
        if is_finished(self.run_dir):
            # a duplicate or late run of a finished element (array task started twice, manual resubmission):
            # leave the results as they are
            return {"hypothesis": self.config.get("hypothesis"), "state": "finished", "skipped": True,
                    "metrics_json": str(self.run_dir / "eval" / "metrics.json")}
        preempt_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        submitit_handler = signal.getsignal(preempt_signal)  # submitit's checkpoint-and-requeue handler
        element = {"hypothesis": self.config.get("hypothesis"), "job_id": env.job_id, "hostname": env.hostname,
                   "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "world_size": env.num_tasks,
                   # the package this element imports: SWEEP_DIR/code/<stamp>/ (the snapshot), not the live checkout
                   "code": str(Path(__import__("facevae_dist").__file__).resolve().parent)}
        # where this run of the element starts: > 0 after a requeue (the proof that it resumed, not restarted)
        element["start_step"] = _latest_checkpoint_step(self.run_dir)
        try:
            if is_main:
                self._write_element({**element, "state": "training", "started": time.time()})
            summary = train(TrainConfig.from_dict(self.config, source="sweep element").validate())
            if summary["stopped"] == "preempted":
                if is_main:
                    self._write_element({**element, "state": "preempted", "step": summary["step"],
                                         "signal": summary.get("signal")})
                if callable(submitit_handler) and _should_requeue(summary.get("signal"), preempt_signal):
                    # The trainer took the signal and saved; now submitit checkpoint()s this task and requeues it
                    # (rank 0 only; on other ranks the handler returns). The requeued element resumes from there.
                    submitit_handler(preempt_signal, None)
                return {"hypothesis": self.config.get("hypothesis"), "state": "preempted", **summary}
            if is_main:
                self._write_element({**element, "state": "evaluating", "step": summary["step"]})
            if env.num_tasks > 1:
                # train() closed its process group; evaluate() opens a new one. On the same MASTER_PORT a fast rank
                # can reach rank 0's old, closing rendezvous store and hang: give the new group its own port.
                os.environ["MASTER_PORT"] = str(_eval_port(env.job_id, int(os.environ["MASTER_PORT"])))
            result = evaluate(self.run_dir, self.config["data"]["shards"], split=self.eval_split,
                              limit=self.eval_limit)
            if is_main:
                self._write_element({**element, "state": "finished", "step": summary["step"],
                                     "finished": time.time()})
            return {"hypothesis": self.config.get("hypothesis"), "state": "finished", "step": summary["step"],
                    "metrics_json": str(self.run_dir / "eval" / "metrics.json"),
                    "n_images": result.get("n_images")}
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


def _eval_port(job_id: str, train_port: int) -> int:
    """A rendezvous port for the evaluation's process group: the same on every rank, never the training one."""
    import random

    port = random.Random(f"{job_id}-eval").randint(20000, 60000)
    return port if port != train_port else port + 1


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


def resolve_grid(grid: str, hypotheses: list[str] | None = None) -> list[str]:
    """Hypothesis names to run: the named grid, or the explicit list (names or aliases), de-duplicated in order."""
    from facevae_dist.hypotheses import GRIDS, resolve_hypothesis

    if hypotheses:
        names = [resolve_hypothesis(h).name for h in hypotheses]
    else:
        if grid not in GRIDS:
            raise UsageError(f"--grid {grid!r} is not a known grid; choose one of {', '.join(sorted(GRIDS))}")
        names = [resolve_hypothesis(h).name for h in GRIDS[grid]]
    return list(dict.fromkeys(names))


def element_configs(names: list[str], shards: str | Path, out: Path, overrides: list[str]) -> dict[str, dict]:
    """One resolved, validated TrainConfig (as a dict) per hypothesis, its run_dir under the sweep directory."""
    from facevae_dist.config import TrainConfig, apply_overrides
    from facevae_dist.hypotheses import resolve_hypothesis

    configs = {}
    for name in names:
        hyp = resolve_hypothesis(name)
        cfg = TrainConfig.from_hypothesis(name, run_dir=str((out / hyp.slug).resolve()),
                                          data={"shards": str(Path(shards).resolve())})
        cfg = apply_overrides(cfg, overrides)
        # the grid fixes these two per element: an override must not silently turn the grid into 15 copies of one run
        cfg.model.mask_mode = hyp.mask_mode
        cfg.loss.terms = hyp.loss_terms
        cfg.resume = "auto"
        if cfg.deepspeed:  # jobs start in the code snapshot directory: relative paths would not resolve there
            cfg.deepspeed = str(Path(cfg.deepspeed).resolve())
        configs[name] = cfg.validate().to_dict()
    return configs


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
                      slurm_setup=[f"export PYTHONPATH={code_dir}${{PYTHONPATH:+:$PYTHONPATH}}",
                                   "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"])
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(slurm, key):
                params[f"slurm_{key}"] = getattr(slurm, key)
    executor.update_parameters(**params)
    return executor


def submit_sweep(out: str | Path, shards: str | Path, *, grid: str = "paper15", hypotheses: list[str] | None = None,
                 cluster: str = "slurm", slurm: SlurmOptions | None = None, overrides: list[str] | None = None,
                 eval_split: str = "test", eval_limit: int | None = None, wait: bool = False) -> dict:
    """Submit the unfinished hypotheses of the grid as one job array; returns the manifest. Rerunning skips the
    finished ones and those still queued/running, and resubmits the rest (which resume from their checkpoints)."""
    import submitit

    if cluster not in CLUSTERS:
        raise UsageError(f"--cluster {cluster!r}: choose one of {', '.join(CLUSTERS)}")
    slurm = (slurm or SlurmOptions()).validate()
    out = Path(out).resolve()
    shards = Path(shards)
    if not (shards / "manifest.json").is_file():
        raise UsageError(f"--shards {shards}: no manifest.json there; build shards first "
                         "(facevae shards build --source ... --out DIR)")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--cluster slurm: `sbatch` is not on PATH; run on a Slurm login node, use --cluster local, "
                         "or start a one-node cluster with slurm/local-cluster/start.sh")
    names = resolve_grid(grid, hypotheses)
    configs = element_configs(names, shards, out, overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_json(out / MANIFEST) or {"created": time.time(), "hypotheses": {}, "submissions": []}

    todo = []
    for name in names:
        run_dir = Path(configs[name]["run_dir"])
        entry = manifest["hypotheses"].setdefault(name, {"slug": run_dir.name, "run_dir": str(run_dir), "job_ids": []})
        if is_finished(run_dir):
            info(f"skip {name}: finished ({run_dir / 'eval' / 'metrics.json'})")
            continue
        last = entry["job_ids"][-1] if entry["job_ids"] else None
        state = slurm_state(last) if last and entry.get("cluster") == "slurm" == cluster else ""
        if state in ACTIVE_STATES:
            info(f"skip {name}: job {last} is still {state}")
            continue
        todo.append(name)
    if not todo:
        info("nothing to submit: every hypothesis is finished or still queued/running")
        atomic_write_json(out / MANIFEST, manifest)
        return manifest

    code_dir = snapshot_code(out)
    executor = _make_executor(cluster, out / "logs", slurm, code_dir, name=f"facevae-{out.name}")
    tasks = [HypothesisTask(configs[n], eval_split, eval_limit) for n in todo]
    # local jobs inherit this process's environment: put the snapshot first there too (debug runs in this process
    # and imports the live package). Jobs start in the submitting directory, and `python -m submitit...` puts that
    # directory first on sys.path, so a submission from the checkout would import the live package: submit from
    # the snapshot directory instead (every path in the element configs is absolute).
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code_dir) + (os.pathsep + old_path if old_path else "")
    try:
        # clean_env: submitting from inside an allocation must not hand its SLURM_* variables to the new jobs
        with contextlib.chdir(code_dir), submitit.helpers.clean_env():
            # batch() = one job array; each element's function is the task itself, so submitit finds its
            # checkpoint() (map_array(fn, args) would hide it behind fn)
            with executor.batch():
                jobs = [executor.submit(task) for task in tasks]
    except submitit.core.utils.FailedJobError as exc:
        raise FaceVAEError(f"submission failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path

    submission = {"time": time.time(), "cluster": cluster, "code": str(code_dir), "slurm": asdict(slurm),
                  "overrides": overrides or [], "eval_split": eval_split, "eval_limit": eval_limit,
                  "elements": {}}
    for index, (name, job) in enumerate(zip(todo, jobs)):
        entry = manifest["hypotheses"][name]
        entry.update(cluster=cluster, array_index=index, log_out=str(job.paths.stdout), log_err=str(job.paths.stderr))
        entry["job_ids"].append(job.job_id)
        entry["max_steps"] = configs[name]["max_steps"]
        submission["elements"][str(index)] = {"hypothesis": name, "job_id": job.job_id}
    manifest["submissions"].append(submission)
    manifest.update(shards=str(shards.resolve()), grid=grid, out=str(out))
    atomic_write_json(out / MANIFEST, manifest)
    info(f"submitted {len(jobs)} element(s) as job array {jobs[0].job_id.split('_')[0]} on {cluster}; "
         f"watch with: facevae sweep status {out}")
    if wait:
        wait_for_jobs(jobs)
    return manifest


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


def sweep_status(sweep_dir: str | Path) -> list[dict]:
    """One row per hypothesis: state (Slurm's where known, else the element's own), step, loss, images/s, ETA."""
    manifest = _read_manifest(sweep_dir)
    rows = []
    for name, entry in manifest["hypotheses"].items():
        run_dir = Path(entry["run_dir"])
        element = _read_json(run_dir / ELEMENT_FILE)
        job_id = entry["job_ids"][-1] if entry.get("job_ids") else ""
        sstate = slurm_state(job_id) if job_id and entry.get("cluster") == "slurm" else ""
        state = element.get("state", "not started" if job_id else "not submitted")
        if sstate in ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
            state = sstate.lower() if state != "finished" else state
        elif sstate == "FAILED" and state != "failed":
            state = "failed"
        elif sstate in ("PENDING", "REQUEUED") and state not in ("finished",):
            state = "queued" if state in ("not started",) else f"{state}, requeued"
        rec = _last_train_record(run_dir)
        step, max_steps = rec.get("step", element.get("step")), entry.get("max_steps")
        ips = rec.get("images_per_s")
        eta = None
        if step and max_steps and ips and rec.get("samples_seen") and state == "training":
            eta = (max_steps - step) * (rec["samples_seen"] / step) / ips  # images per step from the counters
        rows.append({"hypothesis": name, "job_id": job_id, "slurm_state": sstate, "state": state,
                     "step": step, "max_steps": max_steps, "loss": rec.get("loss"), "images_per_s": ips,
                     "eta_s": eta, "log": entry.get("log_err"), "error": element.get("error"),
                     "restarts": element.get("restarts")})
    return rows


def collect_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """The report (table.md, table.csv, figures/) over every finished element; unfinished ones are listed."""
    from facevae_dist.report import make_report

    sweep_dir = Path(sweep_dir)
    # only the run directories are needed here: no Slurm queries, unlike sweep_status
    run_dirs = {name: Path(entry["run_dir"]) for name, entry in _read_manifest(sweep_dir)["hypotheses"].items()}
    finished = [d for d in run_dirs.values() if is_finished(d)]
    if not finished:
        raise FaceVAEError(f"{sweep_dir}: no finished hypothesis yet (see `facevae sweep status {sweep_dir}`)")
    missing = [name for name, d in run_dirs.items() if d not in finished]
    if missing:
        info(f"not in the report (unfinished): {', '.join(missing)}")
    return make_report(finished, Path(out) if out else sweep_dir / "report")
