"""`--preset paper`: every resolved field of `train`, `shards build` and `sweep submit`, precedence, warnings, and
that the "Default vs --preset paper" table of docs/training.md names every difference."""

import dataclasses
from pathlib import Path

import pytest

from facevae_dist.cli import build_parser
from facevae_dist.cli.train import config_from_args
from facevae_dist.config import TrainConfig, apply_overrides, load_toml, save_toml
from facevae_dist.errors import UsageError
from facevae_dist.presets import (
    apply_preset,
    apply_shards_preset,
    preset_overrides,
    preset_warnings,
    sweep_overrides,
)

REPO = Path(__file__).resolve().parent.parent
HAS_VAL_SAMPLING = "val_sampling" in {f.name for f in dataclasses.fields(TrainConfig)}


def _train_cfg(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_paper_preset_resolves_every_field():
    cfg = _train_cfg("--preset", "paper", "--hypothesis", "H9")
    # the released code's sampling bug, and (TrainConfig.val_sampling) validation that samples z like Keras did
    assert cfg.model.sampling == "paper"
    assert getattr(cfg, "val_sampling", "sample") == "sample"
    # the paper's Adam: Keras' eps form, lr 1e-4, eps 1e-7, per-tensor clipnorm 1e-3, no weight decay
    o = cfg.optim
    assert (o.eps_form, o.lr, o.eps, o.betas, o.clip, o.clip_value, o.weight_decay) == (
        "keras", 1e-4, 1e-7, (0.9, 0.999), "per-tensor", 1e-3, 0.0)
    # the paper's length: 100 epochs of 4000 steps x 32, 700 validation batches per epoch, best-by-validation
    assert (cfg.max_steps, cfg.val_every, cfg.val_batches) == (400_000, 4000, 700)
    assert cfg.ckpt_every == 4000 and cfg.val_every % cfg.ckpt_every == 0 and cfg.sample_every == 4000
    # fp32, batch 32 in one step of one process
    assert (cfg.mixed_precision, cfg.data.batch_size, cfg.grad_accum) == ("no", 32, 1)
    # the paper's network and loss weights (equal to today's defaults, pinned by the preset)
    m, lo = cfg.model, cfg.loss
    assert (m.image_size, m.width, m.latent_dim) == (144, 1.0, 512)
    assert (lo.w_l1, lo.w_l2, lo.w_ssim, lo.ssim_window, lo.ssim_sigma, lo.kl_factor, lo.w_bce, lo.w_dice) == (
        4.0, 100.0, 1.0, 9, 1.5, 1e-3, 1.0, 1.0)
    # the hypothesis still decides mask mode and loss terms; the run says which preset built it
    assert (cfg.hypothesis, m.mask_mode, lo.terms, cfg.preset) == ("ssim+l2/mask+decoder", "mask+decoder",
                                                                   ("ssim", "l2"), "paper")


@pytest.mark.skipif(not HAS_VAL_SAMPLING, reason="TrainConfig.val_sampling not in this tree yet")
def test_paper_preset_sets_val_sampling():
    assert _train_cfg("--preset", "paper").val_sampling == "sample"
    assert TrainConfig().val_sampling == "mean"


def test_default_stays_the_corrected_vae():
    assert _train_cfg().to_dict() == _train_cfg("--preset", "default").to_dict() == TrainConfig().validate().to_dict()
    assert TrainConfig().model.sampling == "standard" and TrainConfig().preset == ""


def test_precedence_preset_config_flags_set(tmp_path):
    toml = tmp_path / "my.toml"
    toml.write_text("max_steps = 50\nval_every = 10\n[optim]\nlr = 2e-4\n")
    cfg = _train_cfg("--preset", "paper", "--config", str(toml), "--val-every", "5", "--set", "val_every=7",
                     "--set", "optim.eps_form=torch")
    assert cfg.max_steps == 50 and cfg.optim.lr == 2e-4  # --config over the preset
    assert cfg.val_every == 7  # --set over the flag over --config
    assert cfg.optim.eps_form == "torch"  # --set over the preset
    assert cfg.val_batches == 700 and cfg.model.sampling == "paper"  # the rest stays the preset's
    assert _train_cfg("--preset", "paper", "--batch-size", "8").data.batch_size == 8


def test_preset_as_set_overrides_is_the_same_config(tmp_path):
    via_set = apply_overrides(TrainConfig(), preset_overrides("paper")).validate()
    assert via_set.to_dict() == apply_preset(TrainConfig(), "paper").validate().to_dict()
    assert preset_overrides("default") == [] and preset_overrides(None) == []
    back = load_toml(save_toml(via_set, tmp_path / "config.toml"))  # config.toml keeps every field and the label
    assert back.to_dict() == via_set.to_dict() and back.preset == "paper"
    with pytest.raises(UsageError, match="preset"):
        apply_preset(TrainConfig(), "keras")


def test_preset_warnings():
    cfg = apply_preset(TrainConfig(), "paper")
    assert preset_warnings(cfg, 1) == []
    assert preset_warnings(TrainConfig(), 8) == []  # no preset: nothing to warn about
    two = preset_warnings(cfg, 2)
    assert any("effective batch 64" in w and "32" in w for w in two)
    assert any("1400" in w for w in two)  # 700 validation batches per rank
    shorter = preset_warnings(apply_overrides(cfg, ["max_steps=100", "mixed_precision=bf16"]), 1)
    assert len(shorter) == 1 and "max_steps=100 (paper: 400000)" in shorter[0]
    assert "mixed_precision='bf16'" in shorter[0]
    accum = preset_warnings(apply_overrides(cfg, ["data.batch_size=16", "grad_accum=2"]), 1)
    assert accum == []  # 16 x 2 x 1 = 32: the paper's effective batch


def test_shards_build_preset_fills_only_what_was_not_given():
    parser = build_parser()

    def build_args(*argv):
        args = parser.parse_args(["shards", "build", *argv])
        return apply_shards_preset(args, args.preset)

    args = build_args("--preset", "paper")
    assert (args.resize, args.image_format) == ("cv2", "png")
    args = build_args("--preset", "paper", "--image-format", "jpg", "--resize", "pil")
    assert (args.resize, args.image_format) == ("pil", "jpg")  # explicit flags win, even when equal to defaults
    args = build_args("--format", "jpg", "--preset", "paper")  # (the old spelling, before --preset)
    assert (args.resize, args.image_format) == ("cv2", "jpg")
    default = build_args()
    assert (default.resize, default.image_format) == ("pil", "jpg")


def test_sweep_submit_preset(tmp_path):
    from facevae_dist.hypotheses import resolve_grid
    from facevae_dist.sweep.submit import element_configs

    args = build_parser().parse_args(["sweep", "submit", "--preset", "paper", "--shards", "s", "--out", "o"])
    assert args.grid == "paper10" and args.preset == "paper"
    names = [h.name for h in resolve_grid(args.grid)]
    assert len(names) == 10
    overrides, warnings = sweep_overrides("paper", ["max_steps=20"], world_size=1)
    assert warnings == ["--preset paper, but overridden: max_steps=20 (paper: 400000)"]
    shards = tmp_path / "shards"
    configs = element_configs(names, shards, tmp_path / "out", overrides)
    single = apply_overrides(apply_preset(TrainConfig(), "paper"), ["max_steps=20"])
    for name, d in configs.items():
        assert d["hypothesis"] == name and d["preset"] == "paper" and d["max_steps"] == 20
        for key, value in _flat(single.to_dict()).items():  # every element = `train --preset paper`
            if key not in ("hypothesis", "run_dir", "data.shards", "model.mask_mode", "loss.terms", "resume"):
                assert _flat(d)[key] == (list(value) if isinstance(value, tuple) else value), (name, key)
    _, eight = sweep_overrides("paper", [], world_size=8)
    assert any("effective batch 256" in w for w in eight)


def test_readme_table_names_every_difference():
    readme = (REPO / "docs" / "training.md").read_text()
    section = readme.split("## Default vs `--preset paper`", 1)[1].split("\n#", 1)[0]
    default = _flat(TrainConfig().to_dict())
    paper = _flat(apply_preset(TrainConfig(), "paper").to_dict())
    differences = {k for k in paper if paper[k] != default[k]}
    assert differences >= {"model.sampling", "max_steps", "val_every", "val_batches", "mixed_precision", "preset"}
    for key in differences:
        assert f"`{key}`" in section, f"docs/training.md 'Default vs --preset paper' does not name {key}"
    for option in ("--resize", "--image-format", "cv2", "png", "paper10", "eps_form"):
        assert option in section


def test_shards_build_with_the_paper_preset_records_it(tmp_path):
    import json
    import tarfile

    from facevae_dist.cli import main

    out = tmp_path / "shards"
    assert main(["-q", "shards", "build", "--source", "synthetic", "--n", "20", "--image-size", "18",
                 "--preset", "paper", "--out", str(out)]) == 0
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert (options["resize"], options["image_format"], options["fit"]) == ("cv2", "png", "squash")
    with tarfile.open(sorted((out / "train").glob("shard-*.tar"))[0]) as tar:  # lossless images in the shards
        names = tar.getnames()
    assert any(n.endswith(".png") and not n.endswith(".mask.png") for n in names)
    assert not any(n.endswith(".jpg") for n in names)
