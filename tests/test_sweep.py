"""Sweeps as job arrays on a REAL local Slurm (slurmctld + slurmd + slurmdbd started by the fixture) and on
submitit's local executor: completion + report, preemption -> requeue -> resume from the checkpoint step, a failing
element that does not stop the others, a cancelled element, resubmission that skips finished work, seeds, runs
sharing an element, srun's --cpus-per-task (the rank's CPU affinity), and a killed job that status calls killed.

Every wait ends on a state (a file, an element record, Slurm's state) and fails at once when the job is over
without reaching it; the deadlines only guard against hangs and are sized for a loaded 2-core machine
(FACEVAE_TEST_TIMEOUT_SCALE stretches them further)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_36, model_overrides, set_args

from facevae_dist.cli import main
from facevae_dist.sweep.element import RENDEZVOUS_PORTS, rendezvous_port
from facevae_dist.sweep.records import MANIFEST, slurm_state
from facevae_dist.sweep.status import sweep_status
from facevae_dist.sweep.submit import SlurmOptions, submit_sweep

pytestmark = [pytest.mark.slow]

# the 36 px profile's size and width (the model's default latent), a small batch, no samples or mixed precision
TINY = [*model_overrides(TINY_36, ("image_size", "width")), "data.batch_size=4", "data.workers=0", "log_every=1",
        "sample_every=0", "mixed_precision=no", "val_batches=2"]
# Preemption tests signal once the first checkpoint (step 10) exists: the remaining steps must outlast the polling
# and the signal's delivery even on an idle machine (~80 ms/step here instead of ~10 ms with TINY alone); a loaded
# machine only makes them longer, which the state-based waits absorb.
SLOWER_STEPS = ["data.batch_size=32", "model.width=0.25"]
ONE_CPU = SlurmOptions(cpus_per_task=1, timeout_min=20, array_parallelism=2, signal_delay_s=5)
SCALE = float(os.environ.get("FACEVAE_TEST_TIMEOUT_SCALE", "1"))
# Slurm states of a job (or array element) that will not run again by itself
OVER = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import make_source

    out = tmp_path_factory.mktemp("sweep_shards") / "synthetic"
    # 6 per shard: val and test get 2 shards each, so each rank of the 2-rank element has its own
    build_shards(make_source("synthetic", n=120, seed=0), out, ShardOptions(image_size=36, shard_size=6), workers=1)
    return out


def _wait(predicate, timeout: float, what: str, every: float = 0.5, fail=None):
    """Poll `predicate` until it returns something truthy. `fail()` returning a message ends the wait at once (the
    state can no longer be reached); `timeout` (x FACEVAE_TEST_TIMEOUT_SCALE) only guards against a hang."""
    deadline = time.time() + timeout * SCALE
    while True:
        value = predicate()
        if value:
            return value
        reason = fail() if fail else None
        if reason:
            value = predicate()  # it may have been reached just before the job ended
            if value:
                return value
            raise AssertionError(f"{what} cannot happen any more: {reason}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.0f}s waiting for {what}")
        time.sleep(every)


def _job_over(job_id: str):
    """For _wait(fail=...): a message once Slurm says the job is over (it cannot produce anything more)."""
    def check():
        state = slurm_state(job_id, live=True)
        return f"job {job_id} is {state}" if state in OVER else None
    return check


def _rows(sweep_dir) -> dict[str, dict]:
    return {r["element"]: r for r in sweep_status(sweep_dir)}


def _rows_when(sweep_dir, condition):
    """For _wait: the status rows once condition(rows) holds."""
    def check():
        rows = _rows(sweep_dir)
        return rows if condition(rows) else None
    return check


def _element(sweep_dir: Path, slug: str) -> dict:
    try:
        return json.loads((sweep_dir / slug / "element.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / MANIFEST).read_text())


def _job_id(sweep_dir: Path, key: str) -> str:
    return _manifest(sweep_dir)["elements"][key]["job_ids"][-1]


def _train_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in line and '"split"' not in line]


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout


def _submit_args(shards, out, *extra) -> list[str]:
    """`facevae sweep submit` of one tiny element (two steps)."""
    sets = [arg for item in [*TINY, "max_steps=2", "val_every=0", "ckpt_every=2"] for arg in ("--set", item)]
    return ["sweep", "submit", "--hypotheses", "l2/none", "--shards", str(shards), "--out", str(out),
            "--cpus-per-task", "1", "--timeout-min", "20", "--signal-delay-s", "5", "--eval-limit", "4", *sets, *extra]


def _script(dry_run_output: str) -> str:
    """The sbatch script in --dry-run's output, the snapshot's time stamp blanked (a submission takes its own)."""
    text = dry_run_output[dry_run_output.index("#!/bin/bash"):]
    return re.sub(r"/code/\d{8}-\d{6}", "/code/STAMP", text)


def test_dry_run_prints_gres_passthrough_and_environment_and_writes_nothing(shards, tmp_path, capsys):
    """--dry-run needs no Slurm: the script has --requeue, GPUs as --gres (ranks per node from its count, no
    --gpus-per-node), every --slurm-option as an #SBATCH line, --setup lines before the snapshot's PYTHONPATH, and
    --python in the srun line; nothing is written."""
    out = tmp_path / "sweep"
    assert main(_submit_args(shards, out, "--hypotheses", "l2/none,l1/none", "--gres", "gpu:a100:2",
                             "--slurm-option", "mail-type=END,FAIL", "--slurm-option", "exclusive",
                             "--slurm-option=--reservation=grid", "--python", "/shared/envs/facevae/bin/python",
                             "--setup", "module load cuda/12.1", "--dry-run")) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert f"# element 0: l2/none -> {out / 'l2--none'}" in lines
    assert f"# element 1: l1/none -> {out / 'l1--none'}" in lines
    for line in ("#SBATCH --requeue", "#SBATCH --gres=gpu:a100:2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --mail-type=END,FAIL", "#SBATCH --exclusive", "#SBATCH --reservation=grid",
                 "#SBATCH --array=0-1%2"):
        assert line in lines, line
    assert not any("--gpus-per-node" in line for line in lines)
    setup = lines.index("module load cuda/12.1")
    assert lines[setup + 1].startswith(f"export PYTHONPATH={out / 'code'}/")
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.endswith(f"/shared/envs/facevae/bin/python -u -m submitit.core._submit {out / 'logs'}")
    assert not out.exists()
    # the count may come from --gpus-per-node; a single element is a plain job, not an array
    assert main(_submit_args(shards, out, "--gres", "gpu:h100", "--gpus-per-node", "4", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --gres=gpu:h100:4" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert not any(line.startswith("#SBATCH --array") for line in lines)
    assert not out.exists()


def test_slurm_flags_bad_input_is_one_line(shards, tmp_path, capsys):
    """--gres against --gpus-per-node, --slurm-option not KEY[=VALUE] or one the sweep sets itself, an empty
    --python or --setup: exit 2, one line naming the flag, nothing written."""
    out = tmp_path / "sweep"
    cases = [
        (["--gres", "gpu:a100:8", "--gpus-per-node", "4"], "--gres"),
        (["--gres", "gpu:a100"], "no GPU count"),
        (["--gres", "gpu:a100:0"], "--gres"),
        (["--gres", "gpu:a:1,gpu:b:1"], "more than once"),
        (["--gres", "gpu::8"], "NAME[:TYPE][:COUNT]"),
        (["--slurm-option", "=END"], "KEY[=VALUE]"),
        (["--slurm-option", "mail-type="], "KEY[=VALUE]"),
        (["--slurm-option", "p=gpu"], "KEY[=VALUE]"),
        (["--slurm-option", "mail type=END"], "KEY[=VALUE]"),
        (["--slurm-option", "time=10"], "--timeout-min"),
        (["--slurm-option", "gres=gpu:1"], "--gres"),
        (["--slurm-option", "no-requeue"], "requeue"),
        (["--slurm-option", "comment=a", "--slurm-option", "comment=b"], "more than once"),
        (["--python", ""], "--python"),
        (["--python", "'unclosed"], "--python"),
        (["--setup", " "], "--setup"),
    ]
    for extra, words in cases:
        assert main(_submit_args(shards, out, *extra, "--dry-run")) == 2, extra
        err = capsys.readouterr().err
        assert words in err and extra[0] in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.slurm
def test_dry_run_matches_the_submission_and_options_reach_slurm(slurm_cluster, shards, tmp_path, capsys):
    """--dry-run prints the script a submission then writes (bar the snapshot's time stamp) and submits nothing;
    the submission's --slurm-option reaches Slurm (Comment=) and sweep.json, its job is requeueable; a dry run of a
    sweep with nothing left to submit changes nothing."""
    out = tmp_path / "passthrough"
    args = _submit_args(shards, out, "--slurm-option", "comment=facevae-test")
    name = f"facevae-{out.name}"

    def queued() -> str:
        return subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout

    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "#SBATCH --comment=facevae-test" in dry and "#SBATCH --requeue" in dry
    assert not out.exists() and queued() == "", "a dry run submits nothing and writes nothing"

    assert main(args) == 0
    job = _job_id(out, "l2/none")
    shown = _scontrol_job(job)
    assert "Comment=facevae-test" in shown and "Requeue=1" in shown, shown
    assert _script((out / "logs" / f"{job}_submission.sh").read_text()) == _script(dry)
    assert _manifest(out)["submissions"][-1]["slurm"]["slurm_options"] == ["comment=facevae-test"]

    before = ((out / "sweep.json").read_bytes(), sorted((out / "code").iterdir()), queued())
    assert main([*args, "--dry-run"]) == 0  # the element is queued, running or finished: nothing to submit
    assert "#!/bin/bash" not in capsys.readouterr().out
    assert ((out / "sweep.json").read_bytes(), sorted((out / "code").iterdir()), queued()) == before
    subprocess.run(["scancel", job], check=True)  # its options are what this test is about, not its run


@pytest.mark.slurm
def test_missing_srun_or_refused_sbatch_is_one_line_and_leaves_nothing(slurm_cluster, shards, tmp_path, capsys,
                                                                         monkeypatch):
    """sbatch on PATH but not srun (submitit's test for a cluster): exit 2, one line, before any file is written.
    A submission sbatch refuses: one line, and the code snapshot, submitit's files and the new folders are gone."""
    out = tmp_path / "sweep"
    only_sbatch = tmp_path / "bin"
    only_sbatch.mkdir()
    (only_sbatch / "sbatch").symlink_to(shutil.which("sbatch"))
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(only_sbatch))
        assert main(_submit_args(shards, out)) == 2
    err = capsys.readouterr().err
    assert "`srun`" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()

    assert main(_submit_args(shards, out, "--slurm-option", "mail-type=NOPE")) == 1
    err = capsys.readouterr().err
    assert "submission failed" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists(), sorted(out.rglob("*"))
    # a sweep directory that exists keeps what it had, and gets nothing new
    (out / "code").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    assert main(_submit_args(shards, out, "--slurm-option", "mail-type=NOPE")) == 1
    capsys.readouterr()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == [Path("code"), Path("keep.txt")]


def test_rendezvous_ports_agree_across_ranks_and_avoid_the_ephemeral_range():
    """Every rank derives the same port from the job id; train and eval differ; none is in Linux's ephemeral range
    (where an outgoing connection can hold it: a 2-rank element once failed with EADDRINUSE)."""
    low, high = 32768, 60999  # Linux's default ip_local_port_range
    seen = set()
    for job_id in ("1", "26405_0", "26405_1", "999999", "12_3"):
        train, ev = rendezvous_port(job_id, "train"), rendezvous_port(job_id, "eval")
        assert train == rendezvous_port(job_id, "train") and ev == rendezvous_port(job_id, "eval")
        assert train != ev
        for port in (train, ev):
            assert RENDEZVOUS_PORTS[0] <= port <= RENDEZVOUS_PORTS[1] and not low <= port <= high
        seen.add(train)
    assert len(seen) > 1  # elements of one array do not all share a port


@pytest.mark.slurm
def test_grid_on_slurm_completes_and_reports_and_resubmit_skips(slurm_cluster, shards, tmp_path):
    out = tmp_path / "sweep"
    names = ["l2/none", "l2/mask+decoder", "ssim/mask"]
    submit_sweep(out, shards, hypotheses=names, cluster="slurm", slurm=ONE_CPU, eval_limit=8, wait=True,
                 overrides=[*TINY, "max_steps=4", "val_every=2", "ckpt_every=2"])

    def all_completed():
        rows = _rows(out)
        return rows if all(rows[n]["slurm_state"] == "COMPLETED" for n in names) else None

    rows = _wait(all_completed, 300, "sacct to report COMPLETED", every=2)
    assert {n: rows[n]["state"] for n in names} == {n: "finished" for n in names}
    assert all(rows[n]["step"] == 4 for n in names)
    manifest = _manifest(out)
    ids = {n: manifest["elements"][n]["job_ids"] for n in names}
    assert len({i[0].split("_")[0] for i in ids.values()}) == 1, "one job array for the whole grid"
    assert sorted(manifest["elements"][n]["array_index"] for n in names) == [0, 1, 2]
    # the elements imported the snapshot taken at submit time, not the live checkout
    code = {Path(_element(out, manifest["elements"][n]["slug"])["code"]) for n in names}
    assert len(code) == 1 and code.pop().parent.parent == out / "code"
    # srun gets the cores and ends a job whose rank dies (Slurm 22.05-23.02 drop sbatch's --cpus-per-task)
    sbatch = next((out / "logs").glob("*_submission.sh")).read_text()
    srun = next(line for line in sbatch.splitlines() if line.startswith("srun"))
    assert "--cpus-per-task=1" in srun and "--kill-on-bad-exit=1" in srun

    assert main(["sweep", "collect", str(out)]) == 0
    table = (out / "report" / "table.md").read_text()
    assert "| l2 | no |" in table and "| SSIM |" in table

    # resubmitting the same sweep submits nothing: every hypothesis is finished
    submit_sweep(out, shards, hypotheses=names, cluster="slurm", slurm=ONE_CPU,
                 overrides=[*TINY, "max_steps=4", "val_every=2", "ckpt_every=2"])
    manifest2 = _manifest(out)
    assert {n: manifest2["elements"][n]["job_ids"] for n in names} == ids


@pytest.mark.slurm
def test_rank_gets_cpus_per_task_cores(slurm_cluster, shards, tmp_path):
    """srun --cpus-per-task: the rank's CPU affinity (Slurm's task/affinity binds it) holds cpus_per_task cores."""
    cores = len(os.sched_getaffinity(0))
    want = min(2, cores)
    out = tmp_path / "sweep"
    submit_sweep(out, shards, hypotheses=["l2/none"], cluster="slurm", eval_limit=4,
                 slurm=SlurmOptions(cpus_per_task=want, timeout_min=20, signal_delay_s=5),
                 overrides=[*TINY, "max_steps=1", "val_every=0", "ckpt_every=1"])
    job = _job_id(out, "l2/none")
    element = _wait(lambda: _element(out, "l2--none").get("cpus") and _element(out, "l2--none"), 600,
                    "the element to start", every=1, fail=_job_over(job))
    assert len(element["cpus"]) == want, element["cpus"]
    _wait(lambda: _element(out, "l2--none").get("state") in ("finished", "failed"), 600, "the element to end",
          every=1, fail=_job_over(job))
    assert _element(out, "l2--none")["state"] == "finished"


@pytest.mark.slurm
def test_seeds_and_runs_sharing_an_element(slurm_cluster, shards, tmp_path, capsys, monkeypatch):
    """--seeds 0,1: one run per (hypothesis, seed), each in its own run dir with its seed in config.toml;
    --elements-per-gpu 2: both runs in ONE array element, as two Slurm tasks; status and collect per seed."""
    out = tmp_path / "sweep"
    opts = SlurmOptions(cpus_per_task=1, timeout_min=20, signal_delay_s=5, elements_per_gpu=2)
    args = dict(hypotheses=["l2/none"], seeds=[0, 1], cluster="slurm", slurm=opts, eval_limit=4,
                overrides=[*TINY, "max_steps=2", "val_every=0", "ckpt_every=2"])
    submit_sweep(out, shards, **args)
    keys = ["l2/none seed=0", "l2/none seed=1"]
    manifest = _manifest(out)
    assert [manifest["elements"][k]["job_ids"] for k in keys] == [[_job_id(out, keys[0])]] * 2, "one element"
    assert [manifest["elements"][k]["task"] for k in keys] == [0, 1]
    job = _job_id(out, keys[0])
    runs = [out / "l2--none" / "seed-0", out / "l2--none" / "seed-1"]
    _wait(lambda: all((r / "eval" / "metrics.json").is_file() for r in runs), 600, "both runs to finish", every=1,
          fail=_job_over(job))
    from facevae_dist.config import load_toml

    for seed, run in enumerate(runs):
        cfg = load_toml(run / "config.toml")
        assert (cfg.hypothesis, cfg.seed, cfg.data.seed) == ("l2/none", seed, seed)
        assert _element(run.parent, run.name)["state"] == "finished"
    # different seeds: different initial weights -> different first losses
    first = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in runs]
    assert first[0] != first[1]
    rows = _wait(_rows_when(out, lambda r: all(r[k]["state"] == "finished" for k in keys)), 120,
                 "status to show both finished", every=1)
    assert [(rows[k]["hypothesis"], rows[k]["seed"]) for k in keys] == [("l2/none", 0), ("l2/none", 1)]
    assert main(["sweep", "status", str(out)]) == 0
    capsys.readouterr()

    import facevae_dist.report.build as report

    seen, real = [], report.make_report
    monkeypatch.setattr(report, "make_report",
                        lambda run_dirs, out_dir: seen.append(sorted(map(str, run_dirs))) or real(run_dirs, out_dir))
    assert main(["sweep", "collect", str(out)]) == 0
    assert seen == [sorted(map(str, runs))], "collect hands every seed's run to the report"

    submit_sweep(out, shards, **args)  # resubmission: both finished, nothing submitted
    assert [_manifest(out)["elements"][k]["job_ids"] for k in keys] == [[job]] * 2


