"""Checks that an index's arrays describe real tar members: damaged arrays are refused, not read.

An index is trusted to say where bytes are; a member offset that is off, a key overwritten, or
per-shard counts that still sum right would make the reader cut wrong bytes. Two layers:

- when an index is opened, what costs nothing: every array is 1-D with its expected dtype and
  its length agrees with the shard list (:func:`check_layout`);
- the first time a process uses a shard, that shard's rows (vectorised, a few hundred
  microseconds): offsets ascending and 512-aligned, every member inside its sample, every sample
  inside the file, suffix ids and key offsets in range (:func:`check_shard`), and the CRC32 of
  those rows against the one recorded when the index was built (:func:`shard_crc`). The CRC
  also catches an index rebuilt at the same path while a run is going: a spawned loader worker
  reopens the arrays by path, but compares them with the shard list the training process loaded.
"""

from __future__ import annotations

import zlib

import numpy as np

from .errors import IndexMismatchError
from .rows import ShardRows

BLOCK = 512
DTYPES = {
    "start": "i8",
    "end": "i8",
    "member_first": "i8",
    "data_offset": "i8",
    "size": "i8",
    "suffix_id": "i4",
    "key_offsets": "i8",
    "keys": "u1",
}
_REBUILD = "rebuild it with `infobatch-stream index`"


def check_layout(arrays: dict[str, np.ndarray], num_samples: int, where: str) -> None:
    """Shapes and dtypes of the per-sample arrays against the shard list's sample count."""
    for name, kind in DTYPES.items():
        arr = arrays[name]
        if arr.ndim != 1 or arr.dtype.kind + str(arr.dtype.itemsize) != kind:  # any byte order
            raise IndexMismatchError(
                f"index {where}: array {name!r} is {arr.dtype} of shape {arr.shape}, expected "
                f"1-D {np.dtype(kind)}; the index is damaged: {_REBUILD}"
            )
    lengths = {
        "start": num_samples,
        "end": num_samples,
        "member_first": num_samples + 1,
        "key_offsets": num_samples + 1,
    }
    for name, length in lengths.items():
        if len(arrays[name]) != length:
            raise IndexMismatchError(
                f"index {where}: the shard list counts {num_samples} samples but array {name!r} "
                f"holds {len(arrays[name])} values (expected {length}); the index is damaged: "
                f"{_REBUILD}"
            )
    members = int(arrays["member_first"][-1])
    for name in ("data_offset", "size", "suffix_id"):
        if len(arrays[name]) != members:
            raise IndexMismatchError(
                f"index {where}: array {name!r} holds {len(arrays[name])} members, the sample "
                f"table {members}; the index is damaged: {_REBUILD}"
            )
    if int(arrays["key_offsets"][0]) != 0 or int(arrays["key_offsets"][-1]) != len(arrays["keys"]):
        raise IndexMismatchError(
            f"index {where}: the key offsets do not span the key bytes; the index is damaged: {_REBUILD}"
        )


def check_shard(
    rows: ShardRows, lo: int, hi: int, filesize: int, compressed: bool, num_suffixes: int, where: str
) -> None:
    """The rows of one shard (slots ``[lo, hi)``, cut by :func:`rows.cut_rows`, which checked the
    member and key tables' bounds) describe members that fit in the file, in order."""
    mf, start, end = rows.member_first, rows.start, rows.end
    problem = None
    if hi > lo and (start[0] < 0 or np.any(end - start < BLOCK)):
        problem = "a sample is shorter than its header"
    elif np.any(start[1:] < end[:-1]):
        problem = "its samples overlap or are out of order"
    elif np.any(start % BLOCK) or np.any(end % BLOCK):
        problem = "a sample is not 512-byte aligned"
    elif hi > lo and not compressed and filesize and int(end[-1]) > filesize:
        problem = f"its last sample ends at byte {int(end[-1])}, past the shard's {filesize} bytes"
    if problem is None and hi > lo:
        offset, size, suffix = rows.data_offset, rows.size, rows.suffix_id
        owner = np.repeat(np.arange(hi - lo), np.diff(mf))
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if np.any(size < 0) or np.any(offset % BLOCK):
            problem = "a member has a negative size or an unaligned offset"
        elif np.any(offset - BLOCK < start[owner]) or np.any(offset + padded > end[owner]):
            problem = "a member lies outside its sample's bytes"
        elif np.any(offset[1:] < offset[:-1] + padded[:-1]):
            problem = "its members overlap or are out of order"
        elif np.any((offset + padded)[mf[1:] - 1] != end):
            problem = "a sample does not end where its last member does"
        elif np.any((suffix < 0) | (suffix >= num_suffixes)):
            problem = "a member has an unknown suffix id"
    if problem is not None:
        raise IndexMismatchError(f"index {where}: shard {lo}..{hi} is damaged ({problem}); {_REBUILD}")


def shard_crc(rows: ShardRows) -> int:
    """CRC32 of every row of one shard (member and key numbers relative to the shard, so the
    value does not depend on the shards before it)."""
    crc = 0
    for part in (
        rows.start,
        rows.end,
        rows.member_first,
        rows.data_offset,
        rows.size,
        rows.suffix_id,
        rows.key_offsets,
        rows.key_blob,
    ):
        crc = zlib.crc32(np.ascontiguousarray(part).view(np.uint8).data, crc)
    return crc
