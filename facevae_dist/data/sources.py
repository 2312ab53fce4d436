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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facevae_dist.data import imageio, synthetic
from facevae_dist.data.masks import (
    CELEBAMASK_HQ_PARTS,
    LABEL_SCHEMES,
    guess_label_scheme,
    labelmap_to_mask,
    part_masks_to_labelmap,
    read_part_mask,
    to_faceparsing,
)
from facevae_dist.errors import DataError, UsageError
from facevae_dist.progress import info, warn

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
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


def _read_label(path: Path, scheme: str = "faceparsing") -> np.ndarray:
    try:
        return to_faceparsing(imageio.values_to_labels(imageio.read_values(path)), scheme)
    except imageio.ImageReadError as exc:
        raise CorruptSample(f"cannot decode mask {path}: {exc.reason}")


_SCHEME_FLAG = "--label-scheme"
_SAMPLED_LABEL_MAPS = 16


def _check_label_scheme(paths: list[Path], scheme: str | None, where: Path) -> str:
    """The numbering to read label maps with: `scheme` if given, else face-parsing's (the paper's), after checking a
    few evenly spaced maps: maps that clearly use CelebAMask-HQ's g_mask.py numbering stop the build (they would give
    wrong masks silently), naming the flag that converts them."""
    step = max(1, len(paths) // _SAMPLED_LABEL_MAPS)
    labels = []
    for path in paths[::step][:_SAMPLED_LABEL_MAPS]:
        try:
            kind, values = imageio.read_mask_or_labels(path)
        except imageio.ImageReadError:
            continue  # a corrupt map is reported by load(), with the sample
        if kind == "labels":
            labels.append(values)
    guess, evidence = guess_label_scheme(labels) if labels else (None, "")
    if scheme is None:
        if guess == "celebamask-hq":
            raise DataError(f"{where}: these label maps use CelebAMask-HQ's g_mask.py numbering (hair 13, hat 14, "
                            f"neck 17, cloth 18; {evidence}), not face-parsing's that the paper's masks use: pass "
                            f"{_SCHEME_FLAG} celebamask-hq to convert them ({_SCHEME_FLAG} faceparsing to use them "
                            "as they are)")
        return "faceparsing"
    if guess is not None and guess != scheme:
        warn(f"{where}: {_SCHEME_FLAG} {scheme} given, but the label maps look like {guess} numbering ({evidence}); "
             "masks are built as told")
    return scheme


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found ({hint})")


def parse_partition_file(path: Path) -> dict[str, str]:
    """CelebA `list_eval_partition.txt` ('<name>.jpg <0|1|2>' per line) or the Kaggle copy's
    `list_eval_partition.csv` ('image_id,partition' header, then '<name>.jpg,<0|1|2>') -> {name: split}."""
    if not path.is_file():
        raise DataError(f"{path}: partition file not found (expected CelebA's list_eval_partition.txt: "
                        "lines '<image>.jpg <0|1|2>'; pass --partition FILE if it is elsewhere)")
    result: dict[str, str] = {}
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.replace(",", " ").split()
            if not parts or (lineno == 1 and parts == ["image_id", "partition"]):
                continue  # blank line or the Kaggle CSV header
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
# Where CelebA's aligned images and partition file sit in the layouts people hold, relative to a dataset folder:
# this project's / the README's, the Kaggle copy (a folder inside a folder of the same name), the official share
# (Img/, Eval/), the PNG edition, and the authors' code (imgs/). torchvision's `celeba/` folder is searched as a
# dataset folder under --root too.
_IMAGE_DIRS = ("img_align_celeba", "img_align_celeba/img_align_celeba", "Img/img_align_celeba",
               "img_align_celeba_png", "Img/img_align_celeba_png", "imgs")
_PARTITION_FILES = ("list_eval_partition.txt", "Eval/list_eval_partition.txt", "list_eval_partition.csv")
_DATASET_DIRS = (".", "celeba")
ALIGNED_SIZE = (178, 218)  # width, height of img_align_celeba: the size the paper's masks were made for
MASKS_HINT = ("the paper's face-parsing label maps are not part of CelebA but a separate download (linked from the "
              "authors' repository, tldrafael/FaceReconstructionWithVAEAndFaceMasks): put them in "
              "ROOT/mask_faceparsing/ or pass --masks DIR, or pass --masks auto to extract approximate face+hair "
              "masks offline with MediaPipe")


def _has_images(path: Path) -> bool:
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return any(e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".") for e in entries)


