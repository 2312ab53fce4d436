"""`facevae shards build|verify|info`: raw faces -> WebDataset tar shards at training size, resumable and
byte-identical whatever the worker count.

Layout of OUT/:
  build.json                         what is being built (source + options), written first: a re-run with other
                                     options refuses to mix datasets unless --overwrite
  {train,val,test}/shard-NNNNNN.tar  samples `<split>-<index:08d>` with `jpg`|`png`, `mask.png`, `json`, and
                                     `labels.png` where the source has per-pixel label maps (data/labels.py)
  {split}/shard-NNNNNN.stats.json    per-shard stats, written LAST: the shard's completion marker
  manifest.json                      counts, shard list with sha256, source, options, package version
  sizes.json                         {"train": n, "val": n, "test": n}
  errors.tsv                         split, source id, reason for every skipped item (empty if none)
Shard k of a split holds items [k*shard_size, (k+1)*shard_size) of the source's ordered list, so every shard
depends only on its own items; skipped (corrupt) items leave a gap in the indices and the shard a little short.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from facevae_dist.data.labels import LABELS_MEMBER, decode_labels, encode_labels, labels_limit, manifest_block
from facevae_dist.data.masks import FACE_EXCLUDED_LABELS
from facevae_dist.data.resize import resize_linear
from facevae_dist.data.sources import SPLITS, CorruptSample, Item, Record, Source
from facevae_dist.data.tario import index_tar, member_limits, read_fields, write_tar
from facevae_dist.errors import DataError, FaceVAEError, UsageError
from facevae_dist.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    flock_holder,
    parse_json,
    read_json,
    sha256_file,
)
from facevae_dist.outputs import SHARDS_FORMAT
from facevae_dist.progress import info, make_progress, warn

FORMAT = SHARDS_FORMAT  # one definition: outputs.py tells a shards folder by it
FORMAT_VERSION = 2  # 2: samples carry labels.png where the source has label maps; 1 (still read): none do
FIT_MODES = ("squash", "center-crop")
RESIZE_METHODS = ("pil", "cv2")
IMAGE_FORMATS = ("jpg", "png")
RESIZE_DESCRIPTIONS = {
    "pil": "PIL BILINEAR (antialiased: its filter widens when shrinking)",
    "cv2": "cv2.resize INTER_LINEAR (half-pixel centers, no antialiasing; the paper's code), in numpy",
}


@dataclass(frozen=True)
class ShardOptions:
    image_size: int = 144
    fit: str = "squash"  # the paper squashes 178x218 -> 144x144; center-crop keeps the aspect ratio
    resize: str = "pil"  # the resampler: "pil" (antialiased bilinear) or "cv2" (the paper's INTER_LINEAR)
    image_format: str = "jpg"  # "png" is lossless
    jpeg_quality: int = 95
    shard_size: int | None = None  # None: auto, see resolve_shard_size

    def validate(self) -> None:
        if not 8 <= self.image_size <= 2048:
            raise UsageError(f"--image-size must be in [8, 2048], got {self.image_size}")
        if self.fit not in FIT_MODES:
            raise UsageError(f"--fit must be one of {FIT_MODES}, got {self.fit!r}")
        if self.resize not in RESIZE_METHODS:
            raise UsageError(f"--resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise UsageError(f"--image-format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if self.shard_size is not None and self.shard_size < 1:
            raise UsageError(f"--shard-size must be >= 1, got {self.shard_size}")


AUTO_SHARDS_TARGET, AUTO_SHARD_MAX = 64, 1000


def resolve_shard_size(n_train: int) -> int:
    """Auto shard size: about 64 train shards (so 8 ranks x 8 loader workers each get one and small sets still
    split), at most 1000 samples (~13 MB at 144 px JPEG q95) per shard."""
    return max(1, min(AUTO_SHARD_MAX, -(-n_train // AUTO_SHARDS_TARGET)))


def package_version() -> str:
    try:

        return version("facevae-dist")
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------- encode
def _crop_box(size: tuple[int, int], fit: str) -> tuple[float, float, float, float]:
    w, h = size
    if fit == "squash":
        return (0.0, 0.0, float(w), float(h))
    side = min(w, h)
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def _crop(a: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return a[y0:y1, x0:x1]


def _resized(record: Record, opts: ShardOptions) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, uint8 HxW mask 0..255) at the training size. The mask is the 0/1 face mask resized
    from its own frame (label maps may have another size than the image, e.g. 512x512 face-parsing output) by the
    same method, so its edges are soft like the paper's. Center-crop takes the same relative box from both."""
    size = (opts.image_size, opts.image_size)
    face = record.face_mask()
    box = _crop_box((record.image.shape[1], record.image.shape[0]), opts.fit)
    sx, sy = face.shape[1] / record.image.shape[1], face.shape[0] / record.image.shape[0]
    mask_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if opts.resize == "cv2":

        image = resize_linear(_crop(record.image, box), size)
        # the paper resizes the 0/1 mask as float (cv2 float path) and keeps it soft; stored as 0..255
        soft = resize_linear(_crop(face, mask_box).astype(np.float32), size)
        return image, np.rint(soft * 255).astype(np.uint8)
    image = Image.fromarray(record.image).resize(size, Image.BILINEAR, box=box)
    mask = Image.fromarray(face.astype(np.uint8) * 255).resize(size, Image.BILINEAR, box=mask_box)
    return np.asarray(image), np.asarray(mask)


