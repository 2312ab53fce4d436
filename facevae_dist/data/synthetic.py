"""Procedural CelebA-like portraits with face-parsing label maps: the embedded default dataset.

Each image is drawn from its own random stream seeded by (seed, index), so image i is the same whatever the
worker count or order of generation. Faces vary in skin tone, hair style and colour, scale, offset and tilt,
sometimes wear glasses, hats, earrings or necklaces, and are shaded by a directional light. Backgrounds are
deliberately cluttered and high-frequency (textures, shapes, gradients): hard to reconstruct, so restricting the
loss to the face region can matter, which is the paper's question. Label maps use the paper's 19-class
face-parsing scheme (see masks.py), painted with the same polygons as the RGB image so they align exactly.

Speed: everything is PIL polygon drawing plus a few whole-array numpy ops (no per-pixel Python); textures come from
a small bank computed once per process from a fixed seed (identical in every process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from facevae_dist.data.masks import FACE_EXCLUDED_LABELS

DEFAULT_WIDTH, DEFAULT_HEIGHT = 178, 218  # aligned CelebA
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_RATIOS = (0.8, 0.1, 0.1)  # close to CelebA's 162,770 / 19,867 / 19,962
_TEXTURE_BANK_SIZE = 24
_TEXTURE_PAD = 48

SKIN_LIGHT = np.array([255, 226, 200], np.float32)
SKIN_DARK = np.array([78, 50, 34], np.float32)
HAIR_COLOURS = np.array([
    [22, 17, 14], [45, 30, 20], [88, 58, 34], [128, 90, 55], [205, 175, 120], [228, 205, 150],
    [150, 62, 30], [170, 170, 170], [235, 235, 230], [60, 40, 90],
], np.float32)
HAIR_STYLES = ("short", "long", "bob", "bald", "fringe", "parted", "curly")


@dataclass(frozen=True)
class SyntheticFace:
    image: np.ndarray  # uint8 HxWx3
    label: np.ndarray  # uint8 HxW, 19-class face-parsing scheme


def split_for_index(index: int, n: int, ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS) -> str:
    """Contiguous blocks like CelebA's list_eval_partition: the first ~80% train, then val, then test."""
    n_train = int(round(n * ratios[0]))
    n_val = int(round(n * ratios[1]))
    if index < n_train:
        return "train"
    return "val" if index < n_train + n_val else "test"


def partition_lines(n: int, ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS) -> list[str]:
    """`list_eval_partition.txt` lines for n synthetic images named like CelebA (000001.jpg ...)."""
    code = {"train": 0, "val": 1, "test": 2}
    return [f"{image_name(i)} {code[split_for_index(i, n, ratios)]}" for i in range(n)]


def image_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


