"""`facevae eval`: score a model on a shard split, per image, in every region; write eval/metrics.json.

The model is a run directory's checkpoint (`facevae train`) or an exported model directory (`facevae export`:
model.safetensors + config.json [+ export.json]), so models handed over without their run can be scored too.
Per image and per region (metrics.REGIONS: face, composite-face, composite, composite-gt-face, composite-gt,
whole) every metric of metrics.METRICS is computed, with the skin colour and hair measures of appearance.py on the
regions of the label maps the shards hold (data/labels.py) and the mean alpha of the composite; the output holds
the mean and a 95% percentile-bootstrap interval of each, the number of images, the checkpoint step, the training
seed and every metric setting. Per-image values go to
eval/per_image.csv by sample key (paired comparisons between runs: `facevae report`) and a few fixed test images
with their reconstructions to eval/examples.safetensors (the report's visual comparison: the same images, by key,
through every run). metrics.json is written last and records the sha256 of the two files beside it ("files"):
an eval stopped between its files, or a file copied in from another eval, is refused by the loaders instead of
pairing one eval's summary with another's per-image scores.

Multi-process: launched with several ranks (torchrun / accelerate launch set RANK / WORLD_SIZE), each rank scores
its part of the shards and rank 0 gathers the rows (deduplicated by sample key) and writes the files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from facevae_dist.data.labels import ShardLabels
from facevae_dist.data.loader import ShardLoader, read_manifest, read_sizes, to_float
from facevae_dist.devices import resolve_device
from facevae_dist.errors import DataError, FaceVAEError, UsageError
from facevae_dist.evaluate import appearance
from facevae_dist.evaluate.metrics import (
    ALPHA_MEASURES,
    LEGACY_REGIONS,
    METRICS,
    REGIONS,
    MetricSettings,
    MetricSuite,
    alpha_coverage,
    composite_alpha,
    load_lpips,
)
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json, parse_json, read_json, sha256_file
from facevae_dist.model import CONFIG_FILE, WEIGHTS_FILE, FaceVAE, composite
from facevae_dist.progress import make_progress
from facevae_dist.stats import IMAGE_RESAMPLES, image_summary
from facevae_dist.train.checkpoint import open_model
from facevae_dist.train.distributed import close_process_group, gather_from_ranks, join_process_group

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"
EXAMPLES_FILE = "examples.safetensors"
FORMAT = "facevae-dist/eval-v2"
LEGACY_FORMATS = ("facevae-dist/eval-v1",)  # region `paper` (now `composite`), no `composite-face`, no seed
N_EXAMPLES = 8
APPEARANCE = "appearance"  # per-image colour and hair measures (appearance.py): not a region, a block of its own
ALPHA = "alpha"  # per-image mean alpha of `composite` on face and background pixels: a block of its own


# ---------------------------------------------------------------------------------------------------------------
# Evaluation

def check_split(shards_dir: str | Path, split: str) -> int:
    """Number of images in `split`; one clear error for a missing shards dir, an unknown or an empty split."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise DataError(f"{shards_dir}: no such shards directory (build one with `facevae shards build`)")
    sizes = read_sizes(shards_dir)
    if split not in sizes:
        raise UsageError(f"unknown split {split!r} in {shards_dir}; it has: {', '.join(sorted(sizes)) or 'none'}")
    if not sizes[split]:
        raise DataError(f"split {split!r} of {shards_dir} is empty (0 images); evaluate another split or rebuild "
                        "the shards with a non-zero fraction for it")
    return int(sizes[split])


def loss_name(terms) -> str:
    """The grid's loss name of a LossConfig.terms tuple, e.g. ("ssim", "l1") -> "ssim+l1"."""
    terms = list(terms)
    ordered = [t for t in ("ssim", "l1", "l2") if t in terms] + [t for t in terms if t not in ("ssim", "l1", "l2")]
    return "+".join(ordered)


