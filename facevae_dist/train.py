"""The training loop, top to bottom (nanoGPT style): setup, resume, a loop over `train_step`, teardown.

Distributed through Accelerate: plain DDP (gloo on CPU via Accelerator(cpu=True), NCCL on GPU) or DeepSpeed ZeRO
1/2 from a JSON in launch/. Only the model goes through accelerator.prepare: the batches come from
data/batches.py, which already splits by rank (Accelerate's dispatcher would drop or duplicate samples,
toolchain.md §4), and the optimizer stays ours so that it can skip a step on the device (train_step.py).

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

import torch

from facevae_dist import checkpoint as ckpt
from facevae_dist.config import TrainConfig, load_toml, resolve_mixed_precision, save_toml
from facevae_dist.data.batches import iter_val_batches, open_train_batches
from facevae_dist.errors import RunError, UsageError
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from facevae_dist.losses import compute_losses
from facevae_dist.model import FaceVAE
from facevae_dist.optim import build_optimizer
from facevae_dist.perf import cpu_has_native_bf16, keep_freed_memory
from facevae_dist.progress import info, make_progress
from facevae_dist.train_step import TrainStep

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_CHECK_EVERY = 10  # steps between the all-reduced preemption checks of a multi-process run (and at log steps)
# Fault injection for tests (a real poisoned batch, not a mocked loop): comma-separated step numbers whose
# training images are multiplied by NaN after they are drawn.
INJECT_NAN_ENV = "FACEVAE_INJECT_NAN_STEPS"
# What a resumed run may not change: it would mix two experiments in one run dir (and in best/).
TRAINED_FIELDS = ("hypothesis", "seed", "loss", "model", "optim.eps_form")


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns {"run_dir", "step", "best_val_loss", "best_step", "stopped", ...}.
    stopped: "finished" (max_steps reached) | "preempted" (SIGTERM/SIGUSR1/SIGUSR2: checkpoint saved first).
    Raises RunError after cfg.max_bad_steps non-finite losses in a row (the last good checkpoint stays)."""
    from facevae_dist.data.shards import read_manifest

    precision_was_auto = cfg.mixed_precision == "auto"
    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    if not cfg.deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        cfg.deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")  # launched with deepspeed-zero2.yaml
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is an existing file, not a directory; pass a directory path")
    if cfg.deepspeed and cfg.grad_accum > 1:
        raise UsageError(f"grad_accum={cfg.grad_accum} with DeepSpeed is refused: a skipped non-finite step would leave "
                         "its accumulated gradients in the engine; use --grad-accum 1 (raise --batch-size instead)")
    image_size = int(read_manifest(cfg.data.shards).get("image_size", cfg.model.image_size))
    if image_size != cfg.model.image_size:
        raise UsageError(f"{cfg.data.shards} holds {image_size}px images but model.image_size="
                         f"{cfg.model.image_size}; pass --set model.image_size={image_size}")
    keep_freed_memory()  # glibc would otherwise mmap/munmap every large activation each step (see perf.py)
    with _backends(cfg):
        accelerator = _make_accelerator(cfg)
        # one training process per run dir (rank 0 holds the lock until train() returns)
        with ckpt.RunDirLock(run_dir) if accelerator.is_main_process else contextlib.nullcontext():
            return _train_locked(cfg, accelerator, precision_was_auto)


_hinted_bf16 = False


def _hint_native_bf16() -> None:
    """Once per process, when precision was left to "auto" (fp32 on a CPU) on a CPU with bf16 in hardware."""
    global _hinted_bf16
    if not _hinted_bf16 and cpu_has_native_bf16():
        _hinted_bf16 = True
        info("this CPU does bf16 in hardware: --set mixed_precision=bf16 trained the paper's model about 1.6x faster "
             "here (`facevae bench train`; autocast, fp32 weights and losses)")


