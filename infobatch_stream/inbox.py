"""``update()``'s batches on their way from the training step to the score store.

On the CPU a batch's scores go into the store at once, as they always did. On a GPU, reading a
loss on the host (``.cpu()``, ``.item()``, ``.numpy()``) waits for every kernel queued before it:
done on every step, that drains the queue an input pipeline exists to keep full. So there the
scores stay on the loss's device and are copied into pinned host memory with
``non_blocking=True``, marked by a CUDA event; the copy is applied to the store when the next
``update()`` comes (it has landed by then in all but pathological cases, and waiting on the event
waits for that copy, not for the step queued after it), or at the latest when ``set_epoch``,
``sync_scores``, ``stats``, ``state_dict`` or ``save`` flush the inbox. The store lags by at
most one step and nothing is lost. The host then runs at most one step ahead of the device (it
waits, if at all, for the previous step's forward pass, while that step's backward and this
step's forward are still queued): the queue never drains. The weights go to the device the same way (pinned,
non-blocking); metadata already on the device stays there for the weights and is checked when
its copy lands, so a bad batch is reported one call late, naming that call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import policy
from .errors import MetadataError
from .meta import BOOSTED, EPOCH, SLOT, TAG, WIDTH, as_meta_array, check_dtype, check_shape

# Device types whose host reads stall a queue; the tests add "cpu" to run the deferred path.
DEFERRED_DEVICES = {"cuda"}
Record = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (slots, epochs, values) into the store


def check_loss(loss: Any, score: Any, batch: int) -> None:
    """Shape and type checks that need no values (so none that waits for the device)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"update() needs the per-sample loss as a torch.Tensor, got {type(loss).__name__}")
    if loss.ndim == 0:
        raise ValueError(
            "update() got a scalar loss: InfoBatch needs one loss per sample; build the criterion with "
            "reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
        )
    if loss.ndim != 1:
        raise ValueError(
            f"update() got a loss of shape {tuple(loss.shape)}: reduce it to one value per sample first, "
            "e.g. loss.flatten(1).mean(1)"
        )
    if loss.shape[0] != batch:
        raise ValueError(
            f"update() got {loss.shape[0]} losses for a batch of {batch} samples; pass the loss "
            "of exactly the batch whose '__ib__' field you pass"
        )
    if score is not None and tuple(score.shape) != tuple(loss.shape):
        raise ValueError(
            f"update() got a score of shape {tuple(score.shape)} for a loss of shape "
            f"{tuple(loss.shape)}: pass one score per sample"
        )


