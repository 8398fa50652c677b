"""Saving InfoBatch state to one file, atomically, without pickle, with checksums.

Layout: an 8-byte magic (``IBSTATE2``), the length of a JSON header (8 bytes), the CRC-32 of
that length and the header (4 bytes), the header (plain values, and for each array its dtype,
shape, offset and CRC-32), then the arrays' raw bytes, each 64-byte aligned. Loading checks every
length and offset against the file's size before reading anything, verifies the checksums (one
chunked read of the file, at the disk's or the page cache's speed) and maps the arrays (a
100M-sample store is 400 MB: never unpickled). Files of the previous version (``IBSTATE1``, the
same layout without checksums) still load, unverified. Saving writes a temporary file next to the
target, fsyncs it, renames it over the target and fsyncs the folder: a crash or a full disk leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import numbers
import os
import stat
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any, TypeGuard

import numpy as np

from .errors import CheckpointError
from .stats import EpochStats

log = logging.getLogger(__name__)

MAGIC = b"IBSTATE2"
MAGIC_V1 = b"IBSTATE1"  # written before checksums: loads, but damage goes undetected
MAGICS = (MAGIC, MAGIC_V1)
MAX_HEADER = 64 << 20  # the JSON header holds configuration and per-epoch stats: kilobytes
_LENGTH, _CRC = 8, 4
_ALIGN = 64
_DTYPES = {"<f4", "<f8", "<i8", "<i4", "|u1", "|b1"}
_MAX_DIMS = 32
_MAX_BYTES = 1 << 62
_READ = 8 << 20  # bytes per read while checksumming: bounded memory for any file size


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    plain, arrays = {}, {}
    for key, value in state.items():
        if _is_tensor(value):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            arrays[key] = np.ascontiguousarray(value)
        else:
            plain[key] = value
    return plain, arrays


def _is_tensor(value: Any) -> TypeGuard[Any]:
    return hasattr(value, "numpy") and hasattr(value, "detach")


def _raw(arr: np.ndarray) -> memoryview | bytes:
    return memoryview(arr).cast("B") if arr.size else b""  # type: ignore[arg-type]  # numpy arrays are buffers


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def save_state(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (JSON-able values and numpy arrays or tensors at the top level) to ``path``."""
    plain, arrays = _split(state)
    layout: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, arr in arrays.items():
        if arr.dtype.str not in _DTYPES:
            raise TypeError(f"checkpoint array {key!r} has dtype {arr.dtype}; expected one of {sorted(_DTYPES)}")
        layout[key] = {
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "offset": offset,
            "crc32": zlib.crc32(_raw(arr)),
        }
        offset += _aligned(arr.nbytes)
    header = json.dumps({"state": plain, "arrays": layout}, allow_nan=True).encode()
    if len(header) > MAX_HEADER:  # load_state would refuse it: fail now, while the previous file is intact
        raise CheckpointError(
            f"the state's plain values take {len(header):,} bytes of JSON, more than a "
            f"checkpoint header holds ({MAX_HEADER:,}); pass large data as arrays"
        )
    length = len(header).to_bytes(_LENGTH, "little")
    prefix = MAGIC + length + zlib.crc32(length + header).to_bytes(_CRC, "little")
    start = _aligned(len(prefix) + len(header))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix + header)
            for key, arr in arrays.items():
                f.seek(start + layout[key]["offset"])
                f.write(_raw(arr))
            f.truncate(start + offset)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Loaded(dict):
    """A state read by :func:`load_state`: a dict that remembers its file, so that
    :func:`check_state` names the file. Pickles as a plain dict."""

    path: str = ""

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def file_kind(mode: int) -> str | None:
    """What a non-regular file is (None for a regular one): opening a FIFO would block forever."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _damaged(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged ({what}); use an earlier one")


def _open_regular(path: str) -> Any:
    """``path`` opened for reading, refused before opening if it is not a regular file. Opened
    non-blocking so that a FIFO swapped in after the check cannot block either."""
    try:
        kind = file_kind(os.stat(path).st_mode)
        if kind is None:
            f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
            kind = file_kind(os.fstat(f.fileno()).st_mode)
            if kind is None:
                return f
            f.close()
    except FileNotFoundError:  # stays what it is: the caller may create the file
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    raise CheckpointError(f"{path} is {kind}, not a checkpoint file (written by ib.save())")


def _read_header(f: Any, path: str, total: int) -> tuple[int, int, dict[str, Any]]:
    """(version, start of the arrays, header) of the open checkpoint, checked against its size
    ``total`` before anything is read or allocated."""
    magic = f.read(len(MAGIC))
    if magic not in MAGICS:
        raise CheckpointError(f"{path} is not an infobatch_stream checkpoint (written by ib.save())")
    version = 2 if magic == MAGIC else 1
    prefix = len(MAGIC) + _LENGTH + (_CRC if version == 2 else 0)
    fixed = f.read(prefix - len(MAGIC))
    if len(fixed) < prefix - len(MAGIC):
        raise _damaged(path, f"it ends after {total} bytes, inside its header")
    length = int.from_bytes(fixed[:_LENGTH], "little")
    if length > min(MAX_HEADER, total - prefix):
        raise _damaged(
            path, f"its header claims {length:,} bytes; the file has {total:,} and a header at most {MAX_HEADER:,}"
        )
    raw = f.read(length)
    if len(raw) != length:
        raise _damaged(path, "it ends inside its header")
    if version == 2 and zlib.crc32(fixed[:_LENGTH] + raw) != int.from_bytes(fixed[_LENGTH:], "little"):
        raise _damaged(path, "the checksum of its header does not match")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, 4300-digit ints
        raise _damaged(path, f"its header is not valid JSON: {str(e)[:100]}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("state"), dict)
        or not isinstance(header.get("arrays"), dict)
    ):
        raise _damaged(path, 'its header lacks the "state" and "arrays" objects')
    return version, _aligned(prefix + length), header


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_shape(shape: Any) -> TypeGuard[list[int]]:
    return isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_is_int(n) and n >= 0 for n in shape)


def _array_layout(
    key: str, spec: Any, version: int, path: str, start: int, total: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, first byte, byte count) of one array entry, every number checked against
    the file's size with Python integers (no overflow) before anything is mapped."""
    if not isinstance(spec, dict):
        raise _damaged(path, f"array {key!r} has no layout")
    if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in _DTYPES:
        raise CheckpointError(
            f"checkpoint {path}: array {key!r} has an unexpected dtype {str(spec.get('dtype'))[:40]} "
            f"(expected one of {sorted(_DTYPES)}); it is damaged or not ours"
        )
    dtype, shape, offset = np.dtype(spec["dtype"]), spec.get("shape"), spec.get("offset")
    span = _MAX_BYTES
    if _is_shape(shape):
        span = math.prod(max(n, 1) for n in shape) * dtype.itemsize
    if span >= _MAX_BYTES:  # also for an empty array: numpy refuses larger shapes with a ValueError
        raise _damaged(path, f"array {key!r} has an impossible shape {str(shape)[:60]}")
    if not _is_int(offset) or not 0 <= offset <= total:
        raise _damaged(path, f"array {key!r} has an impossible offset {str(offset)[:40]}")
    if version == 2 and not (_is_int(spec.get("crc32")) and 0 <= spec["crc32"] < 1 << 32):
        raise _damaged(path, f"array {key!r} has no checksum")
    assert isinstance(shape, list)  # _is_shape held: the span check raised otherwise
    nbytes = span if 0 not in shape else 0
    if start + offset + nbytes > total:
        raise CheckpointError(f"checkpoint {path} is truncated (array {key!r} ends past its end); use an earlier one")
    return dtype, tuple(shape), start + offset, nbytes


