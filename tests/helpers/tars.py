"""Write real tar shards for the tests and read them back the reference ways.

Writers: ``webdataset.ShardWriter``/``TarWriter``, Python's ``tarfile`` (GNU, PAX, USTAR) and
GNU ``tar`` on a directory tree, and random layouts drawn by hypothesis. Readers: ``tarfile``
(member offsets) and ``webdataset.tarfile_to_samples`` (sample grouping), the two references the
scanner must match, and the scanner's own member list (``members_of``).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence

import webdataset as wds
from hypothesis import strategies as st
from webdataset.tariterators import group_by_keys, tar_file_expander

from infobatch_stream.tarscan import TarMember, iter_members

# An entry of ``write_tar``: (name, bytes) for a regular file, (name, None) for a directory.
Entry = tuple[str, "bytes | None"]

HAVE_GNU_TAR = (
    shutil.which("tar") is not None
    and "GNU tar" in subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
)


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, non-constant bytes (a wrong offset shows as wrong bytes)."""
    return bytes((i * 131 + seed * 7 + (i >> 8)) % 251 for i in range(n))


def _add_entries(tf: tarfile.TarFile, entries: Sequence[Entry], mtime: float, modes: bool) -> None:
    """Add ``entries`` in order; ``modes``: directories 0o755 and files 0o644 (else tarfile's default)."""
    for name, data in entries:
        info = tarfile.TarInfo(name)
        info.mtime = mtime
        if data is None:
            info.type = tarfile.DIRTYPE
            if modes:
                info.mode = 0o755
            tf.addfile(info)
        else:
            info.size = len(data)
            if modes:
                info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))


def write_tar(
    path: str | os.PathLike, entries: Sequence[Entry], format: int = tarfile.GNU_FORMAT, mtime: float = 1_700_000_000
) -> str:
    """Write ``entries`` in order with ``tarfile`` in the given format; return the path."""
    path = os.fspath(path)
    with tarfile.open(path, "w", format=format) as tf:
        _add_entries(tf, entries, mtime, modes=True)
    return path


def write_tar_bytes(entries: Sequence[Entry], format: int = tarfile.GNU_FORMAT) -> bytes:
    """The tar of ``entries`` in memory (tarfile's default modes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        _add_entries(tf, entries, 1_700_000_000, modes=False)
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


def wds_samples_of_bytes(raw: bytes) -> list[dict]:
    """``tarfile_to_samples`` minus the URL opener: WebDataset's grouping of an in-memory tar."""
    return list(group_by_keys(tar_file_expander([{"url": "mem.tar", "stream": io.BytesIO(raw)}])))


def sample_fields(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def tar_members(path: str | os.PathLike) -> list[tarfile.TarInfo]:
    with tarfile.open(os.fspath(path), "r:") as tf:
        return tf.getmembers()


def members_of(raw: bytes, name: str = "mem.tar") -> list[TarMember]:
    """What the scanner under test (``iter_members``) reports of an in-memory tar."""
    return list(iter_members(io.BytesIO(raw), name, filesize=len(raw)))


# ---- random layouts (hypothesis) ---------------------------------------------------------------

COMPONENTS = ["d", "sub", "x.y", "L" * 101, "m" * 60]
STEMS = ["a", "b", "A", "k" * 120, "__m__", "s.t"]
SUFFIXES = ["jpg", "JPG", "cls", "tar.gz", "", "Json"]


@st.composite
def layouts(draw):
    """Entries (directories, GNU long names, PAX paths, odd suffixes, sizes around the 512-byte
    block) and a ``tarfile`` format."""
    n = draw(st.integers(0, 10))
    entries = []
    for _ in range(n):
        dirs = draw(st.lists(st.sampled_from(COMPONENTS), max_size=2))
        if draw(st.integers(0, 9)) == 0:
            entries.append(("/".join(dirs + ["dd"]), None))
            continue
        stem = draw(st.sampled_from(STEMS))
        suffix = draw(st.sampled_from(SUFFIXES))
        name = "/".join(dirs + [stem + ("." + suffix if suffix else "")])
        size = draw(st.one_of(st.integers(0, 2000), st.sampled_from([0, 511, 512, 513, 1024])))
        entries.append((name, payload(size, len(entries))))
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    return entries, fmt


def build_layout(entries, fmt) -> bytes:
    """A layout's tar bytes (PAX where a name is too long for the drawn format)."""
    try:
        return write_tar_bytes(entries, fmt)
    except ValueError:  # a name too long for ustar
        return write_tar_bytes(entries, tarfile.PAX_FORMAT)