@pytest.mark.slurm
@pytest.mark.distributed
def test_two_rank_element_submitted_from_inside_an_allocation(slurm_cluster, shards, tmp_path):
    """The sweep is submitted from a job step (SLURM_* of that allocation in the environment, stripped by
    clean_env); its element runs 2 ranks (tasks_per_node=2) wired by submitit into one DDP run over gloo."""
    out = tmp_path / "sweep"
    script = (
        "import sys; from facevae_dist.sweep.submit import SlurmOptions, submit_sweep; "
        "submit_sweep(sys.argv[1], sys.argv[2], hypotheses=['l2/mask'], cluster='slurm', eval_limit=8, "
        "slurm=SlurmOptions(tasks_per_node=2, cpus_per_task=1, timeout_min=20, signal_delay_s=5), "
        "overrides=sys.argv[3:])")
    submit = subprocess.run(["srun", "-n1", "-c1", sys.executable, "-c", script, str(out), str(shards), *TINY,
                             "max_steps=3", "val_every=3", "ckpt_every=3"], capture_output=True, text=True,
                            timeout=600 * SCALE)
    assert submit.returncode == 0, submit.stderr[-2000:]
    _wait(lambda: _element(out, "l2--mask").get("state") in ("finished", "failed"), 600, "the element to end", 1,
          fail=_job_over(_job_id(out, "l2/mask")))
    element = _element(out, "l2--mask")
    assert element["state"] == "finished", element.get("traceback")
    assert element["world_size"] == 2
    assert json.loads((out / "l2--mask" / "env.json").read_text())["world_size"] == 2
    assert json.loads((out / "l2--mask" / "eval" / "metrics.json").read_text())["n_images"] == 8


