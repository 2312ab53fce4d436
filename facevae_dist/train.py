"""The training loop, top to bottom (nanoGPT style): setup, resume, then step until max_steps or a stop signal.

Distributed through Accelerate: plain DDP (gloo on CPU via Accelerator(cpu=True), NCCL on GPU) or DeepSpeed ZeRO
1/2 from a JSON in launch/. The data loader is *not* passed through accelerator.prepare: the WebDataset loader
already splits shards by rank, and Accelerate's dispatcher would drop or duplicate samples (toolchain.md §4).

Mixed precision is done here with torch.autocast + GradScaler (fp16 only) rather than by Accelerate, because
Accelerate silently runs fp16 as fp32 on CPU; the losses are fp32 under autocast anyway (losses.py).

Exact resume: a checkpoint holds weights with BN statistics, Adam state, grad scaler, every rank's RNG states and
the data position (epoch, batches consumed); validation and sample grids use z = mu and their own loader, so they
draw no random numbers. Hence a run killed at any step and resumed produces the same per-step losses and final
weights as an uninterrupted one (tests/test_train.py kills a real process to check).

Run it as `facevae train ...`, `python -m facevae_dist.train ...`, `torchrun ... -m facevae_dist.train ...` or
`accelerate launch --config_file launch/<profile>.yaml -m facevae_dist.train ...` (same arguments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from facevae_dist import checkpoint as ckpt
from facevae_dist.config import TrainConfig, resolve_mixed_precision, save_toml
from facevae_dist.errors import RunError, UsageError
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from facevae_dist.losses import compute_losses
from facevae_dist.model import FaceVAE
from facevae_dist.perf import keep_freed_memory
from facevae_dist.progress import info, make_progress

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Fault injection for tests (a real poisoned batch, not a mocked loop): comma-separated step numbers whose
# training batches are multiplied by NaN.
INJECT_NAN_ENV = "FACEVAE_INJECT_NAN_STEPS"


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns {"run_dir", "step", "best_val_loss", "best_step", "stopped", ...}.
    stopped: "finished" (max_steps reached) | "preempted" (SIGTERM/SIGUSR1/SIGUSR2: checkpoint saved first).
    Raises RunError after cfg.max_bad_steps non-finite losses in a row (the last good checkpoint stays)."""
    from facevae_dist.data.loader import make_loader, to_float
    from facevae_dist.data.shards import read_manifest

    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    if not cfg.deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        cfg.deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")  # launched with deepspeed-zero2.yaml
    cfg.validate()
    keep_freed_memory()  # glibc would otherwise mmap/munmap every large activation each step (see perf.py)
    run_dir = Path(cfg.run_dir)
    accelerator = _make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    use_ds = bool(cfg.deepspeed)

    image_size = int(read_manifest(cfg.data.shards).get("image_size", cfg.model.image_size))
    if image_size != cfg.model.image_size:
        raise UsageError(f"{cfg.data.shards} holds {image_size}px images but model.image_size="
                         f"{cfg.model.image_size}; pass --set model.image_size={image_size}")

    # one training process per run dir (rank 0 holds the lock until train() returns)
    lock = ckpt.RunDirLock(run_dir) if is_main else contextlib.nullcontext()
    with lock:
        return _train_locked(cfg, accelerator, make_loader, to_float)


