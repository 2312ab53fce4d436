"""`facevae bench train` library code at a tiny image size (real steps; the speed itself is not asserted)."""

import json

import pytest
import torch

from facevae_dist.bench.train import clip_grad_norm_per_tensor_, parse_config, run_train_bench
from facevae_dist.errors import UsageError

torch.set_num_threads(1)


def test_per_tensor_clip_matches_keras_clipnorm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 7)]
    grads = [torch.randn(3) * 1e-4, torch.randn(5), torch.randn(7) * 10]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_grad_norm_per_tensor_(params, 1e-3)
    for p, g in zip(params, grads):
        expected = g * 1e-3 / max(float(g.norm()), 1e-3)  # tf clip_by_norm: small tensors are left alone
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-12)


def test_parse_config():
    assert parse_config("channels_last+bf16", "cpu") == {"amp": "bf16", "channels_last": True, "compile": False}
    assert parse_config("compile", "cpu") == {"amp": "fp32", "channels_last": False, "compile": True}
    assert parse_config("fp16", "cuda")["amp"] == "fp16"
    for bad in ("fp16", "bf16+fp32", "channel_last", ""):
        with pytest.raises(UsageError):
            parse_config(bad, "cpu")


def test_run_train_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "bench" / "train.json"
    result = run_train_bench(out, [2], steps=1, warmup=0, configs=["fp32", "channels_last+bf16"], device="cpu",
                             image_size=18)
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(saved["rows"]) == 4  # 2 models x 2 configs
    assert {r["model"] for r in saved["rows"]} == {"none", "mask+decoder"}
    for r in saved["rows"]:
        assert r["status"] == "ok", r
        assert r["img_s"] > 0 and r["cpu_s_median"] >= 0
    assert saved["cpu_model"] and saved["torch_threads"] >= 1 and set(saved["best"]) == {"none@2", "mask+decoder@2"}
    with pytest.raises(UsageError, match="warmup"):
        run_train_bench(out, [2], steps=1, warmup=0, configs=["compile"], device="cpu", image_size=18)
