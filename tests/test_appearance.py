"""The C9/C10 measures on constructed cases where the right answer is known (confounds included), and the label
maps they read, round-tripped through a real shard build."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facevae_dist.data import synthetic
from facevae_dist.data.labels import LABELS_MEMBER, ShardLabels, no_labels_reason, resize_labels
from facevae_dist.data.shards import ShardOptions, build_shards, verify_shards
from facevae_dist.data.sources import SyntheticSource
from facevae_dist.data.tario import index_tar
from facevae_dist.evaluate import appearance as A

SIZE = 36


def _faces(n=8, textured=True, seed=0):
    """Synthetic faces at the shards' size (PIL bilinear like the shards, NEAREST label maps), each with a hair
    interior; `textured` adds a fixed fine texture to the hair (the synthetic hair itself is flat colour)."""
    images, labels = [], []
    index = 0
    while len(images) < n:
        face = synthetic.render_face(seed, index)
        index += 1
        box = (0.0, 0.0, float(face.image.shape[1]), float(face.image.shape[0]))
        lab = resize_labels(face.label, face.image.shape, box, SIZE)
        if A.erode(torch.from_numpy(lab == A.HAIR_LABEL)[None, None], A.HAIR_ERODE_PX).sum() < 20:
            continue  # a hat or a bald head leaves too little hair
        img = np.asarray(Image.fromarray(face.image).resize((SIZE, SIZE), Image.BILINEAR, box=box), np.float32)
        images.append(torch.from_numpy(img / 255).permute(2, 0, 1))
        labels.append(torch.from_numpy(lab.copy()))
    image, label = torch.stack(images), torch.stack(labels)
    if textured:
        g = torch.Generator().manual_seed(seed)
        texture = (torch.rand(n, 1, SIZE, SIZE, generator=g) - 0.5) * 0.25
        image = (image + texture * (label == A.HAIR_LABEL).unsqueeze(1)).clamp(0, 1)
    return image, label, torch.ones(n, dtype=torch.bool)


def _blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _noisy(x, sigma, seed=1):
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def _hue_rotated(x, degrees):
    """Rotation about the grey axis (Rodrigues): negative angles turn orange skin toward red/magenta."""
    k = torch.ones(3) / math.sqrt(3)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = c * torch.eye(3) + s * kx + (1 - c) * torch.outer(k, k)
    return torch.einsum("ij,bjhw->bihw", rot, x).clamp(0, 1)


def _delta_e_of_mean(out):
    return math.sqrt(sum(float(out[m].nanmean()) ** 2 for m in ("skin_dl", "skin_da", "skin_db")))


def test_lab_of_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 2, 2)
    lab = A.srgb_to_lab(rgb).reshape(3, 4).T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18]])
    assert torch.allclose(lab, expected, atol=0.05)


def test_the_input_itself_has_no_shift_and_full_hair_detail():
    image, labels, has = _faces()
    out = A.score(image, image, labels, has)
    for m in ("skin_dl", "skin_da", "skin_db"):
        assert torch.allclose(out[m], torch.zeros(len(image)), atol=1e-4), m
    assert torch.allclose(out["hair_detail"], torch.ones(len(image)), atol=1e-5)  # the measure's maximum
    assert (out["skin_px"] >= A.MIN_SKIN_PIXELS).all() and (out["hair_px"] >= A.MIN_HAIR_PIXELS).all()


def test_a_copy_rotated_toward_red_shifts_skin_a_star_up():
    image, labels, has = _faces()
    out = A.score(_hue_rotated(image, -20), image, labels, has)
    assert (out["skin_da"] > 2).all(), out["skin_da"]  # every image, toward red/magenta
    assert float(out["skin_da"].mean()) > 2 * A.JND_DELTA_E
    other_way = A.score(_hue_rotated(image, 20), image, labels, has)
    assert (other_way["skin_da"] < 0).all()  # the sign says which way


def test_a_blurred_copy_loses_hair_detail_but_casts_no_colour():
    image, labels, has = _faces()
    out = A.score(_blur(image), image, labels, has)
    assert (out["hair_detail"] < 0.2).all(), out["hair_detail"]
    assert abs(float(out["skin_da"].mean())) < 0.5 and _delta_e_of_mean(out) < A.JND_DELTA_E / 2


def test_noise_reads_neither_as_sharper_hair_nor_as_a_colour_shift():
    image, labels, has = _faces()
    noisy = A.score(_noisy(image, 0.04), image, labels, has)
    assert (noisy["hair_detail"] < 0.97).all() and (noisy["hair_detail"] > 0.5).all()  # below the input, not above
    assert abs(float(noisy["skin_da"].mean())) < 0.5 and _delta_e_of_mean(noisy) < A.JND_DELTA_E / 2
    flat, flat_labels, _ = _faces(textured=False)
    invented = A.score(_noisy(flat, 0.04), flat, flat_labels, has)["hair_detail"]
    assert (invented.abs() < 0.15).all(), invented  # texture the input does not have scores ~0, never above 1


def test_an_outline_one_pixel_off_barely_moves_the_interior_measure():
    image, labels, has = _faces()
    recon = 0.5 * image + 0.5 * _blur(image)  # keeps some of the hair's detail
    shifted = torch.roll(labels, 1, dims=2)
    a = A.score(recon, image, labels, has)["hair_detail"]
    b = A.score(recon, image, shifted, has)["hair_detail"]
    assert (a > 0.3).all() and (a < 0.9).all()
    assert ((a - b).abs() < 0.1).all(), (a, b)


def test_synthetic_hair_has_no_interior_texture_its_outline_dominates():
    """Why the hair is eroded: on the whole hair region of the flat synthetic hair the Laplacian sees the outline;
    its interior is below the texture floor (so C10 is not testable on this data)."""
    image, labels, has = _faces(n=12, textured=False)
    interior = A.score(image, image, labels, has)["hair_texture"]
    whole = A.hair_detail(image, image, (labels == A.HAIR_LABEL).unsqueeze(1))["hair_texture"]
    assert (interior < A.HAIR_TEXTURE_FLOOR).float().mean() >= 0.9, interior
    assert float(whole.median()) > 3 * float(interior.median())


def test_measures_are_undefined_without_label_maps():
    image, labels, has = _faces(n=2)
    out = A.score(image, image, None, None)
    assert all(torch.isnan(out[m]).all() for m in ("skin_da", "hair_detail", "hair_texture"))
    assert (out["skin_px"] == 0).all()
    has[1] = False
    partial = A.score(image, image, labels, has)
    assert not torch.isnan(partial["skin_da"][0]) and torch.isnan(partial["skin_da"][1])


def test_label_maps_round_trip_through_a_real_shard_build(tmp_path):
    out = tmp_path / "shards"
    manifest = build_shards(SyntheticSource(n=20, seed=3), out, ShardOptions(image_size=SIZE, image_format="png",
                                                                             shard_size=4))
    assert manifest["format_version"] == 2 and manifest["labels"]["samples"] == manifest["total"] == 20
    assert verify_shards(out)["ok"]
    reader = ShardLabels(out, manifest, "test")
    assert reader.why_not is None
    samples = {}  # key -> its members, read straight from the tars
    for shard in manifest["splits"]["test"]["shards"]:
        with open(out / shard["path"], "rb") as f:
            for key, fields in index_tar(out / shard["path"]):
                samples[key] = {}
                for name, (offset, size) in fields.items():
                    f.seek(offset)
                    samples[key][name] = f.read(size)
    keys = sorted(samples)
    labels, have = reader.batch(keys + ["test-99999999"])
    assert have.tolist() == [True] * len(keys) + [False] and labels.shape == (len(keys) + 1, SIZE, SIZE)
    for key, lab in zip(keys, labels):
        index = int(json.loads(samples[key]["json"])["source_id"]) - 1  # synthetic ids: 1-based image numbers
        face = synthetic.render_face(3, index)
        box = (0.0, 0.0, float(face.image.shape[1]), float(face.image.shape[0]))
        np.testing.assert_array_equal(lab, resize_labels(face.label, face.image.shape, box, SIZE))
        assert {0, A.SKIN_LABEL} <= set(np.unique(lab).tolist())
        # the image's frame: the face mask of the stored labels agrees with the stored mask.png
        mask = np.asarray(Image.open(io.BytesIO(samples[key]["mask.png"])))
        assert ((mask >= 128) == ~np.isin(lab, synthetic.FACE_EXCLUDED_LABELS)).mean() > 0.9


def test_shards_without_label_maps_say_so(tmp_path):
    old = {"source": {"name": "synthetic"}, "image_size": SIZE, "splits": {"test": {"shards": []}}}
    assert "built before" in no_labels_reason(old) and "rebuild" in no_labels_reason(old)
    none = dict(old, labels={"field": LABELS_MEMBER, "samples": 0}, source={"name": "folder"})
    assert "'folder'" in no_labels_reason(none)
    reader = ShardLabels(tmp_path, old, "test")
    assert reader.why_not is not None


@pytest.mark.parametrize("measure", A.MEASURES)
def test_every_measure_is_defined_in_words(measure):
    assert A.DEFINITIONS[measure]


def test_older_format_shards_are_kept_readable_and_never_mixed(tmp_path):
    """Shards built before labels.png (format_version 1): a re-run of the same build keeps them as they are, the
    evaluation reader says they hold no label maps, an unfinished old build is refused rather than resumed in the
    new format, and --overwrite rebuilds with label maps."""
    from facevae_dist.errors import DataError

    out = tmp_path / "old"
    source, opts = SyntheticSource(n=12, seed=1), ShardOptions(image_size=SIZE, image_format="png", shard_size=4)
    build_shards(source, out, opts)
    for name in ("build.json", "manifest.json"):  # what a format-1 build wrote: no labels block
        doc = json.loads((out / name).read_text())
        doc["format_version"] = 1
        doc.pop("labels", None)
        (out / name).write_text(json.dumps(doc))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    kept = build_shards(source, out, opts)
    assert kept["format_version"] == 1 and "labels" not in kept
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten
    assert "built before labels.png" in ShardLabels(out, kept, "test").why_not
    (out / "manifest.json").unlink()  # an unfinished format-1 build
    with pytest.raises(DataError, match="differs in format"):
        build_shards(source, out, opts)
    rebuilt = build_shards(source, out, opts, overwrite=True)
    assert rebuilt["format_version"] == 2 and rebuilt["labels"]["samples"] == 12
