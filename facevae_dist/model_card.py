"""The model card (README.md) of a saved FaceVAE, as the Hugging Face Hub reads one: YAML front matter, then what
the model is, what it was trained on and for how long, how it scored, how to load it and the paper to cite.

A bare FaceVAE.save_pretrained knows only the architecture; `facevae export` adds the run's facts (the shards'
manifest, the step, the run's eval). Every fact is optional: a section whose facts are missing says so or is
left out. Torch-free.
"""

from __future__ import annotations

from pathlib import PurePath

from huggingface_hub import ModelCardData

LIBRARY = "facevae-dist"
TAGS = ("vae", "face-reconstruction", "face-masks")
PAPER = ('Toledo & Antonelo, "Face Reconstruction with Variational Autoencoder and Face Masks", ENIAC 2021, '
         "arXiv 2112.02139")
CITATION = """@inproceedings{toledo2021face,
  title         = {Face Reconstruction with Variational Autoencoder and Face Masks},
  author        = {Toledo, Rafael and Antonelo, Eric},
  booktitle     = {Encontro Nacional de Intelig{\\^e}ncia Artificial e Computacional (ENIAC)},
  year          = {2021},
  doi           = {10.5753/eniac.2021.18282},
  eprint        = {2112.02139},
  archivePrefix = {arXiv}
}"""
MASK_MODES = {
    "none": "no mask: the loss sees every pixel and the model reconstructs the whole image",
    "mask": "the loss sees the face only (the output composited onto the input's background with the "
            "ground-truth mask); no mask decoder, so it cannot predict a mask",
    "mask+decoder": "the loss sees the face only, and a second decoder learns the face mask, so at test time the "
                    "model predicts the mask itself (no mask input)",
}
# Where a dataset's own terms decide what the weights may be used for (the project's code is MIT).
DATA_TERMS = {
    "celeba": "CelebA's terms apply (its agreement allows non-commercial research use only)",
    "celeba-hq": "CelebA-HQ's terms (those of CelebA) apply: non-commercial research use only",
    "folder": "the terms of the photos it was trained on apply",
}
SCORED = ("ssim", "ms_ssim", "lpips", "vif", "l1", "l2", "psnr")  # columns of the scores table, in this order
SCORED_REGIONS = ("face", "composite")


def card_text(model: dict, *, parameters: int | None = None, hub_tags: list[str] | None = None,
              export: dict | None = None, data: dict | None = None, scores: dict | None = None,
              load_from: str = "path/to/this/folder") -> str:
    """The whole README.md. model: ModelConfig.to_dict(); export: export.json's facts; data: the training shards'
    facts (shards_facts); scores: the run's eval/metrics.json when it scored this very checkpoint."""
    export = export or {}
    source = (data or {}).get("source", {}).get("name")
    license_ = "mit" if source == "synthetic" else None  # the generator's faces are this MIT project's output
    meta = ModelCardData(library_name=LIBRARY, license=license_, pipeline_tag="image-to-image",
                         tags=sorted(set(hub_tags or TAGS) | {f"mask-mode-{model['mask_mode'].replace('+', '-')}"}))
    hypothesis = export.get("hypothesis") or f"{export.get('loss') or 'unknown loss'}/{model['mask_mode']}"
    parts = [
        f"---\n{meta.to_yaml()}\n---\n",
        f"# FaceVAE `{hypothesis}` ({model['image_size']} px, width {model['width']:g})\n",
        f"A variational autoencoder that reconstructs aligned face photos: the PyTorch port of {PAPER}, trained "
        "and exported with facevae-dist.\n",
        _hypothesis(model, export),
        _data(data, source, exported=bool(export)),
        _profile(model, parameters),
        _training(export),
        _scores(scores, exported=bool(export)),
        _usage(model, load_from),
        f"## Citation\n\n```bibtex\n{CITATION}\n```\n",
    ]
    return "\n".join(p for p in parts if p)


def _hypothesis(model: dict, export: dict) -> str:
    lines = ["## Hypothesis\n"]
    if export.get("hypothesis"):
        lines.append(f"`{export['hypothesis']}`: the loss `{export.get('loss') or '?'}` with mask mode "
                     f"`{model['mask_mode']}` ({MASK_MODES[model['mask_mode']]}). One cell of the paper's grid "
                     "(five losses, each with and without the face mask), trained with seed "
                     f"{export.get('seed', '?')}.\n")
    else:
        lines.append(f"Mask mode `{model['mask_mode']}`: {MASK_MODES[model['mask_mode']]}.\n")
    return "\n".join(lines)


