"""The training loop, top to bottom (nanoGPT style): setup, resume, a loop over `train_step`, teardown.

Distributed through Accelerate: plain DDP (gloo on CPU via Accelerator(cpu=True), NCCL on GPU) or DeepSpeed ZeRO
1/2 from a JSON in launch/. Only the model goes through accelerator.prepare: the batches come from
data/batches.py, which already splits by rank (Accelerate's dispatcher would drop or duplicate samples of an
iterable dataset to even out the ranks), and the optimizer stays ours so that it can skip a step on the device (train_step.py).

Mixed precision is done by the step with torch.autocast + GradScaler (fp16 only) rather than by Accelerate, because
Accelerate silently runs fp16 as fp32 on CPU; the losses are fp32 under autocast anyway (losses.py).

Host syncs: a step that does not log reads nothing back from the device (train_step.py). The skipped-step flags
are read at "boundary" steps only (log, validation, sample grid, checkpoint, end), so a run of cfg.max_bad_steps
non-finite steps is detected at the next boundary step, not at once. A preemption signal is checked every step on
one process (a Python flag, free) and every STOP_CHECK_EVERY steps and at log steps on several (a tensor
all-reduce: every rank must stop at the same step).

Exact resume: a checkpoint holds weights with BN statistics, Adam state, grad scaler, every rank's RNG states and
the data position (epoch, batches consumed); validation and sample grids draw no random numbers from the training
streams (val_sampling="sample" uses its own seed (seed, step)). Hence a run killed at any step and resumed produces
the same per-step losses and final weights as an uninterrupted one on CPU (tests/test_train.py kills a real
process to check); on GPUs only with --deterministic (cuDNN autotuning picks kernels per process otherwise).

The pieces: setup() builds a TrainingRun (model, optimizer, data, run directory), _restore() puts a checkpoint back
into it, run_loop() steps it (train_step.py does one step); the loop's helpers are in train_parts.py and the
Accelerate/DeepSpeed plumbing in distributed.py. Run it as `facevae train ...`, `python -m facevae_dist train ...`,
`torchrun ... -m facevae_dist train ...` or `accelerate launch --config_file launch/<profile>.yaml -m facevae_dist
train ...` (same arguments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim

from facevae_dist import outputs, presets
from facevae_dist.config import TrainConfig, load_toml, save_toml
from facevae_dist.data.batches import open_train_batches
from facevae_dist.data.shards import read_manifest, shards_identity
from facevae_dist.errors import RunError, UsageError
from facevae_dist.fileio import atomic_write_json
from facevae_dist.model import FaceVAE
from facevae_dist.perf import cpu_has_native_bf16, keep_freed_memory
from facevae_dist.progress import ProgressLines, info, log_to, make_progress, progress_every
from facevae_dist.runinfo import environment_info
from facevae_dist.seeds import derived_seed
from facevae_dist.train import checkpoint as ckpt
from facevae_dist.train.distributed import (
    RankWatch,
    broadcast_object,
    gather_objects,
    is_collective_timeout,
    load_deepspeed_optimizer,
    make_accelerator,
    mean_over_ranks,
    resolve_mixed_precision,
    save_deepspeed_optimizer,
    seed_everything,
    sync_buffers_for_deepspeed,
)
from facevae_dist.train.launch_check import warn_if_launch_mismatch
from facevae_dist.train.monitor import BadSteps, CostClock, Metrics, StopSignal, Throughput, poisoned_steps
from facevae_dist.train.optim import build_optimizer
from facevae_dist.train.samples import write_sample_grid
from facevae_dist.train.step import TrainStep
from facevae_dist.train.tracking import describe as describe_trackers
from facevae_dist.train.tracking import init_trackers, log_image, resolve_log_with
from facevae_dist.train.validation import Validator

# What a resumed run may not change: it would mix two experiments in one run dir (and in best/). The data set
# (data.shards) may change only with --allow-new-shards (_check_same_data).
TRAINED_FIELDS = ("hypothesis", "seed", "loss", "model", "optim.eps_form")


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns {"run_dir", "step", "best_val_loss", "best_step", "stopped", ...}.
    stopped: "finished" (max_steps reached) | "preempted" (SIGTERM/SIGUSR1/SIGUSR2: checkpoint saved first).
    Raises RunError after cfg.max_bad_steps non-finite losses in a row (the last good checkpoint stays)."""
    precision_was_auto = cfg.mixed_precision == "auto"
    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    _check_inputs(cfg)
    requested_trackers = cfg.log_with
    cfg = dataclasses.replace(cfg, log_with=resolve_log_with(cfg.log_with))  # recorded resolved, as the precision
    keep_freed_memory()  # glibc would otherwise mmap/munmap every large activation each step (see perf.py)
    with _backends(cfg):
        accelerator = make_accelerator(cfg)
        watch = RankWatch(accelerator.process_index, accelerator.num_processes, cfg.dist_timeout_s)
        try:
            # one training process per run dir (rank 0 holds the lock until train() returns); rank 0 also appends
            # what it prints to the run's train.log
            with (ckpt.RunDirLock(Path(cfg.run_dir)) if accelerator.is_main_process else contextlib.nullcontext(),
                  log_to(Path(cfg.run_dir) / "train.log", enabled=accelerator.is_main_process,
                         title=f"train {cfg.hypothesis or 'custom config'}")):
                run = setup(cfg, accelerator)
                watch.state = run.state
                if run.is_main:
                    info(describe_trackers(cfg, requested_trackers))
                    warn_if_launch_mismatch(run.world)
                if precision_was_auto and cfg.mixed_precision == "no" and run.device.type == "cpu" and run.is_main:
                    _hint_native_bf16()
                return run_loop(run)
        except RuntimeError as exc:  # a collective past cfg.dist_timeout_s: say which rank went silent
            if watch.store is not None and is_collective_timeout(exc):
                raise watch.stalled() from exc
            raise
        finally:
            watch.close()


