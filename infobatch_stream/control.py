"""What the training process publishes to its loader workers when an epoch starts.

A small int64 block in shared memory: the epoch, its frozen threshold, the rank and world size,
a generation number that ``set_epoch`` bumps, one "pass started" mark per worker (to catch a
second pass over the loader without ``set_epoch``), per-worker I/O counters, and the planned kept
count of every shard (to split the epoch evenly and skip empty shards).
"""

from __future__ import annotations

import numpy as np

from .shm import SharedArray

MAX_WORKERS = 1024
_GENERATION, _EPOCH, _THRESHOLD, _REPEATS, _RANK, _WORLD = 0, 1, 2, 3, 4, 5
_HEADER = 8
IO_FIELDS = ("bytes_read", "bytes_skipped", "requests", "shards_read", "shards_skipped", "shards_failed")
_IO = len(IO_FIELDS)


class EpochControl:
    """Shared epoch state; cheap to pickle (a path) and read from any worker."""

    def __init__(self, shared: SharedArray) -> None:
        self._shared = shared

    @classmethod
    def create(cls, num_shards: int) -> EpochControl:
        shared = SharedArray.create(_HEADER + MAX_WORKERS * (1 + _IO) + num_shards, np.int64, tag="control")
        shared.array[_HEADER : _HEADER + MAX_WORKERS] = -1
        shared.array[_WORLD] = 1
        return cls(shared)

    @property
    def _a(self) -> np.ndarray:
        return self._shared.array

    @property
    def generation(self) -> int:
        return int(self._a[_GENERATION])

    @property
    def epoch(self) -> int:
        return int(self._a[_EPOCH])

    @property
    def threshold(self) -> float:
        return float(self._a[_THRESHOLD : _THRESHOLD + 1].view(np.float64)[0])

    @property
    def rank(self) -> int:
        """The training process's rank when it published the epoch (workers may have no process group)."""
        return int(self._a[_RANK])

    @property
    def world_size(self) -> int:
        return int(self._a[_WORLD])

    @property
    def repeats(self) -> int:
        """Passes started in this generation by a worker that had already started one."""
        return int(self._a[_REPEATS])

    @property
    def kept_per_shard(self) -> np.ndarray:
        return self._a[_HEADER + MAX_WORKERS * (1 + _IO) :]

    @property
    def _io(self) -> np.ndarray:
        return self._a[_HEADER + MAX_WORKERS : _HEADER + MAX_WORKERS * (1 + _IO)].reshape(MAX_WORKERS, _IO)

    def add_io(self, worker: int, generation: int | None = None, **counts: int) -> None:
        """Add to this worker's I/O counters (each worker writes only its own row). Counts from a
        pass of an older ``generation`` (the tail of an abandoned pass, closed after the next
        epoch was published) are dropped: they belong to no current epoch."""
        if generation is not None and generation != self.generation:
            return
        row = self._io[worker]
        for name, value in counts.items():
            row[IO_FIELDS.index(name)] += value

    def io_totals(self) -> dict[str, int]:
        """I/O of the current generation summed over workers."""
        sums = self._io.sum(axis=0)
        return {name: int(v) for name, v in zip(IO_FIELDS, sums)}

    def publish(
        self, epoch: int, threshold: float, kept_per_shard: np.ndarray, rank: int = 0, world_size: int = 1
    ) -> None:
        """Make a new epoch visible to workers that start a pass after this returns.

        The generation (bumped last) identifies the epoch for the repeated-pass marks."""
        a = self._a
        a[_EPOCH] = epoch
        a[_RANK], a[_WORLD] = rank, world_size
        a[_THRESHOLD : _THRESHOLD + 1].view(np.float64)[0] = threshold
        a[_REPEATS] = 0
        self._io[:] = 0
        self.kept_per_shard[:] = kept_per_shard
        a[_GENERATION] += 1

    def begin_pass(self, worker: int) -> bool:
        """Mark that ``worker`` starts reading; True if it already read in this generation.

        Only worker 0 (present in every pass) counts repeats, so the count is in passes."""
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker id {worker} exceeds the {MAX_WORKERS} supported loader workers")
        slot = _HEADER + worker
        generation = self.generation
        repeated = int(self._a[slot]) == generation
        self._a[slot] = generation
        if repeated and worker == 0:
            self._a[_REPEATS] += 1
        return repeated