def load_scored_model(model_dir: str | Path, which: str, device: torch.device):
    """(model, facts) from a run directory or an exported model directory. facts: hypothesis, loss, seed, step,
    default shards, kind ("run" | "export") and the checkpoint label."""
    path = Path(model_dir)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file() and not (path / "checkpoints").is_dir():
        model = FaceVAE.from_pretrained(path, map_location=device).eval()
        meta = {}
        if (path / "export.json").is_file():  # written by `facevae export`: where the weights came from
            meta = _read_export_json(path / "export.json")
        return model, {"kind": "export", "hypothesis": meta.get("hypothesis"), "loss": meta.get("loss") or "unknown",
                       "seed": meta.get("seed"), "step": meta.get("step"), "shards": None,
                       "which": meta.get("checkpoint") or "export"}
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory; pass a run directory (`facevae train`) or an exported model "
                         "directory (`facevae export`: model.safetensors + config.json)")
    if not ((path / "checkpoints").is_dir() or (path / "best").is_dir()):
        raise UsageError(f"{path}: neither a run directory (checkpoints/ or best/, from `facevae train`) nor an "
                         "exported model (model.safetensors + config.json, from `facevae export`)")
    loaded = open_model(path, which, map_location=device)  # label: what was picked (best/ may be absent)
    model, cfg, step = loaded.model, loaded.cfg, loaded.step
    return model, {"kind": "run", "hypothesis": cfg.hypothesis or None, "loss": loss_name(cfg.loss.terms),
                   "seed": cfg.seed, "step": step, "shards": cfg.data.shards, "which": loaded.label}


def scored_test_set(manifest: dict, split: str, limit: int | None) -> dict:
    """What an eval scored: the split's shards by content (the sha256 of each shard, in order, as the manifest
    records them, hashed with the split and image size), the image size, the split, the limit and the regions.
    Two evals pair image by image only when their fingerprints are equal: shards rebuilt with other images under
    the same keys, or built at another size, give another fingerprint wherever they are copied."""
    shards = [s["sha256"] for s in manifest["splits"][split]["shards"]]
    image_size = int(manifest["image_size"])
    identity = json.dumps({"split": split, "image_size": image_size, "shards": shards}, sort_keys=True)
    return {"fingerprint": hashlib.sha256(identity.encode()).hexdigest(), "split": split, "image_size": image_size,
            "n_shards": len(shards), "limit": limit, "regions": list(REGIONS)}


# The fields of export.json that eval copies into its record, and the fields of metrics.json that `report` relies
# on, with their types: a wrong type is one line when the file is read, not a crash in a later stage.
_EXPORT_FIELDS = {"hypothesis": (str, None), "loss": (str, None), "seed": (int, None), "step": (int, None),
                  "checkpoint": (str, None), "mask_mode": (str, None), "run_dir": (str, None)}
_EVAL_FIELDS = {"split": (str,), "loss": (str,), "mask_mode": (str,), "run_dir": (str,), "metrics": (dict,),
                "checkpoint": (dict,), "settings": (dict,), "n_images": (int,), "hypothesis": (str, None),
                "seed": (int, None), "test_set": (dict, None), "model": (dict, None), "appearance": (dict, None),
                "examples": (dict, None), "files": (dict, None)}


def check_fields(doc: dict, spec: dict[str, tuple], path: Path, fix: str, required: bool) -> None:
    """Each field of `spec` present in `doc` (and, with `required`, every one whose types exclude None) has one of
    its types (None: JSON null or absent; int excludes bool), else one FaceVAEError line naming the field."""
    for name, types in spec.items():
        if name not in doc:
            if required and None not in types:
                raise FaceVAEError(f"{path}: field {name!r} missing ({fix})")
            continue
        value = doc[name]
        ok = any(value is None if t is None else isinstance(value, t) and not (t is int and isinstance(value, bool))
                 for t in types)
        if not ok:
            wanted = " or ".join("null" if t is None else {str: "a string", int: "an integer", dict: "an object"}[t]
                                 for t in types)
            raise FaceVAEError(f"{path}: field {name!r} is {json.dumps(value)[:40]}, expected {wanted} ({fix})")


def _read_export_json(path: Path) -> dict:
    """export.json as a dict, or one line naming the file (binary, not JSON, too deeply nested, not an object, a
    field of the wrong type)."""
    fix = "re-export the model (`facevae export`) or delete the file"
    meta = read_json(path, fix=fix, error=FaceVAEError)
    if not isinstance(meta, dict):
        raise FaceVAEError(f"{path}: expected a JSON object (what `facevae export` writes), got a "
                           f"{type(meta).__name__}; re-export the model or delete the file")
    check_fields(meta, _EXPORT_FIELDS, path, fix, required=False)
    return meta


