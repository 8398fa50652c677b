"""Check that the bytes cut from a read buffer are the members the index says they are.

The reader cuts samples out of its buffers at the index's offsets without parsing tar headers.
If the shard changed since it was indexed (rewritten at the same size in another order, a
``pipe:`` command that now produces something else) those offsets point at other samples'
bytes. Each member's own 512-byte header sits right in front of its body, inside the range that
was read anyway, so checking it costs no I/O: the header's checksum, its name against the
sample's key and the member's suffix, its size against the member table, and that it is a
regular file. Headers in front of a member (``wds.ShardWriter`` writes a PAX header before every
one) pass only if they are one PAX header of time records (:func:`_plain_pax`).

The check is vectorised over a shard's kept members (:class:`KeptMembers`, built once per shard)
and then over each read buffer (:meth:`KeptMembers.fast_ok`): headers written the usual way
(name in the name field, octal size and checksum in their fixed widths) pass by numpy
comparisons alone, about 0.7 us per member (``benchmarks/verify_cost.py``). Anything else
(long names, PAX paths or sizes, base-256 numbers, signed
checksums of old writers, other spacing, upper-case suffixes) is parsed exactly as indexing
parses it (:func:`exact_ok`), and only a member that fails that too is refused.
"""

from __future__ import annotations

import io

import numpy as np

from .tarscan import BLOCK, belongs_to_sample, iter_members, key_and_suffix

NAME = 100
_FIELDS = np.concatenate((np.arange(124, 136), np.arange(148, 156), [156, 345]))  # size, checksum, type, prefix
_USTAR = np.frombuffer(b"ustar", dtype=np.uint8)  # POSIX and GNU magic alike
_HARMLESS = [np.frombuffer(k, dtype=np.uint8) for k in (b"mtime=", b"atime=", b"ctime=")]
_MAX_RECORDS = 3  # GNU tar --format=posix writes mtime, atime and ctime; wds.ShardWriter mtime alone


