"""The one reader of the project's own JSON/TOML files (fileio.read_json/read_toml/iter_jsonl) and the naming of
nameless write errors: every failure is one FaceVAEError line naming the file and the fix."""

from __future__ import annotations

import errno
import os

import pytest

from facevae_dist.errors import DataError, UsageError
from facevae_dist.fileio import MAX_DOC_DEPTH, iter_jsonl, naming, parse_toml, read_json, read_toml


@pytest.mark.parametrize("content, expected", [
    (b"[" * 100_000, "nested too deeply"),  # the C parser's RecursionError, caught
    (b'{"a": ' * (MAX_DOC_DEPTH + 1) + b"1" + b"}" * (MAX_DOC_DEPTH + 1), "nested too deeply"),  # parses, too deep
    (b'{"loss": "l2\xff"}', "not UTF-8 text (byte 12"),
    (b'{"a": 1,}', "not valid JSON"),
])
def test_read_json_refuses_deep_binary_and_broken_files_in_one_line(tmp_path, content, expected):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        read_json(path, fix="rebuild it")
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and expected in message and message.endswith("rebuild it)")
    assert "\n" not in message


def test_read_json_refuses_an_oversized_file_before_reading_it(tmp_path):
    path = tmp_path / "stats.json"
    with open(path, "wb") as f:  # sparse: 2 GiB that take no disk
        f.truncate(2 << 30)
    with pytest.raises(DataError, match=r"over 64 MiB"):
        read_json(path, fix="rebuild it")


def test_read_json_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        read_json(fifo, fix="re-run eval")  # opening it would wait for a writer forever


def test_read_toml_and_set_values_refuse_deep_nesting(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("x = " + "[" * 50_000)
    with pytest.raises(UsageError, match="nested too deeply"):
        read_toml(path, fix="fix it")
    with pytest.raises(UsageError, match="nested too deeply"):
        parse_toml("v = " + "[" * (MAX_DOC_DEPTH + 1) + "]" * (MAX_DOC_DEPTH + 1), "--set", fix="x")
    path.write_bytes(b'run_dir = "\xfe"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        read_toml(path, fix="fix it")


def test_iter_jsonl_skips_lines_that_do_not_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n' + b"[" * 100_000 + b"\n" + b'{"step": \xff}\n' + b"[1, 2]\n" + b'{"step": 2')
    assert list(iter_jsonl(path)) == [{"step": 1}]


def test_naming_gives_a_nameless_write_error_the_file():
    with pytest.raises(OSError) as exc, naming("runs/x/metrics.jsonl"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == "runs/x/metrics.jsonl"
