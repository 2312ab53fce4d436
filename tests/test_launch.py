"""The documented multi-rank launch outside the sweep: torchrun with --signals-to-handle forwards the preemption
signal (SIGUSR1/SIGUSR2) to every rank; each rank stops at the same step boundary, the checkpoint holds every
rank's state, and a rerun continues from it. (`accelerate launch` does not forward USR1/USR2: its launcher dies and
the workers run on as orphans; launch/README.md.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import REPO, build_tiny_shards, cli_args, env, metrics, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCALE = float(os.environ.get("FACEVAE_TEST_TIMEOUT_SCALE", "1"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            # what launch/README.md documents: forward the preemption signals, and give the ranks time to save
            "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1,SIGUSR2", "--shutdown-timeout", "600"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory.mktemp("shards") / "synthetic")


def test_torchrun_forwards_usr1_to_every_rank_and_the_run_resumes(shards, tmp_path):
    train = ["-m", "facevae_dist", "train", *cli_args(shards, tmp_path, "--ckpt-every", "5", "--val-every", "0",
                                                    "--mixed-precision", "no")]
    proc = subprocess.Popen([*TORCHRUN, *train, "--max-steps", "100000"], cwd=REPO, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600 * SCALE  # a hang guard only: the wait ends on the first checkpoint
        while not (tmp_path / "checkpoints" / "step_5" / "meta.json").is_file():
            assert proc.poll() is None, f"torchrun ended early (rc {proc.returncode}):\n{proc.stdout.read()[-4000:]}"
            assert time.time() < deadline, "no first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # to the launcher only, as Slurm's --signal=B:USR1 would
        out, _ = proc.communicate(timeout=600 * SCALE)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "preempted" and summary["signal"] == "SIGUSR1", out[-3000:]
    assert summary["world_size"] == 2
    step = summary["step"]
    saved = tmp_path / "checkpoints" / f"step_{step}"
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(set(meta["weights_sha256_by_rank"])) == 1  # both ranks, same step
    assert sorted(p.name for p in saved.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert "SIGKILL" not in out, "torchrun had to kill a rank that did not stop in time"
    # torchrun itself exits non-zero after a handled signal ("got signal: 10"): a wrapper script must decide to
    # requeue from the signal it received, not from torchrun's exit code
    assert proc.returncode != 0 and "got signal: 10" in out

    run([*TORCHRUN, *train, "--max-steps", str(step + 2)], timeout=600 * SCALE)
    steps = [m["step"] for m in metrics(tmp_path) if "loss" in m and "split" not in m]
    assert steps == list(range(1, step + 3)), "the rerun continued from the forwarded signal's checkpoint"
