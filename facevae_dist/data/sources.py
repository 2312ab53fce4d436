"""Where raw faces come from. Every source yields the same kind of record, so the shard writer has one code path.

A Source does two things:
  plan()       -> SourcePlan: the ordered list of items per split (cheap: file names, no decoding), plus items
                  skipped up front (e.g. no mask, with --on-missing-mask skip). Layout problems raise DataError here,
                  before any work starts.
  load(item)   -> Record(source_id, split, image RGB uint8 HxWx3, label uint8 HxW | None, mask bool HxW | None).
                  A corrupt image raises CorruptSample (the writer skips it, counts it and lists it).
Sources are plain picklable objects: the writer sends them to worker processes.
To add one (e.g. a folder of photos with an offline mask extractor), subclass Source, implement plan/load/describe
and register it in SOURCES.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facevae_dist.data import imageio, synthetic
from facevae_dist.data.masks import CELEBAMASK_HQ_PARTS, part_masks_to_labelmap, read_part_mask
from facevae_dist.errors import DataError, UsageError

SPLITS = ("train", "val", "test")
_PARTITION_CODES = {"0": "train", "1": "val", "2": "test"}
ON_MISSING_MASK = ("error", "skip")


class CorruptSample(Exception):
    """One item could not be read; the writer records (source_id, reason) and carries on."""


@dataclass(frozen=True)
class Item:
    source_id: str
    split: str
    ref: Any = None  # whatever load() needs (paths, an index)


@dataclass
class Record:
    source_id: str
    split: str
    image: np.ndarray  # uint8 HxWx3 RGB
    label: np.ndarray | None = None  # uint8 label map (any size; same framing as the image)
    mask: np.ndarray | None = None  # bool face mask, when the source has no label map
    meta: dict = field(default_factory=dict)

    def face_mask(self) -> np.ndarray:
        from facevae_dist.data.masks import labelmap_to_mask

        if self.mask is not None:
            return self.mask
        if self.label is None:
            raise ValueError(f"{self.source_id}: record has neither a label map nor a mask")
        return labelmap_to_mask(self.label)


@dataclass
class SourcePlan:
    items: dict[str, list[Item]]  # split -> ordered items
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (split, source_id, reason)


class Source:
    name = "?"

    def plan(self) -> SourcePlan:
        raise NotImplementedError

    def load(self, item: Item) -> Record:
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies the dataset (written to the manifest; a different description = a different dataset)."""
        raise NotImplementedError


def _read_rgb(path: Path, source_id: str) -> np.ndarray:
    try:
        return imageio.read_rgb(path)
    except imageio.ImageReadError as exc:
        raise CorruptSample(f"cannot decode {path.name}: {exc.reason}")


def _read_label(path: Path) -> np.ndarray:
    try:
        return imageio.values_to_labels(imageio.read_values(path))
    except imageio.ImageReadError as exc:
        raise CorruptSample(f"cannot decode mask {path}: {exc.reason}")


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found ({hint})")


def parse_partition_file(path: Path) -> dict[str, str]:
    """CelebA `list_eval_partition.txt`: '<name>.jpg <0|1|2>' per line -> {name: split}."""
    if not path.is_file():
        raise DataError(f"{path}: partition file not found (expected CelebA's list_eval_partition.txt: "
                        "lines '<image>.jpg <0|1|2>')")
    result: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in _PARTITION_CODES:
                raise DataError(f"{path}:{lineno}: malformed partition line {line.strip()[:80]!r} "
                                "(expected '<image>.jpg <0|1|2>')")
            if parts[0] in result:
                raise DataError(f"{path}:{lineno}: image {parts[0]} listed twice")
            result[parts[0]] = _PARTITION_CODES[parts[1]]
    if not result:
        raise DataError(f"{path}: partition file is empty")
    return result


def _split_by_ratios(names: list[str], ratios: tuple[float, float, float]) -> dict[str, str]:
    return {name: synthetic.split_for_index(i, len(names), ratios) for i, name in enumerate(names)}


