"""A split decoded once into uint8 arrays, cached beside its shards, so later runs skip JPEG/PNG decoding.

Files (per split, written by the first run that needs them):
  <shards>/cache/<split>.images.npy  uint8 [N,H,W,3]   plain .npy files (numpy.lib.format): the header states dtype
  <shards>/cache/<split>.masks.npy   uint8 [N,H,W]     and shape, read with allow_pickle=False, memory-mapped
  <shards>/cache/<split>.json        the shards it came from (path, count, manifest sha256, size, mtime), each
                                     .npy's sha256 and the corrupt samples found (row and reason)
Row order = the manifest's shard order, samples in tar order: row = (samples of the shards before) + sample, so any
plan the streaming loader makes (shard, sample) maps to rows (batches.py draws the same batches from either). The
row offsets are derived from the manifest, never read from the JSON.
Valid while the manifest's shard list and every tar's size and mtime match the JSON, each .npy's header has the
shape the manifest implies and the file that size, the corrupt rows are in range, and each file's sha256 matches
(hashed at the first open in a process: reading the file is needed anyway); anything else (a stale, damaged or
edited cache) is rebuilt: in parallel processes (one shard per task) into temp files that are renamed, under a lock
(flock on the cache folder) so concurrent ranks build it once. usable_for_placement() is the one place that says
whether a run may count on the cache (fits in memory, fresh or buildable here: folder writable, disk room).
Decoding processes die with the builder (PR_SET_PDEATHSIG) and do not keep the lock, a run waiting for another's
build names its pid and gives up after CACHE_LOCK_WAIT_S, and temp files left by a killed builder are removed by
the next one (under the lock, any temp file is a dead builder's).
Corrupt samples (undecodable image or mask) are kept as zero rows and listed with the reason, like the loader's
report; batches.py replaces them exactly as the loader does. A damaged shard (truncated, missing, short) stops the
build with a one-line DataError naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np

from facevae_dist.data.loader import (
    corrupt_item,
    decode_into,
    die_with_parent,
    short_shard,
    unreadable_shard,
    warn_binary_masks,
)
from facevae_dist.data.shards import read_manifest
from facevae_dist.data.tario import OversizedMember, index_tar, member_limits, read_fields
from facevae_dist.errors import DataError, FaceVAEError, RunError, Stopped, UsageError
from facevae_dist.fileio import atomic_write_json, flock_holder, read_json
from facevae_dist.progress import info, make_progress

FORMAT = "facevae-npy-cache"
FORMAT_VERSION = 2
HASH_CHUNK = 64 << 20
CACHE_LOCK_WAIT_S = 3600.0  # a run waiting for another process's build gives up after this long
_LOCK_POLL_S = 0.5


class CachePaths(NamedTuple):
    images: Path
    masks: Path
    meta: Path


def cache_paths(shards_dir, split: str) -> CachePaths:
    folder = Path(shards_dir) / "cache"
    return CachePaths(folder / f"{split}.images.npy", folder / f"{split}.masks.npy", folder / f"{split}.json")


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
            raise unreadable_shard(path, exc)
        out.append({"path": s["path"], "count": int(s["count"]), "sha256": s.get("sha256"), "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns})
    return out


def _shapes(manifest: dict, shards: list[dict]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n, size = sum(int(s["count"]) for s in shards), int(manifest["image_size"])
    return (n, size, size, 3), (n, size, size)


def split_nbytes(shards_dir, split: str) -> int:
    """Bytes the decoded split takes (what a resident placement must hold)."""
    manifest, shards = _split_shards(shards_dir, split)
    return sum(int(np.prod(shape)) for shape in _shapes(manifest, shards))


def _npy_matches(path: Path, shape: tuple[int, ...]) -> bool:
    """The file is a .npy of uint8 `shape` in C order and exactly as long as its header says."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            got_shape, fortran, dtype = read_header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return False
    return (tuple(got_shape) == shape and not fortran and dtype == np.uint8
            and size == offset + int(np.prod(shape)))


