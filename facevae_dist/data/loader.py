"""Distributed shard reader: uint8 batches, identical epoch plans on every rank, exact resume.

How an epoch is planned (the same arithmetic runs on every rank, no communication needed):
  1. Shard order = permutation(seed, epoch) of the split's shards (identical on all ranks); within each shard the
     sample order is permutation(seed, epoch, shard). Concatenated, that is the epoch's global sample sequence
     (N samples; counts come from manifest.json, so nothing is read to plan).
  2. Split by rank: rank r takes the contiguous slice [r*P, (r+1)*P) with P = N // world_size, so a rank reads
     about N/world_size/shard_size whole shards. Every rank has exactly P samples -> the same number of batches
     (no DDP hang, whatever the shard sizes).
  3. Batches: P // batch_size full batches (drop_last=True; the last partial one is dropped, as
     DataLoader(drop_last=True) does) or ceil(P / batch_size) (drop_last=False, last batch smaller, same size on all
     ranks).
  4. Split by worker: batch j of the rank goes to DataLoader worker (j - start_batch) % workers; DataLoader's
     round-robin then yields batches exactly in order j = start_batch, start_batch+1, ...
Remainder: the samples a rank does not get (N mod world_size, fewer than world_size) plus those in dropped partial
batches are left out of THIS epoch only; which ones changes every epoch because the order is reshuffled. We drop
rather than pad because padding repeats samples, which biases gradients and validation means; the count is
`loader.dropped_samples` (0 when world_size * batch_size divides N, or with world_size=1 and drop_last=False).
Everything else is seen exactly once per epoch.
Resampled mode (endless streams): each rank draws shards with replacement from its own stream
(seed, epoch, rank) and reads them in shuffled order; an "epoch" is the same number of batches as above.
Resume: start_batch=k skips the first k batches of the current epoch without reading them.
Corrupt samples at read time are replaced by a copy of another sample of the same batch (so batch shapes and counts
stay equal across ranks) and reported: their keys are in batch["corrupt"], counted in loader.corrupt_count and
warned about once each. A batch with no readable sample, or an unreadable (truncated, deleted, empty) shard, raises
DataError naming the shard, in one line, also from a worker; the workers are stopped first.
Workers never outlive the loader: they ignore preemption signals (those are for the trainer, which checkpoints
first), so the loader kills them itself when it is closed, fails or the interpreter exits, and the kernel kills them
(PR_SET_PDEATHSIG) if the training process dies without that chance.
Workers hand batches over through shared-memory slots allocated once per run (_BatchRing), not through the pipe.
Do NOT pass this loader to accelerator.prepare: it already shards by rank (prepare would re-shard or dispatch).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import io
import multiprocessing
import os
import signal
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

try:
    import simplejpeg  # a dependency; the fallback only keeps old environments working
except ImportError:  # pragma: no cover
    simplejpeg = None

from facevae_dist.data.imageio import gray_to_uint8
from facevae_dist.data.shards import read_manifest
from facevae_dist.data.tario import OversizedMember, index_tar, member_limits, read_fields
from facevae_dist.errors import DataError, FaceVAEError, RunError, UsageError
from facevae_dist.fileio import read_json

WORKER_JOIN_S = 5.0  # how long a closing loader waits for its workers before it kills them
_LIVE_LOADERS: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so it runs first: that hook would join forever
def _close_live_loaders() -> None:
    for loader in list(_LIVE_LOADERS):
        loader.close()


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a child process: the kernel sends it `sig` when `parent_pid` dies (Linux PR_SET_PDEATHSIG), so a killed
    parent (SIGKILL gives it no chance to stop its children) leaves no orphan; exits now if it is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(_worker_id: int, parent_pid: int) -> None:
    """DataLoader worker set-up: ignore preemption signals, die with the training process."""
    # Slurm signals every process of the job; a worker dying of SIGTERM would crash training before its checkpoint.
    # So preemption signals are ignored here and the loader stops its workers itself (close(): SIGKILL if needed).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


class WorkersDied(RunError):
    """The loader's worker processes died (killed, e.g. by the out-of-memory killer, or crashed)."""


def unreadable_shard(path, exc: BaseException) -> DataError:
    return DataError(f"{path}: unreadable shard ({type(exc).__name__}: {exc}); run `facevae shards verify` and "
                     "rebuild it")


