"""Submitting the hypothesis grid as one Slurm job array (submitit): one requeueable element per (hypothesis, seed).

    submit_sweep()  resolve the grid x seeds -> one TrainConfig per element -> snapshot the code -> one job array
    dry_run_sweep() the same plan, and the sbatch script, without submitting or writing anything
    sbatch.py       what an element asks Slurm for (SlurmOptions -> the sbatch script)
    element.py      what runs on a node: one (hypothesis, seed) trains then evaluates, and requeues on preemption
    status.py       `sweep status` (state, step, loss, images/s, ETA per element) and `sweep collect` (the report)
    records.py      the manifest, each element's record, Slurm's state of a job

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
import io
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import submitit

import facevae_dist
from facevae_dist.config import TrainConfig, apply_overrides
from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import atomic_write_json, atomic_write_text
from facevae_dist.hypotheses import resolve_grid, resolve_hypothesis
from facevae_dist.progress import info, make_progress, warn
from facevae_dist.runinfo import REVISION_FILE, git_revision
from facevae_dist.seeds import seed_problem
from facevae_dist.sweep.element import ElementGroup, HypothesisTask
from facevae_dist.sweep.records import (
    ACTIVE_STATES,
    MANIFEST,
    is_finished,
    live_owner,
    manifest_elements,
    read_json,
    slurm_state,
)
from facevae_dist.sweep.sbatch import SlurmOptions, sbatch_script, slurm_parameters

CLUSTERS = ("slurm", "local", "debug")


def _comma_list(flag: str, text: str, example: str) -> list[str]:
    """The items of a comma-separated flag value; an empty value or an empty item (`""`, `0,,1`, an unset shell
    variable) is a UsageError: a flag given empty must not quietly mean "the default"."""
    parts = [s.strip() for s in text.split(",")]
    if not any(parts):
        raise UsageError(f"{flag} {text!r}: empty; leave {flag} out for the default, or give e.g. {flag} {example}")
    if not all(parts):
        raise UsageError(f"{flag} {text!r}: an empty item between commas; e.g. {flag} {example}")
    return parts


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; None (the flag left out) -> None (one run per hypothesis). An empty value or
    item, a seed outside 0..2**32-1 or a repeated seed is a UsageError (a repeat would silently run fewer elements
    than asked)."""
    if text is None:
        return None
    parts = _comma_list("--seeds", text, "0,1,2")
    seeds = [int(s) if s.lstrip("-").isdigit() else s for s in parts]
    bad = next((p for p in (seed_problem(s) for s in seeds) if p), None)
    if bad:
        raise UsageError(f"--seeds {text!r}: {bad}; e.g. --seeds 0,1,2")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UsageError(f"--seeds {text!r}: {', '.join(map(str, repeated))} given more than once; list each seed once")
    return seeds


def parse_hypotheses(text: str | None) -> list[str] | None:
    """`--hypotheses l2/none,H9` -> ["l2/none", "H9"]; None (the flag left out) -> None (the grid). Given but empty
    (an unset shell variable) is a UsageError, not the whole grid."""
    if text is None:
        return None
    return _comma_list("--hypotheses", text, "l2/none,l2/mask+decoder")


def element_key(hypothesis: str, seed: int | None) -> str:
    """The manifest's name of one element: the hypothesis, plus the seed when the sweep runs several."""
    return hypothesis if seed is None else f"{hypothesis} seed={seed}"


def element_configs(names: list[str], shards: str | Path, out: Path, overrides: list[str],
                    seeds: list[int] | None = None) -> dict[str, dict]:
    """One resolved, validated TrainConfig (as a dict) per (hypothesis, seed), keyed by element_key. Run dirs:
    SWEEP_DIR/<slug> without seeds, SWEEP_DIR/<slug>/seed-<s> with them. A seed sets both the model's seed
    (init, sampling noise) and the data order's: seeds are independent repeats of the whole run."""

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


def snapshot_dir(out: Path) -> Path:
    """Where a snapshot taken now goes: SWEEP_DIR/code/<stamp>/."""
    return out / "code" / time.strftime("%Y%m%d-%H%M%S")