# ----------------------------------------------------------------------------------------------- textures
@lru_cache(maxsize=4)
def _texture_bank(height: int, width: int) -> tuple[np.ndarray, ...]:
    """Grayscale float32 textures in [0, 1], a little larger than the canvas so each image crops its own window."""
    rng = np.random.default_rng(20211204)
    h, w = height + _TEXTURE_PAD, width + _TEXTURE_PAD
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bank = []
    for k in range(_TEXTURE_BANK_SIZE):
        kind = k % 6
        if kind == 0:  # multi-octave value noise
            t = np.zeros((h, w), np.float32)
            for octave, cells in enumerate((4, 9, 21, 47)):
                small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
                t += np.asarray(small.resize((w, h), Image.BILINEAR), np.float32) / 255 / (1.6 ** octave)
        elif kind == 1:  # stripes at a random angle and frequency
            ang, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.9)
            t = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * freq)
        elif kind == 2:  # checker / tiles
            cell = int(rng.integers(3, 14))
            t = ((xx // cell + yy // cell) % 2).astype(np.float32) + 0.3 * np.sin(xx * 0.7)
        elif kind == 3:  # concentric rings
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            t = np.sin(np.hypot(yy - cy, xx - cx) * rng.uniform(0.3, 1.2))
        elif kind == 4:  # fine noise (the hardest thing for a VAE to reproduce)
            t = rng.random((h, w), dtype=np.float32)
        else:  # woven: two crossed sines
            f1, f2 = rng.uniform(0.2, 1.0, 2)
            t = np.sin(xx * f1) * np.sin(yy * f2)
        t = t.astype(np.float32)
        t -= t.min()
        t /= max(float(t.max()), 1e-6)
        bank.append(t)
    return tuple(bank)


def _lut(c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """A 256x3 colour ramp c0 -> c1 (uint8): colourising a texture is then one table lookup."""
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[:, None]
    return np.clip(c0 + ramp * (c1 - c0), 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _texture_u8(height: int, width: int) -> tuple[np.ndarray, ...]:
    return tuple((t * 255).astype(np.uint8) for t in _texture_bank(height, width))


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Two colourised textures (one over a random half-plane), each a crop of the bank at a random offset.
    Colourising is a lookup table, so this costs a few C passes and no float maths."""
    bank = _texture_u8(height, width)
    layers = []
    for _ in range(2):
        oy, ox = (int(v) for v in rng.integers(0, _TEXTURE_PAD, 2))
        tex = bank[int(rng.integers(len(bank)))][oy:oy + height, ox:ox + width]
        c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        layer = Image.fromarray(tex)
        layer.putpalette(_lut(c0, c1).tobytes())  # L -> P with the colour ramp as palette: a C-speed lookup
        layers.append(layer.convert("RGB"))
    half = Image.new("L", (width, height), 0)
    ang, off = rng.uniform(0, 2 * math.pi), rng.uniform(-0.3, 0.3)
    nx, ny = math.cos(ang), math.sin(ang)
    cx, cy, r = width * (0.5 + off * nx), height * (0.5 + off * ny), 2 * (width + height)
    # Half-plane beyond the line through (cx, cy) with normal (nx, ny), drawn as a big quad.
    ImageDraw.Draw(half).polygon([(cx - ny * r, cy + nx * r), (cx + ny * r, cy - nx * r),
                                  (cx + ny * r + nx * r, cy - nx * r + ny * r),
                                  (cx - ny * r + nx * r, cy + nx * r + ny * r)],
                                 fill=int(rng.integers(100, 256)))
    return Image.composite(layers[1], layers[0], half)


def _random_shapes(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    for _ in range(int(rng.integers(6, 16))):
        kind = int(rng.integers(4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * width)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * height)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour if rng.random() < 0.6 else None,
                         outline=colour, width=int(rng.integers(1, 5)))
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour if rng.random() < 0.6 else None,
                           outline=colour, width=int(rng.integers(1, 5)))
        elif kind == 2:
            pts = [tuple(p) for p in (rng.uniform(-0.1, 1.1, (int(rng.integers(3, 7)), 2)) * (width, height))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 7)))


# ----------------------------------------------------------------------------------------------- face
class _FacePainter:
    """Draws each part on the RGB canvas and the label canvas with the same rotated polygons."""

    def __init__(self, image: Image.Image, label: Image.Image, cx: float, cy: float, angle: float):
        self.rgb = ImageDraw.Draw(image)
        self.lab = ImageDraw.Draw(label)
        self.cx, self.cy = cx, cy
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def _rot(self, pts: np.ndarray) -> list[tuple[float, float]]:
        dx, dy = pts[:, 0] - self.cx, pts[:, 1] - self.cy
        x = self.cx + dx * self.cos - dy * self.sin
        y = self.cy + dx * self.sin + dy * self.cos
        return list(zip(x.tolist(), y.tolist()))

    def polygon(self, pts: np.ndarray, colour, label: int | None) -> None:
        pts = self._rot(pts)
        self.rgb.polygon(pts, fill=tuple(int(c) for c in colour))
        if label is not None:
            self.lab.polygon(pts, fill=label)

    def ellipse(self, x: float, y: float, rx: float, ry: float, colour, label: int | None, n: int = 28,
                start: float = 0.0, end: float = 2 * math.pi) -> None:
        cos, sin = _unit_arc(start, end, n)
        self.polygon(np.stack([x + rx * cos, y + ry * sin], 1), colour, label)

    def line(self, pts: np.ndarray, colour, label: int | None, width: int) -> None:
        pts = self._rot(np.asarray(pts, np.float64))
        self.rgb.line(pts, fill=tuple(int(c) for c in colour), width=width, joint="curve")
        if label is not None:
            self.lab.line(pts, fill=label, width=width, joint="curve")


@lru_cache(maxsize=64)
def _unit_arc(start: float, end: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(start, end, n)
    return np.cos(t), np.sin(t)


def _shade(c: np.ndarray, k: float) -> np.ndarray:
    return np.clip(c * k, 0, 255)


def _draw_face(rng: np.random.Generator, image: Image.Image, label: Image.Image) -> tuple[float, float, float, float]:
    width, height = image.size
    s = width / DEFAULT_WIDTH
    a = width * rng.uniform(0.19, 0.27)  # face half-width
    b = a * rng.uniform(1.2, 1.42)  # face half-height
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    cy = height * 0.53 + rng.uniform(-0.06, 0.06) * height
    angle = math.radians(rng.uniform(-15, 15))
    p = _FacePainter(image, label, cx, cy, angle)

    skin = SKIN_LIGHT + rng.beta(1.3, 1.3) * (SKIN_DARK - SKIN_LIGHT) + rng.normal(0, 8, 3)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.normal(0, 10, 3)
    style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    cloth = rng.uniform(0, 255, 3)

    # Back to front: clothes, neck, long hair behind the head, ears, face, then features on top.
    p.ellipse(cx, cy + b * 2.25, a * rng.uniform(2.0, 2.6), b * rng.uniform(0.9, 1.3), cloth, 16)
    p.polygon(np.array([[cx - a * 0.45, cy + b * 0.4], [cx + a * 0.45, cy + b * 0.4],
                        [cx + a * 0.55, cy + b * 1.45], [cx - a * 0.55, cy + b * 1.45]]), _shade(skin, 0.82), 14)
    if rng.random() < 0.15:  # necklace
        p.ellipse(cx, cy + b * 1.1, a * 0.5, b * 0.28, rng.uniform(150, 255, 3), 15, start=0.15, end=math.pi - 0.15)
    if style in ("long", "bob", "curly"):
        drop = {"long": 1.6, "bob": 0.75, "curly": 1.0}[style]
        p.polygon(np.array([[cx - a * 1.3, cy - b * 0.4], [cx + a * 1.3, cy - b * 0.4],
                            [cx + a * 1.35, cy + b * drop], [cx - a * 1.35, cy + b * drop]]), hair, 17)
        p.ellipse(cx, cy - b * 0.35, a * 1.3, b * 0.85, hair, 17)
    ear_y, ear_rx, ear_ry = cy + b * 0.02, a * 0.17, b * 0.24
    for side, lab in ((-1, 8), (1, 7)):  # image left = person's right ear (8)
        p.ellipse(cx + side * a * 0.97, ear_y, ear_rx, ear_ry, _shade(skin, 0.9), lab, n=16)
        if rng.random() < 0.12:
            p.ellipse(cx + side * a * 0.99, ear_y + ear_ry * 1.15, 2.5 * s, 2.5 * s, rng.uniform(180, 255, 3), 9, n=8)
    # Face: an ellipse with a slightly pointed chin.
    t = np.linspace(0, 2 * math.pi, 40)
    chin = 1 + 0.12 * np.clip(np.sin(t), 0, None) ** 6
    p.polygon(np.stack([cx + a * np.cos(t) * (1 - 0.1 * np.clip(np.sin(t), 0, None)), cy + b * np.sin(t) * chin], 1),
              skin, 1)

    # Hair on top of the head.
    if style != "bald":
        top = cy - b * rng.uniform(0.2, 0.45)
        p.ellipse(cx, cy - b * 0.25, a * 1.1, b * 0.95, hair, 17, start=math.pi, end=2 * math.pi, n=24)
        p.polygon(np.array([[cx - a * 1.1, cy - b * 0.27], [cx + a * 1.1, cy - b * 0.27],
                            [cx + a * 0.9, top], [cx - a * 0.9, top]]), hair, 17)
        if style == "fringe":
            p.polygon(np.array([[cx - a * 0.95, top], [cx + a * 0.95, top], [cx + a * 0.8, cy - b * 0.3],
                                [cx - a * 0.8, cy - b * 0.3]]), hair, 17)
        elif style == "parted":
            side = rng.choice([-1, 1])
            p.polygon(np.array([[cx + side * a * 1.05, cy - b * 0.2], [cx, top - b * 0.05],
                                [cx + side * a * 0.2, cy - b * 0.45]]), hair, 17)
        elif style == "curly":
            for k in range(10):
                ang = math.pi + k * math.pi / 9
                p.ellipse(cx + a * 1.05 * math.cos(ang), cy - b * 0.3 + b * 0.9 * math.sin(ang),
                          a * 0.22, a * 0.22, _shade(hair, rng.uniform(0.8, 1.2)), 17, n=12)

    eyes = _draw_features(p, rng, cx, cy, a, b, s, skin, hair)
    _draw_accessories(p, rng, cx, cy, a, b, s, eyes)
    return cx, cy, a, angle


def _draw_features(p: _FacePainter, rng: np.random.Generator, cx: float, cy: float, a: float, b: float, s: float,
                   skin: np.ndarray, hair: np.ndarray) -> tuple[float, float, float, float]:
    """Brows, eyes, nose and mouth; returns the eyes' (dx, y, rx, ry) for the glasses. The order of the rng draws is
    part of the dataset: keep it."""
    eye_dx, eye_y = a * rng.uniform(0.36, 0.46), cy - b * rng.uniform(0.08, 0.18)
    eye_rx, eye_ry = a * rng.uniform(0.15, 0.2), b * rng.uniform(0.05, 0.08)
    brow_col = _shade(hair, 0.8)
    iris = rng.uniform(20, 140, 3)
    for side, brow_lab, eye_lab in ((-1, 3, 5), (1, 2, 4)):
        ex = cx + side * eye_dx
        by = eye_y - eye_ry - b * rng.uniform(0.07, 0.12)
        p.line([[ex - side * eye_rx * 1.2, by + 2 * s], [ex, by - 2 * s], [ex + side * eye_rx * 1.3, by + 1 * s]],
               brow_col, brow_lab, width=max(2, int(round(3 * s))))
        p.ellipse(ex, eye_y, eye_rx, eye_ry, (235, 235, 230), eye_lab, n=20)
        p.ellipse(ex, eye_y, eye_ry * 0.95, eye_ry * 0.95, iris, eye_lab, n=12)
        p.ellipse(ex, eye_y, eye_ry * 0.4, eye_ry * 0.4, (10, 10, 10), eye_lab, n=8)
    nose_y = cy + b * rng.uniform(0.18, 0.28)
    nw = a * rng.uniform(0.14, 0.22)
    p.polygon(np.array([[cx, eye_y], [cx + nw, nose_y], [cx, nose_y + b * 0.04], [cx - nw, nose_y]]),
              _shade(skin, 0.85), 10)
    mouth_y, mw = cy + b * rng.uniform(0.45, 0.55), a * rng.uniform(0.3, 0.45)
    lip = np.clip(skin * 0.6 + np.array([90, 10, 20]) * rng.uniform(0.3, 1.0), 0, 255)
    smile = b * rng.uniform(-0.02, 0.08)
    p.polygon(np.array([[cx - mw, mouth_y], [cx - mw * 0.3, mouth_y - b * 0.07], [cx, mouth_y - b * 0.05],
                        [cx + mw * 0.3, mouth_y - b * 0.07], [cx + mw, mouth_y], [cx, mouth_y + smile * 0.3]]),
              lip, 12)
    p.polygon(np.array([[cx - mw, mouth_y], [cx, mouth_y + smile * 0.3], [cx + mw, mouth_y],
                        [cx + mw * 0.5, mouth_y + b * 0.09 + smile], [cx - mw * 0.5, mouth_y + b * 0.09 + smile]]),
              _shade(lip, 1.1), 13)
    if rng.random() < 0.35:  # open mouth: the inner mouth class
        p.ellipse(cx, mouth_y + smile * 0.3, mw * 0.55, b * 0.025 + abs(smile) * 0.3, (60, 15, 20), 11, n=16)
    return eye_dx, eye_y, eye_rx, eye_ry


def _draw_accessories(p: _FacePainter, rng: np.random.Generator, cx: float, cy: float, a: float, b: float, s: float,
                      eyes: tuple[float, float, float, float]) -> None:
    """Glasses (a quarter of the faces) and a hat (15%), drawn last, over the features."""
    eye_dx, eye_y, eye_rx, eye_ry = eyes
    if rng.random() < 0.25:  # glasses
        frame = rng.uniform(0, 120, 3) if rng.random() < 0.7 else rng.uniform(150, 230, 3)
        sun = rng.random() < 0.3
        fw = max(2, int(round(2 * s)))
        for side in (-1, 1):
            ex = cx + side * eye_dx
            t = np.linspace(0, 2 * math.pi, 20)
            ring = np.stack([ex + eye_rx * 1.45 * np.cos(t), eye_y + eye_ry * 2.6 * np.sin(t)], 1)
            if sun:
                p.polygon(ring, rng.uniform(10, 60, 3), 6)
            p.line(np.vstack([ring, ring[:1]]), frame, 6, width=fw)
        p.line([[cx - eye_dx + eye_rx * 1.45, eye_y], [cx + eye_dx - eye_rx * 1.45, eye_y]], frame, 6, width=fw)

    if rng.random() < 0.15:  # hat
        hat = rng.uniform(0, 255, 3)
        brim_y = cy - b * rng.uniform(0.45, 0.6)
        p.ellipse(cx, brim_y, a * 1.2, b * 0.7, hat, 18, start=math.pi, end=2 * math.pi, n=20)
        p.polygon(np.array([[cx - a * 1.5, brim_y], [cx + a * 1.5, brim_y], [cx + a * 1.45, brim_y + b * 0.1],
                            [cx - a * 1.45, brim_y + b * 0.1]]), _shade(hat, 0.8), 18)


def render_face(seed: int, index: int, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> SyntheticFace:
    """Image `index` of the synthetic dataset with this seed (independent of any other index)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0xFACE])
    image = _background(rng, height, width)
    _random_shapes(rng, ImageDraw.Draw(image), width, height)
    label = Image.new("L", (width, height), 0)
    cx, cy, a, angle = _draw_face(rng, image, label)

    # Directional light over the person (face, hair, neck, clothes), leaving the background unlit, plus a slight
    # colour cast. Integer maths: gain is computed at 1/4 resolution, upsampled, then one multiply (x/128 fixed point).
    lab = np.asarray(label)
    light = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.08, 0.25)
    small_h, small_w = -(-height // 4), -(-width // 4)
    yy = (np.arange(small_h, dtype=np.float32)[:, None] * 4 + 1.5 - cy) / a
    xx = (np.arange(small_w, dtype=np.float32)[None, :] * 4 + 1.5 - cx) / a
    gain = 1 + strength * (xx * math.cos(light) + yy * math.sin(light)) - 0.04 * (xx * xx + yy * yy)
    gain = np.clip(gain * rng.uniform(0.85, 1.15), 0.45, 1.5)
    gain_img = Image.fromarray((gain * 128).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    gain_u = np.where(lab > 0, np.asarray(gain_img), np.uint8(128)).astype(np.uint16)
    cast = np.clip(128 + rng.normal(0, 3, 3) * 128 / 100, 100, 156).astype(np.uint16)
    gain3 = (gain_u[..., None] * cast) >> 7  # <= 192 * 156 / 128 = 234, so image * gain3 fits in uint16
    rgb = (np.asarray(image).astype(np.uint16) * gain3) >> 7
    return SyntheticFace(np.minimum(rgb, 255).astype(np.uint8), np.ascontiguousarray(lab))


def face_fraction(label: np.ndarray) -> float:
    """Fraction of pixels inside the paper's face mask (for summaries and tests)."""
    return float((~np.isin(label, FACE_EXCLUDED_LABELS)).mean())
