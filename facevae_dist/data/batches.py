"""Training and validation batches as float tensors on the device, whatever the data placement.

open_train_batches() is the trainer's one data entry point: an endless iterator of (image, mask) float32 batches in
[0, 1] on `device` that rolls over epochs itself and keeps the position of the next batch (epoch, batch_in_epoch),
which is what a checkpoint stores. iter_val_batches() gives the same validation batches on every call.

Placements (data.placement):
  stream  ShardLoader (loader.py): shards read and decoded every epoch, by DataLoader workers when data.workers > 0.
          Its DataLoader is built ONCE per run, so persistent workers really persist across epochs.
The uint8 -> float conversion happens on the device (4x fewer bytes cross the bus).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from facevae_dist.data.loader import ShardLoader, make_loader, to_float

PLACEMENTS = ("stream", "host", "device")


def resolve_placement(data_cfg, device: torch.device) -> str:
    """The placement a run uses: the configured one, or for "auto" the fastest that fits."""
    if data_cfg.placement != "auto":
        return data_cfg.placement
    return "stream"


class TrainBatches:
    """Endless iterator of (image, mask) training batches on the device; see the module docstring.
    epoch / batch_in_epoch: position of the NEXT batch; corrupt_count: corrupt samples replaced so far."""

    placement: str = "stream"

    def __init__(self, loader: ShardLoader, device: torch.device, channels_last: bool):
        self._loader, self._device, self._channels_last = loader, device, channels_last
        self.epoch, self.batch_in_epoch = loader.epoch, loader.start_batch
        self._it: Iterator[dict] | None = None

    @property
    def corrupt_count(self) -> int:
        return self._loader.corrupt_count

    @property
    def batches_per_epoch(self) -> int:
        return len(self._loader)

    @property
    def dropped_samples(self) -> int:
        """Samples of the split left out of each epoch on all ranks together (loader.py explains the remainder)."""
        return self._loader.dropped_samples

    def __iter__(self) -> "TrainBatches":
        return self

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


def open_train_batches(data_cfg, *, rank: int, world: int, device: torch.device, epoch: int, batch_in_epoch: int,
                       channels_last: bool) -> TrainBatches:
    """This rank's training batches from (epoch, batch_in_epoch) on (a checkpoint's position, or 0, 0)."""
    placement = resolve_placement(data_cfg, torch.device(device))
    loader = make_loader(data_cfg.shards, "train", data_cfg.batch_size, rank=rank, world_size=world,
                         workers=data_cfg.workers, seed=data_cfg.seed, epoch=epoch, resampled=data_cfg.resampled,
                         start_batch=batch_in_epoch)
    batches = TrainBatches(loader, torch.device(device), channels_last)
    batches.placement = placement
    return batches


def iter_val_batches(data_cfg, *, rank: int, world: int, device: torch.device, max_batches: int,
                     channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_batches` validation batches of this rank: a fixed order (epoch 0, seed data.seed), the last
    batch possibly short (nothing dropped beyond the N mod world remainder), no RNG drawn, no workers."""
    loader = make_loader(data_cfg.shards, "val", data_cfg.batch_size, rank=rank, world_size=world, workers=0,
                         seed=data_cfg.seed, epoch=0, drop_last=False)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        yield to_float(batch, torch.device(device), channels_last=channels_last)
