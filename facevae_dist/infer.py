"""Inference on ordinary image files: export a trained model, reconstruct photos, sample and interpolate.

`reconstruct` finds the face in each photo (MediaPipe's offline detector, align.py), crops the region that frames it
as the training images frame faces, squashes that to the model's square input as the shards did, and pastes the
reconstruction back at that region's place and size: every output has the photo's own size, and the composite
changes only the face (the mask, feathered at its edge and at the region's border), the rest of the photo pixel
for pixel. --no-align squashes each whole image instead (the old behaviour: right only for photos already framed
like the training images) and warns when that changes an image's aspect ratio.

What each mask mode does in `reconstruct`:
- "mask+decoder": predicts the face mask itself; writes the reconstruction, the predicted mask and the composite
  (reconstructed face on the original background). No mask input needed (the paper's test-time mode).
- "none": the model has no notion of a mask; writes the reconstruction. With --masks DIR (a <name>.png face mask
  per photo) it also writes the composite with that mask.
- "mask": trained to reconstruct the face under a ground-truth mask but cannot predict one; as "none": the
  reconstruction, and the composite only when --masks gives the mask.
"""

from __future__ import annotations

import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from facevae_dist import outputs
from facevae_dist.align import FaceFinder, Frame, crop, feather, frame_for
from facevae_dist.config import MAX_INTERPOLATION_STEPS, MAX_SAMPLES, load_toml
from facevae_dist.data import imageio
from facevae_dist.data.masks import labelmap_to_mask
from facevae_dist.data.shards import read_manifest
from facevae_dist.devices import resolve_device
from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.evaluate.scoring import EVAL_DIR, METRICS_FILE, load_eval, loss_name
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from facevae_dist.model import CONFIG_FILE, WEIGHTS_FILE, FaceVAE
from facevae_dist.model_card import shards_facts
from facevae_dist.progress import info, make_progress, warn
from facevae_dist.train.checkpoint import load_model, open_model

MODE_NOTES = {
    "mask+decoder": "mask+decoder model: the face mask is predicted, no mask input needed; writes *_recon.png, "
                    "*_mask.png (predicted) and *_composite.png (reconstructed face on the original background)",
    "none": "no-mask model: writes *_recon.png (the whole image is reconstructed); it cannot predict a mask, so "
            "*_composite.png is written only for photos with a mask in --masks DIR",
    "mask": "'mask' model (trained with ground-truth mask compositing, no mask decoder): writes *_recon.png; it "
            "cannot predict a mask, so *_composite.png is written only for photos with a mask in --masks DIR",
}


# ---------------------------------------------------------------------------------------------------------------
# Models

