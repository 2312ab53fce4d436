"""`facevae shards build|verify|info`: raw faces -> WebDataset shards, their check, and their summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from facevae_dist.config import IMAGE_SIZES
from facevae_dist.presets import add_preset_argument, apply_shards_preset, track_explicit

BUILD_EPILOG = """\
sources and the layout each expects under --root:
  synthetic       nothing: procedural CelebA-like portraits with 19-class label maps (--n images, --seed);
                  split 80/10/10 in CelebA's contiguous style (--split-ratios)
  celeba          CelebA's aligned images, its partition file and a folder of face-parsing label-map PNGs named
                  like the images. Found under --root (or ROOT/celeba/, torchvision's folder) in these layouts:
                    img_align_celeba/*.jpg + list_eval_partition.txt           (this project's, the README's)
                    Img/img_align_celeba/ + Eval/list_eval_partition.txt       (the official share)
                    img_align_celeba/img_align_celeba/ + list_eval_partition.csv   (the Kaggle copy)
                    img_align_celeba_png/*.png                                 (the PNG edition)
                    imgs/                                                      (the authors' code)
                  or named with --images DIR and --partition FILE. Label maps: ROOT/mask_faceparsing/ (the paper's,
                  a separate download linked from the authors' repository) or --masks DIR, or --masks auto
                  (MediaPipe, approximate). Images are expected at 178x218 (aligned CelebA; other sizes warn)
  celebamask-hq   CelebA-HQ-img/<id>.jpg, CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png and
                  CelebA-HQ-to-CelebA-mapping.txt (gives the official split)
  folder          any folder of face photos (recursive); masks from --masks DIR (one PNG per photo at the same
                  relative path: 0/255 mask or 19-class label map) or --masks auto (default: offline MediaPipe
                  face+hair extractor, an optional install: see facevae_dist/data/mediapipe_mask.py); photos where
                  no face is found are skipped and listed; split by --split-ratios over the sorted file list

label maps use face-parsing.PyTorch's numbering, as the paper's masks do: 0 background, 1 skin, 2/3 brows,
4/5 eyes, 6 glasses, 7/8 ears, 9 earring, 10 nose, 11 mouth, 12/13 lips, 14 neck, 15 necklace, 16 cloth, 17 hair,
18 hat. Maps made with CelebAMask-HQ's own g_mask.py number them differently (6/7 brows, 13 hair, 14 hat, 17 neck,
18 cloth, ...): pass --label-scheme celebamask-hq to convert them; a sample of the maps is checked, and maps that
clearly use the other numbering stop the build with that advice.

split: celeba and celebamask-hq follow CelebA's official partition (162,770 / 19,867 / 19,962 images). The folder
source cuts its sorted file list into contiguous blocks by --split-ratios (default 0.8,0.1,0.1); for a folder
holding all of img_align_celeba, --split-ratios 0.80341,0.09806,0.09853 reproduces the official split exactly.
A split left empty (too few images for its ratio) is warned about.

face mask = label map minus background, ears, earring, neck, necklace and cloth (the paper's definition: hair, hat
and glasses count as face). Stored as a 1-channel PNG: the 0/1 mask resized like the image (x255), so edges are soft.
--resize cv2 --image-format png reproduces the paper's preprocessing (cv2.resize INTER_LINEAR, no compression).

output (OUT, default shards/<source>): {train,val,test}/shard-NNNNNN.tar (+ .stats.json written last),
manifest.json, sizes.json, errors.tsv (every skipped item with its reason), build.json.
Re-running the same command resumes (complete shards whose sha256 matches their stats file are kept, others
rebuilt); the bytes written do not depend on --workers. A different dataset already in OUT is refused unless
--overwrite, which removes only files a shard build writes (anything else in OUT makes it refuse).

examples:
  facevae shards build --source synthetic --n 5000 --workers 2
  facevae shards build --source celeba --root /data/celeba --out shards/celeba --workers 8
  facevae shards verify shards/synthetic
  facevae shards info shards/synthetic --grid sheet.png
"""


FIT_VALUES = ("squash", "center-crop")


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(t) for t in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three non-negative fractions summing to 1, e.g. 0.8,0.1,0.1; "
                                         f"got {text!r}")
    return parts  # type: ignore[return-value]


def _image_size(text: str) -> int:
    """A size the model can train on (config.IMAGE_SIZES): shards at any other size build, then no run can use them."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in IMAGE_SIZES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size the model is built for; use one of "
                                         f"{', '.join(map(str, IMAGE_SIZES))} (9 x 2^k; the paper uses 144)")
    return value


def _build(args) -> int:
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import make_source

    if args.resize in FIT_VALUES:  # the old spelling `--resize center-crop` (before --resize chose the resampler)
        from facevae_dist.progress import info

        info(f"--resize {args.resize} is now spelled --fit {args.resize} (--resize chooses pil or cv2)")
        args.fit, args.resize = args.resize, "pil"
        getattr(args, "_explicit_options", set()).discard("resize")
    apply_shards_preset(args, args.preset)  # fills only options not given on the command line
    source = make_source(args.source, root=args.root, masks=args.masks, n=args.n, seed=args.seed,
                         on_missing_mask=args.on_missing_mask, split_ratios=args.split_ratios, images=args.images,
                         partition=args.partition, label_scheme=args.label_scheme)
    opts = ShardOptions(image_size=args.image_size, fit=args.fit, resize=args.resize, image_format=args.image_format,
                        jpeg_quality=args.jpeg_quality, shard_size=args.shard_size)
    build_shards(source, args.out or Path("shards") / args.source, opts, workers=args.workers,
                 overwrite=args.overwrite)
    return 0


def _verify(args) -> int:
    import sys

    from facevae_dist.data.shards import verify_shards
    from facevae_dist.progress import info

    report = verify_shards(args.dir)
    if report["ok"]:
        info(f"{args.dir}: OK, {report['shards']} shards, " +
             ", ".join(f"{s} {n}" for s, n in report["counts"].items()) + " samples decoded")
        return 0
    for problem in report["problems"]:
        print(f"facevae: verify: {problem}", file=sys.stderr)
    if report.get("rebuild"):
        print(f"facevae: verify: to repair, re-run `{report['rebuild']}` (intact shards are kept, damaged ones and "
              "the manifest rewritten)", file=sys.stderr)
    print(f"facevae: error: {args.dir}: {len(report['problems'])} problem(s) found", file=sys.stderr)
    return 1


def _info(args) -> int:
    from facevae_dist.data.shards import shards_info

    summary = shards_info(args.dir, grid=args.grid, n_grid=args.n_grid)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    from rich.table import Table

    from facevae_dist.progress import output_console

    table = Table(title=f"shards: {summary['dir']}")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("shards", justify="right")
    for split, count in summary["counts"].items():
        table.add_row(split, str(count), str(summary["shards"][split]))
    console = output_console()  # not squeezed to 80 columns when piped
    console.print(table)
    console.print(f"source: {json.dumps(summary['source'])}")
    console.print(f"options: {json.dumps(summary['options'])}")
    console.print(f"skipped: {summary['skipped']}   size: {summary['bytes'] / 1e6:.1f} MB   "
                  f"built by facevae-dist {summary['package_version']}")
    if "grid" in summary:
        console.print(f"contact sheet: {summary['grid']}")
    return 0


def register(sub) -> None:
    shards = sub.add_parser("shards", help="build, verify and inspect WebDataset shards",
                            description="Turn raw faces (synthetic, CelebA, CelebAMask-HQ) into WebDataset tar shards "
                            "at training size, check them, and summarise them.")
    shards_sub = shards.add_subparsers(dest="shards_command", metavar="ACTION", parser_class=type(shards))
    shards.set_defaults(_parser=shards)

    build = shards_sub.add_parser("build", help="build (or resume building) shards from a source",
                                  description="Build train/val/test WebDataset shards from a face source.",
                                  epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = build.add_argument_group("source")
    src.add_argument("--source", default="synthetic", choices=["synthetic", "celeba", "celebamask-hq", "folder"],
                     help="where faces come from (default synthetic)")
    src.add_argument("--root", help="dataset root directory (celeba, celebamask-hq, folder)")
    src.add_argument("--masks", help="celeba: folder of label-map PNGs (default ROOT/mask_faceparsing) or 'auto' "
                     "(MediaPipe extractor); folder: 'auto' (default) or a folder of mask/label-map PNGs")
    src.add_argument("--images", help="celeba: the folder of aligned images, when it is not found under --root")
    src.add_argument("--partition", help="celeba: list_eval_partition.txt (or Kaggle's .csv), when it is not found "
                     "under --root")
    src.add_argument("--label-scheme", choices=["faceparsing", "celebamask-hq"], default=None,
                     help="numbering of the label-map PNGs: faceparsing (face-parsing.PyTorch's, the paper's; "
                     "default) or celebamask-hq (CelebAMask-HQ's g_mask.py: 7 r_brow, 13 hair, 14 hat, 17 neck, "
                     "18 cloth), converted on reading")
    src.add_argument("--n", type=int, default=2000, help="synthetic: number of images (default 2000)")
    src.add_argument("--seed", type=int, default=0, help="synthetic: generator seed (default 0)")
    src.add_argument("--split-ratios", type=_ratios, default=None, metavar="TRAIN,VAL,TEST",
                     help="synthetic, folder: split fractions (default 0.8,0.1,0.1; 0.80341,0.09806,0.09853 "
                     "reproduces CelebA's official split for a folder holding all of img_align_celeba)")
    src.add_argument("--on-missing-mask", choices=["error", "skip"], default="error",
                     help="an image without a label map: stop with an error naming it (default), or skip it "
                     "(listed in errors.tsv)")
    out = build.add_argument_group("output")
    out.add_argument("--out", help="output directory (default shards/<source>)")
    out.add_argument("--image-size", type=_image_size, default=144, metavar="PX",
                     help=f"square training size in pixels: one the model is built for, "
                     f"{', '.join(map(str, IMAGE_SIZES))} (default 144)")
    out.add_argument("--fit", choices=FIT_VALUES, default="squash",
                     help="squash: whole image to a square, as the paper does (default); center-crop: largest "
                     "centered square, aspect ratio kept")
    out.add_argument("--resize", choices=["pil", "cv2", *FIT_VALUES], default="pil", metavar="{pil,cv2}",
                     help="resampler for image and mask: pil (bilinear, antialiased; default) or cv2 (cv2.resize "
                     "INTER_LINEAR: no antialiasing, exactly the paper's preprocessing; OpenCV not needed)")
    out.add_argument("--image-format", "--format", dest="image_format", choices=["jpg", "png"], default="jpg",
                     help="image encoding in shards: jpg (--jpeg-quality, default) or png (lossless)")
    out.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    out.add_argument("--shard-size", type=int, default=None,
                     help="samples per shard (default auto: ~64 train shards, at most 1000 samples each); the loader "
                     "needs at least ranks x loader workers shards per split it reads")
    out.add_argument("--workers", type=int, default=1, help="parallel processes (default 1; output identical)")
    out.add_argument("--overwrite", action="store_true", help="delete the dataset in --out and start over (removes only files a shard "
                     "build wrote; refuses if --out holds anything else)")
    add_preset_argument(build, what="resize cv2 (INTER_LINEAR, no antialiasing) and image format png")
    track_explicit(build)  # after every option: --preset must know which ones the user gave
    build.set_defaults(func=_build, _parser=build)

    verify = shards_sub.add_parser("verify", help="re-read every shard: sha256, counts, decode every sample",
                                   description="Check a shards directory against its manifest: every tar's sha256 "
                                   "and sample count, key format, and that every image, mask and json decodes at the "
                                   "expected size. Exit 0 if all is well, 1 with a list of problems otherwise.")
    verify.add_argument("dir", help="shards directory (holding manifest.json)")
    verify.set_defaults(func=_verify, _parser=verify)

    info = shards_sub.add_parser("info", help="summary of a shards directory, optional contact sheet",
                                 description="Print counts, source and options of a shards directory; with --grid, "
                                 "write a contact sheet PNG (each sample beside itself with the mask overlaid: "
                                 "background dimmed, soft mask edge in green).")
    info.add_argument("dir", help="shards directory (holding manifest.json)")
    info.add_argument("--grid", help="write a contact sheet PNG here")
    info.add_argument("--n-grid", type=int, default=32, help="samples on the contact sheet (default 32)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=_info, _parser=info)
