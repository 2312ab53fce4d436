"""What a shards build writes and reads back, one test per class of problem: written files follow the umask, --overwrite removes
only what a build wrote, resume repairs a damaged same-size shard, malformed manifests are one-line errors, shard
paths stay inside the shards folder, a directory named like an image is listed as skipped."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from facevae_dist.cli import main
from facevae_dist.fileio import atomic_write_bytes, atomic_write_json

SMALL = ["--image-size", "18", "--shard-size", "4", "--n", "12"]


def build(out, *extra):
    return main(["--quiet", "shards", "build", "--out", str(out), *SMALL, *extra])


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask_027):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    assert _mode(tmp_path / "a.bin") == 0o640 and _mode(tmp_path / "b.json") == 0o640
    os.umask(0o002)
    atomic_write_bytes(tmp_path / "a.bin", b"y")  # replacing keeps following the umask, not the old file's mode
    assert _mode(tmp_path / "a.bin") == 0o664


def test_shards_build_files_are_readable_by_others_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        assert build(tmp_path / "s") == 0
    finally:
        os.umask(old)
    for name in ("manifest.json", "sizes.json", "build.json", "errors.tsv", "train/shard-000000.tar",
                 "train/shard-000000.stats.json"):
        assert _mode(tmp_path / "s" / name) == 0o644, name


def test_overwrite_removes_only_what_a_build_wrote(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(out) == 0
    notes = out / "train" / "notes.txt"
    notes.write_text("my notes")
    capsys.readouterr()
    assert build(out, "--seed", "5", "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train/notes.txt" in err[0] and "--overwrite" in err[0]
    assert notes.read_text() == "my notes" and (out / "train" / "shard-000000.tar").is_file()  # nothing removed
    # a folder that is not a shard build: no advice to --overwrite, and --overwrite refuses too
    mine = tmp_path / "mine"
    (mine / "val").mkdir(parents=True)
    (mine / "val" / "keep.jpg").write_bytes(b"x")
    assert build(mine) == 2
    err = capsys.readouterr().err
    assert "val/keep.jpg" in err and "pass --overwrite" not in err
    assert build(mine, "--overwrite") == 2 and (mine / "val" / "keep.jpg").read_bytes() == b"x"
    # with the foreign file gone, --overwrite replaces every file of the old build (stale shards, cache included)
    notes.unlink()
    (out / "train" / "shard-000099.tar").write_bytes(b"stale")
    (out / "train" / ".shard-000001.tar.tmp").write_bytes(b"killed mid-write")
    (out / ".manifest.json.k2j4.tmp").write_bytes(b"killed mid-write")
    (out / "cache").mkdir()
    (out / "cache" / "train.u8").write_bytes(b"old cache")
    assert build(out, "--seed", "5", "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["source"]["seed"] == 5
    assert not (out / "train" / "shard-000099.tar").exists() and not (out / "cache").exists()
    assert not list(out.rglob("*.tmp"))


def _damage_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[600:700] = bytes(100)  # inside the first member's data: same size, different bytes
    path.write_bytes(bytes(data))


def test_rerunning_build_repairs_a_damaged_same_size_shard_as_verify_advises(tmp_path, capsys):
    import shlex

    out = tmp_path / "s"
    assert build(out) == 0
    original = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    shard = out / "train" / "shard-000001.tar"
    _damage_same_size(shard)
    capsys.readouterr()
    assert main(["shards", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard-000001.tar: sha256 mismatch" in err
    advice = [line for line in err.splitlines() if "facevae shards build" in line]
    assert len(advice) == 1
    command = shlex.split(advice[0].split("`")[1])
    assert command[:3] == ["facevae", "shards", "build"]
    assert main(["--quiet", *command[1:]]) == 0  # the advice, run as printed
    assert shard.read_bytes() == original[shard]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == original
    assert main(["shards", "verify", str(out)]) == 0


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["splits"].__setitem__("train", 5), "splits.train"),
    (lambda m: m.__setitem__("splits", []), "splits"),
    (lambda m: m.__setitem__("image_size", "big"), "image_size"),
    (lambda m: m["splits"]["val"]["shards"][0].__setitem__("count", "4"), "splits.val.shards[0].count"),
    (lambda m: m["splits"]["val"].pop("shards"), "splits.val.shards"),
    (lambda m: m.__setitem__("image_ext", "gif"), "image_ext"),
])
def test_manifest_with_wrong_types_is_a_one_line_error_everywhere(tmp_path, capsys, edit, field):
    out = tmp_path / "s"
    assert build(out) == 0
    _edit_manifest(out, edit)
    capsys.readouterr()
    for argv in (["shards", "verify", str(out)], ["shards", "info", str(out)],
                 ["train", "--shards", str(out), "--run-dir", str(tmp_path / "run"), "--workers", "0",
                  "--max-steps", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "manifest.json" in err[0] and field in err[0], (argv, err)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.tar", "train/../../outside.tar"])
def test_manifest_shard_paths_are_confined_to_the_shards_folder(tmp_path, capsys, bad):
    out = tmp_path / "s"
    assert build(out) == 0
    (tmp_path / "outside.tar").write_bytes((out / "train" / "shard-000000.tar").read_bytes())
    _edit_manifest(out, lambda m: m["splits"]["train"]["shards"][0].__setitem__("path", bad))
    capsys.readouterr()
    from facevae_dist.data.loader import ShardLoader

    with pytest.raises(Exception) as info:
        ShardLoader(out, "train", batch_size=2)
    assert "DataError" in type(info.value).__name__ and bad in str(info.value) and "inside" in str(info.value)
    assert main(["shards", "verify", str(out)]) == 2
    assert bad in capsys.readouterr().err


def test_manifest_count_lower_than_the_shards_is_refused(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(out) == 0

    def lower(m):
        m["splits"]["train"]["shards"][0]["count"] = 2  # the tar holds 4
        m["splits"]["train"]["count"] -= 2

    _edit_manifest(out, lower)
    from facevae_dist.data.loader import ShardLoader
    from facevae_dist.errors import DataError

    with pytest.raises(DataError, match="shard-000000.tar.*2.*4"):
        ShardLoader(out, "train", batch_size=2)
    capsys.readouterr()
    assert main(["shards", "verify", str(out)]) == 1  # verify lists it among its problems
    assert "4 samples, manifest says 2" in capsys.readouterr().err