def _fixed_octal(columns: np.ndarray, digits: int, tail: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Values of octal fields (``columns``: one row per byte of the field, one column per header)
    written as ``digits`` digits followed by ``tail``, and which headers have that form (the
    others go to the exact parser)."""
    value = np.zeros(columns.shape[1], dtype=np.int64)
    plain = np.ones(columns.shape[1], dtype=bool)
    for row in range(digits):
        d = columns[row] - np.uint8(ord("0"))  # wraps below '0': one test for both bounds
        plain &= d < 8
        value = value * 8 + d
    for i, byte in enumerate(tail):
        plain &= columns[digits + i] == byte
    return value, plain


def _checksum_ok(total: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Headers whose checksum field (``field``: its 8 byte rows) is the usual ``%06o\\0 `` and
    equals the unsigned sum of the header with the field counted as spaces (``total``: the raw sum)."""
    stored, plain = _fixed_octal(field, 6, b"\0 ")
    return plain & (stored == total.astype(np.int64) - field.sum(axis=0, dtype=np.int64) + 8 * ord(" "))


def _header_columns(buf: bytes, positions: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For the 512-byte headers of ``buf`` at ``positions`` (multiples of 512): their byte sums,
    and the bytes of the fields checked, as rows of a ``(k, m)`` array (one contiguous vector
    per byte position, so that each test below is one pass over ``m`` values)."""
    data = np.frombuffer(buf, dtype=np.uint8)
    headers = data[: len(data) // BLOCK * BLOCK].reshape(-1, BLOCK)[positions // BLOCK]
    picked = np.concatenate((np.arange(width), _FIELDS))
    return headers.sum(axis=1, dtype=np.uint32), np.take(headers, picked, axis=1).T.copy()  # take: 5x faster here


def _plain_pax(buf: bytes, entry: np.ndarray, header: np.ndarray) -> np.ndarray:
    """Which extended entries are one valid ``x`` header whose records only set times
    (``NN mtime=...\\n``, up to three of them): such records cannot rename or resize the member,
    so its own header says all. Anything else (long names, ``path``/``size`` records, chains of
    several headers) goes to the exact parser, which applies them as tarfile does."""
    data = np.frombuffer(buf, dtype=np.uint8)
    ok = (header - entry == 2 * BLOCK) & (data[entry + 156] == ord("x"))
    ok &= np.all(data[entry[:, None] + np.arange(257, 262)] == _USTAR, axis=1)
    size, plain = _fixed_octal(data[entry[None, :] + np.arange(124, 136)[:, None]], 11, b"\0")
    ok &= plain & (size > 0) & (size <= BLOCK)  # (its checksum is not needed: every byte that matters is checked)
    at = np.where(ok, entry + BLOCK, 0)  # where the records start
    pos = np.zeros(len(entry), dtype=np.int64)
    done = np.zeros(len(entry), dtype=bool)
    for _ in range(_MAX_RECORDS):
        live = ok & ~done
        if not live.any():
            break
        tens, ones = data[at + pos] - np.uint8(48), data[at + pos + 1] - np.uint8(48)
        length = tens.astype(np.int64) * 10 + ones
        good = (tens < 10) & (ones < 10) & (data[at + pos + 2] == ord(" ")) & (length >= 10)
        good &= pos + length <= size
        key = data[at[:, None] + pos[:, None] + 3 + np.arange(6)]
        good &= np.any([np.all(key == k, axis=1) for k in _HARMLESS], axis=0)
        good &= data[at + np.where(good, pos + length - 1, 0)] == ord("\n")
        ok &= ~live | good
        pos = np.where(live & good, pos + length, pos)
        done |= live & good & (pos == size)
    return ok & done


class KeptMembers:
    """The members of a shard's kept samples as the index describes them, laid out so that one
    read buffer's worth can be compared with the headers in it in a few numpy operations."""

    def __init__(
        self,
        *,
        kept: np.ndarray,
        member_first: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        starts: np.ndarray,
        key_blob: np.ndarray,
        key_offsets: np.ndarray,
        suffix_ids: np.ndarray,
        suffixes: list[str],
    ) -> None:
        """``member_first``, ``key_offsets``: per shard sample, relative to the shard (length
        ``n + 1``); ``offsets``, ``sizes``, ``suffix_ids``: per member of the shard; ``starts``:
        per sample; ``kept``: positions of the kept samples, ascending."""
        counts = member_first[kept + 1] - member_first[kept]
        self.first = np.concatenate(([0], np.cumsum(counts)))  # kept sample i has rows first[i]:first[i+1]
        owner = np.repeat(kept, counts)
        rows = (
            np.arange(int(self.first[-1])) - np.repeat(self.first[:-1], counts) + np.repeat(member_first[kept], counts)
        )
        self.members, self.owners = rows, owner
        self.header = offsets[rows] - BLOCK
        self.size = sizes[rows]
        is_first = rows == member_first[owner]
        prev = np.maximum(rows - 1, 0)
        self.entry = np.where(is_first, starts[owner], offsets[prev] + (sizes[prev] + BLOCK - 1) // BLOCK * BLOCK)
        self.names, self.key_len, self.name_len = _expected_names(
            key_blob, key_offsets, owner, suffix_ids[rows], suffixes
        )

    def rows(self, first: int, stop: int) -> slice:
        """The member rows of kept samples ``[first, stop)``."""
        return slice(int(self.first[first]), int(self.first[stop]))

    def fast_ok(self, buf: bytes, base: int, rows: slice) -> np.ndarray:
        """Which member rows are plainly right in ``buf`` (which holds the shard from byte ``base``)."""
        names, key_len = self.names[:, rows], self.key_len[rows]
        width = names.shape[0]
        total, cols = _header_columns(buf, self.header[rows] - base, width)
        size, plain = _fixed_octal(cols[width : width + 12], 11, b"\0")  # "%011o\0": tarfile, GNU tar
        ok = plain & (size == self.size[rows]) & _checksum_ok(total, cols[width + 12 : width + 20])
        kind = cols[width + 20]
        ok &= (kind == ord("0")) | (kind == 0) | (kind == ord("7"))  # regular files
        ok &= cols[width + 21] == 0  # no ustar prefix: the name field is the whole name
        field = cols[:width]
        same = np.all(field == names, axis=0)
        other = np.flatnonzero(~same)
        if len(other):  # the index lower-cases suffixes: ".JPG" is member "jpg"
            f = field[:, other]
            upper = (f >= ord("A")) & (f <= ord("Z")) & (np.arange(width)[:, None] > key_len[None, other])
            same[other] = np.all(np.where(upper, f + 32, f) == names[:, other], axis=0)
        ok &= same & (self.name_len[rows] < NAME)
        extended = np.flatnonzero(self.entry[rows] != self.header[rows])
        if len(extended):  # headers in front of the member: only harmless PAX records pass here
            ok[extended] &= _plain_pax(buf, self.entry[rows][extended] - base, self.header[rows][extended] - base)
        return ok

    def in_bounds(self, rows: slice, base: int, length: int) -> bool:
        """Whether every header of ``rows`` (and what precedes it) lies inside the buffer."""
        entry, header = self.entry[rows], self.header[rows]
        return bool(
            len(entry) == 0
            or (
                entry.min() >= base
                and np.all(header >= entry)
                and header.max() + BLOCK <= base + length
                and not np.any((header - base) % BLOCK)
                and not np.any((entry - base) % BLOCK)
            )
        )


def _expected_names(
    key_blob: np.ndarray, key_offsets: np.ndarray, owner: np.ndarray, suffix_ids: np.ndarray, suffixes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NUL-terminated ``key.suffix`` names (uint8 ``(W, m)``, ``W`` = longest name + 1 up to 100),
    key lengths and name lengths. A name of 100 bytes or more never matches here."""
    encoded = [s.encode("utf-8", "surrogateescape") for s in suffixes]
    suffix_len = np.array([len(s) for s in encoded] or [0], dtype=np.int64)
    table = np.zeros((max(len(encoded), 1), max(int(suffix_len.max()), 1)), dtype=np.uint8)
    for i, s in enumerate(encoded):
        table[i, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    key_start = key_offsets[owner]
    key_len = key_offsets[owner + 1] - key_start
    name_len = key_len + 1 + suffix_len[suffix_ids]
    width = int(min(name_len.max(initial=0) + 1, NAME))
    lengths = np.diff(key_offsets)
    if len(lengths) and np.all(lengths == lengths[0]) and width == int(name_len.max()) + 1:
        return _names_fixed_keys(key_blob, int(lengths[0]), owner, table, suffix_ids, width), key_len, name_len
    col = np.arange(width)[None, :]
    in_key = col < key_len[:, None]
    names = np.where(
        in_key, key_blob[np.minimum(key_start[:, None] + col, max(len(key_blob) - 1, 0))] if len(key_blob) else 0, 0
    ).astype(np.uint8)
    names[col == key_len[:, None]] = ord(".")
    in_suffix = (col > key_len[:, None]) & (col < name_len[:, None])
    at = np.clip(col - key_len[:, None] - 1, 0, table.shape[1] - 1)
    names = np.where(in_suffix, table[suffix_ids[:, None], at], names).astype(np.uint8)
    return np.ascontiguousarray(names.T), key_len, name_len  # one row per byte position


def exact_member(entry: bytes, where: str):  # -> TarMember | None
    """The member whose body starts right after ``entry`` (its headers: long names, PAX records,
    entries WebDataset skips), resolved exactly as indexing resolves it; None if there is none."""
    for member in iter_members(io.BytesIO(entry), where, filesize=len(entry) + (1 << 62)):
        if member.data_offset == len(entry):
            return member
        if member.data_offset > len(entry):
            return None
    return None


def exact_ok(entry: bytes, key: str, suffix: str, size: int, where: str) -> bool:
    """Whether ``entry`` ends in the header of a sample member ``key.suffix`` of ``size`` bytes."""
    try:
        member = exact_member(entry, where)
    except ValueError:  # not a tar header at all (TarFormatError)
        return False
    if member is None or member.size != size or not belongs_to_sample(member):
        return False
    k, s = key_and_suffix(member.name)
    return k == key and s is not None and s.lower() == suffix


def _names_fixed_keys(
    key_blob: np.ndarray, k: int, owner: np.ndarray, table: np.ndarray, suffix_ids: np.ndarray, width: int
) -> np.ndarray:
    """:func:`_expected_names` when every key of the shard has ``k`` bytes (numbered keys, the
    usual case): the key bytes are a ``(n, k)`` view of the blob, so two gathers build the names."""
    names = np.zeros((width, len(owner)), dtype=np.uint8)
    names[:k] = np.take(key_blob.reshape(-1, k), owner, axis=0).T
    names[k] = ord(".")
    suffix = np.take(table, suffix_ids, axis=0).T
    names[k + 1 : k + 1 + len(suffix)] = suffix[: width - k - 1]
    return names