# ------------------------------------------------------------------------------------------------ synthetic
@dataclass
class SyntheticSource(Source):
    n: int = 2000
    seed: int = 0
    width: int = synthetic.DEFAULT_WIDTH
    height: int = synthetic.DEFAULT_HEIGHT
    split_ratios: tuple[float, float, float] = synthetic.DEFAULT_SPLIT_RATIOS
    name = "synthetic"

    def plan(self) -> SourcePlan:
        if self.n < 1:
            raise UsageError(f"--n must be >= 1 for the synthetic source (got {self.n})")
        items: dict[str, list[Item]] = {s: [] for s in SPLITS}
        # Same route as CelebA: a partition "file" (in memory) decides the split of each named image.
        for line in synthetic.partition_lines(self.n, self.split_ratios):
            name, code = line.split()
            index = int(name.split(".")[0]) - 1
            items[_PARTITION_CODES[code]].append(Item(name.split(".")[0], _PARTITION_CODES[code], index))
        return SourcePlan(items)

    def load(self, item: Item) -> Record:
        face = synthetic.render_face(self.seed, item.ref, self.width, self.height)
        return Record(item.source_id, item.split, face.image, label=face.label)

    def describe(self) -> dict:
        return {"name": self.name, "n": self.n, "seed": self.seed, "width": self.width, "height": self.height,
                "split_ratios": list(self.split_ratios)}


def export_synthetic_folder(root: Path, n: int, seed: int = 0, jpeg_quality: int = 95,
                            label_size: int | None = 512) -> None:
    """Write synthetic faces in the CelebA layout the paper's code reads: img_align_celeba/NNNNNN.jpg,
    mask_faceparsing/NNNNNN.png (label maps, 512x512 like face-parsing's output by default) and
    list_eval_partition.txt. Used by the per-file benchmark and by tests of the celeba source."""
    root = Path(root)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    (root / "mask_faceparsing").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        face = synthetic.render_face(seed, i)
        stem = synthetic.image_name(i)[:-4]
        Image.fromarray(face.image).save(root / "img_align_celeba" / f"{stem}.jpg", quality=jpeg_quality)
        label = Image.fromarray(face.label)
        if label_size:
            label = label.resize((label_size, label_size), Image.NEAREST)
        label.save(root / "mask_faceparsing" / f"{stem}.png")
    (root / "list_eval_partition.txt").write_text("\n".join(synthetic.partition_lines(n)) + "\n")


# ------------------------------------------------------------------------------------------------ celeba
@dataclass
class CelebASource(Source):
    root: Path
    masks: Path | None = None  # default root/mask_faceparsing
    on_missing_mask: str = "error"
    name = "celeba"

    def _mask_dir(self) -> Path:
        return Path(self.masks) if self.masks else Path(self.root) / "mask_faceparsing"

    def plan(self) -> SourcePlan:
        root = Path(self.root)
        _require_dir(root, "CelebA root", "pass --root DIR holding img_align_celeba/, list_eval_partition.txt and "
                     "mask_faceparsing/")
        img_dir = root / "img_align_celeba"
        _require_dir(img_dir, "image folder", "expected CelebA's aligned images in ROOT/img_align_celeba/")
        mask_dir = self._mask_dir()
        _require_dir(mask_dir, "label-map folder", "expected face-parsing label-map PNGs named like the images in "
                     "ROOT/mask_faceparsing/, or pass --masks DIR")
        partition = parse_partition_file(root / "list_eval_partition.txt")
        images = set(os.listdir(img_dir))
        masks = set(os.listdir(mask_dir))
        plan = SourcePlan({s: [] for s in SPLITS})
        for name in sorted(partition):
            split, stem = partition[name], name.rsplit(".", 1)[0]
            if name not in images:
                raise DataError(f"{img_dir / name}: listed in list_eval_partition.txt but missing")
            if f"{stem}.png" not in masks:
                if self.on_missing_mask == "skip":
                    plan.skipped.append((split, stem, f"no label map {mask_dir / (stem + '.png')}"))
                    continue
                raise DataError(f"{img_dir / name}: no label map {mask_dir / (stem + '.png')} "
                                "(use --on-missing-mask skip to leave such images out)")
            plan.items[split].append(Item(stem, split, name))
        return plan

    def load(self, item: Item) -> Record:
        stem = item.ref.rsplit(".", 1)[0]
        image = _read_rgb(Path(self.root) / "img_align_celeba" / item.ref, item.source_id)
        label = _read_label(self._mask_dir() / f"{stem}.png")
        return Record(item.source_id, item.split, image, label=label)

    def describe(self) -> dict:
        return {"name": self.name, "root": str(Path(self.root).resolve()), "masks": str(self._mask_dir().resolve()),
                "on_missing_mask": self.on_missing_mask}


