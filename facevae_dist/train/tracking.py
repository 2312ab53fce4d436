"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate: which ones a run uses, where each
writes inside the run directory, and what they get: scalars named train/... and val/..., the sample
reconstructions as images, and the hyperparameters once per run (flat, typed), so that TensorBoard's HParams view,
W&B's and MLflow's run comparisons line them up with each run's val/ metrics. metrics.jsonl stays the record the
project itself reads; a tracker is a view of it.

Where each writes, inside RUN_DIR:
    tensorboard/     TensorBoard event files (`tensorboard --logdir RUN_DIR`, or the parent of many runs)
    wandb/           W&B's run files; offline unless $WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-*`)
    mlruns/          an MLflow file store, unless $MLFLOW_TRACKING_URI names another
    tracking.json    the W&B and MLflow run ids of this run dir: a resumed run logs into the same tracker run

A resumed run continues the same tracker runs: TensorBoard hides the steps logged after the checkpoint it resumed
from (a SessionLog START, as metrics.jsonl drops those lines), W&B resumes by id, MLflow by run id. Each package is
imported only when its tracker is used.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import time
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from facevae_dist.config import TRACKERS, TrainConfig
from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.fileio import atomic_write_json, read_json

STATE_FILE = "tracking.json"
PROJECT = "facevae"  # the W&B project and MLflow experiment, unless $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME
LABELS = {"tensorboard": "TensorBoard", "wandb": "W&B", "mlflow": "MLflow"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None  # the packages are named as the trackers


def install_hint(name: str) -> str:
    return f"pip install -c constraints.txt -e '.[{name}]'"


def resolve_log_with(log_with: tuple[str, ...]) -> tuple[str, ...]:
    """("auto",) -> ("tensorboard",) when TensorBoard is installed, else ("none",); a named tracker whose package is
    missing is a usage error that says how to install it."""
    if log_with == ("auto",):
        return ("tensorboard",) if installed("tensorboard") else ("none",)
    missing = [n for n in log_with if n in TRACKERS and not installed(n)]
    if missing:
        raise UsageError(f"--log-with {','.join(log_with)}: {', '.join(missing)} is not installed; "
                         f"{install_hint(missing[0])}, or --log-with none")
    return log_with


def describe(cfg: TrainConfig, requested: tuple[str, ...]) -> str:
    """The one line that says where the tracker logs go, or why there are none."""
    run_dir = Path(cfg.run_dir)
    if cfg.log_with == ("none",):
        why = (f"TensorBoard is not installed: {install_hint('tensorboard')}" if requested == ("auto",)
               else "--log-with none")
        return f"tracking: none ({why}); metrics in {run_dir / 'metrics.jsonl'}"
    where = {
        "tensorboard": f"TensorBoard in {run_dir / 'tensorboard'} (tensorboard --logdir {run_dir})",
        "wandb": (f"W&B offline in {run_dir / 'wandb'} (wandb sync {run_dir / 'wandb'}/offline-run-*)"
                  if _wandb_mode() == "offline" else f"W&B {_wandb_mode()} (files in {run_dir / 'wandb'})"),
        "mlflow": f"MLflow at {mlflow_uri(run_dir)} (mlflow ui --backend-store-uri {mlflow_uri(run_dir)})",
    }
    return "tracking: " + "; ".join(where[n] for n in cfg.log_with)


# ---- building and starting the trackers ---------------------------------------------------------------------------


def make_trackers(cfg: TrainConfig) -> list[GeneralTracker] | None:
    """Accelerate's tracker objects for cfg.log_with (already resolved), for Accelerator(log_with=...). Built here
    rather than by name because each needs its own place and name: Accelerate would give all of them one project
    name (the TensorBoard subdirectory, the W&B project and the MLflow experiment at once)."""
    names = [n for n in cfg.log_with if n in TRACKERS]
    if not names:
        return None
    run_dir, ids = Path(cfg.run_dir), _read_state(Path(cfg.run_dir))
    name = run_name(run_dir)
    trackers = []
    for n in names:
        if n == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(run_dir)))
        elif n == "wandb":
            extra = {} if "WANDB_MODE" in os.environ else {"mode": "offline"}  # no network unless asked for
            if _wandb_mode() == "offline":  # nor W&B's crash reports (Sentry), which it sends even offline
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
            else:  # online, a resume continues the run of that id (offline, each start writes a segment of it)
                extra["resume"] = "allow"
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(run_dir), name=name,
                                         id=ids.get("wandb_id") or _new_wandb_id(), **extra))
        elif n == "mlflow":
            trackers.append(MLflowTracker(PROJECT, run_id=ids.get("mlflow_run_id"), run_name=name))
    return trackers