def short_shard(path, have: int, want: int | str) -> DataError:
    return DataError(f"{path}: has {have} samples, manifest.json expects {want} (truncated or replaced shard); run "
                     "`facevae shards verify` and rebuild it")


def corrupt_item(key: str, path, exc: BaseException) -> str:
    """How a corrupt sample is named in warnings, batch["corrupt"] and the cache's JSON."""
    return f"{key} ({Path(path).name}: {type(exc).__name__}: {exc})"


def no_batches(where: str, n: int, batch_size: int, world: int) -> DataError:
    """A split that gives this rank no batch: empty (a build left it nothing), or smaller than one batch per rank."""
    if n == 0:
        return DataError(f"{where}: the split is empty (0 samples); rebuild the shards so that it gets some (`facevae "
                         "shards build` with a non-zero --split-ratios share for it, or more images; errors.tsv lists "
                         "the skipped ones), or do without it (--val-every 0 for val)")
    return DataError(f"{where}: {n} samples give no batch of {batch_size} per rank over {world} rank(s); use a "
                     "smaller batch size")


def no_readable_sample(items: list[str]) -> DataError:
    return DataError(f"no readable sample in a whole batch ({'; '.join(items[:3])}); run `facevae shards verify`")


def warn_corrupt(items: list[str], warned: set[str]) -> None:
    """Warn once per corrupt sample (`warned`: those already named by this reader)."""
    for item in items:
        if item not in warned:
            warned.add(item)
            warnings.warn(f"corrupt sample replaced by a copy of another in its batch: {item}")


def warn_binary_masks(where: str, count: int, scope: str) -> None:
    warnings.warn(f"{where}: the mask.png of {count} sample(s) {scope} holds only 0 and 1, not the face mask x255 "
                  "that `facevae shards build` writes: read as 0/255 (`facevae shards verify` lists every one)")


def read_sizes(shards_dir: str | os.PathLike) -> dict[str, int]:
    path = Path(shards_dir) / "sizes.json"
    fix = "rebuild the shards with `facevae shards build`"
    try:
        sizes = read_json(path, fix=fix)
    except OSError:
        raise DataError(f"{path}: not found ({fix})")
    if not (isinstance(sizes, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values())):
        raise DataError(f"{path}: expected an object of sample counts ({fix})")
    return sizes


