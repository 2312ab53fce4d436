"""Inference CLI on real photos (matplotlib's public-domain grace_hopper.jpg), bad inputs, config mismatches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.model import FaceVAE, ModelConfig


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _photo() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _save_model(path: Path, **kw) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=36, width=0.125, latent_dim=16, **kw)
    return FaceVAE(cfg).eval().save_pretrained(path)


def test_reconstruct_real_photo_skips_bad_files(tmp_path, capsys):
    model = _save_model(tmp_path / "model")
    photo = tmp_path / "grace_hopper.jpg"
    shutil.copy(_photo(), photo)
    (tmp_path / "truncated.jpg").write_bytes(photo.read_bytes()[:4000])
    (tmp_path / "notes.txt").write_text("not an image")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((20, 31, 3), 200, np.uint8)).save(small)
    inputs = [photo, tmp_path / "truncated.jpg", tmp_path / "notes.txt", small]
    out = tmp_path / "out"
    rc = main(["reconstruct", "--model", str(model), *map(str, inputs), "--out", str(out), "--batch-size", "2",
               "--no-align"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "skipped" in err and "truncated.jpg" in err and "notes.txt" in err
    # --no-align squashes whole images: said once for the non-square ones
    assert "--no-align: 2 image(s) are not square, e.g. grace_hopper.jpg (512x600)" in " ".join(err.split())
    summary = json.loads((out / "reconstruct.json").read_text())
    assert {s["file"] for s in summary["skipped"]} == {str(tmp_path / "truncated.jpg"), str(tmp_path / "notes.txt")}
    assert summary["mask_mode"] == "mask+decoder" and "no mask input" in summary["note"]
    # Every output has the photo's own size; the composite is recon*m + photo*(1-m) at full resolution.
    src = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float64) / 255
    recon = np.asarray(Image.open(out / "grace_hopper_recon.png"), dtype=np.float64) / 255
    mask = np.asarray(Image.open(out / "grace_hopper_mask.png"), dtype=np.float64)[..., None] / 255
    comp = np.asarray(Image.open(out / "grace_hopper_composite.png"), dtype=np.float64) / 255
    assert recon.shape == comp.shape == src.shape and mask.shape[:2] == src.shape[:2]
    np.testing.assert_allclose(comp, recon * mask + src * (1 - mask), atol=2.5 / 255)
    assert Image.open(out / "small_recon.png").size == (31, 20)


def test_reconstruct_no_mask_model_composites_only_with_given_masks(tmp_path, capsys):
    model = _save_model(tmp_path / "model", mask_mode="none")
    photo = tmp_path / "face.jpg"
    shutil.copy(_photo(), photo)
    out = tmp_path / "out"
    assert main(["reconstruct", "--model", str(model), str(photo), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["face_recon.png"]
    assert "cannot predict a mask" in json.loads((out / "reconstruct.json").read_text())["note"]
    masks = tmp_path / "masks"
    masks.mkdir()
    w, h = Image.open(photo).size
    m = np.zeros((h, w), np.uint8)
    m[100:400, 100:400] = 255
    Image.fromarray(m).save(masks / "face.png")
    assert main(["reconstruct", "--model", str(model), str(photo), "--out", str(out), "--masks", str(masks)]) == 0
    comp = np.asarray(Image.open(out / "face_composite.png"))
    src = np.asarray(Image.open(photo).convert("RGB"))
    assert np.array_equal(comp[:50], src[:50])  # outside the mask: the photo itself


def test_all_inputs_unreadable_is_one_clear_error(tmp_path, capsys):
    model = _save_model(tmp_path / "model")
    (tmp_path / "a.txt").write_text("x")
    rc = main(["reconstruct", "--model", str(model), str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("facevae: error: none of the 1 input file(s)")


def test_model_from_another_config_is_refused(tmp_path, capsys):
    model = _save_model(tmp_path / "model")  # has a mask decoder
    cfg_file = model / "config.json"
    meta = json.loads(cfg_file.read_text())
    meta["mask_mode"] = "none"
    cfg_file.write_text(json.dumps(meta))
    rc = main(["reconstruct", "--model", str(model), str(_photo()), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "does not match" in err and "mask_mode=none" in err and "unexpected tensor" in err and "mask_decoder" in err
    meta.update(mask_mode="mask+decoder", width=0.25)
    cfg_file.write_text(json.dumps(meta))
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "s.png")]) == 1
    assert "shape mismatch" in capsys.readouterr().err


def test_sample_and_interpolate_grids(tmp_path):
    model = _save_model(tmp_path / "model")
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "s.png"), "--n", "10"]) == 0
    # 8 per row, 2 px padding, 36 px tiles
    assert Image.open(tmp_path / "s.png").size == (8 * 38 + 2, 2 * 38 + 2)
    photo = _photo()
    assert main(["interpolate", "--model", str(model), str(photo), str(photo), "--steps", "5",
                 "--out", str(tmp_path / "i.png")]) == 0
    assert Image.open(tmp_path / "i.png").size == (7 * 38 + 2, 38 + 2)


def test_bad_temperature_and_out_file_are_one_line_errors(tmp_path, capsys):
    model = _save_model(tmp_path / "model")
    for value in ("nan", "inf", "-1"):
        assert main(["sample", "--model", str(model), "--out", str(tmp_path / "s.png"), "--temperature", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--temperature" in err[0] and "finite" in err[0]
    assert not (tmp_path / "s.png").exists()
    (tmp_path / "taken").write_text("a file")
    rc = main(["reconstruct", "--model", str(model), str(_photo()), "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "taken" in err[0] and "not a directory" in err[0]
    for argv in (["sample", "--model", str(model), "--out", str(tmp_path)],
                 ["interpolate", "--model", str(model), str(_photo()), str(_photo()), "--out", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a directory" in err[0]


def test_sample_and_interpolate_write_the_format_the_suffix_names(tmp_path, capsys):
    """--out x.jpg is a JPEG file (it used to hold PNG bytes); an unknown suffix is a one-line usage error and
    writes nothing."""
    model = _save_model(tmp_path / "model")
    for name, fmt in (("s.jpg", "JPEG"), ("s.JPEG", "JPEG"), ("s.png", "PNG")):
        assert main(["sample", "--model", str(model), "--out", str(tmp_path / name), "--n", "2"]) == 0
        assert Image.open(tmp_path / name).format == fmt
    assert main(["interpolate", "--model", str(model), str(_photo()), str(_photo()), "--steps", "2",
                 "--out", str(tmp_path / "i.jpg")]) == 0
    assert Image.open(tmp_path / "i.jpg").format == "JPEG"
    capsys.readouterr()
    for name in ("s.gif", "grid"):
        assert main(["sample", "--model", str(model), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and ".png" in err[0]
        assert not (tmp_path / name).exists()


def test_reconstruct_memory_stays_bounded_for_huge_photos(tmp_path):
    """Two 3000x3000 PNGs in one batch: the old code held each as a full-size float tensor (108 MB each, plus
    full-size float outputs); now photos are uint8 and outputs are made one photo at a time. Peak RSS above the
    baseline, measured in a child process (ru_maxrss): 0.73 GB before, 0.12 GB now."""
    import subprocess
    import sys

    model = _save_model(tmp_path / "model")
    grad = np.linspace(0, 255, 3000, dtype=np.float32).astype(np.uint8)
    big = np.stack(np.broadcast_arrays(grad[None, :], grad[:, None], grad[None, ::-1]), -1)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"big{i}.png")
        Image.fromarray(big).save(paths[-1], compress_level=1)
    del big
    code = (
        "import resource, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from facevae_dist.infer import load_any_model, reconstruct_files\n"
        "load_any_model(sys.argv[1])  # baseline: imports and one model load\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "reconstruct_files(sys.argv[1], sys.argv[3:], sys.argv[2], batch_size=4, device='cpu', align=False)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    res = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "out"), *map(str, paths)],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                           "FACEVAE_QUIET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    extra_mb = int(res.stdout.strip().splitlines()[-1])
    assert (tmp_path / "out" / "big1_composite.png").is_file()
    assert extra_mb < 300, f"reconstruct of 2 x 9 Mpixel photos peaked {extra_mb} MB above the baseline"


def _run_dir(path: Path, seed: int) -> Path:
    """A run directory with one step checkpoint and best/ (what `facevae train` leaves), weights from `seed`."""
    from facevae_dist.config import TrainConfig
    from facevae_dist.train.checkpoint import CheckpointManager, TrainState

    cfg = TrainConfig.from_hypothesis("l2/mask+decoder", run_dir=str(path), seed=seed,
                                      model={"image_size": 36, "width": 0.125, "latent_dim": 16})
    torch.manual_seed(seed)
    model = FaceVAE(cfg.model)
    mgr = CheckpointManager(path, every=2, keep_last=2)
    mgr.save(model=model, optimizer_state={}, scaler_state=None, state=TrainState(step=2), cfg=cfg)
    mgr.save_best(model=model, state=TrainState(step=2), cfg=cfg, val_loss=0.5)
    return path


def test_export_never_lands_on_a_run_shards_or_another_models_export(tmp_path, capsys):
    """export --out used to write anywhere: into a checkpoint (a resume then trained on the exported weights),
    over the run directory, over shards, and over another model's evaluated export (whose eval/ report then
    pinned on the new weights). Each is a one-line usage error now; --force replaces another export and removes
    its stale eval/; re-exporting the same weights keeps the eval/."""
    from facevae_dist.fileio import sha256_file

    run_a, run_b = _run_dir(tmp_path / "a", 0), _run_dir(tmp_path / "b", 1)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": "facevae-shards"}')
    weights = {p: sha256_file(p) for p in run_a.rglob("model.safetensors")}
    capsys.readouterr()
    for out, words in ((run_a / "checkpoints" / "step_2", "is a checkpoint"), (run_a, "is a run directory"),
                       (run_a / "best" / "sub", "inside best/"), (shards, "is a shards folder"),
                       (shards / "models", "inside a shards folder")):
        assert main(["export", str(run_a), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and words in err[0], err
    assert {p: sha256_file(p) for p in run_a.rglob("model.safetensors")} == weights
    assert not (shards / "models").exists() and sorted(p.name for p in shards.iterdir()) == ["manifest.json"]

    export = tmp_path / "export"
    assert main(["export", str(run_a), "--out", str(export)]) == 0
    (export / "eval").mkdir()
    (export / "eval" / "metrics.json").write_text("{}")  # an eval of run a's weights
    assert main(["export", str(run_a), "--out", str(export)]) == 0  # the same weights again: the eval still holds
    assert (export / "eval" / "metrics.json").is_file()
    kept = sha256_file(export / "model.safetensors")
    capsys.readouterr()
    assert main(["export", str(run_b), "--out", str(export)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model's export" in err[0] and "--force" in err[0]
    assert sha256_file(export / "model.safetensors") == kept and (export / "eval").is_dir()
    assert main(["export", str(run_b), "--out", str(export), "--force"]) == 0
    assert "removed" in capsys.readouterr().err and not (export / "eval").exists()
    assert sha256_file(export / "model.safetensors") == sha256_file(run_b / "best" / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Real photos: the face found and framed as in training, the result pasted back (needs the `masks` extra)

REFERENCE_MODEL = Path(__file__).resolve().parents[1] / "docs" / "reference" / "models" / "l2--mask+decoder--seed-0"


def test_reconstruct_finds_the_face_and_changes_only_it(tmp_path):
    """Grace Hopper (512x600, the face in the upper half, not framed like aligned CelebA) through the default
    path: the face is found, the frame around it holds the eyes where training put them, every output has the
    photo's size, nothing outside the frame changes, and a trained model's predicted mask sits on the face (the
    squashed whole photo put it on the chin and collar)."""
    pytest.importorskip("mediapipe", reason="optional extra facevae-dist[masks] not installed")
    from facevae_dist.align import EYES_AT, FRAME

    out = tmp_path / "out"
    assert main(["reconstruct", "--model", str(REFERENCE_MODEL), str(_photo()), "--out", str(out)]) == 0
    summary = json.loads((out / "reconstruct.json").read_text())
    face = summary["faces"][str(_photo())]
    bx, by, bw, bh = face["box"]
    assert summary["aligned"] and face["score"] > 0.5 and 150 < bx < 250 and 100 < by < 250 and 150 < bw < 250
    left, top, width, height = face["frame"]
    assert width / height == pytest.approx(FRAME[0] / FRAME[1], abs=0.01)  # "squash": the aligned frame
    eyes_y = (face["eyes"][0][1] + face["eyes"][1][1]) / 2
    assert (eyes_y - top) / height == pytest.approx(EYES_AT[1] / FRAME[1], abs=0.01)

    src = np.asarray(Image.open(_photo()).convert("RGB"))
    recon, mask, comp = (np.asarray(Image.open(out / f"grace_hopper_{k}.png")) for k in ("recon", "mask", "composite"))
    assert recon.shape == comp.shape == src.shape and mask.shape == src.shape[:2]
    outside = np.ones(src.shape[:2], bool)
    outside[max(0, top):top + height, max(0, left):left + width] = False
    assert outside.sum() > 0.25 * outside.size
    assert np.array_equal(comp[outside], src[outside]) and np.array_equal(recon[outside], src[outside])
    assert not mask[outside].any()
    m = mask[..., None] / 255.0
    np.testing.assert_allclose(comp / 255.0, recon / 255.0 * m + src / 255.0 * (1 - m), atol=2.5 / 255)
    # the predicted mask lies on the face: its centre of mass inside the detector's face box
    ys, xs = np.nonzero(mask > 127)
    assert len(ys) > 0.3 * bw * bh
    assert bx < xs.mean() < bx + bw and by < ys.mean() < by + bh


def test_reconstruct_astronaut_and_center_crop_framing(tmp_path):
    """skimage's public-domain astronaut (512x512, the face small and high): found and framed; an export whose
    shards were center-cropped is framed by the frame's central square."""
    pytest.importorskip("mediapipe", reason="optional extra facevae-dist[masks] not installed")
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    model = tmp_path / "model"
    shutil.copytree(REFERENCE_MODEL, model)
    export = json.loads((model / "export.json").read_text())
    for fit in ("squash", "center-crop"):
        (model / "export.json").write_text(json.dumps({**export, "training_data": {"fit": fit}}))
        out = tmp_path / fit
        assert main(["reconstruct", "--model", str(model), str(photo), "--out", str(out)]) == 0
        face = json.loads((out / "reconstruct.json").read_text())["faces"][str(photo)]
        left, top, width, height = face["frame"]
        bx, by, bw, bh = face["box"]
        assert face["fit"] == fit and left < bx and bx + bw < left + width and top < by + bh / 2 < top + height
        assert (width == height) == (fit == "center-crop")
        assert Image.open(out / "astronaut_composite.png").size == (512, 512)