def _check_inputs(cfg: TrainConfig) -> None:
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is an existing file, not a directory; pass a directory path")
    # a run directory (this one, resumed) or a new folder; never shards, a checkpoint, an export, or inside them
    outputs.refuse_to_write(run_dir, "--run-dir", "the run's checkpoints, config.toml and metrics.jsonl",
                            allowed=(outputs.RUN_DIR,))
    if cfg.deepspeed and cfg.grad_accum > 1:
        raise UsageError(f"grad_accum={cfg.grad_accum} with DeepSpeed is refused: a skipped non-finite step would "
                         "leave its accumulated gradients in the engine; use --grad-accum 1 (raise --batch-size "
                         "instead)")
    image_size = int(read_manifest(cfg.data.shards).get("image_size", cfg.model.image_size))
    if image_size != cfg.model.image_size:
        raise UsageError(f"{cfg.data.shards} holds {image_size}px images but model.image_size="
                         f"{cfg.model.image_size}; pass --set model.image_size={image_size}")


@functools.cache
def _hint_native_bf16() -> None:
    """Once per process, when precision was left to "auto" (fp32 on a CPU) on a CPU with bf16 in hardware."""
    if cpu_has_native_bf16():
        info("this CPU does bf16 in hardware: --mixed-precision bf16 trained the paper's model about 1.6x faster "
             "here (`facevae bench train`; autocast, fp32 weights and losses)")


