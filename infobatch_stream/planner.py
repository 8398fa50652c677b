"""Planning an epoch: its threshold, a keep/boost decision for every slot, kept counts per shard.

Slots are planned in blocks of ``BLOCK``. With several ranks each plans a contiguous slice of the
blocks and the ranks combine their figures with ``all_reduce``, so planning costs ``N / W`` per
rank instead of ``N``. Ranks sharing a node's plan write their slices into it directly; ranks on
other nodes receive the bits (0.25 bytes per sample) through the chunked gather.

The threshold is the float64 sum of per-block sums taken in block order, whoever computed each
block: the same bits for any world size, so the kept set of an epoch does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import distributed, policy
from .balance import split_sizes
from .index import DatasetIndex
from .shm import SharedArray

BLOCK = policy.PLAN_BLOCK  # slots per planning block: a multiple of 8, so blocks start on plan bytes


@dataclass(frozen=True)
class PlanSummary:
    threshold: float  # NaN until some sample has a score
    seen: int
    well_learned: int
    kept_per_shard: np.ndarray


def block_slice(num_blocks: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous blocks ``[b0, b1)`` that ``rank`` plans."""
    sizes = split_sizes(num_blocks, world_size)
    b0 = int(sizes[:rank].sum())
    return b0, b0 + int(sizes[rank])


def coin_ids(slots: np.ndarray, index: DatasetIndex, config: policy.PruneConfig) -> np.ndarray:
    """What each slot's drop coin is hashed on: the slot, or its block of ``config.block_size``."""
    if config.block_size == 1:
        return slots
    first = index.shard_first[index.shard_of_slot(slots)]
    return policy.block_ids(slots, first, config.block_size)


def _add_kept_per_shard(totals: np.ndarray, shard_first: np.ndarray, lo: int, keep: np.ndarray) -> None:
    """Add the kept samples of slots ``[lo, lo + len(keep))`` to their shards' counts."""
    hi = lo + len(keep)
    s0 = int(np.searchsorted(shard_first, lo, side="right")) - 1
    s1 = int(np.searchsorted(shard_first, hi, side="left"))
    running = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=running[1:])
    cuts = np.clip(shard_first[s0 : s1 + 1] - lo, 0, len(keep))
    totals[s0:s1] += running[cuts[1:]] - running[cuts[:-1]]


