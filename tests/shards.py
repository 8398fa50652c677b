"""Write real tar shards for the tests and read them back the reference ways.

Writers: ``webdataset.ShardWriter``/``TarWriter``, Python's ``tarfile`` (GNU, PAX, USTAR) and
GNU ``tar`` on a directory tree. Readers: ``tarfile`` (member offsets) and
``webdataset.tarfile_to_samples`` (sample grouping), the two references the scanner must match.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence

import webdataset as wds

# An entry of ``write_tar``: (name, bytes) for a regular file, (name, None) for a directory.
Entry = tuple[str, "bytes | None"]

HAVE_GNU_TAR = (
    shutil.which("tar") is not None
    and "GNU tar" in subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
)


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, non-constant bytes (a wrong offset shows as wrong bytes)."""
    return bytes((i * 131 + seed * 7 + (i >> 8)) % 251 for i in range(n))


def write_tar(
    path: str | os.PathLike, entries: Sequence[Entry], format: int = tarfile.GNU_FORMAT, mtime: float = 1_700_000_000
) -> str:
    """Write ``entries`` in order with ``tarfile`` in the given format; return the path."""
    path = os.fspath(path)
    with tarfile.open(path, "w", format=format) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
    return path


def write_tar_bytes(entries: Sequence[Entry], format: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_wds_shards(
    directory: str | os.PathLike, samples: Iterable[dict], maxcount: int, name: str = "shard"
) -> list[str]:
    """Write samples with ``webdataset.ShardWriter`` (its default float mtime gives PAX headers)."""
    pattern = os.path.join(os.fspath(directory), f"{name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    out = []
    i = 0
    while os.path.exists(pattern % i):
        out.append(pattern % i)
        i += 1
    return out


def make_tree(root: str | os.PathLike, files: dict[str, bytes]) -> str:
    """Create files (and their parent directories) under ``root``."""
    root = os.fspath(root)
    for rel, data in files.items():
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    return root


def gnu_tar(root: str | os.PathLike, out: str | os.PathLike, fmt: str, members: Sequence[str] = (".",)) -> str:
    """Archive ``members`` of ``root`` with GNU tar in format ``fmt`` (gnu, posix/pax, ustar, v7)."""
    out = os.fspath(out)
    subprocess.run(
        [
            "tar",
            f"--format={fmt}",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@1700000000",
            "-C",
            os.fspath(root),
            "-cf",
            out,
            *members,
        ],
        check=True,
        capture_output=True,
    )
    return out


def wds_samples(url: str) -> list[dict]:
    """The samples WebDataset's own ``tarfile_to_samples`` makes of one shard."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
    return list(pipeline)


def sample_fields(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def tar_members(path: str | os.PathLike) -> list[tarfile.TarInfo]:
    with tarfile.open(os.fspath(path), "r:") as tf:
        return tf.getmembers()
