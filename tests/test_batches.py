"""open_train_batches / iter_val_batches over real shards: float batches on the device, one DataLoader per run that
rolls over epochs, the position a checkpoint stores, exact resume from it, deterministic validation."""

import shutil

import numpy as np

import pytest
import torch

from facevae_dist.config import DataConfig
from facevae_dist.data import native_convert
from facevae_dist.data.batches import fused_gather, iter_val_batches, open_train_batches
from facevae_dist.data.loader import make_loader, u8_to_float
from facevae_dist.data.shards import ShardOptions, build_shards
from facevae_dist.data.sources import SyntheticSource

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")  # 100 images -> train 80 in 12 shards, val 10
    build_shards(SyntheticSource(n=100, seed=2), out, ShardOptions(image_size=24, shard_size=7))
    return out


def cfg(shards, **kw):
    return DataConfig(shards=str(shards), batch_size=8, workers=kw.pop("workers", 2), seed=3,
                      placement=kw.pop("placement", "stream"), **kw).validate()


def take(batches, n):
    return [next(batches) for _ in range(n)]


@pytest.mark.parametrize("placement", ["stream", "host"])
def test_epochs_roll_over_on_one_loader_with_the_streaming_order(shards, placement):
    batches = open_train_batches(cfg(shards, placement=placement), rank=1, world=2, device=torch.device("cpu"),
                                 epoch=0, batch_in_epoch=0, channels_last=True)
    try:
        assert batches.placement == placement and (batches.epoch, batches.batch_in_epoch) == (0, 0)
        got = take(batches, 5)  # 40 samples per rank = 5 batches of 8
        assert (batches.epoch, batches.batch_in_epoch) == (0, 5)
        image, mask = got[0]
        assert image.shape == (8, 3, 24, 24) and mask.shape == (8, 1, 24, 24)
        assert image.dtype == mask.dtype == torch.float32 and image.is_contiguous(memory_format=torch.channels_last)
        assert 0 <= float(image.min()) and float(image.max()) <= 1
        if placement == "stream":
            dataloader = batches._loader._dataloader
        got += take(batches, 6)  # all of epoch 1 and the first batch of epoch 2
        assert (batches.epoch, batches.batch_in_epoch) == (2, 1)
        if placement == "stream":
            assert batches._loader._dataloader is dataloader  # workers persisted across epochs
        for epoch in (0, 1):  # the same batches as a fresh loader of that epoch
            ref = make_loader(shards, "train", 8, rank=1, world_size=2, seed=3, epoch=epoch)
            for (image, mask), b in zip(got[5 * epoch:5 * epoch + 5], ref):
                assert torch.equal(image, u8_to_float(b["image"], "cpu")) and torch.equal(mask, u8_to_float(b["mask"], "cpu"))
        assert batches.corrupt_count == 0
    finally:
        batches.close()


@pytest.mark.parametrize("placement", ["stream", "host"])
def test_resume_from_a_stored_position_gives_the_same_batches(shards, placement):
    data = cfg(shards, placement=placement)
    full = open_train_batches(data, rank=0, world=2, device=torch.device("cpu"), epoch=1, batch_in_epoch=0,
                              channels_last=False)
    ref = take(full, 8)
    full.close()
    resumed = open_train_batches(data, rank=0, world=2, device=torch.device("cpu"), epoch=1, batch_in_epoch=3,
                                 channels_last=False)
    got = take(resumed, 5)
    assert (resumed.epoch, resumed.batch_in_epoch) == (2, 3)
    resumed.close()
    for (a, am), (b, bm) in zip(got, ref[3:]):
        assert torch.equal(a, b) and torch.equal(am, bm)


@pytest.mark.parametrize("placement", ["stream", "host"])
def test_validation_batches_are_the_same_every_call(shards, placement):
    data = cfg(shards, placement=placement)
    state = torch.random.get_rng_state()
    a = list(iter_val_batches(data, rank=0, world=1, device=torch.device("cpu"), max_batches=5, channels_last=False))
    b = list(iter_val_batches(data, rank=0, world=1, device=torch.device("cpu"), max_batches=1, channels_last=False))
    assert torch.equal(torch.random.get_rng_state(), state)  # no RNG drawn
    assert [x.shape[0] for x, _ in a] == [8, 2]  # 10 val samples: the last batch is short, nothing dropped
    assert len(b) == 1 and torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])


needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")),
                              reason="torch.compile's CPU backend needs a C++ compiler")


