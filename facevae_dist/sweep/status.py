"""`facevae sweep status` and `collect`: one row per element from its own record, corrected by Slurm and by
whether its process lives; the report over every finished element."""

from __future__ import annotations

from pathlib import Path

from facevae_dist.errors import FaceVAEError
from facevae_dist.fileio import iter_jsonl
from facevae_dist.progress import info
from facevae_dist.sweep.records import (
    DEAD_STATES,
    ELEMENT_FILE,
    is_finished,
    manifest_elements,
    pid_alive,
    read_json,
    read_manifest,
    slurm_state,
)


def _last_train_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last = {}
    for rec in iter_jsonl(path):  # skips a line being written right now
        if "loss" in rec and not rec.get("split"):
            last = rec
    return last


def _element_state(element: dict, job_id: str, sstate: str) -> str:
    """What `sweep status` says about one element: its own record, corrected by what Slurm knows and by whether
    the process that claims to train is still alive (a killed job cannot update its own element.json)."""
    state = element.get("state", "not started" if job_id else "not submitted")
    if state == "finished":
        return state
    if sstate in DEAD_STATES:
        return sstate.lower()
    if sstate == "FAILED":
        return "failed"
    if sstate in ("PENDING", "REQUEUED"):
        return "queued" if state == "not started" else f"{state}, requeued"
    if state in ("training", "evaluating"):
        if sstate == "COMPLETED":  # the job ended, and this run never said it stopped: killed (e.g. OOM, SIGKILL)
            return "killed"
        if pid_alive(element) is False:  # local jobs (and shared elements) on this machine: the process is gone
            return "killed"
    return state


def sweep_status(sweep_dir: str | Path) -> list[dict]:
    """One row per element (hypothesis, seed): state (Slurm's where known, else the element's own; a dead job is
    "killed"/"failed"/"cancelled", never "training"), step, loss, images/s, ETA while it trains."""
    manifest = read_manifest(sweep_dir)
    rows = []
    for key, entry in manifest_elements(manifest).items():
        run_dir = Path(entry["run_dir"])
        element = read_json(run_dir / ELEMENT_FILE)
        job_id = entry["job_ids"][-1] if entry.get("job_ids") else ""
        sstate = slurm_state(job_id) if job_id and entry.get("cluster") == "slurm" else ""
        state = _element_state(element, job_id, sstate)
        rec = _last_train_record(run_dir)
        step, max_steps = rec.get("step", element.get("step")), entry.get("max_steps")
        ips = rec.get("images_per_s")
        eta = None
        if step and max_steps and ips and rec.get("samples_seen") and state == "training":
            eta = (max_steps - step) * (rec["samples_seen"] / step) / ips  # images per step from the counters
        rows.append({"element": key, "hypothesis": entry.get("hypothesis", key), "seed": entry.get("seed"),
                     "job_id": job_id, "slurm_state": sstate, "state": state,
                     "step": step, "max_steps": max_steps, "loss": rec.get("loss"), "images_per_s": ips,
                     "eta_s": eta, "log": entry.get("log_err"), "error": element.get("error"),
                     "restarts": element.get("restarts"), "run_dir": str(run_dir)})
    return rows


def collect_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """The report (tables, figures; seeds aggregated by the report) over every finished element, all seeds;
    unfinished ones are listed."""
    from facevae_dist.report.build import make_report

    sweep_dir = Path(sweep_dir)
    # only the run directories are needed here: no Slurm queries, unlike sweep_status
    run_dirs = {key: Path(entry["run_dir"]) for key, entry in manifest_elements(read_manifest(sweep_dir)).items()}
    finished = [d for d in run_dirs.values() if is_finished(d)]
    if not finished:
        raise FaceVAEError(f"{sweep_dir}: no finished element yet (see `facevae sweep status {sweep_dir}`)")
    missing = [key for key, d in run_dirs.items() if d not in finished]
    if missing:
        info(f"not in the report (unfinished): {', '.join(missing)}")
    return make_report(finished, Path(out) if out else sweep_dir / "report")
