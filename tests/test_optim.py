"""facevae_dist.train.optim: Keras-form Adam against a float64 reference written from the update rule, torch form against
torch.optim.Adam, the device-side skip, bit-exact resume, GradScaler, and Keras-style clipping."""

import copy
import io

import numpy as np
import pytest
import torch

from facevae_dist.config import OptimConfig
from facevae_dist.errors import UsageError
from facevae_dist.train.optim import Adam, build_optimizer, clip_gradients_

SHAPES = [(8, 3, 3, 3), (8,), (16, 8), (4,)]
# per-tensor gradient scales: most far above the 1e-3 clip (clipped), one below it (left alone) with per-element
# gradients ~1e-6, the size of eps, where the Keras and torch forms part
SCALES = [1.0, 3e-2, 1e-6, 10.0]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _noise(steps: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) * c for s, c in zip(SHAPES, SCALES)] for _ in range(steps)]


def _grad(w: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return noise * (1.0 + w)  # depends on the weights, so a wrong update would also change later gradients


def _keras_reference(w0, noise, lr, b1, b2, eps, clip):
    """Keras Adam (epsilon hat) + clipnorm, written from the update rule in float64."""
    w = [x.astype(np.float64).copy() for x in w0]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, step_noise in enumerate(noise, start=1):
        for i, n in enumerate(step_noise):
            g = _grad(w[i], n)
            g = g * clip / max(np.sqrt(np.sum(g * g)), clip)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            w[i] = w[i] - alpha * m[i] / (np.sqrt(v[i]) + eps)
    return w


def _run_torch(opt_factory, w0, noise, dtype, clip=1e-3, device="cpu"):
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype, device=device)) for x in w0]
    opt = opt_factory(params)
    for step_noise in noise:
        for p, n in zip(params, step_noise):
            p.grad = _grad(p.detach(), torch.tensor(n, dtype=dtype, device=device))
        clip_gradients_(params, "per-tensor", clip)
        opt.step()
    return [p.detach().cpu().double().numpy() for p in params]


# capturable=True: step count, bias corrections and skip in device tensors (the default off the CPU); False: on
# the host (the CPU default). Both run on the CPU here.
CAPTURABLE = pytest.mark.parametrize("capturable", [False, True], ids=["host", "device-side"])


@CAPTURABLE
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_keras_form_matches_float64_reference(device, capturable):
    rng = np.random.default_rng(1)
    w0 = [rng.standard_normal(s) * 0.1 for s in SHAPES]
    noise = _noise(8)
    ref = _keras_reference(w0, noise, lr=1e-4, b1=0.9, b2=0.999, eps=1e-7, clip=1e-3)

    def paper_adam(params):
        opt = build_optimizer(params, OptimConfig())  # defaults = the paper's: lr 1e-4, eps 1e-7, keras form
        opt.param_groups[0]["capturable"] = capturable
        return opt

    ours64 = _run_torch(paper_adam, w0, noise, torch.float64, device=device)
    for r, o, w in zip(ref, ours64, w0):  # the update itself (w - w0) to 1e-6 relative (elements whose steps
        upd, ref_upd = o - w, r - w        # cancelled to ~0 get an absolute floor of 1e-7 x the largest update)
        np.testing.assert_allclose(upd, ref_upd, rtol=1e-6, atol=1e-7 * np.abs(ref_upd).max())
        assert np.linalg.norm(upd - ref_upd) <= 1e-6 * np.linalg.norm(ref_upd)
    ours32 = _run_torch(paper_adam, w0, noise, torch.float32, device=device)
    for r, o in zip(ref, ours32):  # float32 weights (each step rounds them to ~6e-8): the weights to 1e-6
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-9)

    # and the two forms really differ here: tiny clipped gradients are the size of eps
    torch_form = _run_torch(lambda p: Adam(p, lr=1e-4, eps=1e-7, eps_form="torch"), w0, noise, torch.float64,
                            device=device)
    ratio = np.abs(torch_form[2] - w0[2]).mean() / np.abs(ref[2] - w0[2]).mean()
    assert ratio > 1.5, ratio


