"""The per-sample metadata that travels from the filter to ``update()``.

Each kept sample gets ``sample["__ib__"] = int64[slot, epoch, boosted, index_tag]``. An int64 array of fixed
shape survives every usual path unchanged: WebDataset's decoders skip ``__`` fields,
``wds.to_tuple("jpg", "cls", "__ib__")`` selects it, ``wds.batched`` stacks it to ``(B, 4)``, and
torch's default collate turns that into an int64 tensor. Weights are not stored (floats would lose
exactness through some collates): ``update()`` derives them from ``boosted``. ``index_tag``
(23 bits of the index fingerprint) lets ``update()`` reject a batch filtered against another index,
whose slots would otherwise land silently on the wrong samples.

A field cast on the way (``.float()``, ``.to(torch.int32)``, a collate that narrows) is accepted
when the dtype holds every value exactly: the tag is below ``2**23``, exact in float32 and int32,
so float32 serves indexes of up to ``2**24 + 1`` samples, int32 up to ``2**31``, and float64 and
int64 any. A dtype that rounds or wraps them (float16, bfloat16, 8- and 16-bit integers, float32
past ``2**24`` slots) is refused by its name: a rounded slot is still a whole number, so the
values alone could not tell.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MetadataError

META_KEY = "__ib__"
SLOT, EPOCH, BOOSTED, TAG = 0, 1, 2, 3
WIDTH = 4
TAG_BITS = 23  # exact in float32 (24-bit significand) and positive in int32


def index_tag(fingerprint: str) -> int:
    return int(fingerprint[:8], 16) & ((1 << TAG_BITS) - 1)


def make_meta(slot: int, epoch: int, boosted: bool, tag: int) -> np.ndarray:
    return np.array([slot, epoch, int(boosted), tag], dtype=np.int64)


def exact_limit(dtype: Any) -> int | None:
    """The largest ``m`` such that ``dtype`` holds every integer in ``[0, m]`` exactly (numpy or
    torch dtypes); None for a dtype that holds no metadata (bool, complex, object)."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool or dtype.is_complex:
            return None
        if dtype.is_floating_point:
            return int(round(2 / torch.finfo(dtype).eps))  # 2 ** (significand bits)
        return int(torch.iinfo(dtype).max)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return int(round(2 / np.finfo(dtype).eps))
    if dtype.kind in "iu":
        return int(np.iinfo(dtype).max)
    return None


def check_dtype(dtype: Any, num_samples: int | None) -> None:
    limit = exact_limit(dtype)
    largest = max((1 << TAG_BITS) - 1, (num_samples or 0) - 1)  # the tag, or the last slot
    if limit is not None and limit >= largest:
        return
    name = str(dtype)
    if limit is None:
        why = "which does not hold integers"
    elif num_samples is not None and num_samples - 1 > limit >= (1 << TAG_BITS) - 1:
        why = (
            f"which holds integers exactly only up to {limit}, and this index's slots go up to "
            f"{num_samples - 1}: they would be rounded or wrapped onto other samples"
        )
    else:
        why = f"which holds integers exactly only up to {limit}; the index tag needs up to {(1 << TAG_BITS) - 1}"
    raise MetadataError(
        f"update() got the {META_KEY!r} metadata as {name}, {why}. Keep the field int64 as the stages write "
        f"it: do not cast it with the inputs (.half(), .float(), .to(dtype)) or narrow it in a collate; "
        f"select it with wds.to_tuple(..., {META_KEY!r}) and pass it to update() unchanged"
    )


def _to_numpy(item: Any, num_samples: int | None) -> np.ndarray:
    if hasattr(item, "detach") and hasattr(item, "dtype"):  # a torch tensor: bfloat16 has no numpy form
        check_dtype(item.dtype, num_samples)
        return item.detach().cpu().numpy()
    arr = np.asarray(item)
    check_dtype(arr.dtype, num_samples)
    return arr


def check_shape(shape: tuple[int, ...]) -> None:
    """A batch's metadata is ``(batch, 4)``; anything else is another field passed by mistake."""
    if len(shape) != 2 or shape[1] != WIDTH:
        raise MetadataError(
            f"update() metadata has shape {tuple(shape)}, expected (batch, {WIDTH}) from the {META_KEY!r} field; "
            "pass that field unchanged (did you pass labels or keys instead?)"
        )


def as_meta_array(meta: Any, num_samples: int | None = None) -> np.ndarray:
    """Accept a batch's metadata in any collated form and return an int64 ``(B, 4)`` array.

    ``num_samples`` (the index's) decides which dtypes hold every slot exactly; a dtype that
    would not (see the module's text), or floats that are not whole numbers, raise
    :class:`MetadataError`."""
    if meta is None:
        raise MetadataError(
            f"update() got no metadata: pass the batch's {META_KEY!r} field, e.g. select it with "
            f"wds.to_tuple('jpg', 'cls', {META_KEY!r}) after ib.filter()"
        )
    if isinstance(meta, (list, tuple)):
        if not meta:
            raise MetadataError("update() got an empty metadata list")
        arr = np.stack([_to_numpy(m, num_samples) for m in meta])
    else:
        arr = _to_numpy(meta, num_samples)
    if arr.ndim == 1 and arr.shape[0] == WIDTH:
        arr = arr[None, :]
    check_shape(arr.shape)
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise MetadataError(
            f"update() metadata of dtype {arr.dtype} holds values that are not whole numbers (slots, epochs, "
            f"flags and tags are integers): pass the {META_KEY!r} field unchanged, as int64"
        )
    return arr.astype(np.int64, copy=False)