def _train_locked(cfg: TrainConfig, accelerator, precision_was_auto: bool = False) -> dict:
    run_dir = Path(cfg.run_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main, use_ds = accelerator.is_main_process, bool(cfg.deepspeed)

    # ---- model: the same init on every rank, then per-rank noise ------------------------------------------------
    _seed_everything(cfg.seed)
    model = FaceVAE(cfg.model)
    if cfg.channels_last and not use_ds:  # DeepSpeed flattens parameters and needs them contiguous
        model = model.to(memory_format=torch.channels_last)
    _seed_everything(cfg.seed + rank)

    # ---- resume: rank 0 picks the checkpoint (every rank must load the same one) -------------------------------
    if is_main:
        ckpt.remove_stale_temps(run_dir)
    resume_from, verified = ckpt.resume_checkpoint(run_dir, cfg.resume) if is_main else (None, None)
    resume_from = _broadcast(accelerator, str(resume_from) if resume_from else None)
    if resume_from is None and cfg.resume == "none" and ckpt.latest_checkpoint(run_dir) is not None:
        raise UsageError(f"{run_dir} already has checkpoints (latest {ckpt.latest_checkpoint(run_dir).name}) and "
                         "--resume none would mix two runs in it; use a new --run-dir, or --resume auto to continue")
    # rank 0 has read the checkpoint whole already when --resume auto checked that it loads
    restored = (verified if verified is not None else ckpt.load_checkpoint(resume_from, rank)) if resume_from else None
    state = restored.state if restored else ckpt.TrainState()
    if restored:
        _check_same_experiment(Path(resume_from), cfg)
        model.load_state_dict(restored.model_state)
        if (state.world_size, state.batch_size) != (world, cfg.data.batch_size):
            # the position within the epoch counted other batches: continue from the next epoch (not bit-exact)
            info(f"resuming with {world} process(es) x batch {cfg.data.batch_size} instead of {state.world_size} x "
                 f"{state.batch_size}: data continues at the start of epoch {state.epoch + 1}")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.world_size, state.batch_size = world, cfg.data.batch_size

    # ---- optimizer, precision, distributed wrapping -------------------------------------------------------------
    if use_ds:
        from accelerate.utils import DummyOptim

        model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters(), lr=cfg.optim.lr))
    else:
        optimizer = build_optimizer(model.parameters(), cfg.optim)  # ours: skips on the device (found_inf)
        model = accelerator.prepare(model)
    raw_model = accelerator.unwrap_model(model) if use_ds else getattr(model, "module", model)  # no deepspeed import
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
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
    train_step = TrainStep(model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler,
                           accelerator=accelerator, cfg=cfg, amp_dtype=amp_dtype, use_deepspeed=use_ds)

    # ---- run directory, metrics, data -----------------------------------------------------------------------------
    manager = ckpt.CheckpointManager(run_dir, cfg.ckpt_every, cfg.keep_last, rank=rank, world_size=world,
                                     barrier=accelerator.wait_for_everyone,
                                     gather=lambda x: _gather_objects(accelerator, x))
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
    _print_preset_warnings(cfg, world)
    val = _Validator(cfg, raw_model, accelerator, amp_dtype)
    if cfg.val_every:  # fail now, not at the first validation, if the val split is missing or too small
        next(val.batches(1), None)
    batches = open_train_batches(cfg.data, rank=rank, world=world, device=device, epoch=state.epoch,
                                 batch_in_epoch=state.batch_in_epoch, channels_last=cfg.channels_last)
    bad_steps = _BadSteps(cfg, state, metrics, device)
    stop = _StopSignal(accelerator, cfg.log_every)
    poisoned = _poisoned_steps()

    clock = _CostClock(state, world)

    def save_checkpoint(val_loss: float | None = None) -> None:
        clock.update()
        _sync_buffers_for_deepspeed(raw_model, use_ds, world)
        # DeepSpeed shards the optimizer by rank: each rank writes its own part into the checkpoint
        manager.save(model=raw_model, optimizer_state={"deepspeed": True} if use_ds else optimizer.state_dict(),
                     scaler_state=scaler.state_dict(), state=state, cfg=cfg, val_loss=val_loss,
                     write_rank_files=(lambda d: _save_deepspeed_optimizer(model, d, rank)) if use_ds else None)

    def validate_and_keep_best() -> float | None:
        _sync_buffers_for_deepspeed(raw_model, use_ds, world)
        result = val.run(state.step)
        if not result:
            info("validation skipped: the val split yielded no batches")
            return None
        metrics.write({"step": state.step, "split": "val", **{f"val_{k}": v for k, v in result.items()}})
        if math.isfinite(result["loss"]) and result["loss"] < state.best_val_loss:
            state.best_val_loss, state.best_step = result["loss"], state.step
            manager.save_best(model=raw_model, state=state, cfg=cfg, val_loss=result["loss"])
        return result["loss"]

    # ---- the loop -----------------------------------------------------------------------------------------------
    per_step = cfg.data.batch_size * cfg.grad_accum * world
    last_val_step = last_ckpt_step = state.step if restored else -1
    stopped = "finished"
    t_window, n_window, t_start, steps_run = time.perf_counter(), 0, time.perf_counter(), 0
    info(f"training {cfg.hypothesis or 'custom config'} in {run_dir} on {world} x {device} "
         f"({accelerator.distributed_type}{', DeepSpeed' if use_ds else ''}, precision {cfg.mixed_precision}, "
         f"data {batches.placement})" + (f", resumed from {resume_from} at step {state.step}" if restored else ""))
    if precision_was_auto and cfg.mixed_precision == "no" and device.type == "cpu" and is_main:
        _hint_native_bf16()
    progress = make_progress()
    task = progress.add_task("train", total=cfg.max_steps, completed=state.step)
    try:
        with progress, stop:
            while state.step < cfg.max_steps:
                step = state.step + 1
                micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
                if step in poisoned:
                    micro_batches = [(image * float("nan"), mask) for image, mask in micro_batches]
                terms, bad = train_step(micro_batches)
                state.step, state.epoch, state.batch_in_epoch = step, batches.epoch, batches.batch_in_epoch
                state.samples_seen += per_step
                bad_steps.record(step, bad)
                steps_run += 1
                n_window += per_step

                # ---- log / validate / sample / checkpoint at the step boundary (the only host reads) ------------
                log_now = step % cfg.log_every == 0
                val_now = bool(cfg.val_every) and step % cfg.val_every == 0
                sample_now = bool(cfg.sample_every) and step % cfg.sample_every == 0
                ckpt_now = manager.due(step)
                if log_now or val_now or sample_now or ckpt_now:
                    bad_steps.drain()  # raises RunError after max_bad_steps in a row
                if log_now and not bad_steps.last_was_bad:
                    now = time.perf_counter()
                    reduced = _mean_over_ranks(accelerator, terms)
                    ips = n_window / max(now - t_window, 1e-9)
                    t_window, n_window = now, 0
                    clock.update()
                    metrics.write({"step": step, **reduced, "images_per_s": round(ips, 2), "lr": cfg.optim.lr,
                                   "samples_seen": state.samples_seen, "epoch": state.epoch,
                                   "train_s": round(state.train_seconds, 2), "cpu_s": round(state.cpu_seconds, 2),
                                   **({"corrupt_samples_rank0": batches.corrupt_count}
                                      if batches.corrupt_count else {})})
                    progress.update(task, description=f"train loss {reduced['loss']:.4f} {ips:.1f} img/s")
                val_loss = None
                if val_now:
                    val_loss, last_val_step = validate_and_keep_best(), step
                if sample_now and is_main:
                    _write_sample_grid(raw_model, val.batches(1), cfg, run_dir / "samples" / f"step_{step}.png")
                if ckpt_now:
                    save_checkpoint(val_loss)
                    last_ckpt_step = step
                progress.update(task, completed=step)
                if stop.requested(step, log_now):
                    stopped = "preempted"
                    break

        # ---- end of run: final validation and checkpoint (also on preemption) -----------------------------------
        bad_steps.drain()
        if stopped == "finished" and cfg.val_every and last_val_step != state.step:
            validate_and_keep_best()
        if last_ckpt_step != state.step:
            save_checkpoint()
        if stopped == "preempted":
            info(f"stopped by {stop.signal or 'a signal on another rank'} at step {state.step}; "
                 f"checkpoint saved, rerun the same command to resume")
    finally:
        batches.close()  # stops DataLoader workers now rather than at garbage collection
        # Not accelerator.end_training(): it also destroys the process group, which belongs to the launcher (and
        # evaluation reuses it). Destroying a gloo group right after the last collective deadlocks now and then:
        # its destructor joins the worker threads holding the GIL while a worker, still releasing that
        # collective's tensors, waits for the GIL (seen on rank 1 of 2-rank runs on a loaded machine).
        for tracker in accelerator.trackers:
            tracker.finish()

    wall = time.perf_counter() - t_start
    summary = {
        "run_dir": str(run_dir), "step": state.step, "stopped": stopped,
        "signal": stop.signal,  # which signal stopped it (None: finished, or another rank's signal)
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "best_step": state.best_step if state.best_step >= 0 else None, "samples_seen": state.samples_seen,
        "bad_steps": state.bad_steps_total, "world_size": world, "wall_s": round(wall, 2),
        "images_per_s": round(steps_run * per_step / wall, 2) if wall > 0 else None,
    }
    if is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


