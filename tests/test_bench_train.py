"""`facevae bench train` library code at a tiny image size (real steps; the speed itself is not asserted)."""

import json

import pytest
import torch

from facevae_dist.bench.train import (
    PAPER_TF_REFERENCES,
    _cpu_flags,
    host_overhead,
    paper_tf_reference,
    parse_config,
    quick_configs,
    run_train_bench,
    vs_paper_tf,
)
from facevae_dist.errors import UsageError
from facevae_dist.train.optim import clip_gradients_

torch.set_num_threads(1)


def test_per_tensor_clip_matches_keras_clipnorm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 7)]
    grads = [torch.randn(3) * 1e-4, torch.randn(5), torch.randn(7) * 10]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients_(params, "per-tensor", 1e-3)
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
                             image_size=18, overhead=False)
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


def test_default_configs_are_quick(tmp_path):
    out = tmp_path / "quick.json"
    result = run_train_bench(out, [2], steps=1, warmup=0, configs=None, device="cpu", image_size=18, overhead=False)
    # the default training config, and bf16 autocast where this CPU has it natively
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(_cpu_flags()))
    assert quick_configs("cpu") == ["channels_last"] + (["channels_last+bf16"] if native_bf16 else [])
    assert [r["config"] for r in result["rows"]] == 2 * quick_configs("cpu")


def test_trainer_step_reads_no_device_scalar_outside_the_optimizer():
    """The sync-free step, structurally (counts from torch.profiler, no timing): no .item()/.tolist() in the
    trainer's step outside optimizer.step, and not many more ATen ops than a bare loop."""
    row = host_overhead("mask+decoder", torch.device("cpu"), steps=2, rounds=1, image_size=18, width=0.125,
                        batch_size=2)
    trainer, bare = row["trainer"], row["bare"]
    assert trainer["scalar_reads_per_step"] - trainer["scalar_reads_in_optimizer_per_step"] == 0, row
    assert row["targets"]["no_scalar_read_outside_optimizer"] and row["aten_ops_ratio"] <= 1.3, row
    assert trainer["img_s"] > 0 and bare["img_s"] > 0 and bare["aten_ops_per_step"] > 100


AMD = PAPER_TF_REFERENCES[0]


def test_tf_reference_only_for_the_same_cpu_model_and_flags():
    """A 2-core Intel Xeon with AVX-512 and AMX was shown a ratio against a TF figure from an Intel
    Xeon without them. A reference counts only for the same model name and the same speed flags."""
    same = ("AMD EPYC", {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"})  # other flags do not matter
    assert paper_tf_reference(same) is AMD
    for other in (("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
                  ("Intel(R) Xeon(R) CPU @ 2.20GHz", {"avx2", "avx512f"}),
                  ("AMD EPYC", {"avx2", "avx512f"}),  # same model name, no native bf16
                  ("AMD EPYC 9654 96-Core Processor", same[1])):  # same flags, another model
        assert paper_tf_reference(other) is None, other
    row = {"model": "mask+decoder", "img_s": 9.9, "batch_size": 32, "image_size": 144}
    assert vs_paper_tf(row, AMD) == round(9.9 / AMD["img_s"]["mask+decoder"], 2)
    assert vs_paper_tf(row, None) is None and vs_paper_tf({**row, "image_size": 18}, AMD) is None


def test_only_a_tf_figure_timed_with_fit_is_compared_against(monkeypatch):
    """The authors train with model.fit; a train_on_batch figure (a call per step, slower) of the same CPU made the
    project look faster than it was, so it is never a reference."""
    import facevae_dist.bench.train as bench

    assert AMD["path"] == "fit"
    per_call = {**AMD, "path": "train_on_batch", "img_s": {"none": 12.5, "mask+decoder": 9.0}}
    monkeypatch.setattr(bench, "PAPER_TF_REFERENCES", (per_call,))
    assert paper_tf_reference(("AMD EPYC", set(AMD["flags"]))) is None
    monkeypatch.setattr(bench, "PAPER_TF_REFERENCES", (per_call, AMD))
    assert paper_tf_reference(("AMD EPYC", set(AMD["flags"]))) is AMD


@pytest.mark.parametrize("matched", [True, False])
def test_bench_prints_a_ratio_only_against_this_cpus_reference(tmp_path, capsys, matched):
    cpu = ("AMD EPYC", set(AMD["flags"])) if matched else ("Intel(R) Xeon(R) CPU @ 2.20GHz", {"avx2", "avx512f",
                                                                                             "amx_tile"})
    result = run_train_bench(tmp_path / "t.json", [2], steps=1, warmup=0, configs=["fp32"], device="cpu",
                             image_size=18, overhead=False, cpu=cpu)
    out = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    saved = json.loads((tmp_path / "t.json").read_text())
    if matched:
        assert saved["reference_paper_tf"]["cpu_model"] == "AMD EPYC" and saved["paper_tf_references_elsewhere"] == []
        assert "vs TF" in out and "model.fit on this CPU model and flags" in out and "not comparable" not in out
    else:
        assert saved["reference_paper_tf"] is None and len(saved["paper_tf_references_elsewhere"]) == 2
        assert "vs TF" not in out and "no ratio is shown" in out
        for ref in PAPER_TF_REFERENCES:  # listed as documentation, with the machine each came from
            assert ref["cpu"] in out and f"mask+decoder {ref['img_s']['mask+decoder']:g} img/s" in out, out
    assert all("vs_paper_tf" not in r for r in result["rows"])  # 18 px rows are never compared
    assert "timed: the trainer's step" in out and saved["timed"].startswith("the trainer's step")
