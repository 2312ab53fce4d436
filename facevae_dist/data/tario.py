"""Minimal, deterministic WebDataset-compatible tar IO (write with fixed metadata, read by sample key).

We write tars ourselves rather than with webdataset.TarWriter because its member mtimes are the wall clock, which
would make two builds of the same dataset differ byte for byte. The files are ordinary WebDataset shards
(`<key>.<field>` members, consecutive per sample), readable by `webdataset.WebDataset` too.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write samples [(key, {field: bytes})] to `path` (caller handles atomic rename). Metadata is fixed
    (mtime 0, uid/gid 0, no user names, mode 0644) so the bytes depend only on the samples."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, fields in samples:
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot (WebDataset splits keys at the first dot)")
            for name in sorted(fields):
                data = fields[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))


def index_tar(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {field: (data offset, size)})] in tar order, reading only the headers."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, field = member.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][field] = (member.offset_data, member.size)
    return samples


def read_fields(f, fields: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    out = {}
    for name, (offset, size) in fields.items():
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"member {name} truncated ({len(data)} of {size} bytes)")
        out[name] = data
    return out


def iter_tar(path: Path):
    """Yield (key, {field: bytes}) for every sample, in order."""
    index = index_tar(path)
    with open(path, "rb") as f:
        for key, fields in index:
            yield key, read_fields(f, fields)
