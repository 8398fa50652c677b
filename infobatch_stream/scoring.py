"""The training side of the scores: checking what ``update()`` is given, and recording it.

With one process the losses go into the store at once. With a process group the store changes
only when the ranks exchange their updates (at ``set_epoch``, every ``sync_every`` updates, or on
``sync_scores()``), applied by every node's writer in the same order, so all stores stay identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import distributed
from .errors import MetadataError
from .meta import BOOSTED, EPOCH, SLOT, TAG, as_meta_array
from .store import ScoreStore


def checked_batch(
    meta: Any, loss: torch.Tensor, score: torch.Tensor | None, num_samples: int, tag: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(slots, epochs, boosted, values)`` of one ``update()`` call, or a clear error saying what
    the caller passed wrong (``where``: the index, for the message)."""
    arr = as_meta_array(meta, num_samples)
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
    if loss.shape[0] != arr.shape[0]:
        raise ValueError(
            f"update() got {loss.shape[0]} losses for a batch of {arr.shape[0]} samples; pass the loss "
            "of exactly the batch whose '__ib__' field you pass"
        )
    slots, epochs, boosted = arr[:, SLOT], arr[:, EPOCH], arr[:, BOOSTED].astype(bool)
    if len(slots) and (np.any(arr[:, TAG] != tag) or slots.min() < 0 or slots.max() >= num_samples):
        raise MetadataError(
            "update() got metadata from another index (its index tag or slots do not match this "
            f"InfoBatch's {num_samples}-sample index {where}): pass the "
            "'__ib__' field of batches read through this InfoBatch's stages"
        )
    if score is not None and tuple(score.shape) != tuple(loss.shape):
        raise ValueError(
            f"update() got a score of shape {tuple(score.shape)} for a loss of shape "
            f"{tuple(loss.shape)}: pass one score per sample"
        )
    values = (loss if score is None else score).detach().to(dtype=torch.float32, device="cpu").numpy()
    return slots, epochs, boosted, values


class ScoreExchange:
    """This rank's score updates on their way into the store (see the module docstring)."""

    def __init__(self, store: ScoreStore, writer: bool, ema_decay: float, sync_every: int | None) -> None:
        self.store, self.writer, self.ema_decay, self.sync_every = store, writer, ema_decay, sync_every
        self.pending: list[np.ndarray] = []  # this rank's (slot, loss) updates since the last exchange
        self.updates = 0  # update() calls, for sync_every

    def add(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Record one batch's finite values (into the store now, or for the next exchange)."""
        if distributed.world()[1] > 1:  # the store changes only when ranks exchange: all stay identical
            self.pending.append(distributed.pack_updates(slots, values))
            self.updates += 1
            if self.sync_every and self.updates % self.sync_every == 0:
                self.sync()
        else:
            self.store.record(slots, values, self.ema_decay)

    def pending_updates(self) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=distributed.UPDATE)

    def sync(self) -> int:
        """Exchange the pending updates with every rank (a collective); see ``ib.sync_scores``."""
        if distributed.world()[1] == 1:
            self.pending.clear()
            return 0
        packed = self.pending_updates()
        self.pending.clear()

        def apply(slots: np.ndarray, values: np.ndarray) -> None:
            if self.writer:
                self.store.record(slots, values, self.ema_decay)

        exchanged = distributed.exchange_updates(packed, apply)
        distributed.barrier()  # a node's writer has applied everything before any local rank reads
        return exchanged

    def restore(self, slots: np.ndarray, losses: np.ndarray, updates: int) -> None:
        """Take back the pending updates and update count a state saved."""
        self.pending = [distributed.pack_updates(slots, losses)] if len(slots) else []
        self.updates = updates

    def __getstate__(self) -> dict[str, Any]:  # loader workers never record scores
        return {**self.__dict__, "pending": []}