def _found(root: Path, relpaths: tuple[str, ...], test) -> list[Path]:
    return [root / d / r for d in _DATASET_DIRS for r in relpaths if test(root / d / r)]


def _one(found: list[Path], root: Path, what: str, flag: str) -> Path | None:
    unique: dict[Path, Path] = {}
    for path in found:  # a symlink to another candidate is the same place, not a second one
        unique.setdefault(path.resolve(), path)
    found = list(unique.values())
    if len(found) > 1:
        raise DataError(f"{root}: {what} found in more than one place ({', '.join(str(p) for p in found)}); pass "
                        f"{flag} to choose one")
    return found[0] if found else None


@dataclass
class CelebASource(Source):
    root: Path
    masks: Path | str | None = None  # a folder of label maps, "auto" (MediaPipe), or None: <dataset>/mask_faceparsing
    on_missing_mask: str = "error"
    images: Path | None = None  # default: found under root (_IMAGE_DIRS)
    partition: Path | None = None  # default: found under root (_PARTITION_FILES)
    label_scheme: str | None = None  # None: face-parsing's, checked on a sample
    name = "celeba"

    def __post_init__(self):
        self._resolved: tuple[Path, Path, Path | None, str] | None = None

    def _layout(self) -> tuple[Path, Path, Path | None]:
        """(image folder, partition file, label-map folder or None for --masks auto), found or as given."""
        root = Path(self.root)
        _require_dir(root, "CelebA root", "pass --root DIR holding img_align_celeba/, list_eval_partition.txt and "
                     "mask_faceparsing/")
        if self.images is not None:
            img_dir = Path(self.images)
            _require_dir(img_dir, "image folder", "--images must name the folder holding CelebA's aligned images")
        else:
            img_dir = _one(_found(root, _IMAGE_DIRS, _has_images), root, "CelebA image folders", "--images DIR")
            if img_dir is None:
                raise DataError(f"{root}: no CelebA image folder found (looked for "
                                f"{', '.join(d + '/' for d in _IMAGE_DIRS)} here and under celeba/); pass --images "
                                "DIR, or symlink your aligned-image folder as ROOT/img_align_celeba")
        if self.partition is not None:
            partition = Path(self.partition)
        else:
            partition = _one(_found(root, _PARTITION_FILES, Path.is_file), root, "partition files", "--partition FILE")
            if partition is None:
                raise DataError(f"{root}: no list_eval_partition.txt found (looked for {', '.join(_PARTITION_FILES)} "
                                "here and under celeba/); pass --partition FILE (CelebA's "
                                "Eval/list_eval_partition.txt)")
        if self.masks == "auto":
            return img_dir, partition, None
        if self.masks:
            mask_dir = Path(self.masks)
            _require_dir(mask_dir, "label-map folder (--masks)", "check the path, or pass --masks auto to extract "
                         "approximate face+hair masks offline with MediaPipe")
            return img_dir, partition, mask_dir
        candidates = [p for p in (root / "mask_faceparsing", partition.parent / "mask_faceparsing",
                                  img_dir.parent / "mask_faceparsing") if p.is_dir()]
        mask_dir = _one(candidates, root, "mask_faceparsing/ folders", "--masks DIR")
        if mask_dir is None:
            raise DataError(f"{root / 'mask_faceparsing'}: label-map folder not found; {MASKS_HINT}")
        return img_dir, partition, mask_dir

    def plan(self) -> SourcePlan:
        img_dir, partition_file, mask_dir = self._layout()
        if mask_dir is None:
            from facevae_dist.data import mediapipe_mask

            mediapipe_mask.require()
        partition = parse_partition_file(partition_file)
        names = set(os.listdir(img_dir))
        # Files by stem too: the partition file names .jpg also for the PNG edition.
        images: dict[str, str] = {}
        for fname in sorted(names):
            if fname.lower().endswith(IMAGE_SUFFIXES) and not fname.startswith("."):
                images.setdefault(fname.rsplit(".", 1)[0], fname)
        masks = set(os.listdir(mask_dir)) if mask_dir is not None else set()
        plan = SourcePlan({s: [] for s in SPLITS})
        for name in sorted(partition):
            split, stem = partition[name], name.rsplit(".", 1)[0]
            fname = name if name in names else images.get(stem)
            if fname is None:
                raise DataError(f"{img_dir / name}: listed in {partition_file.name} but missing (--images names the "
                                "image folder)")
            if mask_dir is not None and f"{stem}.png" not in masks:
                if self.on_missing_mask == "skip":
                    plan.skipped.append((split, stem, f"no label map {mask_dir / (stem + '.png')}"))
                    continue
                raise DataError(f"{img_dir / fname}: no label map {mask_dir / (stem + '.png')} "
                                "(use --on-missing-mask skip to leave such images out)")
            plan.items[split].append(Item(stem, split, fname))
        items = [it for split in SPLITS for it in plan.items[split]]
        scheme = "faceparsing"
        if mask_dir is not None:
            scheme = _check_label_scheme([mask_dir / f"{it.source_id}.png" for it in items], self.label_scheme,
                                         mask_dir)
            _warn_unaligned(img_dir, [it.ref for it in items])
        self._resolved = (img_dir, partition_file, mask_dir, scheme)
        if img_dir != Path(self.root) / "img_align_celeba" or partition_file != Path(self.root) / _PARTITION_FILES[0]:
            info(f"CelebA: images {img_dir}, partition {partition_file}, masks {mask_dir or 'auto (MediaPipe)'}")
        return plan

    def _paths(self) -> tuple[Path, Path, Path | None, str]:
        if self._resolved is None:  # load() before plan() in this process: resolve the same way
            img_dir, partition, mask_dir = self._layout()
            self._resolved = (img_dir, partition, mask_dir, self.label_scheme or "faceparsing")
        return self._resolved

    def load(self, item: Item) -> Record:
        img_dir, _, mask_dir, scheme = self._paths()
        image = _read_rgb(img_dir / item.ref, item.source_id)
        if mask_dir is None:
            return _auto_mask_record(item, image)
        label = _read_label(mask_dir / f"{item.source_id}.png", scheme)
        return Record(item.source_id, item.split, image, label=label)

    def describe(self) -> dict:
        img_dir, partition, mask_dir, scheme = self._paths()
        root = Path(self.root)
        desc = {"name": self.name, "root": str(root.resolve()),
                "masks": "auto" if mask_dir is None else str(mask_dir.resolve()),
                "on_missing_mask": self.on_missing_mask}
        # Only where they differ from the original layout, so that shards built before these options still resume.
        if img_dir.resolve() != (root / "img_align_celeba").resolve():
            desc["images"] = str(img_dir.resolve())
        if partition.resolve() != (root / _PARTITION_FILES[0]).resolve():
            desc["partition"] = str(partition.resolve())
        if scheme != "faceparsing":
            desc["label_scheme"] = scheme
        return desc