def _data(data: dict | None, source: str | None, exported: bool) -> str:
    if not data:
        why = ("the run's shards were not at hand when it was exported" if exported else
               "saved by FaceVAE.save_pretrained, not by `facevae export`")
        return f"## Training data\n\nNot recorded with this model ({why}).\n"
    desc = data.get("source", {})
    about = {"synthetic": "procedural CelebA-like aligned portraits (178x218) from facevae-dist's own generator, "
                          "not photos of people",
             "celeba": "CelebA's aligned photos (178x218)", "celeba-hq": "CelebA-HQ photos",
             "folder": "a folder of face photos"}.get(source or "", f"source `{source}`")
    settings = ", ".join(f"{k} {v}" for k, v in desc.items() if k != "name")
    counts = data.get("counts", {})
    lines = ["## Training data\n", f"- source: `{source}`: {about}" + (f" ({settings})" if settings else ""),
             "- images: " + ", ".join(f"{split} {n}" for split, n in counts.items()) if counts else None,
             f"- preprocessing: {data['image_size']}x{data['image_size']} {data.get('image_format', '')}, "
             f"{data.get('fit', 'squash')} ({data.get('resize_method', '?')} resize)"
             if data.get("image_size") else None,
             f"- face masks: {data['masks']}" if data.get("masks") else None,
             f"- shards: `{data['shards']}`, built by facevae-dist {data.get('package_version', '?')}"
             if data.get("shards") else None,
             f"- license: {DATA_TERMS[source]}" if source in DATA_TERMS else None]
    return "\n".join(x for x in lines if x) + "\n"


def _profile(model: dict, parameters: int | None) -> str:
    rows = [("image size", f"{model['image_size']} x {model['image_size']} RGB in [0, 1]"),
            ("width", f"{model['width']:g} (channel multiplier; 1 = the paper's 9.3 M-parameter model)"),
            ("latent", str(model["latent_dim"])), ("mask mode", model["mask_mode"]),
            ("sampling", model["sampling"])]
    if parameters is not None:
        rows.append(("trainable parameters", f"{parameters:,}"))
    return "## Profile\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _training(export: dict) -> str:
    if export.get("step") is None:
        return ""
    return (f"## Training\n\n{export['step']} optimizer steps; this is the `{export.get('checkpoint', '?')}` "
            f"checkpoint of run `{PurePath(str(export.get('run_dir', '?'))).name}`.\n")


def _scores(scores: dict | None, exported: bool) -> str:
    if not scores:
        return ("## Evaluation\n\n" + ("The run had no evaluation of this checkpoint when it was exported "
                                        "(`facevae eval RUN_DIR`, then export again).\n" if exported else
                                        "Not recorded with this model.\n"))
    metrics, regions = scores.get("metrics", {}), scores.get("regions", {})
    lines = ["## Evaluation\n",
             f"`facevae eval` on the `{scores.get('split')}` split of `{PurePath(str(scores.get('shards_dir'))).name}`"
             f", n = {scores.get('n_images')} images; the mean and its 95% bootstrap interval over images. Higher "
             "is better for ssim, ms_ssim, vif and psnr, lower for lpips, l1 and l2.\n",
             "| region | " + " | ".join(SCORED) + " |", "|---|" + "---|" * len(SCORED)]
    for region in SCORED_REGIONS:
        cells = []
        for metric in SCORED:
            s = metrics.get(region, {}).get(metric) or {}
            ci = s.get("ci95")
            cells.append("-" if s.get("mean") is None else
                         f"{s['mean']:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
        lines.append(f"| {region} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {r}: {regions[r]}" for r in SCORED_REGIONS if r in regions]
    return "\n".join(lines) + "\n"


def _usage(model: dict, load_from: str) -> str:
    size = model["image_size"]
    return ("## How to load\n\n```python\nfrom facevae_dist.model import FaceVAE\n"
            f'model = FaceVAE.from_pretrained("{load_from}")  # a local folder or a Hub repo id\n'
            f"out = model.reconstruct(images)  # images: [B, 3, {size}, {size}] floats in [0, 1]; out.recon, "
            "out.mask_pred\n```\n\n"
            "On photos of any size (the face is found, framed as in training and pasted back): "
            "`facevae reconstruct --model DIR photo.jpg --out out/` (needs facevae-dist's `masks` extra).\n")


def _split_order(item: tuple[str, dict]) -> tuple[int, str]:
    order = ("train", "val", "test")
    return (order.index(item[0]) if item[0] in order else len(order), item[0])


def shards_facts(manifest: dict, shards_dir: str) -> dict:
    """What a model card says about training data, from a shards manifest (data/shards.py): no absolute paths (a
    card is published), only their last component."""
    source = {k: (PurePath(v).name if isinstance(v, str) and ("/" in v or "\\" in v) else v)
              for k, v in manifest.get("source", {}).items()}
    mask = source.get("masks")
    return {
        "shards": PurePath(str(shards_dir)).name, "source": source,
        "counts": {s: v.get("count") for s, v in sorted(manifest.get("splits", {}).items(), key=_split_order)},
        "image_size": manifest.get("image_size"), "image_format": manifest.get("image_format"),
        "fit": (manifest.get("resize") or {}).get("fit") or manifest.get("options", {}).get("fit") or "squash",
        "resize_method": (manifest.get("resize") or {}).get("method"),
        "masks": ("extracted offline with MediaPipe (`--masks auto`)" if mask == "auto" else
                  f"from `{mask}`" if mask else "the generator's own label maps" if source.get("name") == "synthetic"
                  else None),
        "package_version": manifest.get("package_version"),
    }
