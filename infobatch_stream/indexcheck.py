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
    arrays: dict[str, np.ndarray], lo: int, hi: int, filesize: int, compressed: bool, num_suffixes: int, where: str
) -> None:
    """The rows of one shard (slots ``[lo, hi)``) describe members that fit in the file, in order."""
    mf = np.asarray(arrays["member_first"][lo : hi + 1])
    start, end = np.asarray(arrays["start"][lo:hi]), np.asarray(arrays["end"][lo:hi])
    ko = np.asarray(arrays["key_offsets"][lo : hi + 1])
    problem = None
    if np.any(np.diff(mf) < 1) or mf[0] < 0 or mf[-1] > len(arrays["data_offset"]):
        problem = "its member table is not ascending (a sample without members)"
    elif np.any(np.diff(ko) < 1) or ko[0] < 0 or ko[-1] > len(arrays["keys"]):
        problem = "its key offsets are not ascending (an empty key)"
    elif hi > lo and (start[0] < 0 or np.any(end - start < BLOCK)):
        problem = "a sample is shorter than its header"
    elif np.any(start[1:] < end[:-1]):
        problem = "its samples overlap or are out of order"
    elif np.any(start % BLOCK) or np.any(end % BLOCK):
        problem = "a sample is not 512-byte aligned"
    elif hi > lo and not compressed and filesize and int(end[-1]) > filesize:
        problem = f"its last sample ends at byte {int(end[-1])}, past the shard's {filesize} bytes"
    if problem is None and hi > lo:
        m0, m1 = int(mf[0]), int(mf[-1])
        offset = np.asarray(arrays["data_offset"][m0:m1])
        size = np.asarray(arrays["size"][m0:m1])
        suffix = np.asarray(arrays["suffix_id"][m0:m1])
        owner = np.repeat(np.arange(hi - lo), np.diff(mf))
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if np.any(size < 0) or np.any(offset % BLOCK):
            problem = "a member has a negative size or an unaligned offset"
        elif np.any(offset - BLOCK < start[owner]) or np.any(offset + padded > end[owner]):
            problem = "a member lies outside its sample's bytes"
        elif np.any(offset[1:] < offset[:-1] + padded[:-1]):
            problem = "its members overlap or are out of order"
        elif np.any((offset + padded)[mf[1:] - m0 - 1] != end):
            problem = "a sample does not end where its last member does"
        elif np.any((suffix < 0) | (suffix >= num_suffixes)):
            problem = "a member has an unknown suffix id"
    if problem is not None:
        raise IndexMismatchError(f"index {where}: shard {lo}..{hi} is damaged ({problem}); {_REBUILD}")


def shard_crc(arrays: dict[str, np.ndarray], lo: int, hi: int) -> int:
    """CRC32 of every row describing slots ``[lo, hi)`` (member numbers taken relative to the
    shard, so the value does not depend on the shards before it)."""
    mf = np.asarray(arrays["member_first"][lo : hi + 1], dtype=np.int64)
    m0, m1 = (int(mf[0]), int(mf[-1])) if len(mf) else (0, 0)
    ko = np.asarray(arrays["key_offsets"][lo : hi + 1], dtype=np.int64)
    k0, k1 = (int(ko[0]), int(ko[-1])) if len(ko) else (0, 0)
    crc = 0
    for part in (
        arrays["start"][lo:hi],
        arrays["end"][lo:hi],
        mf - m0,
        arrays["data_offset"][m0:m1],
        arrays["size"][m0:m1],
        arrays["suffix_id"][m0:m1],
        ko - k0,
        arrays["keys"][k0:k1],
    ):
        crc = zlib.crc32(np.ascontiguousarray(part).view(np.uint8).data, crc)
    return crc
