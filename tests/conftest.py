"""Shared fixtures. The `slurm_cluster` fixture starts a real one-node Slurm (slurm/local-cluster/start.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START = REPO / "slurm" / "local-cluster" / "start.sh"


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
def slurm_cluster():
    """A real slurmctld + slurmd (+ slurmdbd, so sacct sees cancelled jobs). As root: the local one-node cluster
    of slurm/local-cluster/start.sh (installs Slurm on first use; returns at once when it is up; left running,
    stop it with stop.sh). Otherwise a cluster that is already up. Skips only where Slurm cannot be installed;
    in CI (CI=true) that is a failure, never a skip."""
    can_install = os.geteuid() == 0 and (shutil.which("apt-get") or shutil.which("slurmctld"))
    if can_install:
        proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"slurm/local-cluster/start.sh failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-3000:]}")
    elif not _slurm_is_up():
        reason = ("no Slurm cluster is up, and starting the local one (slurm/local-cluster/start.sh) needs root and "
                  "apt-get (Debian/Ubuntu)")
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"the Slurm tests must run in CI, but {reason}")
        pytest.skip(reason)
    return True


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