def load_any_model(path: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """A FaceVAE from an exported directory (model.safetensors + config.json) or from a run directory. A path that
    is neither is a usage error (exit 2), as in `facevae eval`."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return FaceVAE.from_pretrained(path, map_location=device).eval()
    if (path / "checkpoints").is_dir() or (path / "best").is_dir():
        return load_model(path, which, map_location=device)[0]
    if not path.exists():
        raise UsageError(f"--model {path}: no such directory; pass an exported model directory (`facevae export`) "
                         "or a run directory (`facevae train`)")
    raise UsageError(f"--model {path}: neither an exported model (model.safetensors + config.json, from `facevae "
                     "export`) nor a run directory (from `facevae train`)")


def training_fit(model_dir: str | Path) -> str:
    """How the model's training shards fitted the aligned frame to the square ("squash" | "center-crop"): from
    export.json's training_data, or the run's shards manifest; "squash" (the paper's, the default) when neither
    is at hand."""
    path = Path(model_dir)
    try:
        if (path / "export.json").is_file():
            data = read_json(path / "export.json", fix="the default framing is used").get("training_data") or {}
            return data.get("fit") or "squash"
        if (path / "config.toml").is_file():
            shards = load_toml(path / "config.toml").data.shards
            return shards_facts(read_manifest(shards, check_counts=False), shards)["fit"]
    except (FaceVAEError, OSError, ValueError, AttributeError):
        pass  # a damaged or absent record only costs the default framing
    return "squash"


def export_model(run_dir: str | Path, out_dir: str | Path, which: str = "best", *, force: bool = False) -> Path:
    """Write the chosen checkpoint of `run_dir` as model.safetensors + config.json (FaceVAE.from_pretrained(out),
    locally or after uploading the folder to the Hugging Face Hub), export.json saying where it came from, and the
    model card README.md: the hypothesis, the training shards' facts, the profile, the steps and, when the run's
    eval/metrics.json scored this very checkpoint, its scores. `out_dir` may be a new folder or an export of the
    same weights; never a run directory, a checkpoint, a shards folder or a place inside one (outputs.py); over
    an export of other weights only with `force`, and then its eval/ (the scores of the replaced weights) goes."""
    out_dir = Path(out_dir)
    kind = outputs.refuse_to_write(out_dir, "--out", "the exported model", allowed=(outputs.EXPORT,))
    loaded = open_model(run_dir, which)
    model, cfg, step = loaded.model, loaded.cfg, loaded.step
    if kind == outputs.EXPORT and not _same_weights(out_dir / WEIGHTS_FILE, model):
        if not force:
            raise UsageError(f"--out {out_dir} holds another model's export ({_describe_export(out_dir)}); choose "
                             "another --out, or add --force to replace it (its eval/ goes with it)")
        if (out_dir / EVAL_DIR).is_dir():  # scores of the weights being replaced: report would pin them on these
            shutil.rmtree(out_dir / EVAL_DIR)
            info(f"removed {out_dir / EVAL_DIR}: it scored the weights this export replaces")
    facts = {
        "run_dir": str(run_dir), "checkpoint": loaded.label, "step": step, "hypothesis": cfg.hypothesis or None,
        "seed": cfg.seed, "loss": loss_name(cfg.loss.terms), "mask_mode": model.cfg.mask_mode,
        "image_size": model.cfg.image_size,
    }
    data = _training_data(cfg.data.shards)
    if data is not None:
        facts["training_data"] = data  # reconstruct frames faces as these shards did (their `fit`)
    out = model.save_pretrained(out_dir, model_card=False)
    atomic_write_json(Path(out) / "export.json", facts)
    shown = Path(out_dir) if not Path(out_dir).is_absolute() else Path(Path(out_dir).name)
    card = model.generate_model_card(export=facts, data=data, scores=_scores_of(run_dir, step),
                                     load_from=shown.as_posix())
    atomic_write_text(Path(out) / "README.md", card.content)
    return Path(out)


def _same_weights(weights: Path, model: torch.nn.Module) -> bool:
    """Whether `weights` (a safetensors file) holds exactly `model`'s tensors: re-exporting the same checkpoint
    keeps the export's eval/ valid."""
    try:
        old = load_file(str(weights))
    except (SafetensorError, OSError):
        return False
    new = model.state_dict()
    return old.keys() == new.keys() and all(old[k].shape == new[k].shape and torch.equal(old[k], new[k].cpu())
                                            for k in new)


def _describe_export(out_dir: Path) -> str:
    """What an existing export is, for the refusal (its export.json), or "other weights"."""
    try:
        meta = read_json(out_dir / "export.json", fix="unreadable")
        return f"{meta.get('hypothesis') or meta.get('loss')} from {meta.get('run_dir')} {meta.get('checkpoint')}"
    except (OSError, FaceVAEError, AttributeError):
        return "other weights"


def _training_data(shards_dir: str | None) -> dict | None:
    """The model card's facts about the training shards, or None when their manifest is not at hand."""
    if not shards_dir:
        return None
    try:
        return shards_facts(read_manifest(shards_dir, check_counts=False), shards_dir)
    except FaceVAEError:
        warn(f"{shards_dir}: the training shards' manifest is not readable here; the model card says the training "
             "data was not recorded")
        return None


def _scores_of(run_dir: str | Path, step: int) -> dict | None:
    """The run's eval/metrics.json when it scored checkpoint `step`; None otherwise (no eval, or another step's)."""
    if not (Path(run_dir) / EVAL_DIR / METRICS_FILE).is_file():
        return None
    try:
        scores = load_eval(run_dir)
    except FaceVAEError as exc:
        warn(f"{exc}; the model card shows no scores")
        return None
    if (scores.get("checkpoint") or {}).get("step") != step:
        warn(f"{scores['path']} scored step {(scores.get('checkpoint') or {}).get('step')}, not the exported step "
             f"{step}; the model card shows no scores (run `facevae eval {run_dir} --checkpoint ...` to score it)")
        return None
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Image files

def read_rgb(path: str | Path) -> Image.Image:
    """Decode an image file as RGB, upright (EXIF), 16-bit scaled by value, within the pixel limit; raises a
    FaceVAEError (ImageReadError) naming the file for non-images, corrupt and oversized files."""
    return imageio.read_rgb_image(path)


def to_tensor(im: Image.Image, size: int | None = None) -> torch.Tensor:
    """[3,H,W] float in [0,1]; squashed to size x size (bilinear) when size is given."""
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


# What `sample` and `interpolate` write, by the suffix of --out (the bytes must be what the name says).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def to_png(t: torch.Tensor) -> bytes:
    """[C,H,W] (C = 1 or 3) float in [0,1] -> PNG bytes."""
    return to_image_bytes(t, "PNG")


def to_image_bytes(t: torch.Tensor, image_format: str) -> bytes:
    """[C,H,W] (C = 1 or 3) float in [0,1] -> the bytes of an image file in `image_format` (PIL's name)."""
    a = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return _png(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), image_format)


def _png(a: np.ndarray, image_format: str = "PNG") -> bytes:
    """uint8 HxW or HxWx3 -> PNG bytes (or another PIL format)."""
    buf = io.BytesIO()
    extra = {"quality": 95} if image_format == "JPEG" else {}
    Image.fromarray(a, "L" if a.ndim == 2 else "RGB").save(buf, format=image_format, **extra)
    return buf.getvalue()


def _upsample(t: torch.Tensor, wh: tuple[int, int]) -> np.ndarray:
    """A model-size output [C,h,w] in [0,1] -> uint8 at the photo's size (HxW or HxWx3). Done on uint8 in PIL:
    a photo-size float tensor costs 4x the memory, and quantizing before upsampling moves values < 1/255."""
    small = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    im = Image.fromarray(small[0], "L") if small.shape[0] == 1 else Image.fromarray(small.transpose(1, 2, 0), "RGB")
    return np.asarray(im.resize(wh, Image.BILINEAR) if im.size != wh else im)


def _composite_u8(recon: np.ndarray, photo: np.ndarray, alpha: np.ndarray, rows: int = 512) -> np.ndarray:
    """recon * a + photo * (1 - a) on uint8 (a = alpha / 255), rounded, in bands of rows so the temporaries stay
    small for huge photos. alpha 0 gives the photo pixel for pixel."""
    out = np.empty_like(photo)
    for r in range(0, photo.shape[0], rows):
        a = alpha[r:r + rows, :, None].astype(np.uint16)
        mix = recon[r:r + rows].astype(np.uint16) * a + photo[r:r + rows].astype(np.uint16) * (255 - a)
        out[r:r + rows] = (mix + 127) // 255  # <= 65025 + 127: fits uint16
    return out


def _read_given_mask(path: Path, wh: tuple[int, int]) -> np.ndarray:
    """A --masks file (0/255 or any-depth binary mask, or a label map) -> uint8 0/255 at the photo's size."""
    kind, values = imageio.read_mask_or_labels(path)
    mask = labelmap_to_mask(values) if kind == "labels" else values
    im = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    if im.size != wh:
        im = im.resize(wh, Image.BILINEAR)
    return np.where(np.asarray(im) >= 128, 255, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# reconstruct

@dataclass
class ReconstructResult:
    mask_mode: str
    note: str
    aligned: bool = True  # faces found and framed (False: --no-align, whole images squashed)
    written: dict[str, list[str]] = field(default_factory=dict)  # input path -> output files
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)
    faces: dict[str, dict] = field(default_factory=dict)  # input path -> the face found and the frame used


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}-{n + 1}")
    return out


