"""The training side of the scores: recording them, and exchanging them between ranks.

With one process the losses go into the store at once. With a process group the store changes
only when the ranks exchange their updates (at ``set_epoch``, every ``sync_every`` updates, or on
``sync_scores()``), applied by every node's writer in the same order, so all stores stay identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import distributed
from .store import ScoreStore


class ScoreExchange:
    """This rank's score updates on their way into the store (see the module docstring)."""

    def __init__(self, store: ScoreStore, writer: bool, ema_decay: float, sync_every: int | None) -> None:
        self.store, self.writer, self.ema_decay, self.sync_every = store, writer, ema_decay, sync_every
        self.pending: list[np.ndarray] = []  # this rank's (slot, loss) updates since the last exchange
        self.updates = 0  # update() calls, for sync_every
        self.due = False  # sync_every updates recorded: exchange at the next update() (on every rank)

    def add(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Record one batch's finite values (into the store now, or for the next exchange)."""
        if distributed.world()[1] > 1:  # the store changes only when ranks exchange: all stay identical
            self.pending.append(distributed.pack_updates(slots, values))
            self.updates += 1
            if self.sync_every and self.updates % self.sync_every == 0:
                self.due = True
        else:
            self.store.record(slots, values, self.ema_decay)

    def sync_if_due(self) -> None:
        """Exchange when ``sync_every`` updates are recorded. Only ``update()`` calls it: every rank
        makes the same calls, whereas a batch may land in a flush that only one rank makes
        (``state_dict`` on rank 0), where a collective would hang."""
        if self.due:
            self.sync()

    def pending_updates(self) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=distributed.UPDATE)

    def sync(self) -> int:
        """Exchange the pending updates with every rank (a collective); see ``ib.sync_scores``."""
        if distributed.world()[1] == 1:
            self.pending.clear()
            self.due = False
            return 0
        packed = self.pending_updates()
        self.pending.clear()
        self.due = False

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