# ---- setup --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingRun:
    """Everything setup() builds and the loop steps."""
    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # what the step calls: DDP-wrapped, or the DeepSpeed engine
    raw_model: FaceVAE  # the module itself (saved, validated, sampled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    state: ckpt.TrainState
    resumed_from: str | None
    new_data: dict | None = None  # {"shards", "previous_shards", ...}: a resume switched data sets (allowed)
    stale: dict | None = None  # what the resume made stale (checkpoint.stale_after_resume), retired by rank 0
    train_step: TrainStep = None
    manager: ckpt.CheckpointManager = None
    metrics: Metrics = None
    val: Validator = None
    batches: object = None

    rank = property(lambda self: self.accelerator.process_index)
    world = property(lambda self: self.accelerator.num_processes)
    device = property(lambda self: self.accelerator.device)
    is_main = property(lambda self: self.accelerator.is_main_process)
    use_ds = property(lambda self: bool(self.cfg.deepspeed))


def setup(cfg: TrainConfig, accelerator: Accelerator) -> TrainingRun:
    """Model (same init on every rank, then per-rank noise), optimizer, precision, the checkpoint to resume from,
    the run directory, metrics, validation and the training batches."""
    rank, world, use_ds = accelerator.process_index, accelerator.num_processes, bool(cfg.deepspeed)
    seed_everything(cfg.seed)
    model = FaceVAE(cfg.model)
    if cfg.channels_last and not use_ds:  # DeepSpeed flattens parameters and needs them contiguous
        model = model.to(memory_format=torch.channels_last)
    seed_everything(derived_seed(cfg.seed, rank))
    restored, new_data = _checkpoint_to_resume(cfg, accelerator)
    if use_ds:
        model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters(), lr=cfg.optim.lr))
    else:
        optimizer = build_optimizer(model.parameters(), cfg.optim)  # ours: skips on the device (found_inf)
        model = accelerator.prepare(model)
    raw_model = accelerator.unwrap_model(model) if use_ds else getattr(model, "module", model)  # no deepspeed import
    run = TrainingRun(cfg=cfg, accelerator=accelerator, model=model, raw_model=raw_model, optimizer=optimizer,
               scaler=torch.amp.GradScaler(accelerator.device.type, enabled=cfg.mixed_precision == "fp16"
                                           and not use_ds),
               amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision),
               state=restored.state if restored else ckpt.TrainState(),
               resumed_from=str(restored.path) if restored else None, new_data=new_data)
    if restored:
        _restore(run, restored)
        run.stale = _stale_after_resume(run)
    run.state.world_size, run.state.batch_size = world, cfg.data.batch_size
    run.train_step = TrainStep(model=model, raw_model=raw_model, optimizer=optimizer, scaler=run.scaler,
                               accelerator=accelerator, cfg=cfg, amp_dtype=run.amp_dtype, use_deepspeed=use_ds)
    run.manager = ckpt.CheckpointManager(Path(cfg.run_dir), cfg.ckpt_every, cfg.keep_last, rank=rank, world_size=world,
                                         barrier=accelerator.wait_for_everyone,
                                         gather=functools.partial(gather_objects, accelerator),
                                         data=shards_identity(cfg.data.shards))
    run.metrics = Metrics(Path(cfg.run_dir) / "metrics.jsonl", enabled=run.is_main, accelerator=accelerator)
    _prepare_run_dir(run)
    run.val = Validator(cfg, raw_model, accelerator, run.amp_dtype)
    if cfg.val_every:  # fail now, not at the first validation, if the val split is missing or too small
        next(run.val.batches(1), None)
    run.batches = open_train_batches(cfg.data, rank=rank, world=world, device=accelerator.device,
                                     epoch=run.state.epoch, batch_in_epoch=run.state.batch_in_epoch,
                                     channels_last=cfg.channels_last)
    return run


