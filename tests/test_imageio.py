"""Every read of a user image (shards build sources, reconstruct): EXIF orientation applied, 16-bit images and masks
converted by value, decode size bounded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.data.tario import iter_tar
from facevae_dist.model import FaceVAE, ModelConfig

RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _gray16(h: int = 40, w: int = 40) -> np.ndarray:
    """A 16-bit gradient 0..65535 (its 8-bit value is about x * 255 / (w - 1))."""
    return np.tile(np.linspace(0, 65535, w), (h, 1)).astype(np.uint16)


def _mask16(h: int = 40, w: int = 40) -> np.ndarray:
    m = np.zeros((h, w), np.uint16)
    m[h // 4:3 * h // 4, w // 4:3 * w // 4] = 256  # 'on' = 256: wraps to 0 when cast to uint8
    return m


def _sideways_jpeg(path: Path) -> None:
    """Stored 40 wide x 20 high, left half red, right half blue, EXIF Orientation=6 (display rotated 90 deg
    clockwise): upright it is 20 x 40 with red on top."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20], a[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())


def _first_sample(shards: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    for tar in sorted((shards / split).glob("*.tar")):
        for _, fields in iter_tar(tar):
            ext = "png" if "png" in fields else "jpg"
            return (np.asarray(Image.open(io.BytesIO(fields[ext])).convert("RGB")),
                    np.asarray(Image.open(io.BytesIO(fields["mask.png"]))))
    raise AssertionError("no samples")


def _folder_build(root: Path, masks: Path, out: Path, *extra: str) -> int:
    return main(["--quiet", "shards", "build", "--source", "folder", "--root", str(root), "--masks", str(masks),
                 "--out", str(out), "--image-size", "18", "--split-ratios", "1,0,0", "--format", "png", *extra])


def _model(path: Path, **kw) -> Path:
    torch.manual_seed(0)
    return FaceVAE(ModelConfig(image_size=36, width=0.125, latent_dim=16, **kw)).eval().save_pretrained(path)


def test_16bit_png_image_and_mask_through_shards_build(tmp_path):
    root, masks = tmp_path / "photos", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    Image.fromarray(_gray16()).save(root / "a.png")
    Image.fromarray(_mask16()).save(masks / "a.png")
    assert Image.open(root / "a.png").mode == "I;16"
    assert _folder_build(root, masks, tmp_path / "s") == 0
    image, mask = _first_sample(tmp_path / "s")
    assert image[:, 0].max() < 40 and image[:, -1].min() > 215  # a gradient, not all white
    assert abs(float(image.mean()) - 127.5) < 10
    assert mask[8, 8] == 255 and mask[0, 0] == 0  # the 0/256 mask keeps its face


def test_exif_orientation_applied_in_shards_build(tmp_path):
    root, masks = tmp_path / "photos", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    _sideways_jpeg(root / "a.jpg")
    m = np.zeros((40, 20), np.uint8)
    m[:20] = 255  # drawn upright: the top (red) half is the face
    Image.fromarray(m).save(masks / "a.png")
    assert _folder_build(root, masks, tmp_path / "s") == 0
    image, mask = _first_sample(tmp_path / "s")
    top, bottom = image[:6].reshape(-1, 3).mean(0), image[-6:].reshape(-1, 3).mean(0)
    assert top[0] > 150 and top[2] < 90 and bottom[2] > 150 and bottom[0] < 90  # red above blue
    assert (mask[:6] == 255).all() and (mask[-6:] == 0).all()  # image and mask agree


def test_reconstruct_applies_exif_and_reads_16bit_image_and_mask(tmp_path):
    model = _model(tmp_path / "model", mask_mode="none")
    photos, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "out"
    photos.mkdir(), masks.mkdir()
    _sideways_jpeg(photos / "side.jpg")
    Image.fromarray(_gray16()).save(photos / "g.png")
    Image.fromarray(_mask16()).save(masks / "g.png")
    assert main(["reconstruct", "--model", str(model), str(photos / "side.jpg"), str(photos / "g.png"),
                 "--no-align", "--out", str(out), "--masks", str(masks)]) == 0  # whole images: no face in them
    assert Image.open(out / "side_recon.png").size == (20, 40)  # upright
    comp = np.asarray(Image.open(out / "g_composite.png"))
    expected = np.rint(_gray16() / 257).astype(np.uint8)
    assert np.array_equal(comp[:10, :, 0], expected[:10])  # outside the mask: the photo, not white
    assert not np.array_equal(comp[15:25, 15:25, 0], expected[15:25, 15:25])  # inside: the reconstruction


def test_oversized_images_refused_naming_file_and_limit_jpeg_decoded_smaller(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACEVAE_MAX_IMAGE_PIXELS", "2500")
    model = _model(tmp_path / "model")
    big = np.random.default_rng(0).integers(0, 255, (100, 100, 3), np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big).save(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    assert main(["reconstruct", "--model", str(model), str(tmp_path / "big.png"), str(tmp_path / "photo.jpg"),
                 "--no-align", "--out", str(out)]) == 0  # whole images: noise has no face to find
    err = capsys.readouterr().err
    assert "big.png" in err and "0.0025 Mpixel limit" in err and "FACEVAE_MAX_IMAGE_PIXELS" in err
    assert Image.open(out / "photo_recon.png").size == (50, 50)  # the JPEG, decoded at 1/2 scale by libjpeg
    # shards build lists the oversized photo as skipped, with the same reason
    root, masks = tmp_path / "photos", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    Image.fromarray(big).save(root / "big.png")
    Image.fromarray(big[:40, :40]).save(root / "ok.png")
    for name in ("big.png", "ok.png"):
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(masks / name)
    assert _folder_build(root, masks, tmp_path / "s") == 0
    errors = (tmp_path / "s" / "errors.tsv").read_text()
    assert errors.startswith("train\tbig.png\t") and "Mpixel limit" in errors
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["total"] == 1


def test_directory_named_like_an_image_is_listed_as_skipped(tmp_path):
    root, masks = tmp_path / "photos", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    (root / "x.jpg").mkdir()
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(root / "y.png")
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(masks / "y.png")
    assert _folder_build(root, masks, tmp_path / "s") == 0
    errors = (tmp_path / "s" / "errors.tsv").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith("train\tx.jpg\t") and "directory" in errors[0]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["skipped"] == 1


@pytest.mark.parametrize("command", ["interpolate", "reconstruct"])
def test_a_fifo_as_input_image_is_refused_without_hanging(tmp_path, command):
    """Opening a FIFO blocks until a writer comes: the check must come before the open (a subprocess, so a hang
    fails the test at its deadline instead of hanging the suite)."""
    import os
    import subprocess
    import sys

    model = _model(tmp_path / "model")
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    args = {"interpolate": ["interpolate", "--model", str(model), str(fifo), str(fifo), "--out",
                            str(tmp_path / "i.png")],
            "reconstruct": ["reconstruct", "--model", str(model), str(fifo), "--no-align", "--out",
                            str(tmp_path / "r")]}[command]
    proc = subprocess.run([sys.executable, "-m", "facevae_dist", "-q", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and f"{fifo}: is a FIFO, not an image file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_jpeg_past_pillows_bomb_limit_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS in open(), before our limit could pick a reduced-scale
    JPEG decode (a 20000x20000 photo is past it). Pillow's limit is lowered here so a 100x100 JPEG stands in for
    the 400 Mpixel one."""
    from facevae_dist.data import imageio

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), np.uint8)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is past 2 x 1000
    monkeypatch.setenv("FACEVAE_MAX_IMAGE_PIXELS", "3000")
    assert imageio.read_rgb(tmp_path / "big.jpg").shape == (50, 50, 3)  # decoded at 1/2 by libjpeg
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's own limit is back for everyone else
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(imageio.ImageTooLarge, match="0.003 Mpixel limit"):  # no reduced decode for PNG
        imageio.read_rgb(tmp_path / "big.png")