def init_trackers(accelerator: Accelerator, cfg: TrainConfig, resumed_step: int, world: int) -> None:
    """Start the trackers (rank 0; the others' are no-ops) and, on the run's first start, log its hyperparameters.
    Every rank calls it."""
    if not accelerator.log_with:
        return
    run_dir = Path(cfg.run_dir)
    if "mlflow" in cfg.log_with:
        _point_mlflow_at(run_dir)
    accelerator.init_trackers(PROJECT)  # no config here: Accelerate would log it again at every resume
    if not accelerator.is_main_process:
        return
    state = _read_state(run_dir)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and resumed_step:
            _hide_tensorboard_steps_after(tracker.writer, resumed_step)
        elif tracker.name == "wandb":
            state["wandb_id"] = tracker.run.id
        elif tracker.name == "mlflow":
            state["mlflow_run_id"] = tracker.active_run.info.run_id
    if not state.get("hparams_logged"):
        log_hparams(accelerator, hparams(cfg, world))
        state["hparams_logged"] = True
    atomic_write_json(run_dir / STATE_FILE, state)


def run_name(run_dir: Path) -> str:
    """The tracker run's name: the run directory's last two parts (runs/h9, paper10/seed-0)."""
    return "/".join(Path(os.path.abspath(run_dir)).parts[-2:])


def mlflow_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"file:{os.path.abspath(run_dir / 'mlruns')}"


def _wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


def _new_wandb_id() -> str:
    return secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9]


def _point_mlflow_at(run_dir: Path) -> None:
    import mlflow  # only MLflow runs pay for it

    uri = mlflow_uri(run_dir)
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store (kept in "maintenance mode") unless told: a store inside the run
        # directory needs no server and no database
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)


def _hide_tensorboard_steps_after(writer, step: int) -> None:
    """A SessionLog START at step + 1: TensorBoard's readers drop what earlier files logged at later steps (what
    the killed run logged after the checkpoint this run resumed from), as SummaryWriter(purge_step=...) does."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))


def _read_state(run_dir: Path) -> dict:
    try:
        state = read_json(run_dir / STATE_FILE, fix="new tracker runs are started")
        return state if isinstance(state, dict) else {}
    except (OSError, FaceVAEError):
        return {}  # none yet (a new run), or unreadable: start new tracker runs rather than fail the training


# ---- what the trackers get ----------------------------------------------------------------------------------------


def hparams(cfg: TrainConfig, world: int) -> dict[str, int | float | str | bool]:
    """The config as flat, typed values ("optim.lr": 1e-4, "model.mask_mode": "mask+decoder"); a list becomes
    one string ("ssim,l1"), since HParams and MLflow take scalars only."""
    flat: dict = {"world_size": world}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, list) else v

    walk(cfg.to_dict())
    return flat


def log_hparams(accelerator: Accelerator, values: dict) -> None:
    """Once per run. TensorBoard: the HParams plugin's session start info in the run's own event files (not
    SummaryWriter.add_hparams, which writes a separate timestamped run per call), so HParams takes each run's
    metrics from the scalars beside it: the last val/... of every run. W&B: the run config; MLflow: the params."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.file_writer.add_summary(_session_start_summary(values))
            tracker.writer.flush()
        else:
            tracker.store_init_configuration(values)


def _session_start_summary(values: dict):
    """The HParams plugin's session start info, with bools as bools (torch's hparams() makes them numbers)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for k, v in values.items():
        if isinstance(v, bool):
            info.hparams[k].bool_value = v
        elif isinstance(v, (int, float)):
            info.hparams[k].number_value = v
        else:
            info.hparams[k].string_value = str(v)
    content = plugin_data_pb2.HParamsPluginData(session_start_info=info, version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_START_INFO_TAG,
                                        metadata=SummaryMetadata(plugin_data=plugin))])


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: a training line's numbers as train/<key>, a validation line's
    val_<key> as val/<key>, an event's numbers as event/<name>/<key>."""
    if record.get("split") == "val":
        prefix, strip = "val/", "val_"
    elif "event" in record:
        prefix, strip = f"event/{record['event']}/", ""
    else:
        prefix, strip = "train/", ""
    return {prefix + k.removeprefix(strip): v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_image(accelerator: Accelerator, tag: str, image: np.ndarray, step: int) -> None:
    """One HxWx3 uint8 image, under `tag`, to every tracker (rank 0)."""
    for tracker in accelerator.trackers if accelerator.is_main_process else ():
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(image, key=tag.replace("/", "."), step=step)