def _checkpoint_to_resume(cfg: TrainConfig, accelerator: Accelerator) -> tuple[ckpt.Restored | None, dict | None]:
    """Rank 0 picks the checkpoint (every rank must load the same one); each rank reads it. Also returns the
    switch of data sets the resume makes (None: the same shards; only with --allow-new-shards)."""
    run_dir, is_main = Path(cfg.run_dir), accelerator.is_main_process
    if is_main:
        ckpt.remove_stale_temps(run_dir)
    resume_from, verified = ckpt.resume_checkpoint(run_dir, cfg.resume) if is_main else (None, None)
    resume_from = broadcast_object(accelerator, str(resume_from) if resume_from else None)
    if resume_from is None:
        if cfg.resume == "none" and ckpt.latest_checkpoint(run_dir) is not None:
            raise UsageError(f"{run_dir} already has checkpoints (latest {ckpt.latest_checkpoint(run_dir).name}) "
                             "and --resume none would mix two runs in it; use a new --run-dir, or --resume auto to "
                             "continue")
        return None, None
    _check_same_experiment(Path(resume_from), cfg)
    new_data = _check_same_data(Path(resume_from), cfg)
    # rank 0 has read the checkpoint whole already when --resume auto checked that it loads
    restored = verified if verified is not None else ckpt.load_checkpoint(resume_from, accelerator.process_index)
    return restored, new_data


def _restore(run: TrainingRun, restored: ckpt.Restored) -> None:
    """Weights, optimizer, grad scaler, RNG streams and data position from a checkpoint, into a prepared run."""
    cfg, state = run.cfg, run.state
    run.raw_model.load_state_dict(restored.model_state)
    if run.new_data:  # the data position counted the previous shards' batches
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    elif (state.world_size, state.batch_size) != (run.world, cfg.data.batch_size):
        # the position within the epoch counted other batches: continue from the next epoch (not bit-exact)
        info(f"resuming with {run.world} process(es) x batch {cfg.data.batch_size} instead of {state.world_size} x "
             f"{state.batch_size}: data continues at the start of epoch {state.epoch + 1}")
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if run.use_ds:
        load_deepspeed_optimizer(run.model, restored.path, run.rank, run.world)
    elif restored.optimizer_state is not None:
        run.optimizer.load_state_dict(restored.optimizer_state)
    if restored.scaler_state:
        run.scaler.load_state_dict(restored.scaler_state)
    if restored.rng is not None:
        ckpt.set_rng_state(restored.rng)
    else:  # resumed with more ranks than wrote the checkpoint: fresh, distinct noise streams
        seed_everything(derived_seed(cfg.seed, run.rank, state.step))


def _prepare_run_dir(run: TrainingRun) -> None:
    """Rank 0 writes config.toml and env.json and drops metrics lines past the checkpoint; every rank waits."""
    run_dir = Path(run.cfg.run_dir)
    if run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if run.stale:  # before anything is saved: the abandoned timeline's checkpoints must not be picked or pruned
            ckpt.retire_stale(run_dir, run.stale, run.state.step)
        # which checkpoint to start from and the permission to switch shards are this command's, not the run's:
        # `--config config.toml` later continues from the newest checkpoint, and another switch is asked for again
        save_toml(dataclasses.replace(run.cfg, resume="auto", allow_new_shards=False), run_dir / "config.toml")
        env = environment_info(run.world)
        env.update(resumed_from=run.resumed_from, device=str(run.device),
                   distributed_type=str(run.accelerator.distributed_type), new_shards=run.new_data)
        atomic_write_json(run_dir / "env.json", env)
        run.metrics.truncate_after(run.state.step)  # lines a killed run (or an abandoned timeline) logged later
    run.accelerator.wait_for_everyone()
    init_trackers(run.accelerator, run.cfg, run.state.step, run.world)
    if run.new_data:
        run.metrics.write({"step": run.state.step, "event": "new_shards", **run.new_data})
    for warning in presets.preset_warnings(run.cfg, run.world):
        info(f"warning: {warning}")


