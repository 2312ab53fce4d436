"""What a run directory records about where it ran: versions, git revision, host, world size."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from facevae_dist import __version__


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


# A code snapshot (sweep.snapshot_code) is a copy outside any git tree: it carries its source's revision in this file
REVISION_FILE = "GIT_REVISION"


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the source tree this package runs from (with '-dirty' if modified), or None. Without
    `path`: this package's tree, or, for a sweep's code snapshot, the revision its REVISION_FILE recorded."""
    if path is None:
        recorded = Path(__file__).resolve().parent / REVISION_FILE
        if recorded.is_file():  # first: a snapshot kept inside a checkout must not report the checkout's HEAD
            return recorded.read_text().strip() or None
    src = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")  # only if already imported: recording must not import torch
    return torch.get_num_threads() if torch is not None else None


def environment_info(world_size: int | None = None) -> dict:
    return {
        "facevae_dist": __version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "world_size": world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")),
        "torch_threads": _torch_threads(),  # intra-op threads of this process (results depend on it on CPU)
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {p: _version(p) for p in (
            "torch", "accelerate", "deepspeed", "webdataset", "submitit", "pytorch-msssim", "numpy", "pillow", "safetensors")},
        "argv": sys.argv,
    }
