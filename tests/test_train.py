"""The training loop on real tiny shards: every hypothesis, exact resume after SIGKILL, SIGTERM, NaN handling,
precision/accumulation options, CLI errors, and a recorded loss curve."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    REPO,
    build_fixed_shards,
    build_tiny_shards,
    cli_args,
    env,
    losses,
    metrics,
    run,
    tiny_config,
    train_module,
    wait_for_step,
)

from facevae_dist.errors import RunError
from facevae_dist.hypotheses import GRIDS
from facevae_dist.seeds import SEED_MAX, derived_seed
from facevae_dist.train.checkpoint import latest_checkpoint, load_checkpoint, load_model
from facevae_dist.train.loop import train
from facevae_dist.train.monitor import INJECT_NAN_ENV

ASSET = REPO / "tests" / "assets" / "losses" / "tiny_h9_fp32.json"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_shards(tmp_path_factory.mktemp("shards") / "synthetic")


def test_every_hypothesis_trains(shards, tmp_path):
    assert len(GRIDS["paper15"]) == 15
    for name in GRIDS["paper15"]:
        run_dir = tmp_path / name.replace("/", "--")
        summary = train(tiny_config(shards, run_dir, name, max_steps=2, sample_every=2))
        assert summary["stopped"] == "finished" and summary["step"] == 2 and summary["samples_seen"] == 8, name
        lines = [m for m in metrics(run_dir) if "loss" in m]
        assert [m["step"] for m in lines] == [1, 2] and all(math.isfinite(m["loss"]) for m in lines), name
        mask_terms = {"bce", "dice"} <= set(lines[0])
        assert mask_terms == name.endswith("mask+decoder"), name
        assert math.isfinite(summary["best_val_loss"]) and (run_dir / "best" / "meta.json").is_file()
        assert (run_dir / "samples" / "step_2.png").stat().st_size > 0
        model, cfg, step = load_model(run_dir, "latest")
        assert step == 2 and cfg.hypothesis == name and model.cfg.mask_mode == name.split("/")[1]
    # the run dir records what ran
    assert (run_dir / "config.toml").is_file() and json.loads((run_dir / "env.json").read_text())["versions"]["torch"]


def test_keep_last_best_and_resolved_config(shards, tmp_path):
    summary = train(tiny_config(shards, tmp_path, max_steps=6, ckpt_every=1, keep_last=2, val_every=3,
                                mixed_precision="auto"))
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step_*"))] == ["step_5", "step_6"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_6"
    best = json.loads((tmp_path / "best" / "meta.json").read_text())
    assert best["step"] == summary["best_step"] and best["val_loss"] == summary["best_val_loss"]
    assert 'mixed_precision = "auto"' not in (tmp_path / "config.toml").read_text()  # resolved before saving
    val = [m for m in metrics(tmp_path) if m.get("split") == "val"]
    assert [m["step"] for m in val] == [3, 6] and min(m["val_loss"] for m in val) == summary["best_val_loss"]


def test_sigkill_then_resume_is_exact(shards, tmp_path):
    """Really kill a training process mid-run; the resumed run must match an uninterrupted one exactly."""
    # CLI defaults otherwise (auto precision, channels_last); 2 loader workers, 96 samples / 4 = 24 batches per epoch,
    # so the run crosses an epoch boundary
    args = ["--max-steps", "30", "--ckpt-every", "5", "--val-every", "6", "--keep-last", "2", "--workers", "2"]
    ref, cut = tmp_path / "uninterrupted", tmp_path / "killed"
    run(train_module(*cli_args(shards, ref, *args)))
    proc = subprocess.Popen(train_module(*cli_args(shards, cut, *args)), cwd=REPO, env=env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_step(cut, proc, 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (cut / "summary.json").exists()
    killed_at = latest_checkpoint(cut)
    assert killed_at is not None and killed_at.name != "step_30"
    resumed = run(train_module(*cli_args(shards, cut, *args)))
    assert json.loads((cut / "env.json").read_text())["resumed_from"] == str(killed_at)
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 30
    assert losses(cut) == losses(ref)  # every per-step train loss term and every validation, bit for bit
    a = load_file(ref / "checkpoints" / "step_30" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_30" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and BN statistics
    sa, sb = (load_checkpoint(d / "checkpoints" / "step_30").optimizer_state["state"] for d in (ref, cut))
    assert load_checkpoint(cut / "checkpoints" / "step_30").state.epoch == 1
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])  # Slurm's default / submitit's preemption signal
def test_preemption_signal_saves_and_exits_cleanly(shards, tmp_path, sig):
    """Like Slurm: the signal goes to the whole process group, DataLoader workers included."""
    cmd = [sys.executable, "-m", "facevae_dist", "train",  # the `facevae` command
           *cli_args(shards, tmp_path, "--max-steps", "500", "--ckpt-every", "100", "--val-every", "0"),
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for_step(tmp_path, proc, 3)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "preempted" and summary["signal"] == sig.name and 3 <= summary["step"] < 500
    assert latest_checkpoint(tmp_path).name == f"step_{summary['step']}"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert max(m["step"] for m in metrics(tmp_path)) == summary["step"]


def test_nonfinite_loss_is_skipped_and_counted(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "2")
    summary = train(tiny_config(shards, tmp_path, max_steps=4, val_every=0))
    assert summary["stopped"] == "finished" and summary["bad_steps"] == 1
    events = [m for m in metrics(tmp_path) if m["step"] == 2]
    assert events == [events[0]] and events[0]["event"] == "non_finite_loss" and events[0]["skipped"]
    state = load_checkpoint(tmp_path / "checkpoints" / "step_4")
    # the poisoned forward's BatchNorm updates were undone: weights and running statistics are all finite
    assert all(torch.isfinite(t.float()).all() for t in state.model_state.values())
    assert state.state.bad_steps_total == 1


def test_nonfinite_losses_in_a_row_stop_with_last_good_checkpoint(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "3,4,5")
    cfg = tiny_config(shards, tmp_path, max_steps=8, val_every=0, ckpt_every=2, max_bad_steps=3)
    with pytest.raises(RunError, match=r"non-finite loss in 3 steps in a row \(steps 3-5\).*Last good checkpoint: "
                                       r".*step_4"):
        train(cfg)
    good = load_checkpoint(latest_checkpoint(tmp_path))
    assert good.state.step == 4 and all(torch.isfinite(t.float()).all() for t in good.model_state.values())
    monkeypatch.delenv(INJECT_NAN_ENV)
    assert train(cfg)["step"] == 8  # the same command resumes from it once the data is fixed


def test_fp16_grad_accum_global_clip(shards, tmp_path):
    """fp16 autocast + GradScaler, 2 micro-batches per step, global-norm clipping, channels_last."""
    cfg = tiny_config(shards, tmp_path, max_steps=2, grad_accum=2, mixed_precision="fp16", channels_last=True,
                      optim={"clip": "global"}, val_every=0)
    summary = train(cfg)
    assert summary["samples_seen"] == 2 * 2 * 4 and summary["step"] == 2
    state = load_checkpoint(tmp_path / "checkpoints" / "step_2")
    assert state.scaler_state and state.scaler_state["scale"] > 0 and state.state.batch_in_epoch == 4


def test_recorded_loss_curve(tmp_path):
    """A tiny deterministic fp32 run against tests/assets/losses (torchtitan-style regression asset).
    Regenerate after an intended change with FACEVAE_UPDATE_LOSS_ASSETS=1."""
    shards = build_fixed_shards(tmp_path / "gradients")
    train(tiny_config(shards, tmp_path / "run", max_steps=8, val_every=0, ckpt_every=0))
    got = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    if os.environ.get("FACEVAE_UPDATE_LOSS_ASSETS") == "1":
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        ASSET.write_text(json.dumps({"what": "tiny H9 (18 px, width 1/8), batch 4, fp32, seed 0, "
                                             "train_helpers.build_fixed_shards",
                                     "losses": got}, indent=1) + "\n")
    expected = json.loads(ASSET.read_text())["losses"]
    assert len(got) == len(expected) == 8
    assert got == pytest.approx(expected, rel=1e-3)
    assert got[0] != got[-1]


@pytest.mark.slow
def test_compiled_run_resumes_exactly(shards, tmp_path):
    """--compile: a run stopped after its step-2 checkpoint and resumed matches an uninterrupted one bit for bit
    (the compiled step carries no state of its own that a checkpoint would miss)."""
    common = dict(val_every=0, ckpt_every=2, compile=True, channels_last=True, data={"placement": "host"})
    train(tiny_config(shards, tmp_path / "ref", max_steps=4, **common))
    train(tiny_config(shards, tmp_path / "cut", max_steps=2, **common))
    summary = train(tiny_config(shards, tmp_path / "cut", max_steps=4, **common))
    assert summary["step"] == 4 and losses(tmp_path / "cut") == losses(tmp_path / "ref")
    a, b = (load_file(d / "checkpoints" / "step_4" / "model.safetensors") for d in (tmp_path / "ref", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_hint_once_per_process_and_only_when_precision_was_left_to_auto(shards, tmp_path, monkeypatch):
    import facevae_dist.train.loop as train_mod

    said = []
    monkeypatch.setattr(train_mod, "info", lambda msg: said.append(msg))
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    train_mod._hint_native_bf16.cache_clear()
    train(tiny_config(shards, tmp_path / "chosen", max_steps=1, val_every=0, mixed_precision="no"))
    assert not [m for m in said if "bf16 in hardware" in m]
    for name in ("a", "b"):
        train(tiny_config(shards, tmp_path / name, max_steps=1, val_every=0, mixed_precision="auto"))
    assert len([m for m in said if "--mixed-precision bf16" in m and "--set" not in m]) == 1  # the flag, not --set


def test_resume_auto_reads_the_checkpoint_once(shards, tmp_path, monkeypatch):
    """--resume auto reads the newest checkpoint whole to check that it loads; the trainer reuses that read."""
    import facevae_dist.train.checkpoint as ckpt_mod

    train(tiny_config(shards, tmp_path, max_steps=2, val_every=0))
    reads, real = [], ckpt_mod.load_checkpoint
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda path, rank=0: reads.append(path) or real(path, rank))
    summary = train(tiny_config(shards, tmp_path, max_steps=3, val_every=0))
    assert summary["step"] == 3 and [Path(p).name for p in reads] == ["step_2"]


def test_same_seed_same_first_losses_other_seed_differs(shards, tmp_path):
    a = train(tiny_config(shards, tmp_path / "a", max_steps=2, val_every=0, ckpt_every=0))
    b = train(tiny_config(shards, tmp_path / "b", max_steps=2, val_every=0, ckpt_every=0))
    c = train(tiny_config(shards, tmp_path / "c", max_steps=2, val_every=0, ckpt_every=0, seed=1,
                          data={"seed": 1}))
    assert a["step"] == b["step"] == c["step"] == 2
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")


def test_cli_errors_are_one_line(shards, tmp_path, capsys):
    from facevae_dist.cli import main

    assert main(["train", "--shards", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err
    assert main(["train", "--hypothesis", "H42"]) == 2
    assert "H9" in capsys.readouterr().err
    assert main(["train", "--shards", str(shards), "--set", "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    # a shards dir with another image size than the model
    assert main(["train", "--shards", str(shards), "--run-dir", str(tmp_path / "r2"), "--workers", "0"]) == 2
    assert "model.image_size=18" in capsys.readouterr().err


def test_finished_run_is_idempotent_and_resume_none_refuses_to_mix(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path, max_steps=2, val_every=0)
    train(cfg)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = train(cfg)  # a requeued job that already finished: nothing to do, nothing rewritten
    assert again["step"] == 2 and again["stopped"] == "finished" and (tmp_path / "metrics.jsonl").read_text() == before
    from facevae_dist.config import apply_overrides
    from facevae_dist.errors import UsageError

    with pytest.raises(UsageError, match="already has checkpoints .*step_2.*new --run-dir"):
        train(apply_overrides(cfg, ["resume=none"]))


def test_second_trainer_on_same_run_dir_is_refused_and_stale_temps_removed(shards, tmp_path):
    from facevae_dist.errors import UsageError

    cfg = tiny_config(shards, tmp_path, max_steps=2, val_every=0)
    (tmp_path / "checkpoints" / ".tmp-step_7").mkdir(parents=True)  # left by a save that was killed
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from facevae_dist.train.checkpoint import RunDirLock\n"
                               f"with RunDirLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=r"being trained by another process \(pid \d+"):
            train(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg)["step"] == 2  # the lock went away with its holder
    assert not (tmp_path / "checkpoints" / ".tmp-step_7").exists()


def test_resume_refuses_a_changed_experiment_but_not_run_length(shards, tmp_path):
    """A run dir must not mix what is trained; run-length knobs may change on resume."""
    from facevae_dist.errors import UsageError

    train(tiny_config(shards, tmp_path, max_steps=2, val_every=0))
    changed = {
        "hypothesis": tiny_config(shards, tmp_path, "l1/mask+decoder", max_steps=4, val_every=0),
        "loss": tiny_config(shards, tmp_path, max_steps=4, val_every=0, loss={"w_l2": 10.0}),
        "model": tiny_config(shards, tmp_path, max_steps=4, val_every=0, model={"latent_dim": 8}),
        "optim.eps_form": tiny_config(shards, tmp_path, max_steps=4, val_every=0, optim={"eps_form": "torch"}),
        "seed": tiny_config(shards, tmp_path, max_steps=4, val_every=0, seed=3),
    }
    for field, cfg in changed.items():
        with pytest.raises(UsageError, match=rf"trained with other settings \({field}[.:].*new --run-dir") as err:
            train(cfg)
        assert "\n" not in str(err.value)
    first_cost = json.loads((tmp_path / "checkpoints" / "step_2" / "meta.json").read_text())
    longer = tiny_config(shards, tmp_path, max_steps=4, val_every=0, log_every=2, keep_last=3, ckpt_every=1,
                         data={"workers": 1})
    assert train(longer)["step"] == 4
    # the cost counters continue from the checkpoint: a learning curve against CPU-hours survives preemption
    cost = json.loads((tmp_path / "checkpoints" / "step_3" / "meta.json").read_text())
    for key in ("train_seconds", "cpu_seconds"):
        assert cost[key] > first_cost[key] > 0
    assert [r["train_s"] for r in metrics(tmp_path) if "train_s" in r][-1] >= cost["train_seconds"]


def test_run_dir_that_is_a_file_is_one_line(shards, tmp_path, capsys):
    from facevae_dist.cli import main

    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    assert main(["train", *cli_args(shards, target, "--max-steps", "1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "notes.txt" in err and "not a directory" in err
    assert target.read_text() == "mine\n"


def test_deepspeed_with_grad_accum_is_refused(shards, tmp_path):
    from facevae_dist.errors import UsageError

    cfg = tiny_config(shards, tmp_path, grad_accum=2, deepspeed=str(REPO / "launch" / "ds_zero2.json"),
                      optim={"clip": "global", "eps_form": "torch"})
    with pytest.raises(UsageError, match=r"grad_accum=2 with DeepSpeed is refused.*--grad-accum 1"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_skipped_steps_are_read_at_the_next_log_step(shards, tmp_path, monkeypatch):
    """Steps that do not log read nothing back: a skip at step 3 is reported (with its own step) at step 4, and
    max_bad_steps in a row stop the run at the next log step after the limit is reached."""
    monkeypatch.setenv(INJECT_NAN_ENV, "3")
    summary = train(tiny_config(shards, tmp_path / "one", max_steps=8, val_every=0, ckpt_every=0, log_every=4))
    assert summary["bad_steps"] == 1 and summary["step"] == 8
    lines = metrics(tmp_path / "one")
    assert [(m["step"], m.get("event")) for m in lines] == [(3, "non_finite_loss"), (4, None), (8, None)]
    assert lines[0]["bad_in_a_row"] == 1 and lines[0]["samples_seen"] == 3 * 4
    monkeypatch.setenv(INJECT_NAN_ENV, "2,3,4,5,6,7")
    with pytest.raises(RunError, match=r"non-finite loss in 3 steps in a row \(steps 2-4\)"):
        train(tiny_config(shards, tmp_path / "stop", max_steps=12, val_every=0, ckpt_every=0, log_every=4,
                          max_bad_steps=3))
    assert max(m["step"] for m in metrics(tmp_path / "stop")) == 4


def test_val_sampling_sample_is_seeded_and_leaves_training_noise_alone(shards, tmp_path):
    runs = {}
    for name, mode in (("a", "sample"), ("b", "sample"), ("mean", "mean")):
        train(tiny_config(shards, tmp_path / name, max_steps=2, val_every=1, ckpt_every=0, val_sampling=mode))
        runs[name] = metrics(tmp_path / name)
    val = {k: [m["val_loss"] for m in v if m.get("split") == "val"] for k, v in runs.items()}
    train_losses = {k: [m["loss"] for m in v if "loss" in m] for k, v in runs.items()}
    assert val["a"] == val["b"] != val["mean"]  # sampled z, from a seed of its own
    assert train_losses["a"] == train_losses["mean"]  # validation drew nothing from the training RNG


def test_deterministic_flag_runs_and_changes_nothing_on_cpu(shards, tmp_path, monkeypatch):
    """--deterministic switches torch to deterministic kernels (cuDNN/cuBLAS on GPUs, tests/test_gpu.py); on the CPU,
    where runs are bit-exact anyway, it must run and give the same losses. The global switch is the run's only."""
    seen = []
    monkeypatch.setattr("facevae_dist.train.loop.init_trackers",
                        lambda *a: seen.append(torch.are_deterministic_algorithms_enabled()))
    train(tiny_config(shards, tmp_path / "det", max_steps=2, val_every=2, ckpt_every=0, deterministic=True))
    train(tiny_config(shards, tmp_path / "plain", max_steps=2, val_every=2, ckpt_every=0))
    assert seen == [True, False] and not torch.are_deterministic_algorithms_enabled()
    assert losses(tmp_path / "det") == losses(tmp_path / "plain")


