"""The paper's VAE port: exact parameter counts, shapes, compositing, sampling variants, save/load."""

import json

import pytest
import torch
from conftest import TINY_36

from facevae_dist.errors import FaceVAEError, UsageError
from facevae_dist.model import FaceVAE, ModelConfig

torch.set_num_threads(1)


def tiny(**kw) -> FaceVAE:
    torch.manual_seed(0)
    return FaceVAE(ModelConfig(**{**TINY_36, **kw}))


def batch(b=2, size=36, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, size, size, generator=g)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 8:28, 10:26] = 1.0
    mask[:, :, 7, 10:26] = 0.5  # a soft edge, like the bilinearly resized masks
    return image, mask


def test_exact_paper_parameter_counts():
    assert FaceVAE(ModelConfig(mask_mode="mask+decoder")).num_trainable_parameters() == 9_328_228
    assert FaceVAE(ModelConfig(mask_mode="none")).num_trainable_parameters() == 9_059_331
    assert FaceVAE(ModelConfig(mask_mode="mask")).num_trainable_parameters() == 9_059_331


def test_paper_model_full_size_forward_and_keras_defaults():
    model = FaceVAE(ModelConfig())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)))
    # BN running stats are buffers, not parameters: 8,960 of them as in Keras' "non-trainable" count.
    assert sum(m.running_mean.numel() + m.running_var.numel() for m in bns) == 8_960
    model.eval()
    out = model.reconstruct(torch.rand(1, 3, 144, 144))
    assert out.recon.shape == (1, 3, 144, 144) and out.mask_pred.shape == (1, 1, 144, 144)
    assert out.mu.shape == (1, 512)


@pytest.mark.parametrize("mode", ["none", "mask", "mask+decoder"])
def test_output_shapes_per_mask_mode(mode):
    model = tiny(mask_mode=mode)
    image, mask = batch()
    out = model(image, mask)
    assert out.recon.shape == out.recon_raw.shape == (2, 3, 36, 36)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 16)
    assert all(t.dtype == torch.float32 for t in (out.recon, out.mu, out.logvar, out.z))
    if mode == "mask+decoder":
        assert out.mask_pred.shape == (2, 1, 36, 36)
        assert 0 <= out.mask_pred.min() and out.mask_pred.max() <= 1
    else:
        assert out.mask_pred is None
    if mode == "none":
        assert out.recon is out.recon_raw


@pytest.mark.parametrize("size", [9, 18, 72])
def test_smaller_image_sizes(size):
    model = tiny(image_size=size, mask_mode="none")
    out = model(torch.rand(2, 3, size, size))
    assert out.recon.shape == (2, 3, size, size)


def test_compositing_keeps_background_and_blocks_its_gradient():
    model = tiny(mask_mode="mask+decoder")
    image, mask = batch()
    out = model(image, mask)
    bg = (mask == 0).expand_as(image)
    assert torch.equal(out.recon[bg], image[bg])
    out.recon_raw.retain_grad()
    out.recon.sum().backward()
    assert torch.all(out.recon_raw.grad[bg] == 0)
    assert torch.all(out.recon_raw.grad[(mask == 1).expand_as(image)] == 1)
    soft = (mask == 0.5).expand_as(image)
    assert torch.allclose(out.recon_raw.grad[soft], torch.tensor(0.5))


def test_mask_mode_requires_mask_in_training_but_reconstruct_does_not():
    image, mask = batch()
    with pytest.raises(UsageError, match="needs the ground-truth mask"):
        tiny(mask_mode="mask")(image)
    model = tiny(mask_mode="mask+decoder").eval()
    out = model.reconstruct(image)  # no mask: composite with the predicted soft mask
    expected = out.recon_raw * out.mask_pred + image * (1 - out.mask_pred)
    assert torch.allclose(out.recon, expected)
    assert torch.equal(out.z, out.mu)
    mask_only = tiny(mask_mode="mask").eval()
    assert torch.equal(mask_only.reconstruct(image).recon, mask_only.reconstruct(image).recon_raw)
    bg = (mask == 0).expand_as(image)
    assert torch.equal(mask_only.reconstruct(image, mask).recon[bg], image[bg])


