"""What the training loop (loop.py) keeps an eye on, each piece with one job: the run's metrics file, throughput and
the cost clock, the skipped-step bookkeeping and the preemption signal. Nothing here decides when to do what: the
loop does."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from facevae_dist.config import TrainConfig
from facevae_dist.errors import RunError, UsageError
from facevae_dist.fileio import atomic_write_text, iter_jsonl, naming
from facevae_dist.train import checkpoint as ckpt
from facevae_dist.train.tracking import scalars as tracker_scalars

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_CHECK_EVERY = 10  # steps between the all-reduced preemption checks of a multi-process run (and at log steps)
# Fault injection for tests (a real poisoned batch, not a mocked loop): comma-separated step numbers whose
# training images are multiplied by NaN after they are drawn.
INJECT_NAN_ENV = "FACEVAE_INJECT_NAN_STEPS"


def poisoned_steps() -> set[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise UsageError(f"{INJECT_NAN_ENV}={raw!r}: expected comma-separated step numbers") from None


class Metrics:
    """metrics.jsonl (rank 0 only): one JSON object per line; also forwarded to Accelerate's trackers (tracking.py
    names them train/..., val/...)."""

    def __init__(self, path: Path, enabled: bool, accelerator):
        self.path, self.enabled, self.accelerator = path, enabled, accelerator

    def write(self, record: dict) -> None:
        if self.accelerator.trackers:
            self.accelerator.log(tracker_scalars(record), step=record["step"])
        if not self.enabled:
            return
        with naming(self.path), open(self.path, "a") as f:  # a full disk's error names the file
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (by a run that died before its next checkpoint), so a resumed run's
        metrics read exactly like an uninterrupted one's."""
        if not self.path.is_file():
            return
        # a line cut by the kill (or otherwise unreadable) is dropped with those past the checkpoint
        keep = [json.dumps(r) for r in iter_jsonl(self.path)
                if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


class Throughput:
    """Images per second over the log window: since the previous read."""

    def __init__(self):
        self.t, self.n, self.last = time.perf_counter(), 0, 0.0

    def add(self, images: int) -> None:
        self.n += images

    def images_per_s(self) -> float:
        now = time.perf_counter()
        self.last = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return self.last


class CostClock:
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


class BadSteps:
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


class StopSignal:
    """A preemption signal only sets a flag; `requested()` says at a step boundary whether to stop, the same on
    every rank. One process: the flag itself, every step. Several: a tensor all-reduce every STOP_CHECK_EVERY steps
    and at log steps (the host read of that check is the only sync those steps have)."""

    def __init__(self, accelerator, log_every: int):
        self.accelerator, self.log_every = accelerator, log_every
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        self._previous = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def request(self, reason: str) -> None:
        """Stop as a preemption signal would (every rank at the same step, after a checkpoint), for `reason`."""
        if self.signal is None:
            self.signal = reason

    def requested(self, step: int, log_step: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return self.signal is not None
        if not (log_step or step % STOP_CHECK_EVERY == 0):
            return False
        flag = torch.tensor(float(self.signal is not None), device=self.accelerator.device)
        torch.distributed.all_reduce(flag)
        return flag.item() > 0
