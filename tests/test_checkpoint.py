"""CheckpointManager: atomic layout, keep-last-k, best/, resume-latest, load_model, safe loading."""

import json
import random

import numpy as np
import pytest
import torch

from facevae_dist.config import TrainConfig
from facevae_dist.errors import FaceVAEError, RunError, UsageError
from facevae_dist.model import FaceVAE
from facevae_dist.train.checkpoint import (
    CheckpointManager,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_pt,
    resolve_resume,
    rng_state,
    set_rng_state,
)


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


# ---- damaged checkpoints, disk full, killed renames -------------------------------------------


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer_state.pt", "rng_rank0.pt", "meta.json"])
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=2, keep_last=3)
    for step in (2, 4, 6):
        _save(mgr, cfg, model, opt, step)
    _truncate(tmp_path / "checkpoints" / "step_6" / damage)
    _truncate(tmp_path / "checkpoints" / "step_4" / damage, keep=0.9)
    picked = resolve_resume(tmp_path, "auto")
    assert picked.name == "step_2" and load_checkpoint(picked).state.step == 2
    err = capsys.readouterr().err
    assert "step_6" in err and "step_4" in err and damage in err and "step_2" in err
    aside = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name)
    assert [a.split(".")[0] for a in aside] == ["step_4", "step_6"]  # kept aside, not deleted ...
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]  # ... and never picked again
    assert resolve_resume(tmp_path, "auto").name == "step_2"
    _save(mgr, cfg, model, opt, 4)  # training on writes new checkpoints; pruning leaves the damaged ones alone
    _save(mgr, cfg, model, opt, 6)
    _save(mgr, cfg, model, opt, 8)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_6", "step_8"]
    assert len([p for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name]) == 2