@torch.no_grad()
def reconstruct_files(model_dir: str | Path, paths, out_dir: str | Path, *, batch_size: int = 16,
                      masks_dir: str | Path | None = None, device: str | None = None,
                      align: bool = True) -> ReconstructResult:
    """Reconstruct every image in `paths` into `out_dir` (see the module docstring for what each mode writes).
    Corrupt, non-image and oversized files, and (align) photos without a face found, are reported in `skipped`
    and the rest are processed. Memory stays bounded whatever the photos' size: a batch holds the model-size inputs
    plus at most imageio.MAX_PIXELS of full-size uint8 photos, and each photo's outputs are made and written one
    at a time."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no input images given")
    masks_dir = Path(masks_dir) if masks_dir else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise UsageError(f"--masks {masks_dir}: no such directory")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a directory; give a directory for the outputs")
    dev = resolve_device(device)
    model = load_any_model(model_dir, device=dev)
    size, mode = model.cfg.image_size, model.cfg.mask_mode
    finder = FaceFinder() if align else None  # a missing MediaPipe is one line before anything is written
    fit = training_fit(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReconstructResult(mask_mode=mode, note=MODE_NOTES[mode], aligned=align)
    if masks_dir is not None and mode == "mask+decoder":
        warn(f"--masks {masks_dir}: not used: a mask+decoder model predicts the face mask itself, and its composite "
             "uses that")
    squashed: list[str] = []
    pixel_budget = imageio.max_pixels_default()
    with make_progress() as progress:
        task = progress.add_task("reconstruct", total=len(paths))
        # (path, stem, photo uint8 HxWx3, the frame the input was cut from or None for the whole photo, input)
        batch: list[tuple[Path, str, np.ndarray, Frame | None, torch.Tensor]] = []

        def flush() -> None:
            if not batch:
                return
            out = model.reconstruct(torch.stack([x for *_, x in batch]).to(dev))
            for i, (path, stem, photo, frame, _) in enumerate(batch):
                try:
                    result.written[str(path)] = _write_outputs(out, i, path, stem, photo, frame, masks_dir, out_dir)
                except imageio.ImageReadError as exc:  # its --masks file; nothing of this photo was written yet
                    result.skipped.append((str(path), f"mask {exc}"))
                progress.advance(task)
            batch.clear()

        try:
            for path, stem in zip(paths, _unique_stems(paths)):
                try:
                    photo = np.asarray(read_rgb(path))
                except FaceVAEError as exc:
                    result.skipped.append((str(path), str(exc)))
                    progress.advance(task)
                    continue
                frame = None
                if finder is not None:
                    face = finder(photo)
                    if face is None:
                        result.skipped.append((str(path), "no face found (MediaPipe face detector); pass --no-align "
                                                          "to reconstruct the whole image"))
                        progress.advance(task)
                        continue
                    frame = frame_for(face, fit)
                    result.faces[str(path)] = {**face.to_dict(), "fit": fit,
                                               "frame": [frame.left, frame.top, frame.width, frame.height]}
                    x = to_tensor(Image.fromarray(crop(photo, frame)), size)
                else:
                    if photo.shape[0] != photo.shape[1]:
                        squashed.append(f"{path.name} ({photo.shape[1]}x{photo.shape[0]})")
                    x = to_tensor(Image.fromarray(photo), size)
                held = sum(p.shape[0] * p.shape[1] for _, _, p, _, _ in batch)
                if batch and held + photo.shape[0] * photo.shape[1] > pixel_budget:
                    flush()
                batch.append((path, stem, photo, frame, x))
                if len(batch) == batch_size:
                    flush()
            flush()
        finally:
            if finder is not None:
                finder.close()
    if squashed:
        warn(f"--no-align: {len(squashed)} image(s) are not square, e.g. {squashed[0]}: each was squashed to the "
             f"model's {size}x{size} input, changing its aspect ratio, so its face comes out stretched; without "
             "--no-align the face is found and cropped as in training")
    if masks_dir is not None and mode != "mask+decoder":
        unmasked = [Path(p) for p in result.written if not (masks_dir / f"{Path(p).stem}.png").is_file()]
        if unmasked:
            warn(f"--masks {masks_dir}: no mask for {len(unmasked)} of {len(result.written)} photo(s), e.g. "
                 f"{unmasked[0].name} (it needs {unmasked[0].stem}.png there): no composite for them")
    return result


def _write_outputs(out, i: int, path: Path, stem: str, photo: np.ndarray, frame: Frame | None,
                   masks_dir: Path | None, out_dir: Path) -> list[str]:
    """Write one photo's reconstruction (+ mask, composite) at the photo's own size; returns the files written.
    frame: where the model's input was cut from, and where its output goes back (None: the whole photo)."""
    h, w = photo.shape[:2]
    whole = Frame(0, 0, w, h)
    frame = frame or whole
    rows, cols, frows, fcols = frame.visible(w, h)
    recon_f = _upsample(out.recon_raw[i], (frame.width, frame.height))
    recon = recon_f
    if frame != whole:
        recon = photo.copy()
        recon[rows, cols] = recon_f[frows, fcols]
    files = {f"{stem}_recon.png": recon}
    alpha_f = None
    if out.mask_pred is not None:
        alpha_f = _upsample(out.mask_pred[i], (frame.width, frame.height))
    elif masks_dir is not None and (masks_dir / f"{path.stem}.png").is_file():
        given = _read_given_mask(masks_dir / f"{path.stem}.png", (w, h))
        alpha_f = np.zeros((frame.height, frame.width), np.uint8)
        alpha_f[frows, fcols] = given[rows, cols]
    if alpha_f is not None:
        if frame != whole:  # a pasted region: no seam at the mask's edge or at the region's border
            alpha_f = feather(alpha_f, frame.width / out.recon_raw.shape[-1])
        alpha = np.zeros((h, w), np.uint8)
        alpha[rows, cols] = alpha_f[frows, fcols]
        if out.mask_pred is not None:
            files[f"{stem}_mask.png"] = alpha
        composite = photo.copy()
        composite[rows, cols] = _composite_u8(recon_f[frows, fcols], photo[rows, cols], alpha_f[frows, fcols])
        files[f"{stem}_composite.png"] = composite
    for name, a in files.items():
        atomic_write_bytes(out_dir / name, _png(a))
    return [str(out_dir / n) for n in files]


