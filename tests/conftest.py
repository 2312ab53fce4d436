"""Shared fixtures. The `slurm_cluster` fixture starts a real one-node Slurm (slurm/local-cluster/start.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START = REPO / "slurm" / "local-cluster" / "start.sh"


def _cannot_install_reason() -> str | None:
    if os.geteuid() != 0:
        return "starting a local Slurm needs root (apt-get, daemons)"
    if shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        return "no apt-get to install Slurm and no Slurm installed"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real slurmctld + slurmd (+ slurmdbd for sacct) on this machine. Skips only where Slurm cannot be
    installed; under CI (CI=true) that is a failure, never a skip."""
    reason = _cannot_install_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Slurm tests must run in CI, but {reason}")
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"slurm/local-cluster/start.sh failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"partition": "debug"}
