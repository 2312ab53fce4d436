"""The paper's preprocessing: cv2.resize INTER_LINEAR reproduced without OpenCV, within 1/255 per
pixel, and `shards build --resize cv2 --image-format png` storing exactly that, readable by the loader."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.data.resize import resize_linear
from facevae_dist.data.sources import SyntheticSource
from facevae_dist.data.tario import iter_tar

SHAPES = [(218, 178), (512, 512), (37, 91), (5, 3), (144, 144), (20, 300)]
SIZES = [(144, 144), (36, 36), (16, 16), (7, 3), (300, 200), (356, 436)]


def _cv2():
    return pytest.importorskip("cv2", reason="opencv-python-headless (in the `test` extra) is the reference")


@pytest.mark.parametrize("hw", SHAPES)
def test_uint8_matches_cv2_inter_linear_within_one_level(hw):
    cv2 = _cv2()
    rng = np.random.default_rng(sum(hw))
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, hw, dtype=np.uint8)
    for size in SIZES:
        for a in (image, gray):
            ref = cv2.resize(a, size, interpolation=cv2.INTER_LINEAR)
            got = resize_linear(a, size)
            assert got.shape == ref.shape and got.dtype == np.uint8
            assert np.abs(got.astype(int) - ref).max() <= 1, (hw, size)
            assert (got == ref).mean() > 0.95  # the same arithmetic, not merely close


def test_paper_squash_is_identical_to_cv2():
    cv2 = _cv2()
    face = np.random.default_rng(2).integers(0, 256, (218, 178, 3), dtype=np.uint8)  # CelebA's aligned size
    assert np.array_equal(resize_linear(face, (144, 144)), cv2.resize(face, (144, 144)))


@pytest.mark.parametrize("hw", SHAPES)
def test_float_mask_matches_cv2(hw):
    cv2 = _cv2()
    mask = (np.random.default_rng(1).random(hw) > 0.5).astype(np.float32)
    for size in SIZES:
        ref = cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(resize_linear(mask, size), ref, atol=1e-4)


def test_no_antialiasing_unlike_pil():
    """Shrinking a 1-pixel checkerboard: cv2 (and we) read two source pixels per output pixel, so aliasing
    survives as contrast; PIL's filter widens with the scale and averages it away."""
    cv2 = _cv2()
    board = (np.indices((218, 178)).sum(0) % 2 * 255).astype(np.uint8)
    ours = resize_linear(board, (144, 144))
    pil = np.asarray(Image.fromarray(board).resize((144, 144), Image.BILINEAR))
    assert np.abs(ours.astype(int) - cv2.resize(board, (144, 144), interpolation=cv2.INTER_LINEAR)).max() <= 1
    assert ours.std() > 2 * pil.std()  # aliasing kept, as in the paper's data


def test_shards_build_cv2_png_stores_cv2_resized_pixels_and_loader_reads_them(tmp_path):
    cv2 = _cv2()
    out = tmp_path / "s"
    assert main(["--quiet", "shards", "build", "--out", str(out), "--n", "10", "--image-size", "18",
                 "--shard-size", "4", "--resize", "cv2", "--image-format", "png"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_ext"] == "png" and manifest["resize"]["method"] == "cv2"
    assert manifest["options"]["resize"] == "cv2" and manifest["options"]["image_format"] == "png"
    assert "lossless" in manifest["image_format"] and "INTER_LINEAR" in manifest["resize"]["description"]
    source = SyntheticSource(n=10, seed=0)
    item = source.plan().items["train"][0]
    record = source.load(item)
    key, fields = next(iter(iter_tar(out / "train" / "shard-000000.tar")))
    assert set(fields) == {"png", "mask.png", "json", "labels.png"}
    labels = np.asarray(Image.open(io.BytesIO(fields["labels.png"])))  # NEAREST whatever --resize: ids stay ids
    np.testing.assert_array_equal(labels, np.asarray(Image.fromarray(record.label).resize((18, 18), Image.NEAREST)))
    stored = np.asarray(Image.open(io.BytesIO(fields["png"])))
    ref = cv2.resize(record.image, (18, 18), interpolation=cv2.INTER_LINEAR)
    assert np.abs(stored.astype(int) - ref).max() <= 1  # lossless: exactly the paper's squash
    mask = np.asarray(Image.open(io.BytesIO(fields["mask.png"])))
    ref_mask = cv2.resize(record.face_mask().astype(np.float32), (18, 18), interpolation=cv2.INTER_LINEAR)
    assert np.abs(mask.astype(int) - np.rint(ref_mask * 255)).max() <= 1
    assert ((mask > 0) & (mask < 255)).any()  # soft edges

    from facevae_dist.config import DataConfig
    from facevae_dist.data.batches import open_train_batches

    batches = open_train_batches(DataConfig(shards=str(out), batch_size=4, workers=0, placement="stream"), rank=0,
                                 world=1, device=torch.device("cpu"), epoch=0, batch_in_epoch=0, channels_last=False)
    try:
        image, mask_t = next(batches)
    finally:
        batches.close()
    assert image.shape == (4, 3, 18, 18) and mask_t.shape == (4, 1, 18, 18)
    assert image.dtype == torch.float32 and 0 <= float(image.min()) and float(image.max()) <= 1
    stored_all = [torch.from_numpy(np.array(Image.open(io.BytesIO(f["png"])))).permute(2, 0, 1)
                  for tar in sorted((out / "train").glob("*.tar")) for _, f in iter_tar(tar)]
    for img in (image * 255).round().to(torch.uint8):  # every loaded image is a stored PNG, decoded exactly
        assert any(torch.equal(img, ref) for ref in stored_all)