def test_paper_sampling_is_deterministic_when_logvar_is_zero():
    model = tiny(mask_mode="none", sampling="paper")
    with torch.no_grad():
        model.fc_logvar.weight.zero_()
    image, _ = batch()
    out = model(image)
    assert torch.equal(out.logvar, torch.zeros_like(out.logvar))
    assert torch.equal(out.z, out.mu)  # z = mu + eps * s, s = 0: the released code injects no noise
    standard = tiny(mask_mode="none", sampling="standard")
    with torch.no_grad():
        standard.fc_logvar.weight.zero_()
    out = standard(image)
    assert not torch.equal(out.z, out.mu)  # exp(0.5 * 0) = 1: unit noise
    assert torch.equal(standard(image, sample=False).z, standard(image, sample=False).mu)


def test_logvar_is_clamped():
    model = tiny(mask_mode="none", logvar_clamp=(-2.0, 3.0))
    with torch.no_grad():
        model.fc_logvar.bias.fill_(1e4)
    out = model(batch()[0])
    assert torch.all(out.logvar == 3.0)


def test_save_load_roundtrip_and_mismatch_refusal(tmp_path):
    model = tiny(mask_mode="mask+decoder", sampling="paper").eval()
    model(*batch())  # nothing changes in eval mode; just exercise it
    model.save_pretrained(tmp_path / "m")
    loaded = FaceVAE.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    image, _ = batch()
    assert torch.equal(model.reconstruct(image).recon, loaded.reconstruct(image).recon)

    # config.json says "none" but the weights carry a mask decoder -> a clear refusal naming the mismatch
    cfg_path = tmp_path / "m" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["mask_mode"] = "none"
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(FaceVAEError, match="unexpected tensor.*mask_decoder"):
        FaceVAE.from_pretrained(tmp_path / "m")
    meta["mask_mode"] = "mask+decoder"
    meta["width"] = 0.25
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(FaceVAEError, match="shape mismatch"):
        FaceVAE.from_pretrained(tmp_path / "m")
    with pytest.raises(FaceVAEError, match="missing"):
        FaceVAE.from_pretrained(tmp_path / "nowhere")


def test_config_validation_and_dict_roundtrip():
    cfg = ModelConfig(mask_mode="mask", sampling="paper", width=0.5)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(mask_mode="masked"), dict(sampling="paper_code"), dict(image_size=128), dict(width=0),
                dict(latent_dim=0), dict(logvar_clamp=(5, -5))):
        with pytest.raises(UsageError):
            ModelConfig(**bad).validate()
    with pytest.raises(UsageError, match="unknown model config field"):
        ModelConfig.from_dict({"mask": "none"})


def test_channels_last_matches_contiguous():
    model = tiny(mask_mode="mask+decoder").eval()
    image, _ = batch()
    ref = model.reconstruct(image)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl.reconstruct(image.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out.recon, ref.recon, atol=1e-5)


def test_transposed_conv_same_padding_tf_crop_vs_pytorch_form():
    from facevae_dist.model import ConvTBlock

    torch.manual_seed(0)
    tf_block, pt_block = ConvTBlock(4, 5, "same", tf_crop=True), ConvTBlock(4, 5, "same", tf_crop=False)
    pt_block.load_state_dict(tf_block.state_dict())  # same parameters, only the cropping differs
    x = torch.randn(2, 4, 3, 3)
    full = torch.nn.functional.conv_transpose2d(x, tf_block.conv.weight, tf_block.conv.bias, stride=2)  # 7x7
    assert torch.allclose(tf_block.conv(x)[..., :6, :6], full[..., :6, :6], atol=1e-6)  # TF: leading 2n
    assert torch.allclose(pt_block.conv(x), full[..., 1:, 1:], atol=1e-6)  # PyTorch: trailing 2n
    for crop in (True, False):
        model = FaceVAE(ModelConfig(mask_mode="none", tf_same_crop=crop))
        assert model.num_trainable_parameters() == 9_059_331
    out = tiny(mask_mode="none", tf_same_crop=True)(torch.rand(1, 3, 36, 36))
    assert out.recon.shape == (1, 3, 36, 36)



