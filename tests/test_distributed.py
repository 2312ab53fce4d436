"""Real multi-process runs: 2-process DDP over gloo (torchrun and accelerate launch with launch/cpu-2proc.yaml),
and the DeepSpeed world-size-1 path through Accelerate (the only DeepSpeed setting that works on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, build_tiny_shards, cli_args, losses, metrics, run, train_module

from facevae_dist.config import TrainConfig
from facevae_dist.errors import UsageError
from facevae_dist.train.checkpoint import load_model, weights_digest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory.mktemp("shards") / "synthetic")


def _check_ranks_identical(run_dir, step: int, world: int = 2) -> None:
    meta = json.loads((run_dir / "checkpoints" / f"step_{step}" / "meta.json").read_text())
    digests = meta["weights_sha256_by_rank"]
    assert meta["world_size"] == world and len(digests) == world and len(set(digests)) == 1
    model, _, got_step = load_model(run_dir, f"step_{step}")
    assert got_step == step and weights_digest(model) == digests[0]  # the digest is of the saved weights


def test_torchrun_two_process_ddp(shards, tmp_path):
    """2 ranks, 2 micro-batches per step, and a poisoned batch at step 3 that every rank must skip together."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "facevae_dist", "train",
         *cli_args(shards, tmp_path, "--max-steps", "4", "--ckpt-every", "2", "--val-every", "2",
                   "--grad-accum", "2", "--mixed-precision", "no")], FACEVAE_INJECT_NAN_STEPS="3")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4 and summary["samples_seen"] == 4 * 2 * 4 * 2
    assert summary["bad_steps"] == 1
    _check_ranks_identical(tmp_path, 2)
    _check_ranks_identical(tmp_path, 4)
    train_lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 4]  # rank 0 alone writes; step 3 was skipped
    assert json.loads((tmp_path / "env.json").read_text())["distributed_type"] == "DistributedType.MULTI_CPU"


def test_accelerate_launch_cpu_2proc_profile(shards, tmp_path):
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "cpu-2proc.yaml"), "-m", "facevae_dist", "train",
                *cli_args(shards, tmp_path, "--max-steps", "3", "--ckpt-every", "3", "--val-every", "0")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stopped"] == "finished"
    _check_ranks_identical(tmp_path, 3)
    assert 'mixed_precision = "no"' in (tmp_path / "config.toml").read_text()  # the profile's precision under auto
    assert "asked for" not in proc.stderr  # the profile's 2 processes started: no launch warning
    log = (tmp_path / "train.log").read_text()  # rank 0 alone writes it
    assert log.count("---- train ") == 1 and log.count(" training ssim+l2/mask+decoder in ") == 1
    assert log.count(" step 3/3 (100%)") == 1