def _settings(scorer: _Scorer, image_size: int, bootstrap: int, seed: int) -> dict:
    """How the scores were made (metrics.json's "settings"): metric settings, weights, region, latent, bootstrap."""
    return {**scorer.suite.settings.to_dict(image_size=image_size),
            "lpips_weights": scorer.suite.lpips.source, "face_region": "ground-truth mask >= 0.5",
            "latent": "z = mu (no sampling), as the paper's testing code",
            "bootstrap": {"resamples": bootstrap, "ci": 0.95, "method": "percentile, paired across metrics",
                          "seed": seed}}


def _appearance_block(scorer: _Scorer, measures: dict) -> dict:
    """The colour and hair measures (C9, C10) with their definitions and where their regions came from."""
    return {"measures": measures, "definitions": dict(appearance.DEFINITIONS),
            "region": (f"raw decoder output; skin: label 'skin' eroded by {appearance.SKIN_ERODE_PX} px; hair "
                       f"interior: label 'hair' eroded by {appearance.HAIR_ERODE_PX} px"),
            "label_maps": scorer.labels.why_not or "labels.png of each sample of the shards",
            "hair_texture_floor": appearance.HAIR_TEXTURE_FLOOR, "jnd_delta_e": appearance.JND_DELTA_E}


def _alpha_block(mask_mode: str, measures: dict) -> dict:
    """Which mask each composite pastes this model's output through, and the mean alpha of `composite`."""
    own = "the predicted soft mask" if mask_mode == "mask+decoder" else "the binary GT mask"
    return {"composite": own, "composite-gt": "the binary GT mask", "measures": measures,
            "definitions": {m: f"mean alpha of `composite` on ground-truth {m} pixels" for m in ALPHA_MEASURES}}


