"""What a DataLoader worker needs of an InfoBatch run, and nothing else.

The pipeline stages (:mod:`.stages`), the reader (:mod:`.reader`) and the resumable dataset
(:mod:`.dataset`) run in loader workers, forked or spawned. They need the index, the settings
that decide which samples are kept, the shared-memory epoch control block, the frozen plan and
the score store, plus this process's record of the shards ``ib.shards()`` handed out. They never
run collectives, record scores or write checkpoints: that is the training process's side
(:class:`~infobatch_stream.InfoBatch`). A :class:`WorkerView` is that small, picklable part,
built by ``InfoBatch`` and handed to every stage, so dependencies run one way: rules, index and
shared memory -> worker view -> stages, reader, dataset -> ``InfoBatch``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from . import policy
from .announce import Announcements
from .control import EpochControl
from .index import DatasetIndex
from .planner import EpochPlan, coin_ids
from .store import ScoreStore

log = logging.getLogger(__name__)


@dataclass
class WorkerView:
    """The read-only side of a run that loader workers use (see the module docstring)."""

    index: DatasetIndex
    config: policy.PruneConfig
    remainder: str
    tag: int  # 23 bits of the index fingerprint, carried in every sample's __ib__
    control: EpochControl
    plan: EpochPlan
    store: ScoreStore
    announced: Announcements = field(default_factory=Announcements)  # per process: ib.shards() -> reader

    def refresh_index(self) -> None:
        """A worker that outlives epoch 0 (``persistent_workers``) of an index built during it
        switches to the saved index: the training process completes it before epoch 1."""
        building = self.index.building
        if building is not None and self.control.epoch >= 1:
            self.index = DatasetIndex.load(building.output, allow_pipes=True)

    def begin_pass(self) -> tuple[int, float]:
        """Called when a pass starts in a worker: the epoch and threshold to use."""
        self.refresh_index()
        control = self.control
        epoch = control.epoch
        worker = current_worker()
        if control.begin_pass(worker) and worker == 0:
            log.warning(
                "a new pass over the loader started without ib.set_epoch(): it replays epoch %d's plan; "
                "call ib.set_epoch(epoch) before each pass",
                epoch,
            )
        return epoch, control.threshold

    def decide_shard(self, shard: int, epoch: int, thresh: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep and boosted masks of one shard.

        For the published epoch they come from the plan frozen by ``set_epoch`` (so a shard
        opened twice gets the same samples); for any other ``(epoch, thresh)`` they are computed
        from the store's slice, vectorised.
        """
        lo, hi = self.index.slots(shard)
        control = self.control
        published = control.threshold
        if epoch == control.epoch and (thresh == published or (np.isnan(thresh) and np.isnan(published))):
            return self.plan.read(lo, hi)
        slots = np.arange(lo, hi)
        ids = coin_ids(slots, self.index, self.config)
        return policy.decide(np.asarray(self.store.scores[lo:hi]), slots, thresh, epoch, self.config, ids)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["announced"] = Announcements()  # what one process was handed means nothing in another
        return state


def loader_worker() -> tuple[int, int]:
    """``(worker, num_workers)`` of the DataLoader worker running this code; ``(0, 1)`` outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def current_worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id
