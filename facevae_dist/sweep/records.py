"""What a sweep leaves on disk and what Slurm says about it: the manifest (sweep.json), each element's own record
(element.json), whether the process that wrote it is alive, and Slurm's state of a job. Shared by the element that
runs on a node, the submission and `sweep status`."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from facevae_dist import fileio
from facevae_dist.errors import FaceVAEError, UsageError

MANIFEST = "sweep.json"


ELEMENT_FILE = "element.json"


# Slurm states in which an element still holds (or will hold) a slot: a resubmission must not start it twice
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


# Slurm states of a job that has ended without finishing its work
DEAD_STATES = ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def read_json(path: Path) -> dict:
    try:
        doc = fileio.read_json(path, fix="rewritten by the element")
    except (OSError, FaceVAEError):
        return {}
    return doc if isinstance(doc, dict) else {}


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (Linux): [state, ppid, ...]; None where there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # the name in (...) may hold spaces
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, so a reused pid is not taken for the element's."""
    stat = proc_stat(pid)
    return stat[19] if stat else None  # field 22


def pid_alive(element: dict) -> bool | None:
    """Is the process that wrote this element.json alive? None when this machine cannot tell (another host, no
    pid recorded)."""
    pid = element.get("pid")
    if not pid or element.get("hostname") not in (socket.gethostname(), socket.gethostname().split(".")[0]):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc: kill(0) is all we know
    return stat[0] != "Z" and (element.get("pid_start") in (None, stat[19]))  # a zombie or a reused pid: dead


def live_owner(run_dir: Path) -> int | None:
    """The pid of a live process on this machine that trains or evaluates this element (element.json), else
    None (none, dead, or on another host: then Slurm's own state is what tells)."""
    element = read_json(run_dir / ELEMENT_FILE)
    if element.get("state") in ("training", "evaluating") and pid_alive(element) is True:
        return element.get("pid")
    return None


def is_finished(run_dir: Path) -> bool:
    element = read_json(run_dir / ELEMENT_FILE)
    return element.get("state") == "finished" and (run_dir / "eval" / "metrics.json").is_file()


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


def read_manifest(sweep_dir: str | Path) -> dict:
    manifest = read_json(Path(sweep_dir) / MANIFEST)
    if not manifest:
        raise UsageError(f"{sweep_dir}: no {MANIFEST}; is this a directory written by `facevae sweep submit`?")
    return manifest


def manifest_elements(manifest: dict) -> dict[str, dict]:
    """element key -> entry; a manifest from before --seeds named the same table "hypotheses" (one per name)."""
    if "elements" in manifest:
        return manifest["elements"]
    return {name: {"hypothesis": name, **entry} for name, entry in manifest.get("hypotheses", {}).items()}
