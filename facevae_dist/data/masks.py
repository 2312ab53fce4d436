"""Face masks from face-parsing label maps, as the paper builds them.

Label scheme (face-parsing.PyTorch / BiSeNet, 19 classes, the paper's `mask_faceparsing/` PNGs):
0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye, 6 eye_g (glasses), 7 l_ear, 8 r_ear, 9 ear_r (earring),
10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l (necklace), 16 cloth, 17 hair, 18 hat.
The paper's face mask keeps everything except background, ears, earring, neck, necklace and cloth
(`utils.load_mask`: `~np.isin(label, [0, 7, 8, 9, 14, 15, 16])`), so hair, hat and glasses count as face.

CelebAMask-HQ's own `g_mask.py` numbers the same parts differently (1 skin, 2 nose, 3 eye_g, 4 l_eye, 5 r_eye,
6 l_brow, 7 r_brow, 8 l_ear, 9 r_ear, 10 mouth, 11 u_lip, 12 l_lip, 13 hair, 14 hat, 15 ear_r, 16 neck_l, 17 neck,
18 cloth). Such label maps are converted to the scheme above on reading (`--label-scheme celebamask-hq`), and
`guess_label_scheme` tells the two apart from where hair/hat/neck/cloth sit relative to the skin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facevae_dist.data.imageio import binary_mask, read_values

LABEL_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
               "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
NUM_LABELS = len(LABEL_NAMES)
FACE_EXCLUDED_LABELS = (0, 7, 8, 9, 14, 15, 16)

# CelebAMask-HQ ships one binary PNG per part. face-parsing.PyTorch's prepropess_data.py paints them in this order
# with label = position + 1 (later parts overwrite earlier ones), which yields the 19-class scheme above.
CELEBAMASK_HQ_PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose",
                       "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")

# CelebAMask-HQ's face_parsing/Data_preprocessing/g_mask.py: label = position + 1.
GMASK_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip",
               "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
LABEL_SCHEMES = ("faceparsing", "celebamask-hq")

_GMASK_TO_FACEPARSING = np.arange(256, dtype=np.uint8)
for _value, _name in enumerate(GMASK_PARTS, start=1):
    _GMASK_TO_FACEPARSING[_value] = LABEL_NAMES.index(_name)

_FACE_LUT = np.ones(256, dtype=bool)
_FACE_LUT[list(FACE_EXCLUDED_LABELS)] = False


def labelmap_to_mask(label: np.ndarray) -> np.ndarray:
    """uint8 label map HxW -> bool face mask HxW (True = face region as the paper defines it)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D (HxW), got shape {label.shape}")
    return _FACE_LUT[label.astype(np.uint8, copy=False)]


def part_masks_to_labelmap(parts: dict[str, np.ndarray | None], shape: tuple[int, int]) -> np.ndarray:
    """CelebAMask-HQ part masks (name -> bool/uint8 HxW, absent parts None or missing) -> uint8 label map."""
    label = np.zeros(shape, dtype=np.uint8)
    for value, name in enumerate(CELEBAMASK_HQ_PARTS, start=1):
        part = parts.get(name)
        if part is None:
            continue
        if part.shape != tuple(shape):
            raise ValueError(f"part mask {name!r} has shape {part.shape}, expected {tuple(shape)}")
        label[part.astype(bool)] = value
    return label


def read_part_mask(path: Path) -> np.ndarray:
    """One CelebAMask-HQ part PNG (white on black, sometimes RGB, any bit depth) -> bool HxW."""

    return binary_mask(read_values(path))


def to_faceparsing(label: np.ndarray, scheme: str) -> np.ndarray:
    """A label map in `scheme` (one of LABEL_SCHEMES) -> the same map in face-parsing numbering."""
    if scheme == "faceparsing":
        return label
    if scheme == "celebamask-hq":
        return _GMASK_TO_FACEPARSING[np.asarray(label, dtype=np.uint8)]
    raise ValueError(f"unknown label scheme {scheme!r}; choose one of {', '.join(LABEL_SCHEMES)}")


# Values whose part lies above the skin's centre in one numbering and below it in the other: face-parsing 13 l_lip,
# 14 neck (below), 17 hair, 18 hat (above); g_mask 13 hair, 14 hat (above), 17 neck, 18 cloth (below). Long hair can
# sit low, so one numbering wins only by a clear margin (lips and neck alone outvote it in face-parsing maps).
_ABOVE_IN_FACEPARSING = {13: False, 14: False, 17: True, 18: True}
_MIN_PIXELS = 0.0005  # of the map: smaller parts are too few pixels to place reliably


def guess_label_scheme(labels: list[np.ndarray]) -> tuple[str | None, str]:
    """Which numbering a few label maps use, from where values 13, 14, 17, 18 sit relative to the skin (1):
    returns (scheme, evidence) with scheme None when the maps do not tell (no skin, none of those values, or votes
    that disagree)."""
    votes = {"faceparsing": 0, "celebamask-hq": 0}
    for label in labels:
        label = np.asarray(label)
        rows = np.arange(label.shape[0])[:, None]
        skin = label == 1
        if skin.sum() < _MIN_PIXELS * label.size:
            continue
        skin_row = (rows * skin).sum() / skin.sum()
        for value, above_in_fp in _ABOVE_IN_FACEPARSING.items():
            part = label == value
            if part.sum() < _MIN_PIXELS * label.size:
                continue
            above = (rows * part).sum() / part.sum() < skin_row
            votes["faceparsing" if above == above_in_fp else "celebamask-hq"] += 1
    evidence = (f"{votes['faceparsing']} vote(s) for face-parsing's numbering, {votes['celebamask-hq']} for "
                f"CelebAMask-HQ's g_mask.py numbering over {len(labels)} sampled label map(s)")
    if votes["faceparsing"] and not votes["celebamask-hq"]:
        return "faceparsing", evidence
    if votes["celebamask-hq"] and votes["celebamask-hq"] >= 3 * votes["faceparsing"]:
        return "celebamask-hq", evidence
    return None, evidence