# ------------------------------------------------------------------------------------------------ celebamask-hq
@dataclass
class CelebAMaskHQSource(Source):
    root: Path
    on_missing_mask: str = "error"
    name = "celebamask-hq"
    # Official split by the original CelebA index (CelebAMask-HQ's own partition script uses these bounds).
    VAL_START, TEST_START = 162770, 182637

    def _anno(self) -> Path:
        return Path(self.root) / "CelebAMask-HQ-mask-anno"

    def plan(self) -> SourcePlan:
        root = Path(self.root)
        _require_dir(root, "CelebAMask-HQ root", "pass --root DIR holding CelebA-HQ-img/, CelebAMask-HQ-mask-anno/ "
                     "and CelebA-HQ-to-CelebA-mapping.txt")
        _require_dir(root / "CelebA-HQ-img", "image folder", "expected CelebA-HQ-img/<id>.jpg")
        _require_dir(self._anno(), "part-mask folder", "expected CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png")
        mapping = root / "CelebA-HQ-to-CelebA-mapping.txt"
        if not mapping.is_file():
            raise DataError(f"{mapping}: not found (needed for the official train/val/test split)")
        images = set(os.listdir(root / "CelebA-HQ-img"))
        anno = {}
        for sub in sorted(os.listdir(self._anno())):
            if (self._anno() / sub).is_dir():
                for fname in os.listdir(self._anno() / sub):
                    if fname.endswith(".png"):
                        anno.setdefault(int(fname.split("_", 1)[0]), sub)
        plan = SourcePlan({s: [] for s in SPLITS})
        with open(mapping, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                parts = line.split()
                if not parts or (lineno == 1 and not parts[0].isdigit()):
                    continue  # blank line or the "idx orig_idx orig_file" header
                if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
                    raise DataError(f"{mapping}:{lineno}: malformed line {line.strip()[:80]!r} "
                                    "(expected '<idx> <orig_idx> <orig_file>')")
                idx, orig = int(parts[0]), int(parts[1])
                split = "test" if orig >= self.TEST_START else "val" if orig >= self.VAL_START else "train"
                name = f"{idx}.jpg"
                if name not in images:
                    raise DataError(f"{root / 'CelebA-HQ-img' / name}: listed in {mapping.name} but missing")
                if idx not in anno:
                    if self.on_missing_mask == "skip":
                        plan.skipped.append((split, str(idx), "no part masks"))
                        continue
                    raise DataError(f"{root / 'CelebA-HQ-img' / name}: no part masks "
                                    f"{self._anno()}/*/{idx:05d}_*.png (use --on-missing-mask skip)")
                plan.items[split].append(Item(str(idx), split, (name, anno[idx], orig)))
        for split in SPLITS:
            plan.items[split].sort(key=lambda it: int(it.source_id))
        return plan

    def load(self, item: Item) -> Record:
        name, sub, orig = item.ref
        image = _read_rgb(Path(self.root) / "CelebA-HQ-img" / name, item.source_id)
        idx = int(item.source_id)
        parts, shape = {}, None
        for part in CELEBAMASK_HQ_PARTS:
            path = self._anno() / sub / f"{idx:05d}_{part}.png"
            if path.exists():
                try:
                    parts[part] = read_part_mask(path)
                except Exception as exc:
                    raise CorruptSample(f"cannot decode part mask {path}: {type(exc).__name__}: {exc}")
                shape = parts[part].shape
        if shape is None:
            raise CorruptSample(f"no part masks for {idx}")
        try:
            label = part_masks_to_labelmap(parts, shape)
        except ValueError as exc:
            raise CorruptSample(f"{idx}: {exc}")
        return Record(item.source_id, item.split, image, label=label, meta={"celeba_index": orig})

    def describe(self) -> dict:
        return {"name": self.name, "root": str(Path(self.root).resolve()), "on_missing_mask": self.on_missing_mask}


# ------------------------------------------------------------------------------------------------ folder
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class FolderSource(Source):
    """Any folder of face photos (searched recursively, sorted by relative path). Masks come from --masks DIR
    (one PNG per image at the same relative path with .png suffix: a 0/255 (or 0/1) binary mask, or a 19-class
    label map, told apart by its values) or are extracted with the offline MediaPipe recipe (--masks auto).
    Split: contiguous blocks of the sorted list by --split-ratios, like CelebA's partition file."""

    root: Path
    masks: str = "auto"  # "auto" or a directory
    on_missing_mask: str = "error"
    split_ratios: tuple[float, float, float] = synthetic.DEFAULT_SPLIT_RATIOS
    name = "folder"

    def _images(self) -> list[str]:
        root = Path(self.root)
        # Not only files: a directory (or other non-file) named like an image is listed as skipped, not dropped.
        names = [str(p.relative_to(root)) for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        if self.masks != "auto":
            mask_dir = Path(self.masks).resolve()
            names = [n for n in names if mask_dir not in (root / n).resolve().parents]
        return sorted(names)

    def _mask_path(self, name: str) -> Path:
        return Path(self.masks) / Path(name).with_suffix(".png")

    def plan(self) -> SourcePlan:
        root = Path(self.root)
        _require_dir(root, "photo folder", "pass --root DIR holding face photos (jpg/png/...)")
        if self.masks == "auto":
            from facevae_dist.data import mediapipe_mask

            mediapipe_mask.require()
        else:
            _require_dir(Path(self.masks), "mask folder", "pass --masks DIR with one PNG per photo, or --masks auto")
        names = self._images()
        if not names:
            raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} recursively)")
        plan = SourcePlan({s: [] for s in SPLITS})
        for i, name in enumerate(names):
            split = synthetic.split_for_index(i, len(names), self.split_ratios)
            if not (root / name).is_file():
                kind = "a directory" if (root / name).is_dir() else "not a regular file"
                plan.skipped.append((split, name, f"{root / name}: {kind}, not an image"))
                continue
            if self.masks != "auto" and not self._mask_path(name).is_file():
                if self.on_missing_mask == "skip":
                    plan.skipped.append((split, name, f"no mask {self._mask_path(name)}"))
                    continue
                raise DataError(f"{root / name}: no mask {self._mask_path(name)} "
                                "(use --on-missing-mask skip to leave such images out, or --masks auto)")
            plan.items[split].append(Item(name, split, name))
        return plan

    def load(self, item: Item) -> Record:
        image = _read_rgb(Path(self.root) / item.ref, item.source_id)
        if self.masks == "auto":
            from facevae_dist.data.mediapipe_mask import extract_face_mask

            mask = extract_face_mask(image)
            if mask is None:
                raise CorruptSample("no face found by the MediaPipe extractor")
            return Record(item.source_id, item.split, image, mask=mask, meta={"mask": "mediapipe"})
        path = self._mask_path(item.ref)
        try:
            kind, values = imageio.read_mask_or_labels(path)
        except imageio.ImageReadError as exc:
            raise CorruptSample(f"cannot decode mask {path}: {exc.reason}")
        if kind == "labels":  # a label map (a 0/1 mask reads the same: 1 = skin = face)
            return Record(item.source_id, item.split, image, label=values)
        return Record(item.source_id, item.split, image, mask=values)

    def describe(self) -> dict:
        return {"name": self.name, "root": str(Path(self.root).resolve()),
                "masks": "auto" if self.masks == "auto" else str(Path(self.masks).resolve()),
                "on_missing_mask": self.on_missing_mask, "split_ratios": list(self.split_ratios)}


