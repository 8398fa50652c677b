"""Saving InfoBatch state to one file, atomically, without pickle.

Layout: an 8-byte magic, the length of a JSON header, the header (plain values, and for each
array its dtype, shape and offset), then the arrays' raw bytes, each 64-byte aligned. Loading
reads the JSON and maps the arrays (a 100M-sample store is 400 MB: read at disk speed, never
unpickled). Saving writes a temporary file next to the target, fsyncs it, renames it over the
target and fsyncs the folder: a crash or a full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from .errors import CheckpointError

MAGIC = b"IBSTATE1"
_ALIGN = 64
_DTYPES = {"<f4", "<f8", "<i8", "<i4", "|u1", "|b1"}


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    plain, arrays = {}, {}
    for key, value in state.items():
        if hasattr(value, "numpy") and hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            arrays[key] = np.ascontiguousarray(value)
        else:
            plain[key] = value
    return plain, arrays


def save_state(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (JSON-able values and numpy arrays or tensors at the top level) to ``path``."""
    plain, arrays = _split(state)
    layout, offset = {}, 0
    for key, arr in arrays.items():
        if arr.dtype.str not in _DTYPES:
            raise TypeError(f"checkpoint array {key!r} has dtype {arr.dtype}; expected one of {sorted(_DTYPES)}")
        layout[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"state": plain, "arrays": layout}, allow_nan=True).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for key, arr in arrays.items():
                f.seek(start + layout[key]["offset"])
                f.write(memoryview(arr).cast("B") if arr.size else b"")
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


def load_state(path: str) -> dict[str, Any]:
    """The state saved at ``path``: plain values, and arrays memory-mapped read-only."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise CheckpointError(f"{path} is not an infobatch_stream checkpoint (written by ib.save())")
            size = int.from_bytes(head[len(MAGIC):], "little")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"checkpoint {path} is damaged ({e}); use an earlier one") from None
    start = -(-(len(MAGIC) + 8 + size) // _ALIGN) * _ALIGN
    total = os.path.getsize(path)
    state = dict(header["state"])
    for key, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"])
        if dtype.str not in _DTYPES:
            raise CheckpointError(f"checkpoint {path}: array {key!r} has an unexpected dtype {dtype}")
        shape = tuple(int(n) for n in spec["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        begin = start + int(spec["offset"])
        if begin + nbytes > total:
            raise CheckpointError(f"checkpoint {path} is truncated (array {key!r} ends past its end); "
                                  "use an earlier one")
        state[key] = (np.memmap(path, dtype=dtype, mode="r", offset=begin, shape=shape) if nbytes
                      else np.zeros(shape, dtype=dtype))
    return state


def check_state(state: dict[str, Any], index: Any) -> None:
    """Refuse a state saved for another dataset: its scores would land on the wrong samples."""
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError("not an InfoBatch state (expected the dict from ib.state_dict() or a file from ib.save())")
    if state.get("index_fingerprint") != index.fingerprint or int(state.get("num_samples", -1)) != index.num_samples:
        raise CheckpointError(
            f"this state was saved for another index ({state.get('num_samples')} samples, fingerprint "
            f"{str(state.get('index_fingerprint'))[:12]}); this InfoBatch's index {index.path or '<memory>'} has "
            f"{index.num_samples} samples, fingerprint {index.fingerprint[:12]}: load it with the index it was saved with")
    n = index.num_samples
    for key, length in (("scores", n), ("plan", 2 * ((n + 7) // 8)), ("kept_per_shard", index.num_shards)):
        if len(state[key]) != length:
            raise CheckpointError(f"state field {key!r} holds {len(state[key])} values, expected {length}: damaged")
