"""One shard's rows of the index, in the one shape every reader of them uses.

The reader, the header check, the index checks and ``keys()`` all work a shard at a time, on
offsets and counts relative to that shard. :class:`ShardRows` is that shape; the index's on-disk
format decides only how a shard's rows are cut (and, for a compact format, decoded) from the
files, so formats can change without touching their readers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import IndexMismatchError


@dataclass(frozen=True)
class ShardRows:
    """Per sample ``n``: ``start``, ``end`` (bytes in the shard, header and padding included);
    ``member_first`` and ``key_offsets`` (length ``n + 1``, from 0): which members and key bytes
    are the sample's. Per member: ``data_offset`` (in the shard), ``size``, ``suffix_id``."""

    start: np.ndarray
    end: np.ndarray
    member_first: np.ndarray
    data_offset: np.ndarray
    size: np.ndarray
    suffix_id: np.ndarray
    key_offsets: np.ndarray
    key_blob: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def keys(self) -> list[str]:
        """The keys, decoded as indexing encoded them (UTF-8, surrogate escapes)."""
        blob, rel = self.key_blob.tobytes(), self.key_offsets.tolist()
        return [blob[a:b].decode("utf-8", "surrogateescape") for a, b in zip(rel[:-1], rel[1:])]


def cut_rows(arrays: dict[str, np.ndarray], lo: int, hi: int, where: str) -> ShardRows:
    """The rows of slots ``[lo, hi)`` from the concatenated arrays of a version-1 index (absolute
    member and key numbers), bounds-checked so that a damaged table cannot slice short."""
    mf = np.asarray(arrays["member_first"][lo : hi + 1], dtype=np.int64)
    ko = np.asarray(arrays["key_offsets"][lo : hi + 1], dtype=np.int64)
    members, key_bytes = len(arrays["data_offset"]), len(arrays["keys"])
    if len(mf) != hi - lo + 1 or mf[0] < 0 or mf[-1] > members or np.any(np.diff(mf) < 1):
        _damaged(where, lo, hi, "its member table is not ascending (a sample without members)")
    if len(ko) != hi - lo + 1 or ko[0] < 0 or ko[-1] > key_bytes or np.any(np.diff(ko) < 1):
        _damaged(where, lo, hi, "its key offsets are not ascending (an empty key)")
    m0, m1, k0, k1 = int(mf[0]), int(mf[-1]), int(ko[0]), int(ko[-1])
    return ShardRows(
        start=np.asarray(arrays["start"][lo:hi]),
        end=np.asarray(arrays["end"][lo:hi]),
        member_first=mf - m0,
        data_offset=np.asarray(arrays["data_offset"][m0:m1]),
        size=np.asarray(arrays["size"][m0:m1]),
        suffix_id=np.asarray(arrays["suffix_id"][m0:m1]),
        key_offsets=ko - k0,
        key_blob=np.asarray(arrays["keys"][k0:k1]),
    )


def _damaged(where: str, lo: int, hi: int, problem: str) -> None:
    raise IndexMismatchError(
        f"index {where}: shard {lo}..{hi} is damaged ({problem}); rebuild it with `infobatch-stream index`"
    )
