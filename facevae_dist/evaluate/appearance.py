"""Colour cast and hair sharpness: the paper's two visual claims (C9, C10) as per-image measures.

- Colour (C9, "SSIM alone shifts skin colour toward magenta/red; adding l1/l2 fixes it"): both images are converted
  to CIELAB (sRGB, D65). On ground-truth face pixels, `da` and `db` are the mean signed differences of a* and b*
  (reconstruction minus input: +a* is toward red/magenta, +b* toward yellow), `colour_shift` = sqrt(da² + db²) is
  the size of that mean cast (a blur leaves it near 0; a hue rotation does not), and `delta_e` is the mean per-pixel
  CIE76 ΔE (every colour error, cast or not).
- Hair (C10, "mask models give sharper hair"): `hair_sharpness` = the Laplacian energy of the reconstruction's luma
  on hair pixels divided by the input's (1 = as sharp as the input, below 1 = blurrier). Undefined (NaN) where an
  image has fewer than MIN_HAIR_PIXELS hair pixels or no hair texture. Hair pixels come from label maps: the
  synthetic source's generator re-renders them exactly (the same resize as the shards' masks); shards of other
  sources carry no label maps, so there the measure is undefined.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facevae_dist.data import synthetic
from facevae_dist.data.shards import ShardOptions, _resized
from facevae_dist.data.sources import Record

MEASURES = ("da", "db", "colour_shift", "delta_e", "hair_sharpness")
DEFINITIONS = {
    "da": "mean signed CIELAB a* difference (reconstruction − input) on GT face pixels; + is toward red/magenta",
    "db": "mean signed CIELAB b* difference (reconstruction − input) on GT face pixels; + is toward yellow",
    "colour_shift": "sqrt(da² + db²): the size of the mean colour cast on GT face pixels (CIELAB units)",
    "delta_e": "mean per-pixel CIE76 ΔE between reconstruction and input on GT face pixels",
    "hair_sharpness": ("Laplacian energy of the reconstruction's luma on hair pixels / the input's "
                       "(1 = as sharp as the input, < 1 = blurrier)"),
}
HAIR_LABEL = 17  # face-parsing numbering, as the synthetic generator draws it
MIN_HAIR_PIXELS = 8
_FACE_THRESHOLD = 0.5
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] sRGB in [0, 1] -> [B, 3, H, W] CIELAB (L* 0..100, a*, b*), D65 white."""
    rgb = rgb.float().clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def colour_measures(recon: torch.Tensor, target: torch.Tensor, face: torch.Tensor) -> dict[str, torch.Tensor]:
    """{da, db, colour_shift, delta_e}: [B] each, on the pixels where `face` [B, 1, H, W] >= 0.5 (NaN: none)."""
    w = (face.float() >= _FACE_THRESHOLD).float()
    n = w.sum(dim=(1, 2, 3))
    diff = srgb_to_lab(recon) - srgb_to_lab(target)  # [B, 3, H, W]
    mean = (diff * w).sum(dim=(2, 3)) / n[:, None]  # [B, 3]: NaN where no face pixel (0/0)
    de = (diff.pow(2).sum(1, keepdim=True).sqrt() * w).sum(dim=(1, 2, 3)) / n
    return {"da": mean[:, 1], "db": mean[:, 2], "colour_shift": mean[:, 1:].pow(2).sum(1).sqrt(), "delta_e": de}


def _laplacian_energy(x: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the squared Laplacian of luma over region pixels, their count) per image; only pixels whose 3x3
    neighbourhood lies inside the image count (no padding: a border would add edges of its own)."""
    x = x.float().clamp(0, 1)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    kernel = torch.tensor(_LAPLACE, dtype=luma.dtype, device=luma.device).view(1, 1, 3, 3)
    lap = F.conv2d(luma, kernel)  # [B, 1, H-2, W-2]
    inner = region[:, :, 1:-1, 1:-1].float()
    return (lap.pow(2) * inner).sum(dim=(1, 2, 3)), inner.sum(dim=(1, 2, 3))


def hair_sharpness(recon: torch.Tensor, target: torch.Tensor, hair: torch.Tensor) -> torch.Tensor:
    """[B]: Laplacian energy of `recon` / that of `target` on pixels where `hair` [B, 1, H, W] >= 0.5; NaN where
    an image has fewer than MIN_HAIR_PIXELS such pixels or the input's hair has no texture."""
    region = hair.float() >= _FACE_THRESHOLD
    e_rec, n = _laplacian_energy(recon, region)
    e_in, _ = _laplacian_energy(target, region)
    ratio = e_rec / e_in
    return torch.where((n >= MIN_HAIR_PIXELS) & (e_in > 0), ratio, torch.full_like(ratio, float("nan")))


def score(recon: torch.Tensor, target: torch.Tensor, face: torch.Tensor,
          hair: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every measure of MEASURES for one batch: {name: [B] fp32} (hair_sharpness NaN without hair masks)."""
    with torch.autocast(device_type=recon.device.type, enabled=False):
        out = colour_measures(recon, target, face)
        out["hair_sharpness"] = (hair_sharpness(recon, target, hair) if hair is not None
                                 else torch.full((recon.shape[0],), float("nan"), device=recon.device))
    return out


class HairMasks:
    """Hair masks at the shards' size for the samples of one split, by sample key, or None where the shards' source
    has no label maps to take them from (only the synthetic source: its generator re-renders any face exactly)."""

    def __init__(self, shards_dir: str | Path, manifest: dict, split: str):
        self.why_not: str | None = None
        source = manifest.get("source") or {}
        if source.get("name") != "synthetic":
            self.why_not = (f"the shards' source is {source.get('name')!r}: hair labels exist only for the synthetic "
                            "source (shards keep the face mask, not the label map)")
            return
        self.seed, self.width, self.height = int(source["seed"]), int(source["width"]), int(source["height"])
        self.opts = ShardOptions(**{k: v for k, v in manifest["options"].items()
                                    if k in ShardOptions.__dataclass_fields__})
        self.source_ids = _source_ids(Path(shards_dir), manifest, split)
        self.cache: dict[str, np.ndarray] = {}

    def batch(self, keys: list[str], device: torch.device) -> torch.Tensor | None:
        """[B, 1, H, W] float 0..1 soft hair masks for `keys` (None when unavailable)."""
        if self.why_not is not None:
            return None
        rows = [self._one(k) for k in keys]
        return torch.from_numpy(np.stack(rows)).to(device).float().div_(255).unsqueeze(1)

    def _one(self, key: str) -> np.ndarray:
        if key not in self.cache:
            index = int(self.source_ids[key]) - 1  # synthetic source ids are 1-based image numbers ("000001")
            face = synthetic.render_face(self.seed, index, self.width, self.height)
            record = Record(key, "", face.image, mask=face.label == HAIR_LABEL)
            self.cache[key] = _resized(record, self.opts)[1]  # resized exactly like the shards' face masks
        return self.cache[key]


def _source_ids(shards_dir: Path, manifest: dict, split: str) -> dict[str, str]:
    """{sample key: source_id} from the json field of every sample of `split` (read straight from the tar files)."""
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards_dir / shard["path"]) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.load(io.TextIOWrapper(tar.extractfile(member), encoding="utf-8"))
                    out[member.name.rsplit("/", 1)[-1].split(".", 1)[0]] = meta["source_id"]
    return out