def _warn_unaligned(img_dir: Path, names: list[str]) -> None:
    """The face-parsing masks were made for aligned 178x218 CelebA images: other sizes (e.g. the in-the-wild set)
    would get masks that do not match the face. Reads only the image headers."""
    odd = []
    for name in names:
        try:
            with Image.open(img_dir / name) as im:
                size = im.size
        except Exception:
            continue  # unreadable: load() reports it as a corrupt sample
        if size != ALIGNED_SIZE:
            odd.append(f"{name} {size[0]}x{size[1]}")
    if odd:
        warn(f"{img_dir}: {len(odd)} of {len(names)} images are not {ALIGNED_SIZE[0]}x{ALIGNED_SIZE[1]} like aligned "
             f"CelebA ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}): label maps made for the aligned images "
             "will not match them (use img_align_celeba, not the in-the-wild set; or --masks auto)")


def _auto_mask_record(item: Item, image: np.ndarray) -> Record:
    from facevae_dist.data.mediapipe_mask import extract_face_mask  # optional, heavy: only for --masks auto

    mask = extract_face_mask(image)
    if mask is None:
        raise CorruptSample("no face found by the MediaPipe extractor")
    return Record(item.source_id, item.split, image, mask=mask, meta={"mask": "mediapipe"})


# ------------------------------------------------------------------------------------------------ celebamask-hq
_PART_FILE = re.compile(r"(\d+)_(\w+)\.png")


