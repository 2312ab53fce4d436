"""Atomic writes, hashing, and the one reader of the JSON/TOML files the project writes and reads back.

Every file we write appears whole or not at all. Every JSON/TOML file we read back (manifests, stats, build.json,
the cache's JSON, checkpoint meta, eval metrics, export.json, configs) goes through read_json/read_toml: a regular
file (a FIFO would block the read forever), at most MAX_DOC_BYTES, UTF-8, nested at most MAX_DOC_DEPTH deep (the
parsers recurse once per level: a file of 100,000 '[' would be a RecursionError), else one line naming the file and
the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from facevae_dist.errors import DataError, FaceVAEError, UsageError

MAX_DOC_BYTES = 64 << 20  # far above any file we write (a manifest of 200,000 samples is well under 1 MB)
MAX_DOC_DEPTH = 32  # ours nest at most 5 deep


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it,
    which races with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def flock_holder(fd: int) -> int | None:
    """The pid holding a flock on this open file or folder, from /proc/locks (None where it cannot be told)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and ident in fields and "->" not in fields:  # "->": a waiter
                    return int(fields[fields.index(ident) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def naming(path: str | os.PathLike):
    """An OSError inside that names no file gets `path` as its file: a full disk fails in write() or close(), whose
    errors name nothing, and the user must be told which file (errors.from_os_error prints it)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`. The file gets the mode a plain
    open() would give (0o666 minus the umask): mkstemp creates 0600, which would hide shared datasets and models."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and (
                exc.filename is None or Path(os.fsdecode(exc.filename)).name.startswith(f".{path.name}.")):
            # name the file being written, not the hidden temp name (a full disk fails in the write, nameless)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- reading our own JSON/TOML back ---------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, *, fix: str, error: type[FaceVAEError] = DataError,
              max_bytes: int = MAX_DOC_BYTES) -> Any:
    """The JSON document in `path`, or `error` "<path>: <problem> (<fix>)". A missing file is FileNotFoundError
    (callers say what to run to make it)."""
    return parse_json(read_doc_text(path, fix=fix, error=error, max_bytes=max_bytes), path, fix=fix, error=error)


def read_toml(path: str | os.PathLike, *, fix: str, error: type[FaceVAEError] = UsageError,
              max_bytes: int = MAX_DOC_BYTES) -> dict:
    return parse_toml(read_doc_text(path, fix=fix, error=error, max_bytes=max_bytes), path, fix=fix, error=error)


def read_doc_text(path: str | os.PathLike, *, fix: str, error: type[FaceVAEError] = DataError,
                  max_bytes: int = MAX_DOC_BYTES) -> str:
    """A small UTF-8 text file, checked to be a regular file within `max_bytes` before it is read whole."""
    path = Path(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file ({fix})")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: over {max_bytes >> 20} MiB, far larger than any such file ({fix})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}; {fix})") from None


def parse_json(text: str | bytes, where: str | os.PathLike, *, fix: str, error: type[FaceVAEError] = DataError,
               max_depth: int = MAX_DOC_DEPTH) -> Any:
    """json.loads with the failures as one line naming `where` (a file, or a member of one)."""
    return _parse(json.loads, text, "JSON", json.JSONDecodeError, where, fix, error, max_depth)


def parse_toml(text: str, where: str | os.PathLike, *, fix: str, error: type[FaceVAEError] = UsageError,
               max_depth: int = MAX_DOC_DEPTH) -> dict:
    return _parse(tomllib.loads, text, "TOML", tomllib.TOMLDecodeError, where, fix, error, max_depth)


def _parse(loads, text: str | bytes, kind: str, syntax_error: type[Exception], where, fix: str,
           error: type[FaceVAEError], max_depth: int) -> Any:
    try:
        doc = loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start}; {fix})") from None
    except syntax_error as exc:
        raise error(f"{where}: not valid {kind} ({exc}; {fix})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply (over {max_depth} levels; {fix})") from None
    _check_depth(doc, where, fix, error, max_depth)
    return doc


def _check_depth(doc: Any, where, fix: str, error: type[FaceVAEError], max_depth: int) -> None:
    """Iteratively (a recursive walk would fail where the parser did not): code that walks a document recursively
    later (config dicts, DeepSpeed's JSON) then cannot hit the interpreter's recursion limit either."""
    stack = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth + 1 > max_depth:
                raise error(f"{where}: nested too deeply (over {max_depth} levels; {fix})")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def iter_jsonl(path: str | os.PathLike):
    """The JSON objects of a JSON-lines file we append to (metrics.jsonl), in order. Lines that do not read as one
    (cut by a kill, not UTF-8, nested too deep, not an object) are skipped: the next checkpoint's truncation or the
    next line repairs the file, and no reader should stop on one damaged line."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = parse_json(raw, path, fix="skipped")
            except FaceVAEError:
                continue
            if isinstance(record, dict):
                yield record