@contextlib.contextmanager
def _backends(cfg: TrainConfig):
    """--deterministic: deterministic cuDNN/cuBLAS kernels (cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its
    first call); otherwise let cuDNN autotune convolutions (faster, but kernel choice may differ per process).
    These switches are process-global: the caller's settings come back when the run ends."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    cudnn.deterministic, cudnn.benchmark = cfg.deterministic, not cfg.deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        cudnn.deterministic, cudnn.benchmark = saved[1], saved[2]


def _check_same_data(path: Path, cfg: TrainConfig) -> dict | None:
    """None when the checkpoint at `path` was trained on the shards cfg names: the same folder (resolved) with the
    same content (the fingerprint its meta.json recorded). Otherwise the switch, allowed only with
    cfg.allow_new_shards (--allow-new-shards); without it, one line naming both folders. The same content moved
    elsewhere needs the flag too: a path is what the run records and what its evals default to."""
    meta = ckpt.read_meta(path)
    now = shards_identity(cfg.data.shards)
    then = meta.get("data") or {}
    if not then and (path / ckpt.CONFIG_FILE).is_file():  # checkpoints from before meta.json recorded the data
        saved = load_toml(path / ckpt.CONFIG_FILE).data.shards
        if saved == cfg.data.shards:
            return None
        then = {"path": str(Path(saved).resolve()), "fingerprint": None}
    if not then or (then["path"] == now["path"] and then.get("fingerprint") in (None, now["fingerprint"])):
        return None
    if then["path"] == now["path"]:
        what = "were rebuilt since (other content at the same path)"
    elif then.get("fingerprint") == now["fingerprint"]:
        what = f"now hold what {then['path']} held (the same content, moved)"
    else:
        what = f"are not {then['path']}, which it was trained on"
    if not cfg.allow_new_shards:
        raise UsageError(f"{path.parent.parent} was trained on {then['path']}, and --shards {now['path']} {what}; "
                         "a resume keeps its data set: pass the run's own --shards, or add --allow-new-shards to "
                         "continue on these (best/ then restarts)")
    info(f"--allow-new-shards: continuing {path.parent.parent} on {now['path']} (trained on {then['path']} until "
         f"step {meta['step']}); data restarts at the next epoch, best/ restarts")
    return {"shards": now["path"], "fingerprint": now["fingerprint"], "previous_shards": then["path"],
            "previous_fingerprint": then.get("fingerprint")}


def _stale_after_resume(run: TrainingRun) -> dict | None:
    """What this resume makes stale (checkpoint.stale_after_resume), found by rank 0 and known on every rank:
    when best/ is retired, every rank's best-so-far restarts (they decide together whether to save best/)."""
    stale = ckpt.stale_after_resume(Path(run.cfg.run_dir), run.state.step, bool(run.new_data)) if run.is_main \
        else None
    stale = broadcast_object(run.accelerator, stale)
    if stale and stale["best"]:
        run.state.best_val_loss, run.state.best_step = math.inf, -1
    return stale


