"""The sources `facevae shards build` reads (data/sources.py): the synthetic source's plan and partition file, the
CelebA layouts people hold (rebuilt in miniature: a few 178x218 images, the partition file, label maps), label maps
in CelebAMask-HQ's own numbering, stray files in CelebAMask-HQ's part-mask folders, where the masks come from, and
the warnings for empty splits and images that are not aligned CelebA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facevae_dist import progress
from facevae_dist.cli import main
from facevae_dist.data import mediapipe_mask, synthetic
from facevae_dist.data.masks import GMASK_PARTS, LABEL_NAMES, guess_label_scheme, labelmap_to_mask, to_faceparsing
from facevae_dist.data.sources import CelebASource, SyntheticSource, parse_partition_file
from facevae_dist.data.tario import iter_tar

N = 8  # images 000001..000008: 6 train, 1 val, 1 test
SPLIT_CODES = ["0"] * 6 + ["1", "2"]
_TO_GMASK = np.zeros(256, np.uint8)
_TO_GMASK[[LABEL_NAMES.index(p) for p in GMASK_PARTS]] = np.arange(1, len(GMASK_PARTS) + 1)


def write_celeba(images: Path, partition: Path, masks: Path | None, *, ext: str = "jpg", csv: bool = False,
                 gmask: bool = False, n: int = N) -> None:
    """Miniature CelebA: aligned-size faces, the partition file (txt, or Kaggle's csv with header and CRLF) and
    face-parsing label maps (or the same maps in CelebAMask-HQ's g_mask.py numbering)."""
    images.mkdir(parents=True, exist_ok=True)
    partition.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image_id,partition"] if csv else []
    for i in range(n):
        face = synthetic.render_face(3, i)
        stem = f"{i + 1:06d}"
        Image.fromarray(face.image).save(images / f"{stem}.{ext}")
        lines.append(f"{stem}.jpg{',' if csv else ' '}{SPLIT_CODES[i]}")
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            label = _TO_GMASK[face.label] if gmask else face.label
            Image.fromarray(label).resize((64, 64), Image.NEAREST).save(masks / f"{stem}.png")
    partition.write_bytes(("\r\n" if csv else "\n").join(lines).encode() + b"\n")


LAYOUTS = {  # name -> (images, partition, masks, options), relative to --root
    "readme": ("img_align_celeba", "list_eval_partition.txt", "mask_faceparsing", {}),
    "official share": ("Img/img_align_celeba", "Eval/list_eval_partition.txt", "mask_faceparsing", {}),
    "torchvision": ("celeba/img_align_celeba", "celeba/list_eval_partition.txt", "celeba/mask_faceparsing", {}),
    "kaggle": ("img_align_celeba/img_align_celeba", "list_eval_partition.csv", "mask_faceparsing", {"csv": True}),
    "authors": ("imgs", "list_eval_partition.txt", "mask_faceparsing", {}),
    "png edition": ("img_align_celeba_png", "list_eval_partition.txt", "mask_faceparsing", {"ext": "png"}),
}


def build(root: Path, out: Path, *extra: str) -> int:
    return main(["--quiet", "shards", "build", "--source", "celeba", "--root", str(root), "--out", str(out),
                 "--image-size", "18", "--shard-size", "4", *extra])


def shard_masks(out: Path) -> dict[str, bytes]:
    return {json.loads(f["json"])["source_id"]: f["mask.png"]
            for shard in sorted(out.glob("*/shard-*.tar")) for _, f in iter_tar(shard)}


@pytest.fixture(scope="module")
def reference_masks(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("ref")
    write_celeba(root / "img_align_celeba", root / "list_eval_partition.txt", root / "mask_faceparsing")
    # `--quiet` in-process sets the quiet flag and FACEVAE_QUIET; conftest's per-test restore runs inside this
    # module-scoped fixture, so restore them here or every later test of the session runs quiet
    saved_env, saved_flag = os.environ.get("FACEVAE_QUIET"), progress.is_quiet()
    try:
        assert build(root, root / "s") == 0
    finally:
        if saved_env is None:
            os.environ.pop("FACEVAE_QUIET", None)
        else:
            os.environ["FACEVAE_QUIET"] = saved_env
        progress.set_quiet(saved_flag)
    return shard_masks(root / "s")


def test_partition_file_roundtrip(tmp_path):
    lines = synthetic.partition_lines(50)
    assert lines[0] == "000001.jpg 0" and lines[-1] == "000050.jpg 2"
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    parsed = parse_partition_file(tmp_path / "p.txt")
    assert [list(parsed.values()).count(s) for s in ("train", "val", "test")] == [40, 5, 5]
    plan = SyntheticSource(n=50).plan()
    assert [len(plan.items[s]) for s in ("train", "val", "test")] == [40, 5, 5]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_real_celeba_layout_builds_shards(tmp_path, capsys, reference_masks, layout):
    images, partition, masks, options = LAYOUTS[layout]
    root = tmp_path / "data"
    write_celeba(root / images, root / partition, root / masks, **options)
    if layout == "torchvision":  # the rest of torchvision's folder, which must not confuse the search
        for name in ("identity_CelebA.txt", "list_attr_celeba.txt", "list_bbox_celeba.txt"):
            (root / "celeba" / name).write_text("x\n")
    out = tmp_path / "s"
    assert build(root, out) == 0, capsys.readouterr().err
    assert json.loads((out / "sizes.json").read_text()) == {"train": 6, "val": 1, "test": 1}
    assert shard_masks(out) == reference_masks  # the same images got the same masks
    assert main(["--quiet", "shards", "verify", str(out)]) == 0
    assert build(root, out) == 0  # and the build resumes as the same dataset


def test_ambiguous_or_missing_layout_is_one_line_naming_the_flag(tmp_path, capsys, reference_masks):
    root = tmp_path / "data"
    write_celeba(root / "img_align_celeba", root / "list_eval_partition.txt", root / "mask_faceparsing")
    write_celeba(root / "imgs", root / "other" / "p.txt", None)
    capsys.readouterr()
    assert build(root, tmp_path / "s") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than one place" in err[0] and "--images DIR" in err[0]
    assert build(root, tmp_path / "s", "--images", str(root / "imgs")) == 0
    assert shard_masks(tmp_path / "s") == reference_masks
    (root / "list_eval_partition.txt").rename(root / "other" / "partition.txt")
    capsys.readouterr()
    assert build(root, tmp_path / "s2", "--images", str(root / "imgs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--partition FILE" in err[0]
    assert build(root, tmp_path / "s2", "--images", str(root / "imgs"), "--partition",
                 str(root / "other" / "partition.txt")) == 0
    (root / "imgs").rename(root / "pictures")
    (root / "img_align_celeba").rename(root / "photos")
    capsys.readouterr()
    assert build(root, tmp_path / "s3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--images DIR" in err[0] and "symlink" in err[0]


def test_a_symlink_to_the_same_folder_is_not_ambiguous(tmp_path, reference_masks):
    root = tmp_path / "data"
    write_celeba(root / "Img" / "img_align_celeba", root / "Eval" / "list_eval_partition.txt",
                 root / "celeba" / "mask_faceparsing")
    (root / "img_align_celeba").symlink_to(root / "Img" / "img_align_celeba")  # what the error advises
    (root / "mask_faceparsing").symlink_to(root / "celeba" / "mask_faceparsing")
    assert build(root, tmp_path / "s") == 0
    assert shard_masks(tmp_path / "s") == reference_masks


def test_label_maps_in_celebamask_hq_numbering_are_refused_then_converted_with_the_flag(tmp_path, capsys,
                                                                                        reference_masks):
    root = tmp_path / "data"
    write_celeba(root / "img_align_celeba", root / "list_eval_partition.txt", root / "mask_faceparsing", gmask=True)
    capsys.readouterr()
    assert build(root, tmp_path / "s") == 2  # before: exit 0 with wrong masks
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "g_mask.py numbering" in err[0] and "--label-scheme celebamask-hq" in err[0]
    assert build(root, tmp_path / "s", "--label-scheme", "celebamask-hq") == 0
    assert shard_masks(tmp_path / "s") == reference_masks
    # the folder source reads label maps through the same flag
    photos = tmp_path / "photos"
    write_celeba(photos, tmp_path / "unused.txt", tmp_path / "gmasks", gmask=True)
    args = ["--quiet", "shards", "build", "--source", "folder", "--root", str(photos), "--masks",
            str(tmp_path / "gmasks"), "--split-ratios", "0.75,0.125,0.125", "--image-size", "18", "--shard-size", "4"]
    assert main([*args, "--out", str(tmp_path / "f")]) == 2
    assert main([*args, "--out", str(tmp_path / "f"), "--label-scheme", "celebamask-hq"]) == 0
    assert shard_masks(tmp_path / "f") == {f"{k}.jpg": v for k, v in reference_masks.items()}


def test_gmask_numbering_converts_part_by_part():
    gmask = np.arange(len(GMASK_PARTS) + 1, dtype=np.uint8)[None]
    converted = to_faceparsing(gmask, "celebamask-hq")[0]
    assert [LABEL_NAMES[v] for v in converted[1:]] == list(GMASK_PARTS)
    face = labelmap_to_mask(converted[None])[0]
    assert {GMASK_PARTS[i - 1] for i in range(1, 19) if not face[i]} == {"l_ear", "r_ear", "ear_r", "neck_l",
                                                                         "neck", "cloth"}


def test_numbering_guess_is_not_fooled_by_long_hair():
    fp = np.zeros((64, 64), np.uint8)
    fp[30:64, 8:56] = 17  # long hair, mostly below the face's centre
    fp[10:40, 20:44] = 1  # skin
    fp[32:34, 28:36] = 13  # lower lip
    fp[40:46, 26:38] = 14  # neck
    assert guess_label_scheme([fp] * 4)[0] != "celebamask-hq"
    fp[30:64, 8:56] = 16  # short hair: clothes below, hair on top
    fp[2:10, 12:52] = 17
    fp[10:40, 20:44] = 1
    fp[32:34, 28:36] = 13
    fp[40:46, 26:38] = 14
    assert guess_label_scheme([fp] * 4)[0] == "faceparsing"
    assert guess_label_scheme([_TO_GMASK[fp]] * 4)[0] == "celebamask-hq"  # the same map renumbered
    assert guess_label_scheme([np.ones((8, 8), np.uint8)])[0] is None  # a 0/1 mask tells nothing


def test_celebamask_hq_stray_pngs_are_skipped_and_listed(tmp_path, capsys):
    root = tmp_path / "hq"
    anno = root / "CelebAMask-HQ-mask-anno" / "0"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    anno.mkdir(parents=True)
    lines = ["idx orig_idx orig_file"]
    for idx in range(3):
        Image.fromarray(np.full((32, 32, 3), 50 * idx, np.uint8)).save(root / "CelebA-HQ-img" / f"{idx}.jpg")
        skin = np.zeros((32, 32), np.uint8)
        skin[8:24, 8:24] = 255
        Image.fromarray(skin).save(anno / f"{idx:05d}_skin.png")
        lines.append(f"{idx} {idx * 1000} {idx * 1000 + 1:06d}.jpg")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(lines) + "\n")
    (anno / "._00000_skin.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (anno / "preview.png").write_bytes((anno / "00000_skin.png").read_bytes())
    capsys.readouterr()
    assert main(["--quiet", "shards", "build", "--source", "celebamask-hq", "--root", str(root), "--out",
                 str(tmp_path / "s"), "--image-size", "18", "--shard-size", "2"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 PNG file(s)" in warnings[0]
    assert "0/._00000_skin.png" in warnings[0] and "0/preview.png" in warnings[0]
    assert json.loads((tmp_path / "s" / "sizes.json").read_text())["train"] == 3


def test_missing_label_maps_say_where_they_come_from_and_offer_masks_auto(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    write_celeba(root / "img_align_celeba", root / "list_eval_partition.txt", None)
    capsys.readouterr()
    assert build(root, tmp_path / "s") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask_faceparsing" in err[0] and "separate download" in err[0]
    assert "authors' repository" in err[0] and "--masks auto" in err[0]
    # and --masks auto is accepted for celeba: the official split, masks extracted per image
    monkeypatch.setattr(mediapipe_mask, "require", lambda: None)
    plan = CelebASource(root, masks="auto").plan()
    assert [len(plan.items[s]) for s in ("train", "val", "test")] == [6, 1, 1] and not plan.skipped


def test_folder_of_six_photos_warns_about_the_empty_test_split(tmp_path, capsys):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    write_celeba(photos, tmp_path / "unused.txt", masks, n=6)
    capsys.readouterr()
    assert main(["--quiet", "shards", "build", "--source", "folder", "--root", str(photos), "--masks", str(masks),
                 "--out", str(tmp_path / "s"), "--image-size", "18"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "split test is empty" in warnings[0] and "6 image(s)" in warnings[0]
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {"train": 5, "val": 1, "test": 0}


def test_images_that_are_not_aligned_celeba_size_are_counted_in_a_warning(tmp_path, capsys):
    root = tmp_path / "data"
    write_celeba(root / "img_align_celeba", root / "list_eval_partition.txt", root / "mask_faceparsing")
    for stem in ("000002", "000005"):  # in-the-wild photos put in the aligned folder
        Image.new("RGB", (500, 375), (90, 80, 70)).save(root / "img_align_celeba" / f"{stem}.jpg")
    capsys.readouterr()
    assert build(root, tmp_path / "s") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 of 8 images are not 178x218" in warnings[0]
    assert "000002.jpg 500x375" in warnings[0]


def test_help_documents_the_numbering_the_flags_and_the_official_split_ratios(capsys):
    with pytest.raises(SystemExit):
        main(["shards", "build", "--help"])
    text = capsys.readouterr().out
    for needle in ("--label-scheme", "g_mask.py", "17 hair", "--split-ratios 0.80341,0.09806,0.09853", "--images",
                   "--partition", "Eval/list_eval_partition.txt", "list_eval_partition.csv", "imgs/"):
        assert needle in text, needle
    # the documented ratios reproduce CelebA's official partition sizes on its 202,599 images
    splits = [synthetic.split_for_index(i, 202599, (0.80341, 0.09806, 0.09853)) for i in range(202599)]
    assert [splits.count(s) for s in ("train", "val", "test")] == [162770, 19867, 19962]


def _celebamask_hq(root: Path, n: int = 4) -> Path:
    """Miniature CelebAMask-HQ: n images, a skin and a hair part each in folder 1/, the mapping file."""
    anno = root / "CelebAMask-HQ-mask-anno" / "1"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    anno.mkdir(parents=True)
    lines = ["idx orig_idx orig_file"]
    for idx in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * idx, np.uint8)).save(root / "CelebA-HQ-img" / f"{idx}.jpg")
        skin, hair = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
        skin[10:26, 8:24], hair[2:10, 6:26] = 255, 255
        Image.fromarray(skin).save(anno / f"{idx:05d}_skin.png")
        Image.fromarray(hair).save(anno / f"{idx:05d}_hair.png")
        lines.append(f"{idx} {idx * 1000} {idx * 1000 + 1:06d}.jpg")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(lines) + "\n")
    return anno.parent


def test_celebamask_hq_part_in_two_folders_is_skipped_naming_both_files(tmp_path, capsys):
    """A part copied into another numbered folder that sorts first ('00002_hair.png' in 1/ and in 0/): the id was
    mapped to the first folder and every part read from it, so that sample's mask silently became the lone copied
    part. Now the sample is skipped, counted and listed with both files."""
    anno = _celebamask_hq(tmp_path / "hq")
    (anno / "0").mkdir()
    (anno / "0" / "00002_hair.png").write_bytes((anno / "1" / "00002_hair.png").read_bytes())
    (anno / "2").mkdir()
    (anno / "2" / "00003_hat.png").write_bytes((anno / "1" / "00003_hair.png").read_bytes())  # parts split up
    capsys.readouterr()
    out = tmp_path / "s"
    assert main(["--quiet", "shards", "build", "--source", "celebamask-hq", "--root", str(tmp_path / "hq"), "--out",
                 str(out), "--image-size", "18", "--shard-size", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "more than one folder" in line]
    assert len(warnings) == 1 and "2 sample(s)" in warnings[0]
    errors = dict(line.split("\t")[1:] for line in (out / "errors.tsv").read_text().splitlines())
    assert errors["2"] == (f"{anno / '0' / '00002_hair.png'} and {anno / '1' / '00002_hair.png'} are the same "
                           "part: remove the copy")
    assert errors["3"].startswith("its part masks are split between") and "00003_hat.png" in errors["3"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 2 and manifest["skipped"] == 2