def _train_locked(cfg: TrainConfig, accelerator, make_loader, to_float) -> dict:
    run_dir = Path(cfg.run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    use_ds = bool(cfg.deepspeed)

    # ---- model and optimizer: same init on every rank, then per-rank noise -----------------------------------
    _seed_everything(cfg.seed)
    model = FaceVAE(cfg.model)
    if cfg.channels_last and not use_ds:  # DeepSpeed flattens parameters and needs them contiguous
        model = model.to(memory_format=torch.channels_last)
    _seed_everything(cfg.seed + rank)

    # resume: rank 0 decides which checkpoint (all ranks must load the same one), then everyone loads it
    if is_main:
        ckpt.remove_stale_temps(run_dir)
    resume_from = ckpt.resolve_resume(run_dir, cfg.resume) if is_main else None
    resume_from = _broadcast(accelerator, str(resume_from) if resume_from else None)
    restored = ckpt.load_checkpoint(resume_from, rank) if resume_from else None
    if resume_from is None and cfg.resume == "none" and ckpt.latest_checkpoint(run_dir) is not None:
        raise UsageError(f"{run_dir} already has checkpoints (latest {ckpt.latest_checkpoint(run_dir).name}) and "
                         "--resume none would mix two runs in it; use a new --run-dir, or --resume auto to continue")
    state = restored.state if restored else ckpt.TrainState()
    if restored:
        _check_same_model(restored.path, cfg)
        model.load_state_dict(restored.model_state)
        if (state.world_size, state.batch_size) != (world, cfg.data.batch_size):
            # the position within the epoch counted other batches: continue from the next epoch (not bit-exact)
            info(f"resuming with {world} process(es) x batch {cfg.data.batch_size} instead of {state.world_size} x "
                 f"{state.batch_size}: data continues at the start of epoch {state.epoch + 1}")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.world_size, state.batch_size = world, cfg.data.batch_size

    if use_ds:
        from accelerate.utils import DummyOptim

        optimizer = DummyOptim(model.parameters(), lr=cfg.optim.lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                     weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if cfg.compile:
        model = torch.compile(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16" and not use_ds)
    if restored:
        if use_ds:
            _load_deepspeed_optimizer(model, restored.path, rank, world)
        elif restored.optimizer_state is not None:
            optimizer.load_state_dict(restored.optimizer_state)
        if restored.scaler_state:
            scaler.load_state_dict(restored.scaler_state)
        if restored.rng is not None:
            ckpt.set_rng_state(restored.rng)
        else:  # resumed with more ranks than wrote the checkpoint: fresh, distinct noise streams
            _seed_everything(cfg.seed + rank + 1000 * state.step)

    manager = ckpt.CheckpointManager(run_dir, cfg.ckpt_every, cfg.keep_last, rank=rank, world_size=world,
                                     barrier=accelerator.wait_for_everyone, gather=lambda x: _gather_objects(accelerator, x))
    metrics = _Metrics(run_dir / "metrics.jsonl", enabled=is_main, accelerator=accelerator)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_toml(cfg, run_dir / "config.toml")
        from facevae_dist.runinfo import environment_info

        env = environment_info(world)
        env.update(resumed_from=resume_from, device=str(device), distributed_type=str(accelerator.distributed_type))
        atomic_write_json(run_dir / "env.json", env)
        metrics.truncate_after(state.step)  # lines a killed run logged after its last checkpoint
    accelerator.wait_for_everyone()
    _init_trackers(accelerator, cfg)

    # ---- data: an endless stream of training batches that keeps (epoch, batch_in_epoch) in `state` ---------------
    corrupt = {"done": 0, "loader": None}  # corrupt samples the loader replaced (it warns about each one)

    def train_batches() -> Iterator[dict]:
        while True:
            loader = make_loader(cfg.data.shards, "train", cfg.data.batch_size, rank=rank, world_size=world,
                                 workers=cfg.data.workers, seed=cfg.data.seed, epoch=state.epoch,
                                 resampled=cfg.data.resampled, start_batch=state.batch_in_epoch)
            corrupt["loader"] = loader
            for batch in loader:
                state.batch_in_epoch += 1
                yield batch
            corrupt["done"] += loader.corrupt_count
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def val_batches() -> Iterator[dict]:
        loader = make_loader(cfg.data.shards, "val", cfg.data.batch_size, rank=rank, world_size=world, workers=0,
                             seed=cfg.data.seed, epoch=0, drop_last=False)
        for i, batch in enumerate(loader):
            if i >= cfg.val_batches:
                break
            yield batch

    if cfg.val_every:  # fail now, not at the first validation, if the val split is missing or too small
        make_loader(cfg.data.shards, "val", cfg.data.batch_size, rank=rank, world_size=world, drop_last=False)

    def validate() -> dict[str, float]:
        """Mean loss terms over cfg.val_batches batches per rank, z = mu (deterministic, no RNG drawn)."""
        raw_model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = torch.zeros((), device=device)
        with torch.no_grad():
            for batch in val_batches():
                image, mask = to_float(batch, device, channels_last=cfg.channels_last)
                with autocast():
                    out = raw_model(image, mask if cfg.model.mask_mode != "none" else None, sample=False)
                for k, v in compute_losses(out, image, mask, cfg.loss, cfg.model).items():
                    sums[k] = sums.get(k, 0) + v.detach() * image.shape[0]
                n += image.shape[0]
        raw_model.train()
        keys = sorted(sums)
        totals = accelerator.reduce(torch.stack([n] + [sums[k] for k in keys]) if keys else n[None], "sum")
        if totals[0] == 0:
            return {}
        return {k: (totals[i + 1] / totals[0]).item() for i, k in enumerate(keys)}

    def save_checkpoint(val_loss: float | None = None) -> None:
        # DeepSpeed shards the optimizer by rank: each rank writes its own part into the checkpoint
        opt_state = {"deepspeed": True} if use_ds else optimizer.state_dict()
        manager.save(model=raw_model, optimizer_state=opt_state, scaler_state=scaler.state_dict(), state=state,
                     cfg=cfg, val_loss=val_loss,
                     write_rank_files=(lambda d: _save_deepspeed_optimizer(model, d, rank)) if use_ds else None)

    # ---- preemption: a signal only sets a flag; the step boundary checks it on every rank ------------------------
    stop_requested = {"signal": None}

    def on_signal(signum, _frame):
        stop_requested["signal"] = signal.Signals(signum).name

    previous_handlers = {s: signal.signal(s, on_signal) for s in PREEMPT_SIGNALS}
    poisoned = _poisoned_steps()

    # ---- the loop ----------------------------------------------------------------------------------------------
    batches = train_batches()
    per_step = cfg.data.batch_size * cfg.grad_accum * world
    bad_in_a_row = 0
    last_val_step = last_ckpt_step = state.step if restored else -1
    stopped = "finished"
    t_window, n_window, t_start, steps_run = time.perf_counter(), 0, time.perf_counter(), 0
    info(f"training {cfg.hypothesis or 'custom config'} in {run_dir} on {world} x {device} "
         f"({accelerator.distributed_type}{', DeepSpeed' if use_ds else ''}, precision {cfg.mixed_precision})"
         + (f", resumed from {resume_from} at step {state.step}" if restored else ""))
    progress = make_progress()
    task = progress.add_task("train", total=cfg.max_steps, completed=state.step)
    try:
        with progress:
            while state.step < cfg.max_steps:
                step = state.step + 1
                bn_backup = [b.detach().clone() for b in raw_model.buffers()]
                step_terms: dict[str, torch.Tensor] = {}  # kept on the device; read only at log steps
                bad = False
                for _ in range(cfg.grad_accum):
                    batch = next(batches)
                    state.samples_seen += batch["image"].shape[0] * world
                    image, mask = to_float(batch, device, channels_last=cfg.channels_last)
                    if step in poisoned:
                        image = image * float("nan")
                    with accelerator.accumulate(model):
                        with autocast():
                            out = model(image, mask if cfg.model.mask_mode != "none" else None)
                        terms = compute_losses(out, image, mask, cfg.loss, cfg.model)
                        # every rank must agree before backward, or DDP's all-reduce would hang
                        bad = bad or _any_rank(accelerator, not torch.isfinite(terms["loss"]).item())
                        if not bad:
                            accelerator.backward(scaler.scale(terms["loss"]))
                            for k, v in terms.items():
                                step_terms[k] = step_terms.get(k, 0.0) + v.detach() / cfg.grad_accum
                if bad:
                    # skip the update; undo the BN running-stat updates the poisoned forward made
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for b, saved in zip(raw_model.buffers(), bn_backup):
                            b.copy_(saved)
                    bad_in_a_row += 1
                    state.bad_steps_total += 1
                    metrics.write({"step": step, "event": "non_finite_loss", "skipped": True,
                                   "bad_in_a_row": bad_in_a_row, "samples_seen": state.samples_seen})
                    if bad_in_a_row >= cfg.max_bad_steps:
                        state.step = step
                        good = ckpt.latest_checkpoint(run_dir)
                        raise RunError(
                            f"non-finite loss in {bad_in_a_row} steps in a row (steps {step - bad_in_a_row + 1}-{step}"
                            f"); stopped. Last good checkpoint: {good or 'none'}. Try a lower --set optim.lr, "
                            "--mixed-precision no, or check the data with `facevae shards verify`")
                else:
                    bad_in_a_row = 0
                    if not use_ds:
                        scaler.unscale_(optimizer)
                        _clip_gradients(raw_model, cfg.optim.clip, cfg.optim.clip_value)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                state.step = step
                steps_run += 1
                n_window += per_step

                # ---- log / validate / sample / checkpoint at the step boundary ----------------------------------
                if step % cfg.log_every == 0 and not bad:
                    now = time.perf_counter()
                    reduced = _mean_over_ranks(accelerator, step_terms)
                    ips = n_window / max(now - t_window, 1e-9)
                    t_window, n_window = now, 0
                    n_corrupt = corrupt["done"] + (corrupt["loader"].corrupt_count if corrupt["loader"] else 0)
                    metrics.write({"step": step, **reduced, "images_per_s": round(ips, 2), "lr": cfg.optim.lr,
                                   "samples_seen": state.samples_seen, "epoch": state.epoch,
                                   **({"corrupt_samples_rank0": n_corrupt} if n_corrupt else {})})
                    progress.update(task, description=f"train loss {reduced['loss']:.4f} {ips:.1f} img/s")
                val_loss = None
                if cfg.val_every and step % cfg.val_every == 0:
                    val_loss = _validate_and_keep_best(validate, metrics, manager, raw_model, state, cfg)
                    last_val_step = step
                if cfg.sample_every and step % cfg.sample_every == 0 and is_main:
                    _write_sample_grid(raw_model, val_batches, to_float, device, cfg, run_dir / "samples" / f"step_{step}.png")
                if manager.due(step):
                    save_checkpoint(val_loss)
                    last_ckpt_step = step
                progress.update(task, completed=step)

                if stop_requested["signal"]:
                    accelerator.set_trigger()
                if accelerator.check_trigger():
                    stopped = "preempted"
                    break

        # ---- end of run: final validation and checkpoint (also on preemption) -----------------------------------
        if stopped == "finished" and cfg.val_every and last_val_step != state.step:
            _validate_and_keep_best(validate, metrics, manager, raw_model, state, cfg)
        if last_ckpt_step != state.step:
            save_checkpoint()
        if stopped == "preempted":
            info(f"stopped by {stop_requested['signal'] or 'a signal on another rank'} at step {state.step}; "
                 f"checkpoint saved, rerun the same command to resume")
    finally:
        batches.close()  # stops DataLoader workers now rather than at garbage collection
        for s, h in previous_handlers.items():
            signal.signal(s, h)
        accelerator.end_training()

    wall = time.perf_counter() - t_start
    summary = {
        "run_dir": str(run_dir), "step": state.step, "stopped": stopped,
        "signal": stop_requested["signal"],  # which signal stopped it (None: finished, or another rank's signal)
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "best_step": state.best_step if state.best_step >= 0 else None, "samples_seen": state.samples_seen,
        "bad_steps": state.bad_steps_total, "world_size": world, "wall_s": round(wall, 2),
        "images_per_s": round(steps_run * per_step / wall, 2) if wall > 0 else None,
    }
    if is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


# ---- setup helpers ----------------------------------------------------------------------------------------------


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # train() may run several times in one process (tests, a debug sweep): start from a clean Accelerate state.
    # The process group (PartialState) is kept: it belongs to the launcher.
    AcceleratorState._reset_state(reset_partial_state=False)
    kwargs = {"gradient_accumulation_steps": cfg.grad_accum, "log_with": _trackers() if cfg.tensorboard else None,
              "project_dir": cfg.run_dir}
    if cfg.deepspeed:
        plugin, mixed = _deepspeed_plugin(cfg)
        _ensure_single_process_env()
        if not torch.cuda.is_available():
            _skip_deepspeed_shm_jit()
        return Accelerator(deepspeed_plugin=plugin, mixed_precision=mixed, **kwargs)
    # precision is applied by the loop (autocast + GradScaler), see the module docstring
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", **kwargs)


def _skip_deepspeed_shm_jit() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at init (30-80 s, needs gcc, toolchain.md §1).
    It only speeds up intra-node CPU collectives, which gloo does anyway, so mark it unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _trackers() -> list[str] | None:
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else None


def _init_trackers(accelerator, cfg: TrainConfig) -> None:
    if accelerator.log_with:
        flat = {f"{k}.{kk}" if isinstance(v, dict) else k: (str(vv) if isinstance(v, dict) else str(v))
                for k, v in cfg.to_dict().items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
        accelerator.init_trackers("tensorboard", config=flat)


def _ensure_single_process_env() -> None:
    """DeepSpeed initialises torch.distributed even for one process; a plain `python` run has no launcher env."""
    if "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _deepspeed_plugin(cfg: TrainConfig):
    """DeepSpeedPlugin from the JSON (explicit numbers only); the batch, accumulation, clipping, optimizer and
    precision numbers are filled from the TrainConfig so that there is one source of truth for them."""
    from accelerate.utils import DeepSpeedPlugin

    path = Path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
        ds.pop("_comment", None)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    autos = [k for k, v in _walk(ds) if v == "auto"]
    if autos:
        raise UsageError(f"{path}: 'auto' values ({', '.join(autos)}) are not allowed; write explicit numbers")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UsageError(f"{path}: zero_optimization.stage={stage} is not supported (use 1 or 2)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.grad_accum * world
    ds["gradient_clipping"] = cfg.optim.clip_value if cfg.optim.clip == "global" else 0.0
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    opt.setdefault("params", {}).update(lr=cfg.optim.lr, betas=list(cfg.optim.betas), eps=cfg.optim.eps,
                                        weight_decay=cfg.optim.weight_decay, torch_adam=True, adam_w_mode=False)
    # DeepSpeed's bf16 mode casts the whole module, BatchNorm statistics included, which BN cannot run with; keep
    # fp32 weights in the engine and get bf16 compute from the loop's autocast instead.
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.run_dir) / "deepspeed.json", ds)  # what actually ran
    return DeepSpeedPlugin(hf_ds_config=ds), "no"


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _broadcast(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _gather_objects(accelerator, value) -> list:
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _check_same_model(path: Path, cfg: TrainConfig) -> None:
    saved = json.loads((path / "config.json").read_text()).get("model", {})
    if saved != cfg.model.to_dict():
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in cfg.model.to_dict().items() if saved.get(k) != v)
        raise UsageError(f"{path} was trained with a different model ({diff}); use a new --run-dir, or the same "
                         "model settings to resume")


# ---- step helpers -----------------------------------------------------------------------------------------------


def _any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=accelerator.device)
    return accelerator.reduce(t, "sum").item() > 0


def _mean_over_ranks(accelerator, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(terms, key=lambda k: (k != "loss", k))
    t = torch.stack([terms[k].float() for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "mean")
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def _clip_gradients(model: torch.nn.Module, mode: str, value: float) -> None:
    """"per-tensor": Keras' clipnorm, g * c / max(||g||, c) for each tensor (what the paper's Adam did);
    "global": torch's clip_grad_norm_ over all gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or mode == "none":
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(model.parameters(), value)
        return
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [value / torch.clamp(n, min=value) for n in norms])


def _poisoned_steps() -> set[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise UsageError(f"{INJECT_NAN_ENV}={raw!r}: expected comma-separated step numbers") from None


def _validate_and_keep_best(validate, metrics, manager, raw_model, state, cfg) -> float | None:
    result = validate()
    if not result:
        info("validation skipped: the val split yielded no batches")
        return None
    metrics.write({"step": state.step, "split": "val", **{f"val_{k}": v for k, v in result.items()}})
    val_loss = result["loss"]
    if math.isfinite(val_loss) and val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step = val_loss, state.step
        manager.save_best(model=raw_model, state=state, cfg=cfg, val_loss=val_loss)
    return val_loss


class _Metrics:
    """metrics.jsonl (rank 0 only): one JSON object per line; also forwarded to Accelerate's trackers."""

    def __init__(self, path: Path, enabled: bool, accelerator):
        self.path, self.enabled, self.accelerator = path, enabled, accelerator

    def write(self, record: dict) -> None:
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))
                                  and not isinstance(v, bool) and k != "step"}, step=record["step"])
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (by a run that died before its next checkpoint), so a resumed run's
        metrics read exactly like an uninterrupted one's."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