@dataclass
class CelebAMaskHQSource(Source):
    root: Path
    on_missing_mask: str = "error"
    name = "celebamask-hq"
    # CelebA's official split (list_eval_partition.txt: val from 162771.jpg, test from 182638.jpg) on the mapping's
    # 0-based orig_idx. CelebAMask-HQ's own g_partition.py compares orig_idx with 162771 and 182638 instead, i.e. it
    # puts the one image at each boundary (orig_idx 162770, 182637) in the split before; we follow the official file.
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
        found: dict[int, dict[str, list[str]]] = {}  # id -> folder -> its part files there
        stray = []
        for sub in sorted(os.listdir(self._anno())):
            if (self._anno() / sub).is_dir():
                for fname in sorted(os.listdir(self._anno() / sub)):
                    if not fname.endswith(".png"):
                        continue
                    match = _PART_FILE.fullmatch(fname)
                    if match is None or match.group(2) not in CELEBAMASK_HQ_PARTS:
                        stray.append(f"{sub}/{fname}")  # e.g. macOS ._00000_skin.png, a preview.png
                        continue
                    found.setdefault(int(match.group(1)), {}).setdefault(sub, []).append(fname)
        if stray:
            warn(f"{self._anno()}: {len(stray)} PNG file(s) not named <id>_<part>.png ignored "
                 f"({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})")
        # An id's parts are read from one folder: one whose files sit in two (a part copied into another numbered
        # folder) would have its mask made from whichever folder came first, so it is skipped and listed instead.
        anno = {idx: next(iter(folders)) for idx, folders in found.items() if len(folders) == 1}
        spread = {idx: self._spread_reason(folders) for idx, folders in found.items() if len(folders) > 1}
        if spread:
            first = min(spread)
            warn(f"{self._anno()}: {len(spread)} sample(s) have part masks in more than one folder and are skipped "
                 f"(listed in errors.tsv), e.g. {first}: {spread[first]}")
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
                if idx in spread:
                    plan.skipped.append((split, str(idx), spread[idx]))
                    continue
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

    def _spread_reason(self, folders: dict[str, list[str]]) -> str:
        """Why one id's part files in several folders cannot be read: the same part twice, or parts split up."""
        seen: dict[str, str] = {}
        for sub, files in folders.items():
            for fname in files:
                if fname in seen:
                    return (f"{self._anno() / seen[fname] / fname} and {self._anno() / sub / fname} are the same part: "
                            "remove the copy")
                seen[fname] = sub
        (a, fa), (b, fb) = list(folders.items())[:2]
        return (f"its part masks are split between {self._anno() / a}/ ({', '.join(fa[:2])}) and {self._anno() / b}/ "
                f"({', '.join(fb[:2])}): keep them in one folder")

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
    label_scheme: str | None = None  # numbering of label-map PNGs; None: face-parsing's, checked on a sample
    name = "folder"

    def __post_init__(self):
        self._scheme = self.label_scheme or "faceparsing"

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
        _warn_empty_splits(plan, self.split_ratios, len(names))
        if self.masks != "auto":
            items = [it for split in SPLITS for it in plan.items[split]]
            self._scheme = _check_label_scheme([self._mask_path(it.ref) for it in items], self.label_scheme,
                                               Path(self.masks))
        return plan

    def load(self, item: Item) -> Record:
        image = _read_rgb(Path(self.root) / item.ref, item.source_id)
        if self.masks == "auto":
            return _auto_mask_record(item, image)
        path = self._mask_path(item.ref)
        try:
            kind, values = imageio.read_mask_or_labels(path)
        except imageio.ImageReadError as exc:
            raise CorruptSample(f"cannot decode mask {path}: {exc.reason}")
        if kind == "labels":  # a label map (a 0/1 mask reads the same: 1 = skin = face, in both numberings)
            return Record(item.source_id, item.split, image, label=to_faceparsing(values, self._scheme))
        return Record(item.source_id, item.split, image, mask=values)

    def describe(self) -> dict:
        return {"name": self.name, "root": str(Path(self.root).resolve()),
                "masks": "auto" if self.masks == "auto" else str(Path(self.masks).resolve()),
                "on_missing_mask": self.on_missing_mask, "split_ratios": list(self.split_ratios),
                **({"label_scheme": self._scheme} if self._scheme != "faceparsing" else {})}


