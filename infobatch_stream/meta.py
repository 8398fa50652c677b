"""The per-sample metadata that travels from the filter to ``update()``.

Each kept sample gets ``sample["__ib__"] = int64[slot, epoch, boosted, index_tag]``. An int64 array of fixed
shape survives every usual path unchanged: WebDataset's decoders skip ``__`` fields,
``wds.to_tuple("jpg", "cls", "__ib__")`` selects it, ``wds.batched`` stacks it to ``(B, 4)``, and
torch's default collate turns that into an int64 tensor. Weights are not stored (floats would lose
exactness through some collates): ``update()`` derives them from ``boosted``. ``index_tag``
(32 bits of the index fingerprint) lets ``update()`` reject a batch filtered against another index,
whose slots would otherwise land silently on the wrong samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

META_KEY = "__ib__"
SLOT, EPOCH, BOOSTED, TAG = 0, 1, 2, 3
WIDTH = 4


def index_tag(fingerprint: str) -> int:
    return int(fingerprint[:8], 16)


def make_meta(slot: int, epoch: int, boosted: bool, tag: int) -> np.ndarray:
    return np.array([slot, epoch, int(boosted), tag], dtype=np.int64)


def as_meta_array(meta: Any) -> np.ndarray:
    """Accept a batch's metadata in any collated form and return an int64 ``(B, 4)`` array."""
    if meta is None:
        raise ValueError(
            f"update() got no metadata: pass the batch's {META_KEY!r} field, e.g. select it with "
            f"wds.to_tuple('jpg', 'cls', {META_KEY!r}) after ib.filter()"
        )
    if hasattr(meta, "detach"):
        meta = meta.detach().cpu().numpy()
    elif isinstance(meta, (list, tuple)):
        meta = np.stack([np.asarray(m.detach().cpu() if hasattr(m, "detach") else m) for m in meta]) if meta else None
        if meta is None:
            raise ValueError("update() got an empty metadata list")
    arr = np.asarray(meta)
    if arr.ndim == 1 and arr.shape[0] == WIDTH:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != WIDTH:
        raise ValueError(
            f"update() metadata has shape {arr.shape}, expected (batch, {WIDTH}) from the {META_KEY!r} field; "
            "pass that field unchanged (did you pass labels or keys instead?)"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise ValueError(f"update() metadata has dtype {arr.dtype}; pass the {META_KEY!r} field unchanged")
    return arr.astype(np.int64, copy=False)
