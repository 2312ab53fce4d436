"""`facevae bench train`: training images/s of the paper's model, and the trainer's host overhead per step.

One timed step is the trainer's own step (train_step.TrainStep: forward + losses + backward + device-side
non-finite skip + per-tensor clip + Keras Adam + BN guard) on random data already on the device (the data pipeline
has its own benchmark). Both the full model (mask decoder, SSIM + l1 + BCE/Dice, the released configuration) and
the no-mask model (SSIM + l1, H1) are measured. By default the default training configuration (channels_last,
fp32 on CPU / bf16 on CUDA), plus bf16 autocast on a CPU that has it natively (avx512_bf16/AMX); `full=True`
(`--full`) runs the precision x layout x compile matrix.

Host overhead (`host_overhead` in the JSON), on a small config where the host's share is largest: the trainer's
step against a bare loop of the same model, losses, clip and Adam (forward, backward, clip, optimizer.step,
zero_grad, nothing else), under torch.profiler: ATen ops per step, host reads of a device scalar per step
(`aten::_local_scalar_dense`, i.e. .item()/.tolist()/bool(t): a sync on a GPU) and how many of them come from
inside optimizer.step, ms per step and the images/s ratio.
Reference (PAPER_TF_REFERENCES): the authors' own TensorFlow code at batch 32, 144 px, measured beside this bench.
`vs_paper_tf` (the "vs TF" column) is given only where a reference was timed as the authors train (model.fit) on the
same CPU model with the same speed-relevant flags (SPEED_FLAG_PREFIXES: AVX2, AVX-512, its bf16/fp16 parts, AMX): a figure from another CPU says
nothing about this one (an Intel Xeon with AMX was once shown 1.26x against a TF figure from an Intel Xeon without
it, where TF measured beside it gave 0.92-0.96x). Elsewhere the references are listed as documentation, each with
the machine it came from. Results are written as JSON after every row (atomically).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich import box
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from facevae_dist.config import TrainConfig
from facevae_dist.errors import UsageError
from facevae_dist.fileio import atomic_write_json
from facevae_dist.hypotheses import resolve_hypothesis
from facevae_dist.losses import compute_losses
from facevae_dist.model import FaceVAE
from facevae_dist.perf import cpu_flags, cpu_has_native_bf16, cpu_model, keep_freed_memory
from facevae_dist.progress import console, info
from facevae_dist.runinfo import environment_info
from facevae_dist.train.distributed import make_accelerator
from facevae_dist.train.optim import build_optimizer, clip_gradients_
from facevae_dist.train.step import TrainStep

CONFIG_TOKENS = ("fp32", "bf16", "fp16", "channels_last", "compile")
# The two models benchmarked: the paper's released configuration and its no-mask counterpart.
MODELS = {"mask+decoder": "ssim+l1/mask+decoder", "none": "ssim+l1/none"}
# The flags that decide how fast these kernels run; a reference is comparable only with the same set.
SPEED_FLAG_PREFIXES = ("avx512_bf16", "avx512_fp16", "amx", "avx512f", "avx2")
# The authors' own TF code (training.py at b694a18: Keras, Adam clipnorm 1e-3) at batch 32, 144 px, on 2-core machines
# of this project. "cpu_model" is /proc/cpuinfo's model name exactly and "flags" the machine's speed flags exactly
# (None: not recorded, so never compared against, only listed). "path" is how TF was timed: "fit" is how the authors
# train (model.fit over a tf.data pipeline, tools/paper_tf_fit.py); only a "fit" figure is ever compared against.
PAPER_TF_REFERENCES = (
    {"cpu": "AMD EPYC with AVX-512 and avx512_bf16 (Zen 4), 2 cores", "cpu_model": "AMD EPYC",
     "flags": ("avx2", "avx512_bf16", "avx512f"), "path": "fit", "img_s": {"none": 15.44, "mask+decoder": 12.14},
     "source": "TF 2.15.1 model.fit on a cached tf.data (tools/paper_tf_fit.py), interleaved with this bench on "
               "2026-12-07, median of 3 rounds"},
    {"cpu": "Intel Xeon, 2 cores (no native bf16)", "cpu_model": None, "flags": None, "path": None,
     "img_s": {"none": 16.0, "mask+decoder": 13.0}, "source": "TF 2.15 (how it was timed, the exact model and flags "
                                                               "not recorded)"},
)
CLIP_NORM = 1e-3
TIMED = ("the trainer's step (TrainStep: forward, losses, backward, non-finite skip, clip, Keras Adam) on one batch "
         "of random images already on the device; the config names the layout (channels_last), the precision (fp32, "
         "or bf16 autocast) and torch.compile")
FULL_CONFIGS = ("fp32", "bf16", "channels_last", "channels_last+bf16", "compile")
# The host-overhead comparison: small enough that host work is a visible share of a step.
OVERHEAD_CONFIG = {"image_size": 36, "width": 0.25, "batch_size": 8}


def default_configs(device: str) -> list[str]:
    """What `facevae train` runs by default on this device (channels_last; bf16 autocast on CUDA, fp32 on CPU)."""
    return ["channels_last+bf16"] if device == "cuda" else ["channels_last"]


def quick_configs(device: str) -> list[str]:
    """The bench's default: the default training config, and on a CPU that does bf16 natively (avx512_bf16 or
    AMX) the same under bf16 autocast (`--set mixed_precision=bf16`), the fastest choice there. Elsewhere bf16
    on a CPU is emulated and slower, so it is left to --full."""
    return default_configs(device) + (["channels_last+bf16"] if device == "cpu" and cpu_has_native_bf16() else [])


def speed_flags(flags) -> tuple[str, ...]:
    """The speed-relevant subset (SPEED_FLAG_PREFIXES) of a CPU's flags, sorted."""
    return tuple(sorted(f for f in flags if f.startswith(SPEED_FLAG_PREFIXES)))


