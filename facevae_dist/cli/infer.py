"""`facevae export | reconstruct | sample | interpolate`: use a trained model on ordinary image files."""

from __future__ import annotations

import sys
from pathlib import Path

from facevae_dist.cli.argtypes import add_device_argument, bounded_int
from facevae_dist.config import MAX_INTERPOLATION_STEPS, MAX_SAMPLES
from facevae_dist.errors import FaceVAEError
from facevae_dist.progress import info


def _run_export(args) -> int:
    from facevae_dist.infer import export_model  # imports torch: not at `facevae --help` time

    out = export_model(args.run_dir, args.out, args.checkpoint, force=args.force)
    info(f"exported {args.run_dir} ({args.checkpoint}) to {out}; load it with FaceVAE.from_pretrained({str(out)!r})")
    return 0


def _run_reconstruct(args) -> int:
    from facevae_dist.infer import reconstruct_files, write_summary

    res = reconstruct_files(args.model, args.images, args.out, batch_size=args.batch_size, masks_dir=args.masks,
                            device=args.device, align=not args.no_align)
    info(res.note)
    for f, reason in res.skipped:
        # Always shown (also with --quiet): a skipped input is something the user must know about.
        print(f"facevae: skipped {reason}" if reason.startswith(f) else f"facevae: skipped {f}: {reason}",
              file=sys.stderr)
    summary = write_summary(res, args.out)
    if not res.written:
        raise FaceVAEError(f"none of the {len(res.skipped)} input file(s) could be reconstructed: unreadable as an "
                           f"image{', or no face found' if res.aligned else ''} (details in {summary})")
    info(f"reconstructed {len(res.written)} image(s) into {args.out}"
         + (f"; skipped {len(res.skipped)} file(s)" if res.skipped else ""))
    return 0


def _run_sample(args) -> int:
    from facevae_dist.infer import sample_grid

    out = sample_grid(args.model, args.out, n=args.n, seed=args.seed, temperature=args.temperature, device=args.device)
    info(f"wrote {args.n} prior samples to {out}")
    return 0


def _run_interpolate(args) -> int:
    from facevae_dist.infer import interpolate_images

    out = interpolate_images(args.model, args.a, args.b, args.out, steps=args.steps, device=args.device)
    info(f"wrote the latent interpolation {Path(args.a).name} -> {Path(args.b).name} to {out}")
    return 0


def _model_arg(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="an exported model directory (`facevae export`) or a run directory (its best checkpoint)")
    add_device_argument(p)


def register(sub) -> None:
    ex = sub.add_parser("export", help="export a run's checkpoint as a Hub-style model folder with a model card",
                        description="Write a checkpoint of a run as a standalone model directory: model.safetensors, "
                        "config.json (flat), export.json and the model card README.md (hypothesis, training data, "
                        "profile, steps, and the scores of the run's eval when it scored this checkpoint). Load it "
                        "with FaceVAE.from_pretrained(DIR), or upload the folder to the Hugging Face Hub as it is.")
    ex.add_argument("run_dir", help="a run directory written by `facevae train`")
    ex.add_argument("--out", required=True, help="output directory: a new folder or an export of the same weights "
                    "(never a run directory, a checkpoint or a shards folder)")
    ex.add_argument("--force", action="store_true", help="replace an export of other weights in --out (its eval/, "
                    "which scored those weights, is removed)")
    ex.add_argument("--checkpoint", default="best", metavar="best|latest|step_N", help="which checkpoint (default best)")
    ex.set_defaults(func=_run_export, _parser=ex)

    rc = sub.add_parser(
        "reconstruct", help="reconstruct photos of any size (reconstruction, predicted mask, composite)",
        description="In each image the face is found (MediaPipe's offline detector: the `masks` extra), the region "
        "framing it as the training images frame faces is cropped and squashed to the model's input, reconstructed "
        "with z = mu, and the result is pasted back at that region's place and size: every output has the image's "
        "own size. mask+decoder models predict the face mask themselves (no mask input) and also write the mask and "
        "the composite (the reconstructed face on the photo, which changes only inside the feathered mask). No-mask "
        "and 'mask' models cannot predict a mask: they write the reconstruction, and the composite only for images "
        "whose mask is given in --masks DIR (<image name>.png). Unreadable files and images without a face found "
        "are reported and skipped; the rest are processed. A summary goes to OUT/reconstruct.json.")
    _model_arg(rc)
    rc.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size, any format PIL reads)")
    rc.add_argument("--out", required=True, help="output directory")
    rc.add_argument("--batch-size", type=bounded_int(1, 1024), default=16,
                    help="images per forward pass (default 16)")
    rc.add_argument("--masks", metavar="DIR", help="face masks <image name>.png for models without a mask decoder")
    rc.add_argument("--no-align", action="store_true",
                    help="do not look for the face: squash each whole image to the model's input (warns when that "
                    "changes its aspect ratio); for images already framed like the training images")
    rc.set_defaults(func=_run_reconstruct, _parser=rc)

    sp = sub.add_parser("sample", help="a grid of images decoded from prior samples z ~ N(0, I)",
                        description="Decode random latent vectors into a PNG grid. For mask+decoder models each "
                        "sample is shown through its predicted mask on grey (their background is untrained).")
    _model_arg(sp)
    sp.add_argument("--out", default="samples.png", help="image to write: .png or .jpg by its suffix (default samples.png)")
    sp.add_argument("--n", type=bounded_int(1, MAX_SAMPLES), default=16,
                    help=f"number of samples, 1-{MAX_SAMPLES} (default 16)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--temperature", type=float, default=1.0, help="prior standard deviation scale (default 1)")
    sp.set_defaults(func=_run_sample, _parser=sp)

    ip = sub.add_parser("interpolate", help="latent interpolation between two photos",
                        description="Encode two photos (z = mu) and decode points on the line between them: one "
                        "PNG row, photo A first and photo B last.")
    _model_arg(ip)
    ip.add_argument("a", help="first image")
    ip.add_argument("b", help="second image")
    ip.add_argument("--out", default="interpolation.png", help="image to write: .png or .jpg by its suffix (default interpolation.png)")
    ip.add_argument("--steps", type=bounded_int(2, MAX_INTERPOLATION_STEPS), default=8,
                    help=f"interpolation frames, 2-{MAX_INTERPOLATION_STEPS} (default 8)")
    ip.set_defaults(func=_run_interpolate, _parser=ip)
