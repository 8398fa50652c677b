"""The compact on-disk index (format 2): about 30 bytes per three-member sample instead of 104.

Format 1 stores every offset as int64 and every key in full. Tar shards are far below 2 TiB,
samples below 32 MiB, members below 4 GiB, and a shard's keys usually share a prefix and count
up, so format 2 stores, each array in the narrowest unsigned type its values need (a wider one
only where the data needs it):

- per sample: ``start_block`` (its offset in the shard, in 512-byte blocks), ``nmembers``, and
  ``key_word`` (see keys below);
- per member: ``rel_block`` (its data offset from its sample's start, in blocks), ``size``
  (bytes), ``suffix_id``; a sample's end is where its last member's padded data ends (the index
  checks already require it);
- per shard: ``shard_member_first`` (its first member), and its keys: ``key_mode`` 1 (numeric:
  ``prefix + zero-padded number``, fixed length: ``key_word`` is the number minus ``key_base``,
  ``key_width`` digits, the prefix in ``keys``) or 0 (the keys' bytes in ``keys``, ``key_word``
  the end of each key within its shard's bytes); ``shard_key_bytes`` bounds each shard's bytes.

:func:`decode` turns one shard back into :class:`~infobatch_stream.rows.ShardRows` with the
dtypes of format 1, so the per-shard CRC recorded at indexing is the same in both formats and
checks the decoding too. Everything here is numpy over a shard or over the whole index.
"""

from __future__ import annotations

import numpy as np

from .errors import IndexMismatchError
from .rows import ShardRows, cut_rows

BLOCK = 512
NUMERIC, BYTES = 1, 0
MAX_WIDTH = 18  # digits that fit an int64
CHUNK = 1 << 22  # samples per piece when encoding
MAX_PREFIX = 256  # a numeric shard's key prefix: bounds what decoding a damaged one allocates
ARRAYS = (
    "start_block",
    "nmembers",
    "key_word",
    "rel_block",
    "size",
    "suffix_id",
    "shard_member_first",
    "key_mode",
    "key_width",
    "key_base",
    "shard_key_bytes",
    "keys",
)
_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)
_REBUILD = "rebuild it with `infobatch-stream index`"


def narrow(values: np.ndarray, smallest: type = np.uint8) -> np.ndarray:
    """``values`` (non-negative integers) in the narrowest unsigned dtype from ``smallest`` up."""
    top = int(values.max()) if len(values) else 0
    for dtype in _UNSIGNED[_UNSIGNED.index(smallest) :]:
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    raise ValueError(f"value {top} does not fit 64 bits")


