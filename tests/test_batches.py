"""open_train_batches / iter_val_batches over real shards: float batches on the device, one DataLoader per run that
rolls over epochs, the position a checkpoint stores, exact resume from it, deterministic validation."""

import pytest
import torch

from facevae_dist.config import DataConfig
from facevae_dist.data.batches import _ResidentSplit, iter_val_batches, open_train_batches
from facevae_dist.data.loader import ShardLoader, to_float, u8_to_float
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
            ref = ShardLoader(shards, "train", 8, rank=1, world_size=2, seed=3, epoch=epoch)
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


@pytest.mark.parametrize("channels_last", [True, False])
def test_host_gather_converts_every_uint8_value_as_the_stream_does(shards, channels_last):
    """The host path's gather + float conversion against the streaming path's, value by value: a split whose rows
    hold every uint8 value, gathered in an arbitrary order with a repeat, in both memory formats."""
    split = _ResidentSplit(cfg(shards, placement="host"), "train", rank=0, world=1, device=torch.device("cpu"),
                           on_device=False, batch_size=8, drop_last=True, shuffle=True, resampled=False)
    values = torch.arange(80 * 24 * 24 * 3).remainder(256).to(torch.uint8)
    split.images = values.reshape(80, 24, 24, 3)
    split.masks = values[: 80 * 24 * 24].roll(11).reshape(80, 24, 24)
    index = torch.tensor([63, 0, 5, 5, 17, 40, 79, 2])
    image, mask = split.gather(index, torch.device("cpu"), channels_last)
    scale = torch.tensor(1 / 255, dtype=torch.float32)
    assert torch.equal(image, split.images[index].permute(0, 3, 1, 2).float() * scale)
    assert torch.equal(mask, split.masks[index].unsqueeze(1).float() * scale)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert image.is_contiguous(memory_format=fmt) and mask.shape == (8, 1, 24, 24)
    stream = {"image": split.images[index].permute(0, 3, 1, 2), "mask": split.masks[index].unsqueeze(1)}
    ref_image, ref_mask = to_float(stream, "cpu", channels_last=channels_last)  # what _StreamBatches hands on
    assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)


@pytest.mark.parametrize("placement", ["stream", "host"])
def test_an_empty_split_says_so_and_how_to_rebuild_not_to_shrink_the_batch(tmp_path, placement):
    from facevae_dist.errors import DataError

    out = tmp_path / "s"
    build_shards(SyntheticSource(n=12, seed=0, split_ratios=(1.0, 0.0, 0.0)), out,
                 ShardOptions(image_size=18, shard_size=4))
    data = DataConfig(shards=str(out), batch_size=2, workers=0, placement=placement)
    with pytest.raises(DataError) as exc:
        list(iter_val_batches(data, rank=0, world=1, device="cpu", max_batches=1, channels_last=False))
    assert str(exc.value).startswith(f"{out}/val: the split is empty (0 samples); rebuild the shards")
    assert "smaller batch size" not in str(exc.value)
