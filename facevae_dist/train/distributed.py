"""Accelerate and DeepSpeed plumbing for the trainer (and `facevae bench train`): the Accelerator, the DeepSpeed
plugin built from a launch/ JSON plus the TrainConfig, the environment a one-process DeepSpeed run needs, and the
collectives the loop uses (broadcast, gather, mean over ranks, DeepSpeed's buffer sync and per-rank optimizer state).

DeepSpeed itself is imported only inside the functions that need it: it is optional and slow to import.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed

from facevae_dist.config import TrainConfig
from facevae_dist.data.loader import die_with_parent
from facevae_dist.errors import RunError, UsageError
from facevae_dist.fileio import atomic_write_json, read_json
from facevae_dist.train.tracking import make_trackers


def resolve_mixed_precision(value: str) -> str:
    """"auto" -> the launcher's choice (`accelerate launch` exports its profile's mixed_precision), else "bf16" on
    CUDA GPUs that support it, else "no". CPUs get fp32 unless asked: bf16 autocast pays only on CPUs with bf16 in
    hardware, and even there it changes the numerics the equivalence tests pin (the trainer says when it would pay:
    `cpu_has_native_bf16`)."""
    if value != "auto":
        return value
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launcher in ("no", "bf16", "fp16"):
        return launcher
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator: DDP (gloo on CPU, NCCL on GPU) without Accelerate's precision handling (the step
    does autocast + GradScaler itself), or DeepSpeed ZeRO from cfg.deepspeed."""
    # train() may run several times in one process (tests, a debug sweep): start from a clean Accelerate state.
    # The process group (PartialState) is kept: it belongs to the launcher.
    AcceleratorState._reset_state(reset_partial_state=False)
    exit_with_launcher()
    kwargs = {"gradient_accumulation_steps": cfg.grad_accum, "log_with": make_trackers(cfg),
              "project_dir": cfg.run_dir,
              "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))]}
    if cfg.deepspeed:
        plugin = deepspeed_plugin(cfg)
        _ensure_single_process_env()
        if not torch.cuda.is_available():
            _skip_deepspeed_shm_jit()
        return Accelerator(deepspeed_plugin=plugin, mixed_precision="no", **kwargs)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", **kwargs)


def _skip_deepspeed_shm_jit() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at init (tens of seconds, needs a compiler).
    It only speeds up intra-node CPU collectives, which gloo does anyway, so mark it unavailable."""
    import deepspeed.ops  # optional and slow to import: only DeepSpeed runs pay for it

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _ensure_single_process_env() -> None:
    """DeepSpeed initialises torch.distributed even for one process; a plain `python` run has no launcher env."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def deepspeed_plugin(cfg: TrainConfig) -> DeepSpeedPlugin:
    """DeepSpeedPlugin from the JSON (explicit numbers only); the batch, accumulation, clipping, optimizer and
    precision numbers are filled from the TrainConfig so that there is one source of truth for them."""
    path = Path(cfg.deepspeed)
    try:
        ds = read_json(path, fix="--deepspeed names a DeepSpeed config such as launch/ds_zero2.json",
                       error=UsageError)
    except FileNotFoundError:
        raise UsageError(f"{path}: --deepspeed config not found") from None
    if not isinstance(ds, dict):
        raise UsageError(f"{path}: expected a JSON object (a DeepSpeed config such as launch/ds_zero2.json)")
    ds.pop("_comment", None)
    autos = [k for k, v in _walk(ds) if v == "auto"]
    if autos:
        raise UsageError(f"{path}: 'auto' values ({', '.join(autos)}) are not allowed; write explicit numbers")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UsageError(f"{path}: zero_optimization.stage={stage} is not supported (use 1 or 2)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.grad_accum * world
    ds["gradient_clipping"] = cfg.optim.clip_value if cfg.optim.clip == "global" else 0.0
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    opt.setdefault("params", {}).update(lr=cfg.optim.lr, betas=list(cfg.optim.betas), eps=cfg.optim.eps,
                                        weight_decay=cfg.optim.weight_decay, torch_adam=True, adam_w_mode=False)
    # DeepSpeed's bf16 mode casts the whole module, BatchNorm statistics included, which BN cannot run with; keep
    # fp32 weights in the engine and get bf16 compute from the loop's autocast instead.
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.run_dir) / "deepspeed.json", ds)  # what actually ran
    return DeepSpeedPlugin(hf_ds_config=ds)


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---- ranks that stop answering, launchers that die -----------------------------------------------------------------

EVAL_DIST_TIMEOUT_S = 300.0  # the evaluator's collective timeout (training's is TrainConfig.dist_timeout_s)


def exit_with_launcher() -> None:
    """Under a multi-process launcher (torchrun, accelerate launch, srun), have the kernel send this rank SIGTERM
    when its launcher dies (Linux PR_SET_PDEATHSIG): a SIGKILLed launcher would otherwise leave every rank training
    on as an orphan. SIGTERM is the trainer's preemption signal, so the ranks checkpoint together and exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.getppid() != 1:
        die_with_parent(os.getppid(), signal.SIGTERM)


def is_collective_timeout(exc: BaseException) -> bool:
    """gloo's "Timed out waiting Nms for recv/send operation", the c10d and NCCL watchdog timeouts."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Timed out" in text or "timed out" in text or "Timeout" in text)