# ---- sample grid ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _write_sample_grid(model: FaceVAE, val_batches, to_float, device, cfg: TrainConfig, path: Path, n: int = 8) -> None:
    """Rows of input | reconstruction | predicted mask | ground-truth mask (checkerboard where a model has no mask
    head). The reconstruction is the inference output (z = mu; mask+decoder composites with its predicted mask)."""
    import io

    import numpy as np
    from PIL import Image

    batch = next(iter(val_batches()), None)
    if batch is None:
        return
    image, mask = to_float(batch, device)
    image, mask = image[:n], mask[:n]
    model.eval()
    out = model.reconstruct(image.contiguous(memory_format=torch.channels_last) if cfg.channels_last else image,
                            mask if cfg.model.mask_mode == "mask" else None)
    model.train()
    if out.mask_pred is not None:
        pred = out.mask_pred
    else:  # no mask head: a checkerboard, so it cannot be mistaken for an undecided (0.5) prediction
        h, w = mask.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pred = (((yy // 4 + xx // 4) % 2) * 0.5 + 0.25).to(mask)[None, None].expand_as(mask)
    cols = [image, out.recon, pred.expand_as(image), mask.expand_as(image)]
    rows = torch.cat([torch.cat([c[i].float().cpu() for c in cols], dim=2) for i in range(image.shape[0])], dim=1)
    arr = (rows.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ---- DeepSpeed optimizer state: saved per rank, read back with weights_only=True and a 3-type allow-list -------


def _deepspeed_safe_types() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _save_deepspeed_optimizer(engine, directory: Path, rank: int) -> None:
    torch.save(engine.optimizer.state_dict(), directory / f"ds_optimizer_rank{rank}.pt")


def _load_deepspeed_optimizer(engine, path: Path, rank: int, world: int) -> None:
    """ZeRO 1/2 state of this rank. Not DeepSpeed's load_checkpoint: it unpickles with weights_only=False."""
    file = path / f"ds_optimizer_rank{rank}.pt"
    if not file.is_file():
        raise RunError(f"{file}: missing; a DeepSpeed checkpoint resumes only with the same number of processes "
                       "(or start a new run dir)")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_types()):
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{file}: unreadable DeepSpeed optimizer state ({type(exc).__name__}: {exc})") from None
    # rigid (non-elastic) ZeRO checkpoints read only their own rank's entry; fp32 master weights come from it
    engine.optimizer.load_state_dict([sd] * world, load_optimizer_states=True, load_from_fp32_weights=True)


# ---- `python -m facevae_dist.train` -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point for launchers (torchrun / accelerate launch): the same arguments as `facevae train`."""
    from facevae_dist.cli import _Parser
    from facevae_dist.cli.train import add_train_arguments, config_from_args
    from facevae_dist.errors import FaceVAEError

    parser = _Parser(prog="python -m facevae_dist.train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = train(config_from_args(args))
    except FaceVAEError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"facevae train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def _exit_without_teardown(rc: int) -> None:
    """Under a multi-process launcher, gloo's threads occasionally abort the interpreter during teardown
    ("terminate called without an active exception", SIGABRT; toolchain.md §2), after every file is written, and
    the launcher then reports the whole run as failed. Everything is saved by now: leave without that teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_teardown(rc)
    sys.exit(rc)