def _verify(f: Any, begin: int, nbytes: int, expected: int, path: str, key: str) -> None:
    """Compare the CRC-32 of bytes ``[begin, begin + nbytes)`` with ``expected``, read in
    bounded pieces (plain reads: the page cache holds them, not this process)."""
    f.seek(begin)
    buf = bytearray(min(nbytes, _READ))
    view, crc, left = memoryview(buf), 0, nbytes
    while left:
        got = f.readinto(view[: min(left, len(buf))])
        if not got:
            raise CheckpointError(
                f"checkpoint {path} is truncated (array {key!r} ends past its end); use an earlier one"
            )
        crc = zlib.crc32(view[:got], crc)
        left -= got
    if crc != expected:
        raise _damaged(path, f"the checksum of array {key!r} does not match its bytes")


def load_state(path: str) -> dict[str, Any]:
    """The state saved at ``path``: plain values, and arrays memory-mapped read-only, checksums
    verified. Raises :class:`CheckpointError` naming the file and the damaged part."""
    with _open_regular(path) as f:
        total = os.fstat(f.fileno()).st_size
        try:
            version, start, header = _read_header(f, path, total)
            state = _Loaded(header["state"])
            state.path = path
            for key, spec in header["arrays"].items():
                if key in state:
                    raise _damaged(path, f"{key!r} is both a value and an array")
                dtype, shape, begin, nbytes = _array_layout(key, spec, version, path, start, total)
                if version == 2:
                    _verify(f, begin, nbytes, spec["crc32"], path, key)
                state[key] = (
                    np.memmap(f, dtype=dtype, mode="r", offset=begin, shape=shape)
                    if nbytes
                    else np.zeros(shape, dtype=dtype)
                )
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if version == 1:
        log.info(
            "%s was written by an older version (IBSTATE1) and carries no checksums: damage to it "
            "cannot be detected; ib.save() it again to add them",
            path,
        )
    return state


