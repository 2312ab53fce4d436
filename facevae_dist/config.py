"""Training configuration: small validated dataclasses, TOML load/save and `a.b=value` overrides.

One TrainConfig says everything a run needs: where the data is (DataConfig), the network (ModelConfig, built by
facevae_dist.model), the loss (LossConfig, computed by facevae_dist.losses), the optimizer (OptimConfig) and the run's
own fields (steps, intervals, precision, checkpointing). This module imports no torch: the command line, `sweep
submit` and `sweep status` read configs without paying for it. The resolved config is written to `<run_dir>/config.toml` and into every
checkpoint, so a run can always be rebuilt from its directory.

Precedence (later wins): dataclass defaults < hypothesis < --preset (facevae_dist.presets) < --config FILE.toml <
CLI flags < --set a.b=value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from facevae_dist.errors import UsageError
from facevae_dist.fileio import atomic_write_text, parse_toml, read_toml
from facevae_dist.hypotheses import MASK_MODES, resolve_hypothesis
from facevae_dist.seeds import check_seed

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
SAMPLINGS = ("standard", "paper")  # z = mu + eps * exp(logvar / 2), or the released code's z = mu + eps * s
IMAGE_SIZES = (144, 72, 36, 18, 9)  # 9 * 2**k: each of the model's four high-resolution stages halves the size
IMAGE_TERMS = ("l1", "l2", "ssim")  # facevae_dist.losses
# Sane bounds: far above any useful model (width 8 is ~600M parameters, latent 8192 two 8192x8192 layers), far below
# sizes whose weights overflow a storage allocation (a config.json with width 1e9 must be an error, not a crash).
MAX_WIDTH = 8.0
MAX_LATENT_DIM = 8192
# Counts that size one decoder batch and one PNG (`facevae sample --n`, `interpolate --steps`): a typo such as 1e8
# is a usage line, not a 200 GB allocation.
MAX_SAMPLES = 256
MAX_INTERPOLATION_STEPS = 256
CLIP_MODES = ("per-tensor", "global", "none")
EPS_FORMS = ("keras", "torch")  # facevae_dist.train.optim: where Adam adds eps (Keras' "epsilon hat" vs torch.optim.Adam)
TRACKERS = ("tensorboard", "wandb", "mlflow")  # what --log-with takes, besides "auto" and "none"


@dataclass
class DataConfig:
    """Where the shards are and how they are read (facevae_dist.data.loader.ShardLoader)."""

    shards: str = "shards/synthetic"  # a directory written by `facevae shards build`
    batch_size: int = 32  # per process and per micro-step (the paper: 32 on one GPU)
    workers: int = 2  # DataLoader worker processes per rank (0 = read in the training process)
    seed: int = 0  # shard/sample shuffle seed (epoch e shuffles with seed + e, identically on every rank)
    resampled: bool = False  # sample shards with replacement (for shard counts not divisible by world x workers)
    # where the decoded split lives (facevae_dist.data.batches): "stream" (read + decode shards every epoch),
    # "host" (decoded once into a uint8 cache file beside the shards, gathered in RAM), "device" (that cache on the
    # GPU), "auto" (device on CUDA when it fits in device_memory_fraction of free memory, else host/stream)
    placement: str = "auto"
    device_memory_fraction: float = 0.5  # share of free GPU (or available host) memory a resident split may take

    def validate(self) -> "DataConfig":
        if not isinstance(self.shards, str) or not self.shards:
            raise UsageError("data.shards is empty; pass --shards DIR (a directory from `facevae shards build`)")
        _check_int("data.batch_size", self.batch_size, 1, "e.g. --batch-size 32")
        _check_int("data.workers", self.workers, 0, "e.g. --set data.workers=2")
        _check_int("data.seed", self.seed, 0, "e.g. --seed 0")
        check_seed("data.seed", self.seed)
        if self.placement not in ("auto", "stream", "host", "device"):
            raise UsageError(f"data.placement={self.placement!r}: use auto, stream, host or device "
                             "(e.g. --set data.placement=host)")
        if (isinstance(self.device_memory_fraction, bool) or not isinstance(self.device_memory_fraction, (int, float))
                or not 0 < self.device_memory_fraction <= 1):
            raise UsageError(f"data.device_memory_fraction={self.device_memory_fraction!r}: must be in (0, 1], "
                             "e.g. --set data.device_memory_fraction=0.5")
        return self


@dataclass
class ModelConfig:
    """Architecture switches. Defaults are the paper's full model with the correct (standard) sampling."""

    image_size: int = 144
    width: float = 1.0  # channel multiplier (1.0 = the paper); tests use e.g. 0.125
    latent_dim: int = 512
    mask_mode: str = "mask+decoder"  # "none" | "mask" | "mask+decoder"
    sampling: str = "standard"  # "standard" | "paper" (the released code's z = mu + eps * s)
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)
    # Stride-2 'same' transposed convs: TF keeps the first 2n rows/cols of the full 2n+1 output, PyTorch's
    # padding=1/output_padding=1 the last 2n: a 1-px phase shift of the same layer and parameters, irrelevant
    # when training from scratch. True = TF's exact numerics (needed only to load Keras weights), but the odd
    # 2n+1 intermediate is much slower on CPU (docs/performance.md), so the default is PyTorch's form.
    tf_same_crop: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.logvar_clamp, list):
            self.logvar_clamp = tuple(self.logvar_clamp)

    def validate(self) -> "ModelConfig":
        if self.mask_mode not in MASK_MODES:
            raise UsageError(f"model.mask_mode={self.mask_mode!r} is not one of {', '.join(MASK_MODES)}")
        if self.sampling not in SAMPLINGS:
            raise UsageError(f"model.sampling={self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                or self.image_size not in IMAGE_SIZES):
            raise UsageError(f"model.image_size={self.image_size!r} is not supported; use one of "
                             f"{', '.join(map(str, IMAGE_SIZES))} (9 * 2**k, the paper uses 144)")
        if (isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not math.isfinite(self.width)
                or not 0 < self.width <= MAX_WIDTH):
            raise UsageError(f"model.width={self.width!r} must be a number in (0, {MAX_WIDTH:g}] (1.0 = the paper)")
        if isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int) \
                or not 1 <= self.latent_dim <= MAX_LATENT_DIM:
            raise UsageError(f"model.latent_dim={self.latent_dim!r} must be an integer in [1, {MAX_LATENT_DIM}] (the "
                             "paper uses 512)")
        if not isinstance(self.tf_same_crop, bool):
            raise UsageError(f"model.tf_same_crop={self.tf_same_crop!r} must be true or false")
        lo_hi = self.logvar_clamp
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
                or not lo_hi[0] < lo_hi[1]):
            raise UsageError(f"model.logvar_clamp={lo_hi!r} must be two numbers (low, high) with low < high")
        return self

    @property
    def has_mask_decoder(self) -> bool:
        return self.mask_mode == "mask+decoder"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["logvar_clamp"] = list(self.logvar_clamp)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _section_from_dict(cls, d, "model")