SOURCES = ("synthetic", "celeba", "celebamask-hq", "folder")


def make_source(name: str, *, root: str | Path | None = None, masks: str | Path | None = None, n: int = 2000,
                seed: int = 0, on_missing_mask: str = "error",
                split_ratios: tuple[float, float, float] | None = None) -> Source:
    """Build a source from CLI-level options; raises UsageError for wrong combinations."""
    if on_missing_mask not in ON_MISSING_MASK:
        raise UsageError(f"--on-missing-mask must be one of {ON_MISSING_MASK}, got {on_missing_mask!r}")
    if name == "synthetic":
        return SyntheticSource(n=n, seed=seed, split_ratios=split_ratios or synthetic.DEFAULT_SPLIT_RATIOS)
    if root is None:
        raise UsageError(f"--source {name} needs --root DIR")
    if name == "celeba":
        return CelebASource(Path(root), Path(masks) if masks else None, on_missing_mask)
    if name == "folder":
        return FolderSource(Path(root), str(masks) if masks else "auto", on_missing_mask,
                            split_ratios or synthetic.DEFAULT_SPLIT_RATIOS)
    if name == "celebamask-hq":
        if masks:
            raise UsageError("--masks applies to --source celeba (celebamask-hq reads its own part masks)")
        return CelebAMaskHQSource(Path(root), on_missing_mask)
    raise UsageError(f"unknown --source {name!r}; choose one of {', '.join(SOURCES)}")
