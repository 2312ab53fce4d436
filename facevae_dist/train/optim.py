"""The paper's optimizer: Adam as Keras applies it (multi-tensor, no host sync), and Keras-style gradient clipping.

Keras Adam puts epsilon outside the bias correction (the "epsilon hat" form of Kingma & Ba, end of §2):
    keras:  w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
torch.optim.Adam adds it to the bias-corrected sqrt(v):
    torch:  w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
With the paper's per-tensor clip at 1e-3 the per-element gradients are ~1e-7..1e-6, the size of eps = 1e-7, so the
two forms take steps several times apart. `eps_form` picks one; "keras" is the paper's.

The step is sync-free on accelerators: the step count lives in a tensor (like torch's capturable Adam), and a step
can be skipped on the device (`step(found_inf=t)`, or the `found_inf` GradScaler hands optimizers that set
_step_supports_amp_scaling): when it is nonzero, neither the moments, the step count nor the weights change, and no
.item() is needed to know. On the CPU, where reading a tensor is free, the same update runs with host-side scalars.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from facevae_dist.errors import UsageError

EPS_FORMS = ("keras", "torch")


def build_optimizer(params: Iterable, optim_cfg) -> torch.optim.Optimizer:
    """Adam from an OptimConfig (lr, betas, eps, weight_decay, eps_form)."""
    return Adam(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                weight_decay=optim_cfg.weight_decay, eps_form=getattr(optim_cfg, "eps_form", "keras"))


class Adam(torch.optim.Optimizer):
    """Adam with eps_form "keras" (the paper's) or "torch" (torch.optim.Adam's math), weight decay as L2 (like
    torch.optim.Adam). State per parameter: step (float32 tensor on the parameter's device), exp_avg, exp_avg_sq,
    the same keys as torch.optim.Adam, so its checkpoints load here.

    capturable: True = the step count and bias corrections stay in device tensors and a skip is applied on the device
    (no host sync, CUDA-graph safe); False = they are read on the host, which costs nothing for CPU tensors and is
    cheaper there (no per-tensor 0-dim ops, no pow). None (default) = True except for parameters on the CPU."""

    # GradScaler then passes found_inf (and grad_scale when the gradients are still scaled) as attributes instead of
    # calling .item() on found_inf to decide whether to call step() at all
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7,
                 weight_decay: float = 0.0, eps_form: str = "keras", capturable: bool | None = None):
        if eps_form not in EPS_FORMS:
            raise UsageError(f"optim.eps_form={eps_form!r} is not one of {', '.join(EPS_FORMS)}")
        if not (lr > 0 and eps > 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise UsageError(f"Adam: bad hyperparameters lr={lr} eps={eps} weight_decay={weight_decay} betas={betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, eps_form=eps_form,
                        capturable=capturable)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim.Adam state_dict lacks eps_form: the config decides it
            group.setdefault("eps_form", self.defaults.get("eps_form", "keras"))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["capturable"] = self.defaults.get("capturable")  # where the step runs is this process's business
            for p in group["params"]:  # "step" as a float32 tensor on the parameter's device, whoever saved it
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: Tensor | None = None):
        """One update. `found_inf`: a tensor, nonzero = skip this step (decided on the device: no host sync)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step() when it did not unscale_ first
        skip = _sum_flags(found_inf, getattr(self, "found_inf", None))
        for group in self.param_groups:
            self._step_group(group, grad_scale, skip)
        return loss

    def _step_group(self, group: dict, grad_scale: Tensor | None, skip: Tensor | None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
            [params, grads, exp_avgs, exp_avg_sqs, steps])
        hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                     weight_decay=group["weight_decay"], eps_form=group["eps_form"])
        for (device, _dtype), ((d_params, d_grads, d_avgs, d_avg_sqs, d_steps), _) in grouped.items():
            scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
            capturable = group.get("capturable")
            if capturable is None:
                capturable = device.type != "cpu"
            if capturable:
                keep = None if skip is None else (skip.to(device, non_blocking=True) == 0).to(torch.float32)
                _adam_device_side(d_params, d_grads, d_avgs, d_avg_sqs, d_steps, keep=keep, grad_scale=scale,
                                  **hyper)
            elif skip is None or not bool(skip.cpu() != 0):  # CPU: reading the flag costs no sync
                _adam_host_side(d_params, d_grads, d_avgs, d_avg_sqs, d_steps, grad_scale=scale, **hyper)


def _sum_flags(*flags: Tensor | None) -> Tensor | None:
    given = [f for f in flags if f is not None]
    if not given:
        return None
    total = given[0].float()
    for f in given[1:]:
        total = total + f.to(total.device, non_blocking=True).float()
    return total


def _prepare_grads(grads: list[Tensor], params: list[Tensor], grad_scale: Tensor | None,
                   weight_decay: float) -> list[Tensor]:
    if grad_scale is not None:
        torch._foreach_div_(grads, grad_scale)  # GradScaler handed over still-scaled gradients
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


