"""The paper's VAE (Toledo & Antonelo 2021), an exact PyTorch port of the authors' Keras code.

Encoder: 11 conv3x3+BN+ELU blocks and 7 max-pools, 144 -> 1x1x512; Dense 512 + ELU; mu / logvar (512 each).
Image decoder: 7 (stride-2 ConvTranspose block, conv block) stages 1 -> 2 -> 4 -> 9 -> ... -> 144 (the third
transposed conv is 'valid', 4 -> 9), 256 down to 32 channels, 3-channel sigmoid head. Mask decoder: the same
layout with 32 channels everywhere and a 1-channel sigmoid head. Both decoders read the same z.

Keras defaults that matter are reproduced: BatchNorm momentum 0.99 (0.01 in PyTorch terms) and eps 1e-3,
glorot-uniform kernels with zero bias. TF's 'same' transposed conv keeps the leading 2n rows/cols of the full
output, PyTorch's the trailing 2n; `tf_same_crop=True` reproduces TF exactly, the default uses PyTorch's faster form.
Trainable parameters: 9,328,228 with the mask decoder, 9,059,331 without (see tests/test_model.py).

`width` scales every channel count and `image_size` may be 9 * 2**k (144, 72, 36, 18, 9): smaller sizes drop the
leading high-resolution encoder stages and the trailing decoder stages, so tests run the same architecture fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from facevae_dist.config import IMAGE_SIZES, ModelConfig  # the config lives on the torch-free ground floor
from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json

__all__ = ["FaceVAE", "ModelConfig", "VAEOutput", "composite"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FORMAT = "facevae-dist/FaceVAE"

# Encoder stages above 9x9 resolution: (channels, conv blocks), each followed by a 2x2 max-pool.
_ENCODER_HIGH = ((32, 2), (64, 2), (128, 2), (256, 2))
assert len(IMAGE_SIZES) == len(_ENCODER_HIGH) + 1  # each high stage halves the size: 144 -> ... -> 9
# The fixed tail 9 -> 4 -> 2 -> 1: one conv block then a max-pool each.
_ENCODER_LOW = (256, 256, 512)
# Image decoder: channels of (ConvT, ConvBlock) stages 1->2->4->9, then the stages above 9x9.
_DECODER_LOW = (256, 256, 256)
_DECODER_HIGH = (128, 64, 32, 32)
_MASK_CHANNELS = 32


@dataclass
class VAEOutput:
    recon_raw: torch.Tensor  # [B,3,H,W] decoder output (sigmoid), fp32
    recon: torch.Tensor  # [B,3,H,W] what the losses see: the composite for mask modes, else recon_raw
    mask_pred: torch.Tensor | None  # [B,1,H,W] predicted soft mask ("mask+decoder" only), fp32
    mu: torch.Tensor  # [B,latent] fp32
    logvar: torch.Tensor  # [B,latent] fp32, clamped; log-variance ("standard") or the code's `s` ("paper")
    z: torch.Tensor  # [B,latent] fp32


class ConvBlock(nn.Sequential):
    """Keras Conv2D(3x3, 'same') -> BatchNormalization -> ELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), _keras_bn(cout), nn.ELU())


class ConvTBlock(nn.Module):
    """Keras Conv2DTranspose(3x3, stride 2, padding) -> BatchNormalization -> ELU.

    'valid' is ConvTranspose2d(padding=0) (n -> 2n+1). For 'same' (n -> 2n), TF drops the *trailing*
    row/column of the full 2n+1 output (tf_crop=True reproduces that by cropping); PyTorch's
    padding=1/output_padding=1 drops the leading one instead, with the same parameters."""

    def __init__(self, cin: int, cout: int, padding: str, tf_crop: bool = False):
        super().__init__()
        self.crop = padding == "same" and tf_crop
        if padding == "same" and not tf_crop:
            self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        else:
            self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=0)
        self.bn = _keras_bn(cout)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_h, n_w = x.shape[-2:]
        x = self.conv(x)
        if self.crop:
            x = x[..., : 2 * n_h, : 2 * n_w]
        return self.act(self.bn(x))


