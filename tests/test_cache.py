"""The decoded-split cache and the host placement over it, on real shards: built in parallel identically to one
process, exactly once per epoch across 2 ranks, exact resume, the same batches as the streaming loader (corrupt
samples replaced and counted the same way), rebuilt when a shard or the cache file changes or its JSON is edited, a
damaged shard named, a wait for another builder bounded and named, a read-only stale cache streamed by auto."""

import collections
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from facevae_dist.config import DataConfig
from facevae_dist.data import batches as batches_mod
from facevae_dist.data import cache as cache_mod
from facevae_dist.data.batches import iter_val_batches, open_train_batches
from facevae_dist.data.cache import cache_paths, open_cache
from facevae_dist.data.loader import ShardLoader, decode_into
from facevae_dist.data.shards import ShardOptions, build_shards
from facevae_dist.data.sources import SyntheticSource
from facevae_dist.data.tario import iter_tar, write_tar
from facevae_dist.errors import DataError, RunError, UsageError

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")  # 100 images -> train 80 in 12 shards of <= 7, val 10, test 10
    build_shards(SyntheticSource(n=100, seed=2), out, ShardOptions(image_size=24, shard_size=7))
    return out


@pytest.fixture
def own_shards(tmp_path, shards):
    out = tmp_path / "s"
    shutil.copytree(shards, out, ignore=shutil.ignore_patterns("cache"))
    cache_mod._digest.cache_clear()
    return out


def data_cfg(shards, **kw):
    return DataConfig(shards=str(shards), batch_size=kw.pop("batch_size", 8), workers=0, seed=kw.pop("seed", 3),
                      placement="host", **kw).validate()


