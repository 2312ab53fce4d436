"""Losses: TF-style SSIM vs pytorch_msssim and a numpy reference, KL forms, Keras BCE, batch Dice, fp32 under autocast."""

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from pytorch_msssim import ssim as msssim_ssim

from facevae_dist.errors import UsageError
from facevae_dist.losses import LossConfig, compute_losses, dice_loss, gaussian_window, keras_bce, kl_divergence, ssim
from facevae_dist.model import FaceVAE, ModelConfig, VAEOutput

torch.set_num_threads(1)


def pair(b=2, c=3, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, size, size, generator=g)
    y = (x + 0.2 * torch.randn(b, c, size, size, generator=g)).clamp(0, 1)
    return x, y


def numpy_ssim(x: np.ndarray, y: np.ndarray, size=9, sigma=1.5) -> np.ndarray:
    """Straight from the TF definition, in float64, one window position at a time (vectorised)."""
    r = np.arange(size) - (size - 1) / 2
    g1 = np.exp(-r**2 / (2 * sigma**2))
    g1 /= g1.sum()
    w = np.outer(g1, g1)
    c1, c2 = 0.01**2, 0.03**2

    def filt(a):  # [B,C,H,W] -> valid
        return np.einsum("bchwij,ij->bchw", sliding_window_view(a, (size, size), axis=(2, 3)), w)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    m = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * sxy + c2) / (sxx + syy + c2)
    return m.mean(axis=(2, 3)).mean(axis=1)


def test_gaussian_window_is_tf_softmax_form():
    w = gaussian_window(9, 1.5)
    assert w.shape == (9,) and abs(float(w.sum()) - 1) < 1e-6
    assert torch.argmax(w) == 4 and torch.allclose(w, w.flip(0))


def test_ssim_matches_numpy_reference_and_pytorch_msssim():
    x, y = pair()
    ours = ssim(x, y, window=9)
    ref = numpy_ssim(x.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-6)
    theirs = msssim_ssim(x, y, data_range=1.0, win_size=9, win_sigma=1.5, size_average=False)
    assert torch.allclose(ours, theirs, atol=2e-6)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)


def test_ssim_refuses_window_larger_than_image():
    x, y = pair(size=8)
    with pytest.raises(UsageError, match="ssim_window"):
        ssim(x, y, window=9)


def test_kl_standard_matches_closed_form_and_paper_form():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(kl_divergence(mu, logvar, "standard"), torch.distributions.kl_divergence(q, p).mean(),
                          atol=1e-6)
    # the released code's KL treats its output s as log sigma: the exact KL of N(mu, exp(s)^2)
    q_paper = torch.distributions.Normal(mu, torch.exp(logvar))
    assert torch.allclose(kl_divergence(mu, logvar, "paper"), torch.distributions.kl_divergence(q_paper, p).mean(),
                          atol=1e-5)
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), "paper") == 0


def test_bce_and_dice_known_values():
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = torch.tensor([0.9, 0.2, 1.0, 0.0])
    eps = 1e-7
    expected = -np.mean([math.log(0.9 + eps), math.log(0.8 + eps), math.log(1 - eps + eps), math.log(1 - eps + eps)])
    assert abs(float(keras_bce(t, p)) - expected) < 1e-6
    # perfect prediction: (2*2+1)/(2+2+1+1e-8)
    assert abs(float(dice_loss(t, t)) - (1 - 5 / (5 + 1e-8))) < 1e-7
    # batch-global sums, squared denominators: 2*1.9 vs 2 + 0.81+0.04+1
    assert abs(float(dice_loss(t, p)) - (1 - (2 * 1.9 + 1) / (2 + 0.81 + 0.04 + 1 + 1 + 1e-8))) < 1e-6
    # batch-global, not per image: a [2, ...] split gives the same value as one flat vector
    assert torch.allclose(dice_loss(t.view(2, 1, 1, 2), p.view(2, 1, 1, 2)), dice_loss(t, p))


def fake_output(recon, mu, logvar, mask_pred=None):
    return VAEOutput(recon_raw=recon, recon=recon, mask_pred=mask_pred, mu=mu, logvar=logvar, z=mu)


def test_compute_losses_weights_and_terms():
    x, y = pair()
    mu, logvar = torch.randn(2, 8), torch.randn(2, 8)
    mask = (torch.rand(2, 1, 24, 24) > 0.5).float()
    mp = torch.rand(2, 1, 24, 24)
    out = fake_output(y, mu, logvar, mp)
    lc = LossConfig(terms=("ssim", "l1", "l2"))
    losses = compute_losses(out, x, mask, lc, ModelConfig(mask_mode="mask+decoder"))
    assert set(losses) == {"loss", "l1", "l2", "ssim", "kl", "bce", "dice"}
    assert torch.allclose(losses["l1"], 4 * (y - x).abs().mean())
    assert torch.allclose(losses["l2"], 100 * (y - x).square().mean())
    assert torch.allclose(losses["ssim"], (2 - ssim(x, y)).mean())
    assert torch.allclose(losses["kl"], 1e-3 * kl_divergence(mu, logvar))
    assert torch.allclose(losses["bce"] + losses["dice"], keras_bce(mask, mp) + dice_loss(mask, mp))
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    none = compute_losses(out, x, None, LossConfig(terms=("l2",)), ModelConfig(mask_mode="none", sampling="paper"))
    assert set(none) == {"loss", "l2", "kl"}
    assert torch.allclose(none["kl"], 1e-3 * kl_divergence(mu, logvar, "paper"))


def test_losses_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = FaceVAE(ModelConfig(image_size=18, width=0.125, latent_dim=8, mask_mode="mask+decoder"))
    x, _ = pair(size=18)
    mask = torch.ones(2, 1, 18, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
        losses = compute_losses(out, x, mask, LossConfig(terms=("ssim", "l1", "l2")), model.cfg)
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(torch.isfinite(v) for v in losses.values())
    # SSIM of bf16-rounded inputs would be visibly off; ours is computed on fp32 copies
    xb = x.bfloat16()
    assert ssim(xb, x).dtype == torch.float32
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_config_validation():
    assert LossConfig().validate().terms == ("ssim", "l1")
    assert LossConfig(terms=["l2"]).terms == ("l2",)
    for bad in (dict(terms=()), dict(terms=("l3",)), dict(terms=("l1", "l1")), dict(w_l1=-1.0),
                dict(kl_factor=float("nan")), dict(ssim_window=8)):
        with pytest.raises(UsageError):
            LossConfig(**bad).validate()
    assert LossConfig.from_dict(LossConfig(terms=("l1",), w_l1=2.0).to_dict()) == LossConfig(terms=("l1",), w_l1=2.0)
