"""A split decoded once into uint8 arrays, cached beside its shards, so later runs skip JPEG/PNG decoding.

Files (per split, written by the first run that needs them):
  <shards>/cache/<split>.u8    raw uint8, no header and nothing executable: images [N,H,W,3] then masks [N,H,W]
  <shards>/cache/<split>.json  format, shapes/offsets, the file's sha256 and size, the shards it came from (path,
                               count, manifest sha256, on-disk size and mtime) and the corrupt samples found
Row order = the manifest's shard order, samples in tar order: row = shard_offsets[shard] + sample, so any plan the
streaming loader makes (shard, sample) maps to rows (batches.py draws the same batches from either).
Valid while the manifest's shard list and every tar's size and mtime match the JSON and the .u8 has the recorded
size and sha256 (hashed at every open: reading the file is needed anyway); otherwise it is rebuilt: in parallel
processes (one shard per task), written to a temp file and renamed, under a lock (flock on the cache folder) so
concurrent ranks build it once.
Corrupt samples (undecodable image or mask) are kept as zero rows and listed with the reason, like the loader's
report; batches.py replaces them exactly as the loader does. A damaged shard (truncated, missing, short) stops the
build with a one-line DataError naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from facevae_dist.data.loader import decode_into
from facevae_dist.data.shards import read_manifest
from facevae_dist.data.tario import index_tar, read_fields
from facevae_dist.errors import DataError, UsageError
from facevae_dist.fileio import atomic_write_json
from facevae_dist.progress import info, make_progress

FORMAT = "facevae-u8-cache"
FORMAT_VERSION = 1
HASH_CHUNK = 64 << 20


def cache_paths(shards_dir, split: str) -> tuple[Path, Path]:
    folder = Path(shards_dir) / "cache"
    return folder / f"{split}.u8", folder / f"{split}.json"


def _split_shards(shards_dir, split: str) -> tuple[dict, list[dict]]:
    manifest = read_manifest(shards_dir)
    if split not in manifest.get("splits", {}):
        raise UsageError(f"split {split!r} not in {shards_dir} (have {', '.join(manifest.get('splits', {}))})")
    return manifest, [s for s in manifest["splits"][split]["shards"] if int(s["count"]) > 0]


def _fingerprint(shards_dir, shards: list[dict]) -> list[dict]:
    out = []
    for s in shards:
        path = Path(shards_dir) / s["path"]
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                            "run `facevae shards verify` and rebuild it")
        out.append({"path": s["path"], "count": int(s["count"]), "sha256": s.get("sha256"), "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns})
    return out


def cache_fits_on_disk(shards_dir, split: str) -> bool:
    """A valid-looking cache file is there already, or the disk has room to build it."""
    data_path, meta_path = cache_paths(shards_dir, split)
    need = split_nbytes(shards_dir, split)
    if data_path.exists() and meta_path.exists() and data_path.stat().st_size == need:
        return True
    folder = data_path.parent if data_path.parent.exists() else data_path.parent.parent
    return shutil.disk_usage(folder).free >= need


def split_nbytes(shards_dir, split: str) -> int:
    """Bytes the decoded split takes (what a resident placement must hold)."""
    manifest, shards = _split_shards(shards_dir, split)
    size = int(manifest["image_size"])
    return sum(int(s["count"]) for s in shards) * size * size * 4


@dataclass
class SplitCache:
    """A decoded split. images: uint8 [N,H,W,3]; masks: uint8 [N,H,W] (numpy memmaps; never write to them)."""

    images: np.ndarray
    masks: np.ndarray
    shard_offsets: np.ndarray  # row of each shard's first sample (manifest order, empty shards left out)
    corrupt_rows: np.ndarray  # sorted rows whose sample could not be decoded (zeros in the file)
    corrupt: list[str]  # "key (shard: reason)" per corrupt row, same order
    meta: dict

    def __len__(self) -> int:
        return len(self.images)


def _sha256(path: Path, nbytes: int, what: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, make_progress(transient=True) as progress:
        task = progress.add_task(what, total=max(1, nbytes >> 20))
        while block := f.read(HASH_CHUNK):
            h.update(block)
            progress.advance(task, len(block) >> 20)
    return h.hexdigest()


def _valid_meta(meta_path: Path, data_path: Path, fingerprint: list[dict], image_size: int, image_ext: str) -> dict | None:
    import json

    try:
        meta = json.loads(meta_path.read_text())
        st = data_path.stat()
    except (OSError, ValueError):
        return None
    if (meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION
            or meta.get("shards") != fingerprint or meta.get("image_size") != image_size
            or meta.get("image_ext") != image_ext or meta.get("bytes") != st.st_size):
        return None
    return meta


def _decode_shard(job: tuple) -> list[tuple[int, str]]:
    """Worker: decode one shard into its rows of the temp file; returns [(row, "key (shard: reason)")] of corrupt
    samples. A damaged shard raises DataError naming it."""
    path, image_ext, count, row0, data_path, n, size = job
    images = np.memmap(data_path, np.uint8, "r+", 0, (n, size, size, 3))
    masks = np.memmap(data_path, np.uint8, "r+", n * size * size * 3, (n, size, size))
    try:
        index = index_tar(path)
    except Exception as exc:
        raise DataError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                        "run `facevae shards verify` and rebuild it")
    if len(index) < count:
        raise DataError(f"{path}: has {len(index)} samples, manifest.json expects {count} (truncated or replaced "
                        "shard); run `facevae shards verify` and rebuild it")
    corrupt = []
    with open(path, "rb") as f:
        for i, (key, fields) in enumerate(index[:count]):
            try:
                data = read_fields(f, fields)
            except (OSError, EOFError) as exc:
                raise DataError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); "
                                "run `facevae shards verify` and rebuild it")
            try:
                decode_into(data, image_ext, images[row0 + i], masks[row0 + i])
            except Exception as exc:  # counted and reported, like the loader
                images[row0 + i] = 0
                masks[row0 + i] = 0
                corrupt.append((row0 + i, f"{key} ({Path(path).name}: {type(exc).__name__}: {exc})"))
    images.flush()
    masks.flush()
    return corrupt


def _build(shards_dir, split: str, manifest: dict, shards: list[dict], fingerprint: list[dict], data_path: Path,
           meta_path: Path, processes: int) -> None:
    size, image_ext = int(manifest["image_size"]), manifest["image_ext"]
    counts = [int(s["count"]) for s in shards]
    n = sum(counts)
    nbytes = n * size * size * 4
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    tmp = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    info(f"decoding {split} split of {shards_dir} once ({n} samples, {nbytes / 2**30:.2f} GiB) into {data_path} "
         f"with {processes} process(es)")
    free = shutil.disk_usage(data_path.parent).free
    if free < nbytes:
        raise UsageError(f"{data_path.parent}: the decoded {split} split needs {nbytes / 2**30:.2f} GiB, "
                         f"{free / 2**30:.2f} GiB free; free some space or use --set data.placement=stream")
    try:
        with open(tmp, "wb") as f:
            # reserve the blocks now: a disk that fills later would kill the decoding processes with SIGBUS
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:  # pragma: no cover
                f.truncate(nbytes)
        jobs = [(str(Path(shards_dir) / s["path"]), image_ext, c, int(o), str(tmp), n, size)
                for s, c, o in zip(shards, counts, offsets)]
        corrupt: list[tuple[int, str]] = []
        with make_progress() as progress:
            task = progress.add_task(f"cache {split}", total=len(jobs))
            if processes <= 1:
                for job in jobs:
                    corrupt += _decode_shard(job)
                    progress.advance(task)
            else:
                # fork: no re-import; workers only decode and write their rows. A damaged shard cancels the rest.
                with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
                    futures = {pool.submit(_decode_shard, job) for job in jobs}
                    while futures:
                        done, futures = wait(futures, return_when=FIRST_EXCEPTION)
                        for fut in done:
                            if fut.exception() is not None:
                                for other in futures:
                                    other.cancel()
                                raise fut.exception()
                            corrupt += fut.result()
                            progress.advance(task, 1)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        corrupt.sort()
        digest = _sha256(tmp, nbytes, f"hash {split} cache")
        os.replace(tmp, data_path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "split": split, "count": n, "image_size": size,
            "image_ext": image_ext, "bytes": nbytes, "sha256": digest,
            "layout": {"images": {"offset": 0, "shape": [n, size, size, 3]},
                       "masks": {"offset": n * size * size * 3, "shape": [n, size, size]}},
            "shard_offsets": offsets.tolist(), "shards": fingerprint,
            "corrupt_rows": [r for r, _ in corrupt], "corrupt": [m for _, m in corrupt]}
    atomic_write_json(meta_path, meta)
    if corrupt:
        info(f"{len(corrupt)} corrupt sample(s) in {split} (listed in {meta_path}); they are replaced in batches "
             "and counted, as the streaming loader does")


_OPENED: dict[tuple[str, str], tuple[list[dict], SplitCache]] = {}  # verified this process: no re-hash per call


def open_cache(shards_dir, split: str, *, processes: int | None = None, build: bool = True) -> SplitCache:
    """The decoded split, built first if missing or stale (build=False: DataError instead). Concurrent callers
    (ranks) build it once: the others wait on the lock and then open it."""
    manifest, shards = _split_shards(shards_dir, split)
    memo_key = (str(Path(shards_dir).resolve()), split)
    if memo_key in _OPENED and _OPENED[memo_key][0] == _fingerprint(shards_dir, shards):
        return _OPENED[memo_key][1]
    size, image_ext = int(manifest["image_size"]), manifest["image_ext"]
    data_path, meta_path = cache_paths(shards_dir, split)
    try:
        data_path.parent.mkdir(exist_ok=True)
        lock = os.open(data_path.parent, os.O_RDONLY)  # the folder itself is the lock: no extra file to leave behind
    except OSError as exc:
        raise UsageError(f"{data_path.parent}: cannot write the decoded-split cache ({exc.strerror}); make the shards "
                         "folder writable once, or use --set data.placement=stream")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fingerprint = _fingerprint(shards_dir, shards)
        meta = _valid_meta(meta_path, data_path, fingerprint, size, image_ext)
        if meta is not None and _sha256(data_path, meta["bytes"], f"check {split} cache") != meta["sha256"]:
            info(f"{data_path}: sha256 differs from {meta_path.name} (damaged); rebuilding it")
            meta = None
        if meta is None:
            if not build:
                raise DataError(f"{data_path}: missing or stale decoded-split cache")
            procs = processes or max(1, min(len(shards), len(os.sched_getaffinity(0))))
            try:
                _build(shards_dir, split, manifest, shards, fingerprint, data_path, meta_path, procs)
            except PermissionError as exc:
                raise UsageError(f"{data_path.parent}: cannot write the decoded-split cache ({exc.strerror}); make "
                                 "the shards folder writable once, or use --set data.placement=stream")
            meta = _valid_meta(meta_path, data_path, fingerprint, size, image_ext)
            if meta is None:  # a shard changed while we decoded it
                raise DataError(f"{shards_dir}/{split}: shards changed while the cache was built; run again")
        n = int(meta["count"])
        # copy-on-write mappings: writable for torch.from_numpy, yet never written, so ranks share the page cache
        images = np.memmap(data_path, np.uint8, "c", 0, (n, size, size, 3))
        masks = np.memmap(data_path, np.uint8, "c", n * size * size * 3, (n, size, size))
    finally:
        os.close(lock)  # releases the flock
    cache = SplitCache(images=images, masks=masks, shard_offsets=np.asarray(meta["shard_offsets"], np.int64),
                       corrupt_rows=np.asarray(meta["corrupt_rows"], np.int64), corrupt=list(meta["corrupt"]),
                       meta=meta)
    _OPENED[memo_key] = (meta["shards"], cache)
    return cache
