"""Training and validation batches as float tensors on the device, whatever the data placement.

open_train_batches() is the trainer's one data entry point: an endless iterator of (image, mask) float32 batches in
[0, 1] on `device` that rolls over epochs itself and keeps the position of the next batch (epoch, batch_in_epoch),
which is what a checkpoint stores. iter_val_batches() gives the same validation batches on every call.

Placements (data.placement):
  stream  ShardLoader (loader.py): shards read and decoded every epoch, by DataLoader workers when data.workers > 0.
          Its DataLoader is built ONCE per run, so persistent workers really persist across epochs.
  host    the split decoded once into uint8 .npy files beside the shards (cache.py), memory-mapped (ranks on a
          node share one copy in the page cache); each batch is a row gather, no workers, no decoding.
  device  that cache copied to the GPU once per run; batches are gathered there (no host work per batch beyond
          slicing a precomputed index). Each rank holds the whole split: the epoch's global order reshuffles
          which rank gets which sample, so a per-rank part would have to move every epoch. (CelebA train at 144 px is
          13.5 GB: fits beside the model on an 80 or 141 GB GPU; `auto` checks it fits.)
  auto    device on CUDA when the split fits in data.device_memory_fraction of free GPU memory; else host when it
          fits in that share of available RAM; either only where a fresh cache exists or can be written (folder
          writable, disk room: cache.usable_for_placement); else stream, saying why. On CPU, host also frees the cores that decoding workers would take from training; building
          the cache costs about one streamed epoch, once per dataset (every later run and sweep element reuses it).
Every placement draws THE SAME batches: the resident ones follow the streaming loader's epoch plan (loader.py: one
permutation seeded by (seed, epoch), cut into equal contiguous parts per rank, same remainder dropped and counted in
dropped_samples), mapped to cache rows. So the guarantees carry over (equal batches per rank, every sample at most
once per epoch and all but the < world + world x batch remainder exactly once, exact mid-epoch resume from
(epoch, batch_in_epoch)), and a run may resume under another placement. Corrupt samples are replaced by a copy of
another sample of the same batch and counted in corrupt_count, as the loader does. uint8 -> float happens on the
device, after the gather (loader.u8_to_float).

Host gather + float conversion (CPU): a row gather of uint8, then u8_to_float (cast-copy, x 1/255 in place), in
torch, the same ops as every other placement: bit-identical batches. Its rate per core is in `facevae bench data`
(target >= 20,000 images/s per core; on a GPU the batch is converted on the device).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import torch

from facevae_dist.data.cache import open_cache, usable_for_placement
from facevae_dist.data.loader import (
    ShardLoader,
    _EpochPlan,
    no_batches,
    no_readable_sample,
    to_float,
    u8_to_float,
    warn_corrupt,
)
from facevae_dist.errors import UsageError
from facevae_dist.progress import info

PLACEMENTS = ("stream", "host", "device")
COPY_CHUNK = 256 << 20  # bytes per host -> device copy when loading a split onto the GPU


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@functools.cache
def _info_once(message: str) -> None:
    info(message)


def resolve_placement(data_cfg, device: torch.device, split: str = "train") -> str:
    """The placement a run uses: the configured one, or for "auto" the fastest that fits (see module docstring)."""
    device = torch.device(device)
    if data_cfg.placement != "auto":
        if data_cfg.placement == "device" and device.type != "cuda":
            raise UsageError(f"data.placement=device needs a CUDA device (this run is on {device}); "
                             "use --set data.placement=host")
        return data_cfg.placement
    share = data_cfg.device_memory_fraction
    gpu = share * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    why = ""
    for placement, memory in (("device", gpu), ("host", share * _available_ram())):
        if memory:
            why = usable_for_placement(data_cfg.shards, split, int(memory))
            if not why:
                return placement
    _info_once(f"data.placement=auto: streaming the {split} split ({why})")
    return "stream"


class TrainBatches:
    """Endless iterator of (image, mask) training batches on the device; see the module docstring.
    epoch / batch_in_epoch: position of the NEXT batch; corrupt_count: corrupt samples replaced so far."""

    placement: str
    epoch: int
    batch_in_epoch: int
    corrupt_count: int
    batches_per_epoch: int
    dropped_samples: int  # samples of the split left out of each epoch on all ranks together
    failure: str | None = None  # set when reading degraded (the loader's workers died): the run should stop

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StreamBatches(TrainBatches):
    placement = "stream"

    def __init__(self, loader: ShardLoader, device: torch.device, channels_last: bool):
        self._loader, self._device, self._channels_last = loader, device, channels_last
        self.epoch, self.batch_in_epoch = loader.epoch, loader.start_batch
        self.batches_per_epoch, self.dropped_samples = len(loader), loader.dropped_samples
        self._it: Iterator[dict] | None = None

    @property
    def corrupt_count(self) -> int:
        return self._loader.corrupt_count

    @property
    def failure(self) -> str | None:
        return self._loader.worker_failure

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self._loader.set_epoch(self.epoch, self.batch_in_epoch)
                self._it = iter(self._loader)
            batch = next(self._it, None)
            if batch is not None:
                self.batch_in_epoch += 1
                return to_float(batch, self._device, channels_last=self._channels_last)
            self._it = None  # epoch done: the same loader (and its persistent workers) reads the next one
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def close(self) -> None:
        self._it = None
        self._loader.close()


class _ResidentSplit:
    """A cached split as torch tensors (host memory map, or copied to the device) + the loader's epoch plans."""

    def __init__(self, data_cfg, split: str, *, rank: int, world: int, device: torch.device, on_device: bool,
                 batch_size: int, drop_last: bool, shuffle: bool, resampled: bool):
        cache = open_cache(data_cfg.shards, split)
        self.cache, self.where, self.world = cache, f"{data_cfg.shards}/{split}", world
        counts = np.diff(np.append(cache.shard_offsets, len(cache))).tolist()
        if not 0 <= rank < world:
            raise UsageError(f"rank {rank} out of range for world_size {world}")
        self.plan_args = dict(shard_counts=counts, rank=rank, world_size=world, batch_size=batch_size,
                              seed=data_cfg.seed, resampled=resampled, drop_last=drop_last, shuffle=shuffle)
        self.device, self.batch_size = device, batch_size
        images, masks = torch.from_numpy(cache.images), torch.from_numpy(cache.masks)
        if on_device:
            images, masks = _to_device(images, device), _to_device(masks, device)
        self.images, self.masks, self.on_device = images, masks, on_device
        self.corrupt_rows = cache.corrupt_rows
        self._corrupt_msg = dict(zip(cache.corrupt_rows.tolist(), cache.corrupt))

    def plan(self, epoch: int) -> tuple[_EpochPlan, torch.Tensor, np.ndarray, dict[int, list[str]]]:
        """(plan, rows of this rank's epoch on the gather device, corrupt count per batch, messages per batch).
        Corrupt rows are replaced here once per epoch, exactly as the loader does per batch."""
        plan = _EpochPlan(**self.plan_args, epoch=epoch)
        rows = self.cache.shard_offsets[plan.shard] + plan.local
        per_batch = np.zeros(plan.num_batches, np.int64)
        messages: dict[int, list[str]] = {}
        if len(self.corrupt_rows):
            bad = np.isin(rows, self.corrupt_rows)
            for j in np.unique(np.nonzero(bad)[0] // self.batch_size).tolist():
                sl = slice(j * self.batch_size, min((j + 1) * self.batch_size, len(rows)))
                batch, holes = rows[sl].copy(), bad[sl]
                good = np.nonzero(~holes)[0]
                messages[j] = [self._corrupt_msg[int(r)] for r in batch[holes]]
                if len(good) == 0:
                    raise no_readable_sample(messages[j])
                for n in np.nonzero(holes)[0]:
                    batch[n] = batch[good[n % len(good)]]
                rows[sl] = batch
                per_batch[j] = int(holes.sum())
        index = torch.from_numpy(rows.astype(np.int64))
        return plan, (index.to(self.device) if self.on_device else index), per_batch, messages

    def gather(self, index: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        image = self.images.index_select(0, index).permute(0, 3, 1, 2)  # NHWC rows seen as [B,3,H,W]
        mask = self.masks.index_select(0, index).unsqueeze(1)
        return u8_to_float(image, device, fmt), u8_to_float(mask, device, fmt)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    rows = max(1, COPY_CHUNK // max(1, t[0].numel()))
    for a in range(0, len(t), rows):
        out[a:a + rows].copy_(t[a:a + rows])
    return out


class _ResidentBatches(TrainBatches):
    def __init__(self, split: _ResidentSplit, placement: str, device: torch.device, channels_last: bool, epoch: int,
                 batch_in_epoch: int):
        self._split, self.placement, self._device, self._channels_last = split, placement, device, channels_last
        self.epoch, self.batch_in_epoch, self.corrupt_count = epoch, batch_in_epoch, 0
        self._warned: set[str] = set()
        self._load_epoch()
        if not 0 <= batch_in_epoch <= self.batches_per_epoch:
            raise UsageError(f"start batch {batch_in_epoch} outside [0, {self.batches_per_epoch}]")

    def _load_epoch(self) -> None:
        self._plan, self._index, self._corrupt_per_batch, self._messages = self._split.plan(self.epoch)
        self.batches_per_epoch, self.dropped_samples = self._plan.num_batches, self._plan.dropped_samples
        if self.batches_per_epoch == 0:
            raise no_batches(self._split.where, len(self._split.cache), self._split.batch_size, self._split.world)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._load_epoch()
        j, b = self.batch_in_epoch, self._split.batch_size
        if self._corrupt_per_batch[j]:
            self.corrupt_count += int(self._corrupt_per_batch[j])
            warn_corrupt(self._messages[j], self._warned)
        self.batch_in_epoch += 1
        return self._split.gather(self._index[j * b:(j + 1) * b], self._device, self._channels_last)

    def close(self) -> None:
        self._split = self._index = None  # frees the device copy


def open_train_batches(data_cfg, *, rank: int, world: int, device: torch.device, epoch: int, batch_in_epoch: int,
                       channels_last: bool) -> TrainBatches:
    """This rank's training batches from (epoch, batch_in_epoch) on (a checkpoint's position, or 0, 0)."""
    device = torch.device(device)
    placement = resolve_placement(data_cfg, device)
    if placement == "stream":
        loader = ShardLoader(data_cfg.shards, "train", data_cfg.batch_size, rank=rank, world_size=world,
                             workers=data_cfg.workers, seed=data_cfg.seed, epoch=epoch,
                             resampled=data_cfg.resampled, start_batch=batch_in_epoch)
        return _StreamBatches(loader, device, channels_last)
    split = _ResidentSplit(data_cfg, "train", rank=rank, world=world, device=device, on_device=placement == "device",
                           batch_size=data_cfg.batch_size, drop_last=True, shuffle=True, resampled=data_cfg.resampled)
    where = f"on {device}" if placement == "device" else "in host memory"
    info(f"training data: {len(split.cache)} decoded samples held {where} "
         f"(data.placement={data_cfg.placement} -> {placement})")
    return _ResidentBatches(split, placement, device, channels_last, epoch, batch_in_epoch)


def iter_val_batches(data_cfg, *, rank: int, world: int, device: torch.device, max_batches: int,
                     channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_batches` validation batches of this rank: a fixed order (epoch 0, seed data.seed), the last
    batch possibly short (nothing dropped beyond the N mod world remainder), no RNG drawn, no workers. Resident
    placements read the decoded val split from the host cache (small; gathered there, converted on the device)."""
    device = torch.device(device)
    if resolve_placement(data_cfg, device, "val") == "stream":
        loader = ShardLoader(data_cfg.shards, "val", data_cfg.batch_size, rank=rank, world_size=world, workers=0,
                             seed=data_cfg.seed, epoch=0, drop_last=False)
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            yield to_float(batch, device, channels_last=channels_last)
        return
    split = _ResidentSplit(data_cfg, "val", rank=rank, world=world, device=device, on_device=False,
                           batch_size=data_cfg.batch_size, drop_last=False, shuffle=True, resampled=False)
    batches = _ResidentBatches(split, "host", device, channels_last, 0, 0)
    for _ in range(min(max_batches, batches.batches_per_epoch)):
        yield next(batches)