def plan_epoch(
    scores: np.ndarray,
    index: DatasetIndex,
    config: policy.PruneConfig,
    epoch: int,
    plan: EpochPlan,
    *,
    plan_is_shared_by_all: bool,
    writer: bool,
) -> PlanSummary:
    """Plan ``epoch`` from ``scores`` into ``plan`` (a collective when there are several ranks;
    every rank's ``scores`` must already be identical: ``sync_scores`` first)."""
    rank, world_size = distributed.world()
    n = len(scores)
    num_blocks = max(-(-n // BLOCK), 1)
    b0, b1 = block_slice(num_blocks, rank, world_size)
    sums = np.zeros(num_blocks, dtype=np.float64)
    counts = np.zeros(num_blocks, dtype=np.int64)
    for b in range(b0, b1):
        sums[b], counts[b] = policy.seen_sum_count(scores[b * BLOCK : (b + 1) * BLOCK])
    sums, counts = distributed.all_reduce_sum(sums), distributed.all_reduce_sum(counts)  # one term per entry: exact
    seen = int(counts.sum())
    thresh = float(np.sum(sums)) / seen if seen else float("nan")
    totals = np.zeros(index.num_shards + 1, dtype=np.int64)  # kept per shard, then well-learned
    for b in range(b0, b1):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, n)
        chunk = np.asarray(scores[lo:hi])
        slots = np.arange(lo, hi)
        learned = policy.well_learned(chunk, thresh)
        keep, boosted = policy.decide(chunk, slots, thresh, epoch, config, coin_ids(slots, index, config), learned)
        plan.write(lo, keep, boosted)
        _add_kept_per_shard(totals, index.shard_first, lo, keep)
        totals[-1] += int(np.count_nonzero(learned))
    totals = distributed.all_reduce_sum(totals)
    if not plan_is_shared_by_all:
        _gather_plan_bits(plan, n, num_blocks, world_size, (b0 * BLOCK, min(b1 * BLOCK, n)), writer)
    distributed.barrier()  # the plan is complete before any rank publishes the epoch
    return PlanSummary(thresh, seen, int(totals[-1]), totals[:-1])


def _gather_plan_bits(
    plan: EpochPlan, n: int, num_blocks: int, world_size: int, mine: tuple[int, int], writer: bool
) -> None:
    """Every rank's slice of the plan bits into every node's plan (written by its writer)."""
    ranges = []
    for r in range(world_size):
        b0, b1 = block_slice(num_blocks, r, world_size)
        ranges.append((b0 * BLOCK, min(b1 * BLOCK, n)))

    def apply(rank: int, offset: int, chunk: np.ndarray) -> None:
        if writer:
            plan.write_packed(*ranges[rank], offset, chunk)

    distributed.all_gather_bytes(plan.packed(*mine) if mine[1] > mine[0] else np.zeros(0, np.uint8), apply)


class EpochPlan:
    """The published epoch's keep and boosted decisions, two bits per slot in shared memory.

    Frozen by ``set_epoch``: a shard opened twice in an epoch (a repeated pass, a shard listed
    twice) gets the same samples however the scores moved since, and a restored checkpoint can
    republish it as it was. 0.25 bytes per sample next to the store's 4. Layout: the keep bits of
    all slots, then the boosted bits.
    """

    def __init__(self, shared: SharedArray, num_slots: int) -> None:
        self._shared = shared
        self.num_slots = num_slots
        self._nbytes = (num_slots + 7) // 8

    @classmethod
    def create(cls, num_slots: int) -> EpochPlan:
        return cls(SharedArray.create(2 * ((num_slots + 7) // 8), np.uint8, tag="plan"), num_slots)

    @property
    def shared(self) -> SharedArray:
        return self._shared

    def write(self, lo: int, keep: np.ndarray, boosted: np.ndarray) -> None:
        """Store decisions for slots ``[lo, lo + len(keep))``; ``lo`` must be a multiple of 8."""
        assert lo % 8 == 0, "plan chunks start on a byte boundary"
        a = self._shared.array
        b0 = lo // 8
        packed_keep, packed_boost = np.packbits(keep), np.packbits(boosted)
        a[b0 : b0 + len(packed_keep)] = packed_keep
        a[self._nbytes + b0 : self._nbytes + b0 + len(packed_boost)] = packed_boost

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        a = self._shared.array
        b0, b1, skip = lo // 8, (hi + 7) // 8, lo % 8
        keep = np.unpackbits(a[b0:b1])[skip : skip + hi - lo].astype(bool)
        boosted = np.unpackbits(a[self._nbytes + b0 : self._nbytes + b1])[skip : skip + hi - lo].astype(bool)
        return keep, boosted

    def packed(self, lo: int, hi: int) -> np.ndarray:
        """The bytes of slots ``[lo, hi)`` (``lo`` a multiple of 8): keep bytes, then boosted bytes."""
        a = self._shared.array
        b0, b1 = lo // 8, (hi + 7) // 8
        return np.concatenate([a[b0:b1], a[self._nbytes + b0 : self._nbytes + b1]])

    def write_packed(self, lo: int, hi: int, offset: int, chunk: np.ndarray) -> None:
        """Write bytes ``[offset, offset + len(chunk))`` of what :meth:`packed` gave for ``[lo, hi)``."""
        a = self._shared.array
        b0, width = lo // 8, (hi + 7) // 8 - lo // 8
        end = offset + len(chunk)
        if offset < width:  # keep bytes
            k = min(end, width)
            a[b0 + offset : b0 + k] = chunk[: k - offset]
        if end > width:  # boosted bytes
            start = max(offset, width)
            a[self._nbytes + b0 + start - width : self._nbytes + b0 + end - width] = chunk[start - offset :]

    @property
    def nbytes(self) -> int:
        return self._shared.nbytes