@pytest.mark.slurm
def test_preempted_element_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, shards, tmp_path):
    import submitit

    out = tmp_path / "sweep"
    submit_sweep(out, shards, hypotheses=["l2/none"], cluster="slurm", slurm=ONE_CPU, eval_limit=8,
                 overrides=[*TINY, "max_steps=250", "val_every=0", "ckpt_every=10", *SLOWER_STEPS])
    job_id = _job_id(out, "l2/none")
    assert "Requeue=1" in _scontrol_job(job_id), "the sweep asks for --requeue, whatever the cluster's default"
    run = out / "l2--none"
    # interrupt once a checkpoint exists and training goes on
    _wait(lambda: list((run / "checkpoints").glob("step_*/meta.json")) if (run / "checkpoints").is_dir() else None,
          600, "a first checkpoint", fail=_job_over(job_id))
    submitit.SlurmJob(folder=out / "logs", job_id=job_id)._interrupt()  # SIGTERM + USR2, as a preemption

    done = _wait(lambda: _element(out, "l2--none").get("state") == "finished" and _element(out, "l2--none"),
                 900, "the requeued element to finish", every=2, fail=_job_over(job_id))
    assert done["restarts"] >= 1, "the element was requeued"
    assert done["start_step"] >= 10, f"the requeued run restarted from scratch: {done}"
    assert done["step"] == 250
    assert _train_steps(run) == list(range(1, 251)), "the step counter continues across the requeue, no gaps"
    assert "REQUEUE" in subprocess.run(["sacct", "-j", job_id, "-D", "-X", "-n", "-o", "State"],
                                       capture_output=True, text=True).stdout