class RankWatch:
    """Every rank's heartbeat in the process group's key-value store (the launcher's TCPStore, reachable while a
    rank is frozen): a thread writes "<time> <step>" every few seconds, so a rank whose collective times out can
    name the ranks that stopped answering and the step each last finished. A rank blocked in a collective keeps
    beating (the wait releases the GIL); a frozen (SIGSTOP) or dead one does not."""

    PREFIX = "facevae/heartbeat/"

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.state = None  # the run's TrainState once there is one: its .step is the last finished step
        self.interval = max(0.5, min(10.0, timeout_s / 6))
        self.store = _default_store() if world > 1 else None
        self._stop = threading.Event()
        if self.store is not None:
            threading.Thread(target=self._beat, name="facevae-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.set(f"{self.PREFIX}{self.rank}", f"{time.time():.1f} {self.step}")
            except Exception:  # noqa: BLE001 - the store went away with the launcher: nothing to report to
                return
            self._stop.wait(self.interval)

    @property
    def step(self) -> int:
        return getattr(self.state, "step", 0)

    def close(self) -> None:
        self._stop.set()

    def stalled(self) -> RunError:
        """The one line for a collective that timed out on this rank."""
        silent = []
        try:
            self.store.set_timeout(timedelta(seconds=5))  # the store itself may be held by the frozen rank
            now = time.time()
            for r in range(self.world):
                key = f"{self.PREFIX}{r}"
                if r == self.rank or not self.store.check([key]):
                    continue
                beat, step = self.store.get(key).decode().split()
                if now - float(beat) > 3 * self.interval:
                    silent.append(f"rank {r} (silent for {now - float(beat):.0f} s, last finished step {step})")
        except Exception:  # noqa: BLE001 - no store to ask: say what this rank knows
            silent = []
        who = ", ".join(silent) if silent else "another rank"
        return RunError(f"rank {self.rank} waited {self.timeout_s:g} s in a collective after step {self.step}: {who} "
                        "stopped answering (frozen, killed, or stuck in I/O); the run is ended and its last "
                        "checkpoint kept: rerun the same command to resume (--set dist_timeout_s=N to wait longer)")


def _default_store():
    try:  # torch keeps the default group's store private; without it the timeout message names no rank
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001
        return None


# ---- collectives ------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    set_seed(seed)


def broadcast_object(accelerator: Accelerator, value):
    """Rank 0's `value` on every rank."""
    return value if accelerator.num_processes == 1 else broadcast_object_list([value])[0]


def gather_objects(accelerator: Accelerator, value) -> list:
    """Every rank's `value`, in rank order."""
    return [value] if accelerator.num_processes == 1 else gather_object([value])


def mean_over_ranks(accelerator: Accelerator, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms averaged over ranks, "loss" first (one host read)."""
    keys = sorted(terms, key=lambda k: (k != "loss", k))
    t = torch.stack([terms[k].float() for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "mean")
    return dict(zip(keys, t.tolist()))


def sync_buffers_for_deepspeed(raw_model: torch.nn.Module, use_ds: bool, world: int) -> None:
    """DeepSpeed, unlike DDP, does not broadcast buffers: make rank 0's BN statistics everyone's before they are
    validated or saved (the checkpoint's weights digest covers parameters only)."""
    if use_ds and world > 1:
        for b in raw_model.buffers():
            torch.distributed.broadcast(b, src=0)


# ---- DeepSpeed optimizer state: saved per rank, read back with weights_only=True and a 3-type allow-list -------


def _deepspeed_safe_types() -> list:
    # optional and slow to import: only DeepSpeed runs pay for it
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def save_deepspeed_optimizer(engine, directory: Path, rank: int) -> None:
    torch.save(engine.optimizer.state_dict(), directory / f"ds_optimizer_rank{rank}.pt")


def load_deepspeed_optimizer(engine, path: Path, rank: int, world: int) -> None:
    """ZeRO 1/2 state of this rank. Not DeepSpeed's load_checkpoint: it unpickles with weights_only=False."""
    file = Path(path) / f"ds_optimizer_rank{rank}.pt"
    if not file.is_file():
        raise RunError(f"{file}: missing; a DeepSpeed checkpoint resumes only with the same number of processes "
                       "(or start a new run dir)")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_types()):
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{file}: unreadable DeepSpeed optimizer state ({type(exc).__name__}: {exc})") from None
    # rigid (non-elastic) ZeRO checkpoints read only their own rank's entry; fp32 master weights come from it
    engine.optimizer.load_state_dict([sd] * world, load_optimizer_states=True, load_from_fp32_weights=True)


# ---- the evaluator's process group (no-ops in one process) --------------------------------------------------------


def join_process_group(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised). Uses an existing process group, or creates one from the launcher's
    environment (RANK/WORLD_SIZE/MASTER_ADDR set by torchrun or accelerate launch)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # all_gather_object over NCCL uses the current device
        exit_with_launcher()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=EVAL_DIST_TIMEOUT_S))
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def close_process_group(settle_s: float = 1.0) -> None:
    """Destroy the default process group, if any. A gloo group's destructor joins its worker threads while holding
    the GIL, and a worker that is still releasing the tensors of the last collective needs the GIL: destroyed right
    after a collective, the group can deadlock (seen on a loaded machine). Sleeping first releases the GIL so the
    workers finish; a mitigation, since torch exposes no way to wait for them (the trainer and the launcher exit
    avoid destroying the group at all)."""
    if dist.is_available() and dist.is_initialized():
        time.sleep(settle_s)
        dist.destroy_process_group()


def gather_from_ranks(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
