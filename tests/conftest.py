"""Shared by the tests (`from conftest import TINY_36, set_args`, as `from train_helpers import ...`):

- the tiny model profiles, TINY_18 and TINY_36, and `model_overrides` / `set_args` to pass one as `--set` strings;
- `tiny_shards` and `tiny_runs`: 36 px synthetic shards and two 4-step training runs (l2 without and with the face
  mask), built once per session for the evaluation and learning-curve tests;
- `slurm_cluster`: a real Slurm, already up, or (CI=true / FACEVAE_INSTALL_SLURM=1) the one-node cluster of
  slurm/local-cluster/start.sh for the session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START = REPO / "slurm" / "local-cluster" / "start.sh"
STOP = REPO / "slurm" / "local-cluster" / "stop.sh"
INSTALL_ENV = "FACEVAE_INSTALL_SLURM"  # =1: the Slurm tests may install and start the local cluster (root, apt-get)

# The tiny model profiles: the paper's architecture with 1/8 of its channels and a 16-d latent.
# 18 px: the 9x9 -> 1x1 tail plus one high-resolution stage (the trainer tests).
# 36 px: the smallest size at which every metric is defined (LPIPS needs >= 31 px).
TINY_18 = {"image_size": 18, "width": 0.125, "latent_dim": 16}
TINY_36 = {"image_size": 36, "width": 0.125, "latent_dim": 16}


def model_overrides(profile: dict, keys=None) -> list[str]:
    """A profile (or only its `keys`) as config overrides: ["model.image_size=36", "model.width=0.125", ...]."""
    return [f"model.{k}={v}" for k, v in profile.items() if keys is None or k in keys]


def set_args(overrides) -> list[str]:
    """Config overrides as command-line arguments: ["--set", "model.image_size=36", "--set", ...]."""
    return [arg for kv in overrides for arg in ("--set", kv)]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """36 px shards of 40 synthetic faces (24 train / 8 val / 8 test), 4 per shard."""
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import SyntheticSource

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    build_shards(SyntheticSource(n=40, seed=0, split_ratios=(0.6, 0.2, 0.2)), out,
                 ShardOptions(image_size=TINY_36["image_size"], shard_size=4, image_format="png"))
    return out


@pytest.fixture(scope="session")
def tiny_runs(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """Two real training runs of the paper's question, l2 without and with the face mask: 4 steps of TINY_36,
    checkpoints at steps 2 and 4."""
    import torch

    from facevae_dist.config import TrainConfig
    from facevae_dist.train.loop import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("l2/none", "l2/mask+decoder"):
        run_dir = root / name.replace("/", "--")
        cfg = TrainConfig.from_hypothesis(
            name, run_dir=str(run_dir), max_steps=4, val_every=2, val_batches=1, ckpt_every=2, log_every=1,
            sample_every=0, mixed_precision="no", data={"shards": str(tiny_shards), "batch_size": 4, "workers": 0},
            model=dict(TINY_36))
        summary = train(cfg)
        assert summary["step"] == 4
        out[name] = run_dir
    return out


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _slurm_is_up() -> bool:
    """A reachable slurmctld with a usable node (e.g. a cluster this machine is a client of)."""
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.splitlines())


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real slurmctld + slurmd (+ slurmdbd, so sacct sees cancelled jobs).

    A user's `make test` changes nothing on the machine: it uses a Slurm that is already up, else skips these tests
    with the reason. Only in CI (CI=true) or when asked (FACEVAE_INSTALL_SLURM=1), and as root with apt-get, does it
    install and start the local one-node cluster of slurm/local-cluster/start.sh; at the end of the session it stops
    the daemons that start.sh started for it (munged, MariaDB, slurmdbd, slurmctld, slurmd), and none that were
    already running. In CI a Slurm that cannot be started is a failure, never a skip."""
    ci = _env_true("CI")
    if not (ci or _env_true(INSTALL_ENV)):
        if not _slurm_is_up():
            pytest.skip(f"no Slurm cluster is up; set {INSTALL_ENV}=1 to let the tests install (apt-get, as root) "
                        "and start a local one for the session (slurm/local-cluster/start.sh), stopped at the end")
        yield True
        return
    if os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("slurmctld")):
        reason = "starting the local Slurm cluster (slurm/local-cluster/start.sh) needs root and apt-get (Debian/Ubuntu)"
        if _slurm_is_up():
            yield True
            return
        if ci:
            pytest.fail(f"the Slurm tests must run in CI, but no cluster is up and {reason}")
        pytest.skip(f"no Slurm cluster is up and {reason}")
    started_file = tmp_path_factory.mktemp("slurm") / "started"
    started_file.touch()
    try:
        proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "STARTED_FILE": str(started_file)})
        if proc.returncode != 0:
            pytest.fail(f"slurm/local-cluster/start.sh failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-3000:]}")
        yield True
    finally:
        started = started_file.read_text().split()
        if started:
            subprocess.run(["bash", str(STOP), *started], capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def _restore_quiet():
    """`facevae -q ...` run in-process exports FACEVAE_QUIET for its child processes; keep that from leaking into
    later tests (their subprocesses' logs are asserted on)."""
    from facevae_dist import progress

    saved_env, saved_flag = os.environ.get("FACEVAE_QUIET"), progress.is_quiet()
    yield
    if saved_env is None:
        os.environ.pop("FACEVAE_QUIET", None)
    else:
        os.environ["FACEVAE_QUIET"] = saved_env
    progress.set_quiet(saved_flag)
