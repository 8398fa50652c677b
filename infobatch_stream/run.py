"""The parts of one run, built once and shared by its jobs (epochs, scoring, checkpoints).

``InfoBatch`` builds a :class:`Run` and hands it to plain functions: :func:`start_epoch` here,
``resume.state_of`` / ``resume.restore`` for checkpoints. Each job sees the parts it uses by
name, and none of them takes the ``InfoBatch`` object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from . import building, distributed
from .control import EpochControl
from .inbox import Inbox
from .index import DatasetIndex
from .meta import index_tag
from .planner import EpochPlan, plan_epoch
from .scoring import ScoreExchange
from .settings import RunSettings
from .stats import EpochBook, EpochStats, planned_stats
from .store import ScoreStore
from .worker import WorkerView

log = logging.getLogger("infobatch_stream.infobatch")


@dataclass
class Run:
    index: DatasetIndex
    settings: RunSettings
    tag: int  # the index's tag in every sample's metadata
    store: ScoreStore  # shared by the node's local ranks when share_store
    plan: EpochPlan  # the frozen keep/boost bits of the current epoch
    control: EpochControl  # what the training process publishes to loader workers
    scores: ScoreExchange  # this rank's updates on their way into the store
    book: EpochBook  # per-epoch figures and warnings
    view: WorkerView  # what loader workers use (the stages get this)
    writer: bool  # this process writes the (shared) store and plan
    shared_by_all: bool  # one store and plan for every rank (one node, or one process)
    epoch: int = -1
    inbox: Inbox = field(init=False)  # update()'s batches until their scores are on the host

    @classmethod
    def create(cls, index: DatasetIndex, settings: RunSettings) -> Run:
        """Allocate the store and plan (once per node when ``share_store``) and the rest."""
        n, tag = index.num_samples, index_tag(index.fingerprint)

        def allocate() -> list:
            return [ScoreStore.create(n).shared, EpochPlan.create(n).shared]

        if settings.share_store:
            shared, writer, by_all = distributed.share_per_node(allocate)
        else:
            shared, writer, by_all = allocate(), True, distributed.world()[1] == 1
        store, plan = ScoreStore(shared[0]), EpochPlan(shared[1], n)
        control = EpochControl.create(index.num_shards)
        scores = ScoreExchange(store, writer, settings.ema_decay, settings.sync_every)
        view = WorkerView(index, settings.config, settings.remainder, tag, control, plan, store)
        book = EpochBook()
        run = cls(index, settings, tag, store, plan, control, scores, book, view, writer, by_all)
        run.inbox = Inbox(run.record, n, tag, index.path or "<memory>", settings.config)
        return run

    def record(self, slots: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> None:
        """A batch's scores, on the host: into the store (or the exchange), and into the counts."""
        finite = np.isfinite(values)
        self.scores.add(slots[finite], values[finite])
        self.book.count(epochs, finite, self.epoch, self.control.repeats)

    def collect_io(self) -> None:
        """The loader workers' I/O counters into the current epoch's figures."""
        self.book.add_io(self.epoch, self.control.io_totals(), self.control.repeats)


def complete_index(run: Run) -> None:
    """An index built during epoch 0 is completed before any later epoch (a collective: every
    rank's ``index.building`` is alike, the ranks agreed on the index first)."""
    if run.index.building is not None:
        run.index = run.view.index = building.complete(run.index, run.writer)


def start_epoch(run: Run, epoch: int) -> EpochStats:
    """Freeze the threshold, plan ``epoch`` and publish it (``ib.set_epoch`` after the ranks agreed)."""
    config = run.settings.config
    if epoch < 0:
        raise ValueError(f"set_epoch({epoch}): epochs start at 0")
    if epoch < run.epoch:
        raise ValueError(
            f"set_epoch({epoch}) goes backwards from epoch {run.epoch}: the scores already hold later "
            "epochs' losses; create a new InfoBatch to start the run over"
        )
    if epoch >= config.num_epochs:
        run.book.warn_once(
            "past_end",
            epoch,
            f"set_epoch({epoch}) is past num_epochs={config.num_epochs}: it streams the full "
            "data like the final epochs; pass the real number of epochs to InfoBatch",
        )
    current = run.book.epochs.get(epoch)
    trained_here = epoch == run.epoch and current is not None and current.trained > 0
    if distributed.any_rank(trained_here):  # same branch on every rank: the rest is collective
        log.info("set_epoch(%d) again after training in it: keeping its frozen plan", epoch)
        return run.book.epochs[epoch]
    run.collect_io()
    run.scores.sync()
    if epoch >= 1:
        complete_index(run)
    summary = plan_epoch(
        run.store.scores,
        run.index,
        config,
        epoch,
        run.plan,
        plan_is_shared_by_all=run.shared_by_all,
        writer=run.writer,
    )
    rank, world_size = distributed.world()
    stats = planned_stats(epoch, summary, run.index.num_samples, world_size, run.settings.remainder)
    run.book.epochs[epoch] = stats
    run.control.publish(epoch, summary.threshold, summary.kept_per_shard, rank, world_size)
    run.view.announced.clear()
    run.epoch = epoch
    return stats