def _keras_bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, ch):
        super().__init__()
        n_high = int(math.log2(cfg.image_size // 9))
        layers: list[nn.Module] = []
        cin = 3
        for channels, n_blocks in _ENCODER_HIGH[len(_ENCODER_HIGH) - n_high:]:
            for _ in range(n_blocks):
                layers.append(ConvBlock(cin, ch(channels)))
                cin = ch(channels)
            layers.append(nn.MaxPool2d(2))
        for channels in _ENCODER_LOW:
            layers += [ConvBlock(cin, ch(channels)), nn.MaxPool2d(2)]
            cin = ch(channels)
        self.layers = nn.Sequential(*layers)
        self.out_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.layers(x), 1)


class Decoder(nn.Module):
    """(ConvT, ConvBlock) stages from 1x1 to the image size, then a 3x3 sigmoid head (applied in forward)."""

    def __init__(self, cfg: ModelConfig, channels: list[int], out_channels: int):
        super().__init__()
        paddings = ["same", "same", "valid"] + ["same"] * (len(channels) - 3)
        stages: list[nn.Module] = []
        cin = cfg.latent_dim
        for c, pad in zip(channels, paddings):
            stages += [ConvTBlock(cin, c, pad, cfg.tf_same_crop), ConvBlock(c, c)]
            cin = c
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stages(z[:, :, None, None])
        # sigmoid in fp32: under bf16 autocast, probabilities near 0/1 (BCE, compositing) would lose precision.
        return torch.sigmoid(self.head(x).float())


class FaceVAE(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = (cfg or ModelConfig()).validate()
        width = float(self.cfg.width)

        def ch(n: int) -> int:
            return max(1, int(round(n * width)))

        n_high = int(math.log2(self.cfg.image_size // 9))
        self.encoder = Encoder(self.cfg, ch)
        self.fc = nn.Linear(self.encoder.out_features, self.cfg.latent_dim)
        self.fc_mu = nn.Linear(self.cfg.latent_dim, self.cfg.latent_dim)
        self.fc_logvar = nn.Linear(self.cfg.latent_dim, self.cfg.latent_dim)
        image_channels = [ch(c) for c in _DECODER_LOW + _DECODER_HIGH[:n_high]]
        self.decoder = Decoder(self.cfg, image_channels, 3)
        if self.cfg.has_mask_decoder:
            self.mask_decoder = Decoder(self.cfg, [ch(_MASK_CHANNELS)] * len(image_channels), 1)
        else:
            self.mask_decoder = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: glorot-uniform kernels, zero biases, BN gamma=1 beta=0 (fresh running stats)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                # Glorot depends on fan_in + fan_out only, so PyTorch's (in, out) order for ConvTranspose is moot.
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    # ---- forward passes -------------------------------------------------------------------------------------

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.elu(self.fc(self.encoder(image)))
        lo, hi = self.cfg.logvar_clamp
        # Latent statistics in fp32: exp(logvar) and the KL are sensitive to bf16 rounding.
        return self.fc_mu(h).float(), self.fc_logvar(h).float().clamp(lo, hi)

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(mu)
        if self.cfg.sampling == "paper":
            # The released code: the "log-variance" output is used directly as the noise scale (signed, no exp).
            return mu + eps * logvar
        return mu + eps * torch.exp(0.5 * logvar)

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, sample: bool = True) -> VAEOutput:
        """Training pass. Mask modes composite with the ground-truth `mask` (required) so that background
        pixels equal the input's and get zero gradient; "none" returns the raw decoder output."""
        mode = self.cfg.mask_mode
        if mode != "none" and mask is None:
            raise UsageError(f"mask_mode={mode!r} needs the ground-truth mask in forward(); "
                             "use reconstruct() for mask-free inference")
        mu, logvar = self.encode(image)
        z = self.sample(mu, logvar) if sample else mu
        recon_raw = self.decoder(z)
        mask_pred = self.mask_decoder(z) if self.mask_decoder is not None else None
        recon = recon_raw if mode == "none" else composite(recon_raw, image, mask)
        return VAEOutput(recon_raw=recon_raw, recon=recon, mask_pred=mask_pred, mu=mu, logvar=logvar, z=z)

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> VAEOutput:
        """Inference as the paper's testing code: z = mu; "mask+decoder" composites with its own predicted soft
        mask (no mask input needed), "mask" with `mask` when given, "none" returns the raw output.
        Call model.eval() first (BN running statistics)."""
        mu, logvar = self.encode(image)
        recon_raw = self.decoder(mu)
        mask_pred = self.mask_decoder(mu) if self.mask_decoder is not None else None
        if mask_pred is not None:
            recon = composite(recon_raw, image, mask_pred)
        elif self.cfg.mask_mode == "mask" and mask is not None:
            recon = composite(recon_raw, image, mask)
        else:
            recon = recon_raw
        return VAEOutput(recon_raw=recon_raw, recon=recon, mask_pred=mask_pred, mu=mu, logvar=logvar, z=mu)

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model.safetensors + config.json (each atomically) into `directory`."""

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": _FORMAT}))
        atomic_write_json(directory / CONFIG_FILE, {"format": _FORMAT, "model": self.cfg.to_dict()})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "FaceVAE":
        """Load a directory written by save_pretrained. Refuses weights that do not match config.json."""

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FaceVAEError(f"{p}: missing (expected a directory written by FaceVAE.save_pretrained)")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg = ModelConfig.from_dict(meta["model"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, FaceVAEError) as exc:
            raise FaceVAEError(f"{cfg_path}: not a valid FaceVAE config ({exc}); re-export the model "
                               "(`facevae export RUN_DIR --out DIR`)") from None
        except RecursionError:  # json nests one Python call per level
            raise FaceVAEError(f"{cfg_path}: not a valid FaceVAE config (JSON nested too deeply); re-export the "
                               "model (`facevae export RUN_DIR --out DIR`)") from None
        try:  # shapes from the file header and from a model on the meta device: a mismatching (or huge) config
            with safe_open(str(w_path), "pt") as f:  # is refused before any weights are read or allocated
                state = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise FaceVAEError(f"{w_path}: unreadable safetensors file ({exc})") from None
        with torch.device("meta"):
            expected = {k: v.shape for k, v in cls(cfg).state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(f"{k} {tuple(state[k])} vs config {tuple(v)}"
                        for k, v in expected.items() if k in state and state[k] != v)
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing tensor(s) e.g. {missing[0]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. {unexpected[0]}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatch(es) e.g. {shapes[0]}")
            raise FaceVAEError(f"{w_path} does not match {cfg_path} (mask_mode={cfg.mask_mode}, width={cfg.width}, "
                               f"image_size={cfg.image_size}): {'; '.join(parts)}")
        try:
            state = load_file(str(w_path), device=str(map_location))
        except (SafetensorError, OSError) as exc:
            raise FaceVAEError(f"{w_path}: unreadable safetensors file ({exc})") from None
        model = cls(cfg).to(map_location)
        model.load_state_dict(state)
        return model


def composite(recon_raw: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Face from the decoder, background from the input: recon * m + image * (1 - m), in fp32."""
    m = mask.float()
    return recon_raw.float() * m + image.float() * (1.0 - m)
