"""The figures of one epoch, as ``ib.stats()`` reports them and states save them.

Apart from :class:`~infobatch_stream.InfoBatch` so that readers of saved runs (``infobatch-stream
report``) need neither torch nor the training machinery.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

import numpy as np

from .balance import samples_per_rank

log = logging.getLogger("infobatch_stream.infobatch")  # the name warnings were logged under


@dataclass
class EpochStats:
    """What happened in one epoch. Planned figures are exact when the epoch starts."""

    epoch: int
    threshold: float | None  # None until some sample has a score
    total: int
    seen: int  # samples with a score when the epoch started
    well_learned: int
    pruned: int
    kept: int
    trained: int = 0  # per-sample losses update() received for this epoch
    nonfinite: int = 0  # of those, NaN or inf: not stored
    repeated_passes: int = 0  # passes over the loader started without set_epoch (replaying this plan)
    bytes_read: int = 0  # by ib.tarfile_to_samples(), over all workers
    bytes_skipped: int = 0  # shard bytes not read (pruned samples, unread tails, skipped shards)
    requests: int = 0  # reads: seeks+reads on local files, Range requests over HTTP
    shards_read: int = 0
    shards_skipped: int = 0  # shards with nothing kept: never opened
    shards_failed: int = 0  # shards given up on an error the handler= chose to skip (e.g. warn_and_continue)
    per_rank: int = 0  # samples each rank yields (all ranks equal)
    padded: int = 0  # remainder="pad": samples read twice so every rank gets per_rank
    dropped: int = 0  # remainder="drop": kept samples no rank reads


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the caller of this function,
    point at the first frame outside this package: the user's line, however deep the call."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class EpochBook:
    """The run's per-epoch figures and the warnings about them (each kind once per epoch)."""

    def __init__(self) -> None:
        self.epochs: dict[int, EpochStats] = {}
        self._warned: set[tuple[str, int]] = set()

    def warn_once(self, kind: str, epoch: int, message: str) -> None:
        if (kind, epoch) not in self._warned:
            self._warned.add((kind, epoch))
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())

    def count(self, epochs: np.ndarray, finite: np.ndarray, current: int, repeats: int) -> None:
        """Count one batch's trained samples (``epochs``: each sample's epoch) and non-finite losses."""
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            stats = self.epochs.get(epoch)
            if stats is None or epoch != current:
                self.warn_once(
                    "stale",
                    epoch,
                    f"update() got samples of epoch {epoch} while epoch {current} is current: "
                    "was set_epoch() called while an old loader iterator was still running?",
                )
            if stats is None:
                continue
            stats.trained += int(np.count_nonzero(mask))
            bad = int(np.count_nonzero(mask & ~finite))
            if bad:
                stats.nonfinite += bad
                self.warn_once(
                    "nonfinite",
                    epoch,
                    f"epoch {epoch}: {bad} non-finite per-sample losses were not stored as scores; "
                    "see ib.stats()['nonfinite'] for the running count",
                )
        if repeats and current in self.epochs:
            self.warn_once(
                "repeat",
                current,
                f"epoch {current} is being read again without set_epoch(): the same samples are "
                "kept as in its first pass; call ib.set_epoch(epoch) before each pass",
            )

    def add_io(self, epoch: int, io_totals: dict[str, int], repeats: int) -> None:
        """Copy the workers' I/O counters of ``epoch`` (summed over workers) into its figures."""
        stats = self.epochs.get(epoch)
        if stats is None:
            return
        for name, value in io_totals.items():
            setattr(stats, name, value)
        stats.repeated_passes = repeats

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(self.epochs[e]) for e in sorted(self.epochs)]

    def split(self, epoch: int, world_size: int, remainder: str) -> None:
        """Set ``epoch``'s split over ranks for this job's world size (after a resume)."""
        current = self.epochs.get(epoch)
        if current is not None:
            current.per_rank = samples_per_rank(current.kept, world_size, remainder)
            current.padded = max(current.per_rank * world_size - current.kept, 0)
            current.dropped = max(current.kept - current.per_rank * world_size, 0)

    def __getstate__(self) -> dict[str, Any]:  # loader workers get a copy of InfoBatch: not its figures
        return {"epochs": {}, "_warned": set()}


def planned_stats(epoch: int, summary: Any, total: int, world_size: int, remainder: str) -> EpochStats:
    """An epoch's figures as planned (``summary``: :class:`~infobatch_stream.planner.PlanSummary`)."""
    thresh, kept = summary.threshold, int(summary.kept_per_shard.sum())
    per_rank = samples_per_rank(kept, world_size, remainder)
    stats = EpochStats(
        epoch=epoch,
        threshold=None if np.isnan(thresh) else thresh,
        total=total,
        seen=summary.seen,
        well_learned=summary.well_learned,
        pruned=total - kept,
        kept=kept,
        per_rank=per_rank,
        padded=max(per_rank * world_size - kept, 0),
        dropped=max(kept - per_rank * world_size, 0),
    )
    log.info(
        "epoch %d: threshold %.4g, %d seen, %d well-learned, %d pruned, %d kept of %d, %d per rank",
        epoch,
        thresh,
        stats.seen,
        stats.well_learned,
        stats.pruned,
        kept,
        total,
        per_rank,
    )
    return stats