@needs_cc
@pytest.mark.slow
def test_compiled_host_gather_gives_the_eager_batches_bit_for_bit(shards):
    data = cfg(shards, placement="host")
    eager = open_train_batches(data, rank=1, world=2, device=torch.device("cpu"), epoch=0, batch_in_epoch=1,
                               channels_last=True, native=False)
    fused = open_train_batches(data, rank=1, world=2, device=torch.device("cpu"), epoch=0, batch_in_epoch=1,
                               channels_last=True, compile=True, native=False)
    try:
        assert fused._split.fused is not None
        for (a, am), (b, bm) in zip(take(eager, 6), take(fused, 6)):  # across the epoch boundary
            assert torch.equal(a, b) and torch.equal(am, bm)
            assert b.is_contiguous(memory_format=torch.channels_last) and bm.shape == (8, 1, 24, 24)
        assert fused._split.fused is not None  # it really ran compiled (no fallback to eager)
    finally:
        eager.close()
        fused.close()


@needs_cc
@pytest.mark.slow
def test_fused_gather_converts_every_uint8_value_as_u8_to_float():
    values = torch.arange(256, dtype=torch.uint8)
    images = values.roll(7).repeat(3 * 4).reshape(4 * 16, 4, 4, 3)  # 64 rows, every value in every channel
    masks = values.reshape(16, 4, 4).repeat(4, 1, 1)
    index = torch.tensor([63, 0, 5, 5, 17, 40])
    image, mask = fused_gather()(images, masks, index, torch.contiguous_format)
    assert image.is_contiguous() and mask.is_contiguous()
    assert torch.equal(image, u8_to_float(images[index].permute(0, 3, 1, 2), "cpu"))
    assert torch.equal(mask, u8_to_float(masks[index].unsqueeze(1), "cpu"))


@needs_cc
def test_native_host_gather_gives_the_torch_batches_bit_for_bit(shards):
    """The default CPU host path (the C kernel with streaming stores) against eager torch, across an epoch."""
    data = cfg(shards, placement="host")
    torch_path = open_train_batches(data, rank=0, world=2, device=torch.device("cpu"), epoch=0, batch_in_epoch=1,
                                    channels_last=True, native=False)
    native = open_train_batches(data, rank=0, world=2, device=torch.device("cpu"), epoch=0, batch_in_epoch=1,
                                channels_last=True)
    try:
        assert native._split.native is not None, native_convert.why_not()
        for (a, am), (b, bm) in zip(take(torch_path, 6), take(native, 6)):
            assert torch.equal(a, b) and torch.equal(am, bm)
            assert b.is_contiguous(memory_format=torch.channels_last) and bm.shape == (8, 1, 24, 24)
    finally:
        torch_path.close()
        native.close()


@needs_cc
@pytest.mark.parametrize("row_shape", [(4, 4, 3), (3, 5, 3), (7,)], ids=["aligned", "odd-rows", "tail-only"])
def test_native_gather_converts_every_uint8_value_as_u8_to_float(row_shape):
    """Every uint8 value, rows whose length is not a multiple of the vector width, and an output that starts off
    the 64-byte alignment streaming stores need (the head and tail loops)."""
    n = int(np.prod(row_shape))
    src = torch.arange(64 * n, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(64, *row_shape)
    index = torch.tensor([63, 0, 5, 5, 17, 40])
    expected = src[index].float().mul_(1 / 255)
    assert torch.equal(native_convert.gather_rows(src, index), expected)
    backing = torch.empty(len(index) * n + 1, dtype=torch.float32)
    out = backing[1:].view(len(index), *row_shape)  # 4 bytes past an aligned start
    assert torch.equal(native_convert.gather_rows(src, index, out=out), expected)
    with pytest.raises(IndexError, match="out of range"):
        native_convert.gather_rows(src, torch.tensor([0, 64]))


def test_native_kernel_absent_falls_back_to_torch(shards, monkeypatch, tmp_path):
    """No C compiler: the host path says so once and converts with torch (same batches)."""
    monkeypatch.setattr(native_convert, "_kernel", native_convert._NOT_LOADED)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert native_convert.load() is None and "no-such-cc" in native_convert.why_not()
    batches = open_train_batches(cfg(shards, placement="host"), rank=0, world=1, device=torch.device("cpu"),
                                 epoch=0, batch_in_epoch=0, channels_last=True)
    try:
        assert batches._split.native is None
        image, mask = next(batches)
        assert image.dtype == torch.float32 and float(image.max()) <= 1.0
    finally:
        batches.close()