def _check_same_experiment(path: Path, cfg: TrainConfig) -> None:
    """Refuse to resume when what is trained changed; run-length knobs (max_steps, intervals, ...) may change."""
    saved_file = path / ckpt.CONFIG_FILE
    if not saved_file.is_file():
        return
    saved, now = load_toml(saved_file).to_dict(), cfg.to_dict()
    for field in TRAINED_FIELDS:
        old, new = saved, now
        for part in field.split("."):
            old, new = old.get(part), new.get(part)
        if old != new:
            if isinstance(old, dict):
                diff = ", ".join(f"{field}.{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v)
            else:
                diff = f"{field}: {old!r} -> {new!r}"
            raise UsageError(f"{path.parent.parent} was trained with other settings ({diff}); what is trained cannot "
                             "change on resume: use a new --run-dir, or the run's own settings (see its config.toml)")


# ---- the loop -----------------------------------------------------------------------------------------------------


def run_loop(run: TrainingRun) -> dict:
    """Step until max_steps or a preemption signal; log, validate, sample and checkpoint at step boundaries (the
    only host reads); then the final validation and checkpoint. Returns the run's summary."""
    cfg, state = run.cfg, run.state
    clock, rate = CostClock(state, run.world), Throughput()
    bad_steps, stop = BadSteps(cfg, state, run.metrics, run.device), StopSignal(run.accelerator, cfg.log_every)
    poisoned = poisoned_steps()
    per_step = cfg.data.batch_size * cfg.grad_accum * run.world
    last_val_step = last_ckpt_step = state.step if run.resumed_from else -1
    stopped, steps_run, t_start = "finished", 0, time.perf_counter()
    _say_what_runs(run)
    progress = make_progress()
    lines = ProgressLines(cfg.max_steps, state.step, progress_every(cfg.progress_every))  # for logs: no bar there
    task = progress.add_task("train", total=cfg.max_steps, completed=state.step)
    try:
        with progress, stop:
            while state.step < cfg.max_steps:
                step = state.step + 1
                micro_batches = [next(run.batches) for _ in range(cfg.grad_accum)]
                if step in poisoned:
                    micro_batches = [(image * float("nan"), mask) for image, mask in micro_batches]
                terms, bad = run.train_step(micro_batches)
                state.step, state.epoch, state.batch_in_epoch = step, run.batches.epoch, run.batches.batch_in_epoch
                state.samples_seen += per_step
                bad_steps.record(step, bad)
                steps_run += 1
                rate.add(per_step)

                # ---- log / validate / sample / checkpoint at the step boundary (the only host reads) ------------
                log_now = step % cfg.log_every == 0 or step == cfg.max_steps  # the last step always logs
                val_now = bool(cfg.val_every) and step % cfg.val_every == 0
                sample_now = bool(cfg.sample_every) and step % cfg.sample_every == 0
                ckpt_now = run.manager.due(step)
                if log_now or val_now or sample_now or ckpt_now:
                    bad_steps.drain()  # raises RunError after max_bad_steps in a row
                if log_now and not bad_steps.last_was_bad:
                    loss = _log_train_step(run, terms, rate.images_per_s(), clock)
                    progress.update(task, description=f"train loss {loss:.4f} {rate.last:.1f} img/s")
                    lines.logged(loss, rate.last)
                lines.step(step, log_now, last=step == cfg.max_steps)
                val_loss = None
                if val_now:
                    val_loss, last_val_step = _validate_and_keep_best(run), step
                if sample_now and run.is_main:
                    grid = write_sample_grid(run.raw_model, run.val.batches(1), cfg,
                                             Path(cfg.run_dir) / "samples" / f"step_{step}.png")
                    if grid is not None:
                        log_image(run.accelerator, "samples/reconstructions", grid, step)
                if ckpt_now:
                    _save_checkpoint(run, clock, val_loss)
                    last_ckpt_step = step
                progress.update(task, completed=step)
                if run.batches.failure:
                    stop.request("the data loader's failure")
                if stop.requested(step, log_now):
                    stopped = "preempted"
                    break

        # ---- end of run: final validation and checkpoint (also on preemption) -----------------------------------
        bad_steps.drain()
        if stopped == "finished" and cfg.val_every and last_val_step != state.step:
            _validate_and_keep_best(run)
        if last_ckpt_step != state.step:
            _save_checkpoint(run, clock)
        if run.batches.failure:
            raise RunError(f"{run.batches.failure}; stopped at step {state.step} with a checkpoint: rerun the same "
                           "command to resume")
        if stopped == "preempted":
            info(f"stopped by {stop.signal or 'a signal on another rank'} at step {state.step}; "
                 f"checkpoint saved, rerun the same command to resume")
    finally:
        _close(run)
    return _summary(run, stopped, stop.signal, steps_run * per_step, time.perf_counter() - t_start)


def _say_what_runs(run: TrainingRun) -> None:
    info(f"training {run.cfg.hypothesis or 'custom config'} in {run.cfg.run_dir} on {run.world} x {run.device} "
         f"({run.accelerator.distributed_type}{', DeepSpeed' if run.use_ds else ''}, precision "
         f"{run.cfg.mixed_precision}, data {run.batches.placement})"
         + (f", resumed from {run.resumed_from} at step {run.state.step}" if run.resumed_from else ""))


def _log_train_step(run: TrainingRun, terms: dict[str, torch.Tensor], images_per_s: float, clock: CostClock) -> float:
    """One metrics line for this step: loss terms averaged over ranks, speed, data position, cost so far."""
    state = run.state
    reduced = mean_over_ranks(run.accelerator, terms)
    clock.update()
    corrupt = run.batches.corrupt_count
    run.metrics.write({"step": state.step, **reduced, "images_per_s": round(images_per_s, 2), "lr": run.cfg.optim.lr,
                       "samples_seen": state.samples_seen, "epoch": state.epoch,
                       "train_s": round(state.train_seconds, 2), "cpu_s": round(state.cpu_seconds, 2),
                       **({"corrupt_samples_rank0": corrupt} if corrupt else {})})
    return reduced["loss"]


def _validate_and_keep_best(run: TrainingRun) -> float | None:
    state = run.state
    sync_buffers_for_deepspeed(run.raw_model, run.use_ds, run.world)
    result = run.val.run(state.step)
    if not result:
        info("validation skipped: the val split yielded no batches")
        return None
    run.metrics.write({"step": state.step, "split": "val", **{f"val_{k}": v for k, v in result.items()}})
    if math.isfinite(result["loss"]) and result["loss"] < state.best_val_loss:
        state.best_val_loss, state.best_step = result["loss"], state.step
        run.manager.save_best(model=run.raw_model, state=state, cfg=run.cfg, val_loss=result["loss"])
    return result["loss"]


def _save_checkpoint(run: TrainingRun, clock: CostClock, val_loss: float | None = None) -> None:
    clock.update()
    sync_buffers_for_deepspeed(run.raw_model, run.use_ds, run.world)
    # DeepSpeed shards the optimizer by rank: each rank writes its own part into the checkpoint
    run.manager.save(model=run.raw_model, optimizer_state={"deepspeed": True} if run.use_ds
                     else run.optimizer.state_dict(), scaler_state=run.scaler.state_dict(), state=run.state,
                     cfg=run.cfg, val_loss=val_loss,
                     write_rank_files=functools.partial(_save_rank_files, run) if run.use_ds else None)


def _save_rank_files(run: TrainingRun, directory: Path) -> None:
    save_deepspeed_optimizer(run.model, directory, run.rank)


def _close(run: TrainingRun) -> None:
    run.batches.close()  # stops DataLoader workers now rather than at garbage collection
    # Not accelerator.end_training(): it also destroys the process group, which belongs to the launcher (and
    # evaluation reuses it). Destroying a gloo group right after the last collective deadlocks now and then:
    # its destructor joins the worker threads holding the GIL while a worker, still releasing that
    # collective's tensors, waits for the GIL (seen on rank 1 of 2-rank runs on a loaded machine).
    for tracker in run.accelerator.trackers:
        tracker.finish()


def _summary(run: TrainingRun, stopped: str, signal_name: str | None, images: int, wall: float) -> dict:
    state = run.state
    summary = {
        "run_dir": str(run.cfg.run_dir), "step": state.step, "stopped": stopped,
        "signal": signal_name,  # which signal stopped it (None: finished, or another rank's signal)
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "best_step": state.best_step if state.best_step >= 0 else None, "samples_seen": state.samples_seen,
        "bad_steps": state.bad_steps_total, "world_size": run.world, "wall_s": round(wall, 2),
        "images_per_s": round(images / wall, 2) if wall > 0 else None,
    }
    if run.is_main:
        atomic_write_json(Path(run.cfg.run_dir) / "summary.json", summary)
    return summary
