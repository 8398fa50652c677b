"""Several reads in flight per worker, within a byte budget, handed back in order.

On an object store every request waits tens of milliseconds before its first byte, so a worker
that asks for one range at a time spends most of an epoch waiting. :class:`ReadAhead` keeps up
to ``max_inflight`` reads running on a small thread pool (the clients release the GIL) and lets
no more than ``budget`` bytes be requested and not yet consumed: memory per worker stays bounded
however far ahead the reads run. One read larger than the budget still runs, alone.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

DEFAULT_INFLIGHT = 8
DEFAULT_BUDGET = 32 << 20

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """One pool per (process, size): a forked worker must not reuse its parent's threads."""
    key = (os.getpid(), size)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="infobatch-read")
            _pools[key] = pool
        return pool


class ReadAhead:
    """Submit reads while there is room; the caller consumes their results in order."""

    def __init__(self, max_inflight: int = DEFAULT_INFLIGHT, budget: int = DEFAULT_BUDGET) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if budget < 1:
            raise ValueError(f"readahead_bytes must be >= 1, got {budget}")
        self.max_inflight, self.budget = max_inflight, budget
        self.buffered = 0  # bytes requested and not yet released by the consumer
        self.peak = 0
        self._outstanding: deque[Future] = deque()

    def room_for(self, nbytes: int) -> bool:
        """Whether a read of ``nbytes`` may start now."""
        while self._outstanding and self._outstanding[0].done():
            self._outstanding.popleft()
        running = sum(1 for f in self._outstanding if not f.done())
        if running >= self.max_inflight:
            return False
        return self.buffered == 0 or self.buffered + nbytes <= self.budget

    def submit(self, read: Callable[[], Any], nbytes: int) -> Future:
        self.buffered += nbytes
        self.peak = max(self.peak, self.buffered)
        future = _pool(self.max_inflight).submit(read)
        self._outstanding.append(future)
        return future

    def release(self, nbytes: int) -> None:
        """The consumer is done with a read's bytes (or dropped it)."""
        self.buffered -= nbytes
