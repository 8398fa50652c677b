"""What ``ib.shards()`` handed this process's worker, for the reader or filter downstream.

The source stage and the reading stage of one pipeline run in the same process; this record lets
the reader know which part of a shard it was given (a shard cut between ranks or workers) and
notice shards that a stage in between dropped, repeated or added.
"""

from __future__ import annotations

from collections import deque

from .balance import Part
from .errors import ShardAssignmentError


class Announcements:
    """What ``ib.shards()`` handed this worker, for ``ib.filter()`` in the same process.

    Keyed by the shard the URL resolves to (so a URL rewritten on the way still matches), first
    in first out (so a shard listed twice gets its parts in order)."""

    def __init__(self) -> None:
        self.active = False  # ib.shards() runs in this process's current pass
        self.passes = 0  # passes of ib.shards() started in this process
        self._parts: dict[int, deque[Part]] = {}

    def start(self) -> None:
        self.active = True
        self.passes += 1
        self._parts.clear()

    def started_since(self, mark: int) -> bool:
        """Whether ib.shards() started a pass after ``mark`` (``passes`` when the caller's pass
        began) and it is still the one announced: otherwise what is queued belongs to a pass that
        ended without reaching its end (an error), not to the caller's."""
        return self.active and self.passes != mark

    def clear(self) -> None:
        self.active = False
        self._parts.clear()

    def push(self, key: int, part: Part) -> None:
        self._parts.setdefault(key, deque()).append(part)

    def pop(self, key: int) -> Part | None:
        queued = self._parts.get(key)
        return queued.popleft() if queued else None

    def check_all_read(self, where: str, mark: int) -> None:
        """At the end of a pass: every shard ``ib.shards()`` handed this worker must have arrived.
        A stage that drops shards (``wds.split_by_worker``, ``wds.split_by_node``) loses their
        samples silently, and unequal ranks hang DDP."""
        if not self.started_since(mark):
            return
        missing = [part for queued in self._parts.values() for part in queued]
        if missing:
            raise ShardAssignmentError(
                f"{len(missing)} of the shards ib.shards() handed this worker never reached {where} (e.g. shard "
                f"{missing[0].shard}): a stage between them dropped them. ib.shards() already splits the epoch over "
                "ranks and loader workers: remove wds.split_by_worker / wds.split_by_node (or any other splitter) "
                "from the pipeline. (With ib.filter(), a shard that failed to open and was skipped by a handler= "
                "also ends here: read with ib.tarfile_to_samples(handler=...), which counts skipped shards.)"
            )