def test_deepspeed_world1_runs_and_resumes_exactly(shards, tmp_path):
    args = ["--deepspeed", "launch/ds_zero2.json", "--set", "optim.clip=global", "--set", "optim.eps_form=torch",
            "--mixed-precision", "bf16", "--ckpt-every", "2", "--val-every", "2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(train_module(*cli_args(shards, ref, "--max-steps", "4", *args)))
    run(train_module(*cli_args(shards, cut, "--max-steps", "2", *args)))
    run(train_module(*cli_args(shards, cut, "--max-steps", "4", *args)))
    env = json.loads((cut / "env.json").read_text())
    assert env["distributed_type"] == "DistributedType.DEEPSPEED" and env["resumed_from"].endswith("step_2")
    ds = json.loads((ref / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["gradient_clipping"] == 1e-3
    assert (cut / "checkpoints" / "step_4" / "ds_optimizer_rank0.pt").is_file()
    assert losses(cut) == losses(ref)
    a, b = (load_file(d / "checkpoints" / "step_4" / "model.safetensors") for d in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_config_rejects_auto_and_bad_stage(tmp_path):
    from facevae_dist.train.distributed import deepspeed_plugin

    cfg = TrainConfig(run_dir=str(tmp_path / "r"))
    cfg.optim.clip = "global"
    cfg.deepspeed = str(tmp_path / "ds.json")
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                                  "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(UsageError, match="train_micro_batch_size_per_gpu, zero_optimization.reduce_bucket_size"):
        deepspeed_plugin(cfg)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(UsageError, match="stage=3"):
        deepspeed_plugin(cfg)
    for content, expected in ((b"[" * 100_000, "nested too deeply"), (b"[1, 2]", "expected a JSON object")):
        (tmp_path / "ds.json").write_bytes(content)  # a RecursionError / AttributeError before
        with pytest.raises(UsageError, match=expected):
            deepspeed_plugin(cfg)
    for name in ("ds_zero1.json", "ds_zero2.json"):  # the shipped files: explicit numbers, valid for DeepSpeed
        cfg.deepspeed = str(REPO / "launch" / name)
        plugin = deepspeed_plugin(cfg)
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig(plugin.deepspeed_config)


def test_deepspeed_launch_profile_is_read_by_the_command_line_not_by_train(monkeypatch, tmp_path):
    """`accelerate launch --config_file launch/deepspeed-zero2.yaml` sets ACCELERATE_USE_DEEPSPEED and the JSON's
    path: the command line turns that into --deepspeed (an explicit flag wins); train() reads no environment."""
    from facevae_dist.cli import build_parser
    from facevae_dist.cli.train import config_from_args

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "launch" / "ds_zero2.json"))
    parse = build_parser().parse_args
    base = ["train", "--run-dir", str(tmp_path), "--set", "optim.clip=global", "--set", "optim.eps_form=torch"]
    assert config_from_args(parse(base)).deepspeed == str(REPO / "launch" / "ds_zero2.json")
    other = str(REPO / "launch" / "ds_zero1.json")
    assert config_from_args(parse([*base, "--deepspeed", other])).deepspeed == other
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert not config_from_args(parse(base)).deepspeed
    assert "ACCELERATE_USE_DEEPSPEED" not in (REPO / "facevae_dist" / "train" / "loop.py").read_text()


def test_old_module_entry_fails_saying_what_replaced_it():
    """`python -m facevae_dist.train` is gone (train.py no longer imports its own command line); a launcher script
    still using it gets exit 2 and the new form, not exit 0 having trained nothing."""
    proc = subprocess.run([sys.executable, "-m", "facevae_dist.train", "--hypothesis", "H9"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "python -m facevae_dist train" in proc.stderr


# ---- a rank that stops answering, a launcher that dies ---------------------------------------------------------------


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _ranks_of(launcher: int, world: int = 2, deadline_s: float = 300) -> list[int]:
    """Pids of the launcher's ranks 0..world-1 (torchrun starts each in a session of its own), by their RANK."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                    continue
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            for rank in range(world):
                if f"RANK={rank}".encode() in environ:
                    found[rank] = int(stat.parent.name)
        if len(found) == world:
            return [found[r] for r in range(world)]
        time.sleep(0.5)
    raise AssertionError(f"the launcher {launcher} never showed {world} ranks")


def _kill_all(proc, ranks: list[int]) -> None:
    """The launcher's group and each rank this test started (by pid): nothing outlives the test."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in ranks:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _launch(shards, run_dir, *extra: str):
    """torchrun with 2 ranks, in its own session."""
    from train_helpers import env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "facevae_dist", "train", *cli_args(shards, run_dir, "--max-steps", "100000", "--val-every", "0",
                                              "--mixed-precision", "no", *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_training(proc, run_dir, step: int, deadline_s: float = 600) -> None:
    import time

    deadline = time.monotonic() + deadline_s
    while max((m["step"] for m in metrics(run_dir) if "loss" in m), default=0) < step:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {deadline_s} s"
        time.sleep(0.5)


def test_a_frozen_rank_ends_the_run_with_a_line_naming_it(shards, tmp_path):
    """SIGSTOP rank 1 mid-training: rank 0 waits dist_timeout_s in its collective, then the run ends with a line
    naming rank 1 and its last step (torch's default would wait 30 minutes, silently)."""
    import os
    import signal
    import time

    proc = _launch(shards, tmp_path, "--ckpt-every", "2", "--set", "dist_timeout_s=15")
    ranks = []
    try:
        ranks = _ranks_of(proc.pid)
        _wait_for_training(proc, tmp_path, 3)
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=600)
        waited = time.monotonic() - t0
    finally:
        _kill_all(proc, ranks)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("facevae: error:")]
    assert lines and "rank 0 waited 15 s in a collective after step" in lines[0], err[-3000:]
    assert "rank 1 (silent for" in lines[0] and "last finished step" in lines[0], lines[0]
    assert waited < 15 + 300, f"the run took {waited:.0f} s to end"


def test_a_killed_launcher_takes_its_ranks_along_after_a_checkpoint(shards, tmp_path):
    """SIGKILL torchrun itself: each rank gets SIGTERM from the kernel (PR_SET_PDEATHSIG), stops with the others
    at the same step, checkpoints it, and exits; no rank trains on as an orphan."""
    import os
    import signal
    import time

    from facevae_dist.train.checkpoint import latest_checkpoint

    proc = _launch(shards, tmp_path, "--ckpt-every", "1000")
    ranks = []
    try:
        ranks = _ranks_of(proc.pid)
        _wait_for_training(proc, tmp_path, 3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 300
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.5)
        orphans = [pid for pid in ranks if _alive(pid)]
    finally:
        _kill_all(proc, ranks)
    assert orphans == [], "ranks outlived their launcher"
    latest = latest_checkpoint(tmp_path)
    logged = max(m["step"] for m in metrics(tmp_path) if "loss" in m)
    assert latest is not None and int(latest.name.split("_")[1]) == logged  # stopped together, nothing lost
    assert "stopped by SIGTERM" in (tmp_path / "train.log").read_text()
