"""GPU checks (marked `gpu`): they run where CUDA is present and skip with a reason elsewhere.
Run them on a GPU node with the command in docs/performance.md, "Verifying on a GPU node"."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_tiny_shards, cli_args, losses, metrics, run, tiny_config

from facevae_dist.train.loop import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory.mktemp("shards") / "synthetic")


def test_bf16_steps_train_and_log_finite_losses(shards, tmp_path):
    summary = train(tiny_config(shards, tmp_path, max_steps=6, mixed_precision="bf16", channels_last=True,
                                val_every=3))
    assert summary["stopped"] == "finished" and summary["bad_steps"] == 0
    assert json.loads((tmp_path / "env.json").read_text())["device"].startswith("cuda")
    lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert len(lines) == 6 and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)


def test_nonfinite_step_is_skipped_on_the_device(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("FACEVAE_INJECT_NAN_STEPS", "2")
    summary = train(tiny_config(shards, tmp_path, max_steps=4, val_every=0, mixed_precision="bf16"))
    assert summary["bad_steps"] == 1
    weights = load_file(tmp_path / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_device_resident_data(shards, tmp_path):
    summary = train(tiny_config(shards, tmp_path, max_steps=4, val_every=0, data={"placement": "device"}))
    assert summary["step"] == 4


def test_deterministic_runs_repeat_bit_for_bit(shards, tmp_path):
    for name in ("a", "b"):
        train(tiny_config(shards, tmp_path / name, max_steps=4, val_every=2, deterministic=True,
                          mixed_precision="bf16", channels_last=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = (load_file(tmp_path / n / "checkpoints" / "step_4" / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_resume_is_exact(shards, tmp_path):
    common = dict(val_every=2, ckpt_every=2, deterministic=True, mixed_precision="bf16")
    train(tiny_config(shards, tmp_path / "ref", max_steps=4, **common))
    train(tiny_config(shards, tmp_path / "cut", max_steps=2, **common))
    train(tiny_config(shards, tmp_path / "cut", max_steps=4, **common))
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-rank NCCL run")
def test_two_rank_nccl_ddp(shards, tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "facevae_dist", "train", *cli_args(shards, tmp_path, "--max-steps", "4", "--ckpt-every", "2",
                                               "--val-every", "2", "--mixed-precision", "bf16")],
        FACEVAE_INJECT_NAN_STEPS="3")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4 and summary["bad_steps"] == 1
    meta = json.loads((tmp_path / "checkpoints" / "step_4" / "meta.json").read_text())
    assert len(set(meta["weights_sha256_by_rank"])) == 1
    assert json.loads((tmp_path / "env.json").read_text())["distributed_type"] == "DistributedType.MULTI_GPU"
