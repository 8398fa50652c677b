"""The score store: one float32 per slot in shared memory, NaN = never seen.

4 bytes per sample (a billion samples fit in 4 GB of one node's RAM). Writes from the training
process are visible to every DataLoader worker at once because all map the same pages.
"""

from __future__ import annotations

import numpy as np

from .shm import SharedArray


class ScoreStore:
    """The score of every sample, indexed by slot: its last loss, or a moving average of its losses."""

    def __init__(self, shared: SharedArray) -> None:
        self._shared = shared

    @classmethod
    def create(cls, num_slots: int) -> ScoreStore:
        return cls(SharedArray.create(num_slots, np.dtype(np.float32), fill=np.nan, tag="scores"))

    @property
    def shared(self) -> SharedArray:
        return self._shared

    @property
    def scores(self) -> np.ndarray:
        """The live shared array (writes go straight to every process)."""
        return self._shared.array

    def __len__(self) -> int:
        return self._shared.length

    @property
    def nbytes(self) -> int:
        return self._shared.nbytes

    def record(self, slots: np.ndarray, values: np.ndarray, ema_decay: float = 0.0) -> None:
        """Store finite per-sample losses as the scores of their slots.

        With ``ema_decay`` ``d > 0`` a seen score becomes ``d * score + (1 - d) * loss`` (an
        unseen one takes the loss): noisy losses (a random diffusion timestep, a random mask)
        then rank samples by their typical loss, not their last draw. A slot twice in one call
        keeps one of its values."""
        slots = np.asarray(slots, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        if ema_decay:
            old = self.scores[slots]
            values = np.where(np.isnan(old), values, np.float32(ema_decay) * old + np.float32(1 - ema_decay) * values)
        self.scores[slots] = values

    def num_seen(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.scores)))
