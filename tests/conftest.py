"""Shared fixtures. `slurm_cluster`: a real Slurm, already up, or (CI=true / FACEVAE_INSTALL_SLURM=1) the one-node
cluster of slurm/local-cluster/start.sh for the session."""

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
