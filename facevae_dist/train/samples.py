"""The sample grid a training run writes every `sample_every` steps (samples/step_N.png)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facevae_dist.config import TrainConfig
from facevae_dist.fileio import atomic_write_bytes
from facevae_dist.model import FaceVAE


@torch.no_grad()
def write_sample_grid(model: FaceVAE, val_batches, cfg: TrainConfig, path: Path, n: int = 8) -> np.ndarray | None:
    """Rows of input | reconstruction | predicted mask | ground-truth mask (checkerboard where a model has no mask
    head). The reconstruction is the inference output (z = mu; mask+decoder composites with its predicted mask).
    Returns the grid (HxWx3 uint8, for the trackers), or None without a val batch."""
    batch = next(iter(val_batches), None)
    if batch is None:
        return None
    image, mask = batch[0][:n], batch[1][:n]
    model.eval()
    out = model.reconstruct(image, mask if cfg.model.mask_mode == "mask" else None)
    model.train()
    if out.mask_pred is not None:
        pred = out.mask_pred
    else:  # no mask head: a checkerboard, so it cannot be mistaken for an undecided (0.5) prediction
        h, w = mask.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pred = (((yy // 4 + xx // 4) % 2) * 0.5 + 0.25).to(mask)[None, None].expand_as(mask)
    cols = [image, out.recon, pred.expand_as(image), mask.expand_as(image)]
    rows = torch.cat([torch.cat([c[i].float().cpu() for c in cols], dim=2) for i in range(image.shape[0])], dim=1)
    arr = (rows.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return arr
