"""`facevae bench train`: training images/s of the paper's model, per precision / memory layout / compile setting.

One timed step = forward + compute_losses + backward + Adam step with the paper's per-tensor gradient clip,
on random data already on the device (the data pipeline has its own benchmark). Both the full model (mask decoder,
SSIM + l1 + BCE/Dice, the released configuration) and the no-mask model (SSIM + l1, H1) are measured.
Reference: the authors' TensorFlow code does ~16 img/s (no mask decoder) and ~13 (with) at batch 32 on the 2-core
CPU machine this project was developed on; results are written as JSON after every row (atomically).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from facevae_dist.errors import UsageError
from facevae_dist.fileio import atomic_write_json
from facevae_dist.hypotheses import resolve_hypothesis
from facevae_dist.losses import compute_losses
from facevae_dist.model import FaceVAE
from facevae_dist.perf import keep_freed_memory
from facevae_dist.progress import console, info
from facevae_dist.runinfo import environment_info

CONFIG_TOKENS = ("fp32", "bf16", "fp16", "channels_last", "compile")
# The two models benchmarked: the paper's released configuration and its no-mask counterpart.
MODELS = {"mask+decoder": "ssim+l1/mask+decoder", "none": "ssim+l1/none"}
PAPER_TF_IMG_S = {"none": 16.0, "mask+decoder": 13.0}  # TF 2.15, batch 32, 2-core CPU (issue 3)
CLIP_NORM = 1e-3


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


def clip_grad_norm_per_tensor_(params, max_norm: float) -> None:
    """Keras `clipnorm`: each gradient tensor separately to L2 norm <= max_norm (g * c / max(|g|, c))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = max_norm / norms.clamp(min=max_norm)
    torch._foreach_mul_(grads, list(scales.to(grads[0].dtype).unbind()))


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


def bench_one(model_key: str, config: str, batch_size: int, steps: int, warmup: int, device: torch.device,
              image_size: int = 144) -> dict:
    """Time `steps` training steps after `warmup` untimed ones; returns one result row."""
    opts = parse_config(config, device.type)
    hyp = resolve_hypothesis(MODELS[model_key])
    torch.manual_seed(0)
    model = FaceVAE(hyp.model_config(image_size=image_size)).to(device).train()
    loss_cfg = hyp.loss_config()
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4, eps=1e-7)
    step_model = torch.compile(model) if opts["compile"] else model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=opts["amp"] == "fp16")
    image, mask = _synthetic_batch(batch_size, image_size, device, opts["channels_last"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = step_model(image, mask)
            losses = compute_losses(out, image, mask, loss_cfg, model.cfg)
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
        clip_grad_norm_per_tensor_(params, CLIP_NORM)
        scaler.step(optimizer)
        scaler.update()
        return losses["loss"].detach()

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
    if device.type == "cpu" and batch_size == 32 and image_size == 144:
        row["vs_paper_tf"] = round(row["img_s"] / PAPER_TF_IMG_S[model_key], 2)
    return row


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_fp16", "amx", "avx512f", "avx2")))


def run_train_bench(out: Path, batch_sizes: list[int], steps: int, warmup: int, configs: list[str],
                    device: str, *, image_size: int = 144) -> dict:
    """Benchmark every (batch size, model, config); write `out` (JSON) after each row; return the result dict.
    `image_size` other than the paper's 144 only serves tests (the same architecture with fewer stages)."""
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
    if not configs:
        raise UsageError("--configs is empty")
    for c in configs:
        parse_config(c, device)  # fail fast, before any timing
    if any("compile" in c.split("+") for c in configs) and warmup < 1:
        raise UsageError("compile configurations need --warmup >= 1 (the first step compiles)")
    dev = torch.device(device)
    malloc_tuned = keep_freed_memory()  # as the trainer does: avoids ~1M page faults per step on CPU
    result = {
        "benchmark": "train",
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if device == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc_keep_freed_memory": malloc_tuned,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "reference_paper_tf_img_s_batch32_cpu": PAPER_TF_IMG_S,
        "environment": environment_info(1),
        "rows": [],
    }
    for bs in batch_sizes:
        for model_key in MODELS:
            for config in configs:
                info(f"bench train: {model_key} {config} batch {bs} ...")
                row = bench_one(model_key, config, bs, steps, warmup, dev, image_size=image_size)
                result["rows"].append(row)
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


def _print_table(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"facevae bench train — {result['device_name']}, {result['torch_threads']} torch threads")
    for col in ("model", "config", "batch", "img/s", "step s (median)", "CPU s/step", "img/s if cores free",
                "vs paper TF", "GPU mem", "status"):
        table.add_column(col, justify="right" if col not in ("model", "config", "status") else "left")
    for r in result["rows"]:
        mem = r.get("max_memory_allocated_bytes")
        table.add_row(r["model"], r["config"], str(r["batch_size"]), f"{r['img_s']:.1f}" if "img_s" in r else "-",
                      f"{r['step_s_median']:.3f}" if "step_s_median" in r else "-",
                      f"{r['cpu_s_median']:.2f}" if "cpu_s_median" in r else "-",
                      f"{r['img_s_if_cores_free']:.1f}" if "img_s_if_cores_free" in r else "-",
                      f"{r['vs_paper_tf']:.2f}x" if "vs_paper_tf" in r else "-",
                      f"{mem / 2**30:.2f} GiB" if mem else "-", r.get("status", "-") if r.get("status") == "ok"
                      else f"{r.get('status')}: {r.get('error', '')}"[:60])
    console.print(table)