def encode_record(record: Record, opts: ShardOptions) -> dict[str, bytes]:
    """Record -> shard fields: the image (JPEG at --jpeg-quality, or lossless PNG), the soft mask as a 1-channel
    PNG, the metadata JSON, and the label map (labels.png, NEAREST, the image's frame) where the record has one."""
    image, mask = _resized(record, opts)
    labels = encode_labels(record.label, record.image.shape, _crop_box(record.image.shape[1::-1], opts.fit),
                           opts.image_size)
    buf = io.BytesIO()
    if opts.image_format == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=opts.jpeg_quality)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    mbuf = io.BytesIO()
    Image.fromarray(mask, "L").save(mbuf, format="PNG")
    meta = {"source_id": record.source_id, "split": record.split, "orig_size": list(record.image.shape[1::-1])}
    meta.update(record.meta)
    fields = {opts.image_format: buf.getvalue(), "mask.png": mbuf.getvalue(),
              "json": json.dumps(meta, sort_keys=True).encode()}
    if labels is not None:
        fields[LABELS_MEMBER] = labels
    return fields


# ----------------------------------------------------------------------------------------------- build
def _shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def _build_one(task: tuple[Source, str, int, int, list[Item], ShardOptions, str]) -> dict:
    """Write one shard (tar, then stats as completion marker). Runs in worker processes."""
    source, split, k, first, items, opts, out = task
    samples, skipped = [], []
    for offset, item in enumerate(items):
        try:
            fields = encode_record(source.load(item), opts)
        except CorruptSample as exc:
            skipped.append([item.source_id, str(exc)])
            continue
        samples.append((f"{split}-{first + offset:08d}", fields))
    split_dir = Path(out) / split
    tar_path = split_dir / f"{_shard_name(k)}.tar"
    tmp = split_dir / f".{_shard_name(k)}.tar.tmp"
    write_tar(tmp, samples)
    os.replace(tmp, tar_path)
    stats = {"shard": f"{split}/{tar_path.name}", "split": split, "count": len(samples), "first_index": first,
             "items": len(items), "skipped": skipped, "sha256": sha256_file(tar_path),
             "bytes": tar_path.stat().st_size, "labelled": sum(LABELS_MEMBER in fields for _, fields in samples)}
    atomic_write_json(split_dir / f"{_shard_name(k)}.stats.json", stats)
    return stats


def _load_complete_stats(out: Path, split: str, k: int, n_items: int) -> dict | None:
    """A shard counts as done iff its stats JSON exists, matches the planned item count, and the tar has the size
    and sha256 it records: what `verify` checks first, so a re-run repairs what verify finds damaged (hashing is
    ~1 GB/s, far cheaper than re-encoding)."""
    stats_path = out / split / f"{_shard_name(k)}.stats.json"
    tar_path = out / split / f"{_shard_name(k)}.tar"
    try:
        stats = read_json(stats_path, fix="rebuilt")
        if (stats["items"] == n_items and tar_path.stat().st_size == stats["bytes"]
                and sha256_file(tar_path) == stats["sha256"]):
            return stats
    except (OSError, FaceVAEError, ValueError, KeyError, TypeError):
        pass  # damaged or missing: the shard is rebuilt
    return None


