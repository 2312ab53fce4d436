"""CheckpointManager: atomic layout, keep-last-k, best/, resume-latest, load_model, safe loading."""

import json
import random

import numpy as np
import pytest
import torch

from facevae_dist.checkpoint import (CheckpointManager, TrainState, latest_checkpoint, list_checkpoints,
                                     load_checkpoint, load_model, load_pt, resolve_resume, rng_state, set_rng_state)
from facevae_dist.config import TrainConfig
from facevae_dist.errors import FaceVAEError, RunError, UsageError
from facevae_dist.model import FaceVAE, ModelConfig


def _setup(tmp_path):
    cfg = TrainConfig.from_hypothesis("ssim+l2/mask+decoder", run_dir=str(tmp_path),
                                      model={"image_size": 18, "width": 0.125, "latent_dim": 8})
    torch.manual_seed(0)
    model = FaceVAE(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    model(torch.rand(2, 3, 18, 18), torch.rand(2, 1, 18, 18)).recon.mean().backward()
    opt.step()
    return cfg, model, opt


def _save(mgr, cfg, model, opt, step, **kw):
    return mgr.save(model=model, optimizer_state=opt.state_dict(), scaler_state=None,
                    state=TrainState(step=step, samples_seen=step * 4, epoch=1, batch_in_epoch=step % 3), cfg=cfg, **kw)


def test_save_keep_last_and_latest(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=2, keep_last=2)
    assert mgr.due(4) and not mgr.due(3)
    for step in (2, 4, 6):
        _save(mgr, cfg, model, opt, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_6"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    ck = tmp_path / "checkpoints" / "step_6"
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "config.json", "train_config.toml",
                                              "trainer_state.pt", "rng_rank0.pt", "meta.json"}
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 6 and meta["samples_seen"] == 24 and meta["batch_in_epoch"] == 0


def test_restore_roundtrip(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=1, keep_last=3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _save(mgr, cfg, model, opt, 5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    r = load_checkpoint(resolve_resume(tmp_path, "auto"))
    assert r.state.step == 5 and r.state.samples_seen == 20 and r.state.batch_in_epoch == 2
    for k, v in model.state_dict().items():  # weights and BN running statistics
        assert torch.equal(r.model_state[k], v), k
    opt2 = torch.optim.Adam(FaceVAE(cfg.model).parameters())
    opt2.load_state_dict(r.optimizer_state)
    assert opt2.param_groups[0]["eps"] == 1e-7
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(r.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert resolve_resume(tmp_path, "none") is None


def test_latest_ignores_incomplete_and_stale_temp(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=1, keep_last=5)
    _save(mgr, cfg, model, opt, 3)
    # a save killed half way: a temp dir, and a step dir without meta.json (never renamed in practice)
    (tmp_path / "checkpoints" / ".tmp-step_4").mkdir()
    (tmp_path / "checkpoints" / "step_9").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_3"
    _save(mgr, cfg, model, opt, 4)  # cleans the stale temp of the same step
    assert latest_checkpoint(tmp_path).name == "step_4"
    assert not (tmp_path / "checkpoints" / ".tmp-step_4").exists()
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_9"))


def test_best_and_load_model(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=1, keep_last=1)
    _save(mgr, cfg, model, opt, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.save_best(model=model, state=TrainState(step=3), cfg=cfg, val_loss=0.5)
    assert json.loads((tmp_path / "best" / "meta.json").read_text())["val_loss"] == 0.5
    best, bcfg, step = load_model(tmp_path, "best")
    assert step == 3 and not best.training and bcfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), model.state_dict().values()))
    latest, _, step = load_model(tmp_path, "latest")
    assert step == 2 and not torch.equal(next(latest.parameters()), next(best.parameters()))
    assert load_model(tmp_path, "step_2")[2] == 2
    with pytest.raises(FaceVAEError, match="step_2"):
        load_model(tmp_path, "step_7")
    with pytest.raises(FaceVAEError, match="no such run directory"):
        load_model(tmp_path / "nope")


def test_best_falls_back_to_latest_and_empty_run_errors(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    with pytest.raises(FaceVAEError, match="no complete checkpoint"):
        load_model(tmp_path, "best")
    _save(CheckpointManager(tmp_path, every=1, keep_last=1), cfg, model, opt, 1)
    assert load_model(tmp_path, "best")[2] == 1


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RunError, match="unreadable checkpoint file"):
        load_pt(tmp_path / "evil.pt")
    torch.save(rng_state(), tmp_path / "rng.pt")
    assert set(load_pt(tmp_path / "rng.pt")) >= {"python", "numpy", "torch"}