def _numeric_keys(blob: np.ndarray, lengths: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """``(prefix length, width, numbers)`` when the shard's keys (``blob``, concatenated; their
    byte ``lengths``) all have one length and are one prefix followed by digits; else None."""
    n = len(lengths)
    if n == 0 or np.any(lengths != lengths[0]):
        return None
    length = int(lengths[0])
    table = blob.reshape(n, length)
    same = np.all(table == table[0], axis=0)
    prefix = int(np.argmin(same)) if not same.all() else length  # first column that differs
    digits = table[:, prefix:]
    if not (0 < digits.shape[1] <= MAX_WIDTH) or np.any((digits < 48) | (digits > 57)):
        # (a prefix that ends inside the number's digits leaves those in the prefix: still exact)
        return None
    numbers = np.zeros(n, dtype=np.int64)
    for column in range(digits.shape[1]):
        numbers = numbers * 10 + (digits[:, column] - 48)
    return prefix, digits.shape[1], numbers


def encode(arrays: dict[str, np.ndarray], shard_first: np.ndarray) -> dict[str, np.ndarray]:
    """Format-1 arrays (absolute, int64) as format-2 arrays (see the module docstring)."""
    start, member_first = np.asarray(arrays["start"], dtype=np.int64), np.asarray(arrays["member_first"])
    counts = np.diff(member_first)
    data_offset = np.asarray(arrays["data_offset"])
    rel_block = np.empty(len(data_offset), dtype=np.int64)
    for lo in range(0, len(start), CHUNK):  # member-sized temporaries a piece at a time (10^8 samples)
        hi = min(lo + CHUNK, len(start))
        m0, m1 = int(member_first[lo]), int(member_first[hi])
        rel = np.asarray(data_offset[m0:m1], dtype=np.int64) - np.repeat(start[lo:hi], counts[lo:hi])
        if np.any(start[lo:hi] % BLOCK) or np.any(rel % BLOCK):
            raise ValueError("index offsets must be 512-byte aligned (tar blocks) to be stored compactly")
        rel_block[m0:m1] = rel // BLOCK
    key_offsets, keys = np.asarray(arrays["key_offsets"], dtype=np.int64), np.asarray(arrays["keys"])
    num_shards = len(shard_first) - 1
    modes = np.zeros(num_shards, dtype=np.uint8)
    widths = np.zeros(num_shards, dtype=np.uint8)
    bases = np.zeros(num_shards, dtype=np.int64)
    key_word = np.zeros(len(start), dtype=np.int64)
    parts, bounds = [], [0]
    for shard in range(num_shards):
        lo, hi = int(shard_first[shard]), int(shard_first[shard + 1])
        k0, k1 = int(key_offsets[lo]), int(key_offsets[hi])
        blob = keys[k0:k1]
        numeric = _numeric_keys(blob, np.diff(key_offsets[lo : hi + 1]))
        if numeric is not None and numeric[0] <= MAX_PREFIX and int(numeric[2].max() - numeric[2].min()) < 2**32:
            prefix, width, numbers = numeric
            modes[shard], widths[shard], bases[shard] = NUMERIC, width, int(numbers.min())
            key_word[lo:hi] = numbers - bases[shard]
            parts.append(blob[:prefix])
        else:
            key_word[lo:hi] = key_offsets[lo + 1 : hi + 1] - k0
            parts.append(blob)
        bounds.append(bounds[-1] + len(parts[-1]))
    return {
        "start_block": narrow(start // BLOCK, np.uint32),
        "nmembers": narrow(counts),
        "key_word": narrow(key_word, np.uint32),
        "rel_block": narrow(rel_block, np.uint16),
        "size": narrow(np.asarray(arrays["size"], dtype=np.int64), np.uint32),
        "suffix_id": narrow(np.asarray(arrays["suffix_id"], dtype=np.int64)),
        "shard_member_first": member_first[np.asarray(shard_first)].astype(np.int64),
        "key_mode": modes,
        "key_width": widths,
        "key_base": bases,
        "shard_key_bytes": np.asarray(bounds, dtype=np.int64),
        "keys": np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8),
    }


def check_layout(arrays: dict[str, np.ndarray], num_samples: int, num_shards: int, where: str) -> None:
    """What costs nothing when a format-2 index opens: 1-D unsigned arrays (signed where stated)
    whose lengths agree with the shard list and with each other."""
    signed = {"shard_member_first", "key_base", "shard_key_bytes"}
    for name in ARRAYS:
        arr = arrays[name]
        want = "i" if name in signed else "u"
        size_ok = arr.dtype.itemsize == 8 if name in signed else (arr.dtype.itemsize == 1 if name == "keys" else True)
        if arr.ndim != 1 or arr.dtype.kind != want or not size_ok:
            _damaged(where, f"array {name!r} is {arr.dtype} of shape {arr.shape}")
    lengths = {
        "start_block": num_samples,
        "nmembers": num_samples,
        "key_word": num_samples,
        "shard_member_first": num_shards + 1,
        "key_mode": num_shards,
        "key_width": num_shards,
        "key_base": num_shards,
        "shard_key_bytes": num_shards + 1,
    }
    for name, length in lengths.items():
        if len(arrays[name]) != length:
            _damaged(where, f"array {name!r} holds {len(arrays[name])} values, expected {length}")
    members = len(arrays["rel_block"])
    if len(arrays["size"]) != members or len(arrays["suffix_id"]) != members:
        _damaged(where, "the member arrays differ in length")
    for name, total in (("shard_member_first", members), ("shard_key_bytes", len(arrays["keys"]))):
        bounds = arrays[name]
        if int(bounds[0]) != 0 or int(bounds[-1]) != total or np.any(np.diff(bounds) < 0):
            _damaged(where, f"{name!r} does not span its table in order")


def decode(arrays: dict[str, np.ndarray], shard: int, lo: int, hi: int, where: str) -> ShardRows:
    """One shard's rows from format-2 arrays, in format 1's dtypes (bounds-checked: a damaged
    table raises instead of slicing short)."""
    n = hi - lo
    m0, m1 = int(arrays["shard_member_first"][shard]), int(arrays["shard_member_first"][shard + 1])
    counts = np.asarray(arrays["nmembers"][lo:hi], dtype=np.int64)
    # (each count bounded first: huge ones could wrap their sum onto the right total)
    if np.any(counts < 1) or np.any(counts > m1 - m0) or int(counts.sum()) != m1 - m0:
        _damaged(where, "its member table is not ascending (a sample without members)", lo, hi)
    member_first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=member_first[1:])
    start = np.asarray(arrays["start_block"][lo:hi], dtype=np.int64) * BLOCK
    owner = np.repeat(np.arange(n), counts)
    data_offset = start[owner] + np.asarray(arrays["rel_block"][m0:m1], dtype=np.int64) * BLOCK
    size = np.asarray(arrays["size"][m0:m1], dtype=np.int64)
    last = member_first[1:] - 1
    end = data_offset[last] + (size[last] + BLOCK - 1) // BLOCK * BLOCK
    key_offsets, key_blob = _keys(arrays, shard, lo, hi, where)
    return ShardRows(
        start=start,
        end=end,
        member_first=member_first,
        data_offset=data_offset,
        size=size,
        suffix_id=np.asarray(arrays["suffix_id"][m0:m1], dtype=np.int32),
        key_offsets=key_offsets,
        key_blob=key_blob,
    )