def _warn_empty_splits(plan: SourcePlan, ratios: tuple[float, float, float], n: int) -> None:
    empty = [s for s, r in zip(SPLITS, ratios) if r > 0 and not plan.items[s]]
    if empty:
        warn(f"split {', '.join(empty)} is empty: {n} image(s) at --split-ratios {','.join(f'{r:g}' for r in ratios)} "
             "leave none for it (add images, or change --split-ratios)")


SOURCES = ("synthetic", "celeba", "celebamask-hq", "folder")


def make_source(name: str, *, root: str | Path | None = None, masks: str | Path | None = None, n: int = 2000,
                seed: int = 0, on_missing_mask: str = "error",
                split_ratios: tuple[float, float, float] | None = None, images: str | Path | None = None,
                partition: str | Path | None = None, label_scheme: str | None = None) -> Source:
    """Build a source from CLI-level options; raises UsageError for wrong combinations."""
    if on_missing_mask not in ON_MISSING_MASK:
        raise UsageError(f"--on-missing-mask must be one of {ON_MISSING_MASK}, got {on_missing_mask!r}")
    if label_scheme is not None and label_scheme not in LABEL_SCHEMES:
        raise UsageError(f"--label-scheme must be one of {', '.join(LABEL_SCHEMES)}, got {label_scheme!r}")
    if name != "celeba" and (images or partition):
        raise UsageError("--images and --partition apply to --source celeba")
    if name in ("synthetic", "celebamask-hq") and label_scheme:
        raise UsageError(f"--label-scheme applies to label-map PNGs read with --masks DIR (--source {name} makes "
                         "its own label maps)")
    if name == "synthetic":
        return SyntheticSource(n=n, seed=seed, split_ratios=split_ratios or synthetic.DEFAULT_SPLIT_RATIOS)
    if root is None:
        raise UsageError(f"--source {name} needs --root DIR")
    if name == "celeba":
        if split_ratios:
            raise UsageError("--split-ratios does not apply to --source celeba (its partition file gives the split)")
        return CelebASource(Path(root), str(masks) if str(masks) == "auto" else Path(masks) if masks else None,
                            on_missing_mask, Path(images) if images else None, Path(partition) if partition else None,
                            label_scheme)
    if name == "folder":
        return FolderSource(Path(root), str(masks) if masks else "auto", on_missing_mask,
                            split_ratios or synthetic.DEFAULT_SPLIT_RATIOS, label_scheme)
    if name == "celebamask-hq":
        if masks:
            raise UsageError("--masks applies to --source celeba and folder (celebamask-hq reads its own part masks)")
        return CelebAMaskHQSource(Path(root), on_missing_mask)
    raise UsageError(f"unknown --source {name!r}; choose one of {', '.join(SOURCES)}")