@CAPTURABLE
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_torch_form_equals_torch_adam(weight_decay, capturable):
    rng = np.random.default_rng(2)
    w0 = [rng.standard_normal(s) for s in SHAPES]
    noise = _noise(6, seed=3)
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ours = _run_torch(lambda p: Adam(p, eps_form="torch", capturable=capturable, **kw), w0, noise, torch.float32,
                      clip=1.0)
    ref = _run_torch(lambda p: torch.optim.Adam(p, foreach=True, **kw), w0, noise, torch.float32, clip=1.0)
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-7)


def _model(seed=0):
    torch.manual_seed(seed)
    # (no conv bias before BN: its gradient is float noise that Adam would blow up to full-size steps)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ELU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


def _batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def _train(model, opt, batches, scaler=None, unscale_first=True, poison=()):
    """A training loop as the trainer's: backward, (unscale_ and) clip per tensor, step. Without unscale_ first the
    gradients are still scaled, so there is no clipping (in the plain run either, to compare the two)."""
    for i, x in enumerate(batches):
        loss = model(x).square().mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if i in poison:
            next(model.parameters()).grad[0].fill_(float("inf"))
        if scaler and unscale_first:
            scaler.unscale_(opt)
        if unscale_first:
            clip_gradients_(model.parameters(), "per-tensor", 1e-2)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])


def _assert_same(a, b):
    (wa, sa), (wb, sb) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k])


@CAPTURABLE
@pytest.mark.parametrize("eps_form", ["keras", "torch"])
def test_found_inf_skip_changes_nothing(eps_form, capturable):
    model = _model()
    opt = Adam(model.parameters(), lr=1e-3, eps_form=eps_form, capturable=capturable)
    _train(model, opt, _batches(2))
    before = _snapshot(model, opt)
    model.eval()  # keep BN's running statistics still: only the optimizer may change something here
    for bad in (float("nan"), float("inf")):
        model(_batches(1, seed=9)[0]).square().mean().backward()
        for p in model.parameters():
            p.grad[..., 0] = bad
        opt.step(found_inf=torch.tensor(1.0))  # a device tensor: no host sync needed to decide
        opt.zero_grad(set_to_none=True)
        _assert_same(_snapshot(model, opt), before)
        assert int(opt.state[next(model.parameters())]["step"]) == 2
    # found_inf == 0 is an ordinary step
    ref_model = copy.deepcopy(model)
    ref_opt = Adam(ref_model.parameters(), lr=1e-3, eps_form=eps_form, capturable=capturable)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict would share the tensors)
    x = _batches(1, seed=11)[0]
    for m, o, kw in ((model, opt, {"found_inf": torch.tensor(0.0)}), (ref_model, ref_opt, {})):
        m(x).square().mean().backward()
        o.step(**kw)
    _assert_same(_snapshot(model, opt), _snapshot(ref_model, ref_opt))


@CAPTURABLE
def test_skip_on_the_very_first_step_keeps_state_finite(capturable):
    model = _model()
    opt = Adam(model.parameters(), capturable=capturable)
    model(_batches(1)[0]).sum().backward()
    w0 = copy.deepcopy(model.state_dict())
    opt.step(found_inf=torch.tensor(2.0))
    assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items())
    for st in opt.state.values():
        assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()


@CAPTURABLE
def test_state_dict_round_trip_continues_bit_identically(capturable):
    model = _model()
    opt = Adam(model.parameters(), lr=1e-3, capturable=capturable)
    batches = _batches(6)
    _train(model, opt, batches[:3])
    buf = io.BytesIO()  # through a real save/load, as a checkpoint does (weights_only: plain tensors and numbers)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _train(model, opt, batches[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    ropt = Adam(resumed.parameters(), lr=1e-3, capturable=capturable)
    ropt.load_state_dict(saved["optim"])
    assert ropt.state[next(resumed.parameters())]["step"].dtype == torch.float32
    _train(resumed, ropt, batches[3:])
    _assert_same(_snapshot(resumed, ropt), _snapshot(model, opt))


def test_loads_a_torch_adam_state_dict():
    model = _model()
    topt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    _train(model, topt, _batches(2))
    opt = Adam(model.parameters(), lr=1e-3, eps=1e-7, eps_form="torch")
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert opt.param_groups[0]["eps_form"] == "torch"
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, eps=1e-7)
    ref_opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    _train(model, opt, _batches(2, seed=8))
    _train(ref, ref_opt, _batches(2, seed=8))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@CAPTURABLE
