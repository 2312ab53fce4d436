"""ShardLoader over real shards: exactly-once across ranks x workers, equal batch counts with uneven shards,
determinism by seed, exact mid-epoch resume, resampled mode, corrupt samples reported."""

import errno
import io
import json
import multiprocessing.synchronize
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_36, model_overrides, set_args
from PIL import Image

from facevae_dist.data import ShardLoader, read_sizes, to_float
from facevae_dist.data import loader as loader_mod
from facevae_dist.data.loader import _BatchRing
from facevae_dist.data.shards import ShardOptions, build_shards, read_manifest
from facevae_dist.data.sources import SyntheticSource
from facevae_dist.data.tario import iter_tar, write_tar
from facevae_dist.errors import DataError, RunError

torch.set_num_threads(1)
# `facevae train` overrides of the worker tests: the 36 px profile's size and width, streamed from the shards
STREAMED_TINY = set_args([*model_overrides(TINY_36, ("image_size", "width")), "data.placement=stream"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 100 images -> train 80 in shards of 7: 11 x 7 + 1 x 3 (uneven on purpose)
    out = tmp_path_factory.mktemp("shards")
    build_shards(SyntheticSource(n=100, seed=2), out, ShardOptions(image_size=24, shard_size=7))
    return out


def epoch_keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_exactly_once_across_two_ranks_and_two_workers(shards):
    all_keys = []
    for rank in (0, 1):
        loader = ShardLoader(shards, "train", 8, rank=rank, world_size=2, workers=2, seed=1)
        batches = list(loader)
        assert len(batches) == len(loader) == 5  # 40 samples per rank
        for b in batches:
            assert b["image"].shape == (8, 3, 24, 24) and b["image"].dtype == torch.uint8
            assert b["mask"].shape == (8, 1, 24, 24) and b["mask"].dtype == torch.uint8
        all_keys += [k for b in batches for k in b["key"]]
        assert loader.dropped_samples == 0
    assert len(all_keys) == 80 and len(set(all_keys)) == 80
    assert set(all_keys) == {f"train-{i:08d}" for i in range(80)}


def test_equal_batch_counts_with_uneven_shards_and_counted_remainder(shards):
    # batch 6: 40 per rank -> 6 batches of 6 on every rank; 2 x 4 samples dropped this epoch, and counted.
    keys, lengths = [], []
    for rank in (0, 1):
        loader = ShardLoader(shards, "train", 6, rank=rank, world_size=2, workers=2, seed=0)
        got = list(loader)
        lengths.append((len(loader), len(got)))
        keys += [k for b in got for k in b["key"]]
        assert loader.dropped_samples == 8
    assert lengths == [(6, 6), (6, 6)]
    assert len(keys) == 72 and len(set(keys)) == 72
    # drop_last=False with one rank: every sample exactly once, last batch short.
    loader = ShardLoader(shards, "train", 6, drop_last=False, shuffle=False)
    got = list(loader)
    assert [len(b["key"]) for b in got][-1] == 2 and loader.dropped_samples == 0
    assert epoch_keys(loader) == [f"train-{i:08d}" for i in range(80)]


def test_three_ranks_never_hang(shards):
    # 80 samples over 3 ranks: 26 each (2 left out), 3 batches of 8 on every rank.
    counts = [len(list(ShardLoader(shards, "train", 8, rank=r, world_size=3, seed=4))) for r in range(3)]
    assert counts == [3, 3, 3]


def test_determinism_by_seed_and_epoch_independent_of_workers(shards):
    a = epoch_keys(ShardLoader(shards, "train", 8, seed=3, workers=0))
    b = epoch_keys(ShardLoader(shards, "train", 8, seed=3, workers=2))
    assert a == b  # worker count changes nothing
    assert a != epoch_keys(ShardLoader(shards, "train", 8, seed=4))
    loader = ShardLoader(shards, "train", 8, seed=3)
    loader.set_epoch(1)
    e1 = epoch_keys(loader)
    assert e1 != a and sorted(e1) == sorted(a)  # reshuffled each epoch, same samples
    first = next(iter(ShardLoader(shards, "train", 8, seed=3)))
    again = next(iter(ShardLoader(shards, "train", 8, seed=3)))
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_tail(shards, workers):
    full = [b["key"] for b in ShardLoader(shards, "train", 8, rank=1, world_size=2, seed=5, epoch=2, workers=workers)]
    resumed = ShardLoader(shards, "train", 8, rank=1, world_size=2, seed=5, epoch=2, start_batch=3, workers=workers)
    assert len(resumed) == len(full)  # len is the whole epoch
    assert [b["key"] for b in resumed] == full[3:]
    assert [b["key"] for b in resumed] == full  # the next pass is a whole epoch again


def test_resampled_mode(shards):
    loaders = [ShardLoader(shards, "train", 8, rank=r, world_size=2, resampled=True, seed=0) for r in (0, 1)]
    counts = [len(list(loader)) for loader in loaders]
    assert counts == [len(loaders[0])] * 2 == [5, 5]
    keys = epoch_keys(loaders[0])
    assert keys == epoch_keys(loaders[0])  # deterministic
    loaders[0].set_epoch(1)
    assert epoch_keys(loaders[0]) != keys


def test_too_few_shards_for_ranks_times_workers(shards):
    with pytest.raises(DataError, match=r"2 shard\(s\) for 2 rank\(s\) x 2 worker\(s\); need at least 4"):
        ShardLoader(shards, "val", 2, world_size=2, workers=2)


def test_to_float_and_sizes(shards):
    batch = next(iter(ShardLoader(shards, "val", 4)))
    image, mask = to_float(batch, "cpu", channels_last=True)
    assert image.dtype == mask.dtype == torch.float32 and image.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= image.min() and image.max() <= 1 and mask.shape == (4, 1, 24, 24)
    assert torch.allclose(image * 255, batch["image"].float())
    assert read_sizes(shards) == {"train": 80, "val": 10, "test": 10}
    assert read_manifest(shards)["image_size"] == 24


def test_corrupt_sample_is_reported_and_counted(tmp_path, shards):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    tar = out / "test" / "shard-000000.tar"
    samples = list(iter_tar(tar))
    samples[2][1]["jpg"] = b"\xff\xd8 not a jpeg"
    write_tar(tar, samples)
    loader = ShardLoader(out, "test", 5, shuffle=False)
    with pytest.warns(UserWarning, match="test-00000002"):
        batches = list(loader)
    assert loader.corrupt_count == 1
    assert [len(b["key"]) for b in batches] == [5, 5]  # shapes and batch count kept
    assert "test-00000002" in batches[0]["corrupt"][0] and "test-00000002" not in batches[0]["key"]
    assert json.loads((out / "sizes.json").read_text())["test"] == 10


def test_persistent_workers_follow_set_epoch_and_resume(shards):
    reference = ShardLoader(shards, "train", 8, seed=6)
    loader = ShardLoader(shards, "train", 8, seed=6, workers=2)
    assert epoch_keys(loader) == epoch_keys(reference)
    loader.set_epoch(3, start_batch=2)
    reference.set_epoch(3)
    expected = [b["key"] for b in reference]
    assert [b["key"] for b in loader] == expected[2:]
    assert [b["key"] for b in loader] == expected  # same workers, next pass = whole epoch 3


def _pixels(batches):
    return [(b["key"], b["image"].clone(), b["mask"].clone()) for b in batches]


def _same(a, b):
    assert [k for k, _, _ in a] == [k for k, _, _ in b]
    assert all(torch.equal(x, y) and torch.equal(m, n) for (_, x, m), (_, y, n) in zip(a, b))


@pytest.mark.parametrize("prefetch", [1, 3])
def test_workers_hand_batches_over_shared_slots_bit_for_bit(shards, prefetch):
    """Workers decode into shared slots (loader._BatchRing) and send only a ticket; with as few slots as the
    DataLoader's flow control allows, across epochs and after an epoch abandoned half-way (its prefetched batches
    are dropped by the DataLoader, their slots reused), every batch equals the one read without workers."""
    reference = ShardLoader(shards, "train", 8, seed=7)
    loader = ShardLoader(shards, "train", 8, seed=7, workers=2, prefetch_factor=prefetch)
    try:
        _same(_pixels(loader), _pixels(reference))
        assert loader._dataset.ring is not None and loader._dataset.ring.slots == 2 * prefetch + 1
        loader.set_epoch(1)
        it = iter(loader)
        [next(it) for _ in range(3)]  # abandon epoch 1 after 3 batches
        loader.set_epoch(2, start_batch=1)
        reference.set_epoch(2, start_batch=1)
        _same(_pixels(loader), _pixels(reference))
        assert loader._dataset.ring.written == 0  # the main process writes none (each worker counts its own)
    finally:
        loader.close()
    assert loader._dataset.ring is None  # released with the workers


def test_a_slot_overwritten_while_read_is_an_error_not_a_torn_batch(shards):
    ring = _BatchRing(workers=1, slots=2, batch_size=2, size=4)
    ticket, images, masks = ring.claim(0, 2)
    images[...] = 7
    ring.publish(ticket)
    image, _ = ring.take(ticket, pin=False)
    assert image.shape == (2, 4, 4, 3) and int(image.max()) == 7
    ring.claim(0, 2)  # the next slot
    ring.claim(0, 2)  # wraps round onto the first: now being written
    with pytest.raises(RunError, match="overwrote batch 1"):
        ring.take(ticket, pin=False)


def test_no_shared_memory_falls_back_to_the_pipe(shards, monkeypatch):
    def no_shm(*args, **kwargs):
        raise RuntimeError("unable to allocate shared memory")

    monkeypatch.setattr(loader_mod._BatchRing, "__init__", no_shm)
    loader = ShardLoader(shards, "train", 8, seed=7, workers=2)
    try:
        with pytest.warns(UserWarning, match="no shared memory"):
            got = _pixels(loader)
        assert loader._dataset.ring is None
        _same(got, _pixels(ShardLoader(shards, "train", 8, seed=7)))
    finally:
        loader.close()


def test_small_dev_shm_falls_back_to_the_pipe_before_any_worker_starts(shards, monkeypatch):
    """A container's 64 MB /dev/shm: slots that would take more than half of what is free are not allocated."""
    real = os.statvfs

    class Tiny:
        f_bavail, f_frsize = 16, 4096  # 64 KB free

    monkeypatch.setattr(loader_mod.os, "statvfs", lambda path: Tiny() if path == "/dev/shm" else real(path))
    loader = ShardLoader(shards, "train", 8, seed=7, workers=2)
    try:
        with pytest.warns(UserWarning, match="/dev/shm has 0 MB free"):
            keys = epoch_keys(loader)
        assert loader._dataset.ring is None and keys == epoch_keys(ShardLoader(shards, "train", 8, seed=7))
    finally:
        loader.close()


@pytest.mark.parametrize("how", ["read-only", "no semaphores"])
def test_workers_that_cannot_start_fall_back_to_reading_in_the_process(shards, monkeypatch, how):
    """/dev/shm read-only (or multiprocessing unable to make its locks there) when the loader
    starts its workers: one warning, the same batches read in the training process, never a traceback."""
    if how == "read-only":
        real = os.access
        monkeypatch.setattr(loader_mod.os, "access",
                            lambda path, mode, **kw: False if path == "/dev/shm" else real(path, mode, **kw))
    else:
        def no_semaphore(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", no_semaphore)
    loader = ShardLoader(shards, "train", 8, seed=7, workers=2)
    try:
        with pytest.warns(UserWarning, match=r"worker process\(es\) cannot start .*check /dev/shm"):
            got = _pixels(loader)
        assert loader.workers == 0 and loader._dataloader is None
        monkeypatch.undo()
        _same(got, _pixels(ShardLoader(shards, "train", 8, seed=7)))
        _same(_pixels(loader), got)  # the next epoch too, without a second warning
    finally:
        loader.close()


def _live_processes_in_group(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group `pgid` (orphans are reparented but keep their group)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":  # fields after "(comm)": state, ppid, pgrp
            live.append(int(stat.parent.name))
    return live


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-shards")  # 36 px, the smallest size the model takes
    build_shards(SyntheticSource(n=120, seed=1), out, ShardOptions(image_size=36, shard_size=6))
    return out


@pytest.mark.parametrize("damage", ["truncated", "deleted", "empty"])
def test_damaged_shard_with_workers_exits_with_one_line_and_no_orphans(tmp_path, train_shards, damage):
    shards = tmp_path / "s"
    shutil.copytree(train_shards, shards)
    tar = shards / "train" / "shard-000005.tar"
    if damage == "truncated":
        os.truncate(tar, tar.stat().st_size // 2)
    elif damage == "deleted":
        tar.unlink()
    else:
        tar.write_bytes(b"")
    cmd = [sys.executable, "-m", "facevae_dist", "train", "--shards", str(shards), "--run-dir", str(tmp_path / "run"),
           "--max-steps", "1000", "--batch-size", "4", "--val-every", "0", "--sample-every", "0", "--workers", "2",
           *STREAMED_TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)  # a clean failure takes seconds; the bug hung forever
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"`facevae train` hung on a {damage} shard with 2 workers")
    finally:
        deadline = time.monotonic() + 60  # the kernel kills orphaned workers (PDEATHSIG); give it time when loaded
        while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _live_processes_in_group(proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"worker processes outlived `facevae train`: {left}"
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("facevae: error:")]
    assert len(error_lines) == 1 and "shard-000005.tar" in error_lines[0], err


def test_jpeg_decoding_matches_pil_and_falls_back_for_what_simplejpeg_refuses(shards):
    assert loader_mod.simplejpeg is not None  # a dependency: the fast path is the one that runs
    samples = list(iter_tar(shards / "train" / "shard-000000.tar"))[:3]
    for _, fields in samples:
        got, mask = np.empty((24, 24, 3), np.uint8), np.empty((24, 24), np.uint8)
        loader_mod.decode_into(fields, "jpg", got, mask)
        with Image.open(io.BytesIO(fields["jpg"])) as im:
            assert np.array_equal(got, np.asarray(im.convert("RGB")))
    rgb = Image.new("RGB", (24, 24), (200, 30, 90))
    for mode in ("L", "CMYK"):  # grayscale and CMYK JPEGs decode as PIL converts them
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format="JPEG", quality=95)
        fields = {"jpg": buf.getvalue(), "mask.png": samples[0][1]["mask.png"]}
        got = np.empty((24, 24, 3), np.uint8)
        loader_mod.decode_into(fields, "jpg", got, np.empty((24, 24), np.uint8))
        with Image.open(io.BytesIO(fields["jpg"])) as im:
            assert np.array_equal(got, np.asarray(im.convert("RGB"))), mode
    with pytest.raises(Exception):  # a corrupt JPEG still raises (the loader counts it)
        loader_mod.decode_into({"jpg": b"\xff\xd8 junk", "mask.png": samples[0][1]["mask.png"]}, "jpg",
                           np.empty((24, 24, 3), np.uint8), np.empty((24, 24), np.uint8))


def test_workers_die_with_a_killed_trainer(tmp_path, train_shards):
    """SIGKILL gives the trainer no chance to stop its workers: the kernel does (PR_SET_PDEATHSIG)."""
    cmd = [sys.executable, "-m", "facevae_dist", "train", "--shards", str(train_shards), "--run-dir",
           str(tmp_path / "run"), "--max-steps", "100000", "--batch-size", "4", "--val-every", "0", "--sample-every",
           "0", "--workers", "2", *STREAMED_TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_live_processes_in_group(proc.pid)) < 3 and time.monotonic() < deadline:  # trainer + 2 workers
            assert proc.poll() is None, "training ended before its workers started"
            time.sleep(0.2)
        assert len(_live_processes_in_group(proc.pid)) >= 3, "the data workers never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _live_processes_in_group(proc.pid) == [], "data workers outlived a SIGKILLed trainer"
    finally:
        for pid in _live_processes_in_group(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_eval_padding_gives_every_sample_to_some_rank_with_equal_counts(shards):
    # 80 train samples over 3 ranks: without padding 2 are left out; with pad=True (what multi-rank eval uses) every
    # rank reads ceil(80/3) = 27, the last one wrapping round to the first samples, and the union is every sample.
    per_rank, keys = [], []
    for rank in range(3):
        plain = ShardLoader(shards, "train", 8, rank=rank, world_size=3, drop_last=False, shuffle=False)
        assert plain.dropped_samples == 2
        loader = ShardLoader(shards, "train", 8, rank=rank, world_size=3, drop_last=False, shuffle=False, pad=True)
        got = epoch_keys(loader)
        per_rank.append(len(got))
        keys += got
        assert loader.dropped_samples == 0
    assert per_rank == [27, 27, 27]
    assert set(keys) == {f"train-{i:08d}" for i in range(80)} and len(keys) - len(set(keys)) == 1


# ---- bounded reads: every shard member within a size, every picture checked from its header ------------------------


def _own_copy(shards, tmp_path) -> Path:
    own = tmp_path / "shards"
    shutil.copytree(shards, own)
    return own


def _append_member(tar_path: Path, name: str, size: int) -> None:
    """Add a member of `size` zero bytes after the last one (it joins that sample when named after its key). The
    data is a hole in a sparse file: a 1 GiB member costs no disk, only whoever reads it."""
    import tarfile

    from facevae_dist.data.tario import index_tar

    end = max(off + -(-size_ // 512) * 512 for _, fields in index_tar(tar_path) for off, size_ in fields.values())
    info = tarfile.TarInfo(name)
    info.size = size
    with open(tar_path, "r+b") as f:
        f.seek(end)
        f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        data_end = end + 512 + -(-size // 512) * 512
        f.truncate(data_end)
        f.seek(data_end)
        f.write(b"\0" * 1024)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _last_shard(shards: Path, split: str = "train") -> tuple[Path, str]:
    shard = shards / read_manifest(shards)["splits"][split]["shards"][-1]["path"]
    return shard, [key for key, _ in iter_tar(shard)][-1]


def test_an_unknown_1gib_member_is_skipped_unread_and_an_oversized_one_is_a_corrupt_sample(shards, tmp_path):
    own = _own_copy(shards, tmp_path)
    shard, key = _last_shard(own)
    _append_member(shard, f"{key}.blob", 1 << 30)
    before = _peak_rss_mb()
    loader = ShardLoader(own, "train", 8, workers=0, shuffle=False, drop_last=False)
    keys = epoch_keys(loader)
    assert len(keys) == 80 and loader.corrupt_count == 0
    assert _peak_rss_mb() - before < 256, "the unknown member was read"
    # a known member over its limit (json: 64 KiB) makes that one sample corrupt; the shard stays readable
    _append_member(shard, f"{key}.json", 100_000)
    loader = ShardLoader(own, "train", 8, workers=0, shuffle=False, drop_last=False)
    with pytest.warns(UserWarning, match=rf"{key} .*json is 100,000 bytes \(limit 65,536\)"):
        keys = epoch_keys(loader)
    assert len(keys) == 80 and loader.corrupt_count == 1


def _png_header_only(path_or_buf, width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of width x height zeros, compressed row by row (never held whole)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _rewrite_sample(shard: Path, key: str, **fields: bytes) -> None:
    samples = [(k, {**f, **fields} if k == key else f) for k, f in iter_tar(shard)]
    write_tar(shard, samples)


def test_a_177_mpixel_mask_is_refused_from_its_header_without_decoding(shards, tmp_path):
    own = _own_copy(shards, tmp_path)
    shard, key = _last_shard(own)
    _rewrite_sample(shard, key, **{"mask.png": _png_header_only(None, 13_300, 13_300)})
    before = _peak_rss_mb()
    loader = ShardLoader(own, "train", 8, workers=0, shuffle=False, drop_last=False)
    with pytest.warns(UserWarning, match=rf"{key} .*mask.png is 13300x13300, the shards' samples are 24x24"):
        keys = epoch_keys(loader)
    assert len(keys) == 80 and loader.corrupt_count == 1
    assert _peak_rss_mb() - before < 100, "the 177 Mpixel mask was decoded"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_and_0_1_masks_are_read_by_value_and_said_once(shards, tmp_path):
    own = _own_copy(shards, tmp_path)
    shard = own / read_manifest(own)["splits"]["train"]["shards"][0]["path"]
    original = {k: np.asarray(Image.open(io.BytesIO(f["mask.png"]))) for k, f in iter_tar(shard)}
    k16, k01, k01b = list(original)[:3]
    _rewrite_sample(shard, k16, **{"mask.png": _png(original[k16].astype(np.uint16) * 257)})  # 16-bit, full scale
    for k in (k01, k01b):
        _rewrite_sample(shard, k, **{"mask.png": _png((original[k] > 127).astype(np.uint8))})  # 0/1
    assert Image.open(io.BytesIO(dict(iter_tar(shard))[k16]["mask.png"])).mode == "I;16"
    loader = ShardLoader(own, "train", 80, workers=0, shuffle=False, drop_last=False)
    with pytest.warns(UserWarning) as record:
        (batch,) = list(loader)
    masks = dict(zip(batch["key"], batch["mask"][:, 0].numpy()))
    np.testing.assert_array_equal(masks[k16], original[k16])  # not clipped to 255 everywhere
    for k in (k01, k01b):
        np.testing.assert_array_equal(masks[k], np.where(original[k] > 127, 255, 0))
    said = [str(w.message) for w in record if "holds only 0 and 1" in str(w.message)]
    assert len(said) == 1 and "of 2 sample(s)" in said[0] and loader.binary_mask_count == 2
    from facevae_dist.data.shards import verify_shards

    problems = "\n".join(verify_shards(own)["problems"])
    assert f"sample {k16}: ValueError: mask.png mode I;16" in problems
    assert f"sample {k01}: ValueError: mask.png holds only 0 and 1" in problems