def snapshot_code(out: Path) -> Path:
    """Copy the facevae_dist package into SWEEP_DIR/code/<stamp>/ so edits made while the sweep runs do not change
    the running or requeued jobs (they import from the snapshot: it is first on their PYTHONPATH)."""

    src = Path(facevae_dist.__file__).resolve().parent
    dest = snapshot_dir(out)
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
    if cluster == "slurm":  # SlurmExecutor itself: its parameters are the ones sbatch_script() shows
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=slurm.max_num_timeout,
                                          python=slurm.python_command)
        executor.update_parameters(**slurm_parameters(slurm, code_dir, name))
        return executor
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(name=name, timeout_min=slurm.timeout_min, nodes=slurm.nodes, tasks_per_node=slurm.ranks_per_node,
                  cpus_per_task=slurm.cpus_per_task)
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb:
        params["mem_gb"] = slurm.mem_gb
    executor.update_parameters(**params)
    return executor


def _job_name(out: Path) -> str:
    return f"facevae-{out.name}"


def _missing_slurm_commands() -> list[str]:
    """sbatch submits; submitit refuses to build a Slurm executor without srun (its test for being on a cluster)."""
    return [command for command in ("sbatch", "srun") if shutil.which(command) is None]


@dataclass
class SweepPlan:
    """What a submission does: the elements to (re)submit, grouped into array elements (elements_per_gpu runs each),
    and the manifest with an entry for every element (in memory until the submission writes it)."""

    out: Path
    shards: Path
    cluster: str
    slurm: SlurmOptions
    configs: dict[str, dict]
    manifest: dict
    groups: list[list[str]]

    @property
    def todo(self) -> list[str]:
        return [key for group in self.groups for key in group]


def plan_sweep(out: str | Path, shards: str | Path, *, grid: str | None = None, hypotheses: list[str] | None = None,
               seeds: list[int] | None = None, cluster: str = "slurm", slurm: SlurmOptions | None = None,
               overrides: list[str] | None = None, need_slurm: bool = True) -> SweepPlan:
    """Validate the request and decide what to submit; writes nothing. need_slurm: refuse at once (one line, before
    any file exists) when this machine lacks sbatch or srun."""
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
    missing = _missing_slurm_commands() if cluster == "slurm" and need_slurm else []
    if missing:
        raise UsageError(f"--cluster slurm: {' and '.join(f'`{c}`' for c in missing)} not on PATH; run on a Slurm "
                         "login node, use --cluster local, or start a one-node cluster with "
                         "slurm/local-cluster/start.sh")
    names = [h.name for h in resolve_grid(grid, hypotheses)]
    configs = element_configs(names, shards, out, overrides or [], seeds)
    manifest = read_json(out / MANIFEST) or {"created": time.time(), "elements": {}, "submissions": []}
    elements = manifest["elements"] = manifest_elements(manifest)
    manifest.pop("hypotheses", None)  # an older manifest's name for the same table
    todo = _elements_to_submit(configs, elements, cluster)
    k = slurm.elements_per_gpu
    groups = [todo[i:i + k] for i in range(0, len(todo), k)]  # one array element each
    return SweepPlan(out, shards, cluster, slurm, configs, manifest, groups)


def dry_run_sweep(out: str | Path, shards: str | Path, **request) -> dict:
    """What `submit_sweep` with the same arguments would submit, without submitting or writing anything: each array
    element's runs and, on Slurm, the sbatch script submitit would write (the snapshot's path is the one a
    submission now would create). Runs on a machine without Slurm too (`missing` names what it lacks)."""
    plan = plan_sweep(out, shards, need_slurm=False, **request)
    script = None
    if plan.cluster == "slurm" and plan.groups:
        script = sbatch_script(plan.slurm, plan.out / "logs", snapshot_dir(plan.out), _job_name(plan.out),
                               len(plan.groups))
    return {"cluster": plan.cluster, "out": str(plan.out), "script": script,
            "missing": _missing_slurm_commands() if plan.cluster == "slurm" else [],
            "python": plan.slurm.python_command if plan.cluster == "slurm" else None,
            "elements": [{"index": i, "runs": [{"element": key, "run_dir": plan.configs[key]["run_dir"]}
                                               for key in group]}
                         for i, group in enumerate(plan.groups)]}