@pytest.mark.parametrize("padding,tf_crop", [("same", False), ("same", True), ("valid", False)])
def test_cpu_blocks_match_the_plain_module_calls_forward_and_backward(padding, tf_crop):
    """The CPU forms (transposed conv with its bias added apart, ELU in place) give the values and gradients of the
    plain layers they stand for: ConvTranspose2d with its bias fused, BatchNorm, a separate ELU."""
    from facevae_dist.model import ConvBlock, ConvTBlock

    torch.manual_seed(0)
    for block in (ConvTBlock(4, 5, padding, tf_crop=tf_crop), ConvBlock(4, 5)):
        x = torch.randn(3, 4, 6, 6, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        conv, bn = (block.conv, block.bn) if isinstance(block, ConvTBlock) else (block[0], block[1])
        ref_bn = torch.nn.BatchNorm2d(5, eps=1e-3, momentum=0.01)
        h = conv(x_ref)  # the module call: bias fused into the convolution
        if isinstance(block, ConvTBlock) and block.crop:
            h = h[..., :12, :12]
        ref = torch.nn.functional.elu(ref_bn(h))
        out = block(x)
        g = torch.randn_like(ref)
        (out * g).sum().backward()
        block_grads = [p.grad.clone() for p in conv.parameters()]  # conv's weight and bias serve both forms
        conv.zero_grad()
        (ref * g).sum().backward()
        assert torch.allclose(out, ref, atol=1e-6)
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        (w_mine, b_mine), (w_plain, b_plain) = block_grads, (conv.weight.grad, conv.bias.grad)
        assert w_mine.abs().sum() > 0 and torch.allclose(w_mine, w_plain, atol=1e-5)
        assert torch.allclose(b_mine, b_plain, atol=1e-4)  # ~0 either way: train-mode BatchNorm removes the mean
        assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-6)

def test_hub_mixin_round_trip_on_a_local_folder(tmp_path):
    """save_pretrained / from_pretrained are huggingface_hub's PyTorchModelHubMixin: safetensors weights, a flat
    config.json (the ModelConfig fields at the top level) and a model card README.md with YAML front matter."""
    from huggingface_hub import ModelCard, PyTorchModelHubMixin

    model = tiny(mask_mode="mask+decoder", sampling="paper").eval()
    assert isinstance(model, PyTorchModelHubMixin)
    out = model.save_pretrained(tmp_path / "m")
    assert out == tmp_path / "m"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("format")} == model.cfg.to_dict()
    assert config["format_version"] == 2
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "facevae-dist" and "pytorch_model_hub_mixin" in card.data.tags
    assert "arXiv 2112.02139" in card.text and 'FaceVAE.from_pretrained("' in card.text
    loaded = FaceVAE.from_pretrained(str(out))  # the mixin's entry point, a str path as the Hub API takes
    assert not loaded.training and loaded.cfg == model.cfg
    image, _ = batch()
    assert torch.equal(model.reconstruct(image).recon, loaded.reconstruct(image).recon)
    # checkpoints skip the card
    bare = model.save_pretrained(tmp_path / "ckpt", model_card=False)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_old_format_export_still_loads_and_reconstructs_identically(tmp_path):
    """Exports written before the mixin nest the fields under "model" (the committed reference models are such
    exports): they load unchanged, and give the same outputs as after re-saving them in the flat format."""
    from pathlib import Path

    old = Path(__file__).resolve().parents[1] / "docs" / "reference" / "models" / "l2--mask+decoder--seed-0"
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert "model" in json.loads(before["config.json"]) and "format_version" not in json.loads(before["config.json"])
    model = FaceVAE.from_pretrained(old)
    resaved = FaceVAE.from_pretrained(model.save_pretrained(tmp_path / "flat"))
    image, _ = batch(size=36)
    a, b = model.reconstruct(image), resaved.reconstruct(image)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.mask_pred, b.mask_pred)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # loading wrote nothing there
    # a hand-written old layout in a temp folder: same weights, same config
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "model.safetensors").write_bytes(before["model.safetensors"])
    (nested / "config.json").write_text(json.dumps({"format": "facevae-dist/FaceVAE", "model": model.cfg.to_dict()}))
    assert torch.equal(FaceVAE.from_pretrained(nested).reconstruct(image).recon, a.recon)
