"""Who reads what in an epoch: the epoch's kept samples split evenly over ranks and workers.

The kept set of an epoch is known when it starts (``kept_per_shard``). Lay the kept samples out
in the epoch's shard order and cut that line into equal pieces: rank ``r`` gets positions
``[r * n, (r + 1) * n)``, and each rank's piece is cut the same way over its loader workers.
Every rank therefore yields exactly ``n`` samples, split over its workers in the same sizes as
every other rank, so every rank makes the same number of batches and a DDP all-reduce never
waits on a rank that ran out of data. The cut may fall inside a shard: the skip-aware reader
then reads only that worker's kept samples of it, so a split shard costs no extra bytes.

When the kept count ``K`` does not divide by the world size there is a remainder:

- ``"pad"`` (default, like ``DistributedSampler``): ``n = ceil(K / W)``; the last ranks read the
  first ``W * n - K`` samples of the epoch a second time. Every kept sample is trained.
- ``"drop"``: ``n = floor(K / W)``; the last ``K mod W`` samples of the epoch are not read.

Either way at most ``W - 1`` samples per epoch differ from a single-process run.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

REMAINDERS = ("pad", "drop")


class Part(NamedTuple):
    """A worker's share of one shard: the shard's kept samples ``[first, stop)`` (kept ordinals).

    ``first == stop`` marks a shard with nothing kept that this worker accounts for (skipped).
    """

    shard: int
    first: int
    stop: int


def samples_per_rank(kept: int, world_size: int, remainder: str = "pad") -> int:
    """Samples every rank yields in an epoch of ``kept`` samples."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if remainder == "drop":
        return kept // world_size
    return -(-kept // world_size)


def split_sizes(n: int, parts: int) -> np.ndarray:
    """``n`` split into ``parts`` sizes differing by at most one, larger ones first."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return sizes


def num_batches(n: int, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
    """Batches a loader makes of ``n`` samples when each of its workers batches its own share."""
    sizes = split_sizes(n, max(num_workers, 1))
    if drop_last:
        return int((sizes // batch_size).sum())
    return int((-(-sizes // batch_size)).sum())


def assign(
    order: np.ndarray,
    kept_per_shard: np.ndarray,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    remainder: str = "pad",
) -> list[Part]:
    """The parts worker ``worker`` of rank ``rank`` reads, in the epoch's shard order."""
    counts = np.asarray(kept_per_shard, dtype=np.int64)[order]
    bounds = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    total = int(bounds[-1])
    if total == 0:
        return [Part(int(s), 0, 0) for s in order] if rank == 0 and worker == 0 else []
    n = samples_per_rank(total, world_size, remainder)
    sizes = split_sizes(n, max(num_workers, 1))
    a = rank * n + int(sizes[:worker].sum())
    b = a + int(sizes[worker])
    last = rank == world_size - 1 and worker == max(num_workers, 1) - 1
    parts: list[Part] = []
    first_lap = False
    for lap in range(a // total, -(-b // total)):  # more than one lap: padding wraps to the start
        lo, hi = max(a - lap * total, 0), min(b - lap * total, total)
        # shards with nothing kept are accounted once, by the worker whose first-lap range holds
        # their position; the last worker takes those at the end (and a dropped tail)
        parts += _parts(order, counts, bounds, lo, hi, empties=lap == 0, to_end=lap == 0 and last)
        first_lap |= lap == 0
    if last and not first_lap:
        end = min(a, total)
        parts += _parts(order, counts, bounds, end, end, empties=True, to_end=True)
    return parts


def _parts(
    order: np.ndarray, counts: np.ndarray, bounds: np.ndarray, lo: int, hi: int, empties: bool, to_end: bool
) -> list[Part]:
    """Parts covering kept positions ``[lo, hi)`` of the epoch line (vectorised over shards)."""
    i0 = max(int(np.searchsorted(bounds, lo, side="left")) - 1, 0)
    i1 = len(order) if to_end else min(int(np.searchsorted(bounds, hi, side="left")), len(order))
    idx = np.arange(i0, i1)
    first = np.maximum(lo - bounds[idx], 0)
    stop = np.minimum(hi, bounds[idx + 1]) - bounds[idx]
    keep = (stop > first) & (counts[idx] > 0)
    if empties:  # shards with nothing kept whose position falls in this range
        pos = bounds[idx]
        keep |= (counts[idx] == 0) & (pos >= lo) & ((pos < hi) | to_end)
    idx, first, stop = idx[keep], first[keep], np.maximum(stop[keep], first[keep])
    return [Part(s, f, e) for s, f, e in zip(order[idx].tolist(), first.tolist(), stop.tolist())]


def within_part(keep: np.ndarray, part: Part | tuple[int, int, int]) -> np.ndarray:
    """``keep`` narrowed to the shard's kept samples ``[part.first, part.stop)`` (kept ordinals)."""
    _, first, stop = part
    ordinal = np.cumsum(keep) - 1
    return keep & (ordinal >= first) & (ordinal < stop)