@dataclass
class LossConfig:
    """Which image terms are on and every weight; defaults are the paper's (SSIM + l1, its released config)."""

    terms: tuple[str, ...] = ("ssim", "l1")
    w_l1: float = 4.0
    w_l2: float = 100.0
    w_ssim: float = 1.0
    ssim_window: int = 9
    ssim_sigma: float = 1.5
    kl_factor: float = 1e-3
    w_bce: float = 1.0
    w_dice: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.terms, (list, str)):
            self.terms = (self.terms,) if isinstance(self.terms, str) else tuple(self.terms)

    def validate(self) -> "LossConfig":
        if not self.terms:
            raise UsageError(f"loss.terms is empty; choose one or more of {', '.join(IMAGE_TERMS)}")
        bad = [t for t in self.terms if t not in IMAGE_TERMS]
        if bad:
            raise UsageError(f"loss.terms has unknown term(s) {', '.join(map(repr, bad))}; "
                             f"valid: {', '.join(IMAGE_TERMS)}")
        if len(set(self.terms)) != len(self.terms):
            raise UsageError(f"loss.terms={list(self.terms)} repeats a term")
        for name in ("w_l1", "w_l2", "w_ssim", "kl_factor", "w_bce", "w_dice", "ssim_sigma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UsageError(f"loss.{name}={v!r} must be a finite number >= 0")
        if self.ssim_sigma <= 0:
            raise UsageError(f"loss.ssim_sigma={self.ssim_sigma!r} must be > 0")
        if not isinstance(self.ssim_window, int) or self.ssim_window < 1 or self.ssim_window % 2 == 0:
            raise UsageError(f"loss.ssim_window={self.ssim_window!r} must be a positive odd integer (the paper: 9)")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["terms"] = list(self.terms)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        return _section_from_dict(cls, d, "loss")


@dataclass
class OptimConfig:
    """Adam as in the paper's Keras code: lr 1e-4, eps 1e-7 (Keras' default, not PyTorch's 1e-8), and `clipnorm`
    1e-3, which Keras applies to each gradient tensor separately ("per-tensor"); "global" clips the total norm."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    weight_decay: float = 0.0
    clip: str = "per-tensor"  # "per-tensor" | "global" | "none"
    clip_value: float = 1e-3
    eps_form: str = "keras"  # "keras": eps on the raw sqrt(v), as the paper's Keras Adam; "torch": torch.optim.Adam's

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)

    def validate(self) -> "OptimConfig":
        _check_float("optim.lr", self.lr, positive=True)
        _check_float("optim.eps", self.eps, positive=True)
        _check_float("optim.weight_decay", self.weight_decay)
        _check_float("optim.clip_value", self.clip_value, positive=True)
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise UsageError(f"optim.betas={self.betas!r} must be two numbers in [0, 1), e.g. --set optim.betas=[0.9,0.999]")
        _check_choice("optim.clip", self.clip, CLIP_MODES)
        _check_choice("optim.eps_form", self.eps_form, EPS_FORMS)
        return self


@dataclass
class TrainConfig:
    """A whole training run. Steps are optimizer steps (each uses grad_accum micro-batches on every rank)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/default"
    hypothesis: str = ""  # the grid name this config was built from ("" = hand-made)
    preset: str = ""  # the --preset this config was built from ("" = none); a label: setting it alone changes nothing
    seed: int = 0  # model init (same on every rank) and sampling noise (seed + rank)
    max_steps: int = 1000
    val_every: int = 500  # 0 = never validate (then best/ is never written)
    val_batches: int = 20  # batches per rank per validation
    ckpt_every: int = 500  # 0 = only at the end and on preemption
    keep_last: int = 2  # step checkpoints kept (best/ is separate)
    log_every: int = 10
    sample_every: int = 500  # sample grid PNG; 0 = never
    # "auto" = the launcher profile's precision, else bf16 on CUDA GPUs that support it, else fp32 (CPU);
    # resolved once at start (resolve_mixed_precision) and recorded resolved in config.toml
    mixed_precision: str = "auto"  # "auto" | "no" | "bf16" | "fp16" (fp16 uses loss scaling)
    grad_accum: int = 1
    channels_last: bool = True  # NHWC convolutions: faster on CPU (oneDNN) and on GPUs with tensor cores
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: "default" | "reduce-overhead" (CUDA graphs) | "max-autotune"
    deterministic: bool = False  # cuDNN/cuBLAS deterministic algorithms (bit-exact GPU resume); else cudnn.benchmark
    val_sampling: str = "mean"  # validation z: "mean" (z = mu) | "sample" (seeded by (seed, step), as Keras did)
    deepspeed: str = ""  # path of a DeepSpeed JSON (launch/ds_zero2.json); "" = plain DDP
    resume: str = "auto"  # "auto" (latest checkpoint in run_dir if any) | "none" | a checkpoint directory
    # a resume may switch data.shards (other folder, or other content) only with this set (--allow-new-shards);
    # recorded in metrics.jsonl and env.json, never saved as true in config.toml (each switch is asked for)
    allow_new_shards: bool = False
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    # experiment trackers, through Accelerate (facevae_dist/train/tracking.py): "auto" = TensorBoard when it is
    # installed, else none; or any of TRACKERS; "none" = metrics.jsonl only. Resolved at start and recorded resolved.
    # An old config's `tensorboard = true/false` reads as "auto"/"none".
    log_with: tuple[str, ...] = ("auto",)
    # seconds between the plain progress lines printed when stderr is not a terminal (a batch job's log); 0 = one at
    # every log step. $FACEVAE_PROGRESS_EVERY overrides it for one job.
    progress_every: float = 30.0
    # seconds a rank waits in a collective (all-reduce, barrier, broadcast) before the run ends with a line naming
    # the rank that stopped answering (frozen, killed, or stuck in I/O) and its last step; torch's default is 30 min
    dist_timeout_s: float = 300.0

    def validate(self) -> "TrainConfig":
        self.data.validate()
        self.model.validate()
        self.loss.validate()
        self.optim.validate()
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise UsageError("run_dir is empty; pass --run-dir DIR")
        _check_int("seed", self.seed, 0, "e.g. --seed 0")
        check_seed("seed", self.seed)
        _check_int("max_steps", self.max_steps, 1, "e.g. --max-steps 1000")
        for name in ("val_every", "ckpt_every", "sample_every"):
            _check_int(name, getattr(self, name), 0, f"0 disables it, e.g. --{name.replace('_', '-')} 500")
        _check_int("val_batches", self.val_batches, 1, "e.g. --set val_batches=20")
        _check_int("keep_last", self.keep_last, 1, "e.g. --set keep_last=2")
        _check_int("log_every", self.log_every, 1, "e.g. --log-every 10")
        _check_int("grad_accum", self.grad_accum, 1, "e.g. --grad-accum 1")
        _check_int("max_bad_steps", self.max_bad_steps, 1, "e.g. --set max_bad_steps=5")
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("compile_mode", self.compile_mode, ("default", "reduce-overhead", "max-autotune"))
        _check_choice("val_sampling", self.val_sampling, ("mean", "sample"))
        _check_choice("preset", self.preset, ("", "default", "paper"))
        self.log_with = check_log_with(self.log_with)
        _check_float("progress_every", self.progress_every)
        _check_float("dist_timeout_s", self.dist_timeout_s, positive=True)
        if "ssim" in self.loss.terms and self.loss.ssim_window > self.model.image_size:
            raise UsageError(f"loss.ssim_window={self.loss.ssim_window} is larger than model.image_size="
                             f"{self.model.image_size}; lower it, e.g. --set loss.ssim_window=3")
        if self.deepspeed:
            if not Path(self.deepspeed).is_file():
                raise UsageError(f"deepspeed={self.deepspeed!r}: no such file; use e.g. --deepspeed launch/ds_zero2.json")
            # DeepSpeed's engine clips the global norm and runs its own torch-form Adam: name every fix at once
            bad = [(f"optim.clip={self.optim.clip!r}", "--set optim.clip=global")] if self.optim.clip == "per-tensor" \
                else []
            if self.optim.eps_form == "keras":
                bad.append((f"optim.eps_form={self.optim.eps_form!r}", "--set optim.eps_form=torch"))
            if bad:
                raise UsageError(f"{' and '.join(k for k, _ in bad)} cannot run under DeepSpeed (its engine clips the "
                                 f"global norm and runs torch-form Adam itself); add {' '.join(f for _, f in bad)}")
            if self.compile:
                raise UsageError("compile=true with DeepSpeed is not supported here; drop --compile")
            if self.mixed_precision == "fp16":
                raise UsageError("mixed_precision='fp16' with DeepSpeed is not supported here; use bf16 or no")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise UsageError(f"resume={self.resume!r} is neither 'auto', 'none' nor a checkpoint directory "
                             "(e.g. runs/x/checkpoints/step_500)")
        return self

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_hypothesis(cls, name: str, **run_fields: Any) -> "TrainConfig":
        """The config of one grid hypothesis (e.g. "ssim+l2/mask+decoder" or "H9"): its mask mode and loss
        terms over the defaults, then `run_fields` (top-level fields, or sections given as dicts)."""
        hyp = resolve_hypothesis(name)
        cfg = cls()
        cfg.hypothesis = hyp.name
        cfg.run_dir = f"runs/{hyp.slug}"
        cfg.model = dataclasses.replace(cfg.model, **hyp.model_overrides())
        cfg.loss = dataclasses.replace(cfg.loss, **hyp.loss_overrides())
        return apply_dict(cfg, run_fields, source="from_hypothesis()")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        return apply_dict(cls(), d, source=source)


# ---- TOML ---------------------------------------------------------------------------------------------------------


def save_toml(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as TOML (atomically)."""
    path = Path(path)
    atomic_write_text(path, "# facevae-dist training config (resolved); rerun with --config this-file\n"
                      + tomli_w.dumps(cfg.to_dict()))
    return path


def load_toml(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a TOML file (a full config or only some fields) over `base` (default: the defaults)."""
    path = Path(path)
    try:
        data = read_toml(path, fix="fix the file, or write a new one with a run's config.toml as the example")
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    return apply_dict(base if base is not None else TrainConfig(), data, source=str(path))


# ---- overrides ----------------------------------------------------------------------------------------------------


def apply_dict(cfg: TrainConfig, data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Return a copy of `cfg` with the (possibly nested) values of `data` set, each type-checked."""
    cfg = _deepcopy(cfg)
    data = _renamed_fields(data, source)
    for key, value in data.items():
        section = getattr(cfg, key, None) if key in _field_names(cfg) else None
        if dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                raise UsageError(f"{source}: '{key}' must be a table of fields, got {value!r}")
            for sub_key, sub_value in value.items():
                _set_field(section, sub_key, sub_value, f"{key}.{sub_key}", source)
        else:
            _set_field(cfg, key, value, key, source)
    return cfg


def _renamed_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Fields that changed name, read in their new form so that older configs (a run's config.toml, a sweep's
    configs) still load: `tensorboard = true/false` is `log_with = "auto"/"none"`."""
    if "tensorboard" not in data:
        return data
    data = dict(data)
    old = data.pop("tensorboard")
    if not isinstance(old, bool):
        raise UsageError(f"{source}: tensorboard={old!r} must be true or false (it is now log_with, e.g. "
                         "--log-with tensorboard)")
    data.setdefault("log_with", ["auto" if old else "none"])
    return data


def check_log_with(value: Any) -> tuple[str, ...]:
    """log_with as a tuple of names ("tensorboard,wandb" split at commas); "auto" and "none" stand alone."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise UsageError(f"log_with={value!r} must be names, e.g. --log-with tensorboard,wandb")
    names = tuple(dict.fromkeys(n.strip() for v in items for n in v.split(",") if n.strip()))
    bad = [n for n in names if n not in TRACKERS + ("auto", "none")]
    if bad or not names:
        raise UsageError(f"log_with={','.join(names) or value!r}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; "
                         f"use auto, none or any of {', '.join(TRACKERS)} (e.g. --log-with tensorboard,wandb)")
    if len(names) > 1 and {"auto", "none"} & set(names):
        raise UsageError(f"log_with={','.join(names)}: auto and none stand alone (e.g. --log-with none)")
    return names


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `a.b=value` strings (from --set). Values are TOML literals (1e-4, true, [0.9, 0.999], "x"); a bare
    word is taken as a string, and a comma list as a list (loss.terms=ssim,l2)."""
    data: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=2e-4")
        value = parse_value(raw.strip())
        parts = key.split(".")
        if len(parts) > 2:
            raise UsageError(f"--set {item!r}: keys have at most one dot (section.field), e.g. loss.w_l2=100")
        if len(parts) == 2:
            data.setdefault(parts[0], {})
            if not isinstance(data[parts[0]], dict):
                raise UsageError(f"--set {item!r}: '{parts[0]}' is not a section")
            data[parts[0]][parts[1]] = value
        else:
            data[key] = value
    return apply_dict(cfg, data, source="--set")


def parse_value(raw: str) -> Any:
    try:
        return parse_toml(f"v = {raw}", "--set", fix="values are TOML literals")["v"]
    except UsageError:
        if "," in raw:
            return [p.strip() for p in raw.split(",") if p.strip()]
        return raw


def _set_field(obj: Any, name: str, value: Any, path: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    if name not in hints or name not in _field_names(obj):
        valid = ", ".join(sorted(_field_names(obj)))
        raise UsageError(f"{source}: unknown field '{path}'; valid fields here: {valid}")
    if dataclasses.is_dataclass(getattr(obj, name)):
        raise UsageError(f"{source}: '{path}' is a section; set one of its fields, e.g. {path}.<field>=...")
    setattr(obj, name, _coerce(value, hints[name], path, source))


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, tuple[...]); ints widen to floats."""
    origin = typing.get_origin(tp)
    bad = UsageError(f"{source}: {path}={value!r} has the wrong type; expected {_type_name(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return value if isinstance(value, str) else str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], path, source) for v in value)
        if len(value) != len(args):
            raise UsageError(f"{source}: {path}={value!r} must have {len(args)} items ({_type_name(tp)})")
        return tuple(_coerce(v, a, path, source) for v, a in zip(value, args))
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list [" + ", ".join(_type_name(a) for a in args) + "]"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in fields(obj)}


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def _deepcopy(cfg: TrainConfig) -> TrainConfig:
    return copy.deepcopy(cfg)


def _section_from_dict(cls, d: dict[str, Any], section: str):
    """A validated config section from a plain dict (a model's config.json, a checkpoint): unknown fields are an
    error that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UsageError(f"unknown {section} config field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**d).validate()


# ---- checks -----------------------------------------------------------------------------------------------------


def _check_int(path: str, value: Any, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{path}={value!r} must be an integer >= {minimum} ({hint})")


def _check_float(path: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise UsageError(f"{path}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{path}={value!r} is not one of {', '.join(choices)}")