def test_resume_auto_refuses_when_no_checkpoint_loads(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    _save(CheckpointManager(tmp_path, every=2, keep_last=3), cfg, model, opt, 2)
    _truncate(tmp_path / "checkpoints" / "step_2" / "model.safetensors")
    with pytest.raises(RunError, match=r"no checkpoint .* loads.*step_2.*model.safetensors"):
        resolve_resume(tmp_path, "auto")
    assert (tmp_path / "checkpoints" / "step_2").is_dir()  # nothing to fall back to: left where it is


def test_explicit_damaged_checkpoint_is_one_line_naming_the_file(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    ck = _save(CheckpointManager(tmp_path, every=2, keep_last=3), cfg, model, opt, 2)
    _truncate(ck / "model.safetensors")
    with pytest.raises(RunError, match=r"step_2/model.safetensors.*(damaged|unreadable)") as exc:
        load_checkpoint(ck)
    assert "\n" not in str(exc.value)
    with pytest.raises(FaceVAEError, match=r"step_2/model.safetensors") as exc:
        load_model(tmp_path, "step_2")
    assert "\n" not in str(exc.value)
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(FaceVAEError, match=r"meta.json"):
        load_model(tmp_path, "latest")
    (ck / "meta.json").write_text("{}")
    with pytest.raises(FaceVAEError, match=r"meta.json"):
        load_checkpoint(ck)


def _export(tmp_path):
    cfg, model, opt = _setup(tmp_path / "run")
    out = model.save_pretrained(tmp_path / "export")
    return out, cfg


def test_exported_model_without_config_or_with_a_mismatched_one(tmp_path, monkeypatch):
    out, _ = _export(tmp_path)
    good = json.loads((out / "config.json").read_text())
    (out / "config.json").unlink()
    with pytest.raises(FaceVAEError, match=r"config.json: missing"):
        FaceVAE.from_pretrained(out)
    wider = dict(good, width=0.25)
    (out / "config.json").write_text(json.dumps(wider))
    with pytest.raises(FaceVAEError, match=r"does not match .*config.json.*shape") as exc:
        FaceVAE.from_pretrained(out)
    assert "\n" not in str(exc.value)
    # a config far bigger than the weights (8 = the largest width a config may ask for): refused from the file
    # header, before any model is built (width 1000 is refused by the config bounds already)
    (out / "config.json").write_text(json.dumps(dict(good, width=8)))
    built = []
    monkeypatch.setattr(FaceVAE, "reset_parameters", lambda self: built.append(next(self.parameters()).device))
    with pytest.raises(FaceVAEError, match=r"does not match .*width=8"):
        FaceVAE.from_pretrained(out)
    assert all(d.type == "meta" for d in built)


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno
    import os

    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=2, keep_last=1)
    _save(mgr, cfg, model, opt, 2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_2").iterdir()}
    real_fsync, calls = os.fsync, []

    def full(fd):  # the third file of the checkpoint hits a full disk
        calls.append(fd)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunError, match=r"disk full.*checkpoints/.tmp-step_4") as exc:
        _save(mgr, cfg, model, opt, 4)
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_2").iterdir()} == before
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert not (tmp_path / "checkpoints" / ".tmp-step_4").exists()  # the partial one is removed (frees the space)
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(os, "fsync", full)
        with pytest.raises(RunError, match=r"disk full.*best"):
            mgr.save_best(model=model, state=TrainState(step=4), cfg=cfg, val_loss=0.5)


def test_kill_between_the_renames_of_best_is_recovered(tmp_path, capsys):
    from facevae_dist.train.checkpoint import remove_stale_temps, resolve_which

    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=2, keep_last=2)
    _save(mgr, cfg, model, opt, 2)
    mgr.save_best(model=model, state=TrainState(step=2), cfg=cfg, val_loss=0.5)
    _save(mgr, cfg, model, opt, 4)
    # killed after best/ was moved aside and before the new one was renamed in; plus an atomic write's temp
    (tmp_path / "best").rename(tmp_path / ".old-best-12345")
    (tmp_path / ".tmp-best").mkdir()
    (tmp_path / "checkpoints" / ".latest.abc123.tmp").write_text("step_4\n")
    # evaluation before any resume still finds the best weights, and says what it picked
    assert resolve_which(tmp_path, "best").name == ".old-best-12345"
    removed = remove_stale_temps(tmp_path)
    assert (tmp_path / "best" / "meta.json").is_file() and json.loads((tmp_path / "best" / "meta.json").read_text())["step"] == 2
    assert not list(tmp_path.glob(".old-*")) and not (tmp_path / ".tmp-best").exists()
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert any(".latest" in p.name for p in removed)
    # a killed re-save of a step: its directory is restored too
    (tmp_path / "checkpoints" / "step_4").rename(tmp_path / "checkpoints" / ".old-step_4-999")
    remove_stale_temps(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_4"]


def test_best_absent_is_not_labelled_best(tmp_path, capsys):
    from facevae_dist.train.checkpoint import checkpoint_label, resolve_which

    cfg, model, opt = _setup(tmp_path)
    _save(CheckpointManager(tmp_path, every=2, keep_last=2), cfg, model, opt, 2)
    picked = resolve_which(tmp_path, "best")
    assert picked.name == "step_2" and checkpoint_label(picked) == "step_2"
    assert "best/" in capsys.readouterr().err  # says it fell back, and to what
    CheckpointManager(tmp_path, every=2, keep_last=2).save_best(model=model, state=TrainState(step=2), cfg=cfg,
                                                                val_loss=0.5)
    assert checkpoint_label(resolve_which(tmp_path, "best")) == "best"


def test_weights_written_over_a_checkpoint_are_refused_not_trained_on(tmp_path, capsys):
    """Another model's weights written into a checkpoint directory (an export into it, a copy) used to be loaded
    by a resume and by eval; meta.json's sha256 of the model files now refuses them in one line naming the file,
    and --resume auto keeps the replaced checkpoint aside and resumes from the previous one."""
    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=2, keep_last=3)
    _save(mgr, cfg, model, opt, 2)
    step_4 = _save(mgr, cfg, model, opt, 4)
    mgr.save_best(model=model, state=TrainState(step=4), cfg=cfg, val_loss=0.5)
    torch.manual_seed(1)
    other = FaceVAE(cfg.model)  # same architecture, other weights: loads without any shape error
    for where in (step_4, tmp_path / "best"):
        other.save_pretrained(where)
    with pytest.raises(RunError, match=r"step_4/model.safetensors: not the file this checkpoint saved") as exc:
        load_checkpoint(step_4)
    assert "\n" not in str(exc.value)
    for which in ("step_4", "best"):
        with pytest.raises(RunError, match=rf"{which}/model.safetensors: not the file"):
            load_model(tmp_path, which)
    assert resolve_resume(tmp_path, "auto").name == "step_2"
    assert "step_4" in capsys.readouterr().err and any(".damaged-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_checkpoints_from_before_the_file_hashes_are_checked_by_their_weight_digest(tmp_path):
    cfg, model, opt = _setup(tmp_path)
    ck = _save(CheckpointManager(tmp_path, every=2, keep_last=3), cfg, model, opt, 2)
    meta = json.loads((ck / "meta.json").read_text())
    del meta["files_sha256"]  # as written before the hashes were recorded
    (ck / "meta.json").write_text(json.dumps(meta))
    assert load_model(tmp_path, "step_2")[2] == 2  # its own weights: the digest matches
    torch.manual_seed(1)
    FaceVAE(cfg.model).save_pretrained(ck)
    with pytest.raises(RunError, match=r"step_2/model.safetensors: its weights are not the ones"):
        load_model(tmp_path, "step_2")


def test_stale_after_resume_retires_the_later_checkpoints_and_their_best(tmp_path, capsys):
    from facevae_dist.train.checkpoint import retire_stale, stale_after_resume

    cfg, model, opt = _setup(tmp_path)
    mgr = CheckpointManager(tmp_path, every=2, keep_last=3)
    for step in (2, 4, 6):
        _save(mgr, cfg, model, opt, step)
    mgr.save_best(model=model, state=TrainState(step=4), cfg=cfg, val_loss=0.5)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    assert stale_after_resume(tmp_path, 6) is None and stale_after_resume(tmp_path, 4) == {
        "checkpoints": ["step_6"], "best": False, "why": "resumed at step 4, before step_6"}
    assert stale_after_resume(tmp_path, 6, new_data=True)["best"]  # best/ of other data: stale at any step
    stale = stale_after_resume(tmp_path, 2)
    assert stale["checkpoints"] == ["step_4", "step_6"] and stale["best"]
    dest = retire_stale(tmp_path, stale, 2)
    assert sorted(p.name for p in dest.iterdir()) == ["best", "metrics.jsonl", "step_4", "step_6", "why.txt"]
    assert [json.loads(line)["step"] for line in (dest / "metrics.jsonl").read_text().splitlines()] == [3, 4, 5, 6]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"] and not (tmp_path / "best").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    err = capsys.readouterr().err
    assert "step_4" in err and str(dest) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"step": 2, "x": "\xff"}'])
def test_a_deeply_nested_or_binary_meta_json_is_one_line(tmp_path, content):
    cfg, model, opt = _setup(tmp_path)
    ck = _save(CheckpointManager(tmp_path, every=2, keep_last=3), cfg, model, opt, 2)
    (ck / "meta.json").write_bytes(content)
    with pytest.raises(RunError, match=r"step_2/meta.json: (nested too deeply|not UTF-8).*damaged checkpoint") as exc:
        load_checkpoint(ck)
    assert "\n" not in str(exc.value)