def this_cpu() -> tuple[str, tuple[str, ...]]:
    """(model name, speed flags) of the CPU this process runs on."""
    return cpu_model(), speed_flags(cpu_flags())


def paper_tf_reference(cpu: tuple[str, tuple[str, ...]] | None = None) -> dict | None:
    """The PAPER_TF_REFERENCES entry timed with model.fit on the same CPU model with the same speed flags as `cpu`
    (default: this one), or None."""
    model, flags = cpu if cpu is not None else this_cpu()
    return next((r for r in PAPER_TF_REFERENCES
                 if r["path"] == "fit" and r["cpu_model"] == model.strip() and r["flags"] is not None
                 and tuple(sorted(r["flags"])) == speed_flags(flags)), None)


def vs_paper_tf(row: dict, reference: dict | None) -> float | None:
    """img/s of a CPU row against the TF reference of the same CPU at the reference's setting (batch 32, 144 px)."""
    if reference is None or row.get("img_s") is None or row.get("batch_size") != 32 or row.get("image_size") != 144:
        return None
    return round(row["img_s"] / reference["img_s"][row["model"]], 2)


def parse_config(text: str, device: str) -> dict:
    """"channels_last+bf16" -> {"amp": "bf16", "channels_last": True, "compile": False}."""
    tokens = [t for t in text.strip().split("+") if t]
    bad = [t for t in tokens if t not in CONFIG_TOKENS]
    if not tokens or bad:
        raise UsageError(f"bench config {text!r}: unknown part(s) {bad or [text]}; use {', '.join(CONFIG_TOKENS)} "
                         "joined with '+', e.g. channels_last+bf16")
    amps = [t for t in tokens if t in ("fp32", "bf16", "fp16")]
    if len(amps) > 1:
        raise UsageError(f"bench config {text!r}: choose one of fp32, bf16, fp16")
    amp = amps[0] if amps else "fp32"
    if amp == "fp16" and device != "cuda":
        raise UsageError(f"bench config {text!r}: fp16 (with loss scaling) is for CUDA only; use bf16 on CPU")
    return {"amp": amp, "channels_last": "channels_last" in tokens, "compile": "compile" in tokens}