def row_of(cache):
    """image bytes -> cache row (synthetic faces are all different)."""
    table = {cache.images[r].tobytes(): r for r in range(len(cache))}
    assert len(table) == len(cache)
    return lambda image: table[(image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy().tobytes()]


def test_parallel_build_equals_one_process_and_is_plain_npy(own_shards):
    paths = cache_paths(own_shards, "train")
    one = open_cache(own_shards, "train", processes=1)
    sha_one = json.loads(paths.meta.read_text())["sha256"]
    paths.images.unlink()
    two = open_cache(own_shards, "train", processes=2)
    meta = json.loads(paths.meta.read_text())
    assert meta["sha256"] == sha_one and meta["count"] == 80 and meta["corrupt"] == []
    # self-describing files: numpy reads them without pickle and without any offset from the JSON
    assert np.load(paths.images, allow_pickle=False).shape == (80, 24, 24, 3)
    assert np.load(paths.masks, allow_pickle=False).dtype == np.uint8
    assert np.array_equal(one.images, two.images) and np.array_equal(one.masks, two.masks)
    assert [p.name for p in paths.meta.parent.iterdir() if p.name.endswith(".tmp")] == []
    first = next(iter_tar(own_shards / "train" / "shard-000000.tar"))  # row 0 = first sample of the first shard
    image, mask = np.empty((24, 24, 3), np.uint8), np.empty((24, 24), np.uint8)
    decode_into(first[1], "jpg", image, mask)
    assert np.array_equal(two.images[0], image) and np.array_equal(two.masks[0], mask)


@pytest.mark.parametrize("batch_size, dropped", [(8, 0), (6, 8)])
def test_exactly_once_per_epoch_across_two_ranks(shards, batch_size, dropped):
    cache = open_cache(shards, "train")
    row = row_of(cache)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            batches = open_train_batches(data_cfg(shards, batch_size=batch_size), rank=rank, world=2, device=CPU,
                                         epoch=epoch, batch_in_epoch=0, channels_last=False)
            assert batches.placement == "host" and batches.dropped_samples == dropped
            for _ in range(batches.batches_per_epoch):
                image, _ = next(batches)
                assert image.shape[0] == batch_size
                seen += [row(x) for x in image]
            assert (batches.epoch, batches.batch_in_epoch) == (epoch, batches.batches_per_epoch)
        assert len(seen) == len(set(seen)) == 80 - dropped  # nothing twice; all but the counted remainder
        if epoch == 0:
            order0 = seen
    assert order0 != seen  # reshuffled by (seed, epoch)


def test_resume_position_gives_the_same_batches_across_the_epoch_boundary(shards):
    cfg = data_cfg(shards, batch_size=8)
    full = open_train_batches(cfg, rank=1, world=2, device=CPU, epoch=2, batch_in_epoch=0, channels_last=True)
    ref = [next(full) for _ in range(8)]  # 5 batches per epoch: runs into epoch 3
    assert (full.epoch, full.batch_in_epoch) == (3, 3)
    resumed = open_train_batches(cfg, rank=1, world=2, device=CPU, epoch=2, batch_in_epoch=4, channels_last=True)
    got = [next(resumed) for _ in range(4)]
    assert (resumed.epoch, resumed.batch_in_epoch) == (3, 3)
    for (a, am), (b, bm) in zip(got, ref[4:]):
        assert torch.equal(a, b) and torch.equal(am, bm)
        assert a.is_contiguous(memory_format=torch.channels_last)


def test_cache_is_rebuilt_when_a_shard_or_the_cache_changes(own_shards):
    paths = cache_paths(own_shards, "train")
    before = open_cache(own_shards, "train", processes=1).images[0].copy()
    built = paths.meta.stat().st_mtime_ns
    assert open_cache(own_shards, "train").images is not None and paths.meta.stat().st_mtime_ns == built  # reused
    # a shard rewritten (first sample replaced by another image): the cache notices and re-decodes
    tar = own_shards / "train" / "shard-000000.tar"
    samples = list(iter_tar(tar))
    samples[0][1]["jpg"] = samples[1][1]["jpg"]
    write_tar(tar, samples)
    after = open_cache(own_shards, "train", processes=1)
    assert paths.meta.stat().st_mtime_ns != built
    assert not np.array_equal(after.images[0], before) and np.array_equal(after.images[0], after.images[1])
    # the pixels damaged in place (same size, valid header): the sha256 no longer matches -> rebuilt
    expected = after.images[-1].copy()
    with open(paths.images, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\x01" * 64)
    cache_mod._digest.cache_clear()  # as a new run would
    again = open_cache(own_shards, "train", processes=1)
    assert np.array_equal(again.images[-1], expected)


def _edit_meta(paths, edit):
    meta = json.loads(paths.meta.read_text())
    edit(meta)
    paths.meta.write_text(json.dumps(meta))


@pytest.mark.parametrize("tamper", ["count too large", "corrupt row out of range", "corrupt rows unsorted",
                                    "header shape too large", "file truncated", "not a dict"])
def test_an_edited_cache_is_rebuilt_never_mapped_wrong(own_shards, tamper):
    """Whatever is edited in the JSON or the .npy files, the layout is checked against the manifest and the file:
    the cache is rebuilt (never an mmap ValueError, never rows mapped from a number in the JSON)."""
    paths = cache_paths(own_shards, "train")
    good = open_cache(own_shards, "train", processes=1)
    ref_images, ref_masks = np.array(good.images), np.array(good.masks)
    if tamper == "count too large":
        _edit_meta(paths, lambda m: m.update(count=10**9))
    elif tamper == "corrupt row out of range":
        _edit_meta(paths, lambda m: m.update(corrupt=[[80, "x"]]))
    elif tamper == "corrupt rows unsorted":
        _edit_meta(paths, lambda m: m.update(corrupt=[[5, "x"], [1, "y"]]))
    elif tamper == "header shape too large":  # same header length: (80, -> (90,
        raw = paths.images.read_bytes()
        paths.images.write_bytes(raw.replace(b"(80, 24, 24, 3)", b"(90, 24, 24, 3)", 1))
    elif tamper == "file truncated":
        os.truncate(paths.masks, paths.masks.stat().st_size - 100)
    else:
        paths.meta.write_text("[1, 2]")
    again = open_cache(own_shards, "train", processes=1)
    assert np.array_equal(again.images, ref_images) and np.array_equal(again.masks, ref_masks)
    assert json.loads(paths.meta.read_text())["count"] == 80 and again.corrupt == []


def test_a_stale_cache_in_a_read_only_folder_streams_under_auto_and_is_one_line_under_host(own_shards, monkeypatch):
    """placement=auto with a stale cache it cannot rebuild (read-only shards folder) streams."""
    paths = cache_paths(own_shards, "train")
    open_cache(own_shards, "train", processes=1)
    _edit_meta(paths, lambda m: m.update(count=81))  # stale
    real_access = os.access
    read_only = str(paths.meta.parent)

    def access(path, mode, **kw):  # tests run as root, for whom chmod alone makes nothing read-only
        if mode & os.W_OK and str(path).startswith(read_only):
            return False
        return real_access(path, mode, **kw)

    monkeypatch.setattr(cache_mod.os, "access", access)
    auto = DataConfig(shards=str(own_shards), batch_size=8, placement="auto", seed=3)
    assert batches_mod.resolve_placement(auto, CPU) == "stream"
    batches = open_train_batches(auto, rank=0, world=1, device=CPU, epoch=0, batch_in_epoch=0, channels_last=False)
    assert batches.placement == "stream" and next(batches)[0].shape == (8, 3, 24, 24)
    batches.close()
    monkeypatch.undo()
    assert batches_mod.resolve_placement(auto, CPU) == "host"  # writable again: it would rebuild it


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_waiting_for_another_builder_names_it_and_gives_up(own_shards, monkeypatch):
    folder = cache_paths(own_shards, "train").meta.parent
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(cache_mod, "CACHE_LOCK_WAIT_S", 1.0)
        with pytest.raises(RunError, match=rf"still locked by pid {holder.pid} after 1 s; .*data\.placement=stream"):
            open_cache(own_shards, "train", processes=1)
    finally:
        holder.kill()
        holder.wait()
    assert len(open_cache(own_shards, "train", processes=1)) == 80  # free again


def test_corrupt_sample_is_counted_and_replaced_like_the_loader(own_shards):
    tar = own_shards / "train" / "shard-000002.tar"
    samples = list(iter_tar(tar))
    samples[3][1]["jpg"] = b"\xff\xd8 not a jpeg"
    write_tar(tar, samples)
    bad_key = samples[3][0]
    cache = open_cache(own_shards, "train", processes=2)
    assert len(cache.corrupt) == 1 and bad_key in cache.corrupt[0] and "shard-000002.tar" in cache.corrupt[0]
    assert [r for r, _ in json.loads(cache_paths(own_shards, "train").meta.read_text())["corrupt"]] == \
        cache.corrupt_rows.tolist()
    host = open_train_batches(data_cfg(own_shards), rank=0, world=1, device=CPU, epoch=0, batch_in_epoch=0,
                              channels_last=False)
    stream = ShardLoader(own_shards, "train", 8, seed=3)
    with pytest.warns(UserWarning, match=bad_key):
        ref = list(stream)
    with pytest.warns(UserWarning, match=bad_key):
        got = [next(host) for _ in range(len(ref))]
    assert host.corrupt_count == stream.corrupt_count == 1
    for (image, mask), b in zip(got, ref):
        assert torch.equal((image * 255).round().to(torch.uint8), b["image"])
        assert torch.equal((mask * 255).round().to(torch.uint8), b["mask"])


def test_validation_from_the_cache_equals_the_streaming_one(shards):
    host = list(iter_val_batches(data_cfg(shards), rank=0, world=2, device=CPU, max_batches=9, channels_last=False))
    stream = list(iter_val_batches(DataConfig(shards=str(shards), batch_size=8, seed=3, placement="stream"),
                                   rank=0, world=2, device=CPU, max_batches=9, channels_last=False))
    assert len(host) == len(stream) == 1  # 10 val samples over 2 ranks: 5 each, one short batch
    assert torch.equal(host[0][0], stream[0][0]) and torch.equal(host[0][1], stream[0][1])


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_shard_stops_the_build_naming_it(own_shards, damage):
    tar = own_shards / "train" / "shard-000004.tar"
    if damage == "truncated":
        os.truncate(tar, tar.stat().st_size // 2)
    else:
        tar.unlink()
    with pytest.raises(DataError, match="shard-000004.tar"):
        open_cache(own_shards, "train", processes=2)
    paths = cache_paths(own_shards, "train")
    assert not any(p.exists() for p in paths)
    assert [p.name for p in paths.meta.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="device placement needs a CUDA GPU (none here)")
def test_device_placement_gives_the_host_batches(shards):
    gpu = torch.device("cuda")
    cfg = data_cfg(shards)
    host = open_train_batches(cfg, rank=1, world=2, device=CPU, epoch=1, batch_in_epoch=2, channels_last=True)
    dev = open_train_batches(DataConfig(**{**cfg.__dict__, "placement": "device"}), rank=1, world=2, device=gpu,
                             epoch=1, batch_in_epoch=2, channels_last=True)
    assert dev.placement == "device" and dev._split.images.is_cuda
    for _ in range(7):  # across the epoch boundary
        (a, am), (b, bm) = next(host), next(dev)
        assert b.is_cuda and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b.cpu()) and torch.equal(am, bm.cpu())
    assert (dev.epoch, dev.batch_in_epoch) == (host.epoch, host.batch_in_epoch) == (2, 4)
    auto = open_train_batches(DataConfig(**{**cfg.__dict__, "placement": "auto"}), rank=0, world=1, device=gpu,
                              epoch=0, batch_in_epoch=0, channels_last=False)
    assert auto.placement == "device"  # a few KB fit in any GPU
    dev.close()
    auto.close()


def test_the_device_copy_path_runs_on_cpu_too(shards, monkeypatch):
    """The on-device branch (chunked copy of the split, index tensor on the device) exercised where CUDA is absent."""
    monkeypatch.setattr(batches_mod, "COPY_CHUNK", 5000)  # several chunks for this small split
    cfg = data_cfg(shards)
    split = batches_mod._ResidentSplit(cfg, "train", rank=0, world=2, device=CPU, on_device=True, batch_size=8,
                                       drop_last=True, shuffle=True, resampled=False)
    assert split.images.data_ptr() != torch.from_numpy(split.cache.images).data_ptr()
    assert torch.equal(split.images, torch.from_numpy(split.cache.images))
    copied = batches_mod._ResidentBatches(split, "device", CPU, True, 0, 0)
    host = open_train_batches(cfg, rank=0, world=2, device=CPU, epoch=0, batch_in_epoch=0, channels_last=True)
    for _ in range(6):
        (a, am), (b, bm) = next(host), next(copied)
        assert torch.equal(a, b) and torch.equal(am, bm)
    with pytest.raises(Exception, match="needs a CUDA device"):
        open_train_batches(DataConfig(**{**cfg.__dict__, "placement": "device"}), rank=0, world=1, device=CPU,
                           epoch=0, batch_in_epoch=0, channels_last=False)


def _open_in_child(shards, queue):
    cache = open_cache(shards, "train", processes=2)
    paths = cache_paths(shards, "train")
    queue.put((len(cache), paths.images.stat().st_ino, paths.meta.stat().st_mtime_ns))


def test_concurrent_ranks_build_the_cache_once(own_shards):
    """Two processes (as two ranks would) open a missing cache at once: one builds it under the lock, the other
    waits and reuses it (the JSON is written once)."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like separately launched ranks
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(own_shards, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] and results[0][0] == 80  # same file, same JSON: built once
    folder = cache_paths(own_shards, "train").meta.parent
    assert sorted(p.name for p in folder.iterdir()) == ["train.images.npy", "train.json", "train.masks.npy"]


def test_a_full_disk_is_one_line_and_auto_falls_back_to_streaming(own_shards, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UsageError, match=r"needs 0\.00 GiB, 0\.00 GiB free; .*data\.placement=stream"):
        open_cache(own_shards, "train", processes=1)
    assert not cache_paths(own_shards, "train").images.exists()
    auto = DataConfig(shards=str(own_shards), batch_size=8, placement="auto")
    assert batches_mod.resolve_placement(auto, CPU) == "stream"
    monkeypatch.undo()
    assert batches_mod.resolve_placement(auto, CPU) == "host"


_STUCK_TRAINER = """
import sys, time
from facevae_dist.cli import main
from facevae_dist.data import cache

cache.decode_into = lambda *args, **kwargs: time.sleep(3600)  # a decode that never ends: always caught mid-build
sys.exit(main(sys.argv[1:]))
"""


def test_a_preemption_signal_during_the_cache_build_is_one_line_and_exit_143(tmp_path):
    """Slurm's SIGTERM to the job's process group while `facevae train` decodes the cache (before training, so
    before the trainer's own handlers): it used to exit 143 without a word; now one line, temp files removed."""
    import signal
    import time

    from train_helpers import env

    out = tmp_path / "s"
    build_shards(SyntheticSource(n=60, seed=1), out, ShardOptions(image_size=18, shard_size=7))
    folder = cache_paths(out, "train").meta.parent
    args = ["-q", "train", "--hypothesis", "H9", "--shards", str(out), "--run-dir", str(tmp_path / "run"),
            "--workers", "0", "--batch-size", "4", "--max-steps", "1", "--val-every", "0", "--set", "data.placement=host",
            "--set", "model.image_size=18", "--set", "model.width=0.125"]
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_TRAINER, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env())
    try:
        deadline = time.monotonic() + 300
        while not list(folder.glob(".*.tmp")):  # mid-build: its temp files are there
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the cache build never started"
            time.sleep(0.2)
        time.sleep(1)  # the decoding processes have started on their shards
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0] == (f"facevae: error: {folder}: stopped by SIGTERM while decoding the train split into the cache; "
                        "nothing kept: the next run decodes it again")
    assert list(folder.glob(".*.tmp")) == []