def _keys(arrays: dict[str, np.ndarray], shard: int, lo: int, hi: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The shard's key offsets (from 0) and key bytes, as format 1 stores them."""
    n = hi - lo
    b0, b1 = int(arrays["shard_key_bytes"][shard]), int(arrays["shard_key_bytes"][shard + 1])
    stored = np.asarray(arrays["keys"][b0:b1])
    word = np.asarray(arrays["key_word"][lo:hi], dtype=np.int64)
    mode = int(arrays["key_mode"][shard])
    if mode not in (BYTES, NUMERIC) or (mode == NUMERIC and len(stored) > MAX_PREFIX):
        _damaged(where, f"its keys are stored in an unknown way (mode {mode}, {len(stored)} prefix bytes)", lo, hi)
    if mode == BYTES:
        key_offsets = np.concatenate(([0], word)).astype(np.int64)
        if n and (np.any(np.diff(key_offsets) < 1) or int(key_offsets[-1]) != len(stored)):
            _damaged(where, "its key offsets are not ascending (an empty key)", lo, hi)
        return key_offsets, stored
    width = int(arrays["key_width"][shard])
    if not 0 < width <= MAX_WIDTH:
        _damaged(where, f"its keys have {width} digits", lo, hi)
    numbers = word + int(arrays["key_base"][shard])
    if n and (int(numbers.max()) >= 10**width or int(numbers.min()) < 0):
        _damaged(where, f"a key number does not fit its {width} digits", lo, hi)
    digits = np.empty((n, width), dtype=np.uint8)
    rest = numbers.copy()
    for column in range(width - 1, -1, -1):
        digits[:, column] = rest % 10 + 48
        rest //= 10
    length = len(stored) + width
    table = np.empty((n, length), dtype=np.uint8)
    table[:, : len(stored)] = stored
    table[:, len(stored) :] = digits
    return np.arange(n + 1, dtype=np.int64) * length, table.reshape(-1)


def rows_of(arrays: dict[str, np.ndarray], shard: int, lo: int, hi: int, where: str) -> ShardRows:
    """One shard's rows from either format's arrays."""
    if "start_block" in arrays:
        return decode(arrays, shard, lo, hi, where)
    return cut_rows(arrays, lo, hi, where)


def _damaged(where: str, problem: str, lo: int | None = None, hi: int | None = None) -> None:
    what = f"shard {lo}..{hi} is damaged" if lo is not None else "the index is damaged"
    raise IndexMismatchError(f"index {where}: {what} ({problem}); {_REBUILD}")
