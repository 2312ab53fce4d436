"""Issue 9 data-path hardening, one test per class of problem: written files follow the umask, --overwrite removes
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

SMALL = ["--image-size", "16", "--shard-size", "4", "--n", "12"]


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
