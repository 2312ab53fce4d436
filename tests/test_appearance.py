"""The C9/C10 measures on constructed cases where the right answer is known, and the hair masks of synthetic shards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facevae_dist.data import synthetic
from facevae_dist.data.shards import ShardOptions, build_shards
from facevae_dist.data.sources import SyntheticSource
from facevae_dist.evaluate import appearance


def _faces(n=4, size=36, seed=0):
    """Real synthetic faces (shards' size) with their face and hair masks, as the evaluator sees them."""
    images, faces, hairs = [], [], []
    index = 0
    while len(images) < n:  # faces with visible hair (a hat or a bald head leaves none)
        f = synthetic.render_face(seed, index)
        index += 1
        lab = torch.from_numpy(f.label.copy())[None, None].float()
        hair = F.interpolate((lab == appearance.HAIR_LABEL).float(), size=(size, size), mode="bilinear")
        if (hair >= 0.5).sum() < 30:
            continue
        img = torch.from_numpy(f.image.copy()).permute(2, 0, 1)[None].float() / 255
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True))
        face = torch.from_numpy(~np.isin(f.label, synthetic.FACE_EXCLUDED_LABELS))[None, None].float()
        faces.append(F.interpolate(face, size=(size, size), mode="bilinear"))
        hairs.append(hair)
    return torch.cat(images), torch.cat(faces), torch.cat(hairs)


def test_lab_of_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 2, 2)
    lab = appearance.srgb_to_lab(rgb).reshape(3, 4).T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18]])
    assert torch.allclose(lab, expected, atol=0.05)


def test_identical_images_have_no_cast_and_full_sharpness():
    image, face, hair = _faces()
    out = appearance.score(image, image, face, hair)
    for name in ("da", "db", "colour_shift", "delta_e"):
        assert torch.allclose(out[name], torch.zeros(4), atol=1e-4), name
    assert torch.allclose(out["hair_sharpness"], torch.ones(4), atol=1e-5)


def test_a_hue_rotated_copy_shifts_colour_a_blurred_copy_does_not():
    image, face, hair = _faces()
    # Rotate hue by 60 degrees about the grey axis (Rodrigues' rotation): same luminance-ish, other colour.
    k = torch.ones(3) / math.sqrt(3)
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = c * torch.eye(3) + s * kx + (1 - c) * torch.outer(k, k)
    rotated = torch.einsum("ij,bjhw->bihw", rot, image).clamp(0, 1)
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    r = appearance.score(rotated, image, face, hair)
    b = appearance.score(blurred, image, face, hair)
    assert (r["colour_shift"] > 8).all(), r["colour_shift"]
    assert (b["colour_shift"] < 1.5).all(), b["colour_shift"]  # a blur mixes colours but casts none
    assert (r["colour_shift"] > 5 * b["colour_shift"]).all()
    assert (b["delta_e"] > 0.5).all()  # ΔE sees the blur's errors all the same


def test_a_magenta_cast_is_positive_a_star():
    image, face, hair = _faces()
    magenta = (image + torch.tensor([0.08, 0.0, 0.08]).view(1, 3, 1, 1)).clamp(0, 1)
    yellow = (image + torch.tensor([0.06, 0.06, 0.0]).view(1, 3, 1, 1)).clamp(0, 1)
    m = appearance.score(magenta, image, face, hair)
    y = appearance.score(yellow, image, face, hair)
    assert (m["da"] > 2).all() and (y["db"] > 2).all()
    assert (m["db"].abs() < m["da"]).all()


def test_a_blurred_copy_loses_hair_sharpness_a_sharpened_one_gains():
    image, face, hair = _faces()
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sharpened = (2 * image - blurred).clamp(0, 1)
    sb = appearance.score(blurred, image, face, hair)["hair_sharpness"]
    ss = appearance.score(sharpened, image, face, hair)["hair_sharpness"]
    assert (sb < 0.6).all(), sb
    assert (ss > 1.2).all(), ss


def test_hair_sharpness_is_undefined_without_enough_hair():
    image, face, _ = _faces(n=2)
    hair = torch.zeros(2, 1, 36, 36)
    hair[0, :, 10:12, 10:12] = 1  # 4 pixels < MIN_HAIR_PIXELS
    out = appearance.score(image, image, face, hair)["hair_sharpness"]
    assert torch.isnan(out).all()
    assert torch.isnan(appearance.score(image, image, face, None)["hair_sharpness"]).all()


def test_hair_masks_of_synthetic_shards_match_the_generator(tmp_path):
    out = tmp_path / "shards"
    opts = ShardOptions(image_size=24, image_format="png", shard_size=4)
    build_shards(SyntheticSource(n=20, seed=3), out, opts)
    manifest = json.loads((out / "manifest.json").read_text())
    masks = appearance.HairMasks(out, manifest, "test")
    assert masks.why_not is None
    keys = sorted(masks.source_ids)
    assert len(keys) == manifest["splits"]["test"]["count"]
    got = masks.batch(keys, torch.device("cpu"))
    assert got.shape == (len(keys), 1, 24, 24)
    for key, m in zip(keys, got):
        face = synthetic.render_face(3, int(masks.source_ids[key]) - 1)
        hair = torch.from_numpy(face.label == appearance.HAIR_LABEL)[None, None].float()
        ref = F.interpolate(hair, size=(24, 24), mode="bilinear", antialias=True)[0]
        # PIL's and torch's antialiased bilinear differ slightly at edges; the region itself must agree
        assert ((m >= 0.5) != (ref >= 0.5)).float().mean() < 0.03
    other = dict(manifest, source={"name": "celeba"})
    none = appearance.HairMasks(out, other, "test")
    assert none.batch(keys, torch.device("cpu")) is None and "celeba" in none.why_not


@pytest.mark.parametrize("measure", appearance.MEASURES)
def test_every_measure_is_defined_in_words(measure):
    assert appearance.DEFINITIONS[measure]
