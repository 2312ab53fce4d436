"""`facevae bench data` at a tiny size: every path it measures runs and is reported (the speed is not asserted)."""

import json

import pytest

from facevae_dist.bench.data import TARGETS, run_data_bench
from facevae_dist.errors import UsageError


def test_bench_data_tiny_reports_every_path(tmp_path):
    out = tmp_path / "out" / "data.json"
    work = tmp_path / "work"
    work.mkdir()
    result = run_data_bench(out, n=200, workers=[0, 1], seed=0, image_size=18, work_dir=work)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert list(work.iterdir()) == []  # the temporary dataset is removed after
    n_train = result["train_images"]
    assert 0 < n_train < 200 and result["build"]["images"] == 200
    for w in ("0", "1"):
        read = result["read"][w]
        assert read["images"] == n_train - n_train % 32  # whole batches of one epoch
        assert read["images_per_s"] > 0 and read["images_per_s_per_core"] > 0
    assert result["per_file"]["images"] == n_train - n_train % 32
    assert result["raw_decode"]["images"] == n_train and result["raw_decode"]["pil_images_per_s_per_core"] > 0
    assert {"stream_w0", "stream_w1", "host", "raw_decode"} <= set(result["side_by_side"])
    assert set(result["targets_met"]) <= set(TARGETS) and "host_images_per_s_per_core" in result["targets_met"]
    assert result["env"]["versions"]["torch"] and result["env"]["torch_threads"] == 1


def test_bench_data_refuses_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="--n"):
        run_data_bench(tmp_path / "x.json", n=10, workers=[0], seed=0, image_size=18, work_dir=None)
    with pytest.raises(UsageError, match="--workers"):
        run_data_bench(tmp_path / "x.json", n=200, workers=[-1], seed=0, image_size=18, work_dir=None)
    assert not (tmp_path / "x.json").exists()
