"""Checkpoints of a run directory: atomic, every N steps, keep the last k, best-by-validation, resume-latest.

Layout (inside the run directory):
    checkpoints/step_<n>/        model.safetensors + config.json   (FaceVAE.save_pretrained: weights incl. BN stats)
                                 train_config.toml                 (the full TrainConfig)
                                 trainer_state.pt                  (optimizer, grad scaler, counters, data position)
                                 rng_rank<r>.pt                    (python/numpy/torch/cuda RNG states of each rank)
                                 meta.json                         (step, samples seen, val loss, the sha256 of
                                                                    the model files, the shards; written last)
    checkpoints/latest           text file "step_<n>", written after the directory is complete
    checkpoints/retired-<time>/  what a resume made stale, moved aside (never deleted): the later checkpoints of
                                 a timeline abandoned by `--resume <older step>`, a best/ of other data or steps
    best/                        the same files for the step with the lowest validation loss so far

A checkpoint is written into `checkpoints/.tmp-step_<n>/` and renamed into place only when every rank has written
its files, so a directory named step_<n> is always complete: a run killed at any moment leaves at most a stale
temp dir (or a directory moved aside by a re-save), which remove_stale_temps cleans up or restores. A checkpoint
damaged later (a truncated file) is moved aside as step_<n>.damaged-<time> by `--resume auto`, which then resumes
from the newest one that loads. The model files are checked against the sha256 meta.json recorded whenever a
checkpoint is loaded (resume, eval, export): weights written over a checkpoint (e.g. an export into it) are
refused, not trained on. `.pt` files hold only tensors and plain Python values and are read back
with torch.load(weights_only=True): nothing here ever unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from facevae_dist.config import TrainConfig, load_toml, save_toml
from facevae_dist.errors import FaceVAEError, RunError, UsageError
from facevae_dist.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_json,
    sha256_file,
)
from facevae_dist.model import CONFIG_FILE as MODEL_CONFIG_FILE
from facevae_dist.model import WEIGHTS_FILE, FaceVAE
from facevae_dist.progress import info, warn

CHECKPOINTS = "checkpoints"
BEST = "best"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.toml"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_ASIDE_RE = re.compile(r"^\.old-(best|step_\d+)-\d+$")  # moved aside by _replace_dir (re-saving a directory)
RETIRED_PREFIX = "retired-"  # checkpoints/retired-<time>/: what a resume made stale (retire_stale)
MODEL_FILES = (WEIGHTS_FILE, MODEL_CONFIG_FILE)  # hashed into meta.json, checked on every load


@dataclass
class TrainState:
    """The trainer's counters (torchtitan's Stateful trainer): enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    samples_seen: int = 0  # training samples consumed, all ranks together
    epoch: int = 0  # data position: the epoch being read ...
    batch_in_epoch: int = 0  # ... and how many of its batches (per rank) were consumed
    best_val_loss: float = math.inf
    best_step: int = -1
    bad_steps_total: int = 0  # non-finite losses skipped so far
    world_size: int = 1  # the data layout batch_in_epoch refers to (batches are per rank) ...
    batch_size: int = 0  # ... and per micro-step
    # Cost so far, summed over resumes (for learning curves against compute): wall seconds of the training loop
    # (validation and checkpoints included), and CPU seconds of all ranks (rank 0's process CPU time x ranks).
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---- RNG ----------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, as tensors / plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # this rank's own device only: a requeued job may see fewer GPUs, and the other devices are other ranks'
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state; take this rank's
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of all trainable parameters' bytes: equal on every rank iff DDP kept them in sync (BN running
    statistics are excluded: each rank updates them from its own batch)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- files ----------------------------------------------------------------------------------------------------------