def _fresh_meta(paths: CachePaths, manifest: dict, shards: list[dict], fingerprint: list[dict]) -> dict | None:
    """The cache's JSON when the cache matches the shards and its files match their headers; None otherwise
    (missing, stale, edited, truncated). The sha256 is checked by open_cache, not here."""
    try:
        meta = read_json(paths.meta, fix="the cache is rebuilt")
    except (OSError, FaceVAEError):
        return None
    image_shape, mask_shape = _shapes(manifest, shards)
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("format_version") == FORMAT_VERSION
            and meta.get("shards") == fingerprint and meta.get("image_ext") == manifest["image_ext"]
            and meta.get("count") == image_shape[0]
            and _npy_matches(paths.images, image_shape) and _npy_matches(paths.masks, mask_shape)):
        return None
    corrupt, sha = meta.get("corrupt"), meta.get("sha256")
    if not (isinstance(sha, dict) and all(isinstance(sha.get(k), str) for k in ("images", "masks"))
            and isinstance(corrupt, list)
            and all(isinstance(c, list) and len(c) == 2 and type(c[0]) is int and isinstance(c[1], str)
                    for c in corrupt)):
        return None
    rows = [c[0] for c in corrupt]
    if rows != sorted(set(rows)) or any(not 0 <= r < image_shape[0] for r in rows):
        return None
    return meta


def _writable(folder: Path) -> bool:
    return os.access(folder if folder.exists() else folder.parent, os.W_OK)


def usable_for_placement(shards_dir, split: str, memory: int) -> str:
    """'' when a resident placement can count on the decoded split: it fits in `memory` bytes, and a fresh cache is
    there or can be built here (folder writable, room on the disk); otherwise why not, as a phrase."""
    manifest, shards = _split_shards(shards_dir, split)
    paths = cache_paths(shards_dir, split)
    need = split_nbytes(shards_dir, split)
    if need > memory:
        return f"the decoded split ({need / 2**30:.2f} GiB) does not fit in {memory / 2**30:.2f} GiB"
    if _fresh_meta(paths, manifest, shards, _fingerprint(shards_dir, shards)) is not None:
        return ""
    folder = paths.meta.parent
    if not _writable(folder):
        return f"no fresh cache in {folder} and it is not writable"
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < need:
        return f"{folder}: the decoded split needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
    return ""


@dataclass
class SplitCache:
    """A decoded split. images: uint8 [N,H,W,3]; masks: uint8 [N,H,W] (copy-on-write memory maps)."""

    images: np.ndarray
    masks: np.ndarray
    shard_offsets: np.ndarray  # row of each shard's first sample (manifest order, empty shards left out)
    corrupt_rows: np.ndarray  # sorted rows whose sample could not be decoded (zeros in the file)
    corrupt: list[str]  # "key (shard: reason)" per corrupt row, same order
    meta: dict

    def __len__(self) -> int:
        return len(self.images)


