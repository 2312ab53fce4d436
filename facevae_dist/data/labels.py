"""Label maps in the shards: the `labels.png` member, written where a source has per-pixel label maps, and read
back by sample key (evaluation takes its skin and hair regions from it, never from the generator).

A sample's `labels.png` is its face-parsing label map (masks.py numbering: 1 skin, 17 hair, ...) as a 1-channel
uint8 PNG at the training size, in the frame of the image and mask: the same crop box, resized with NEAREST (a class
id must stay a class id; PIL's NEAREST takes the source pixel under each output pixel's centre). Sources without label
maps (`--masks auto`, 0/255 mask files) write none, and neither does a map holding only background and skin: that is
a 0/1 mask read as labels (imageio.read_mask_or_labels), and calling its whole face "skin" would mislead.
Shards built before this member existed (format_version 1) hold none; the reader says so instead of failing.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from facevae_dist.data.masks import NUM_LABELS
from facevae_dist.data.tario import index_tar

LABELS_MEMBER = "labels.png"
LABELS_DESCRIPTION = ("uint8 1-channel: the face-parsing label map (class ids 0-18, docs/data.md) resized with "
                      "NEAREST to the training size, in the image's frame")


def labels_limit(image_size: int) -> int:
    """The most bytes a labels.png of these shards may take (as tario.member_limits bounds mask.png)."""
    return 2 * image_size * image_size + (1 << 20)


def has_parts(label: np.ndarray | None) -> bool:
    """A label map with classes beyond background and skin (not a 0/1 face mask read as labels)."""
    return label is not None and int(np.asarray(label).max(initial=0)) > 1


def resize_labels(label: np.ndarray, image_shape: tuple[int, ...], box: tuple[float, float, float, float],
                  size: int) -> np.ndarray:
    """uint8 HxW label map -> size x size with NEAREST, cropped by `box` (given in the image's pixels; the label map
    may have its own size, e.g. 512x512 face-parsing output, so the box is scaled to its frame)."""
    sx, sy = label.shape[1] / image_shape[1], label.shape[0] / image_shape[0]
    label_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8), "L").resize((size, size), Image.NEAREST,
                                                                                      box=label_box))


def encode_labels(label: np.ndarray | None, image_shape: tuple[int, ...], box: tuple[float, float, float, float],
                  size: int) -> bytes | None:
    """The labels.png bytes of one record, or None where it has no label map worth storing (see has_parts)."""
    if not has_parts(label):
        return None
    buf = io.BytesIO()
    Image.fromarray(resize_labels(label, image_shape, box, size), "L").save(buf, format="PNG")
    return buf.getvalue()


def decode_labels(data: bytes, size: int) -> np.ndarray:
    """labels.png bytes -> uint8 size x size label map; raises ValueError on another size, mode or class id."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        if im.size != (size, size):
            raise ValueError(f"{LABELS_MEMBER} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
        if im.mode != "L":
            raise ValueError(f"{LABELS_MEMBER} mode {im.mode}, expected L (8-bit class ids)")
        label = np.asarray(im)
    if label.max(initial=0) >= NUM_LABELS:
        raise ValueError(f"{LABELS_MEMBER} holds class {int(label.max())}, the numbering has 0-{NUM_LABELS - 1}")
    return label


def manifest_block(labelled: int) -> dict:
    """manifest.json's "labels": the member, its encoding and how many samples carry one."""
    return {"field": LABELS_MEMBER, "encoding": LABELS_DESCRIPTION, "samples": labelled}


def no_labels_reason(manifest: dict) -> str | None:
    """Why the shards of `manifest` hold no label maps, or None when some samples do."""
    block = manifest.get("labels")
    if not isinstance(block, dict):
        return ("these shards hold no label maps (built before labels.png was stored: rebuild them with "
                "`facevae shards build` to get them)")
    if not block.get("samples"):
        source = (manifest.get("source") or {}).get("name")
        return f"these shards hold no label maps (their source, {source!r}, provided no per-pixel part labels)"
    return None


class ShardLabels:
    """The label maps of one split's samples, read by sample key straight from the shards (each tar's headers are
    indexed once; a batch reads only its own labels.png members, each within its size limit).

    `why_not` is set when the shards hold no label maps at all; otherwise `batch` returns, per key, the map or a
    flag that the sample has none, and an unreadable member is counted in `corrupt` (reported, never silently
    treated as 'no labels')."""

    def __init__(self, shards_dir: str | os.PathLike, manifest: dict, split: str):
        self.size = int(manifest["image_size"])
        self.why_not = no_labels_reason(manifest)
        self.where: dict[str, tuple[Path, int, int]] = {}  # key -> (tar, offset, size) of its labels.png
        self.corrupt: list[str] = []
        if self.why_not is not None:
            return
        for shard in manifest["splits"][split]["shards"]:
            path = Path(shards_dir) / shard["path"]
            for key, fields in index_tar(path):
                if LABELS_MEMBER in fields:
                    self.where[key] = (path, *fields[LABELS_MEMBER])
        if not self.where:
            self.why_not = f"no sample of split {split!r} holds a label map"

    def batch(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [B, H, W] label maps, bool [B]: the sample has one); zeros where it has none."""
        out = np.zeros((len(keys), self.size, self.size), np.uint8)
        have = np.zeros(len(keys), bool)
        for i, key in enumerate(keys):
            if key not in self.where:
                continue
            path, offset, nbytes = self.where[key]
            try:
                if nbytes > labels_limit(self.size):
                    raise ValueError(f"{LABELS_MEMBER} is {nbytes:,} bytes (limit {labels_limit(self.size):,})")
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(nbytes)
                if len(data) != nbytes:
                    raise EOFError(f"{LABELS_MEMBER} truncated ({len(data)} of {nbytes} bytes)")
                out[i] = decode_labels(data, self.size)
                have[i] = True
            except (OSError, EOFError, ValueError, Image.DecompressionBombError) as exc:
                item = f"{key} ({path.name}: {LABELS_MEMBER}: {exc})"
                if item not in self.corrupt:
                    self.corrupt.append(item)
        return out, have