def u8_to_float(x: torch.Tensor, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 in [0,1] on `device`, laid out as asked. One cast-copy and one in-place multiply
    (x * (1/255) is within an ulp of x / 255 and about 1.6x faster on CPU); every placement converts this way, so
    they give bit-identical batches."""
    x = x.to(device, non_blocking=True)
    return torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=memory_format).copy_(x).mul_(1 / 255)


def to_float(batch: dict, device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> (image float32 [B,3,H,W] in [0,1], mask float32 [B,1,H,W] in [0,1]), converted on `device`
    (the uint8 tensors cross the bus: 4x less than float)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return u8_to_float(batch["image"], device, fmt), u8_to_float(batch["mask"], device, fmt)


def decode_into(fields: dict[str, bytes], image_ext: str, image_out: np.ndarray, mask_out: np.ndarray) -> bool:
    """Decode one sample's image and mask.png into uint8 arrays [H,W,3] and [H,W]; raises if either is unreadable
    or has the wrong size, checked from the header before decoding (the caller counts it as corrupt). Shared by the
    loader and the decoded-split cache. A mask of another depth is read by value (16-bit full scale is 255); a
    mask holding only 0 and 1 (shards written by another tool) is read as 0/255, and True returned so the caller
    can say so: no face mask x255 has 1 as its largest value, so the reading is unambiguous (docs/data.md).
    JPEGs go through simplejpeg (libjpeg-turbo like PIL, same default DCT and upsampling: identical pixels, at a
    higher rate: docs/performance.md); PIL takes what it refuses (e.g. CMYK), so the set of readable samples is PIL's."""
    if image_ext == "jpg" and simplejpeg is not None:
        try:  # only YCbCr/gray: libjpeg-turbo's own CMYK/YCCK -> RGB differs from PIL's
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(fields["jpg"])
            if colorspace in ("YCbCr", "Gray") and (height, width) == image_out.shape[:2]:
                image_out[...] = simplejpeg.decode_jpeg(fields["jpg"], colorspace="RGB")
                image_ext = ""
        except Exception:  # noqa: BLE001 - PIL below decides whether the sample is corrupt
            pass
    if image_ext:
        with Image.open(io.BytesIO(fields[image_ext]), formats=("JPEG",) if image_ext == "jpg" else ("PNG",)) as im:
            _check_size(im, image_out.shape, image_ext)
            image_out[...] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    with Image.open(io.BytesIO(fields["mask.png"]), formats=("PNG",)) as im:
        _check_size(im, mask_out.shape, "mask.png")
        mask_out[...] = gray_to_uint8(im)
    if mask_out.max() == 1:
        mask_out *= 255
        return True
    return False


def _check_size(im: Image.Image, shape: tuple[int, ...], member: str) -> None:
    """From the header, before any pixel is decoded: a member of another size (a 177-Mpixel mask in a 144-px
    shard) is a corrupt sample, refused without the decode that would take gigabytes."""
    if im.size != (shape[1], shape[0]):
        raise ValueError(f"{member} is {im.size[0]}x{im.size[1]}, the shards' samples are {shape[1]}x{shape[0]}")


class _EpochPlan:
    """This rank's batches for one epoch: arrays of (shard number, sample number in shard) per position."""

    def __init__(self, shard_counts: list[int], *, rank: int, world_size: int, batch_size: int, seed: int, epoch: int,
                 resampled: bool, drop_last: bool, shuffle: bool, pad: bool = False):
        total = sum(shard_counts)
        # pad (evaluation): every rank gets ceil(N / world) samples, the last ranks wrapping round to the first
        # samples of the order, so no sample is left out; the caller drops the repeats by key
        pad = pad and not drop_last and not resampled
        per_rank = -(-total // world_size) if pad else total // world_size
        self.num_batches = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        self.num_samples = min(per_rank, self.num_batches * batch_size)
        self.dropped_samples = 0 if resampled or pad else total - world_size * self.num_samples
        self.batch_size = batch_size
        if resampled:
            rng = np.random.default_rng([seed, epoch, rank, 0x5A])
            shards_seq, locals_seq, have = [], [], 0
            while have < self.num_samples:
                s = int(rng.integers(len(shard_counts)))
                shards_seq.append(np.full(shard_counts[s], s, np.int32))
                locals_seq.append(rng.permutation(shard_counts[s]).astype(np.int32))
                have += shard_counts[s]
            self.shard = np.concatenate(shards_seq)[: self.num_samples]
            self.local = np.concatenate(locals_seq)[: self.num_samples]
            return
        order = np.random.default_rng([seed, epoch]).permutation(len(shard_counts)) if shuffle \
            else np.arange(len(shard_counts))
        shard = np.concatenate([np.full(shard_counts[s], s, np.int32) for s in order])
        local = np.concatenate([
            (np.random.default_rng([seed, epoch, int(s)]).permutation(shard_counts[s]) if shuffle
             else np.arange(shard_counts[s])).astype(np.int32) for s in order])
        if pad and world_size * per_rank > total:
            extra = world_size * per_rank - total  # < world_size <= total (enough shards per rank is checked)
            shard, local = np.concatenate([shard, shard[:extra]]), np.concatenate([local, local[:extra]])
        start = rank * per_rank
        self.shard = shard[start:start + self.num_samples]
        self.local = local[start:start + self.num_samples]

    def batch(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(j * self.batch_size, min((j + 1) * self.batch_size, self.num_samples))
        return self.shard[sl], self.local[sl]


class _ShardReader:
    """Random access to samples of a few open shards (tar header index cached per shard). Reads only the members
    in `limits`, each within its size (tario.member_limits): an oversized one raises OversizedMember, which the
    caller counts as a corrupt sample."""

    def __init__(self, paths: list[Path], limits: dict[str, int], max_open: int = 8):
        self.paths, self.limits = paths, limits
        self.max_open = max_open
        self.open: dict[int, tuple] = {}

    def key(self, s: int, i: int) -> str:
        return self.open[s][1][i][0]

    def get(self, s: int, i: int) -> tuple[str, dict[str, bytes]]:
        if s not in self.open:
            if len(self.open) >= self.max_open:
                old = next(iter(self.open))
                self.open.pop(old)[0].close()
            path = self.paths[s]
            try:
                index = index_tar(path)
            except Exception as exc:
                raise unreadable_shard(path, exc)
            self.open[s] = (open(path, "rb"), index)
        f, index = self.open[s]
        if i >= len(index):
            raise short_shard(self.paths[s], len(index), f"at least {i + 1}")
        key, fields = index[i]
        try:
            return key, read_fields(f, fields, self.limits)
        except (OSError, EOFError) as exc:
            raise unreadable_shard(self.paths[s], exc)

    def close(self) -> None:
        for f, _ in self.open.values():
            f.close()
        self.open.clear()


def _as_tensors(batch: dict) -> dict:
    """NHWC image / HW mask arrays or tensors -> the loader's tensors (no copy)."""
    batch["image"] = torch.as_tensor(batch["image"]).permute(0, 3, 1, 2)
    batch["mask"] = torch.as_tensor(batch["mask"]).unsqueeze(1)
    return batch


def _keep(batch):
    return batch


class _BatchRing:
    """Shared-memory slots through which DataLoader workers hand decoded batches to the training process.

    Sending a batch through the DataLoader's pipe pickles it, copies it through the kernel in 64 KB pieces and
    unpickles it (2.6 MB per 144-px batch of 32): about a third of a worker's time per image here. Instead each
    worker decodes straight into its own slots (allocated once, before the workers fork, so their pages stay
    mapped) and sends only (worker, slot, seq); the training process copies the slot out at once.
    Kept on a measured A/B against the DataLoader's own shared-memory handover (workers returning torch uint8
    tensors, also when decoded straight into shared tensors): docs/performance.md, "Data throughput".
    Why a slot is never overwritten before it is copied: the DataLoader sends a worker a new task only when the
    training process takes a batch, and keeps at most prefetch_factor x workers tasks outstanding, so a worker is
    at most that many batches ahead of the last batch taken, and every batch before that one has been copied.
    With prefetch_factor x workers + 1 slots per worker the slot being written is never the one being copied. It is
    also checked: a worker marks the slot as being written (seq -> -seq) before touching its pixels and stores seq
    after; the reader compares after its copy and raises rather than hand on a torn batch."""

    def __init__(self, workers: int, slots: int, batch_size: int, size: int):
        self.slots = slots
        self.images = torch.empty((workers, slots, batch_size, size, size, 3), dtype=torch.uint8).share_memory_()
        self.masks = torch.empty((workers, slots, batch_size, size, size), dtype=torch.uint8).share_memory_()
        assert self.images.nbytes + self.masks.nbytes == self.nbytes(workers, slots, batch_size, size)
        self.seq = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self.written = 0  # batches this process has written (each forked worker counts its own)

    @staticmethod
    def nbytes(workers: int, slots: int, batch_size: int, size: int) -> int:
        """Shared memory the slots take: an image (3 bytes per pixel) and a mask (1) per sample."""
        return workers * slots * batch_size * size * size * (3 + 1)

    def claim(self, worker: int, b: int) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
        """(ticket, image rows [b,H,W,3], mask rows [b,H,W]) to decode into; publish(ticket) when they are full."""
        self.written += 1
        slot, seq = (self.written - 1) % self.slots, self.written
        self.seq[worker, slot] = -seq
        return (worker, slot, seq, b), self.images[worker, slot, :b].numpy(), self.masks[worker, slot, :b].numpy()

    def publish(self, ticket: tuple[int, int, int, int]) -> None:
        worker, slot, seq, _ = ticket
        self.seq[worker, slot] = seq

    def take(self, ticket: tuple[int, int, int, int], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of a published batch (pinned for a fast host -> GPU copy when `pin`)."""
        worker, slot, seq, b = ticket
        image, mask = self.images[worker, slot, :b], self.masks[worker, slot, :b]
        image_out = torch.empty(image.shape, dtype=torch.uint8, pin_memory=pin).copy_(image)
        mask_out = torch.empty(mask.shape, dtype=torch.uint8, pin_memory=pin).copy_(mask)
        if int(self.seq[worker, slot]) != seq:
            raise RunError(f"data loader worker {worker} overwrote batch {seq} while it was read (shared slot "
                           f"{slot}); this is a bug: rerun with --workers 0 and report it")
        return image_out, mask_out


class _ShardDataset(IterableDataset):
    """Each reader (main process or DataLoader worker) rebuilds the epoch plan from (seed, epoch): cheap and
    deterministic. Epoch and start batch live in shared memory (open_clip's SharedEpoch idea), so persistent
    workers, forked once, follow set_epoch() and resume positions without being restarted."""

    def __init__(self, paths: list[Path], image_ext: str, image_size: int, plan_args: dict):
        self.paths, self.image_ext, self.image_size = paths, image_ext, image_size
        self.plan_args = plan_args
        self._position = [0, 0]  # epoch, start batch; shared memory once workers start (share_position)
        self._cached: tuple[int, _EpochPlan] | None = None
        self.ring: _BatchRing | None = None  # set by ShardLoader before its workers start

    def set_position(self, epoch: int, start_batch: int) -> None:
        self._position[0], self._position[1] = epoch, start_batch

    def share_position(self) -> None:
        """Before the workers fork: the position in shared memory, where they read each pass's."""
        self._position = multiprocessing.RawArray("q", list(self._position))

    def plan_for(self, epoch: int) -> _EpochPlan:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, _EpochPlan(**self.plan_args, epoch=epoch))
        return self._cached[1]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan, start_batch = self.plan_for(self._position[0]), self._position[1]
        reader = _ShardReader(self.paths, member_limits(self.image_ext, self.image_size))
        try:
            for j in range(start_batch + worker, plan.num_batches, workers):
                try:
                    batch = self._load_batch(reader, *plan.batch(j))
                except FaceVAEError as exc:
                    if info is None:
                        raise
                    # hand the one-line message to the main process instead of torch's wrapped worker traceback
                    yield {"error": str(exc)}
                    return
                yield batch
        finally:
            reader.close()

    def _load_batch(self, reader: _ShardReader, shards: np.ndarray, locals_: np.ndarray) -> dict:
        b, size = len(shards), self.image_size
        worker = get_worker_info()
        ticket = None
        if worker is not None and self.ring is not None:  # decode straight into this worker's next shared slot
            ticket, images, masks = self.ring.claim(worker.id, b)
        else:
            images = np.empty((b, size, size, 3), np.uint8)
            masks = np.empty((b, size, size), np.uint8)
        keys, corrupt, good, binary = [], [], [], 0
        for n, (s, i) in enumerate(zip(shards.tolist(), locals_.tolist())):
            try:
                key, fields = reader.get(s, i)
            except OversizedMember as exc:  # a corrupt sample, like an undecodable one
                key, fields = reader.key(s, i), exc
            keys.append(key)
            try:
                if isinstance(fields, Exception):
                    raise fields
                binary += decode_into(fields, self.image_ext, images[n], masks[n])
                good.append(n)
            except Exception as exc:
                corrupt.append(corrupt_item(key, self.paths[s], exc))
                keys[-1] = None
        if corrupt:
            if not good:
                raise no_readable_sample(corrupt)
            for n in range(b):  # fill each hole with a readable sample of the same batch
                if keys[n] is None:
                    src = good[n % len(good)]
                    images[n], masks[n], keys[n] = images[src], masks[src], keys[src]
        # NHWC memory seen as [B,3,H,W] (channels_last strides): no copy here; to_float lays it out on the device.
        if ticket is not None:  # only the ticket crosses the pipe (_BatchRing)
            self.ring.publish(ticket)
            return {"ring": ticket, "key": keys, "corrupt": corrupt, "binary_masks": binary}
        if worker is not None:  # no ring (no shared memory): plain numpy arrays through the DataLoader's pipe
            return {"image": images, "mask": masks, "key": keys, "corrupt": corrupt, "binary_masks": binary}
        return _as_tensors({"image": images, "mask": masks, "key": keys, "corrupt": corrupt, "binary_masks": binary})


class ShardLoader:
    """Iterable over this rank's batches of one epoch: {"image": uint8 [B,3,H,W], "mask": uint8 [B,1,H,W],
    "key": list[str], "corrupt": list[str]}. The image tensor has channels_last strides (NHWC memory, as decoded);
    to_float() converts it to the layout you ask for on the device. See the module docstring for the semantics."""

    def __init__(self, shards_dir, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0, seed: int = 0, epoch: int = 0, resampled: bool = False, start_batch: int = 0,
                 drop_last: bool = True, shuffle: bool = True, pin_memory: bool | None = None,
                 prefetch_factor: int = 4, pad: bool = False):
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} out of range for world_size {world_size}")
        if workers < 0:
            raise UsageError(f"workers must be >= 0, got {workers}")
        manifest = read_manifest(shards_dir)
        if split not in manifest["splits"]:
            raise UsageError(f"split {split!r} not in {shards_dir} (have {', '.join(manifest['splits'])})")
        shards = [s for s in manifest["splits"][split]["shards"] if s["count"] > 0]
        if not shards:
            raise no_batches(f"{shards_dir}/{split}", 0, batch_size, world_size)
        readers = world_size * max(workers, 1)
        if len(shards) < readers:
            raise DataError(f"{shards_dir}/{split}: {len(shards)} shard(s) for {world_size} rank(s) x "
                            f"{max(workers, 1)} worker(s); need at least {readers}: rebuild with a smaller "
                            "--shard-size or use fewer workers")
        self.shards_dir, self.split, self.batch_size = Path(shards_dir), split, batch_size
        self.rank, self.world_size, self.workers, self.seed = rank, world_size, workers, seed
        self.resampled, self.drop_last, self.shuffle = resampled, drop_last, shuffle
        self.image_size = int(manifest["image_size"])
        self.shard_counts = [int(s["count"]) for s in shards]
        self._dataset = _ShardDataset(
            [self.shards_dir / s["path"] for s in shards], manifest["image_ext"], self.image_size,
            dict(shard_counts=self.shard_counts, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                 resampled=resampled, drop_last=drop_last, shuffle=shuffle, pad=pad))
        self._dataloader: DataLoader | None = None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.corrupt_count = 0
        self.worker_failure: str | None = None  # why the workers died, if they did (the rest is read in-process)
        self.binary_mask_count = 0  # masks read as 0/255 from 0/1 (decode_into)
        self._warned: set[str] = set()
        self.epoch = epoch
        self._plan = self._make_plan()
        if self._plan.num_batches == 0:
            raise no_batches(f"{shards_dir}/{split}", sum(self.shard_counts), batch_size, world_size)
        if not 0 <= start_batch <= self._plan.num_batches:
            raise UsageError(f"start_batch {start_batch} outside [0, {self._plan.num_batches}]")
        self.start_batch = start_batch

    def _make_plan(self) -> _EpochPlan:
        return self._dataset.plan_for(self.epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self._plan = self._make_plan()
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self._plan.num_batches

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per full epoch."""
        return self._plan.num_samples

    @property
    def dropped_samples(self) -> int:
        """Samples of the split left out of this epoch on ALL ranks together (see module docstring)."""
        return self._plan.dropped_samples

    def close(self) -> None:
        """Stop the DataLoader workers now (not at garbage collection); kill those that do not stop in time."""
        dataloader, self._dataloader = self._dataloader, None
        iterator = getattr(dataloader, "_iterator", None)
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", []))
        try:
            iterator._shutdown_workers()  # asks, joins with a timeout, then SIGTERM (which workers ignore)
        finally:
            for w in workers:
                w.join(timeout=WORKER_JOIN_S if w.is_alive() else 0)
                if w.is_alive():
                    w.kill()
                    w.join(timeout=WORKER_JOIN_S)
            self._dataset.ring = None  # its shared memory goes with the workers (a new iteration makes a new one)

    def __iter__(self):
        self._dataset.set_position(self.epoch, self.start_batch)
        batches = None
        if self.workers and self._dataloader is None:
            batches = self._start_workers()
        elif self.workers:
            batches = iter(self._dataloader)
        batches = iter(self._dataset) if batches is None else self._checked(batches)
        position = self.start_batch
        while True:
            try:
                batch = next(batches, None)
            except WorkersDied as exc:
                # the same batches, read here from the one that was lost; the trainer stops at its next step
                # boundary with a checkpoint (worker_failure), rather than crash with none
                self.worker_failure = str(exc)
                warnings.warn(f"{exc}; reading the rest in the training process")
                self.workers = 0
                self._dataset.set_position(self.epoch, position)
                batches = iter(self._dataset)
                continue
            if batch is None:
                break
            position += 1
            self.corrupt_count += len(batch["corrupt"])
            warn_corrupt(batch["corrupt"], self._warned)
            if batch["binary_masks"] and not self.binary_mask_count:
                warn_binary_masks(f"{self.shards_dir}/{self.split}", batch["binary_masks"], "in its first batch")
            self.binary_mask_count += batch["binary_masks"]
            yield batch
        self.start_batch = 0  # a finished epoch; the next iteration starts at its beginning

    def _start_workers(self):
        """The DataLoader's iterator over freshly started persistent workers, or None (with a warning: this loader
        then reads in the calling process) where they cannot start, e.g. a read-only or full /dev/shm, where
        multiprocessing keeps its locks and shared values."""
        try:
            if not os.access("/dev/shm", os.W_OK) and os.path.isdir("/dev/shm"):
                raise OSError("/dev/shm is not writable")
            multiprocessing.Lock()  # probe: a DataLoader failing half-way through its start prints a traceback
            # Persistent workers: forked once, they read the epoch/start batch from shared memory each pass,
            # so no per-epoch start-up cost. An own generator: DataLoader would otherwise draw its worker base
            # seed from the global torch RNG, shifting the training noise stream (breaks exact resume).
            self._dataset.share_position()
            self._dataset.ring = self._make_ring()
            self._dataloader = DataLoader(self._dataset, batch_size=None, num_workers=self.workers,
                                          pin_memory=self.pin_memory and self._dataset.ring is None,
                                          prefetch_factor=self.prefetch_factor, persistent_workers=True,
                                          generator=torch.Generator().manual_seed(self.seed * 1_000_003),
                                          collate_fn=_keep,
                                          worker_init_fn=functools.partial(_init_worker, parent_pid=os.getpid()))
            _LIVE_LOADERS.add(self)
            previous = signal.getsignal(signal.SIGCHLD)
            batches = iter(self._dataloader)
            # DataLoader's SIGCHLD handler raises wherever the main thread happens to be when a worker dies (in the
            # middle of an optimizer step); without it the death surfaces at the next batch fetch (the DataLoader
            # checks its workers whenever it waits), a point where the run can still checkpoint
            signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)
            return batches
        except OSError as exc:
            self.close()
            warnings.warn(f"the data loader's {self.workers} worker process(es) cannot start ({exc}); reading "
                          "batches in the training process instead (same batches, slower): check /dev/shm")
            self.workers = 0
            return None

    def _make_ring(self) -> "_BatchRing | None":
        """Shared slots for the workers' batches, or None (then batches travel through the pipe) where shared memory
        is short, e.g. a container's 64 MB /dev/shm."""
        slots = self.prefetch_factor * self.workers + 1  # see _BatchRing: enough that none is overwritten unread
        need = _BatchRing.nbytes(self.workers, slots, self.batch_size, self.image_size)
        try:  # tmpfs pages are only taken when first written: a full /dev/shm would kill a worker with SIGBUS
            st = os.statvfs("/dev/shm")
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        try:
            if free is not None and need > free // 2:
                raise RuntimeError(f"the slots need {need / 2**20:.0f} MB, /dev/shm has {free / 2**20:.0f} MB free")
            return _BatchRing(self.workers, slots, self.batch_size, self.image_size)
        except (RuntimeError, OSError) as exc:
            warnings.warn(f"no shared memory for the data loader's batch slots ({str(exc).splitlines()[0][:120]}); "
                          "batches go through the workers' pipes instead (slower per core)")
            return None

    def _checked(self, batches):
        """Worker batches; a worker's failure stops all workers first, then raises one line."""
        try:
            for batch in batches:
                if "error" in batch:
                    raise DataError(batch["error"])
                if "ring" in batch:
                    batch["image"], batch["mask"] = self._dataset.ring.take(batch.pop("ring"), self.pin_memory)
                yield _as_tensors(batch)
        except FaceVAEError:
            self.close()
            raise
        except Exception as exc:  # a worker killed (e.g. out of memory) or a bug: keep the cause for --debug
            why = self._why_workers_died()
            self.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkersDied(f"{self.shards_dir}/{self.split}: data loader worker failed ({why or first}); rerun "
                              "with --workers 0 to see an error in the main process") from exc

    def _why_workers_died(self) -> str:
        """How the workers ended, from their exit codes: SIGKILL is what the kernel's out-of-memory killer sends."""
        reasons = []
        for w in getattr(getattr(self._dataloader, "_iterator", None), "_workers", []):
            code = w.exitcode
            if code == -signal.SIGKILL:
                reasons.append(f"worker pid {w.pid} killed by SIGKILL, most likely by the kernel's out-of-memory "
                               "killer (`dmesg` says): lower data.workers or the batch size, or free memory")
            elif code is not None and code < 0:
                reasons.append(f"worker pid {w.pid} killed by {signal.Signals(-code).name}")
            elif code:
                reasons.append(f"worker pid {w.pid} exited with code {code}")
        return "; ".join(reasons)