def iter_chunks(arr: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``arr`` (1-D) in pieces of ``size`` values. A memory-mapped array's pages are released
    after each piece (``MADV_DONTNEED``: they stay in the page cache), so a pass over a large
    checkpoint holds one piece in this process's memory, not the whole file."""
    mm = arr.base if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) else None
    first = arr.offset % mmap.ALLOCATIONGRANULARITY if mm is not None else 0  # where numpy's map puts it
    for lo in range(0, len(arr), size):
        hi = min(lo + size, len(arr))
        yield arr[lo:hi]
        if mm is not None and hasattr(mm, "madvise"):
            a, b = first + lo * arr.itemsize, first + hi * arr.itemsize
            a -= a % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)


# ---- what a state must hold -----------------------------------------------------------------
_PLAIN = (type(None), bool, int, float, str)
_NEVER_NEGATIVE = 1 << 63


def _where(state: Any) -> str:
    path = getattr(state, "path", "")
    return f"checkpoint {path}: " if path else ""


def _field_error(where: str, key: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{where}state field {key!r} {what}: the state is damaged or not from ib.state_dict(); "
        "use an earlier checkpoint"
    )


def state_array(state: dict[str, Any], key: str, dtype: Any, length: int | None, where: str = "") -> np.ndarray:
    """Field ``key`` as a 1-D numpy array of ``dtype`` (and ``length``), from an array or a
    tensor; anything else is refused, naming the field."""
    value, dtype = state.get(key), np.dtype(dtype)
    if key not in state:
        raise _field_error(where, key, "is missing")
    if _is_tensor(value):
        if str(value.dtype) != f"torch.{dtype.name}":  # before .numpy(): bfloat16 has no numpy type
            raise _field_error(where, key, f"is a tensor of {value.dtype}, expected torch.{dtype.name}")
        try:
            value = value.detach().cpu().numpy()
        except (RuntimeError, TypeError, ValueError) as e:  # sparse, meta-device or other exotic tensors
            raise _field_error(where, key, f"cannot be read as an array ({str(e)[:80]})") from None
    if not isinstance(value, np.ndarray):
        raise _field_error(where, key, f"is a {type(value).__name__}, expected an array of {dtype.name}")
    if value.dtype != dtype or value.ndim != 1:
        raise _field_error(where, key, f"is a {value.ndim}-D array of {value.dtype}, expected 1-D {dtype.name}")
    if length is not None and len(value) != length:
        raise _field_error(where, key, f"holds {len(value)} values, expected {length}")
    return value


def check_int(state: dict[str, Any], key: str, where: str = "") -> int:
    """Field ``key`` as an integer >= 0 (an epoch, a count)."""
    value = state.get(key)
    if not _is_int(value) or not 0 <= value < _NEVER_NEGATIVE:
        raise _field_error(where, key, f"is {str(value)[:40]}, expected an integer >= 0")
    return int(value)