_SOURCE_FLAGS = {"root": "--root", "masks": "--masks", "n": "--n", "seed": "--seed",
                 "on_missing_mask": "--on-missing-mask", "split_ratios": "--split-ratios"}
_OPTION_FLAGS = {"image_size": "--image-size", "fit": "--fit", "resize": "--resize", "image_format": "--image-format",
                 "jpeg_quality": "--jpeg-quality", "shard_size": "--shard-size"}


def rebuild_command(shards_dir: str | os.PathLike) -> str | None:
    """The `facevae shards build` command that resumes (and so repairs) the build in `shards_dir`, from its
    build.json; None when that is missing or unreadable."""
    try:
        identity = read_json(Path(shards_dir) / "build.json", fix="unreadable")
        source, options = identity["source"], identity["options"]
        argv = ["facevae", "shards", "build", "--source", str(source["name"])]
        for key, flag in _SOURCE_FLAGS.items():
            if key in source and not (key == "masks" and source[key] is None):
                value = source[key]
                argv += [flag, ",".join(map(repr, value)) if key == "split_ratios" else str(value)]
        for key, flag in _OPTION_FLAGS.items():
            if options.get(key) is not None:
                argv += [flag, str(options[key])]
    except (OSError, FaceVAEError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return shlex.join([*argv, "--out", str(shards_dir)])


def _identity(source: Source, opts: ShardOptions) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source.describe(), "options": asdict(opts)}


# Every file a shard build (or the decoded-split cache beside it, data/cache.py) writes, relative to OUT. Atomic
# writes leave `.<name>.<random>.tmp` files when killed; those are ours too.
_OUR_TOP = re.compile(r"(build\.json|manifest\.json|sizes\.json|errors\.tsv)")
_OUR_IN_SPLIT = re.compile(r"shard-\d{6}\.(tar|stats\.json)")
_OUR_IN_CACHE = re.compile(r"(train|val|test)\.(images\.npy|masks\.npy|json|u8)")  # u8: the cache before .npy


def _is_ours(rel: PurePosixPath) -> bool:
    name = rel.name
    names = [name]
    if name.startswith(".") and name.endswith(".tmp"):  # `.<name>.tmp` or `.<name>.<random>.tmp`
        base = name[1:-4]
        names += [base, base.rsplit(".", 1)[0]]
    if len(rel.parts) == 1:
        pattern = _OUR_TOP
    elif len(rel.parts) == 2 and rel.parts[0] in SPLITS:
        pattern = _OUR_IN_SPLIT
    elif len(rel.parts) == 2 and rel.parts[0] == "cache":
        pattern = _OUR_IN_CACHE
    else:
        return False
    return any(pattern.fullmatch(n) for n in names)


def _scan_out_dir(out: Path) -> tuple[list[Path], list[str]]:
    """(our files, foreign entries as OUT-relative paths): what --overwrite may delete and what forbids it."""
    ours, foreign = [], []
    for entry in sorted(out.iterdir()):
        rel = PurePosixPath(entry.name)
        if entry.is_dir() and not entry.is_symlink() and entry.name in (*SPLITS, "cache"):
            for sub in sorted(entry.iterdir()):
                if sub.is_file() and not sub.is_symlink() and _is_ours(rel / sub.name):
                    ours.append(sub)
                else:
                    foreign.append(str(rel / sub.name) + ("/" if sub.is_dir() else ""))
        elif entry.is_file() and not entry.is_symlink() and _is_ours(rel):
            ours.append(entry)
        else:
            foreign.append(str(rel) + ("/" if entry.is_dir() else ""))
    return ours, foreign


def _foreign_note(foreign: list[str]) -> str:
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return ", ".join(foreign[:3]) + more