def check_meta(arr: np.ndarray, num_samples: int, tag: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(slots, epochs, boosted)`` of a host metadata array, or a :class:`MetadataError` when the
    batch was filtered against another index (``where``: this one, for the message)."""
    slots, epochs, boosted = arr[:, SLOT], arr[:, EPOCH], arr[:, BOOSTED].astype(bool)
    if len(slots) and (np.any(arr[:, TAG] != tag) or slots.min() < 0 or slots.max() >= num_samples):
        raise MetadataError(
            "update() got metadata from another index (its index tag or slots do not match this "
            f"InfoBatch's {num_samples}-sample index {where}): pass the "
            "'__ib__' field of batches read through this InfoBatch's stages"
        )
    return slots, epochs, boosted


def checked_batch(
    meta: Any, loss: torch.Tensor, score: torch.Tensor | None, num_samples: int, tag: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(slots, epochs, boosted, values)`` of one ``update()`` call read on the host at once."""
    arr = as_meta_array(meta, num_samples)
    check_loss(loss, score, arr.shape[0])
    slots, epochs, boosted = check_meta(arr, num_samples, tag, where)
    values = (loss if score is None else score).detach().to(dtype=torch.float32, device="cpu").numpy()
    return slots, epochs, boosted, values


@dataclass
class _InFlight:
    """One batch copying to the host: its scores, and either its checked metadata or a copy of it."""

    call: int  # which update() call, for messages
    values: torch.Tensor  # float32 on the host (pinned when the source is on a GPU)
    meta: tuple[np.ndarray, np.ndarray] | None  # (slots, epochs) checked on the host already (copies)
    device_meta: torch.Tensor | None  # else the metadata's host copy, checked when it lands
    event: Any  # torch.cuda.Event recorded after the copies; None when they were synchronous
    sources: tuple[torch.Tensor, ...]  # the device tensors copied: alive until the copies are done


def _device_meta(meta: Any, device: torch.device) -> torch.Tensor | None:
    """The metadata as one tensor when it is already on ``device`` (a GPU), else None (also for
    a ragged list: the host path then refuses it as the eager one does)."""
    if isinstance(meta, (list, tuple)) and meta and all(isinstance(m, torch.Tensor) for m in meta):
        if all(m.device == device and m.shape == meta[0].shape for m in meta):
            return torch.stack(list(meta))
        return None
    if isinstance(meta, torch.Tensor) and meta.device == device:
        return meta
    return None


def _host_copy(source: torch.Tensor, pinned: bool) -> torch.Tensor:
    out = torch.empty(source.shape, dtype=source.dtype, pin_memory=pinned)
    out.copy_(source, non_blocking=pinned)
    return out


class Inbox:
    """Turns each ``update()`` batch into its loss weights now and its store record when the
    scores are on the host (see the module docstring)."""

    def __init__(self, record: Record, num_samples: int, tag: int, where: str, config: policy.PruneConfig) -> None:
        self.record, self.num_samples, self.tag, self.where, self.config = record, num_samples, tag, where, config
        self.in_flight: _InFlight | None = None
        self.calls = 0

    def put(self, meta: Any, loss: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
        """Take one batch; the per-sample weights for the loss, on its device and dtype.

        A batch in flight whose metadata turns out bad raises here, after this batch is taken
        (it is good or raised already), so that no good batch is lost to another's error."""
        late: MetadataError | None = None
        try:
            self.land()
        except MetadataError as e:
            late = e
        self.calls += 1
        try:
            if not isinstance(loss, torch.Tensor) or loss.device.type not in DEFERRED_DEVICES:
                slots, epochs, boosted, values = checked_batch(
                    meta, loss, score, self.num_samples, self.tag, self.where
                )
                self.record(slots, epochs, values)
                weights = self._weights(boosted, loss, pinned=False)
            else:
                weights = self._put_deferred(meta, loss, score)
        except Exception:
            if late is not None:
                raise late  # noqa: B904 - this call's own error is chained as the context
            raise
        if late is not None:
            raise late
        return weights

    def _put_deferred(self, meta: Any, loss: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
        pinned = loss.device.type == "cuda"
        on_device = _device_meta(meta, loss.device)
        if on_device is not None:
            check_dtype(on_device.dtype, self.num_samples)
            if on_device.ndim == 1 and on_device.shape[0] == WIDTH:
                on_device = on_device[None, :]
            check_shape(tuple(on_device.shape))
            check_loss(loss, score, on_device.shape[0])
            boosted = on_device[:, BOOSTED] != 0
            # 0-dim CPU tensors act as scalars on the device (no copy); float64 as the eager weights
            boost, one = torch.tensor(self.config.boost, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
            weights = torch.where(boosted, boost, one).to(loss.dtype)
            on_device = on_device.detach()
            checked, meta_copy = None, _host_copy(on_device, pinned)
        else:
            arr = as_meta_array(meta, self.num_samples)
            check_loss(loss, score, arr.shape[0])
            slots, epochs, boosted_np = check_meta(arr, self.num_samples, self.tag, self.where)
            weights = self._weights(boosted_np, loss, pinned)
            # copies: the caller may refill its metadata buffer before this batch lands
            checked, meta_copy = (slots.copy(), epochs.copy()), None
        source = (loss if score is None else score.to(loss.device, non_blocking=True)).detach().to(torch.float32)
        values = _host_copy(source, pinned)
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(loss.device))  # the stream the copies were queued on
        kept = (source,) if on_device is None else (source, on_device)
        self.in_flight = _InFlight(self.calls, values, checked, meta_copy, event, kept)
        return weights

    def _weights(self, boosted: np.ndarray, loss: torch.Tensor, pinned: bool) -> torch.Tensor:
        """The weights of host ``boosted`` flags on the loss's device and dtype (through pinned
        memory, without waiting, when ``pinned``)."""
        weights = torch.from_numpy(policy.weights(boosted, self.config)).to(loss.dtype)
        if pinned:
            weights = weights.pin_memory()
        return weights.to(loss.device, non_blocking=pinned)

    def land(self) -> None:
        """Apply the batch in flight, if any, waiting for its copy if it has not landed yet."""
        step, self.in_flight = self.in_flight, None
        if step is None:
            return
        if step.event is not None:
            step.event.synchronize()  # waits for this copy only, queued right after its loss
        if step.meta is not None:
            slots, epochs = step.meta
        else:
            assert step.device_meta is not None
            try:
                arr = as_meta_array(step.device_meta.numpy(), self.num_samples)
                slots, epochs, _ = check_meta(arr, self.num_samples, self.tag, self.where)
            except MetadataError as e:
                raise MetadataError(
                    f"update() call {step.call} (checked when its metadata reached the host): {e}"
                ) from e
        self.record(slots, epochs, step.values.numpy())