# ---------------------------------------------------------------------------------------------------------------
# sample / interpolate

def _grid(tiles: torch.Tensor, ncol: int, pad: int = 2) -> torch.Tensor:
    """[N,3,H,W] -> [3, rows*(H+pad)+pad, ncol*(W+pad)+pad] on a white background."""
    n, c, h, w = tiles.shape
    nrow = math.ceil(n / ncol)
    g = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncol)
        g[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = tiles[i]
    return g


@torch.no_grad()
def sample_grid(model_dir: str | Path, out: str | Path, *, n: int = 16, seed: int = 0, temperature: float = 1.0,
                device: str | None = None) -> Path:
    """Decode n prior samples z ~ N(0, temperature^2 I) into one image grid (PNG or JPEG, as the suffix of `out`
    says). Mask+decoder models show the face on mid grey through their predicted mask (their background was never
    trained: it carries no signal)."""
    if not 1 <= n <= MAX_SAMPLES:
        raise UsageError(f"--n {n}: must be in [1, {MAX_SAMPLES}] (the samples are decoded in one batch)")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature {temperature}: must be a finite number >= 0 (1 = the prior itself)")
    image_format = _out_file_format(Path(out))
    dev = resolve_device(device)
    model = load_any_model(model_dir, device=dev)
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, model.cfg.latent_dim, generator=g) * temperature).to(dev)
    tiles = model.decoder(z).float()
    if model.mask_decoder is not None:
        m = model.mask_decoder(z).float()
        tiles = tiles * m + 0.5 * (1 - m)
    out = Path(out)
    atomic_write_bytes(out, to_image_bytes(_grid(tiles.cpu(), ncol=min(n, 8)), image_format))
    return out