# ---- loop helpers -------------------------------------------------------------------------------------------------


class _CostClock:
    """Keeps state.train_seconds / state.cpu_seconds current: what this process ran on top of what the checkpoint it
    resumed from had counted. CPU time is rank 0's process time (all its threads) times the ranks: ranks do the
    same work, and summing them exactly would cost a collective."""

    def __init__(self, state, world: int):
        self.state, self.world = state, world
        self.base_wall, self.base_cpu = state.train_seconds, state.cpu_seconds
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def update(self) -> None:
        self.state.train_seconds = self.base_wall + time.perf_counter() - self.t0
        self.state.cpu_seconds = self.base_cpu + (time.process_time() - self.c0) * self.world


class _BadSteps:
    """Which steps were skipped for a non-finite loss: one device flag per step since the last read, read in one go
    (one host sync) at boundary steps. Writes a "non_finite_loss" event per skipped step, keeps the counts in
    `state`, and raises RunError once cfg.max_bad_steps steps in a row were skipped."""

    def __init__(self, cfg: TrainConfig, state, metrics, device):
        self.cfg, self.state, self.metrics = cfg, state, metrics
        self.flags = torch.zeros(cfg.log_every, device=device)  # log steps always drain, so this never overflows
        self.steps: list[int] = []
        self.in_a_row = 0
        self.last_was_bad = False

    def record(self, step: int, bad: torch.Tensor) -> None:
        if len(self.steps) == self.flags.numel():  # boundary-free stretch longer than log_every (cannot happen)
            self.drain()
        self.flags[len(self.steps)] = bad
        self.steps.append(step)

    def drain(self) -> None:
        if not self.steps:
            return
        flags = self.flags[:len(self.steps)].tolist()
        steps, self.steps = self.steps, []
        per_step = self.cfg.data.batch_size * self.cfg.grad_accum * self.state.world_size
        for step, flag in zip(steps, flags):
            self.last_was_bad = flag > 0
            if not self.last_was_bad:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.state.bad_steps_total += 1
            self.metrics.write({"step": step, "event": "non_finite_loss", "skipped": True,
                                "bad_in_a_row": self.in_a_row,
                                "samples_seen": self.state.samples_seen - (steps[-1] - step) * per_step})
            if self.in_a_row >= self.cfg.max_bad_steps:
                good = ckpt.latest_checkpoint(self.cfg.run_dir)
                raise RunError(
                    f"non-finite loss in {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}); "
                    f"stopped. Last good checkpoint: {good or 'none'}. Try a lower --set optim.lr, "
                    "--mixed-precision no, or check the data with `facevae shards verify`")