@pytest.mark.slurm
def test_preempted_shared_element_requeues_once_and_both_runs_resume(slurm_cluster, shards, tmp_path):
    """--elements-per-gpu 2: both runs of the element take the signal and save; task 0 requeues the element after
    the other run saved; in the requeued element both runs continue from their own checkpoints."""
    import submitit

    out = tmp_path / "sweep"
    opts = SlurmOptions(cpus_per_task=1, timeout_min=20, signal_delay_s=5, elements_per_gpu=2)
    submit_sweep(out, shards, hypotheses=["l2/none", "l1/none"], cluster="slurm", slurm=opts, eval_limit=4,
                 overrides=[*TINY, "max_steps=250", "val_every=0", "ckpt_every=10", *SLOWER_STEPS])
    job = _job_id(out, "l2/none")
    assert _job_id(out, "l1/none") == job
    runs = [out / "l2--none", out / "l1--none"]
    _wait(lambda: all(list(r.glob("checkpoints/step_*/meta.json")) for r in runs), 600, "both first checkpoints",
          fail=_job_over(job))
    submitit.SlurmJob(folder=out / "logs", job_id=job)._interrupt()  # SIGTERM + USR2 to every task

    def both_finished():
        elements = [_element(r.parent, r.name) for r in runs]
        return elements if all(e.get("state") == "finished" for e in elements) else None

    for run, element in zip(runs, _wait(both_finished, 900, "both requeued runs to finish", every=2,
                                        fail=_job_over(job))):
        assert element["restarts"] >= 1 and element["start_step"] >= 10, element
        assert _train_steps(run) == list(range(1, 251)), f"{run.name}: steps continue across the requeue"


