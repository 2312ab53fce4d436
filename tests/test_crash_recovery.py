"""Recovery after a crash, end to end through `facevae`: a damaged newest checkpoint, a kill between the renames of
best/, and what evaluation then reports; a decoded-cache builder killed mid-build leaves no orphan decoder holding
the lock, and the next build completes; a damaged model config.json or export.json is one line naming the file,
never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_loader import _live_processes_in_group
from train_helpers import build_tiny_shards, cli_args, run

from facevae_dist.cli import main
from facevae_dist.data import cache as cache_mod
from facevae_dist.model import FaceVAE, ModelConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory.mktemp("shards") / "shards")


def _facevae(*args: str, timeout: float = 300):
    return run([sys.executable, "-m", "facevae_dist", *args], timeout=timeout)


def test_train_resumes_past_a_truncated_newest_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    train = ["train", *cli_args(shards, run_dir, "--ckpt-every", "2", "--keep-last", "3", "--val-every", "0")]
    _facevae(*train, "--max-steps", "4")
    newest = run_dir / "checkpoints" / "step_4" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = _facevae(*train, "--max-steps", "6")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 6
    warning = [line for line in proc.stderr.splitlines() if "do not load" in line]
    assert len(warning) == 1 and "step_2" in warning[0] and "step_4" in warning[0], proc.stderr[-3000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert any(n.startswith("step_4.damaged-") for n in names) and "step_6" in names, names
    assert "Traceback" not in proc.stderr


def test_eval_after_a_kill_between_the_renames_of_best(shards, tmp_path):
    run_dir = tmp_path / "run"
    _facevae("train", *cli_args(shards, run_dir, "--ckpt-every", "2", "--val-every", "2", "--max-steps", "2"))
    (run_dir / "best").rename(run_dir / ".old-best-4242")  # killed after moving best/ aside

    def evaluate(name: str) -> dict:
        out = tmp_path / name
        _facevae("-q", "eval", str(run_dir), "--split", "val", "--limit", "4", "--bootstrap", "10", "--out",
                 str(out))
        return json.loads(out.read_text())

    assert evaluate("a.json")["checkpoint"] == {"which": "best", "step": 2}  # the aside best/ is still the best
    shutil.rmtree(run_dir / ".old-best-4242")  # as if the run never validated: it says what it used
    assert evaluate("b.json")["checkpoint"] == {"which": "step_2", "step": 2}


_STUCK_BUILDER = """
import sys, time
from facevae_dist.data import cache

def stuck(*args, **kwargs):  # a decode that never ends: the build is always caught half-way
    time.sleep(3600)

cache.decode_into = stuck
cache.open_cache(sys.argv[1], "train", processes=2)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_cache_builder_killed_mid_build_leaves_no_orphan_and_the_next_build_completes(shards, tmp_path,
                                                                                        monkeypatch, sig):
    own = tmp_path / "s"
    shutil.copytree(shards, own, ignore=shutil.ignore_patterns("cache"))
    folder = cache_mod.cache_paths(own, "train").meta.parent
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_BUILDER, str(own)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # mid-build: temp files written, builder + 2 decoding processes alive
        while time.monotonic() < deadline and not (
                list(folder.glob(".*.tmp")) and len(_live_processes_in_group(proc.pid)) >= 3):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        assert list(folder.glob(".*.tmp")) and len(_live_processes_in_group(proc.pid)) >= 3, "never mid-build"
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # the kernel kills the orphaned decoders (PDEATHSIG); give it time
        while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _live_processes_in_group(proc.pid)
    finally:
        for pid in _live_processes_in_group(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.stderr.close()
    assert left == [], f"decoding processes outlived the killed builder: {left}"
    if sig == signal.SIGKILL:
        assert list(folder.glob(".*.tmp")), "the killed builder's temp files should be there for the next build"
    else:  # SIGTERM stops the build with its own clean-up (cache._signals_stop_the_build)
        assert list(folder.glob(".*.tmp")) == []
    monkeypatch.setattr(cache_mod, "CACHE_LOCK_WAIT_S", 120.0)  # a hang would become a one-line error, not a hang
    cache = cache_mod.open_cache(own, "train", processes=2)
    assert len(cache) == 96 and cache.corrupt == [] and np.asarray(cache.masks).any()
    assert list(folder.glob(".*.tmp")) == []  # the dead builder's temp files are gone


def _exported_model(path):
    torch.manual_seed(0)
    return FaceVAE(ModelConfig(image_size=18, width=0.125, latent_dim=8)).eval().save_pretrained(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _with_model(**fields):
    def damage(cfg_file):
        meta = json.loads(cfg_file.read_text())
        meta.update(fields)
        cfg_file.write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize("damage, expected", [
    (lambda f: f.write_bytes(b'{"format": "\xff\xfe\x00 binary"}'), "not a valid FaceVAE config"),
    (lambda f: f.write_text("[" * 200_000 + "]" * 200_000), "nested too deeply"),
    (_with_model(width=1e9), "model.width=1000000000.0 must be a number in (0, 8]"),
    (_with_model(latent_dim=10**12), "model.latent_dim=1000000000000 must be an integer in [1, 8192]"),
    (_with_model(latent_dim=1e12), "model.latent_dim=1000000000000.0 must be an integer"),
    (_with_model(latent_dim=True), "model.latent_dim=True must be an integer"),
], ids=["non-utf8", "deeply-nested", "width-1e9", "latent-1e12", "latent-1e12-float", "latent-bool"])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_damaged_model_config_json_is_one_line(tmp_path, capsys, damage, expected, command):
    model = _exported_model(tmp_path / "model")
    damage(model / "config.json")
    argv = (["sample", "--model", str(model), "--out", str(tmp_path / "s.png")] if command == "sample"
            else ["eval", str(model), "--shards", str(tmp_path / "no-shards")])
    assert main(argv) == 1
    line = _one_error_line(capsys)
    assert str(model / "config.json") in line and expected in line, line


@pytest.mark.parametrize("content, expected", [
    (b"[1, 2, 3]", "expected a JSON object (what `facevae export` writes), got a list"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8 text"),
    (b"{" * 100_000, "not valid JSON"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
], ids=["list", "binary", "truncated", "deeply-nested"])
def test_a_damaged_export_json_is_one_line_in_eval(tmp_path, capsys, content, expected):
    model = _exported_model(tmp_path / "model")
    (model / "export.json").write_bytes(content)
    assert main(["eval", str(model), "--shards", str(tmp_path / "no-shards")]) == 1
    line = _one_error_line(capsys)
    assert str(model / "export.json") in line and expected in line, line


@pytest.mark.parametrize("field, value, expected", [
    ("seed", "zero", "field 'seed' is \"zero\", expected an integer or null"),
    ("hypothesis", ["l2", "none"], "field 'hypothesis' is [\"l2\", \"none\"], expected a string or null"),
    ("step", True, "field 'step' is true, expected an integer or null"),
])
def test_a_mistyped_export_json_field_is_one_line_in_eval(tmp_path, capsys, field, value, expected):
    """Eval copies these fields into metrics.json, where `report` would trip on them later."""
    model = _exported_model(tmp_path / "model")
    (model / "export.json").write_text(json.dumps({field: value}))
    assert main(["eval", str(model), "--shards", str(tmp_path / "no-shards")]) == 1
    line = _one_error_line(capsys)
    assert str(model / "export.json") in line and expected in line, line
