"""The user-facing object: owns the index, the shared store and the epoch plan.

Three changed lines on top of a WebDataset loop::

    ib = InfoBatch("index.json", num_epochs=60)
    pipeline = wds.DataPipeline(ib.shards(), wds.tarfile_to_samples(), ib.filter(), ...)
    ...
    ib.set_epoch(epoch)                       # before each pass over the loader
    loss = ib.update(meta, criterion(out, y))  # criterion with reduction="none"
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from . import distributed, policy
from .balance import num_batches, samples_per_rank
from .checkpoint import check_state, load_state, save_state
from .control import EpochControl, EpochPlan
from .errors import CheckpointError, MetadataError, SettingsMismatchError
from .index import DatasetIndex
from .meta import BOOSTED, EPOCH, SLOT, TAG, as_meta_array, index_tag
from .planner import plan_epoch
from .readahead import DEFAULT_BUDGET, DEFAULT_INFLIGHT
from .reader import ReaderStage, ReadOptions
from .stages import FilterStage, ShardSource
from .stats import EpochStats
from .store import ScoreStore
from .worker import WorkerView

if TYPE_CHECKING:
    from .dataset import ResumableDataset

log = logging.getLogger(__name__)

MID_EPOCH_SETTINGS = ("seed", "remainder", "prune_ratio")
"""Settings a state saved partway through an epoch must be resumed with: the seed draws the
epoch's shard order (so which sample each saved reading position means) and the shuffle picks,
``remainder`` cuts the epoch over the ranks, and ``prune_ratio`` weights the kept well-learned
samples the saved plan kept with probability ``1 - r``. The others (``num_epochs``, ``delta``,
``granularity``, ``ema_decay``) only shape the epochs planned later (or the scores recorded from
now on): the restored epoch keeps its saved plan."""

_AGREE_HINTS = {
    "*": "every rank must create InfoBatch with the same settings",
    "index": "every rank must load the same index (the same shards, indexed once)",
    "epoch": "call ib.set_epoch(epoch) with the same epoch on every rank",
    "call": "InfoBatch(), ib.set_epoch() and ib.load_state_dict() are collectives: call them on every rank, "
    "in the same order",
}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the caller of this function,
    point at the first frame outside this package: the user's line, however deep the call."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _progress(state: dict[str, Any]) -> tuple[int, int] | None:
    """``(trained, per_rank)`` when ``state`` was saved partway through its current epoch: the
    rank had trained some of its share but not all. None at an epoch boundary (nothing trained
    in it yet, or the whole share trained)."""
    epoch = int(state["epoch"])
    for d in state["stats"]:
        if int(d["epoch"]) == epoch:
            trained, per_rank = int(d.get("trained", 0)), int(d.get("per_rank") or d.get("kept", 0))
            return (trained, per_rank) if 0 < trained < per_rank else None
    return None


class InfoBatch:
    """InfoBatch for WebDataset shards: prune well-learned samples inline, rescale the rest.

    Args:
        index: a :class:`DatasetIndex` or the path of a saved one (``infobatch-stream index``).
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
    ) -> None:
        failure = None
        try:  # a rank that fails here tells the others, which would otherwise wait for it below
            self.index = index if isinstance(index, DatasetIndex) else DatasetIndex.load(index, allow_pipes=allow_pipes)
            if granularity == "sample":
                granularity = 1
            if isinstance(granularity, bool) or not isinstance(granularity, int):
                raise ValueError(f"granularity must be 'sample' or a block size k >= 1, got {granularity!r}")
            self.config = policy.PruneConfig(
                num_epochs=num_epochs, prune_ratio=prune_ratio, delta=delta, seed=seed, block_size=granularity
            )
            samples_per_rank(0, 1, remainder)  # validates it
            if sync_every is not None and (isinstance(sync_every, bool) or int(sync_every) < 1):
                raise ValueError(f"sync_every must be None or a number of update() calls >= 1, got {sync_every!r}")
            if not 0.0 <= float(ema_decay) < 1.0:
                raise ValueError(f"ema_decay must be in [0, 1) (0: the last loss is the score), got {ema_decay!r}")
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            failure = e
        self.remainder = remainder
        self.sync_every = None if sync_every is None or failure else int(sync_every)
        self.ema_decay = 0.0 if failure else float(ema_decay)
        self.share_store = bool(share_store)
        # The first collective: every rank has the same index and settings, or every rank raises.
        self._agree("InfoBatch()", failure=failure)
        self.tag = index_tag(self.index.fingerprint)
        n, num_shards = self.index.num_samples, self.index.num_shards

        def create() -> list:
            return [ScoreStore.create(n).shared, EpochPlan.create(n).shared]

        shared, self._writer, self._shared_by_all = (
            distributed.share_per_node(create) if share_store else (create(), True, distributed.world()[1] == 1)
        )
        self.store = ScoreStore(shared[0])
        self.plan = EpochPlan(shared[1], n)
        self.control = EpochControl.create(num_shards)
        self._stats: dict[int, EpochStats] = {}
        self._warned: set[tuple[str, int]] = set()
        self._pending: list[np.ndarray] = []  # this rank's (slot, loss) updates since the last exchange
        self._updates = 0  # update() calls, for sync_every
        # what loader workers use: the stages get this, not the InfoBatch
        self.view = WorkerView(self.index, self.config, self.remainder, self.tag, self.control, self.plan, self.store)
        self.epoch = -1
        self._plan_epoch(0)

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
        epoch = int(epoch)
        self._agree("ib.set_epoch()", epoch=epoch)  # before any other collective: a mismatch raises everywhere
        return self._plan_epoch(epoch)

    def _plan_epoch(self, epoch: int) -> EpochStats:
        if epoch < 0:
            raise ValueError(f"set_epoch({epoch}): epochs start at 0")
        if epoch < self.epoch:
            raise ValueError(
                f"set_epoch({epoch}) goes backwards from epoch {self.epoch}: the scores already hold later "
                "epochs' losses; create a new InfoBatch to start the run over"
            )
        if epoch >= self.config.num_epochs:
            self._warn_once(
                "past_end",
                epoch,
                f"set_epoch({epoch}) is past num_epochs={self.config.num_epochs}: it streams the full "
                "data like the final epochs; pass the real number of epochs to InfoBatch",
            )
        current = self._stats.get(epoch)
        trained_here = epoch == self.epoch and current is not None and current.trained > 0
        if distributed.any_rank(trained_here):  # same branch on every rank: the rest is collective
            log.info("set_epoch(%d) again after training in it: keeping its frozen plan", epoch)
            return self._stats[epoch]
        self._collect_io()
        self.sync_scores()
        summary = plan_epoch(
            self.store.scores,
            self.index,
            self.config,
            epoch,
            self.plan,
            plan_is_shared_by_all=self._shared_by_all,
            writer=self._writer,
        )
        thresh, seen, learned, kept_per_shard = (
            summary.threshold,
            summary.seen,
            summary.well_learned,
            summary.kept_per_shard,
        )
        rank, world_size = distributed.world()
        total, kept = self.index.num_samples, int(kept_per_shard.sum())
        per_rank = samples_per_rank(kept, world_size, self.remainder)
        stats = EpochStats(
            epoch=epoch,
            threshold=None if np.isnan(thresh) else thresh,
            total=total,
            seen=seen,
            well_learned=learned,
            pruned=total - kept,
            kept=kept,
            per_rank=per_rank,
            padded=max(per_rank * world_size - kept, 0),
            dropped=max(kept - per_rank * world_size, 0),
        )
        self._stats[epoch] = stats
        self.control.publish(epoch, thresh, kept_per_shard, rank, world_size)
        self.view.announced.clear()
        self.epoch = epoch
        log.info(
            "epoch %d: threshold %.4g, %d seen, %d well-learned, %d pruned, %d kept of %d, %d per rank",
            epoch,
            thresh,
            stats.seen,
            learned,
            stats.pruned,
            kept,
            total,
            per_rank,
        )
        return stats

    def decide_shard(self, shard: int, epoch: int, thresh: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep and boosted masks of one shard (see :meth:`WorkerView.decide_shard`)."""
        return self.view.decide_shard(shard, epoch, thresh)

    def begin_pass(self) -> tuple[int, float]:
        """The epoch and threshold a pass starting now uses (see :meth:`WorkerView.begin_pass`)."""
        return self.view.begin_pass()

    @property
    def epoch_size(self) -> int:
        """Samples the current epoch keeps over all shards."""
        return self._stats[self.epoch].kept

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank's loader yields in the current epoch (the same on every rank)."""
        return self._stats[self.epoch].per_rank

    def num_batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
        """Batches this rank's loader yields in the current epoch when each of its ``num_workers``
        workers batches its own samples (``DataLoader(batch_size=...)`` or ``wds.batched``)."""
        return num_batches(self.samples_per_rank, batch_size, num_workers, drop_last)

    # ---- training side -------------------------------------------------------------------------
    def update(self, meta: Any, loss: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
        """Store per-sample losses as scores; return the weighted mean loss for ``backward()``.

        ``meta`` is the batch's ``__ib__`` field; ``loss`` has one value per sample
        (``reduction="none"``). The caller's tensor is not modified. ``score``, one value per
        sample, is stored instead of the loss when given: e.g. a diffusion loss divided by the
        mean loss at its timestep, so that samples are ranked by difficulty, not by the draw.
        """
        arr = as_meta_array(meta, self.index.num_samples)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"update() needs the per-sample loss as a torch.Tensor, got {type(loss).__name__}")
        if loss.ndim == 0:
            raise ValueError(
                "update() got a scalar loss: InfoBatch needs one loss per sample; build the criterion with "
                "reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
            )
        if loss.ndim != 1:
            raise ValueError(
                f"update() got a loss of shape {tuple(loss.shape)}: reduce it to one value per sample first, "
                "e.g. loss.flatten(1).mean(1)"
            )
        if loss.shape[0] != arr.shape[0]:
            raise ValueError(
                f"update() got {loss.shape[0]} losses for a batch of {arr.shape[0]} samples; pass the loss "
                "of exactly the batch whose '__ib__' field you pass"
            )
        slots, epochs, boosted = arr[:, SLOT], arr[:, EPOCH], arr[:, BOOSTED].astype(bool)
        if len(slots) and (np.any(arr[:, TAG] != self.tag) or slots.min() < 0 or slots.max() >= self.index.num_samples):
            raise MetadataError(
                "update() got metadata from another index (its index tag or slots do not match this "
                f"InfoBatch's {self.index.num_samples}-sample index {self.index.path or '<memory>'}): pass the "
                "'__ib__' field of batches read through this InfoBatch's stages"
            )
        if score is not None and tuple(score.shape) != tuple(loss.shape):
            raise ValueError(
                f"update() got a score of shape {tuple(score.shape)} for a loss of shape "
                f"{tuple(loss.shape)}: pass one score per sample"
            )
        values = (loss if score is None else score).detach().to(dtype=torch.float32, device="cpu").numpy()
        finite = np.isfinite(values)
        if distributed.world()[1] > 1:  # the store changes only when ranks exchange: all stay identical
            self._pending.append(distributed.pack_updates(slots[finite], values[finite]))
            self._updates += 1
            if self.sync_every and self._updates % self.sync_every == 0:
                self.sync_scores()
        else:
            self.store.record(slots[finite], values[finite], self.ema_decay)
        self._count(epochs, finite)
        weights = torch.from_numpy(policy.weights(boosted, self.config)).to(device=loss.device, dtype=loss.dtype)
        return (loss * weights).mean()

    def sync_scores(self) -> int:
        """Exchange this rank's recorded updates with every other rank (a collective: call it on
        all ranks; ``set_epoch`` does). Every store applies them in the same order, so all end
        identical; when it returns, this node's store holds them all. Returns the number of
        updates exchanged; 0 without a process group."""
        if distributed.world()[1] == 1:
            self._pending.clear()
            return 0
        packed = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=distributed.UPDATE)
        self._pending.clear()

        def apply(slots: np.ndarray, values: np.ndarray) -> None:
            if self._writer:
                self.store.record(slots, values, self.ema_decay)

        exchanged = distributed.exchange_updates(packed, apply)
        distributed.barrier()  # a node's writer has applied everything before any local rank reads
        return exchanged

    def _count(self, epochs: np.ndarray, finite: np.ndarray) -> None:
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            stats = self._stats.get(epoch)
            if stats is None or epoch != self.epoch:
                self._warn_once(
                    "stale",
                    epoch,
                    f"update() got samples of epoch {epoch} while epoch {self.epoch} is current: "
                    "was set_epoch() called while an old loader iterator was still running?",
                )
            if stats is None:
                continue
            stats.trained += int(np.count_nonzero(mask))
            bad = int(np.count_nonzero(mask & ~finite))
            if bad:
                stats.nonfinite += bad
                self._warn_once(
                    "nonfinite",
                    epoch,
                    f"epoch {epoch}: {bad} non-finite per-sample losses were not stored as scores; "
                    "see ib.stats()['nonfinite'] for the running count",
                )
        if self.control.repeats and self.epoch in self._stats:
            self._warn_once(
                "repeat",
                self.epoch,
                f"epoch {self.epoch} is being read again without set_epoch(): the same samples are "
                "kept as in its first pass; call ib.set_epoch(epoch) before each pass",
            )

    def _warn_once(self, kind: str, epoch: int, message: str) -> None:
        if (kind, epoch) not in self._warned:
            self._warned.add((kind, epoch))
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())

    def stats(self) -> list[dict[str, Any]]:
        """Per-epoch figures: threshold, seen, well_learned, pruned, kept, trained, nonfinite,
        and the reader's I/O (bytes_read, bytes_skipped, requests, shards_read, shards_skipped,
        shards_failed)."""
        self._collect_io()
        return [asdict(self._stats[e]) for e in sorted(self._stats)]

    def _collect_io(self) -> None:
        """Copy the workers' I/O counters of the current epoch into its stats."""
        stats = self._stats.get(self.epoch)
        if stats is None:
            return
        for name, value in self.control.io_totals().items():
            setattr(stats, name, value)
        stats.repeated_passes = self.control.repeats

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: configuration, epoch, the store, the frozen plan of the
        current epoch, per-epoch stats and this rank's pending (not yet exchanged) updates.

        Plain values and tensors only: ``torch.save`` it with your model and ``torch.load(...,
        weights_only=True)`` reads it back. With several ranks the states differ only in the
        pending updates: save each rank's, or call ``sync_scores()`` on all ranks first.
        """
        self._collect_io()
        pending = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=distributed.UPDATE)
        return {
            "format": 1,
            "index_fingerprint": self.index.fingerprint,
            "num_samples": self.index.num_samples,
            "config": self._settings(),
            "epoch": self.epoch,
            "threshold": self.control.threshold,
            "stats": [asdict(self._stats[e]) for e in sorted(self._stats)],
            "updates": self._updates,
            "scores": torch.from_numpy(np.array(self.store.scores)),
            "plan": torch.from_numpy(np.array(self.plan.shared.array)),
            "kept_per_shard": torch.from_numpy(np.array(self.control.kept_per_shard)),
            "pending_slots": torch.from_numpy(np.ascontiguousarray(pending["slot"])),
            "pending_losses": torch.from_numpy(np.ascontiguousarray(pending["loss"])),
        }

    def _settings(self) -> dict[str, Any]:
        """The settings a state records (and a mid-epoch resume must keep some of)."""
        c = self.config
        return {
            "num_epochs": int(c.num_epochs),
            "prune_ratio": float(c.prune_ratio),
            "delta": float(c.delta),
            "seed": int(c.seed),
            "granularity": int(c.block_size),
            "remainder": self.remainder,
            "ema_decay": self.ema_decay,
        }

    def _agree(
        self,
        call: str,
        failure: BaseException | None = None,
        peer_error: type[Exception] = RuntimeError,
        extra: Any = None,
        **values: Any,
    ) -> list[Any]:
        """Every rank has the same index, settings and ``values`` in this ``call``, or every rank
        raises (one small gather; see :func:`distributed.agree`). Every rank's ``extra``, by rank."""
        shown = {"call": call}
        if failure is None:
            values = {
                "call": call,
                **values,
                **self._settings(),
                "sync_every": self.sync_every,
                "share_store": self.share_store,
                "index": self.index.fingerprint,
            }
            shown["index"] = f"fingerprint {self.index.fingerprint[:12]} ({self.index.path or '<memory>'})"
        else:
            values = {"call": call}
        return distributed.agree(values, _AGREE_HINTS, shown, failure, peer_error, extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the store, the epoch and its frozen plan (republished as
        saved, not recomputed). With several ranks, call it on every rank (a collective).

        A state saved partway through an epoch resumes only with the settings that decide the
        rest of that epoch (``seed``, ``remainder``, ``prune_ratio``, see
        :data:`MID_EPOCH_SETTINGS`): :class:`SettingsMismatchError` otherwise. Other changes,
        and any change at an epoch boundary, are kept from this InfoBatch with a warning."""
        failure, saved, progress = None, None, None
        try:
            check_state(state, self.index)
            config = {"ema_decay": 0.0, **state["config"]}  # states written before the option existed
            saved = {"epoch": int(state["epoch"]), **{k: config.get(k) for k in self._settings()}}
            progress = _progress(state)
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            failure = e
        extras = self._agree(
            "ib.load_state_dict()",
            failure=failure,
            peer_error=CheckpointError,
            extra={"saved": saved, "progress": progress},
        )
        self._check_resume(extras)
        if self._writer:
            self.store.scores[:] = np.asarray(state["scores"])
            self.plan.shared.array[:] = np.asarray(state["plan"])
        distributed.barrier()
        rank, world_size = distributed.world()
        self._stats = {int(d["epoch"]): EpochStats(**d) for d in state["stats"]}
        self.epoch = int(state["epoch"])
        current = self._stats.get(self.epoch)
        if current is not None:  # the split over ranks follows this job's world size
            current.per_rank = samples_per_rank(current.kept, world_size, self.remainder)
            current.padded = max(current.per_rank * world_size - current.kept, 0)
            current.dropped = max(current.kept - current.per_rank * world_size, 0)
        self.control.publish(
            self.epoch, float(state["threshold"]), np.asarray(state["kept_per_shard"]), rank, world_size
        )
        self._updates = int(state["updates"])
        slots, losses = np.asarray(state["pending_slots"]), np.asarray(state["pending_losses"])
        self._pending = [distributed.pack_updates(slots, losses)] if len(slots) else []
        self.view.announced.clear()

    def _check_resume(self, extras: list[dict[str, Any]]) -> None:
        """Refuse, on every rank alike (``extras``: every rank's saved settings and progress), a
        mid-epoch resume that would change the rest of the epoch; warn about other changes."""
        saved_by_rank = [{f"saved {k}": v for k, v in x["saved"].items()} for x in extras]
        differ = distributed.differences(saved_by_rank)
        if differ:
            raise SettingsMismatchError(
                "; ".join(text for _, text in differ) + "; every rank must load a state "
                "saved by this run at the same step (each rank's own, or rank 0's after "
                "ib.sync_scores())"
            )
        saved, mine = extras[0]["saved"], self._settings()
        epoch = saved.pop("epoch")
        changed = {k: (saved[k], v) for k, v in mine.items() if saved[k] != v}
        if not changed:
            return
        partway = [(r, x["progress"]) for r, x in enumerate(extras) if x["progress"] is not None]
        refused = {k: ab for k, ab in changed.items() if k in MID_EPOCH_SETTINGS}
        listing = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        if partway and refused:
            r, (trained, per_rank) = partway[0]
            who = "" if len(extras) == 1 else f"rank {r} "
            keep = ", ".join(f"{k}={a!r}" for k, (a, _) in refused.items())
            raise SettingsMismatchError(
                f"this state was saved partway through epoch {epoch} ({who}had trained {trained} of its {per_rank} "
                f"samples) with other settings than this InfoBatch's: "
                + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in refused.items())
                + f". They decide which samples the rest of epoch {epoch} reads and how they are weighted: some "
                f"would be trained twice and others never. Resume with the saved settings (InfoBatch(..., {keep})), "
                "or resume from a state saved at an epoch boundary to change them"
            )
        when = f"the rest of epoch {epoch} keeps its saved plan" if partway else "the next epoch planned uses them"
        message = f"restoring a state saved with other settings, keeping this InfoBatch's ({when}): {listing}"
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to one file, atomically (temp file, fsync, rename): a crash or a
        full disk leaves the previous checkpoint at ``path`` intact. No pickle."""
        save_state(path, self.state_dict())

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote (a collective with several ranks)."""
        self.load_state_dict(load_state(path))

    # ---- pickling for spawn workers --------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stats"] = {}
        state["_warned"] = set()
        state["_pending"] = []
        return state