@pytest.mark.slurm
def test_sbatch_example_requeues_on_usr2_and_resumes(slurm_cluster, shards, tmp_path):
    """slurm/sbatch_example.sh (no submitit): USR2 to the batch script -> the trainer checkpoints -> the element
    requeues itself -> the requeued run resumes from that step, then evaluates. Waits on states only: a loaded
    machine (it once timed out at load 4 on 2 cores with fixed 180 s waits) makes it slower, not red."""
    env = {**os.environ, "SHARDS": str(shards), "SWEEP_DIR": str(tmp_path / "sweep"), "HYPOTHESES": "l2/none",
           "PYTHON": sys.executable}
    env.pop("FACEVAE_QUIET", None)  # an earlier `facevae -q` test in this process exports it; the log is asserted on
    args = ["--max-steps", "200", "--ckpt-every", "10", "--log-every", "1", "--val-every", "0", "--workers", "0",
            "--sample-every", "0", "--batch-size", "32", "--mixed-precision", "no", "--set", "model.width=0.25",
            "--set", "model.image_size=36"]
    job = subprocess.run(["sbatch", "--parsable", "--array=0", "--cpus-per-task=1", "--time=30",
                          f"--chdir={tmp_path}", str(Path(__file__).parent.parent / "slurm" / "sbatch_example.sh"),
                          *args], env=env, capture_output=True, text=True, check=True).stdout.strip()
    element = f"{job}_0"
    run = tmp_path / "sweep" / "l2--none"
    _wait(lambda: list((run / "checkpoints").glob("step_*/meta.json")) if (run / "checkpoints").is_dir() else None,
          600, "a first checkpoint", fail=_job_over(element))
    subprocess.run(["scancel", "--batch", "--signal=USR2", element], check=True)
    log = tmp_path / f"facevae-grid-{element}.out"
    _wait(lambda: "requeued" in log.read_text(), 600, "the element to requeue itself", every=1,
          fail=_job_over(element))
    _wait(lambda: (run / "eval" / "metrics.json").is_file(), 900, "the requeued element to finish", every=2,
          fail=_job_over(element))
    text = log.read_text()
    assert "resumed from" in text and "run 2" in text
    assert _train_steps(run) == list(range(1, 201)), "the step counter continues across the requeue"


