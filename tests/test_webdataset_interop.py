"""The shards are plain WebDataset: webdataset's own pipeline reads every split of a real build with the same keys,
counts and pixels as the project's loader (which exists for exact mid-epoch resume and equal steps per rank)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from train_helpers import build_tiny_shards

from facevae_dist.data.loader import ShardLoader

wds = pytest.importorskip("webdataset", reason="webdataset is a test dependency: pip install -e '.[test]'")


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _read_with_webdataset(split_dir) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    urls = [str(p) for p in sorted(split_dir.glob("*.tar"))]
    # mask.png needs its own decoder: webdataset's "rgb8" would make the 1-channel mask RGB
    pipeline = wds.WebDataset(urls, shardshuffle=False).map(
        lambda s: (s["__key__"], _decode_png(s["png"]), _decode_png(s["mask.png"]), json.loads(s["json"])))
    return {key: (img, mask, meta) for key, img, mask, meta in pipeline}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_webdataset_reads_what_the_loader_reads(tmp_path, split):
    shards = build_tiny_shards(tmp_path / "shards", n=40)
    manifest = json.loads((shards / "manifest.json").read_text())
    theirs = _read_with_webdataset(shards / split)
    ours = {}
    for batch in ShardLoader(shards, split, 4, drop_last=False, shuffle=False):
        for i, key in enumerate(batch["key"]):
            ours[key] = (batch["image"][i].permute(1, 2, 0).numpy(), batch["mask"][i, 0].numpy())
    assert len(theirs) == len(ours) == manifest["splits"][split]["count"] > 0
    assert list(theirs) == sorted(ours) == [f"{split}-{i:08d}" for i in range(len(ours))]  # in shard order
    for key, (img, mask, meta) in theirs.items():
        assert img.dtype == np.uint8 and img.shape == (18, 18, 3) and mask.shape == (18, 18)
        np.testing.assert_array_equal(img, ours[key][0])
        np.testing.assert_array_equal(mask, ours[key][1])
        assert meta["split"] == split
