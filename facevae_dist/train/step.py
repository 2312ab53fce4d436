"""One optimizer step without a host-device synchronisation: the part of the trainer that runs every step.

`forward_losses` (forward + compute_losses) is a pure function of (model, image, mask): what `--compile` hands to
torch.compile whole (with `compile_mode="reduce-overhead"` on CUDA: CUDA graphs). `TrainStep` wraps it in the
step: backward over the micro-batches, a non-finite check, clipping, the optimizer update and the BN-statistics
guard. Whether the step is skipped is decided ON THE DEVICE, as GradScaler does with `found_inf`:

- `bad` = any micro-batch loss non-finite, all-reduced over ranks as a tensor (every rank skips together);
- the optimizer takes it as `found_inf` (facevae_dist.train.optim.Adam: moments, step count and weights unchanged);
- BatchNorm running statistics are snapshotted and conditionally restored with foreach ops (no per-buffer Python);
- nothing calls .item(): the caller reads `bad` only at log steps (train.py's _BadSteps).

Backward runs even for a poisoned batch, so DDP's gradient all-reduce never waits on a rank that skipped it.
Under DeepSpeed the engine owns backward + step and cannot take `found_inf`: that path decides on the host (one
.item() per step; documented in train.py).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import Tensor

from facevae_dist.losses import compute_losses
from facevae_dist.train.optim import clip_gradients_


def forward_losses(model, image: Tensor, mask: Tensor, *, loss_cfg, model_cfg, amp_dtype) -> dict[str, Tensor]:
    """Weighted loss terms of one training forward pass (z sampled); fp32 losses, `amp_dtype` autocast or None."""
    with torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(image, mask if model_cfg.mask_mode != "none" else None)
    return compute_losses(out, image, mask, loss_cfg, model_cfg)


def make_loss_fn(cfg, amp_dtype):
    """forward_losses bound to the config, compiled when cfg.compile (fullgraph: a graph break is a bug here)."""
    fn = partial(forward_losses, loss_cfg=cfg.loss, model_cfg=cfg.model, amp_dtype=amp_dtype)
    if not cfg.compile:
        return fn
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    return torch.compile(fn, mode=mode, fullgraph=True)


class BufferGuard:
    """Snapshot of a module's buffers (BN running mean/var, num_batches_tracked) and a restore that happens only
    where a device flag says so. Foreach ops only: 3 calls whatever the number of BN layers."""

    def __init__(self, module: torch.nn.Module):
        buffers = list(module.buffers())
        self.floats = [b for b in buffers if b.is_floating_point()]
        self.counts = [b for b in buffers if not b.is_floating_point()]
        self.saved = [torch.empty_like(b) for b in self.floats]

    def snapshot(self) -> None:
        if self.floats:
            torch._foreach_copy_(self.saved, self.floats)

    def restore_where(self, bad: Tensor) -> None:
        """bad == 1: buffers = snapshot; bad == 0: unchanged, bit for bit."""
        # the flag goes in as a list of tensors: a 0-dim tensor "scalar" argument would be read with .item()
        if self.floats:
            bad_f = bad.to(self.floats[0].dtype)
            n = len(self.floats)
            # x ** 1 == x exactly, and x ** 0 == 1 even for NaN/inf: the lerp below then never multiplies a NaN
            torch._foreach_pow_(self.floats, [1 - bad_f] * n)
            torch._foreach_lerp_(self.floats, self.saved, [bad_f] * n)  # x + 0 * (s - x) == x; s - (s - 1) * 0 == s
        if self.counts:
            torch._foreach_sub_(self.counts, [bad.to(self.counts[0].dtype)] * len(self.counts))


class TrainStep:
    """`step(micro_batches) -> (terms, bad)`: the mean loss terms over the micro-batches (device tensors) and the
    0-dim float flag `bad` (1 = a non-finite loss on some rank: update skipped, BN statistics restored)."""

    def __init__(self, *, model, raw_model, optimizer, scaler, accelerator, cfg, amp_dtype, use_deepspeed: bool):
        self.model, self.optimizer, self.scaler, self.accelerator = model, optimizer, scaler, accelerator
        self.cfg, self.use_deepspeed = cfg, use_deepspeed
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.loss_fn = make_loss_fn(cfg, amp_dtype)
        self.buffers = BufferGuard(raw_model)
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.cuda_graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"

    def __call__(self, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may still be alive (logging)
        self.buffers.snapshot()
        if self.use_deepspeed:
            return self._deepspeed_step(micro_batches)
        n = len(micro_batches)
        non_finite = None
        terms_sum: dict[str, Tensor] = {}
        for image, mask in micro_batches:
            with self._accumulate():
                terms = self.loss_fn(self.model, image, mask)
                flag = ~torch.isfinite(terms["loss"])
                non_finite = flag if non_finite is None else non_finite | flag
                self._backward(self.scaler.scale(terms["loss"]))
            for k, v in terms.items():
                terms_sum[k] = terms_sum[k] + v.detach() / n if k in terms_sum else v.detach() / n
        bad = non_finite.to(torch.float32)
        if self.world > 1:  # a tensor all-reduce (async on NCCL), never a host read
            torch.distributed.all_reduce(bad)
            bad = (bad > 0).to(torch.float32)
        self.scaler.unscale_(self.optimizer)
        clip_gradients_(self.params, self.cfg.optim.clip, self.cfg.optim.clip_value)
        self.scaler.step(self.optimizer, found_inf=bad)  # Adam skips on the device; GradScaler adds its own inf
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.buffers.restore_where(bad)
        return terms_sum, bad

    def _accumulate(self):
        return self.accelerator.accumulate(self.model) if self.accelerator is not None else contextlib.nullcontext()

    def _backward(self, loss: Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)  # divides by grad_accum; DDP syncs on the last micro-batch only
        else:
            (loss / self.cfg.grad_accum).backward()

    def _deepspeed_step(self, micro_batches) -> tuple[dict[str, Tensor], Tensor]:
        """The engine's backward also steps, so a poisoned batch must be caught before it: one host read."""
        (image, mask), = micro_batches  # grad_accum > 1 is refused under DeepSpeed (train.py)
        with self._accumulate():
            terms = self.loss_fn(self.model, image, mask)
            bad = (~torch.isfinite(terms["loss"])).to(torch.float32)
            if self.world > 1:
                torch.distributed.all_reduce(bad)
            if bad.item() == 0:
                self.accelerator.backward(terms["loss"])
        bad = (bad > 0).to(torch.float32)
        self.buffers.restore_where(bad)
        return {k: v.detach() for k, v in terms.items()}, bad