def _adam_host_side(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], *, grad_scale: Tensor | None, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float, eps_form: str) -> None:
    """The update with bias corrections computed on the host in float64 (steps are CPU tensors: no sync)."""
    grads = _prepare_grads(grads, params, grad_scale, weight_decay)
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m = b1 m + (1 - b1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)  # v = b2 v + (1 - b2) g^2
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    ts = [float(t) for t in steps]
    corr1 = [1.0 - beta1 ** t for t in ts]
    corr2 = [1.0 - beta2 ** t for t in ts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_form == "keras":  # w -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        step_size = [-lr * math.sqrt(c2) / c1 for c1, c2 in zip(corr1, corr2)]
    else:  # w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        torch._foreach_div_(denom, [math.sqrt(c2) for c2 in corr2])
        step_size = [-lr / c1 for c1 in corr1]
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


def _adam_device_side(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      steps: list[Tensor], *, keep: Tensor | None, grad_scale: Tensor | None, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, eps_form: str) -> None:
    """The same update with every step-dependent number in device tensors; `keep` (0-dim, 1 = apply, 0 = skip)."""
    grads = _prepare_grads(grads, params, grad_scale, weight_decay)
    # the same ops with or without `keep` (Python numbers, or 0-dim tensors holding exactly the same float32
    # values), so passing found_inf = 0 changes no bit of the result
    if keep is None:
        torch._foreach_add_(steps, 1.0)
        w1, f2, w2 = 1.0 - beta1, beta2, 1.0 - beta2
    else:
        torch._foreach_add_(steps, keep)
        apply, dtype = keep > 0, params[0].dtype
        w1 = torch.where(apply, 1.0 - beta1, 0.0).to(dtype)  # m unchanged when skipping
        f2 = torch.where(apply, beta2, 1.0).to(dtype)  # v unchanged when skipping
        w2 = torch.where(apply, 1.0 - beta2, 0.0).to(dtype)
        # g ** 1 == g exactly, and g ** 0 == 1 even for inf/NaN: a skipped step then computes on finite numbers that
        # the zero coefficients cancel (0 * NaN would be NaN)
        grads = torch._foreach_pow(grads, [keep.to(dtype)] * len(grads))
    delta = torch._foreach_sub(grads, exp_avgs)  # m = b1 m + (1 - b1) g, as m + (1 - b1)(g - m)
    torch._foreach_mul_(delta, w1)
    torch._foreach_add_(exp_avgs, delta)
    torch._foreach_mul_(exp_avg_sqs, f2)  # v = b2 v + (1 - b2) g^2
    delta = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(delta, w2)
    torch._foreach_add_(exp_avg_sqs, delta)
    del delta

    # bias corrections on the 0-dim step tensors; a skipped first step leaves t = 0, so clamp (its update is x 0)
    t = torch._foreach_clamp_min(steps, 1.0)
    corr1, corr2 = _one_minus_pow(beta1, t), _one_minus_pow(beta2, t)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_form == "keras":
        step_size = torch._foreach_sqrt(corr2)  # lr sqrt(1 - b2^t) / (1 - b1^t), negated below
        torch._foreach_div_(step_size, corr1)
    else:
        torch._foreach_div_(denom, torch._foreach_sqrt(corr2))
        step_size = torch._foreach_reciprocal(corr1)  # lr / (1 - b1^t), negated below
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(step_size, -lr)
    if keep is not None:
        torch._foreach_mul_(step_size, keep)  # -0 when skipping: m / (denom / -0) = m / -inf = -0, and w + -0 = w
    torch._foreach_div_(denom, step_size)  # (step sizes are 0-dim tensors: divide, then add m / denom)
    torch._foreach_addcdiv_(params, exp_avgs, denom)


def _one_minus_pow(beta: float, t: list[Tensor]) -> list[Tensor]:
    """1 - beta^t as -expm1(t ln beta): float32 keeps ~1e-7 relative accuracy, where 1 - 0.999^1 computed directly
    in float32 is off by 1.3e-5 (0.999 is not exact in float32)."""
    if beta == 0.0:
        return [torch.ones_like(x) for x in t]
    out = torch._foreach_mul(t, math.log(beta))
    torch._foreach_expm1_(out)
    torch._foreach_neg_(out)
    return out


# ---- clipping ----------------------------------------------------------------------------------------------------


def clip_gradients_(params_or_grads: Iterable[Tensor], mode: str, value: float) -> None:
    """Clip gradients in place, on the device (no .item()).

    "per-tensor": Keras' `clipnorm` (what the paper's Adam did): each tensor g -> g * c / max(||g||, c); takes
    parameters (their .grad is clipped) or the gradient tensors themselves.
    "global": torch.nn.utils.clip_grad_norm_ (foreach, no sync): all gradients scaled by min(1, c / (norm + 1e-6));
    takes parameters. "none": nothing.
    """
    if mode == "none":
        return
    if mode not in ("per-tensor", "global"):
        raise UsageError(f"optim.clip={mode!r} is not one of per-tensor, global, none")
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params_or_grads, value, foreach=True)
        return
    grads = _gradients(params_or_grads)
    if not grads:
        return
    for (grouped,), _ in torch.optim.Optimizer._group_tensors_by_device_and_dtype([grads]).values():
        factors = torch._foreach_norm(grouped)
        torch._foreach_clamp_min_(factors, value)  # max(||g||, c)
        torch._foreach_reciprocal_(factors)
        torch._foreach_mul_(factors, value)  # c / max(||g||, c), <= 1
        torch._foreach_mul_(grouped, factors)


def _gradients(params_or_grads: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params_or_grads, Tensor):
        params_or_grads = [params_or_grads]
    out = []
    for t in params_or_grads:
        g = t.grad if t.requires_grad else t  # a parameter: its gradient; anything else is a gradient already
        if g is not None:
            out.append(g)
    return out
