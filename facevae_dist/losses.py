"""The paper's losses, as in the authors' Keras code (`VAE2train.add_losses`, `SSIMLoss`, `BCELoss`, `KLLoss`).

Reductions follow Keras exactly: l1/l2 are global means over all B*C*H*W values, background included (for mask
models the composite's background error is exactly 0, so the effective weight scales with the face area);
SSIM is TF's `tf.image.ssim` (9x9 Gaussian, sigma 1.5, VALID window, per channel); KL is a mean over batch and
latent dims; BCE is Keras' clipped BCE; Dice is batch-global with squared denominators.

Every term is computed in fp32 with autocast off: bf16 SSIM statistics are badly wrong (the
variance terms are small differences of large means, which bf16's 8-bit mantissa cannot hold).
The returned terms are the *weighted* contributions, so `loss == sum of the terms` (as the paper's logs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facevae_dist.config import LossConfig  # the config lives on the torch-free ground floor
from facevae_dist.errors import UsageError

_KERAS_EPS = 1e-7


# ---- SSIM (TF 2.x tf.image.ssim semantics) ------------------------------------------------------------------


def gaussian_window(size: int = 9, sigma: float = 1.5, device=None) -> torch.Tensor:
    """TF's normalised 1-D Gaussian (softmax of -x^2 / 2 sigma^2), fp32."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.softmax(-(x**2) / (2 * sigma**2), 0).to(torch.float32).to(device)


_WINDOWS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _separable_kernels(size: int, sigma: float, channels: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise conv weights [C,1,1,k] (along W) and [C,1,k,1] (along H), built once per (device, dtype, ...)."""
    key = (size, sigma, channels, str(device), dtype)
    if key not in _WINDOWS:
        win = gaussian_window(size, sigma, device).to(dtype)
        _WINDOWS[key] = (win.view(1, 1, 1, size).repeat(channels, 1, 1, 1).contiguous(),
                         win.view(1, 1, size, 1).repeat(channels, 1, 1, 1).contiguous())
    return _WINDOWS[key]


def _filter_valid(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel of x, VALID (no padding): two depthwise 1-D convolutions,
    2k multiply-adds per output value (a 2-D window or banded GEMMs would be k^2 or ~H+W). x: [B, C, H, W]."""
    c = x.shape[1]
    along_w, along_h = _separable_kernels(size, sigma, c, x.device, x.dtype)
    return F.conv2d(F.conv2d(x, along_w, groups=c), along_h, groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 9, sigma: float = 1.5, max_val: float = 1.0) -> torch.Tensor:
    """Per-image SSIM [B] as tf.image.ssim(x, y, max_val, filter_size=window): per-channel mean of
    luminance * contrast-structure over the VALID map, then the mean over channels. fp32, autocast off."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two [B,C,H,W] tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise UsageError(f"SSIM window {window} is larger than the image ({x.shape[-2]}x{x.shape[-1]}); "
                         "lower loss.ssim_window")
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
        n = x.shape[1]
        stats = _filter_valid(torch.cat([x, y, x * x + y * y, x * y], 1), window, sigma)
        mu_x, mu_y, e_sq, e_xy = stats[:, :n], stats[:, n:2 * n], stats[:, 2 * n:3 * n], stats[:, 3 * n:]
        num0 = 2 * mu_x * mu_y
        den0 = mu_x * mu_x + mu_y * mu_y
        luminance = (num0 + c1) / (den0 + c1)
        cs = (2 * e_xy - num0 + c2) / (e_sq - den0 + c2)
        return (luminance * cs).mean(dim=(-2, -1)).mean(dim=-1)


# ---- KL, BCE, Dice ---------------------------------------------------------------------------------------------


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, sampling: str = "standard") -> torch.Tensor:
    """Unweighted KL, mean over batch and latent dims (the paper's reduction).
    "standard": logvar is log sigma^2. "paper": the released code's formula for s = log sigma."""
    mu, logvar = mu.float(), logvar.float()
    if sampling == "paper":
        return -0.5 * torch.mean(1 + 2 * logvar - mu.square() - torch.exp(2 * logvar))
    return -0.5 * torch.mean(1 + logvar - mu.square() - torch.exp(logvar))


def keras_bce(target: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """tf.keras BinaryCrossentropy on probabilities: clip to [eps, 1-eps], log(p + eps), global mean."""
    p = prob.float().clamp(_KERAS_EPS, 1 - _KERAS_EPS)
    t = target.float()
    return -torch.mean(t * torch.log(p + _KERAS_EPS) + (1 - t) * torch.log(1 - p + _KERAS_EPS))


def dice_loss(target: torch.Tensor, prob: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum|t p| + smooth) / (sum t^2 + sum p^2 + smooth + 1e-8), summed over the whole batch at once."""
    t, p = target.float(), prob.float()
    return 1 - (2 * torch.sum(torch.abs(t * p)) + smooth) / (torch.sum(t.square()) + torch.sum(p.square()) + smooth + 1e-8)


# ---- total ------------------------------------------------------------------------------------------------------


def compute_losses(out, image: torch.Tensor, mask: torch.Tensor | None, loss_cfg: LossConfig,
                   model_cfg) -> dict[str, torch.Tensor]:
    """Weighted loss terms and their sum "loss", all fp32 scalars.

    Image terms compare `out.recon` (the GT-mask composite for mask models, the raw output otherwise) with
    `image`; "kl" is always on; "bce" and "dice" only for mask_mode "mask+decoder" (they need `mask`)."""
    device_type = image.device.type
    with torch.autocast(device_type, enabled=False):
        recon, target = out.recon.float(), image.float()
        terms: dict[str, torch.Tensor] = {}
        if "l1" in loss_cfg.terms:
            terms["l1"] = loss_cfg.w_l1 * torch.mean(torch.abs(recon - target))
        if "l2" in loss_cfg.terms:
            terms["l2"] = loss_cfg.w_l2 * torch.mean(torch.square(recon - target))
        if "ssim" in loss_cfg.terms:
            s = ssim(target, recon, loss_cfg.ssim_window, loss_cfg.ssim_sigma)
            terms["ssim"] = loss_cfg.w_ssim * torch.mean(2 - s)
        terms["kl"] = loss_cfg.kl_factor * kl_divergence(out.mu, out.logvar, model_cfg.sampling)
        if model_cfg.mask_mode == "mask+decoder":
            if mask is None or out.mask_pred is None:
                raise UsageError("mask_mode 'mask+decoder' needs the ground-truth mask and a predicted mask for BCE/Dice")
            terms["bce"] = loss_cfg.w_bce * keras_bce(mask, out.mask_pred)
            terms["dice"] = loss_cfg.w_dice * dice_loss(mask, out.mask_pred)
        total = torch.stack(list(terms.values())).sum()
    return {"loss": total, **terms}
