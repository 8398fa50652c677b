"""InfoBatch's pruning rules as pure numpy functions over a slice of the score store.

Every decision is a function of ``(scores, threshold, seed, epoch, slot)``: no state, no global
RNG. That is what makes the kept set identical in any worker, rank, process or restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

PLAN_BLOCK = 1 << 20  # slots per planning block (planner.BLOCK): a multiple of 8, so blocks start on plan bytes

log = logging.getLogger(__name__)

MAX_PRUNE_RATIO = 0.9  # the official code's cap: beyond it the 1/(1-r) weights explode

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class PruneConfig:
    """What decides an epoch's plan besides the scores."""

    num_epochs: int
    prune_ratio: float = 0.5
    delta: float = 0.875
    seed: int = 0
    block_size: int = 1  # samples of a shard dropped together (1 = per-sample decisions)

    def __post_init__(self) -> None:
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got {self.delta}")
        if int(self.block_size) != self.block_size or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size}")
        if self.prune_ratio > MAX_PRUNE_RATIO:
            log.warning(
                "prune_ratio %.3f capped at %.1f as in the official InfoBatch", self.prune_ratio, MAX_PRUNE_RATIO
            )

    @property
    def ratio(self) -> float:
        """The drop probability actually used: ``prune_ratio`` capped at 0.9."""
        return min(float(self.prune_ratio), MAX_PRUNE_RATIO)

    @property
    def boost(self) -> float:
        """Loss weight of a kept well-learned sample, ``1 / (1 - r)``."""
        return 1.0 / (1.0 - self.ratio)

    def prunes(self, epoch: int) -> bool:
        return prunes_in_epoch(epoch, self.num_epochs, self.delta)


def prunes_in_epoch(epoch: int, num_epochs: int, delta: float) -> bool:
    """Epochs with ``epoch + 1 > delta * num_epochs`` stream the full data (the annealing phase)."""
    return not (epoch + 1 > delta * num_epochs)


def threshold(scores: np.ndarray) -> float:
    """Mean of the seen (non-NaN) scores, accumulated in float64; NaN when nothing is seen yet."""
    total, n = seen_sum_count(scores)
    return total / n if n else float("nan")


def block_ids(slots: np.ndarray, first_slot: np.ndarray | int, block_size: int) -> np.ndarray:
    """What the drop coin is hashed on: the slot, or the block of ``block_size`` consecutive
    samples of its shard (``first_slot``: the shard's first slot). Ids stay unique over the
    dataset because a shard's block ids lie inside its own slot range."""
    slots = np.asarray(slots, dtype=np.int64)
    if block_size == 1:
        return slots
    return first_slot + (slots - first_slot) // block_size


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective avalanche mix of 64-bit integers."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """A counter-based uniform in [0, 1) for each id: the same in every process, no RNG state."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * _GOLDEN + np.uint64(epoch & 0xFFFFFFFF))
        x = _mix(ids * _GOLDEN + key)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def well_learned(scores: np.ndarray, thresh: float) -> np.ndarray:
    """Seen and below the frozen threshold; unseen (NaN) samples never are."""
    scores = np.asarray(scores)
    if np.isnan(thresh):
        return np.zeros(scores.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        # Compare in float64: a Python-float threshold against float32 scores would be rounded
        # to float32 first (NEP 50) and misjudge scores within half a float32 step of it.
        return scores < np.float64(thresh)  # NaN < x is False


def decide(
    scores: np.ndarray,
    slots: np.ndarray,
    thresh: float,
    epoch: int,
    config: PruneConfig,
    coin_ids: np.ndarray | None = None,
    learned: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask and boosted mask (kept and well-learned: weight ``1/(1-r)``) for some slots.

    ``coin_ids`` (default: the slots) are what the drop coin is hashed on; samples sharing an
    id are dropped together, which keeps every sample's marginal drop probability at ``r``.
    ``learned`` may pass ``well_learned(scores, thresh)`` when the caller already has it.
    """
    slots = np.asarray(slots)
    scores = np.asarray(scores)
    if len(scores) != len(slots) or (coin_ids is not None and len(coin_ids) != len(slots)):
        raise ValueError(f"decide(): {len(scores)} scores for {len(slots)} slots; pass one score and one id per slot")
    if not config.prunes(epoch) or config.ratio == 0.0:
        n = len(slots)
        return np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    if learned is None:
        learned = well_learned(scores, thresh)
    ids = slots if coin_ids is None else np.asarray(coin_ids)
    candidates = np.flatnonzero(learned)  # only well-learned samples need a coin
    dropped = np.zeros(len(slots), dtype=bool)
    dropped[candidates] = uniform(config.seed, epoch, ids[candidates]) < config.ratio
    return ~dropped, learned & ~dropped


def seen_sum_count(scores: np.ndarray) -> tuple[float, int]:
    """Sum (float64) and count of the seen scores of a chunk: ``threshold`` in pieces."""
    scores = np.asarray(scores)
    seen = ~np.isnan(scores)
    return float(np.sum(scores, where=seen, dtype=np.float64)), int(np.count_nonzero(seen))


def weights(boosted: np.ndarray, config: PruneConfig) -> np.ndarray:
    return np.where(boosted, config.boost, 1.0)
