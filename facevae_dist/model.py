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

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from facevae_dist.config import IMAGE_SIZES, ModelConfig  # the config lives on the torch-free ground floor
from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json, read_json
from facevae_dist.model_card import LIBRARY, TAGS, card_text

__all__ = ["FaceVAE", "ModelConfig", "VAEOutput", "composite"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FORMAT = "facevae-dist/FaceVAE"
_FORMAT_VERSION = 2  # 2: config.json flat (the ModelConfig fields at the top level); 1: nested under "model"

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
        # In place: BatchNorm's backward does not need its output, and ELU's backward then reads its own output
        # (grad * (out + 1)) instead of recomputing exp(x), saving one activation per block.
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), _keras_bn(cout), nn.ELU(inplace=True))


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
        self.act = nn.ELU(inplace=True)  # see ConvBlock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.convolve(x)))

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The transposed convolution with its bias (and TF's crop where asked)."""
        n_h, n_w = x.shape[-2:]
        if x.device.type == "cpu":
            # The bias added apart: oneDNN computes a transposed convolution's weight gradient 2-4x slower when the
            # bias is fused into it (docs/performance.md); the sum is the same and so are the parameters.
            conv = self.conv
            x = F.conv_transpose2d(x, conv.weight, None, conv.stride, conv.padding, conv.output_padding)
            x = x + conv.bias.to(x.dtype)[:, None, None]
        else:
            x = self.conv(x)
        if self.crop:
            x = x[..., : 2 * n_h, : 2 * n_w]
        return x


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


class FaceVAE(nn.Module, PyTorchModelHubMixin, library_name=LIBRARY, tags=list(TAGS)):
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

    # ---- saving and loading: huggingface_hub's PyTorchModelHubMixin ----------------------------------------
    # The mixin gives save_pretrained / from_pretrained / push_to_hub for local folders and Hub repo ids; the hooks
    # below keep this project's files (config.json flat, model.safetensors written atomically), refuse weights
    # that do not match their config before reading them, and still load exports written before the mixin (their
    # config.json nested the fields under "model").

    def save_pretrained(self, save_directory: str | Path, *, model_card: bool = True, **hub_kwargs) -> Path | str:
        """Write model.safetensors + config.json (each atomically) and, unless model_card=False, a model card
        README.md (FaceVAE.generate_model_card; model_card_kwargs=... feeds it). Returns the directory, or the
        commit URL with push_to_hub=True (any other argument of PyTorchModelHubMixin.save_pretrained is passed on)."""
        directory = Path(save_directory)
        if not model_card:  # checkpoints: the weights and config only
            directory.mkdir(parents=True, exist_ok=True)
            self._save_pretrained(directory)
            return directory
        pushed = super().save_pretrained(directory, **hub_kwargs)
        return pushed if hub_kwargs.get("push_to_hub") else directory

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(save_directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        atomic_write_json(save_directory / CONFIG_FILE, {"format": _FORMAT, "format_version": _FORMAT_VERSION,
                                                         **self.cfg.to_dict()})

    def generate_model_card(self, *args, **kwargs):
        """The model card README.md: what the model is, its profile and how to load it; an export adds what it was
        trained on, for how long and how it scored (facevae_dist/model_card.py)."""
        return ModelCard(card_text(self.cfg.to_dict(), parameters=self.num_trainable_parameters(),
                                   hub_tags=self._hub_mixin_info.model_card_data.tags, **kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, map_location: str | torch.device = "cpu",
                        **hub_kwargs) -> "FaceVAE":
        """A FaceVAE from a local folder written by save_pretrained (or by `facevae export`, either config.json
        layout) or from a Hugging Face Hub repo id ("user/name", downloaded by huggingface_hub). A missing or
        damaged file, or weights that do not match config.json, is one FaceVAEError line naming the file."""
        where = str(pretrained_model_name_or_path)
        if Path(where).exists() or not _HUB_ID.match(where):
            _read_config(Path(where) / CONFIG_FILE)  # before the mixin reads it: a clear error, not a traceback
        try:
            return super().from_pretrained(where, map_location=str(map_location), **hub_kwargs)
        except FaceVAEError:
            raise
        except Exception as exc:  # the Hub's own errors (no network, no such repo, no access): one line
            raise FaceVAEError(f"{where}: not a local model directory, and the Hugging Face Hub could not provide "
                               f"it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", config: dict | None = None,
                         **unused) -> "FaceVAE":
        """The mixin's loading hook: `config` is the config.json it read (locally or from the Hub)."""
        if Path(model_id).is_dir():
            folder = Path(model_id)
        else:
            folder = Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_FILE, revision=revision,
                                          cache_dir=cache_dir, force_download=force_download, token=token,
                                          local_files_only=local_files_only)).parent
        cfg_path = folder / CONFIG_FILE
        if config is None:
            raise FaceVAEError(f"{model_id}: no {CONFIG_FILE} (expected a model written by FaceVAE.save_pretrained)")
        return cls._load_weights(_config_from_json(config, cfg_path), folder / WEIGHTS_FILE, cfg_path, map_location)

    @classmethod
    def _load_weights(cls, cfg: ModelConfig, w_path: Path, cfg_path: Path, map_location) -> "FaceVAE":
        """Refuses weights that do not match the config, from the file header, before any weights are read."""
        if not w_path.is_file():
            raise FaceVAEError(f"{w_path}: missing (expected a directory written by FaceVAE.save_pretrained)")
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
        return model.eval()


# A Hugging Face Hub repo id ("name" or "owner/name"); a string that is not one, or names an existing path, is a
# local folder (so a missing local folder is an error about that folder, not a network request).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def _read_config(cfg_path: Path) -> dict:
    """config.json as a dict; a missing, unreadable or non-object file -> one FaceVAEError line naming it."""
    if not cfg_path.is_file():
        raise FaceVAEError(f"{cfg_path}: missing (expected a directory written by FaceVAE.save_pretrained)")
    meta = read_json(cfg_path, fix="not a valid FaceVAE config; re-export the model (`facevae export RUN_DIR --out "
                     "DIR`)", error=FaceVAEError)
    if not isinstance(meta, dict):
        raise FaceVAEError(f"{cfg_path}: not a valid FaceVAE config (a JSON {type(meta).__name__}, not an object); "
                           "re-export the model (`facevae export RUN_DIR --out DIR`)")
    _config_from_json(meta, cfg_path)
    return meta


def _config_from_json(meta: dict, cfg_path: Path) -> ModelConfig:
    """The ModelConfig of a config.json: flat (the constructor's fields at the top level, with format and
    format_version) or the layout of exports written before format_version 2 ({"format": ..., "model": {...}})."""
    try:
        if isinstance(meta.get("model"), dict) and "format_version" not in meta:
            return ModelConfig.from_dict(meta["model"])
        return ModelConfig.from_dict({k: v for k, v in meta.items() if k not in ("format", "format_version")})
    except (TypeError, FaceVAEError) as exc:
        raise FaceVAEError(f"{cfg_path}: not a valid FaceVAE config ({exc}); re-export the model "
                           "(`facevae export RUN_DIR --out DIR`)") from None


def composite(recon_raw: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Face from the decoder, background from the input: recon * m + image * (1 - m), in fp32."""
    m = mask.float()
    return recon_raw.float() * m + image.float() * (1.0 - m)