@torch.no_grad()
def interpolate_images(model_dir: str | Path, a: str | Path, b: str | Path, out: str | Path, *, steps: int = 8,
                       device: str | None = None) -> Path:
    """Encode two photos (z = mu), decode `steps` points on the line between them; one image row:
    photo a, the interpolation, photo b. Mask+decoder models composite each frame onto the cross-faded inputs."""
    if not 2 <= steps <= MAX_INTERPOLATION_STEPS:
        raise UsageError(f"--steps {steps}: must be in [2, {MAX_INTERPOLATION_STEPS}] (the frames are decoded in one "
                         "batch)")
    image_format = _out_file_format(Path(out))
    dev = resolve_device(device)
    model = load_any_model(model_dir, device=dev)
    size = model.cfg.image_size
    x = torch.stack([to_tensor(read_rgb(p), size) for p in (a, b)]).to(dev)
    mu, _ = model.encode(x)
    t = torch.linspace(0, 1, steps, device=dev).view(-1, 1)
    z = (1 - t) * mu[0:1] + t * mu[1:2]
    frames = model.decoder(z).float()
    if model.mask_decoder is not None:
        m = model.mask_decoder(z).float()
        background = (1 - t.view(-1, 1, 1, 1)) * x[0:1] + t.view(-1, 1, 1, 1) * x[1:2]
        frames = frames * m + background * (1 - m)
    row = torch.cat([x[0:1], frames, x[1:2]]).cpu()
    out = Path(out)
    atomic_write_bytes(out, to_image_bytes(_grid(row, ncol=row.shape[0]), image_format))
    return out


def _out_file_format(out: Path) -> str:
    """The image format --out names by its suffix (PNG or JPEG); a directory or another suffix is refused, so a
    file never holds bytes of a format other than the one its name says."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the PNG file to write, e.g. {out / 'grid.png'}")
    image_format = IMAGE_FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise UsageError(f"--out {out}: unknown image suffix {out.suffix or '(none)'!r}; name a "
                         f"{', '.join(IMAGE_FORMATS)} file, e.g. {out.with_suffix('.png')}")
    return image_format


def write_summary(result: ReconstructResult, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "reconstruct.json"
    atomic_write_json(path, {"mask_mode": result.mask_mode, "note": result.note, "aligned": result.aligned,
                             "faces": result.faces, "written": result.written,
                             "skipped": [{"file": f, "reason": r} for f, r in result.skipped]})
    return path