def test_no_face_found_is_skipped_and_no_align_keeps_the_whole_image(tmp_path, capsys):
    pytest.importorskip("mediapipe", reason="optional extra facevae-dist[masks] not installed")
    model = _save_model(tmp_path / "model")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((60, 90, 3), 128, np.uint8)).save(flat)
    assert main(["reconstruct", "--model", str(model), str(flat), str(_photo()), "--out", str(tmp_path / "o")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped" in err and "flat.png" in err and "no face found" in err and "--no-align" in err
    assert main(["reconstruct", "--model", str(model), str(flat), "--out", str(tmp_path / "o2"), "--no-align"]) == 0
    assert Image.open(tmp_path / "o2" / "flat_composite.png").size == (90, 60)
    assert "not square, e.g. flat.png (90x60)" in " ".join(capsys.readouterr().err.split())


def test_reconstruct_without_mediapipe_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch):
    import sys

    model = _save_model(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions", None)  # as if the extra were not installed
    rc = main(["reconstruct", "--model", str(model), str(_photo()), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "MediaPipe" in err[0] and "masks" in err[0] and "--no-align" in err[0]
    assert not (tmp_path / "o").exists()
    assert main(["reconstruct", "--model", str(model), str(_photo()), "--out", str(tmp_path / "o"), "--no-align"]) == 0


def test_missing_model_is_a_usage_error(tmp_path, capsys):
    for model in (tmp_path / "nonexistent", tmp_path):  # no such directory; a directory that holds no model
        rc = main(["reconstruct", "--model", str(model), str(_photo()), "--out", str(tmp_path / "o"), "--no-align"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and str(model) in err[0], err
    assert main(["sample", "--model", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "s.png")]) == 2


def test_export_carries_a_model_card_and_a_flat_config(tmp_path):
    """A real run (synthetic shards, two steps), evaluated, then exported: the folder is what the Hugging Face Hub
    expects of a PyTorchModelHubMixin model (README.md with YAML front matter, flat config.json, safetensors) and
    the card states the hypothesis, the training data, the profile, the steps, the eval's scores and split, how to
    load it and the paper."""
    from huggingface_hub import ModelCard

    from facevae_dist.config import TrainConfig
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import SyntheticSource
    from facevae_dist.train.loop import train

    shards = tmp_path / "shards"
    build_shards(SyntheticSource(n=16, seed=0, split_ratios=(0.5, 0.25, 0.25)), shards,
                 ShardOptions(image_size=18, shard_size=8, image_format="png"))
    run = tmp_path / "run"
    train(TrainConfig.from_hypothesis(
        "ssim+l1/mask+decoder", run_dir=str(run), max_steps=2, val_every=2, val_batches=1, ckpt_every=2,
        log_every=1, sample_every=0, mixed_precision="no", data={"shards": str(shards), "batch_size": 4, "workers": 0},
        model={"image_size": 18, "width": 0.125, "latent_dim": 8}))
    assert main(["-q", "eval", str(run), "--shards", str(shards), "--bootstrap", "50", "--device", "cpu"]) == 0
    out = tmp_path / "export"
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "export.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 18 and config["mask_mode"] == "mask+decoder" and "model" not in config
    assert json.loads((out / "export.json").read_text())["training_data"]["fit"] == "squash"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "facevae-dist" and card.data.license == "mit"  # synthetic faces: the code's
    assert {"vae", "face-reconstruction", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    for fact in ("`ssim+l1/mask+decoder`", "source: `synthetic`", "train 8, val 4, test 4", "18x18",
                 "| width | 0.125", "2 optimizer steps", "`test` split of `shards`, n = 4 images",
                 "| face | ", 'FaceVAE.from_pretrained("', "ENIAC 2021", "2112.02139", "@inproceedings"):
        assert fact in text, fact
    assert str(tmp_path) not in text  # no absolute paths in a card meant for publishing
    loaded = FaceVAE.from_pretrained(out)
    assert loaded.cfg.image_size == 18 and not loaded.training


@pytest.mark.parametrize("mask_mode", ["none", "mask+decoder"])
def test_masks_that_are_not_used_are_said_not_silently_ignored(tmp_path, capsys, mask_mode):
    """A no-mask model given --masks without a mask for a photo wrote no composite for it, and a mask+decoder model
    ignored --masks altogether, both without a word."""
    model = _save_model(tmp_path / "model", mask_mode=mask_mode)
    photo = tmp_path / "face.jpg"
    shutil.copy(_photo(), photo)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "other.png").write_bytes(b"")  # a mask for some other photo
    assert main(["reconstruct", "--model", str(model), str(photo), "--no-align", "--out", str(tmp_path / "out"),
                 "--masks", str(masks)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("facevae: warning: --masks")]
    expected = ("not used: a mask+decoder model predicts the face mask itself" if mask_mode == "mask+decoder" else
                "no mask for 1 of 1 photo(s), e.g. face.jpg (it needs face.png there): no composite for them")
    assert len(warnings) == 1 and expected in warnings[0], warnings
