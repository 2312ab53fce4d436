"""`--preset paper`: the authors' released setup in one flag, for `shards build`, `train` and `sweep submit`.

The default stays the corrected VAE (standard sampling, mean-z validation, the project's short schedule). The
paper preset is what the released Keras code did (docs/paper.md): its sampling bug, Keras' Adam (eps outside the
bias correction) with lr 1e-4, eps 1e-7 and per-tensor clipnorm 1e-3, validation that samples z like the Keras
Lambda layer, epochs of 4000 steps x batch 32 with 700 validation batches each and the best-by-validation
checkpoint, 100 epochs, fp32, one process; shards squashed with cv2-style INTER_LINEAR and stored losslessly; and
the paper's 10 hypotheses (grid paper10, also the sweep's default).

Precedence (later wins): defaults < hypothesis < preset < --config FILE < CLI flags < --set KEY=VALUE.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from facevae_dist.config import TrainConfig, apply_dict, apply_overrides
from facevae_dist.errors import UsageError

PRESETS = ("default", "paper")

PAPER_BATCH = 32  # InputGen(bs=32), one GPU
PAPER_STEPS_PER_EPOCH = 4000  # fit(steps_per_epoch=4000)
PAPER_VAL_BATCHES = 700  # fit(validation_steps=700)
PAPER_EPOCHS = 100  # train(epochs=100); the released checkpoint says epoch 235, so it was resumed at least once

# TrainConfig fields, as apply_dict takes them; model/loss values equal today's defaults but are pinned here so a
# change of defaults cannot change what "the paper" means
_TRAIN: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "model": {"image_size": 144, "width": 1.0, "latent_dim": 512, "sampling": "paper"},
        "loss": {"w_l1": 4.0, "w_l2": 100.0, "w_ssim": 1.0, "ssim_window": 9, "ssim_sigma": 1.5, "kl_factor": 1e-3,
                 "w_bce": 1.0, "w_dice": 1.0},
        "optim": {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.0, "clip": "per-tensor",
                  "clip_value": 1e-3, "eps_form": "keras"},
        "data": {"batch_size": PAPER_BATCH},
        "grad_accum": 1,
        "mixed_precision": "no",
        "val_sampling": "sample",  # z drawn as the Keras Lambda did during fit()'s validation
        "max_steps": PAPER_EPOCHS * PAPER_STEPS_PER_EPOCH,
        "val_every": PAPER_STEPS_PER_EPOCH,  # one validation per epoch; best/ keeps the best one (ModelCheckpoint)
        "val_batches": PAPER_VAL_BATCHES,
        "ckpt_every": PAPER_STEPS_PER_EPOCH,  # a resumable checkpoint each epoch (~110 MB with Adam state)
        "sample_every": PAPER_STEPS_PER_EPOCH,
    },
}

# `facevae shards build` options (argparse dests): cv2.resize INTER_LINEAR (no antialiasing), lossless PNG
_SHARDS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"resize": "cv2", "image_format": "png"},
}

def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return name


def train_preset_fields(name: str) -> dict[str, Any]:
    """The TrainConfig fields a preset sets (nested dict as apply_dict takes it), the ones this code has."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in _TRAIN[check_preset(name)].items() if k in known}
    if name != "default":
        fields["preset"] = name
    return fields


def apply_preset(cfg, name: str | None):
    """`cfg` (a TrainConfig) with the preset's fields set; None or "default" changes nothing."""
    if not name or check_preset(name) == "default":
        return cfg
    return apply_dict(cfg, train_preset_fields(name), source=f"--preset {name}")


def preset_overrides(name: str | None) -> list[str]:
    """The preset as `--set KEY=VALUE` strings (for `sweep submit`, whose elements take --set overrides only)."""
    if not name or check_preset(name) == "default":
        return []
    out = []
    for key, value in train_preset_fields(name).items():
        if isinstance(value, dict):
            out += [f"{key}.{k}={_toml_literal(v)}" for k, v in value.items()]
        else:
            out.append(f"{key}={_toml_literal(value)}")
    return out


def sweep_overrides(name: str | None, overrides: list[str], world_size: int) -> tuple[list[str], list[str]]:
    """`sweep submit --preset`: the --set list every element trains with (the preset first, so --set wins) and the
    preset's warnings for `world_size` ranks per element. (The preset's grid, paper10, is the sweep default.)"""
    full = preset_overrides(name) + list(overrides)
    return full, preset_warnings(apply_overrides(TrainConfig(), full), world_size) if full else []


def apply_shards_preset(args: argparse.Namespace, name: str | None) -> argparse.Namespace:
    """Set the preset's `shards build` options on parsed args, except those given on the command line
    (track_explicit records which)."""
    if not name or check_preset(name) == "default":
        return args
    explicit = getattr(args, EXPLICIT, set())
    for dest, value in _SHARDS[name].items():
        if dest not in explicit:
            setattr(args, dest, value)
    return args


def preset_warnings(cfg, world_size: int) -> list[str]:
    """What makes a run under --preset paper differ from the paper's setup (printed at the start of training)."""
    if getattr(cfg, "preset", "") != "paper":
        return []
    warnings = []
    batch = cfg.data.batch_size * cfg.grad_accum * world_size
    if batch != PAPER_BATCH:
        warnings.append(f"--preset paper: effective batch {batch} (batch_size {cfg.data.batch_size} x grad_accum "
                        f"{cfg.grad_accum} x {world_size} process(es)), the paper's is {PAPER_BATCH} in one process; "
                        f"run one process, or scale optim.lr deliberately")
    if world_size > 1 and cfg.val_batches == PAPER_VAL_BATCHES:
        warnings.append(f"--preset paper: {world_size} processes validate {PAPER_VAL_BATCHES} batches each "
                        f"({PAPER_VAL_BATCHES * world_size} in all; the paper: {PAPER_VAL_BATCHES})")
    expected = _flatten(train_preset_fields("paper"))
    actual = _flatten(cfg.to_dict())
    changed = [f"{k}={actual[k]!r} (paper: {v!r})" for k, v in expected.items()
               if k in actual and _plain(actual[k]) != _plain(v) and k not in ("data.batch_size", "grad_accum")]
    if changed:
        warnings.append("--preset paper, but overridden: " + ", ".join(changed))
    return warnings


# ---- argparse: which options were given on the command line ---------------------------------------------------

EXPLICIT = "_explicit_options"  # attribute of the parsed Namespace: the dests given on the command line


def track_explicit(parser: argparse.ArgumentParser) -> None:
    """Make every option of `parser` record its dest in args._explicit_options when it appears on the command line,
    so a preset can fill in only what the user did not say (an option's default looks the same as its value)."""
    for action in parser._actions:
        base = type(action)
        if getattr(base, "_records_explicit", False) or isinstance(action, argparse._HelpAction):
            continue

        def __call__(self, parser, namespace, values, option_string=None, _base=base):
            explicit = set(getattr(namespace, EXPLICIT, ()))
            explicit.add(self.dest)
            setattr(namespace, EXPLICIT, explicit)
            _base.__call__(self, parser, namespace, values, option_string)

        action.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_records_explicit": True})


def add_preset_argument(parser, *, what: str) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help=f"default: the corrected VAE; paper: the authors' released setup ({what}); "
                             "--config, flags and --set still win (docs/training.md: 'Default vs --preset paper')")


# ---- helpers ----------------------------------------------------------------------------------------------------


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
