"""Validation during training: the mean loss terms over a few validation batches per rank."""

from __future__ import annotations

import contextlib

import torch

from facevae_dist.config import TrainConfig
from facevae_dist.data.batches import iter_val_batches
from facevae_dist.losses import compute_losses


class Validator:
    """Mean loss terms over cfg.val_batches batches per rank. z = mu, or with val_sampling="sample" z drawn from a
    generator seeded by (seed, step) inside a forked RNG: the training noise streams are never touched."""

    def __init__(self, cfg: TrainConfig, raw_model, accelerator, amp_dtype):
        self.cfg, self.model, self.accelerator, self.amp_dtype = cfg, raw_model, accelerator, amp_dtype
        self.device = accelerator.device

    def batches(self, max_batches: int):
        return iter_val_batches(self.cfg.data, rank=self.accelerator.process_index,
                                world=self.accelerator.num_processes, device=self.device, max_batches=max_batches,
                                channels_last=self.cfg.channels_last)

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        cfg, sample = self.cfg, self.cfg.val_sampling == "sample"
        sums: dict[str, torch.Tensor] = {}
        n = torch.zeros((), device=self.device)
        self.model.eval()
        with self._rng(step) if sample else contextlib.nullcontext():
            for image, mask in self.batches(cfg.val_batches):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.model(image, mask if cfg.model.mask_mode != "none" else None, sample=sample)
                for k, v in compute_losses(out, image, mask, cfg.loss, cfg.model).items():
                    sums[k] = sums.get(k, 0) + v.detach() * image.shape[0]
                n += image.shape[0]
        self.model.train()
        keys = sorted(sums)
        totals = self.accelerator.reduce(torch.stack([n] + [sums[k] for k in keys]) if keys else n[None], "sum")
        totals = totals.tolist()
        if totals[0] == 0:
            return {}
        return {k: totals[i + 1] / totals[0] for i, k in enumerate(keys)}

    @contextlib.contextmanager
    def _rng(self, step: int):
        seed = (self.cfg.seed * 1_000_003 + step) * 64 + self.accelerator.process_index
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)
            yield
