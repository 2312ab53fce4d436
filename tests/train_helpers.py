"""Shared by the trainer tests: tiny real shards, a tiny config of the paper's architecture, subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY_18, model_overrides, set_args

from facevae_dist.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def build_tiny_shards(path: Path, n: int = 120) -> Path:
    """Real WebDataset shards from the synthetic source: 96 train / 12 val / 12 test samples, 8 per shard."""
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import SyntheticSource

    build_shards(SyntheticSource(n=n, seed=0), path, ShardOptions(image_size=18, shard_size=8, image_format="png"))
    return path


def build_fixed_shards(path: Path, n_train: int = 64, n_val: int = 8, size: int = 18) -> Path:
    """Shards from a few lines of numpy (colour gradients, an elliptic face mask) instead of the synthetic face
    renderer, so the recorded loss curve regresses the loader + model + losses + trainer, and does not move when
    the renderer is improved."""
    import numpy as np

    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import Item, Record, Source, SourcePlan

    class Gradients(Source):
        name = "test-gradients"

        def plan(self) -> SourcePlan:
            counts = {"train": n_train, "val": n_val, "test": n_val}
            return SourcePlan({s: [Item(f"{s}{i:05d}", s, i) for i in range(n)] for s, n in counts.items()})

        def load(self, item: Item) -> Record:
            rng = np.random.default_rng([len(item.split), item.ref])
            yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
            c0, c1, c2 = rng.uniform(0, 255, (3, 3))
            img = c0 + xx[..., None] * (c1 - c0) + yy[..., None] * (c2 - c0) * 0.5
            cy, cx, ry, rx = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.4)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[mask] = img[mask] * 0.5 + rng.uniform(0, 255, 3) * 0.5
            return Record(item.source_id, item.split, np.clip(img, 0, 255).astype(np.uint8), mask=mask)

        def describe(self) -> dict:
            return {"name": self.name, "n_train": n_train, "n_val": n_val, "size": size}

    build_shards(Gradients(), path, ShardOptions(image_size=size, shard_size=8, image_format="png"))
    return path


def tiny_config(shards: Path, run_dir: Path, hypothesis: str = "H9", **fields) -> TrainConfig:
    base = dict(run_dir=str(run_dir), max_steps=4, val_every=2, val_batches=1, ckpt_every=2, log_every=1,
                sample_every=0, mixed_precision="no", channels_last=False, tensorboard=False,
                data={"shards": str(shards), "batch_size": 4, "workers": 0}, model=dict(TINY_18))
    for key, value in fields.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return TrainConfig.from_hypothesis(hypothesis, **base)


def cli_args(shards: Path, run_dir: Path, *extra: str, hypothesis: str = "H9") -> list[str]:
    """`facevae train` arguments for the tiny setup (shared by the CLI, python -m and launcher runs)."""
    return ["--hypothesis", hypothesis, "--shards", str(shards), "--run-dir", str(run_dir), "--batch-size", "4",
            "--workers", "0", "--log-every", "1", "--sample-every", "0", "--val-batches", "1",
            *set_args(model_overrides(TINY_18)), *extra]


def env(**extra: str) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", FACEVAE_QUIET="1", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "facevae-torch-extensions"))
    e.pop("FACEVAE_INJECT_NAN_STEPS", None)
    e.update(extra)
    return e


def run(cmd: list[str], timeout: float = 900, **env_extra: str) -> subprocess.CompletedProcess:
    """Run a command (a launcher and its ranks) in its own process group. The deadline only guards against a hang
    (a loaded CI machine can take minutes to start two ranks); when it passes, the whole group is killed, so no rank
    is left orphaned waiting on a dead launcher's rendezvous store, and the output so far is shown."""
    import signal

    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)}\nstill running after {timeout:.0f} s (killed)\n{out[-3000:]}\n"
                             f"{err[-6000:]}") from None
    finally:
        try:  # ranks that outlived a launcher that has exited (they would wait on its store forever)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nrc={proc.returncode}\n{out[-3000:]}\n{err[-6000:]}"
    return result


def train_module(*args: str) -> list[str]:
    return [sys.executable, "-m", "facevae_dist", "train", *args]


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> list[tuple]:
    """Every logged loss value (train and val lines), without timings."""
    out = []
    for rec in metrics(run_dir):
        out.append((rec["step"], rec.get("split", "train"), rec.get("event"),
                    tuple(sorted((k, v) for k, v in rec.items() if "loss" in k or k in ("l1", "l2", "ssim", "kl", "bce", "dice")
                                 or k.startswith("val_")))))
    return out


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> int:
    """Poll metrics.jsonl until a line with step >= `step` appears; returns the highest step seen."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            seen = max((r["step"] for r in metrics(run_dir)), default=0)
        except (json.JSONDecodeError, KeyError):
            seen = 0  # a line being written
        if seen >= step:
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"training exited early (rc={proc.returncode}): {proc.stderr.read()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")