def evaluate(run_dir: str | Path, shards_dir: str | Path | None = None, split: str = "test",
             limit: int | None = None, which: str = "best", *, batch_size: int = 64, workers: int = 0,
             device: str | None = None, lpips_weights: str | Path | None = None, out: str | Path | None = None,
             bootstrap: int = IMAGE_RESAMPLES, seed: int = 0, n_examples: int = N_EXAMPLES) -> dict:
    """Evaluate one checkpoint of `run_dir` (or an exported model directory) on `split`; writes
    <run_dir>/eval/metrics.json (or `out`) on rank 0 and returns the result dict (on every rank). `shards_dir`
    defaults to the run's training shards (an exported model has none: --shards is required)."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: must be a positive number of images")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    run_dir = Path(run_dir)
    dev = resolve_device(device)  # this rank's GPU (LOCAL_RANK) when there is one
    model, facts = load_scored_model(run_dir, which, dev)
    shards_dir, manifest, n_split = _matching_shards(run_dir, shards_dir, facts, split, model.cfg.image_size)
    scorer = _Scorer(model, MetricSuite(load_lpips(lpips_weights, device=dev), MetricSettings()),
                     ShardLabels(shards_dir, manifest, split), dev, n_examples)

    rank, world, we_init = join_process_group(dev)
    try:
        # Fixed order (no shuffle), no dropped partial batch, and with several ranks the N mod world remainder
        # padded by repeats (deduplicated by key below): every image once, the same ones in every run.
        loader = ShardLoader(shards_dir, split, batch_size, rank=rank, world_size=world, workers=workers, seed=seed,
                             epoch=0, resampled=False, drop_last=False, shuffle=False, pad=True)
        t0 = time.perf_counter()
        total = n_split if limit is None else min(limit, n_split)
        part = scorer.run(loader, None if limit is None else math.ceil(limit / world), world,
                          f"eval {run_dir.name} [{split}]", total)
        seconds = time.perf_counter() - t0
        gathered = gather_from_ranks(part, world)
    finally:
        if we_init:  # a group we created is ours to close (after the gather every rank is past its collectives)
            close_process_group()

    # Rank 0 and the others alike build the result (cheap); only rank 0 writes.
    ordered, values, examples, corrupt, dropped = _merge(gathered, limit)
    if not ordered:
        raise DataError(f"split {split!r} of {shards_dir}: the loader yielded no images")
    metrics = {r: {} for r in (*REGIONS, APPEARANCE, ALPHA)}
    for col, summary in zip(COLUMNS, image_summary(values, resamples=bootstrap, seed=seed)):
        region, metric = col.split(".")
        metrics[region][metric] = summary
    example_keys = sorted(examples)[:n_examples]
    result = {
        "format": FORMAT,
        "run_dir": str(run_dir),
        "run_name": run_dir.name,
        "model_kind": facts["kind"],  # "run" (a run directory) | "export" (an exported model directory)
        "hypothesis": facts["hypothesis"],
        "seed": facts["seed"],  # the training seed: `facevae report` groups runs by (hypothesis, seed)
        "loss": facts["loss"],
        "mask_mode": model.cfg.mask_mode,
        "model": model.cfg.to_dict(),
        "checkpoint": {"which": facts["which"], "step": facts["step"]},
        "split": split,
        "shards_dir": str(shards_dir),
        "n_images": len(ordered),
        "split_size": n_split,
        "limit": limit,
        "test_set": scored_test_set(manifest, split, limit),  # `facevae report` pairs only evals of one test set
        "corrupt_samples": sorted(corrupt),
        "left_out_by_loader": dropped,  # N mod world_size with several ranks (data/loader.py), else 0
        "world_size": world,
        "device": str(dev),
        "settings": _settings(scorer, model.cfg.image_size, bootstrap, seed),
        "regions": dict(REGIONS),
        "metrics": {r: metrics[r] for r in REGIONS},
        APPEARANCE: _appearance_block(scorer, metrics[APPEARANCE]),
        ALPHA: _alpha_block(model.cfg.mask_mode, metrics[ALPHA]),
        "examples": {"file": EXAMPLES_FILE, "keys": example_keys},
        "seconds": round(seconds, 3),
        "images_per_s": round(len(ordered) / seconds, 2) if seconds > 0 else None,
    }
    if rank == 0:
        out_path = Path(out) if out is not None else run_dir / EVAL_DIR / METRICS_FILE
        siblings = {PER_IMAGE_FILE: _per_image_bytes(ordered, COLUMNS, values),
                    EXAMPLES_FILE: _examples_bytes(example_keys, examples)}
        # metrics.json last, holding the others' hashes: until it is replaced, the loaders see that the files
        # beside it are not its own (an eval killed here), and refuse them rather than mix two evals
        result["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in siblings.items()}
        for name, data in siblings.items():
            atomic_write_bytes(out_path.parent / name, data)
        atomic_write_json(out_path, result)
        result["path"] = str(out_path)
    return result


def _matching_shards(run_dir: Path, shards_dir, facts: dict, split: str, image_size: int):
    """(shards_dir, manifest, images in split): the given shards, or the run's own; one line if the split is
    missing or the images are not the size the model was trained at."""
    if shards_dir is None and facts["shards"] is None:
        raise UsageError(f"{run_dir} is an exported model (no training run to take shards from): pass --shards DIR")
    shards_dir = Path(shards_dir if shards_dir is not None else facts["shards"])
    n_split = check_split(shards_dir, split)
    manifest = read_manifest(shards_dir)
    if int(manifest["image_size"]) != image_size:
        raise UsageError(f"{shards_dir} holds {manifest['image_size']}px images but the checkpoint of {run_dir} was "
                         f"trained at {image_size}px (model.image_size); evaluate on shards built at that size "
                         f"(`facevae shards build --image-size {image_size}`)")
    return shards_dir, manifest, n_split


# The per-image score columns: every metric in every region, then the appearance measures and the alpha.
COLUMNS = ([f"{r}.{m}" for r in REGIONS for m in METRICS] + [f"{APPEARANCE}.{m}" for m in appearance.MEASURES]
           + [f"{ALPHA}.{m}" for m in ALPHA_MEASURES])


@dataclass
class _Scorer:
    """Scores this rank's part of a split batch by batch: one row of COLUMNS per image, a few kept examples."""
    model: torch.nn.Module
    suite: MetricSuite
    labels: ShardLabels
    device: torch.device
    n_examples: int

    def run(self, loader, rank_limit: int | None, world: int, label: str, total: int) -> tuple:
        """(keys, rows [n, len(COLUMNS)], examples, corrupt keys, samples the loader left out)."""
        mode = self.model.cfg.mask_mode
        keys: list[str] = []
        rows: list[np.ndarray] = []
        examples: dict[str, dict[str, np.ndarray]] = {}
        corrupt: list[str] = []
        with make_progress() as progress:
            task = progress.add_task(label, total=total)
            for batch in loader:
                image, mask = to_float(batch, self.device)
                batch_keys = list(batch["key"])
                # The loader fills a corrupt sample's slot with a copy of another sample of the batch (same key):
                # the copy is scored once (rows are deduplicated by key) and the corrupt sample is reported.
                corrupt += list(batch.get("corrupt") or [])
                if rank_limit is not None and len(keys) + len(batch_keys) > rank_limit:
                    keep = rank_limit - len(keys)
                    image, mask, batch_keys = image[:keep], mask[:keep], batch_keys[:keep]
                rec = self.model.reconstruct(image, mask if mode == "mask" else None)
                scores = self.suite.score_regions(image, mask, rec.recon_raw, rec.mask_pred, mode)
                looks = appearance.score(rec.recon_raw, image, *self._labels(batch_keys, corrupt))
                alpha = alpha_coverage(composite_alpha(mask, rec.mask_pred, mode), mask)
                rows.append(torch.stack([scores[r][m] for r in REGIONS for m in METRICS]
                                        + [looks[m] for m in appearance.MEASURES]
                                        + [alpha[m] for m in ALPHA_MEASURES], 1).cpu().numpy())
                keys += batch_keys
                _keep_examples(examples, batch_keys, image, mask, rec, mode, self.n_examples)
                progress.advance(task, len(batch_keys) * world)
                if rank_limit is not None and len(keys) >= rank_limit:
                    break
        values = np.concatenate(rows) if rows else np.zeros((0, len(COLUMNS)))
        return keys, values, examples, corrupt, loader.dropped_samples

    def _labels(self, keys: list[str], corrupt: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batch's label maps from the shards (None, None where they hold none); an unreadable labels.png is
        reported with the corrupt samples (its image is scored, its appearance measures are NaN)."""
        if self.labels.why_not is not None:
            return None, None
        seen = len(self.labels.corrupt)
        labels, have = self.labels.batch(keys)
        for item in self.labels.corrupt[seen:]:
            warnings.warn(f"unreadable label map, the image scored without its appearance measures: {item}")
            corrupt.append(f"{item}: appearance measures left undefined")
        return torch.from_numpy(labels).to(self.device), torch.from_numpy(have).to(self.device)


def _merge(gathered: list[tuple], limit: int | None) -> tuple:
    """Every rank's part -> (sorted keys, values [n, len(COLUMNS)], examples, corrupt keys, left out)."""
    by_key: dict[str, np.ndarray] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    corrupt: list[str] = []
    for k, vals, ex, bad, _ in gathered:
        for key, row in zip(k, vals):
            by_key.setdefault(key, row)  # a key seen twice (a corrupt sample's stand-in) counts once
        examples.update(ex)
        corrupt += bad
    dropped = gathered[0][4] if limit is None else 0
    ordered = sorted(by_key)[:limit] if limit is not None else sorted(by_key)
    values = np.stack([by_key[k] for k in ordered]) if ordered else np.zeros((0, len(COLUMNS)))
    return ordered, values, examples, corrupt, dropped


def _keep_examples(store: dict, keys: list[str], image, mask, out, mode: str, n: int) -> None:
    """Keep the reconstructions of the n smallest keys seen (the same keys in every run of the same shards)."""
    comp = composite(out.recon_raw, image, composite_alpha(mask, out.mask_pred, mode))
    for i, key in enumerate(keys):
        if len(store) >= n and key >= max(store):
            continue
        item = {"input": image[i], "gt_mask": mask[i], "recon_raw": out.recon_raw[i], "composite": comp[i]}
        if out.mask_pred is not None:
            item["mask_pred"] = out.mask_pred[i]
        store[key] = {k: (v.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for k, v in item.items()}
        if len(store) > n:
            del store[max(store)]


def _per_image_bytes(keys: list[str], columns: list[str], values: np.ndarray) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", *columns])
    for key, row in zip(keys, values):
        w.writerow([key, *(f"{v:.6g}" for v in row)])
    return buf.getvalue().encode("utf-8")


def _examples_bytes(keys: list[str], examples: dict) -> bytes:
    tensors = {}
    for field in ("input", "gt_mask", "recon_raw", "composite", "mask_pred"):
        if keys and all(field in examples[k] for k in keys):
            tensors[field] = np.stack([examples[k][field] for k in keys])
    return save_safetensors(tensors, metadata={"keys": json.dumps(keys), "format": FORMAT})


def _check_written_with(eval_json: dict, path: Path) -> None:
    """`path` (beside metrics.json) is the file that eval wrote: its sha256 is the one metrics.json recorded.
    Evals from before the hashes were recorded are not checked here (load_per_image checks the image count)."""
    want = (eval_json.get("files") or {}).get(path.name)
    if want is not None and sha256_file(path) != want:
        raise DataError(f"{path}: not the file written with {Path(eval_json['path']).name} beside it (an eval "
                        "stopped between its files, or a file copied in from another eval); re-run "
                        f"`facevae eval {eval_json.get('run_dir', 'RUN_DIR')}`")


def load_eval(run_dir: str | Path) -> dict:
    """Read <run_dir>/eval/metrics.json (or a metrics.json path) with a clear error if it is not there."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / EVAL_DIR / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{path}: no evaluation found; run `facevae eval {run_dir} --shards DIR` first")
    data = read_json(path, fix="re-run `facevae eval`", error=FaceVAEError)
    if not isinstance(data, dict):
        raise FaceVAEError(f"{path}: not a facevae eval file (a JSON {type(data).__name__}); re-run `facevae eval`")
    check_fields(data, _EVAL_FIELDS, path, "re-run `facevae eval`", required=data.get("format") in
                 (FORMAT, *LEGACY_FORMATS))
    if data.get("format") in LEGACY_FORMATS:
        data = _upgrade_legacy(data)
    elif data.get("format") != FORMAT:
        raise FaceVAEError(f"{path}: not a facevae eval file (format={data.get('format')!r}); re-run `facevae eval`")
    data["path"] = str(path)
    return data


def _upgrade_legacy(data: dict) -> dict:
    """An eval-v1 file: rename its regions (LEGACY_REGIONS: `paper` held exactly what `composite` holds now) and
    say what it lacks (`composite-face`, the training seed) instead of inventing it."""
    data = dict(data)
    data["metrics"] = {LEGACY_REGIONS.get(r, r): v for r, v in data["metrics"].items()}
    data["regions"] = {r: REGIONS[r] for r in data["metrics"] if r in REGIONS}
    data.setdefault("seed", None)
    data["legacy"] = (f"{data.get('format')}: region 'paper' read as 'composite'; no 'composite-face' scores "
                      "(re-run `facevae eval` for them)")
    return data


def load_per_image(eval_json: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    """(sample keys, {"region.metric": float64 [n]}) from the per_image.csv next to an eval's metrics.json; legacy
    region names are mapped like load_eval does. Raises a clear error when the file is missing."""
    path = Path(eval_json["path"]).parent / PER_IMAGE_FILE
    if not path.is_file():
        raise UsageError(f"{path}: missing (per-image scores are needed for paired comparisons); re-run "
                         f"`facevae eval {eval_json.get('run_dir', 'RUN_DIR')}`")
    _check_written_with(eval_json, path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["key"]:
        raise FaceVAEError(f"{path}: not a per-image score file (no 'key' header); re-run `facevae eval`")
    columns = []
    for col in rows[0][1:]:
        region, _, metric = col.partition(".")
        columns.append(f"{LEGACY_REGIONS.get(region, region)}.{metric}")
    keys = [r[0] for r in rows[1:]]
    try:
        values = np.array([[float(x) for x in r[1:]] for r in rows[1:]], dtype=np.float64).reshape(len(keys),
                                                                                                     len(columns))
    except ValueError as exc:
        raise FaceVAEError(f"{path}: unreadable per-image scores ({exc}); re-run `facevae eval`") from None
    n = eval_json.get("n_images")
    if n is not None and n != len(keys):  # also catches an older eval (no recorded hashes) left half-replaced
        raise DataError(f"{path}: {len(keys)} images, but {Path(eval_json['path']).name} beside it scored {n} (the "
                        f"files come from two evals); re-run `facevae eval {eval_json.get('run_dir', 'RUN_DIR')}`")
    return keys, {c: values[:, j] for j, c in enumerate(columns)}


def load_examples(eval_json: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    """(keys, {field: uint8 [K,C,H,W]}) of an eval's examples file ({} if it is missing)."""
    path = Path(eval_json["path"]).parent / eval_json.get("examples", {}).get("file", EXAMPLES_FILE)
    if not path.is_file():
        return [], {}
    _check_written_with(eval_json, path)
    with safe_open(str(path), framework="numpy") as f:
        keys = parse_json((f.metadata() or {}).get("keys", "[]"), path, fix="re-run `facevae eval`",
                          error=FaceVAEError)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise FaceVAEError(f"{path}: its keys are not a list of sample keys; re-run `facevae eval`")
        return keys, {k: f.get_tensor(k) for k in f.keys()}