def _synthetic_batch(batch_size: int, size: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch_size, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    face = ((xx / 0.6) ** 2 + (yy / 0.8) ** 2).lt(1).float()  # an ellipse "face", about 38% of the pixels
    mask = face.expand(batch_size, 1, size, size).clone()
    image, mask = image.to(device), mask.to(device)
    if channels_last:
        image, mask = image.contiguous(memory_format=torch.channels_last), mask.contiguous(memory_format=torch.channels_last)
    return image, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_config(model_key: str, opts: dict, image_size: int, width: float | None = None) -> TrainConfig:
    model = {"image_size": image_size, **({"width": width} if width is not None else {})}
    return TrainConfig.from_hypothesis(MODELS[model_key], model=model, log_with="none", run_dir="bench",
                                       channels_last=opts["channels_last"], compile=opts["compile"],
                                       mixed_precision={"fp32": "no"}.get(opts["amp"], opts["amp"]),
                                       optim={"clip_value": CLIP_NORM})


def make_steps(cfg: TrainConfig, device: torch.device):
    """(trainer_step, bare_step, model) for one config: the trainer's TrainStep (under a real Accelerator, as in
    train.py) and the bare loop, each with its own model and optimizer from the same seed. Each returns the loss."""

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    accelerator = make_accelerator(cfg)

    def build():
        torch.manual_seed(0)
        model = FaceVAE(cfg.model).to(device).train()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, build_optimizer(model.parameters(), cfg.optim)

    model, optimizer = build()
    wrapped = accelerator.prepare(model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    step = TrainStep(model=wrapped, raw_model=model, optimizer=optimizer, scaler=scaler, accelerator=accelerator,
                     cfg=cfg, amp_dtype=amp_dtype, use_deepspeed=False)
    flags = torch.zeros(64, device=device)  # what train.py's _BadSteps.record does per step
    counter = [0]

    def trainer_step(image, mask):
        terms, bad = step([(image, mask)])
        flags[counter[0] % 64] = bad
        counter[0] += 1
        return terms["loss"]

    bare_model, bare_opt = build()
    bare_fwd = torch.compile(bare_model) if cfg.compile else bare_model
    bare_scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    params = [p for p in bare_model.parameters() if p.requires_grad]

    def bare_step(image, mask):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = bare_fwd(image, mask if cfg.model.mask_mode != "none" else None)
        losses = compute_losses(out, image, mask, cfg.loss, cfg.model)
        bare_scaler.scale(losses["loss"]).backward()
        bare_scaler.unscale_(bare_opt)
        clip_gradients_(params, cfg.optim.clip, cfg.optim.clip_value)
        bare_scaler.step(bare_opt)
        bare_scaler.update()
        bare_opt.zero_grad(set_to_none=True)
        return losses["loss"].detach()

    return trainer_step, bare_step, model


def bench_one(model_key: str, config: str, batch_size: int, steps: int, warmup: int, device: torch.device,
              image_size: int = 144, reference: dict | None = None) -> dict:
    """Time `steps` trainer steps after `warmup` untimed ones; returns one result row."""
    opts = parse_config(config, device.type)
    hyp = resolve_hypothesis(MODELS[model_key])
    cfg = _train_config(model_key, opts, image_size)
    image, mask = _synthetic_batch(batch_size, image_size, device, opts["channels_last"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer_step, _, _ = make_steps(cfg, device)

    def step():
        return trainer_step(image, mask)

    row = {"model": model_key, "hypothesis": hyp.name, "config": config, "batch_size": batch_size,
           "image_size": image_size, "steps": steps, "warmup": warmup}
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 3)
        times, cpu_times, loss = [], [], None
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    except torch.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0])
        return row
    except Exception as exc:  # a compile/backend failure is a result to record, not a reason to lose the others
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return row
    total = sum(times)
    loss_value = float(loss)
    row.update(
        status="ok" if math.isfinite(loss_value) else "non-finite loss",
        img_s=round(batch_size * steps / total, 2),
        step_s_median=round(statistics.median(times), 4),
        step_s=[round(t, 4) for t in times],
        # Process CPU seconds per step (all threads): robust to other processes sharing the cores, so configs
        # measured on a busy machine can still be compared; wall time is what the table's img/s uses.
        cpu_s_median=round(statistics.median(cpu_times), 4),
        final_loss=loss_value,
    )
    if device.type == "cpu":
        # What the step would take with the torch threads to itself (CPU time spread over the threads).
        row["img_s_if_cores_free"] = round(batch_size / (row["cpu_s_median"] / torch.get_num_threads()), 2)
    if device.type == "cuda":
        row["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    ratio = vs_paper_tf(row, reference) if device.type == "cpu" else None
    if ratio is not None:
        row["vs_paper_tf"] = ratio
    return row


def _cpu_flags() -> list[str]:
    return list(this_cpu()[1])


@contextlib.contextmanager
def _without_profiler_chatter():
    """torch.profiler's C++ side prints a "USDT: ... profiler_start/stop" line to stderr (fd 2) at each start and
    stop; keep everything else it writes there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))


def host_overhead(model_key: str, device: torch.device, *, steps: int = 6, rounds: int = 3,
                  image_size: int = OVERHEAD_CONFIG["image_size"], width: float = OVERHEAD_CONFIG["width"],
                  batch_size: int = OVERHEAD_CONFIG["batch_size"]) -> dict:
    """The trainer's step vs the bare loop on a small config (see the module docstring)."""
    opts = parse_config(default_configs(device.type)[0], device.type)
    cfg = _train_config(model_key, opts, image_size, width)
    image, mask = _synthetic_batch(batch_size, image_size, device, opts["channels_last"])
    trainer_step, bare_step, _ = make_steps(cfg, device)
    row: dict = {"model": model_key, "config": default_configs(device.type)[0], "image_size": image_size,
                 "width": width, "batch_size": batch_size, "steps": steps, "rounds": rounds}
    for name, fn in (("bare", bare_step), ("trainer", trainer_step)):
        for _ in range(2):  # warm-up (first-step allocations, optimizer state)
            fn(image, mask)
        _sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with _without_profiler_chatter(), profile(activities=activities) as prof:
            for _ in range(steps):
                fn(image, mask)
            _sync(device)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        reads = [e for e in events if e.name == "aten::_local_scalar_dense"]
        row[name] = {"aten_ops_per_step": round(sum(e.name.startswith("aten::") for e in events) / steps, 1),
                     "scalar_reads_per_step": round(len(reads) / steps, 2),
                     "scalar_reads_in_optimizer_per_step": round(sum(_in_optimizer(e) for e in reads) / steps, 2)}
    times: dict[str, list[float]] = {"bare": [], "trainer": []}
    cpu_times: dict[str, list[float]] = {"bare": [], "trainer": []}
    for _ in range(rounds):  # interleaved, so a busy neighbour slows both alike
        for name, fn in (("bare", bare_step), ("trainer", trainer_step)):
            for _ in range(steps):
                t, c = time.perf_counter(), time.process_time()
                fn(image, mask)
                _sync(device)
                times[name].append(time.perf_counter() - t)
                cpu_times[name].append(time.process_time() - c)
    for name, ts in times.items():
        row[name]["ms_per_step_median"] = round(1000 * statistics.median(ts), 3)
        row[name]["img_s"] = round(batch_size / statistics.median(ts), 2)
        # process CPU seconds per step: less sensitive than wall time to other processes sharing the cores
        row[name]["cpu_ms_per_step_median"] = round(1000 * statistics.median(cpu_times[name]), 3)
    row["aten_ops_ratio"] = round(row["trainer"]["aten_ops_per_step"] / row["bare"]["aten_ops_per_step"], 3)
    row["img_s_ratio"] = round(row["trainer"]["img_s"] / row["bare"]["img_s"], 3)
    row["img_s_ratio_by_cpu_time"] = round(row["bare"]["cpu_ms_per_step_median"]
                                           / row["trainer"]["cpu_ms_per_step_median"], 3)
    row["host_ms_per_step_beyond_bare"] = round(row["trainer"]["ms_per_step_median"]
                                                - row["bare"]["ms_per_step_median"], 3)
    row["targets"] = {"no_scalar_read_outside_optimizer": row["trainer"]["scalar_reads_per_step"]
                      - row["trainer"]["scalar_reads_in_optimizer_per_step"] == 0,
                      "aten_ops_ratio_le_1.3": row["aten_ops_ratio"] <= 1.3, "img_s_ratio_ge_0.85": row["img_s_ratio"] >= 0.85}
    return row


def _in_optimizer(event) -> bool:
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def run_train_bench(out: Path, batch_sizes: list[int], steps: int, warmup: int, configs: list[str] | None,
                    device: str, *, image_size: int = 144, full: bool = False, overhead: bool = True,
                    cpu: tuple[str, tuple[str, ...]] | None = None) -> dict:
    """Benchmark every (batch size, model, config); write `out` (JSON) after each row; return the result dict.
    configs None: the default training config (FULL_CONFIGS with full=True). `image_size` other than the paper's
    144 only serves tests (the same architecture with fewer stages). `cpu`: the (model name, flags) the TF
    references are matched against (default: this CPU's; tests inject another)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this torch build")
    if steps < 1 or warmup < 0:
        raise UsageError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"--batch-sizes must be positive integers (got {batch_sizes})")
    if configs is None:
        configs = list(FULL_CONFIGS) if full else quick_configs(device)
    if not configs:
        raise UsageError("--configs is empty")
    for c in configs:
        parse_config(c, device)  # fail fast, before any timing
    if any("compile" in c.split("+") for c in configs) and warmup < 1:
        raise UsageError("compile configurations need --warmup >= 1 (the first step compiles)")
    dev = torch.device(device)
    reference = paper_tf_reference(cpu) if device == "cpu" else None
    malloc_tuned = keep_freed_memory()  # as the trainer does: avoids ~1M page faults per step on CPU
    result = {
        "benchmark": "train",
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if device == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc_keep_freed_memory": malloc_tuned,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timed": TIMED,
        "reference_paper_tf": reference,  # what vs_paper_tf divides by (None: none measured on this CPU and flags)
        # with no reference of this CPU: every reference, as documentation of the machine it came from
        "paper_tf_references_elsewhere": [] if reference is not None else list(PAPER_TF_REFERENCES),
        "environment": environment_info(1),
        "rows": [],
    }
    for bs in batch_sizes:
        for model_key in MODELS:
            for config in configs:
                info(f"bench train: {model_key} {config} batch {bs} ...")
                row = bench_one(model_key, config, bs, steps, warmup, dev, image_size=image_size, reference=reference)
                result["rows"].append(row)
                atomic_write_json(out, result)
    if overhead:
        result["host_overhead"] = []
        for model_key in MODELS:
            info(f"bench train: host overhead, {model_key} (trainer step vs bare loop, small config) ...")
            result["host_overhead"].append(host_overhead(model_key, dev))
            atomic_write_json(out, result)
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["best"] = _best_per_model(result["rows"])
    atomic_write_json(out, result)
    _print_table(result)
    return result


def _best_per_model(rows: list[dict]) -> dict:
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = f"{r['model']}@{r['batch_size']}"
        if key not in best or r["img_s"] > best[key]["img_s"]:
            best[key] = {"config": r["config"], "img_s": r["img_s"]}
    return best


def _tf_figures(reference: dict) -> str:
    return ", ".join(f"{model} {img_s:g} img/s" for model, img_s in reference["img_s"].items())


def _print_table(result: dict) -> None:
    table = Table(title=f"facevae bench train — {result['device_name']}, {result['torch_threads']} torch threads")
    # few, short columns that fit an 80-column terminal uncut (CPU time per step and the rest are in the JSON)
    gpu = result["device"] == "cuda"
    reference = result.get("reference_paper_tf")  # a ratio column only against a TF figure of this CPU and flags
    cols = (["model", "config", "batch", "img/s", "s/step"] + (["vs TF"] if reference else [])
            + (["GPU mem"] if gpu else []) + ["status"])
    table.box = box.SIMPLE_HEAD
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "config", "status") else "right", no_wrap=True)
    for r in result["rows"]:
        mem = r.get("max_memory_allocated_bytes")
        cells = [r["model"], r["config"], str(r["batch_size"]), f"{r['img_s']:.1f}" if "img_s" in r else "-",
                 f"{r['step_s_median']:.2f}" if "step_s_median" in r else "-"]
        cells += [f"{r['vs_paper_tf']:.2f}x" if "vs_paper_tf" in r else "-"] if reference else []
        cells += [f"{mem / 2**30:.2f} GiB" if mem else "-"] if gpu else []
        cells.append("ok" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error', '')}"[:40])
        table.add_row(*cells)
    console.print(table)
    console.print(f"timed: {result['timed']}", markup=False)
    if reference:
        console.print(f"s/step: median wall time of a step; vs TF: against the authors' TensorFlow code trained with "
                      f"model.fit on this CPU model and flags ({reference['cpu']}: {_tf_figures(reference)}; batch "
                      "32, 144 px rows only)", markup=False)
    else:
        console.print("s/step: median wall time of a step. No TF reference (model.fit) was measured on this CPU model "
                      "and flags "
                      f"({result['cpu_model']}: {', '.join(result['cpu_flags']) or 'no AVX2/AVX-512/AMX'}), so no "
                      "ratio is shown; the authors' TensorFlow code measured elsewhere (documentation only, not "
                      "comparable):", markup=False)
        for ref in result.get("paper_tf_references_elsewhere", []):
            console.print(f"  {ref['cpu']}: {_tf_figures(ref)} ({ref['source']})", markup=False)
    for r in result.get("host_overhead", []):
        console.print(f"host overhead ({r['model']}, {r['image_size']} px, width {r['width']}, batch {r['batch_size']}): "
                      f"ATen ops/step {r['trainer']['aten_ops_per_step']:.0f} vs bare {r['bare']['aten_ops_per_step']:.0f} "
                      f"({r['aten_ops_ratio']:.2f}x), scalar reads/step {r['trainer']['scalar_reads_per_step']:g} "
                      f"(bare {r['bare']['scalar_reads_per_step']:g}), img/s {r['img_s_ratio']:.2f}x bare, "
                      f"{r['host_ms_per_step_beyond_bare']:+.1f} ms/step")