def _prepare_out_dir(out: Path, identity: dict, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    ours, foreign = _scan_out_dir(out) if out.exists() else ([], [])
    if overwrite and foreign:
        raise DataError(f"{out}: --overwrite removes only files a shard build wrote, and this folder also holds "
                        f"{_foreign_note(foreign)}; move those away or choose another --out")
    if overwrite:
        for path in ours:
            path.unlink()
        for name in (*SPLITS, "cache"):
            if (out / name).is_dir() and not any((out / name).iterdir()):
                (out / name).rmdir()
    elif ours or foreign:
        build_json = out / "build.json"
        if not build_json.exists():
            hint = ("pass --overwrite to replace that partial build" if not foreign else
                    f"it holds {_foreign_note(foreign)}: choose another --out")
            raise DataError(f"{out}: not empty and not a facevae shards directory (no build.json); {hint}")
        existing = read_json(build_json, fix=f"pass --overwrite to rebuild {out}")
        if not isinstance(existing, dict):
            raise DataError(f"{build_json}: not a build description; pass --overwrite to rebuild {out}")
        if existing != identity:
            old_source = existing.get("source") if isinstance(existing.get("source"), dict) else {}
            old_options = existing.get("options") if isinstance(existing.get("options"), dict) else {}
            diff = sorted(k for k in set(old_source) | set(identity["source"])
                          if old_source.get(k) != identity["source"].get(k))
            diff += sorted(f"options.{k}" for k in identity["options"] if old_options.get(k) != identity["options"][k])
            fix = ("pass --overwrite to replace it or choose another --out" if not foreign else
                   f"choose another --out (it also holds {_foreign_note(foreign)}, so --overwrite would refuse)")
            raise DataError(f"{out}: holds a different dataset (differs in {', '.join(diff) or 'format'}); {fix}")
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
        for stale in (out / split).glob(".*.tmp"):  # left by an interrupted run
            if _is_ours(PurePosixPath(split, stale.name)):
                stale.unlink()
    atomic_write_json(out / "build.json", identity)


def _older_complete_build(out: Path, identity: dict) -> dict | None:
    """The manifest of a finished build of this same dataset (source and options) in an older shard format, or None.
    Such shards stay readable as they are, so a re-run keeps them; an unfinished one is refused by _prepare_out_dir
    (resuming it would mix two formats in one dataset)."""
    try:
        existing = read_json(out / "build.json", fix="unreadable")
        if not (isinstance(existing, dict) and _is_int(existing.get("format_version"))
                and existing["format_version"] < FORMAT_VERSION
                and existing == {**identity, "format_version": existing["format_version"]}):
            return None
        manifest = read_manifest(out)
    except (OSError, FaceVAEError):
        return None
    return {**manifest, "format_version": manifest.get("format_version", existing["format_version"])}


def build_shards(source: Source, out: str | os.PathLike, opts: ShardOptions | None = None, *, workers: int = 1,
                 overwrite: bool = False) -> dict:
    """Build (or resume building) shards of `source` into `out`; returns the manifest dict.
    Output bytes depend only on (source, opts), never on `workers` or on interruptions."""

    opts = opts or ShardOptions()
    opts.validate()
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    plan = source.plan()  # layout errors surface here, before anything is written
    if opts.shard_size is None:
        opts = replace(opts, shard_size=resolve_shard_size(len(plan.items["train"])))
    identity = _identity(source, opts)
    older = None if overwrite else _older_complete_build(out, identity)
    if older is not None:
        info(f"{out}: kept as built by shard format {older['format_version']} (no {LABELS_MEMBER}: measures that need "
             "label maps say so); pass --overwrite to rebuild it in the current format")
        return older
    lock = _lock_out_dir(out)
    try:
        return _build_into(out, source, opts, plan, identity, workers, overwrite, lock)
    finally:
        os.close(lock)  # releases the flock


def _lock_out_dir(out: Path) -> int:
    """An open OUT holding an exclusive flock for the whole build: two builds into one folder would race on the
    same temp names, or both report success over one set of shards. The kernel drops the lock with the builder."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = flock_holder(fd)
        os.close(fd)
        raise DataError(f"another build is writing {out} (pid {holder or 'unknown'}); wait for it to finish, stop it, "
                        "or choose another --out") from None
    except OSError:  # a file system without flock (some network mounts): build unguarded, as before
        pass
    return fd


def _build_into(out: Path, source: Source, opts: ShardOptions, plan, identity: dict, workers: int, overwrite: bool,
                lock: int) -> dict:
    _prepare_out_dir(out, identity, overwrite)

    tasks, done = [], {}
    for split in SPLITS:
        items = plan.items[split]
        for k, first in enumerate(range(0, len(items), opts.shard_size)):
            chunk = items[first:first + opts.shard_size]
            stats = _load_complete_stats(out, split, k, len(chunk))
            if stats is not None:
                done[(split, k)] = stats
            else:
                tasks.append((source, split, k, first, chunk, opts, str(out)))
        # Remove shards beyond the planned count (cannot happen with an identical identity, but stay safe).
        n_shards = -(-len(items) // opts.shard_size)
        for path in (out / split).glob("shard-*"):
            if _OUR_IN_SPLIT.fullmatch(path.name) and int(path.name[6:12]) >= n_shards:
                path.unlink()

    total_items = sum(len(v) for v in plan.items.values())
    if done:
        info(f"resuming: {len(done)} complete shard(s) kept, {len(tasks)} to build")
    t0 = time.perf_counter()
    with make_progress() as progress:
        bar = progress.add_task(f"building {source.name} shards", total=total_items)
        progress.update(bar, completed=sum(s["items"] for s in done.values()))
        if workers == 1 or len(tasks) <= 1:
            results = map(_build_one, tasks)
            pool = None
        else:
            # fork: workers inherit the imported modules (spawn would re-import torch/numpy per worker).
            ctx = get_context("fork" if os.name == "posix" else "spawn")
            # the workers close their copy of the lock: an orphaned worker must not keep OUT locked
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=os.close, initargs=(lock,))
            results = pool.map(_build_one, tasks, chunksize=1)
        try:
            for stats in results:
                done[(stats["split"], int(Path(stats["shard"]).stem[6:]))] = stats
                progress.update(bar, advance=stats["items"])
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    elapsed = time.perf_counter() - t0

    manifest = _write_manifest(out, source, opts, plan, done)
    built = sum(len(t[4]) for t in tasks)
    per_split = ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in SPLITS)
    info(f"{out}: {manifest['total']} samples in {manifest['num_shards']} shards "
         f"({per_split}), {manifest['skipped']} skipped"
         + (f"; built {built} items in {elapsed:.1f}s ({built / max(elapsed, 1e-9):.0f} items/s)" if built else ""))
    return manifest


def _write_manifest(out: Path, source: Source, opts: ShardOptions, plan, done: dict) -> dict:
    splits, errors = {}, []
    for split, source_id, reason in plan.skipped:
        errors.append((split, source_id, reason))
    for split in SPLITS:
        shards = [done[key] for key in sorted(k for k in done if k[0] == split)]
        for s in shards:
            errors.extend((split, sid, reason) for sid, reason in s["skipped"])
        splits[split] = {
            "count": sum(s["count"] for s in shards),
            "skipped": sum(len(s["skipped"]) for s in shards) + sum(1 for e in plan.skipped if e[0] == split),
            "shards": [{"path": s["shard"], "count": s["count"], "sha256": s["sha256"], "bytes": s["bytes"]}
                       for s in shards],
        }
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": package_version(),
        "source": source.describe(), "options": asdict(opts),
        "image_size": opts.image_size, "image_ext": opts.image_format,
        "image_format": {"jpg": f"JPEG quality {opts.jpeg_quality}", "png": "PNG (lossless)"}[opts.image_format],
        "resize": {"method": opts.resize, "fit": opts.fit, "description": RESIZE_DESCRIPTIONS[opts.resize]},
        "labels": manifest_block(sum(s.get("labelled", 0) for s in done.values())),
        "mask": {"field": "mask.png", "excluded_labels": list(FACE_EXCLUDED_LABELS),
                 "encoding": "uint8 1-channel: the 0/1 face mask resized like the image (soft edges, never "
                             "re-binarised), x255, like the paper"},
        "splits": splits,
        "total": sum(v["count"] for v in splits.values()),
        "skipped": len(errors),
        "num_shards": sum(len(v["shards"]) for v in splits.values()),
    }
    atomic_write_text(out / "errors.tsv", "".join(f"{s}\t{sid}\t{r}\n" for s, sid, r in errors))
    atomic_write_json(out / "sizes.json", {s: splits[s]["count"] for s in SPLITS})
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def read_manifest(shards_dir: str | os.PathLike, *, check_counts: bool = True) -> dict:
    """manifest.json of a shards directory, checked: every field its readers use has the right type, shard paths
    stay inside the folder, and (check_counts) each shard's count agrees with the stats file the build wrote beside
    it. A malformed manifest is one DataError line naming the field, never a KeyError/TypeError later on."""
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        hint = (" (the build did not finish: re-run the same `facevae shards build` command to resume)"
                if (Path(shards_dir) / "build.json").exists() else " (build shards with `facevae shards build`)")
        raise DataError(f"{path}: not found{hint}")
    manifest = read_json(path, fix=_rebuild_fix(path.parent))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a facevae shards manifest")
    _validate_manifest(manifest, path)
    if check_counts:
        _check_counts_against_stats(Path(shards_dir), manifest, path)
    return manifest


def shards_identity(shards_dir: str | os.PathLike) -> dict:
    """Which data set a run trains on: the folder (resolved) and a fingerprint of its content (the sha256 of every
    shard of every split, as the manifest records them, with the image size). A checkpoint records it so a resume
    can tell the same shards from other shards, rebuilt shards at the same path and the same shards moved."""
    manifest = read_manifest(shards_dir, check_counts=False)
    content = {"image_size": manifest["image_size"],
               "splits": {split: [s["sha256"] for s in info["shards"]] for split, info in manifest["splits"].items()}}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return {"path": str(Path(shards_dir).resolve()), "fingerprint": digest}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_fix(shards_dir: Path) -> str:
    cmd = rebuild_command(shards_dir)
    return f"re-run `{cmd}` to rewrite it" if cmd else "rebuild it with `facevae shards build`"


def _manifest_error(path: Path, field: str, problem: str) -> DataError:
    return DataError(f"{path}: {field}: {problem} (damaged or edited; {_rebuild_fix(path.parent)})")


def _expect(path: Path, field: str, value, ok: bool, what: str) -> None:
    if not ok:
        shown = json.dumps(value)[:40]
        raise _manifest_error(path, field, f"expected {what}, got {type(value).__name__} {shown}")


def _validate_manifest(m: dict, path: Path) -> None:
    _expect(path, "image_size", m.get("image_size"), _is_int(m.get("image_size")) and m["image_size"] >= 1,
            "a positive integer")
    _expect(path, "image_ext", m.get("image_ext"), m.get("image_ext") in IMAGE_FORMATS, f"one of {IMAGE_FORMATS}")
    for key in ("source", "options"):
        _expect(path, key, m.get(key), isinstance(m.get(key), dict), "an object")
    _expect(path, "skipped", m.get("skipped"), _is_int(m.get("skipped")), "an integer")
    _expect(path, "package_version", m.get("package_version"), isinstance(m.get("package_version"), str), "a string")
    splits = m.get("splits")
    _expect(path, "splits", splits, isinstance(splits, dict) and bool(splits), "an object of splits")
    for split, split_info in splits.items():
        field = f"splits.{split}"
        _expect(path, field, split_info, isinstance(split_info, dict), "an object with count and shards")
        _expect(path, f"{field}.count", split_info.get("count"), _is_int(split_info.get("count")) and split_info["count"] >= 0,
                "a count >= 0")
        shards = split_info.get("shards")
        _expect(path, f"{field}.shards", shards, isinstance(shards, list), "a list of shards")
        for i, shard in enumerate(shards):
            sf = f"{field}.shards[{i}]"
            _expect(path, sf, shard, isinstance(shard, dict), "an object with path, count, sha256, bytes")
            for key, ok, what in (("path", isinstance(shard.get("path"), str), "a string"),
                                  ("count", _is_int(shard.get("count")) and shard["count"] >= 0, "a count >= 0"),
                                  ("sha256", isinstance(shard.get("sha256"), str), "a string"),
                                  ("bytes", _is_int(shard.get("bytes")) and shard["bytes"] >= 0, "a size >= 0")):
                _expect(path, f"{sf}.{key}", shard.get(key), ok, what)
            rel = PurePosixPath(shard["path"])
            if rel.is_absolute() or "\\" in shard["path"] or any(p in ("..", ".") for p in rel.parts) \
                    or not rel.parts:
                raise _manifest_error(path, f"{sf}.path", f"{shard['path']!r} is not a plain relative path inside "
                                      "the shards folder (absolute paths and '..' are refused)")
        total = sum(s["count"] for s in shards)
        if total != split_info["count"]:
            raise _manifest_error(path, f"{field}.count", f"says {split_info['count']} but its shards hold {total}")


def _check_counts_against_stats(shards_dir: Path, manifest: dict, path: Path) -> None:
    """Each shard's manifest count against the stats file written with the tar (cheap: no tar is read). A lower
    manifest count would otherwise silently train on part of a shard."""
    for split_info in manifest["splits"].values():
        for shard in split_info["shards"]:
            stats_path = shards_dir / (shard["path"][:-4] + ".stats.json" if shard["path"].endswith(".tar")
                                       else shard["path"] + ".stats.json")
            try:
                stats = read_json(stats_path, fix="verify reads the tar itself")
                count = stats["count"] if stats.get("sha256") == shard["sha256"] else None
            except (OSError, FaceVAEError, ValueError, KeyError, TypeError, AttributeError):
                continue  # no stats to compare with (older layout); verify reads the tar itself
            if count is not None and count != shard["count"]:
                raise _manifest_error(path, shard["path"], f"manifest.json says {shard['count']} samples, the shard "
                                      f"holds {count} (per {stats_path.name})")


# ----------------------------------------------------------------------------------------------- verify
def decode_sample(fields: dict[str, bytes], image_ext: str, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Shard fields -> (uint8 HxWx3 image, uint8 HxW mask, metadata). Raises on anything malformed, on a member of
    another size than `size` (checked from its header, before decoding) and on a mask the trainer would have to
    convert: 16-bit (read by value) or 0/1-valued (read as 0/255); see docs/data.md."""
    with Image.open(io.BytesIO(fields[image_ext])) as im:
        if im.size != (size, size):
            raise ValueError(f"{image_ext} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
        image = np.asarray(im.convert("RGB"))
    with Image.open(io.BytesIO(fields["mask.png"])) as im:
        if im.size != (size, size):
            raise ValueError(f"mask.png is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
        if im.mode != "L":
            raise ValueError(f"mask.png mode {im.mode}, expected L (8-bit; training reads a 16-bit mask by value)")
        mask = np.asarray(im)
    if mask.max(initial=0) == 1:
        raise ValueError("mask.png holds only 0 and 1, not the face mask x255 (training reads it as 0/255)")
    meta = parse_json(fields["json"], "json", fix="damaged sample metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"json is a {type(meta).__name__}, not an object")
    return image, mask, meta


def _sample_problems(shard: str, split: str, key: str, fields: dict, f, limits: dict[str, int], ext: str,
                     size: int) -> list[str]:
    """What is wrong with one sample: its key, members the readers skip (unknown) or refuse (oversized), and
    anything decode_sample refuses."""
    problems = []
    if not key.startswith(f"{split}-") or not key[len(split) + 1:].isdigit():
        problems.append(f"{shard}: unexpected key {key!r}")
    unknown = [f"{key}.{name} ({size_:,} bytes)" for name, (_, size_) in fields.items() if name not in limits]
    if unknown:
        problems.append(f"{shard}: unknown member(s) {', '.join(unknown)}: readers skip them unread")
    try:
        data = read_fields(f, fields, limits)
        image, mask, meta = decode_sample(data, ext, size)
        if meta.get("split") != split:
            raise ValueError(f"json split {meta.get('split')!r}")
        if LABELS_MEMBER in data:
            decode_labels(data[LABELS_MEMBER], size)
    except Exception as exc:
        problems.append(f"{shard}: sample {key}: {type(exc).__name__}: {exc}")
    return problems


def verify_shards(shards_dir: str | os.PathLike) -> dict:
    """Re-read every shard: sha256, counts, keys, and decode every sample. Returns a report dict with "ok"."""

    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir, check_counts=False)  # counts are checked below, by reading every tar
    problems: list[str] = []
    size, ext = manifest["image_size"], manifest["image_ext"]
    limits = {**member_limits(ext, size), LABELS_MEMBER: labels_limit(size)}  # training reads no labels.png
    counts = {}
    total = sum(v["count"] for v in manifest["splits"].values())
    with make_progress() as progress:
        bar = progress.add_task("verifying shards", total=total)
        for split, info in manifest["splits"].items():
            listed = {s["path"] for s in info["shards"]}
            for path in sorted((shards_dir / split).glob("*.tar")):
                if f"{split}/{path.name}" not in listed:
                    problems.append(f"{split}/{path.name}: tar not listed in manifest.json")
            seen = 0
            for shard in info["shards"]:
                path = shards_dir / shard["path"]
                if not path.is_file():
                    problems.append(f"{shard['path']}: missing")
                    continue
                if sha256_file(path) != shard["sha256"]:
                    problems.append(f"{shard['path']}: sha256 mismatch (file changed or corrupted)")
                n = 0
                try:
                    index = index_tar(path)
                    with open(path, "rb") as f:
                        for key, fields in index:
                            n += 1
                            problems += _sample_problems(shard["path"], split, key, fields, f, limits, ext, size)
                            progress.advance(bar)
                except Exception as exc:  # truncated or garbled tar
                    problems.append(f"{shard['path']}: unreadable tar ({type(exc).__name__}: {exc})")
                if n != shard["count"]:
                    problems.append(f"{shard['path']}: {n} samples, manifest says {shard['count']}")
                seen += n
            counts[split] = seen
            if seen != info["count"]:
                problems.append(f"{split}: {seen} samples read, manifest says {info['count']}")
    sizes_path = shards_dir / "sizes.json"
    try:
        sizes = read_json(sizes_path, fix="rewritten by a rebuild")
        if sizes != {s: v["count"] for s, v in manifest["splits"].items()}:
            problems.append("sizes.json disagrees with manifest.json")
    except (OSError, FaceVAEError) as exc:
        problems.append(f"sizes.json missing or unreadable ({exc})")
    return {"ok": not problems, "problems": problems, "counts": counts,
            "shards": sum(len(v["shards"]) for v in manifest["splits"].values()),
            "rebuild": rebuild_command(shards_dir) if problems else None}


# ----------------------------------------------------------------------------------------------- info
def shards_info(shards_dir: str | os.PathLike, grid: str | os.PathLike | None = None, n_grid: int = 32) -> dict:
    """Summary of a shards dir; optionally a contact sheet PNG of samples (image | image with mask overlaid)."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir, check_counts=False)
    summary = {
        "dir": str(shards_dir), "source": manifest["source"], "options": manifest["options"],
        "counts": {s: v["count"] for s, v in manifest["splits"].items()},
        "shards": {s: len(v["shards"]) for s, v in manifest["splits"].items()},
        "skipped": manifest["skipped"], "bytes": sum(sh["bytes"] for v in manifest["splits"].values()
                                                     for sh in v["shards"]),
        "package_version": manifest["package_version"],
    }
    if grid is not None:
        tiles, unreadable = _grid_tiles(shards_dir, manifest, n_grid)
        if unreadable:
            summary["grid_skipped"] = unreadable
            warn(f"{shards_dir}: {len(unreadable)} unreadable sample(s) left off the contact sheet ({unreadable[0]}"
                 f"{', ...' if len(unreadable) > 1 else ''}); `facevae shards verify {shards_dir}` lists them")
        if tiles:
            write_contact_sheet(tiles, Path(grid))
            summary["grid"] = str(grid)
    return summary


def _grid_tiles(shards_dir: Path, manifest: dict, n_grid: int) -> tuple[list[np.ndarray], list[str]]:
    """Up to n_grid contact-sheet tiles from the first samples (test, val, then train), and the unreadable samples
    met on the way ("key: reason")."""
    ext, size = manifest["image_ext"], manifest["image_size"]
    limits = member_limits(ext, size)
    tiles, unreadable = [], []
    for split in ("test", "val", "train"):
        for shard in manifest["splits"].get(split, {}).get("shards", []):
            path = shards_dir / shard["path"]
            with open(path, "rb") as f:
                for key, fields in index_tar(path):
                    if len(tiles) >= n_grid:
                        return tiles, unreadable
                    try:
                        image, mask, _ = decode_sample(read_fields(f, fields, limits), ext, size)
                    except Exception as exc:  # noqa: BLE001 - reported, not drawn
                        unreadable.append(f"{key}: {type(exc).__name__}: {exc}")
                        continue
                    tiles.append(_overlay_tile(image, mask))
    return tiles, unreadable


def _overlay_tile(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Image beside the same image with the background dimmed and tinted, and the mask edge in green."""
    m = mask.astype(np.float32)[..., None] / 255
    tint = np.array([40, 40, 90], np.float32)
    over = image.astype(np.float32) * (0.35 + 0.65 * m) + tint * (1 - m) * 0.5
    edge = (mask > 64) & (mask < 192)
    over[edge] = (60, 255, 60)
    return np.concatenate([image, np.clip(over, 0, 255).astype(np.uint8)], axis=1)


def write_contact_sheet(tiles: list[np.ndarray], path: Path, cols: int = 8) -> None:
    h, w, _ = tiles[0].shape
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")

    atomic_write_bytes(path, buf.getvalue())
