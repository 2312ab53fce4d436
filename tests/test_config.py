"""TrainConfig: hypothesis presets, TOML round trip, --set overrides with type checks, validation messages."""

import pytest

from facevae_dist.config import TrainConfig, apply_overrides, load_toml, parse_value, save_toml
from facevae_dist.errors import UsageError


def test_from_hypothesis_sets_mask_mode_and_terms():
    cfg = TrainConfig.from_hypothesis("H9", max_steps=7, data={"batch_size": 4})
    assert cfg.hypothesis == "ssim+l2/mask+decoder"
    assert cfg.model.mask_mode == "mask+decoder" and cfg.loss.terms == ("ssim", "l2")
    assert cfg.max_steps == 7 and cfg.data.batch_size == 4
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 1e-7 and cfg.optim.clip == "per-tensor"
    assert TrainConfig.from_hypothesis("l1/none").model.mask_mode == "none"
    with pytest.raises(UsageError, match="ssim\\+l2/mask\\+decoder"):
        TrainConfig.from_hypothesis("nope")


def test_toml_round_trip(tmp_path):
    cfg = TrainConfig.from_hypothesis("ssim/mask", run_dir=str(tmp_path / "r"), mixed_precision="bf16")
    cfg = apply_overrides(cfg, ["optim.betas=[0.5, 0.9]", "model.logvar_clamp=[-10, 10]"])
    path = save_toml(cfg, tmp_path / "c.toml")
    back = load_toml(path)
    assert back == cfg and back.optim.betas == (0.5, 0.9) and back.model.logvar_clamp == (-10.0, 10.0)
    # a partial file only changes what it names
    (tmp_path / "p.toml").write_text('max_steps = 3\n[loss]\nw_l2 = 50\n')
    part = load_toml(tmp_path / "p.toml", base=cfg)
    assert part.max_steps == 3 and part.loss.w_l2 == 50.0 and part.loss.terms == ("ssim",)


def test_overrides_are_typed():
    cfg = apply_overrides(TrainConfig(), ["optim.lr=2e-4", "loss.terms=ssim,l1", "channels_last=true",
                                          "model.width=1", "resume=none", "--data.workers=0"])
    assert cfg.optim.lr == 2e-4 and cfg.loss.terms == ("ssim", "l1") and cfg.channels_last is True
    assert isinstance(cfg.model.width, float) and cfg.resume == "none" and cfg.data.workers == 0
    assert parse_value("abc") == "abc" and parse_value("[1, 2]") == [1, 2] and parse_value("true") is True


@pytest.mark.parametrize("item, match", [
    ("optim.lr=fast", "optim.lr='fast' has the wrong type; expected a number"),
    ("optim.foo=1", "unknown field 'optim.foo'; valid fields here: betas, clip"),
    ("max_steps=1.5", "max_steps=1.5 has the wrong type; expected an integer"),
    ("optim=3", "'optim' must be a table"),
    ("model.logvar_clamp=[1]", "must have 2 items"),
    ("channels_last=1", "expected true/false"),
    ("novalue", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_field(item, match):
    with pytest.raises(UsageError, match=match.replace("[", "\\[").replace("(", "\\(")):
        apply_overrides(TrainConfig(), [item])


@pytest.mark.parametrize("item, match", [
    ("mixed_precision=fp8", "mixed_precision=.fp8. is not one of auto, no, bf16, fp16"),
    ("optim.clip=both", "optim.clip='both' is not one of per-tensor, global, none"),
    ("optim.eps_form=tf", "optim.eps_form='tf' is not one of keras, torch"),
    ("max_steps=0", "max_steps=0 must be an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
    ("optim.lr=0", "optim.lr=0.0 must be a finite number > 0"),
    ("model.mask_mode=all", "model.mask_mode='all'"),
    ("loss.terms=ssim,l3", "unknown term"),
    ("resume=/no/such/dir", "neither 'auto', 'none' nor a checkpoint directory"),
    ("deepspeed=/no/such.json", "no such file"),
    # sizes whose weights would overflow a storage allocation: bounded, naming the field
    ("model.width=1e9", "model.width=1000000000.0 must be a number in (0, 8]"),
    ("model.latent_dim=1000000000000", "model.latent_dim=1000000000000 must be an integer in [1, 8192]"),
])
def test_validation_errors(item, match):
    cfg = apply_overrides(TrainConfig(), [item])
    with pytest.raises(UsageError, match=match.replace("(", "\\(").replace("[", "\\[")):
        cfg.validate()


def test_deepspeed_needs_global_clip_and_torch_eps_form(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    cfg = apply_overrides(TrainConfig(), [f"deepspeed={ds}"])
    with pytest.raises(UsageError) as exc:  # both fixes named in one line
        cfg.validate()
    msg = str(exc.value)
    assert "\n" not in msg and "--set optim.clip=global --set optim.eps_form=torch" in msg
    with pytest.raises(UsageError, match="add --set optim.eps_form=torch$"):
        apply_overrides(cfg, ["optim.clip=global"]).validate()
    with pytest.raises(UsageError, match="add --set optim.clip=global$"):
        apply_overrides(cfg, ["optim.eps_form=torch"]).validate()
    apply_overrides(cfg, ["optim.clip=global", "optim.eps_form=torch"]).validate()


def test_bad_toml_is_one_line_error(tmp_path):
    (tmp_path / "bad.toml").write_text("max_steps = = 3\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(UsageError, match="not found"):
        load_toml(tmp_path / "missing.toml")


def test_a_deeply_nested_or_binary_config_is_one_usage_line(tmp_path, capsys):
    from facevae_dist.cli import main

    path = tmp_path / "config.toml"
    for content, expected in ((b"max_steps = " + b"[" * 100_000, "nested too deeply"),
                              (b'run_dir = "r\xff"\n', "not UTF-8")):
        path.write_bytes(content)
        with pytest.raises(UsageError, match=expected):
            load_toml(path)
        assert main(["train", "--config", str(path), "--shards", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"facevae: error: {path}: ") and expected in err
    # a --set value nested past the limit is read as a plain string, then refused by the field's type
    with pytest.raises(UsageError, match="max_steps"):
        apply_overrides(TrainConfig(), ["max_steps=" + "[" * 100_000])
