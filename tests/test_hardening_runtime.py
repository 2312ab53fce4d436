"""Issue 9, runtime side, end to end through `facevae`: a damaged newest checkpoint, a kill between the renames of
best/, and what evaluation then reports."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from train_helpers import build_tiny_shards, cli_args, run


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