class _StopSignal:
    """A preemption signal only sets a flag; `requested()` says at a step boundary whether to stop, the same on
    every rank. One process: the flag itself, every step. Several: a tensor all-reduce every STOP_CHECK_EVERY steps
    and at log steps (the host read of that check is the only sync those steps have)."""

    def __init__(self, accelerator, log_every: int):
        self.accelerator, self.log_every = accelerator, log_every
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopSignal":
        self._previous = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def requested(self, step: int, log_step: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return self.signal is not None
        if not (log_step or step % STOP_CHECK_EVERY == 0):
            return False
        flag = torch.tensor(float(self.signal is not None), device=self.accelerator.device)
        torch.distributed.all_reduce(flag)
        return flag.item() > 0


class _Validator:
    """Mean loss terms over cfg.val_batches batches per rank. z = mu, or with val_sampling="sample" z drawn from a
    generator seeded by (seed, step) inside a forked RNG: the training noise streams are never touched."""

    def __init__(self, cfg: TrainConfig, raw_model, accelerator, amp_dtype):
        self.cfg, self.model, self.accelerator, self.amp_dtype = cfg, raw_model, accelerator, amp_dtype
        self.device = accelerator.device

    def batches(self, max_batches: int):
        return iter_val_batches(self.cfg.data, rank=self.accelerator.process_index,
                                world=self.accelerator.num_processes, device=self.device, max_batches=max_batches,
                                channels_last=self.cfg.channels_last)

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        cfg, sample = self.cfg, self.cfg.val_sampling == "sample"
        sums: dict[str, torch.Tensor] = {}
        n = torch.zeros((), device=self.device)
        self.model.eval()
        with self._rng(step) if sample else contextlib.nullcontext():
            for image, mask in self.batches(cfg.val_batches):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.model(image, mask if cfg.model.mask_mode != "none" else None, sample=sample)
                for k, v in compute_losses(out, image, mask, cfg.loss, cfg.model).items():
                    sums[k] = sums.get(k, 0) + v.detach() * image.shape[0]
                n += image.shape[0]
        self.model.train()
        keys = sorted(sums)
        totals = self.accelerator.reduce(torch.stack([n] + [sums[k] for k in keys]) if keys else n[None], "sum")
        totals = totals.tolist()
        if totals[0] == 0:
            return {}
        return {k: totals[i + 1] / totals[0] for i, k in enumerate(keys)}

    @contextlib.contextmanager
    def _rng(self, step: int):
        seed = (self.cfg.seed * 1_000_003 + step) * 64 + self.accelerator.process_index
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)
            yield