@pytest.mark.slurm
def test_failing_and_cancelled_elements_do_not_stop_the_others(slurm_cluster, shards, tmp_path, capsys):
    out = tmp_path / "sweep"
    # l1/none gets a corrupt checkpoint to resume from -> fails with its traceback
    bad = out / "l1--none" / "checkpoints" / "step_2"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    opts = SlurmOptions(cpus_per_task=1, timeout_min=20, array_parallelism=2, signal_delay_s=5)
    submit_sweep(out, shards, hypotheses=["l2/none", "l1/none"], cluster="slurm", slurm=opts, eval_limit=8,
                 overrides=[*TINY, "max_steps=4", "val_every=0", "ckpt_every=2"])
    # a long element, cancelled by the user while it trains
    submit_sweep(out, shards, hypotheses=["ssim/none"], cluster="slurm", slurm=opts, eval_limit=8,
                 overrides=[*TINY, "max_steps=100000", "val_every=0", "ckpt_every=1000"])
    victim = _job_id(out, "ssim/none")
    _wait(lambda: _element(out, "ssim--none").get("state") == "training", 600, "ssim/none to start training",
          fail=_job_over(victim))
    subprocess.run(["scancel", victim], check=True)

    def settled():
        rows = _rows(out)
        return rows if rows["l2/none"]["state"] == "finished" and rows["l1/none"]["state"] == "failed" \
            and rows["ssim/none"]["slurm_state"] not in ("", "PENDING", "RUNNING") else None

    rows = _wait(settled, 900, "the three elements to settle", every=2)
    assert "checkpoint" in (rows["l1/none"]["error"] or "").lower()
    assert "Traceback" in _element(out, "l1--none")["traceback"]
    assert rows["ssim/none"]["state"] == "cancelled" and rows["ssim/none"]["eta_s"] is None
    assert main(["sweep", "status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "failed" in shown and "finished" in shown


def test_local_cluster_runs_the_same_grid_without_slurm(shards, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "submit", "--hypotheses", "l2/none,l2/mask+decoder", "--shards", str(shards),
                 "--out", str(out), "--cluster", "local", "--eval-limit", "8", "--wait", "--cpus-per-task", "1",
                 *set_args([*TINY, "max_steps=3", "val_every=3", "ckpt_every=3"])]) == 0
    rows = _rows(out)
    assert rows["l2/none"]["state"] == rows["l2/mask+decoder"]["state"] == "finished"
    # each local element ran with its --cpus-per-task threads, as a Slurm job would
    if "OMP_NUM_THREADS" not in os.environ:
        assert json.loads((out / "l2--none" / "env.json").read_text())["torch_threads"] == 1
    # the element imported the code snapshot, a copy outside git: its run still records the commit it came from
    # (the snapshot's record, not today's HEAD: in a shared checkout someone may commit while the test runs)
    from facevae_dist.runinfo import REVISION_FILE, git_revision

    if git_revision() is not None:
        package = Path(_element(out, "l2--none")["code"])  # SWEEP_DIR/code/<stamp>/facevae_dist
        taken_from = (package / REVISION_FILE).read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", taken_from)
        assert json.loads((out / "l2--none" / "env.json").read_text())["git_revision"] == taken_from
    metrics = out / "l2--mask+decoder" / "eval" / "metrics.json"
    assert metrics.is_file()

    # a duplicate run of a finished element (an array task started twice) leaves its results alone
    import submitit

    from facevae_dist.config import load_toml
    from facevae_dist.sweep.element import HypothesisTask

    before = metrics.stat().st_mtime_ns
    task = HypothesisTask(load_toml(out / "l2--mask+decoder" / "config.toml").to_dict())
    result = submitit.AutoExecutor(folder=tmp_path / "debug", cluster="debug").submit(task).result()
    assert result["state"] == "finished" and result["skipped"]
    assert metrics.stat().st_mtime_ns == before


def test_status_shows_a_killed_local_job_as_killed(shards, tmp_path):
    """A job killed outright (SIGKILL, OOM killer) cannot update its element.json, which still says "training":
    status must see that its process is gone and say killed, without an ETA."""
    out = tmp_path / "sweep"
    submit_sweep(out, shards, hypotheses=["l2/none"], cluster="local", eval_limit=4,
                 overrides=[*TINY, "max_steps=100000", "val_every=0", "ckpt_every=100000"])

    rows = _wait(_rows_when(out, lambda r: r["l2/none"]["state"] == "training" and r["l2/none"]["step"]), 600,
                 "the local element to train")
    assert rows["l2/none"]["eta_s"] is not None
    pid = _element(out, "l2--none")["pid"]

    # resubmitting while it trains leaves it alone (a second copy would fail on the run's lock and, before the
    # fix, overwrote the live element's record with "failed")
    submissions = len(json.loads((out / "sweep.json").read_text())["submissions"])
    submit_sweep(out, shards, hypotheses=["l2/none"], cluster="local", eval_limit=4,
                 overrides=[*TINY, "max_steps=100000", "val_every=0", "ckpt_every=100000"])
    assert len(json.loads((out / "sweep.json").read_text())["submissions"]) == submissions
    # and a duplicate copy that starts anyway (an array task started twice) does nothing
    from facevae_dist.config import load_toml
    from facevae_dist.sweep.element import HypothesisTask

    dup = HypothesisTask(load_toml(out / "l2--none" / "config.toml").to_dict())
    result = dup.run(rank=0, world=1, job_id="dup", hostname="here")
    assert result["state"] == "duplicate" and str(pid) in result["error"]
    assert _element(out, "l2--none")["pid"] == pid and _element(out, "l2--none")["state"] == "training"
    os.kill(pid, signal.SIGKILL)  # the element's own process, started by this test
    rows = _wait(_rows_when(out, lambda r: r["l2/none"]["state"] != "training"), 120,
                 "status to notice the dead process")
    assert rows["l2/none"]["state"] == "killed" and rows["l2/none"]["eta_s"] is None
    assert _element(out, "l2--none")["state"] == "training", "the record itself was not (could not be) updated"


def test_sweep_bad_input_is_one_line(shards, tmp_path, capsys):
    assert main(["sweep", "submit", "--grid", "nope", "--shards", str(shards), "--out", str(tmp_path / "s"),
                 "--cluster", "local"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["sweep", "submit", "--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "s"),
                 "--cluster", "local"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["sweep", "status", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "sweep.json" in err and "Traceback" not in err
    for bad in (["--seeds", "0,x"], ["--seeds", "-1"], ["--elements-per-gpu", "2", "--nodes", "2"]):
        assert main(["sweep", "submit", "--hypotheses", "l2/none", "--shards", str(shards),
                     "--out", str(tmp_path / "s"), "--cluster", "local", *bad]) == 2
        err = capsys.readouterr().err
        assert bad[0] in err and "Traceback" not in err


def test_sweep_seeds_out_of_range_or_repeated_are_refused_before_submitting(shards, tmp_path, capsys):
    """A seed numpy cannot take (>= 2**32) used to be submitted and fail in its element with a traceback (exit 0);
    a repeated seed was silently dropped. Both are one-line usage errors now, and nothing is submitted."""
    out = tmp_path / "s"
    for seeds, words in (("0,4294967296", "0 to 4294967295"), ("0,0", "more than once"), ("1,2,1", "1 given")):
        assert main(["sweep", "submit", "--hypotheses", "l2/none", "--shards", str(shards), "--out", str(out),
                     "--cluster", "local", "--seeds", seeds]) == 2
        err = capsys.readouterr().err
        assert words in err and "--seeds" in err and len(err.strip().splitlines()) == 1
        assert not (out / MANIFEST).exists()


def test_empty_seeds_or_hypotheses_are_usage_errors_not_defaults(shards, tmp_path, capsys):
    """`--seeds ""` used to mean one run per hypothesis, `0,,1` dropped the empty item, and `--hypotheses ""` (an
    unset shell variable) submitted the whole grid: each is a one-line usage error now, and nothing is submitted."""
    from facevae_dist.sweep.submit import parse_hypotheses, parse_seeds

    assert parse_seeds(None) is None and parse_seeds(" 0, 1 ") == [0, 1]
    assert parse_hypotheses(None) is None and parse_hypotheses("l2/none,H9") == ["l2/none", "H9"]
    out = tmp_path / "s"
    for flag, value in (("--seeds", ""), ("--seeds", " "), ("--seeds", "0,,1"), ("--seeds", "0,"),
                        ("--hypotheses", ""), ("--hypotheses", "l2/none,,H9")):
        argv = ["sweep", "submit", "--shards", str(shards), "--out", str(out), "--cluster", "local", flag, value]
        if flag == "--seeds":
            argv += ["--hypotheses", "l2/none"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "empty" in err[0], err
        assert not (out / MANIFEST).exists()
    for value in ("", "0,,1"):  # the demo shares the parser
        assert main(["demo", "--root", str(tmp_path / "demo"), "--seeds", value]) == 2
        assert "--seeds" in capsys.readouterr().err
    assert main(["demo", "--root", str(tmp_path / "demo"), "--hypotheses", ""]) == 2
    assert "--hypotheses" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
