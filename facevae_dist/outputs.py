"""Where a command may write: never over a shards folder, into a run's checkpoints, over a run directory that is
not its own, or over a model another command wrote. Torch-free: it looks at which files a folder holds.

    folder_kind(path)          what a folder is ("a run directory", "a checkpoint", "a shards folder",
                               "an exported model"), or None
    refuse_to_write(path, ...) one UsageError line when `path` is, or lies inside, something it must not be
"""

from __future__ import annotations

from pathlib import Path

from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import read_json

RUN_DIR = "a run directory"
CHECKPOINT = "a checkpoint"
SHARDS = "a shards folder"
EXPORT = "an exported model"


# the "format" of a shards folder's manifest.json (data/shards.py writes it: data/ is above this floor)
SHARDS_FORMAT = "facevae-shards"


def folder_kind(path: str | Path) -> str | None:
    """What `path` is by the files it holds (the layouts of `facevae shards build`, `facevae train` and
    `facevae export`), or None for any other folder or a path that is no folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    if _is_shards(p):
        return SHARDS
    checkpoints = p / "checkpoints"
    if (p / "best" / "meta.json").is_file() or (checkpoints.is_dir() and any(
            c.name == "latest" or c.name.startswith("step_") for c in checkpoints.iterdir())):
        return RUN_DIR
    if (p / "trainer_state.pt").is_file() or ((p / "meta.json").is_file() and (p / "model.safetensors").is_file()):
        return CHECKPOINT
    if (p / "model.safetensors").is_file():
        return EXPORT
    return None


def _is_shards(p: Path) -> bool:
    """A shards folder: its manifest.json says so, or (a build not finished yet) build.json beside split folders."""
    if (p / "manifest.json").is_file():
        try:
            manifest = read_json(p / "manifest.json", fix="")
        except (FaceVAEError, OSError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") == SHARDS_FORMAT:
            return True
    return (p / "build.json").is_file() and any((p / split).is_dir() for split in ("train", "val", "test"))


def _enclosing(path: Path) -> tuple[str, Path] | None:
    """(what, folder) when `path` lies inside a shards folder or inside a run directory's checkpoints/ or best/."""
    path = path.resolve()
    for parent in path.parents:
        kind = folder_kind(parent)
        if kind == SHARDS:
            return SHARDS, parent
        if kind == RUN_DIR:
            inner = path.relative_to(parent).parts[0]
            if inner in ("checkpoints", "best"):
                return f"{inner}/ of {RUN_DIR}", parent
    return None


def refuse_to_write(path: str | Path, flag: str, writes: str, allowed: tuple[str, ...] = ()) -> str | None:
    """The kind of `path` (folder_kind) when it is one of `allowed`, None when it is nothing of ours; otherwise one
    UsageError line naming it and what to do. `writes` says what the command would put there."""
    path = Path(path)
    kind = folder_kind(path)
    if kind is not None and kind not in allowed:
        raise UsageError(f"{flag} {path} is {kind}; {writes} would be written over it: choose another {flag}")
    inside = _enclosing(path)
    if inside is not None:
        what, where = inside
        raise UsageError(f"{flag} {path} lies inside {what} ({where}); {writes} must not land there: choose "
                         f"another {flag}")
    return kind