def _sync_buffers_for_deepspeed(raw_model, use_ds: bool, world: int) -> None:
    """DeepSpeed, unlike DDP, does not broadcast buffers: make rank 0's BN statistics everyone's before they are
    validated or saved (the checkpoint's weights digest covers parameters only)."""
    if use_ds and world > 1:
        for b in raw_model.buffers():
            torch.distributed.broadcast(b, src=0)


def _mean_over_ranks(accelerator, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(terms, key=lambda k: (k != "loss", k))
    t = torch.stack([terms[k].float() for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "mean")
    return dict(zip(keys, t.tolist()))


def _print_preset_warnings(cfg: TrainConfig, world: int) -> None:
    try:
        from facevae_dist import presets
    except ImportError:  # presets.py not in this checkout
        return
    for warning in presets.preset_warnings(cfg, world):
        info(f"warning: {warning}")


# ---- setup helpers ----------------------------------------------------------------------------------------------


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


def _poisoned_steps() -> set[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise UsageError(f"{INJECT_NAN_ENV}={raw!r}: expected comma-separated step numbers") from None


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
def _write_sample_grid(model: FaceVAE, val_batches, cfg: TrainConfig, path: Path, n: int = 8) -> None:
    """Rows of input | reconstruction | predicted mask | ground-truth mask (checkerboard where a model has no mask
    head). The reconstruction is the inference output (z = mu; mask+decoder composites with its predicted mask)."""
    import io

    import numpy as np
    from PIL import Image

    batch = next(iter(val_batches), None)
    if batch is None:
        return
    image, mask = batch[0][:n], batch[1][:n]
    model.eval()
    out = model.reconstruct(image, mask if cfg.model.mask_mode == "mask" else None)
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


# ---- `python -m facevae_dist.train` (torchrun / accelerate launch) ------------------------------------------------
# The command line lives in cli/train.py (which imports this module, never the reverse); run as a script, this
# module only hands over to it.

if __name__ == "__main__":
    from facevae_dist.cli.train import launcher_main

    launcher_main()
