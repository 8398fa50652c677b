"""The user-facing object: a facade over the index, the shared store, the epoch plan and the run's settings.

Three changed lines on top of a WebDataset loop::

    ib = InfoBatch("index.json", num_epochs=60)
    pipeline = wds.DataPipeline(ib.shards(), wds.tarfile_to_samples(), ib.filter(), ...)
    ...
    ib.set_epoch(epoch)                       # before each pass over the loader
    loss = ib.update(meta, criterion(out, y))  # criterion with reduction="none"

Each job lives in its own module: settings and their agreement across ranks
(:mod:`.settings`), planning (:mod:`.planner`), what loader workers use (:mod:`.worker`),
scores and their exchange (:mod:`.scoring`), per-epoch figures (:mod:`.stats`), resuming
(:mod:`.resume`, :mod:`.checkpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from . import balance
from .balance import Part, assign
from .building import open_index
from .checkpoint import load_state, save_state
from .errors import MetadataError
from .index import DatasetIndex
from .readahead import DEFAULT_BUDGET, DEFAULT_INFLIGHT
from .reader import ReaderStage, ReadOptions
from .resume import MID_EPOCH_SETTINGS, restore, state_of
from .run import Run, start_epoch
from .settings import RunSettings, agree
from .stages import FilterStage, ShardSource, shard_order
from .stats import EpochStats

if TYPE_CHECKING:
    from .dataset import ResumableDataset

__all__ = ["MID_EPOCH_SETTINGS", "EpochStats", "InfoBatch"]
log = logging.getLogger(__name__)


class InfoBatch:
    """InfoBatch for WebDataset shards: prune well-learned samples inline, rescale the rest.

    Args:
        index: a :class:`DatasetIndex`, the path of a saved one (``infobatch-stream index``), or
            the path of a wids shard list with every shard's ``nsamples``: its index is then built
            during epoch 0 by the reader (no indexing pass; see :mod:`.building`) and used from
            epoch 1 on.
        num_epochs: total epochs of the run; the last ``(1 - delta)`` of them prune nothing.
        prune_ratio: probability ``r`` of dropping a well-learned sample (capped at 0.9).
        delta: fraction of the epochs that prune.
        seed: seeds the per-epoch shard order and the drop decisions (no global RNG is touched).
        granularity: ``"sample"``, or ``k``: blocks of ``k`` consecutive samples of a shard whose
            well-learned members are dropped together. Each sample's drop probability and weight
            are unchanged (still unbiased); pruned bytes come in longer runs, so fewer reads.
        remainder: when the epoch's kept count does not divide by the world size, ``"pad"``
            (the last ranks read a few samples twice) or ``"drop"`` (a few are not read).
        sync_every: with several ranks, also exchange scores every this many ``update()`` calls
            (not only at ``set_epoch``): bounds the pending updates and spreads the exchange.
            Every rank must then call ``update()`` equally often (balanced ranks do).
        share_store: let the local ranks of a node share one store and plan (the default); False
            gives every rank its own copy, as ranks on separate nodes have.
        allow_pipes: load an index whose shard URLs are ``pipe:`` shell commands (refused by
            default: only for an index you trust).
        ema_decay: ``0`` (the published rule) scores a sample by its last loss; ``d`` in (0, 1)
            keeps an exponential moving average, ``score = d * score + (1 - d) * loss``, for
            noisy per-sample losses (diffusion timesteps, MAE masks). A sample trained twice
            in one step (padding across ranks) moves its average once per rank that trained it.
        index_path: where the index built from a shard list is saved (default: beside the list,
            ``<list>.index.json``); a run restarted from the list finds it there.

    With ``torch.distributed`` initialised, create it on every rank (it is a collective): the
    local ranks of a node share one store, every rank plans the same epoch, and every rank gets
    the same number of samples. Every rank must pass the same index and settings (all but
    ``allow_pipes``): the ranks compare them, and the epoch at each ``set_epoch``, in one small
    gather, and all raise :class:`SettingsMismatchError` naming what differs where.
    """

    def __init__(
        self,
        index: DatasetIndex | str,
        num_epochs: int,
        prune_ratio: float = 0.5,
        delta: float = 0.875,
        seed: int = 0,
        granularity: str | int = "sample",
        remainder: str = "pad",
        sync_every: int | None = None,
        share_store: bool = True,
        allow_pipes: bool = False,
        ema_decay: float = 0.0,
        index_path: str | None = None,
    ) -> None:
        failure, settings, loaded = None, None, None
        try:  # a rank that fails here tells the others, which would otherwise wait for it below
            loaded = (
                index
                if isinstance(index, DatasetIndex)
                else open_index(index, output=index_path, allow_pipes=allow_pipes)
            )
            settings = RunSettings.checked(
                num_epochs, prune_ratio, delta, seed, granularity, remainder, sync_every, share_store, ema_decay
            )
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            failure = e
        agree("InfoBatch()", settings, loaded, failure=failure)  # the first collective: all agree or all raise
        assert settings is not None and loaded is not None  # agree() raised otherwise
        self.run = run = Run.create(loaded, settings)
        # the parts, by name (the same objects the run's jobs use)
        self.settings, self.config, self.remainder = settings, settings.config, settings.remainder
        self.tag, self.store, self.plan, self.control = run.tag, run.store, run.plan, run.control
        self.scores, self.book, self.view, self.inbox = run.scores, run.book, run.view, run.inbox
        start_epoch(run, 0)

    @property
    def index(self) -> DatasetIndex:
        """The run's index (the built one from epoch 1 on, for a run started from a shard list)."""
        return self.run.index

    @property
    def epoch(self) -> int:
        """The current epoch (the last ``set_epoch``'s)."""
        return self.run.epoch

    # ---- pipeline stages -----------------------------------------------------------------------
    def shards(self) -> ShardSource:
        """Source stage: this epoch's shards in an order drawn from ``(seed, epoch)``; the kept
        samples split evenly over ranks and workers; shards with nothing kept are left out."""
        return ShardSource(self.view)

    def filter(self) -> FilterStage:
        """Stage after ``tarfile_to_samples()``: drops pruned samples, tags kept ones with ``__ib__``."""
        return FilterStage(self.view)

    def tarfile_to_samples(
        self,
        handler: Callable[[Exception], bool] = reraise_exception,
        *,
        merge_gap: int | None = None,
        verify: str = "size+mtime",
        max_inflight: int = DEFAULT_INFLIGHT,
        readahead_bytes: int = DEFAULT_BUDGET,
    ) -> ReaderStage:
        """Drop-in for ``wds.tarfile_to_samples()`` + ``ib.filter()`` that reads only kept bytes.

        ``merge_gap``: pruned bytes worth reading through rather than skipping (default 4 KiB
        locally, 16 KiB remote; see :mod:`infobatch_stream.reader`). ``verify``: compare each
        shard's size and mtime/ETag (``"size+mtime"``) or only its size (``"size"``) with the index.
        ``max_inflight`` requests per worker and ``readahead_bytes`` of buffered data bound the
        read-ahead on object stores and HTTP.
        """
        return ReaderStage(self.view, handler, ReadOptions(merge_gap, verify, max_inflight, readahead_bytes))

    def dataset(
        self,
        *stages: Callable,
        shuffle: int = 0,
        handler: Callable[[Exception], bool] = reraise_exception,
        merge_gap: int | None = None,
        verify: str = "size+mtime",
        max_inflight: int = DEFAULT_INFLIGHT,
        readahead_bytes: int = DEFAULT_BUDGET,
    ) -> ResumableDataset:
        """This rank's and worker's share of the epoch, read with the skip-aware reader, shuffled
        in a buffer of ``shuffle`` samples, then passed through ``stages`` (WebDataset stages such
        as ``wds.decode()``, ``wds.to_tuple(...)``, ``wds.batched(n)``). Resumable exactly: it has
        ``state_dict``/``load_state_dict`` for ``StatefulDataLoader``; see :mod:`infobatch_stream.dataset`.
        The reading options are those of :meth:`tarfile_to_samples`."""
        from .dataset import ResumableDataset

        return ResumableDataset(
            self.view, stages, shuffle, handler, ReadOptions(merge_gap, verify, max_inflight, readahead_bytes)
        )

    def node(
        self,
        *stages: Callable,
        shuffle: int = 0,
        handler: Callable[[Exception], bool] = reraise_exception,
        **read_options: Any,
    ) -> Any:
        """:meth:`dataset` as a ``torchdata.nodes`` source node (``BaseNode`` with ``reset``,
        ``next`` and ``get_state``) for a ``torchdata.nodes.Loader`` graph: resumable exactly.
        ``read_options``: those of :meth:`tarfile_to_samples`."""
        from .dataset import make_node

        return make_node(self.dataset(*stages, shuffle=shuffle, handler=handler, **read_options))

    # ---- epochs --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> EpochStats:
        """Freeze the threshold, plan the epoch and publish it to the loader workers.

        Call it before each pass over the loader. The plan is exact: ``kept`` is the number of
        samples the pass will yield over all shards. With several ranks it is a collective: call
        it on every rank with the same epoch (compared first, so a mismatch raises
        :class:`SettingsMismatchError` on every rank instead of hanging one).
        """
        epoch, failure = int(epoch), None
        try:
            self.inbox.land()  # the last batch's scores count for the threshold
        except MetadataError as e:  # that batch was bad: every rank raises, none waits for this one
            failure = e
        agree("ib.set_epoch()", self.settings, self.index, epoch=epoch, failure=failure)  # before any other collective
        return start_epoch(self.run, epoch)

    def worker_parts(
        self, epoch: int, worker: int = 0, num_workers: int = 0, kept_per_shard: np.ndarray | None = None
    ) -> list[Part]:
        """What loader worker ``worker`` (of ``num_workers``; 0: the main process) of this rank
        reads in ``epoch``: ``Part(shard, first, stop)`` ranges of kept ordinals in the epoch's
        shard order, given every shard's kept count (default: the published epoch's)."""
        kept = np.asarray(self.control.kept_per_shard if kept_per_shard is None else kept_per_shard)
        order = shard_order(self.index.num_shards, self.config.seed, epoch)
        return assign(order, kept, self.control.rank, self.control.world_size, worker, num_workers, self.remainder)

    def decide_shard(self, shard: int, epoch: int, thresh: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep and boosted masks of one shard (see :meth:`WorkerView.decide_shard`)."""
        return self.view.decide_shard(shard, epoch, thresh)

    def begin_pass(self) -> tuple[int, float]:
        """The epoch and threshold a pass starting now uses (see :meth:`WorkerView.begin_pass`)."""
        return self.view.begin_pass()

    @property
    def epoch_size(self) -> int:
        """Samples the current epoch keeps over all shards."""
        return self.book.epochs[self.epoch].kept

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank's loader yields in the current epoch (the same on every rank)."""
        return self.book.epochs[self.epoch].per_rank

    def num_batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
        """Batches this rank's loader yields in the current epoch when each of its ``num_workers``
        workers batches its own samples (``DataLoader(batch_size=...)`` or ``wds.batched``)."""
        return balance.num_batches(self.samples_per_rank, batch_size, num_workers, drop_last)

    # ---- training side -------------------------------------------------------------------------
    def update(self, meta: Any, loss: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
        """Store per-sample losses as scores; return the weighted mean loss for ``backward()``.

        ``meta`` is the batch's ``__ib__`` field; ``loss`` has one value per sample
        (``reduction="none"``). The caller's tensor is not modified. ``score``, one value per
        sample, is stored instead of the loss when given: e.g. a diffusion loss divided by the
        mean loss at its timestep, so that samples are ranked by difficulty, not by the draw.

        On a GPU it never waits for the device: the scores reach the store one call later (or at
        ``set_epoch``, ``sync_scores``, ``stats``, ``state_dict``), see :mod:`.inbox`.
        """
        weights = self.inbox.put(meta, loss, score)
        self.scores.sync_if_due()
        return (loss * weights).mean()

    def sync_scores(self) -> int:
        """Exchange this rank's recorded updates with every other rank (a collective: call it on
        all ranks; ``set_epoch`` does). Every store applies them in the same order, so all end
        identical; when it returns, this node's store holds them all. Returns the number of
        updates exchanged; 0 without a process group."""
        self.inbox.land()
        return self.scores.sync()

    def stats(self) -> list[dict[str, Any]]:
        """Per-epoch figures: threshold, seen, well_learned, pruned, kept, trained, nonfinite,
        and the reader's I/O (bytes_read, bytes_skipped, requests, shards_read, shards_skipped,
        shards_failed)."""
        self.inbox.land()
        self.run.collect_io()
        return self.book.as_dicts()

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: configuration, epoch, the store, the frozen plan of the
        current epoch, per-epoch stats and this rank's pending (not yet exchanged) updates.

        Plain values and tensors only: ``torch.save`` it with your model and ``torch.load(...,
        weights_only=True)`` reads it back. With several ranks the states differ only in the
        pending updates: save each rank's, or call ``sync_scores()`` on all ranks first.
        """
        return state_of(self.run)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the store, the epoch and its frozen plan (republished as
        saved, not recomputed). With several ranks, call it on every rank (a collective).

        A state saved partway through an epoch resumes only with the settings that decide the
        rest of that epoch (``seed``, ``remainder``, ``prune_ratio``, see
        :data:`MID_EPOCH_SETTINGS`): :class:`SettingsMismatchError` otherwise. Other changes,
        and any change at an epoch boundary, are kept from this InfoBatch with a warning."""
        restore(self.run, state)

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to one file, atomically (temp file, fsync, rename): a crash or a
        full disk leaves the previous checkpoint at ``path`` intact. No pickle."""
        save_state(path, self.state_dict())

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote (a collective with several ranks)."""
        self.load_state_dict(load_state(path))