def submit_sweep(out: str | Path, shards: str | Path, *, grid: str | None = None,
                 hypotheses: list[str] | None = None, seeds: list[int] | None = None, cluster: str = "slurm",
                 slurm: SlurmOptions | None = None, overrides: list[str] | None = None, eval_split: str = "test",
                 eval_limit: int | None = None, wait: bool = False) -> dict:
    """Submit the unfinished (hypothesis, seed) elements of the grid as one job array; returns the manifest.
    Rerunning skips the finished ones and those still queued/running, and resubmits the rest (which resume from
    their checkpoints)."""
    plan = plan_sweep(out, shards, grid=grid, hypotheses=hypotheses, seeds=seeds, cluster=cluster, slurm=slurm,
                      overrides=overrides)
    out, slurm, configs, manifest, groups = plan.out, plan.slurm, plan.configs, plan.manifest, plan.groups
    if not groups:
        info("nothing to submit: every element is finished or still queued/running")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MANIFEST, manifest)
        return manifest
    if cluster == "slurm":
        _check_python_here(slurm)

    runs = [[HypothesisTask(configs[key], eval_split, eval_limit) for key in group] for group in groups]
    tasks = [ElementGroup(group) for group in runs] if slurm.elements_per_gpu > 1 else [group[0] for group in runs]
    with _removed_if_refused(out):
        code_dir = snapshot_code(out)
        executor = _make_executor(cluster, out / "logs", slurm, code_dir, name=_job_name(out))
        # batch() = one job array; each element's function is the task itself, so submitit finds its checkpoint()
        # (map_array(fn, args) would hide it behind fn)
        with _job_environment(code_dir, cluster, slurm.cpus_per_task), executor.batch():
            jobs = [executor.submit(task) for task in tasks]

    _record_submission(manifest, configs, groups, jobs, cluster=cluster, code_dir=code_dir, slurm=slurm, seeds=seeds,
                       overrides=overrides, eval_split=eval_split, eval_limit=eval_limit)
    manifest.update(shards=str(plan.shards.resolve()), grid=grid, out=str(out))
    atomic_write_json(out / MANIFEST, manifest)
    info(f"submitted {len(plan.todo)} run(s) as {len(jobs)} element(s) of job array {jobs[0].job_id.split('_')[0]} "
         f"on {cluster}; watch with: facevae sweep status {out}")
    if cluster == "slurm":
        info(f"the jobs run python as {slurm.python_command}: it must exist on every node (--python or --setup to "
             "change it)")
    if wait:
        wait_for_jobs(jobs)
    return manifest


def _check_python_here(slurm: SlurmOptions) -> None:
    """A --python path missing here is likely missing on the nodes too (a login node usually mounts what they do)."""
    first = shlex.split(slurm.python_command)[0]
    if os.path.isabs(first) and not os.path.exists(first):
        warn(f"--python: {first} does not exist on this machine; the jobs fail unless every node has it")


@contextlib.contextmanager
def _removed_if_refused(out: Path):
    """A submission that fails before sbatch took its jobs (sbatch refused them, or submitit refused the request)
    removes what it wrote: the code snapshot, submitit's files in logs/, and the folders it created. Anything else
    stays: a job sbatch may have taken needs its snapshot."""
    folders = [out, out / "code", out / "logs"]
    created = [folder for folder in folders if not folder.exists()]
    before = {folder: set(folder.iterdir()) for folder in folders[1:] if folder.is_dir()}
    try:
        yield
    except submitit.core.utils.FailedSubmissionError:  # sbatch's answer was unreadable: the job may be queued
        raise
    except Exception:
        for folder in folders[1:]:
            new = set(folder.iterdir()) - before.get(folder, set()) if folder.is_dir() else set()
            for path in new:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: something else may have written there meanwhile
        raise


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

    old_path, old_threads = os.environ.get("PYTHONPATH"), os.environ.get("OMP_NUM_THREADS")
    os.environ["PYTHONPATH"] = str(code_dir) + (os.pathsep + old_path if old_path else "")
    if cluster == "local" and old_threads is None:
        # what the Slurm jobs get from slurm_setup: a local element uses its --cpus-per-task cores, not every core
        # (four 2-thread elements on 2 cores would each fight the others for them)
        os.environ["OMP_NUM_THREADS"] = str(cpus_per_task)
    said = io.StringIO()  # submitit prints a refused sbatch's stderr itself: it goes into the one-line error instead
    try:
        # clean_env: submitting from inside an allocation must not hand its SLURM_* variables to the new jobs
        with contextlib.chdir(code_dir), submitit.helpers.clean_env(), contextlib.redirect_stderr(said):
            yield
    except submitit.core.utils.FailedJobError as exc:
        said.truncate(0)  # what sbatch said is in the error
        why = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise FaceVAEError(f"submission failed, nothing was submitted: {why}") from None
    finally:
        sys.stderr.write(said.getvalue())
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

    with make_progress() as progress:
        bar = progress.add_task("sweep", total=len(jobs))
        pending = list(jobs)
        while pending:
            for job in list(pending):
                if job.done():
                    pending.remove(job)
                    progress.advance(bar)
            time.sleep(2)
