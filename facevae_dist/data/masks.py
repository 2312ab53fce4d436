"""Face masks from face-parsing label maps, as the paper builds them.

Label scheme (face-parsing.PyTorch / BiSeNet, 19 classes, the paper's `mask_faceparsing/` PNGs):
0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye, 6 eye_g (glasses), 7 l_ear, 8 r_ear, 9 ear_r (earring),
10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l (necklace), 16 cloth, 17 hair, 18 hat.
The paper's face mask keeps everything except background, ears, earring, neck, necklace and cloth
(`utils.load_mask`: `~np.isin(label, [0, 7, 8, 9, 14, 15, 16])`), so hair, hat and glasses count as face.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
               "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
NUM_LABELS = len(LABEL_NAMES)
FACE_EXCLUDED_LABELS = (0, 7, 8, 9, 14, 15, 16)

# CelebAMask-HQ ships one binary PNG per part. face-parsing.PyTorch's prepropess_data.py paints them in this order
# with label = position + 1 (later parts overwrite earlier ones), which yields the 19-class scheme above.
CELEBAMASK_HQ_PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose",
                       "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")

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
    from facevae_dist.data.imageio import binary_mask, read_values

    return binary_mask(read_values(path))