def test_a_run_shorter_than_log_every_still_logs_its_last_step(shards, tmp_path):
    """log_every=10 and 3 steps used to write no training line at all (and nothing to TensorBoard)."""
    train(tiny_config(shards, tmp_path, max_steps=3, log_every=10, val_every=0, ckpt_every=0))
    lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in lines] == [3] and math.isfinite(lines[0]["loss"]) and lines[0]["images_per_s"] > 0


# ---- logs a batch job can follow, and saying what runs ---------------------------------------------------------------


@pytest.mark.slow
def test_a_batch_log_has_progress_lines_stdout_only_the_summary_and_train_log_appends(shards, tmp_path):
    """Off a terminal (a Slurm log): a plain progress line at each log step (FACEVAE_PROGRESS_EVERY=0), no bar;
    DeepSpeed's chatter on stderr, stdout the JSON summary alone; RUN_DIR/train.log holds what stderr showed, and the
    resume appends to it."""
    run_dir = tmp_path / "run"
    batch_env = {k: v for k, v in env(FACEVAE_PROGRESS_EVERY="0").items() if k != "FACEVAE_QUIET"}
    common = ["--val-every", "0", "--ckpt-every", "0", "--log-with", "none", "--deepspeed", "launch/ds_zero1.json",
              "--set", "optim.clip=global", "--set", "optim.eps_form=torch"]
    outputs = []
    for max_steps in ("3", "5"):  # the second run resumes the first
        proc = subprocess.run(train_module(*cli_args(shards, run_dir, "--max-steps", max_steps, *common)), cwd=REPO,
                              env=batch_env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count("\n") == 1 and json.loads(proc.stdout)["step"] == int(max_steps), proc.stdout
        assert "Setting accelerator" not in proc.stdout and "━" not in proc.stderr  # no chatter, no bar
        outputs.append(proc.stderr)
    lines = [line for err in outputs for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3", "4/5", "5/5"]
    assert all(re.search(r" loss \d+\.\d{4}  [\d.]+ img/s  elapsed ", line) for line in lines)
    assert "ETA" in lines[0] and "ETA" not in lines[2]
    log = (run_dir / "train.log").read_text()
    assert log.count("---- train ssim+l2/mask+decoder") == 2 and "resumed from" in log
    assert all(line in log for line in lines) and "tracking: none (--log-with none)" in log


def test_launch_mismatch_names_the_cause():
    from facevae_dist.train.launch_check import launch_mismatch

    accelerate = [sys.executable, str(Path(sys.executable).parent / "accelerate"), "launch"]
    script = ["-m", "facevae_dist", "train", "--config", "x.toml"]
    cpu_two = launch_mismatch(1, {}, [*accelerate, "--cpu", "--num_processes", "2", *script])
    assert "asked for 2 processes (--num_processes 2) but started 1 process" in cpu_two and "--cpu" in cpu_two
    assert "launch/cpu-2proc.yaml" in cpu_two and "\n" not in cpu_two
    profile = [*accelerate, "--config_file", str(REPO / "launch" / "cpu-2proc.yaml"), *script]
    assert launch_mismatch(2, {}, profile) is None
    assert "num_processes: 2 in" in launch_mismatch(1, {}, profile)
    assert "asked for 1 process (--num-processes 1) but started 2 processes" in launch_mismatch(
        2, {}, [*accelerate, "--num-processes=1", *script])  # the other way round
    assert launch_mismatch(2, {"WORLD_SIZE": "2"}, ["torchrun", "--nproc_per_node", "2", *script]) is None
    assert "(WORLD_SIZE=4)" in launch_mismatch(1, {"WORLD_SIZE": "4"}, ["bash", "job.sh"])
    assert launch_mismatch(1, {}, ["bash", "job.sh"]) is None and launch_mismatch(1, {}, None) is None


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_cpu_with_two_processes_warns_that_one_started(shards, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (its one-process launcher: no WORLD_SIZE, only
    ACCELERATE_USE_CPU and MASTER_ADDR/PORT); the run says so once, naming the cause and the fix."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = run([accelerate, "launch", "--cpu", "--num_processes", "2", "-m", "facevae_dist", "train",
                *cli_args(shards, tmp_path / "run", "--max-steps", "1", "--val-every", "0", "--log-with", "none")],
               timeout=600)
    warnings = [line for line in proc.stderr.splitlines() if "asked for 2 processes" in line]
    assert len(warnings) == 1 and warnings[0].startswith("facevae: warning: ") and "--num_processes 2" in warnings[0]
    assert "--cpu" in warnings[0] and "launch/cpu-2proc.yaml" in warnings[0]
    assert json.loads(proc.stdout)["world_size"] == 1


def test_seed_outside_numpys_range_is_a_usage_error_before_anything_runs(shards, tmp_path, capsys):
    """--seed 4294967296 used to start and die in numpy with a traceback; --set seed=... the same."""
    from facevae_dist.cli import main

    for argv in (["--seed", "4294967296"], ["--seed", "-3"], ["--set", "seed=4294967296"]):
        with pytest.raises(SystemExit) if argv[0] == "--seed" else contextlib.nullcontext() as exit_:
            rc = main(["train", *cli_args(shards, tmp_path / "r"), *argv])
        rc = exit_.value.code if argv[0] == "--seed" else rc
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "4294967295" in err and "\n" not in err and "Traceback" not in err, argv
        assert not (tmp_path / "r").exists()


def test_largest_seed_trains_and_derived_seeds_stay_in_range(shards, tmp_path):
    """The old derivations (seed + rank, + 1000 x step on a resume with more ranks) are kept where they fit, so every
    seed that worked before gives the same streams; beyond 2**32-1 they are hashed instead of crashing numpy."""
    assert derived_seed(0, 0) == 0 and derived_seed(7, 1) == 8 and derived_seed(7, 1, step=3) == 3008
    near = [derived_seed(SEED_MAX, rank, step) for rank in (0, 1, 2) for step in (0, 5)]
    assert near[0] == SEED_MAX and all(0 <= s <= SEED_MAX for s in near) and len(set(near)) == len(near)
    summary = train(tiny_config(shards, tmp_path, max_steps=2, val_every=0, ckpt_every=0, seed=SEED_MAX,
                                data={"seed": SEED_MAX}))
    assert summary["step"] == 2 and all(math.isfinite(m["loss"]) for m in metrics(tmp_path) if "loss" in m)


def test_resume_on_other_shards_is_refused_unless_allowed(shards, tmp_path, capsys):
    """--shards used to be free on resume: config.toml was rewritten and best/ compared val losses of two
    validation sets. Other shards (another folder, the same content moved, the same folder rebuilt) are refused in
    one line naming both folders; --allow-new-shards continues on them, recorded, with best/ restarted."""
    import shutil

    from facevae_dist.errors import UsageError

    run_dir = tmp_path / "run"
    train(tiny_config(shards, run_dir, max_steps=2, val_every=2))
    config_before = (run_dir / "config.toml").read_text()
    other = build_fixed_shards(tmp_path / "other")
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    for new, words in ((other, "are not"), (moved, "the same content, moved")):
        with pytest.raises(UsageError, match="--allow-new-shards") as err:
            train(tiny_config(new, run_dir, max_steps=4, val_every=2))
        line = str(err.value)
        assert "\n" not in line and str(shards.resolve()) in line and str(new.resolve()) in line and words in line
        assert (run_dir / "config.toml").read_text() == config_before
        assert latest_checkpoint(run_dir).name == "step_2"

    capsys.readouterr()
    assert train(tiny_config(other, run_dir, max_steps=4, val_every=2, allow_new_shards=True))["step"] == 4
    switch = [r for r in metrics(run_dir) if r.get("event") == "new_shards"]
    assert len(switch) == 1 and switch[0]["step"] == 2
    assert switch[0]["shards"] == str(other.resolve()) and switch[0]["previous_shards"] == str(shards.resolve())
    assert "allow_new_shards = false" in (run_dir / "config.toml").read_text()  # each switch is asked for
    assert json.loads((run_dir / "env.json").read_text())["new_shards"]["shards"] == str(other.resolve())
    retired = list((run_dir / "checkpoints").glob("retired-*/best"))
    assert len(retired) == 1  # best/ of the old data kept aside; the new best/ is of the new validation set
    assert json.loads((run_dir / "best" / "meta.json").read_text())["data"]["path"] == str(other.resolve())

    # the same folder rebuilt with other content: refused too
    shutil.rmtree(other)
    build_fixed_shards(other, n_train=32)
    with pytest.raises(UsageError, match="rebuilt since"):
        train(tiny_config(other, run_dir, max_steps=6, val_every=2))


def test_resume_from_an_older_checkpoint_retires_the_later_timeline(shards, tmp_path, capsys):
    """--resume <step_2> of a run at step 6 used to leave step_4 and step_6 in place: the old timeline's newest
    checkpoint won over the new one for --checkpoint latest and the next --resume auto, and metrics.jsonl mixed
    the two timelines. They are moved (not deleted) to checkpoints/retired-<time>/ with one line saying so."""
    run_dir = tmp_path / "run"
    first = dict(max_steps=6, val_every=2, ckpt_every=2, keep_last=3)
    train(tiny_config(shards, run_dir, **first))
    old_weights = load_file(run_dir / "checkpoints" / "step_6" / "model.safetensors")
    best_step = json.loads((run_dir / "best" / "meta.json").read_text())["step"]
    capsys.readouterr()
    again = tiny_config(shards, run_dir, **{**first, "max_steps": 4},
                        resume=str(run_dir / "checkpoints" / "step_2"))
    assert train(again)["step"] == 4
    assert 'resume = "auto"' in (run_dir / "config.toml").read_text()  # `--config` it later: the newest, not step_2
    err = capsys.readouterr().err
    assert "step_4" in err and "step_6" in err and "retired-" in err
    retired = next((run_dir / "checkpoints").glob("retired-*"))
    # best/ goes with them when the abandoned timeline saved it
    expected = ["step_4", "step_6"] + (["best"] if best_step > 2 else [])
    assert sorted(p.name for p in retired.iterdir() if p.is_dir()) == sorted(expected)
    kept = load_file(retired / "step_6" / "model.safetensors")
    assert kept.keys() == old_weights.keys() and all(torch.equal(kept[k], old_weights[k]) for k in kept)
    assert [json.loads(line)["step"] for line in (retired / "metrics.jsonl").read_text().splitlines()][-1] == 6
    assert latest_checkpoint(run_dir).name == "step_4"  # the new timeline's
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert json.loads((run_dir / "best" / "meta.json").read_text())["step"] <= 4
    # the next --resume auto continues the new timeline, and metrics.jsonl reads like one run
    assert train(tiny_config(shards, run_dir, **{**first, "max_steps": 5}))["step"] == 5
    steps = [r["step"] for r in metrics(run_dir) if r.get("split") != "val" and "event" not in r]
    assert steps == [1, 2, 3, 4, 5]


def test_run_dir_over_shards_an_export_or_inside_checkpoints_is_refused(shards, tmp_path):
    """`train --run-dir <a shards folder>` used to write checkpoints and config.toml into the shards."""
    from facevae_dist.errors import UsageError

    run_dir = tmp_path / "run"
    train(tiny_config(shards, run_dir, max_steps=2, val_every=0))
    before = sorted(p.name for p in shards.iterdir())  # after the decode cache the loader keeps there
    export = tmp_path / "export"
    load_model(run_dir, "latest")[0].save_pretrained(export)
    for where, words in ((shards, "is a shards folder"), (shards / "train" / "runs", "inside a shards folder"),
                         (export, "is an exported model"), (run_dir / "checkpoints" / "step_2", "is a checkpoint"),
                         (run_dir / "checkpoints" / "sub", "inside checkpoints/")):
        with pytest.raises(UsageError, match="--run-dir") as err:
            train(tiny_config(shards, where, max_steps=2, val_every=0))
        assert words in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in shards.iterdir()) == before and not (shards / "train" / "runs").exists()


def test_a_killed_data_loader_worker_stops_the_run_with_a_checkpoint_and_one_line(shards, tmp_path):
    """SIGKILL one DataLoader worker, as the out-of-memory killer does: the run reads on in-process to the end of the
    step, checkpoints it and exits 1 with one line naming the worker, the signal and the likely cause."""
    cmd = [sys.executable, "-m", "facevae_dist", "train",
           *cli_args(shards, tmp_path, "--max-steps", "100000", "--ckpt-every", "1000", "--val-every", "0"),
           "--workers", "2", "--set", "data.placement=stream"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for_step(tmp_path, proc, 3, timeout=300)
        workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                   if _ppid(p) == proc.pid]
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("facevae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"worker pid {workers[0]} killed by SIGKILL, most likely by the kernel's out-of-memory killer" in lines[0]
    logged = max(m["step"] for m in metrics(tmp_path) if "loss" in m)
    assert f"stopped at step {logged} with a checkpoint" in lines[0]
    assert latest_checkpoint(tmp_path).name == f"step_{logged}"  # nothing lost


def _ppid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
