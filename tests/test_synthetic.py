"""Synthetic faces: determinism by (seed, index), the 19-class label scheme, variety, and the mask definition (the
synthetic source's plan and partition file: test_sources.py)."""

import numpy as np

from facevae_dist.data import synthetic
from facevae_dist.data.masks import (
    CELEBAMASK_HQ_PARTS,
    FACE_EXCLUDED_LABELS,
    NUM_LABELS,
    labelmap_to_mask,
    part_masks_to_labelmap,
)


def test_render_is_deterministic_per_seed_and_index():
    a, b = synthetic.render_face(3, 7), synthetic.render_face(3, 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, synthetic.render_face(3, 8).image)
    assert not np.array_equal(a.image, synthetic.render_face(4, 7).image)
    # Order of generation does not matter (what makes worker count irrelevant).
    later = [synthetic.render_face(3, i).image for i in (9, 8, 7)][2]
    assert np.array_equal(later, a.image)


def test_celeba_like_shapes_labels_and_variety():
    faces = [synthetic.render_face(0, i) for i in range(40)]
    for f in faces:
        assert f.image.shape == (218, 178, 3) and f.image.dtype == np.uint8
        assert f.label.shape == (218, 178) and f.label.max() < NUM_LABELS
        frac = synthetic.face_fraction(f.label)
        assert 0.08 < frac < 0.7, frac
    present = set(np.unique(np.concatenate([np.unique(f.label) for f in faces])).tolist())
    assert {1, 2, 3, 4, 5, 10, 12, 13, 14, 16, 17}.issubset(present)
    assert 6 in present and 18 in present  # glasses and hats appear sometimes
    # Backgrounds are cluttered: high-frequency energy outside the person is substantial.
    bg = [np.abs(np.diff(f.image.astype(np.int16), axis=1)).mean(-1)[f.label[:, 1:] == 0].mean() for f in faces]
    assert np.median(bg) > 8
    # Skin tones vary widely.
    skin = [f.image[f.label == 1].mean() for f in faces]
    assert max(skin) - min(skin) > 80


def test_labelmap_to_mask_matches_paper_definition():
    label = np.arange(NUM_LABELS, dtype=np.uint8).reshape(1, -1)
    mask = labelmap_to_mask(label)[0]
    assert [i for i in range(NUM_LABELS) if not mask[i]] == list(FACE_EXCLUDED_LABELS)
    assert mask[17] and mask[18] and mask[6]  # hair, hat, glasses count as face


def test_part_masks_paint_in_face_parsing_order():
    skin = np.zeros((4, 4), bool)
    skin[:, :] = True
    hair = np.zeros((4, 4), bool)
    hair[0] = True
    label = part_masks_to_labelmap({"skin": skin, "hair": hair, "hat": None}, (4, 4))
    assert (label[0] == CELEBAMASK_HQ_PARTS.index("hair") + 1).all() and (label[1:] == 1).all()