def load_pt(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers (never arbitrary pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: missing; the checkpoint is incomplete (delete its directory to resume from an "
                       "earlier one)") from None
    except Exception as exc:  # a truncated or foreign file: name it instead of a deep traceback
        raise RunError(f"{path}: unreadable checkpoint file ({type(exc).__name__}: {exc})") from None


def save_pt(obj: Any, path: Path) -> None:
    """torch.save through Python's file I/O (fsync'd), so a full disk surfaces as OSError(ENOSPC), not as an
    errno-less RuntimeError from torch's own writer."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a checkpoint (written last: its presence marks the directory complete)."""
    path = Path(ckpt) / META_FILE
    try:
        meta = read_json(path, fix="damaged checkpoint file", error=RunError)
        int(meta["step"])
        return meta
    except FileNotFoundError:
        raise RunError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: damaged checkpoint file ({type(exc).__name__}: {exc})") from None


def verify_model_files(ckpt: Path, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """meta.json of `ckpt`, after checking that its model files are the ones it saved: their sha256 against the
    recorded one; for checkpoints from before the file hashes, the loaded `model`'s parameters against the
    recorded digest (step checkpoints only). A mismatch (weights written over the checkpoint, e.g. by an export
    into it) is one RunError line naming the file."""
    meta = read_meta(ckpt)
    for name, want in (meta.get("files_sha256") or {}).items():
        path = Path(ckpt) / name
        if not path.is_file() or sha256_file(path) != want:
            raise RunError(f"{path}: not the file this checkpoint saved (its sha256 differs from the one in "
                           f"{META_FILE}; written over, e.g. by `facevae export --out` into it); use another "
                           "checkpoint (--resume DIR, --checkpoint step_<n>) or restore the file")
    digests = meta.get("weights_sha256_by_rank")
    if not meta.get("files_sha256") and model is not None and digests and weights_digest(model) != digests[0]:
        raise RunError(f"{Path(ckpt) / WEIGHTS_FILE}: its weights are not the ones this checkpoint saved (their "
                       f"digest differs from the one in {META_FILE}); use another checkpoint or restore the file")
    return meta


def step_of(path: Path) -> int:
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


def is_complete(ckpt: Path) -> bool:
    return (ckpt / META_FILE).is_file() and (ckpt / "model.safetensors").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the highest complete step_<n> (the `latest` pointer can lag by one
    checkpoint if the run died between the rename and the pointer write, so the directories decide)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointManager:
    """Saves and prunes the checkpoints of one run. All ranks call save(); rank 0 writes the shared files, each
    rank its own RNG file, and `barrier` (accelerator.wait_for_everyone) keeps them in step."""

    def __init__(self, run_dir: str | Path, every: int, keep_last: int, *, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, gather: Callable[[str], list[str]] = lambda x: [x],
                 data: dict | None = None):
        self.run_dir = Path(run_dir)
        self.data = data  # the shards trained on (data.shards.shards_identity), recorded in every meta.json
        self.root = self.run_dir / CHECKPOINTS
        self.every = every
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.gather = gather  # all ranks' values on every rank (accelerate.utils.gather_object)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, *, model: torch.nn.Module, optimizer_state: dict | None, scaler_state: dict | None,
             state: TrainState, cfg: TrainConfig, extra: dict | None = None, val_loss: float | None = None,
             write_rank_files: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoints/step_<state.step>/ atomically, point `latest` at it, prune to keep_last.
        `write_rank_files(tmp_dir)` runs on every rank before the directory is declared complete."""
        final, tmp = self.root / f"step_{state.step}", self.root / f".tmp-step_{state.step}"
        with _disk_full_is_one_line(tmp, self.run_dir):
            self._write(tmp, model=model, optimizer_state=optimizer_state, scaler_state=scaler_state, state=state,
                        cfg=cfg, extra=extra, val_loss=val_loss, write_rank_files=write_rank_files)
            if self.rank == 0:
                _replace_dir(tmp, final)
        if self.rank == 0:
            with _disk_full_is_one_line(self.root / LATEST, self.run_dir):
                atomic_write_text(self.root / LATEST, final.name + "\n")
            for old in list_checkpoints(self.run_dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def save_best(self, *, model: torch.nn.Module, state: TrainState, cfg: TrainConfig, val_loss: float) -> Path:
        """Write best/ (weights, config, meta; no optimizer: it is for evaluation, not for resuming)."""
        final, tmp = self.run_dir / BEST, self.run_dir / ".tmp-best"
        with _disk_full_is_one_line(tmp, self.run_dir):
            self._write(tmp, model=model, optimizer_state=None, scaler_state=None, state=state, cfg=cfg, extra=None,
                        val_loss=val_loss, with_rng=False)
            if self.rank == 0:
                _replace_dir(tmp, final)
        self.barrier()
        return final

    def _write(self, tmp: Path, *, model, optimizer_state, scaler_state, state: TrainState, cfg: TrainConfig,
               extra: dict | None, val_loss: float | None, with_rng: bool = True,
               write_rank_files: Callable[[Path], None] | None = None) -> Path:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a killed save
            tmp.mkdir(parents=True)
        self.barrier()
        if with_rng:
            save_pt(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if write_rank_files is not None:
            write_rank_files(tmp)
        if self.rank == 0:
            model.save_pretrained(tmp, model_card=False)  # a model card belongs to exports
            save_toml(cfg, tmp / CONFIG_FILE)
            if optimizer_state is not None:
                save_pt({"optimizer": optimizer_state, "scaler": scaler_state, "state": state.to_dict(),
                         "extra": extra or {}}, tmp / STATE_FILE)
        digests = self.gather(weights_digest(model)) if with_rng else None
        self.barrier()  # every rank's RNG file is in before the directory is declared complete
        if self.rank == 0:
            if digests and len(set(digests)) > 1:
                raise RunError(f"parameters differ across ranks at step {state.step} (digests {digests}); "
                               "distributed training has diverged, please report this")
            atomic_write_json(tmp / META_FILE, {
                "weights_sha256_by_rank": digests,
                "files_sha256": {name: sha256_file(tmp / name) for name in MODEL_FILES},
                "data": self.data,
                "step": state.step, "samples_seen": state.samples_seen, "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch, "val_loss": val_loss, "world_size": self.world_size,
                "train_seconds": round(state.train_seconds, 2), "cpu_seconds": round(state.cpu_seconds, 2),
                "hypothesis": cfg.hypothesis, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        return tmp


@contextlib.contextmanager
def _disk_full_is_one_line(where: Path, run_dir: Path):
    """A full disk (or quota) while writing `where` -> RunError naming it; a partial temp directory is removed
    (it frees the space; the previous checkpoint, written earlier, stays intact)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if where.name.startswith(".tmp-"):
            shutil.rmtree(where, ignore_errors=True)
        raise RunError(f"disk full while writing {where} ({exc.strerror or exc}); the previous checkpoint "
                       f"({latest_checkpoint(run_dir) or 'none'}) is intact: free space on that file system and "
                       "rerun the same command to resume") from None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp -> final; an existing final (re-saving a step after resuming from an older checkpoint) is moved
    aside first, so there is never a moment without a complete directory under one of the two names."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _asides(run_dir: Path) -> list[Path]:
    """Complete directories moved aside by _replace_dir (.old-best-<pid>, checkpoints/.old-step_<n>-<pid>), newest
    first."""
    found = [p for p in [*run_dir.glob(".old-best-*"), *(run_dir / CHECKPOINTS).glob(".old-step_*")]
             if _ASIDE_RE.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Clean up after saves that were killed (call on rank 0, under the RunDirLock, before training starts):
    a directory moved aside with nothing renamed into its place yet (a kill between the two renames of
    _replace_dir) is restored; temp directories, leftover asides and atomic-write temps (.latest.*.tmp) are
    deleted. Returns what was deleted."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    for aside in _asides(run_dir):
        final = aside.parent / _ASIDE_RE.match(aside.name).group(1)
        if not final.exists():
            os.replace(aside, final)
            info(f"restored {final} from {aside.name} (a save was stopped between two renames)")
    stale = [*root.glob(".tmp-*"), *root.glob(".old-*"), *run_dir.glob(".tmp-best"), *run_dir.glob(".old-best-*")]
    stale += [p for p in root.glob(".*.tmp") if p.is_file()]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


class RunDirLock:
    """An exclusive lock on a run directory (a POSIX lock on RUN_DIR/.lock, held by rank 0 while training): a
    second training process on the same directory would interleave checkpoints. The OS drops it when the holder
    dies; unlike flock it is not inherited by forked DataLoader workers (which outlive a SIGKILLed parent for a few
    seconds), and it also works on NFS."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.path.parent} is being trained by another process ({holder}); wait for it, "
                             "stop it, or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


# ---- resume ---------------------------------------------------------------------------------------------------------


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """'auto' -> the newest checkpoint of run_dir that loads, or None if there is none; 'none' -> None; else that
    directory. With 'auto', newer checkpoints that do not load (a truncated file) are moved aside as
    step_<n>.damaged-<time> (kept, never picked again) and a warning says so; if none loads it refuses.
    Call on rank 0 only (it renames)."""
    return resume_checkpoint(run_dir, resume)[0]


def resume_checkpoint(run_dir: str | Path, resume: str) -> tuple[Path | None, Restored | None]:
    """resolve_resume, plus rank 0's loaded checkpoint when 'auto' had to read it whole to check that it loads
    (so the trainer does not read it twice); None when it was not read. Rank 0 only."""
    if resume == "none":
        return None, None
    if resume == "auto":
        return _newest_loadable(Path(run_dir))
    path = Path(resume)
    if not is_complete(path):
        raise UsageError(f"resume={resume!r}: not a complete checkpoint directory (needs {META_FILE} and "
                         "model.safetensors); use --resume auto or a checkpoints/step_<n> directory")
    return path, None


@dataclass
class Restored:
    """What a checkpoint gives back to the trainer."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    scaler_state: dict | None
    state: TrainState
    rng: dict | None  # this rank's RNG states (None if the checkpoint was written by fewer ranks)
    extra: dict


def load_checkpoint(path: str | Path, rank: int = 0) -> Restored:
    """Everything rank `rank` needs to resume; a damaged file -> RunError naming it (one line)."""
    path = Path(path)
    if not is_complete(path):
        raise RunError(f"{path}: incomplete checkpoint (no {META_FILE}); delete it or pick another with --resume")
    read_meta(path)
    blob = load_pt(path / STATE_FILE)
    try:
        state = TrainState.from_dict(blob["state"])
        optimizer_state, scaler_state, extra = blob.get("optimizer"), blob.get("scaler"), blob.get("extra") or {}
    except (KeyError, TypeError, AttributeError) as exc:
        raise RunError(f"{path / STATE_FILE}: not a trainer state ({type(exc).__name__}: {exc})") from None
    weights = path / "model.safetensors"
    try:
        model_state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"{weights}: damaged or unreadable safetensors file ({exc})") from None
    verify_model_files(path)  # after the reads: a damaged file is named as damaged, a replaced one as replaced
    rng_file = path / f"rng_rank{rank}.pt"
    return Restored(path=path, model_state=model_state, optimizer_state=optimizer_state, scaler_state=scaler_state,
                    state=state, rng=load_pt(rng_file) if rng_file.is_file() else None, extra=extra)


def _damage(ckpt: Path) -> tuple[str | None, Restored | None]:
    """(why `ckpt` cannot be resumed from: the first file that does not load, None) or (None, rank 0's loaded
    checkpoint): every file is read."""
    try:
        restored = load_checkpoint(ckpt)
        for rng_file in sorted(ckpt.glob("rng_rank*.pt")):  # the other ranks' files too
            load_pt(rng_file)
    except FaceVAEError as exc:
        return str(exc), None
    return None, restored


def _newest_loadable(run_dir: Path) -> tuple[Path | None, Restored | None]:
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why, restored = _damage(ckpt)
        if why is None:
            break
        damaged.append((ckpt, why))
    else:
        if damaged:  # nothing to fall back to: refuse rather than silently start over in this directory
            raise RunError(f"{run_dir}: no checkpoint in {CHECKPOINTS}/ loads ({'; '.join(w for _, w in damaged)}); "
                           f"move {run_dir / CHECKPOINTS} away to start afresh, or use another --run-dir")
        return None, None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    kept = []
    for bad, why in damaged:
        aside = bad.with_name(f"{bad.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            aside, n = bad.with_name(f"{bad.name}.damaged-{stamp}-{n}"), n + 1
        os.replace(bad, aside)
        kept.append(f"{bad.name} ({why}) kept as {aside.name}")
    if kept:  # nothing newer failed: resume silently
        warn(f"resuming from {ckpt} because newer checkpoints do not load: {'; '.join(kept)}")
    return ckpt, restored


def _lines_after(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl logged after `step` (unreadable lines are skipped)."""
    if not path.is_file():
        return []
    return [json.dumps(r) for r in iter_jsonl(path)
            if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) > step]


def stale_after_resume(run_dir: str | Path, step: int, new_data: bool = False) -> dict | None:
    """What resuming `run_dir` at `step` makes stale (rank 0; retire_stale moves it aside): the step checkpoints
    after `step`, a timeline abandoned by `--resume <an older checkpoint>` (--resume auto and --checkpoint latest
    would otherwise pick them over the new timeline's), and best/ when it was saved after `step` or, with
    `new_data` (--allow-new-shards), on other shards: its val loss is not comparable with the ones to come.
    None when nothing is stale."""
    run_dir = Path(run_dir)
    later = [p.name for p in list_checkpoints(run_dir) if step_of(p) > step]
    best_stale = False
    if is_complete(run_dir / BEST):
        try:
            best_stale = new_data or int(read_meta(run_dir / BEST)["step"]) > step
        except RunError:
            pass  # a damaged best/ is left where it is: resolve_which and eval report it
    if not later and not best_stale:
        return None
    why = (f"resumed at step {step}, before {', '.join(later)}" if later
           else f"resumed at step {step} on other shards" if new_data else f"resumed at step {step}")
    return {"checkpoints": later, "best": best_stale, "why": why}


def retire_stale(run_dir: str | Path, stale: dict, step: int) -> Path:
    """Move what stale_after_resume found into checkpoints/retired-<time>/ (never deleted: it is the other
    timeline's work), with a copy of the metrics.jsonl lines logged after `step` (the trainer then truncates
    metrics.jsonl there), and say so in one line. Rank 0, under the RunDirLock, before the resumed run saves."""
    run_dir = Path(run_dir)
    metrics_lines = _lines_after(run_dir / "metrics.jsonl", step)
    root = run_dir / CHECKPOINTS
    dest = root / f"{RETIRED_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while dest.exists():
        dest, n = root / f"{RETIRED_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{n}", n + 1
    dest.mkdir(parents=True)
    moved = []
    for name in stale["checkpoints"]:
        os.replace(root / name, dest / name)
        moved.append(f"{CHECKPOINTS}/{name}")
    if stale["best"]:
        os.replace(run_dir / BEST, dest / BEST)
        moved.append(f"{BEST}/")
    if metrics_lines:
        atomic_write_text(dest / "metrics.jsonl", "".join(line + "\n" for line in metrics_lines))
        moved.append(f"{len(metrics_lines)} metrics.jsonl line(s)")
    atomic_write_text(dest / "why.txt", stale["why"] + "\n")
    newest = latest_checkpoint(run_dir)
    if (root / LATEST).is_file() and newest is not None:  # the pointer may name a retired checkpoint
        atomic_write_text(root / LATEST, newest.name + "\n")
    warn(f"{stale['why']}: moved {', '.join(moved)} to {dest} (kept there; --resume auto, --checkpoint latest "
         "and best no longer pick them)")
    return dest


# ---- for evaluation / inference -----------------------------------------------------------------------------------


def resolve_which(run_dir: str | Path, which: str = "best") -> Path:
    """'best' | 'latest' | 'step_<n>' | a directory -> the checkpoint directory (label it with checkpoint_label).
    'best' uses a best/ moved aside by a save that was killed between its two renames, and otherwise falls back
    to 'latest' for runs that never validated (val_every=0), saying so."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory (expected the --run-dir of `facevae train`)")
    if which == "best":
        best = run_dir / BEST
        if is_complete(best):
            return best
        aside = [p for p in _asides(run_dir) if p.name.startswith(".old-best-")]
        if aside:
            return aside[0]
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            info(f"{run_dir} has no {BEST}/ (it never validated): using the latest checkpoint, {latest.name}")
        which = "latest"
    if which == "latest":
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise FaceVAEError(f"{run_dir}: no complete checkpoint in {CHECKPOINTS}/ or {BEST}/ "
                               "(train longer than --ckpt-every steps, or let the run finish)")
        return latest
    if _STEP_RE.match(which):
        path = run_dir / CHECKPOINTS / which
    else:
        path = Path(which)
    if not is_complete(path):
        have = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        raise FaceVAEError(f"{path}: not a complete checkpoint; use best, latest or one of: {have}")
    return path


def checkpoint_label(path: str | Path) -> str:
    """What resolve_which picked, for reports: 'best', 'step_<n>', or the directory itself."""
    path = Path(path)
    if path.name == BEST or (_ASIDE_RE.match(path.name) and path.name.startswith(".old-best-")):
        return BEST
    m = _ASIDE_RE.match(path.name)
    name = m.group(1) if m else path.name
    return name if _STEP_RE.match(name) else str(path)


@dataclass
class LoadedModel:
    model: Any  # FaceVAE in eval mode
    cfg: TrainConfig
    step: int
    path: Path  # the checkpoint directory resolve_which picked ...
    label: str  # ... and its name for reports: "best" | "step_<n>" | the directory


def open_model(run_dir: str | Path, which: str = "best", map_location: str | torch.device = "cpu") -> LoadedModel:
    """The model of a run's checkpoint (`which`: best | latest | step_<n> | a directory) with where it came from.
    A missing, damaged or mismatching file -> one-line FaceVAEError naming it."""
    path = resolve_which(run_dir, which)
    read_meta(path)  # before the weights: cheap, and names the file if damaged
    model = FaceVAE.from_pretrained(path, map_location=map_location).eval()
    meta = verify_model_files(path, model)
    cfg = load_toml(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else TrainConfig(model=model.cfg)
    return LoadedModel(model=model, cfg=cfg, step=int(meta["step"]), path=path, label=checkpoint_label(path))


def load_model(run_dir: str | Path, which: str = "best", map_location: str | torch.device = "cpu"):
    """(FaceVAE in eval mode, TrainConfig, step) from a run directory; `which` is best | latest | step_<n>.
    open_model also says which checkpoint that was."""
    loaded = open_model(run_dir, which, map_location)
    return loaded.model, loaded.cfg, loaded.step