def _sha256(path: Path, what: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, make_progress(transient=True) as progress:
        task = progress.add_task(what, total=max(1, os.fstat(f.fileno()).st_size >> 20))
        while block := f.read(HASH_CHUNK):
            h.update(block)
            progress.advance(task, len(block) >> 20)
    return h.hexdigest()


def _init_decoder(parent_pid: int, lock_fd: int) -> None:
    """Decoding process set-up: die with the builder, and let go of the forked copy of its lock descriptor (the
    flock belongs to the open file, so a copy kept by an orphan would hold the lock for ever). Preemption signals
    sent to the whole process group are the builder's to handle: it stops the decoders itself."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)
    with contextlib.suppress(OSError):
        os.close(lock_fd)


def _decode_shard(job: tuple) -> tuple[list[tuple[int, str]], int]:
    """Decode one shard into its rows of the temp files; returns ([(row, "key (shard: reason)")] of corrupt samples,
    the number of 0/1 masks read as 0/255). A damaged shard raises DataError naming it."""
    path, image_ext, count, row0, images_path, masks_path = job
    images = np.load(images_path, mmap_mode="r+", allow_pickle=False)
    masks = np.load(masks_path, mmap_mode="r+", allow_pickle=False)
    limits = member_limits(image_ext, int(images.shape[1]))
    try:
        index = index_tar(path)
    except Exception as exc:
        raise unreadable_shard(path, exc)
    if len(index) < count:
        raise short_shard(path, len(index), count)
    corrupt, binary = [], 0
    with open(path, "rb") as f:
        for i, (key, fields) in enumerate(index[:count]):
            try:
                data = read_fields(f, fields, limits)
            except (OSError, EOFError) as exc:
                raise unreadable_shard(path, exc)
            except OversizedMember as exc:  # a corrupt sample, like an undecodable one
                data = exc
            try:
                if isinstance(data, Exception):
                    raise data
                binary += decode_into(data, image_ext, images[row0 + i], masks[row0 + i])
            except Exception as exc:  # counted and reported, like the loader
                images[row0 + i] = 0
                masks[row0 + i] = 0
                corrupt.append((row0 + i, corrupt_item(key, path, exc)))
    images.flush()
    masks.flush()
    return corrupt, binary


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and kill the decoding processes now (shutdown alone would wait for them)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public kill before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.kill()
        proc.join(timeout=10)


def _decode_all(jobs: list[tuple], processes: int, lock_fd: int, split: str) -> tuple[list[tuple[int, str]], int]:
    corrupt: list[tuple[int, str]] = []
    binary = 0
    with make_progress() as progress:
        task = progress.add_task(f"cache {split}", total=len(jobs))
        if processes <= 1:
            for job in jobs:
                rows, n = _decode_shard(job)
                corrupt, binary = corrupt + rows, binary + n
                progress.advance(task)
            return corrupt, binary
        # fork: no re-import; workers only decode and write their rows. A damaged shard stops the rest.
        pool = ProcessPoolExecutor(processes, mp_context=get_context("fork"), initializer=_init_decoder,
                                   initargs=(os.getpid(), lock_fd))
        try:
            futures = {pool.submit(_decode_shard, job) for job in jobs}
            while futures:
                # a timeout, so that this thread runs a signal's handler soon even when the kernel delivered the
                # signal to another thread (Python runs handlers only in the main thread, between bytecodes)
                done, futures = wait(futures, timeout=1.0, return_when=FIRST_EXCEPTION)
                for fut in done:
                    if fut.exception() is not None:
                        raise fut.exception()
                    rows, n = fut.result()
                    corrupt, binary = corrupt + rows, binary + n
                    progress.advance(task, 1)
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown()
    return corrupt, binary


def _new_npy(path: Path, shape: tuple[int, ...]) -> None:
    """An uninitialised uint8 .npy with its blocks reserved now (a disk that fills later would kill the decoding
    processes with SIGBUS)."""
    header_and_size = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    del header_and_size  # unmapped: the decoding processes map it themselves
    with open(path, "rb+") as f:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _build(shards_dir, split: str, manifest: dict, shards: list[dict], fingerprint: list[dict], paths: CachePaths,
           processes: int, lock_fd: int) -> None:
    image_ext = manifest["image_ext"]
    image_shape, mask_shape = _shapes(manifest, shards)
    counts = [int(s["count"]) for s in shards]
    n, nbytes = image_shape[0], split_nbytes(shards_dir, split)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    info(f"decoding {split} split of {shards_dir} once ({n} samples, {nbytes / 2**30:.2f} GiB) into "
         f"{paths.meta.parent} with {processes} process(es)")
    free = shutil.disk_usage(paths.meta.parent).free
    if free < nbytes:
        raise UsageError(f"{paths.meta.parent}: the decoded {split} split needs {nbytes / 2**30:.2f} GiB, "
                         f"{free / 2**30:.2f} GiB free; free some space or use --set data.placement=stream")
    tmps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in (paths.images, paths.masks)]
    try:
        _new_npy(tmps[0], image_shape)
        _new_npy(tmps[1], mask_shape)
        jobs = [(str(Path(shards_dir) / s["path"]), image_ext, c, int(o), str(tmps[0]), str(tmps[1]))
                for s, c, o in zip(shards, counts, offsets)]
        corrupt, binary = _decode_all(jobs, processes, lock_fd, split)
        corrupt.sort()
        if binary:
            warn_binary_masks(f"{shards_dir}/{split}", binary, "of the split")
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        # renamed before the JSON is written: a kill in between leaves no JSON, hence a stale cache, rebuilt
        os.replace(tmps[0], paths.images)
        os.replace(tmps[1], paths.masks)
        digests = {"images": _digest(paths.images, _stamp(paths.images)),
                   "masks": _digest(paths.masks, _stamp(paths.masks))}
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "split": split, "count": n,
            "image_size": image_shape[1], "image_ext": image_ext, "sha256": digests, "shards": fingerprint,
            "corrupt": [[r, m] for r, m in corrupt]}
    atomic_write_json(paths.meta, meta)
    if corrupt:
        info(f"{len(corrupt)} corrupt sample(s) in {split} (listed in {paths.meta}); they are replaced in batches "
             "and counted, as the streaming loader does")


def _lock(folder: Path, fd: int) -> None:
    """Exclusive flock on the cache folder; waits for another builder, saying who, for at most CACHE_LOCK_WAIT_S."""
    deadline, said = time.monotonic() + CACHE_LOCK_WAIT_S, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = flock_holder(fd)
        who = f"pid {holder}" if holder else "another process"
        if not said:
            info(f"{folder}: waiting for {who}, which holds the decoded-split cache's lock (building it)")
            said = True
        if time.monotonic() >= deadline:
            raise RunError(f"{folder}: still locked by {who} after {CACHE_LOCK_WAIT_S:.0f} s; if that process is "
                           "hung, stop it, or use --set data.placement=stream")
        time.sleep(_LOCK_POLL_S)


def _remove_stale_temps(folder: Path) -> None:
    """Temp files of builders that died (under the lock no builder is at work, whatever node it ran on)."""
    for tmp in folder.glob(".*.tmp"):
        info(f"{tmp}: removing a temp file left by a cache build that did not finish")
        with contextlib.suppress(OSError):
            tmp.unlink()


@functools.cache
def _digest(path: Path, stamp: tuple) -> str:
    """sha256 of a cache file, computed once per process per version of the file (`stamp`, see _stamp)."""
    return _sha256(path, f"hash {path.name}")


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _intact(paths: CachePaths, meta: dict) -> bool:
    return all(_digest(p, _stamp(p)) == meta["sha256"][k] for k, p in (("images", paths.images),
                                                                       ("masks", paths.masks)))


@contextlib.contextmanager
def _signals_stop_the_build(folder: Path, split: str):
    """While the cache is decoded, a preemption signal (SIGTERM, SIGUSR1/2: what Slurm sends) stops the build with
    one line (its temp files removed) instead of killing the process without a word; the trainer's own handlers
    only come once training starts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise Stopped(f"{folder}: stopped by {signal.Signals(signum).name} while decoding the {split} split into the "
                      "cache; nothing kept: the next run decodes it again", signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def open_cache(shards_dir, split: str, *, processes: int | None = None, build: bool = True) -> SplitCache:
    """The decoded split, built first if missing or stale (build=False: DataError instead). Concurrent callers
    (ranks) build it once: the others wait on the lock and then open it."""
    manifest, shards = _split_shards(shards_dir, split)
    paths = cache_paths(shards_dir, split)
    folder = paths.meta.parent
    try:
        folder.mkdir(exist_ok=True)
        lock = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)  # the folder itself is the lock: no file left behind
    except OSError as exc:
        raise UsageError(f"{folder}: cannot write the decoded-split cache ({exc.strerror}); make the shards "
                         "folder writable once, or use --set data.placement=stream")
    try:
        _lock(folder, lock)
        fingerprint = _fingerprint(shards_dir, shards)
        meta = _fresh_meta(paths, manifest, shards, fingerprint)
        if meta is not None and not _intact(paths, meta):
            info(f"{folder}: sha256 of the {split} cache differs from {paths.meta.name} (damaged); rebuilding it")
            meta = None
        if meta is None:
            if not build:
                raise DataError(f"{folder}: missing or stale decoded {split} split")
            procs = processes or max(1, min(len(shards), len(os.sched_getaffinity(0))))
            try:
                _remove_stale_temps(folder)
                with _signals_stop_the_build(folder, split):
                    _build(shards_dir, split, manifest, shards, fingerprint, paths, procs, lock)
            except PermissionError as exc:
                raise UsageError(f"{folder}: cannot write the decoded-split cache ({exc.strerror}); make "
                                 "the shards folder writable once, or use --set data.placement=stream")
            meta = _fresh_meta(paths, manifest, shards, fingerprint)
            if meta is None:  # a shard changed while we decoded it
                raise DataError(f"{shards_dir}/{split}: shards changed while the cache was built; run again")
        # copy-on-write mappings: writable for torch.from_numpy, yet never written, so ranks share the page cache
        images = np.load(paths.images, mmap_mode="c", allow_pickle=False)
        masks = np.load(paths.masks, mmap_mode="c", allow_pickle=False)
    finally:
        os.close(lock)  # releases the flock
    counts = [int(s["count"]) for s in shards]
    return SplitCache(images=images, masks=masks,
                      shard_offsets=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                      corrupt_rows=np.asarray([r for r, _ in meta["corrupt"]], np.int64),
                      corrupt=[m for _, m in meta["corrupt"]], meta=meta)