def check_config(value: Any, where: str = "") -> dict[str, Any]:
    """The ``config`` field: setting names to plain values (they are compared and printed)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and type(v) in _PLAIN for k, v in value.items()):
        raise _field_error(where, "config", f"is {str(value)[:60]}, expected an object of plain settings")
    return value


def _check_stats(value: Any, where: str) -> None:
    """Every entry must build an ``EpochStats``: its fields only, the required ones present,
    counts as integers >= 0 and the threshold a number or None."""
    from dataclasses import MISSING, fields

    known = {f.name: f for f in fields(EpochStats)}
    required = {name for name, f in known.items() if f.default is MISSING}
    if not isinstance(value, list):
        raise _field_error(where, "stats", f"is {str(value)[:40]}, expected a list of per-epoch stats")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not required <= entry.keys() or not entry.keys() <= known.keys():
            raise _field_error(
                where,
                "stats",
                f"entry {i} is not an ib.stats() epoch (needs {sorted(required)}, got {str(entry)[:80]})",
            )
        for name, v in entry.items():
            if name == "threshold":
                ok = v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool))
            else:
                ok = _is_int(v) and 0 <= v < _NEVER_NEGATIVE
            if not ok:
                raise _field_error(
                    where,
                    "stats",
                    f"entry {i} has {name} = {str(v)[:40]}, expected "
                    + ("a number or null" if name == "threshold" else "an integer >= 0"),
                )


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_BYTES = 1 << 20  # plan bytes per step while counting


def _kept_in_plan(keep: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Samples per shard whose keep bit is set (slot ``s`` is bit ``7 - s % 8`` of byte
    ``s // 8``; ``first``: each shard's first slot, then the slot count). Counted a byte at a
    time through a popcount table, in pieces: a 100M-sample plan takes a fraction of a second."""
    if not len(keep):
        return np.zeros(len(first) - 1, dtype=np.int64)
    byte, rem = first // 8, first % 8
    ones = np.zeros(len(first), dtype=np.int64)  # keep bits in the whole bytes before each boundary
    running = 0
    for b0 in range(0, len(keep), _BYTES):
        cum = np.cumsum(_POPCOUNT[keep[b0 : b0 + _BYTES]], dtype=np.int64)
        inside = (byte > b0) & (byte <= b0 + len(cum))
        ones[inside] = running + cum[byte[inside] - b0 - 1]
        running += int(cum[-1])
    partial = keep[np.minimum(byte, len(keep) - 1)] >> (8 - rem)  # a boundary's byte: its leading bits
    ones += np.where(rem > 0, _POPCOUNT[partial & 0xFF], 0)
    return np.diff(ones)


def _check_kept(state: dict[str, Any], index: Any, plan: np.ndarray, where: str) -> None:
    """``kept_per_shard`` must be what the plan's keep bits count per shard: the epoch is split
    over ranks and workers by it, so a wrong count would lose samples or make ranks uneven."""
    kept = state_array(state, "kept_per_shard", np.int64, index.num_shards, where)
    counted = _kept_in_plan(plan[: len(plan) // 2], np.asarray(index.shard_first, dtype=np.int64))
    if not np.array_equal(kept, counted):
        bad = int(np.flatnonzero(kept != counted)[0])
        raise _field_error(
            where, "kept_per_shard", f"says shard {bad} keeps {kept[bad]} samples, the plan's keep bits {counted[bad]}"
        )


def _check_pending(state: dict[str, Any], n: int, where: str) -> None:
    """Pending updates: slots of this index with the finite losses ``update()`` queued."""
    slots = state_array(state, "pending_slots", np.int64, None, where)
    losses = state_array(state, "pending_losses", np.float32, len(slots), where)
    if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= n):
        raise _field_error(where, "pending_slots", f"holds slots outside [0, {n})")
    if not np.isfinite(losses).all():
        raise _field_error(where, "pending_losses", "holds NaN or infinite losses (update() queues finite ones)")


def check_state(state: dict[str, Any], index: Any) -> None:
    """Refuse a state saved for another dataset (its scores would land on the wrong samples), or
    one with a field that ``InfoBatch.load_state_dict`` could not use: each field is checked for
    type, dtype and length here, so a damaged or hand-made state fails naming the field rather
    than halfway through restoring."""
    if not isinstance(state, dict) or not _is_int(state.get("format")) or state.get("format") != 1:
        raise CheckpointError(
            f"{_where(state)}not an InfoBatch state (expected the dict from ib.state_dict() or a file from ib.save())"
        )
    where, n = _where(state), index.num_samples
    # past epoch 0 of an index still being built, the state's is the built index's: checked once built
    later = getattr(index, "building", None) is not None and _is_int(state.get("epoch")) and state["epoch"] >= 1
    if (
        (state.get("index_fingerprint") not in {index.fingerprint, index.source_fingerprint} - {None} and not later)
        or not _is_int(state.get("num_samples"))
        or state["num_samples"] != n
    ):
        raise CheckpointError(
            f"{where}this state was saved for another index ({str(state.get('num_samples'))[:20]} samples, fingerprint "
            f"{str(state.get('index_fingerprint'))[:12]}); this InfoBatch's index {index.path or '<memory>'} has "
            f"{n} samples, fingerprint {index.fingerprint[:12]}: load it with the index it was saved with"
        )
    check_config(state.get("config"), where)
    check_int(state, "epoch", where)
    check_int(state, "updates", where)
    threshold = state.get("threshold")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise _field_error(where, "threshold", f"is {str(threshold)[:40]}, expected a number (NaN before any score)")
    _check_stats(state.get("stats"), where)
    state_array(state, "scores", np.float32, n, where)
    _check_kept(state, index, state_array(state, "plan", np.uint8, 2 * ((n + 7) // 8), where), where)
    _check_pending(state, n, where)