@pytest.mark.parametrize("unscale_first", [True, False])
def test_grad_scaler_matches_unscaled_training_and_skips_overflow(monkeypatch, unscale_first, capturable):
    batches = _batches(4)
    plain = _model()
    plain_opt = Adam(plain.parameters(), lr=1e-3, capturable=capturable)
    _train(plain, plain_opt, batches, unscale_first=unscale_first)

    scaled = _model()
    opt = Adam(scaled.parameters(), lr=1e-3, capturable=capturable)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    # the optimizer takes found_inf itself: GradScaler must not take its .item() path (a host sync)
    monkeypatch.setattr(scaler, "_maybe_opt_step", lambda *a, **k: pytest.fail("GradScaler synced on found_inf"))
    _train(scaled, opt, batches, scaler=scaler, unscale_first=unscale_first)
    # power-of-two scaling is exact, so fp16-style loss scaling changes no bit
    _assert_same(_snapshot(scaled, opt), _snapshot(plain, plain_opt))

    before = _snapshot(scaled, opt)
    scaled.eval()  # BN statistics stay put: only the optimizer could change something
    _train(scaled, opt, _batches(1, seed=7), scaler=scaler, unscale_first=unscale_first, poison={0})
    assert scaler.get_scale() == 2.0 ** 11  # the overflow was seen ...
    _assert_same(_snapshot(scaled, opt), before)  # ... and the step skipped on the device


def test_per_tensor_clip_is_keras_clipnorm():
    torch.manual_seed(0)
    grads = [torch.randn(10) * 5, torch.randn(3, 3) * 1e-5, torch.randn(4, dtype=torch.float64)]
    expect = [g * 1e-3 / max(g.norm().item(), 1e-3) for g in grads]
    clip_gradients_(grads, "per-tensor", 1e-3)
    for g, e in zip(grads, expect):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=0)
    assert abs(grads[0].norm().item() - 1e-3) < 1e-9 and grads[1].norm().item() < 1e-3


def test_global_clip_matches_torch_and_none_is_a_no_op():
    a, b = _model(), _model()
    x = _batches(1)[0]
    for m in (a, b):
        (m(x).square().mean() * 100).backward()
    clip_gradients_(a.parameters(), "global", 0.1)
    torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.grad.clone() for p in a.parameters()]
    clip_gradients_(a.parameters(), "none", 1e-9)
    assert all(torch.equal(g, p.grad) for g, p in zip(before, a.parameters()))


def test_bad_settings_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="eps_form"):
        Adam([torch.nn.Parameter(torch.zeros(1))], eps_form="tf")
    with pytest.raises(UsageError, match="optim.clip"):
        clip_gradients_([torch.zeros(1)], "per-layer", 1.0)
    with pytest.raises(UsageError, match="eps_form"):
        OptimConfig(eps_form="tf").validate()


@pytest.mark.gpu
@CUDA
def test_cuda_clip_step_skip_and_grad_scaler_never_sync():
    """The trainer's hot path on a GPU: clipping, a found_inf step, a skipped step and a GradScaler step, with CUDA's
    sync debug mode raising on any host-device synchronisation."""
    model = _model().cuda()
    opt = Adam(model.parameters(), lr=1e-3)  # capturable by default on CUDA
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    x = _batches(1)[0].cuda()
    ok, bad = torch.zeros((), device="cuda"), torch.ones((), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for flag in (ok, bad):
            model(x).square().mean().backward()
            clip_gradients_(model.parameters(), "per-tensor", 1e-2)
            clip_gradients_(model.parameters(), "global", 1.0)
            opt.step(found_inf=flag)
            opt.zero_grad(set_to_none=True)
        scaler.scale(model(x).square().mean()).backward()
        scaler.unscale_(opt)
        clip_gradients_(model.parameters(), "per-tensor", 1e-2)
        scaler.step(opt, found_inf=ok)
        scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(opt.state[next(model.parameters())]["step"]) == 2  # the skipped step did not count
