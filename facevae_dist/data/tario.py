"""Minimal, deterministic WebDataset-compatible tar IO (write with fixed metadata, read by sample key).

We write tars ourselves rather than with webdataset.TarWriter because its member mtimes are the wall clock, which
would make two builds of the same dataset differ byte for byte. The files are ordinary WebDataset shards
(`<key>.<field>` members, consecutive per sample), readable by `webdataset.WebDataset` too.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from facevae_dist.fileio import naming


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write samples [(key, {field: bytes})] to `path` (caller handles atomic rename). Metadata is fixed
    (mtime 0, uid/gid 0, no user names, mode 0644) so the bytes depend only on the samples."""
    with naming(path), open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
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
    """[(key, {field: (data offset, size)})] in tar order, reading only the 512-byte headers (a plain ustar
    parser, much faster than tarfile, which matters because every worker indexes its shards each epoch)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + 512 <= end:
            f.seek(pos)
            header = f.read(512)
            if header.count(0) == 512:  # end-of-archive marker
                break
            if len(header) < 512:
                raise EOFError(f"truncated tar header at byte {pos}")
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError(f"bad tar header checksum at byte {pos} (not a tar file, or corrupted)")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
            if prefix:
                name = f"{prefix}/{name}"
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            typeflag = header[156:157]
            data = pos + 512
            if data + size > end:
                raise EOFError(f"member {name} truncated ({end - data} of {size} bytes)")
            if typeflag in (b"0", b"\0"):
                key, _, field = name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][field] = (data, size)
            pos = data + (size + 511) // 512 * 512
    return samples


JSON_MEMBER_MAX = 64 << 10  # a sample's metadata is ~100 bytes


class OversizedMember(ValueError):
    """A known member larger than any sample of its shards can be: the sample is corrupt (counted and reported
    like an undecodable one), the shard itself stays readable."""


def member_limits(image_ext: str, image_size: int) -> dict[str, int]:
    """The members a sample of these shards has, each with the most bytes it may take: twice the raw pixels plus
    1 MiB (an incompressible PNG is about its raw size; JPEG at quality 100 is smaller), 64 KiB of JSON. Readers
    read only these members, each only within its limit, so an extra or a swollen member (a 1 GiB blob added to a
    shard) costs nothing but its header."""
    pixels = image_size * image_size
    return {image_ext: 2 * 3 * pixels + (1 << 20), "mask.png": 2 * pixels + (1 << 20), "json": JSON_MEMBER_MAX}


def oversized(fields: dict[str, tuple[int, int]], limits: dict[str, int]) -> list[str]:
    return [f"{name} is {size:,} bytes (limit {limits[name]:,})" for name, (_, size) in fields.items()
            if name in limits and size > limits[name]]


def read_fields(f, fields: dict[str, tuple[int, int]], limits: dict[str, int] | None = None) -> dict[str, bytes]:
    """The members of one sample: those named in `limits` (all with None); others are skipped unread. A member over
    its limit raises OversizedMember before anything is read."""
    if limits is not None:
        too_big = oversized(fields, limits)
        if too_big:
            raise OversizedMember(f"member {'; '.join(too_big)}")
    out = {}
    for name, (offset, size) in fields.items():
        if limits is not None and name not in limits:
            continue
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"member {name} truncated ({len(data)} of {size} bytes)")
        out[name] = data
    return out


def iter_tar(path: Path, limits: dict[str, int] | None = None):
    """Yield (key, {field: bytes}) for every sample, in order (the members and limits of read_fields)."""
    index = index_tar(path)
    with open(path, "rb") as f:
        for key, fields in index:
            yield key, read_fields(f, fields, limits)
