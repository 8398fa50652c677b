"""A resumable dataset: this worker's share of the epoch, a shuffle buffer, the user's stages.

Resuming after pruning must not count yielded samples (the kept set differs per epoch) and must
not replay or skip any. Here the position is kept in *consumed positions of the worker's share*:
the share (see :mod:`infobatch_stream.balance`) is a fixed list of kept samples once the epoch is
planned, so "the first ``P`` of them have been read" is exact, and the reader jumps straight to
sample ``P`` without reading the ones before. A shuffle buffer is part of the state too: its
samples are named by their share ordinals (and re-read on resume) and its random picks come from
a counter-based hash of ``(seed, epoch, rank, worker, step)``, so the state is a few integers
plus the buffer's ordinals.

``state_dict()`` describes what the stages after this one have received, which is what the
training loop consumed when the stages between are one-to-one (decode, map, to_tuple) or a
batcher that just emitted a batch (``wds.batched``, or the DataLoader's own batching):
``torchdata.stateful_dataloader.StatefulDataLoader`` snapshots it right after each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset
from webdataset.handlers import reraise_exception

from . import policy
from .balance import Part
from .reader import ReadOptions, ShardRequest, read_requests
from .stages import account_empty, epoch_parts, loader_worker
from .worker import WorkerView

_SHUFFLE_STREAM = 0x5F3759DF  # separates the shuffle's coins from the pruning coins


class _Stop(Exception):
    """The handler chose to end the stream."""


@dataclass
class SharePosition:
    """Where a worker is in its share of an epoch (what ``state_dict`` reports)."""

    epoch: int
    generation: int  # of the published epoch this pass reads (not saved: it is per process)
    rank: int
    world_size: int
    worker: int
    num_workers: int
    position: int = 0  # share samples read so far (handed downstream or into the buffer)
    step: int = 0  # shuffle picks made so far
    buffer: list[int] = field(default_factory=list)  # share ordinals in the shuffle buffer, in order

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": self.worker,
            "num_workers": self.num_workers,
            "position": self.position,
            "step": self.step,
            "buffer": list(self.buffer),
        }


def skip(parts: list[Part], n: int) -> list[Part]:
    """The parts left after the first ``n`` samples of a share."""
    out = []
    for part in parts:
        size = part.stop - part.first
        if n >= size:
            n -= size
            continue
        out.append(Part(part.shard, part.first + n, part.stop))
        n = 0
    return out


def locate(parts: list[Part], ordinals: list[int]) -> list[tuple[int, np.ndarray, list[int]]]:
    """Group share ordinals by part: ``(part index, kept ordinals in the shard, share ordinals)``."""
    bounds = np.cumsum([0] + [p.stop - p.first for p in parts])
    wanted = np.sort(np.asarray(ordinals, dtype=np.int64))
    which = np.searchsorted(bounds, wanted, side="right") - 1
    groups = []
    for i in np.unique(which).tolist():
        share = wanted[which == i]
        groups.append((i, parts[i].first + (share - bounds[i]), share.tolist()))
    return groups


class ResumableDataset(IterableDataset):
    """``ib.dataset(*stages, shuffle=n)``: read, shuffle and process this worker's share of the
    epoch, with ``state_dict``/``load_state_dict`` for an exact resume."""

    def __init__(
        self,
        view: WorkerView,
        stages: tuple[Callable[[Iterable], Iterable], ...],
        shuffle: int = 0,
        handler: Callable[[Exception], bool] = reraise_exception,
        options: ReadOptions = ReadOptions(),
    ) -> None:
        if shuffle < 0:
            raise ValueError(f"shuffle must be a buffer size >= 0, got {shuffle}")
        self.view, self.stages, self.shuffle = view, stages, shuffle
        self.handler, self.options = handler, options
        self._cursor: SharePosition | None = None
        self._resume: dict[str, Any] | None = None

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self._cursor is None else self._cursor.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next ``iter()`` (if it is about the published epoch)."""
        self._resume = dict(state) if state else None

    # ---- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        items: Iterable[Any] = self._stoppable()
        for stage in self.stages:
            items = stage(items)
        return iter(items)

    def _start(self) -> tuple[SharePosition, list[Part], float]:
        view = self.view
        epoch, thresh = view.begin_pass()
        control = view.control
        worker, num_workers = loader_worker()
        cursor = SharePosition(epoch, control.generation, control.rank, control.world_size, worker, num_workers)
        resume, self._resume = self._resume, None
        if resume and resume.get("epoch") == epoch:
            where = {k: resume.get(k) for k in ("rank", "world_size", "worker", "num_workers")}
            here = {k: getattr(cursor, k) for k in where}
            if where != here:
                raise ValueError(
                    f"cannot resume epoch {epoch} exactly: the state was saved by {where}, this loader runs as "
                    f"{here}; resume with the same world size and num_workers (or at an epoch boundary)"
                )
            cursor.position, cursor.step = int(resume["position"]), int(resume["step"])
            cursor.buffer = [int(i) for i in resume["buffer"]]
        parts = epoch_parts(view)
        if cursor.position == 0 and not cursor.buffer:
            account_empty(view, parts)
        self._cursor = cursor
        return cursor, [p for p in parts if p.stop > p.first], thresh

    def _read(
        self,
        parts: list[Part],
        ordinal: int,
        thresh: float,
        epoch: int,
        generation: int,
        only: list[tuple[int, np.ndarray, list[int]]] | None = None,
    ) -> Iterator[tuple[int, dict]]:
        """``(share ordinal, sample)`` from ``parts`` starting at share ordinal ``ordinal``, or
        the samples listed in ``only`` (from :func:`locate`). The reader reads ahead across the
        parts; a shard's failure goes to the handler (WebDataset's semantics: True goes on with
        the next shard, counted in ``shards_failed``; False ends the stream)."""
        urls = self.view.index.urls
        if only is None:
            requests = [ShardRequest(urls[p.shard], p.shard, (p.first, p.stop)) for p in skip(parts, ordinal)]
            for sample in read_requests(
                self.view, requests, epoch, thresh, self.options, handler=self._handle, generation=generation
            ):
                yield ordinal, sample
                ordinal += 1
            return
        requests = [ShardRequest(urls[parts[i].shard], parts[i].shard, only=kept) for i, kept, _ in only]
        shares = {id(r): iter(share) for r, (_, _, share) in zip(requests, only)}  # in the order read
        for req, sample in read_requests(
            self.view, requests, epoch, thresh, self.options, handler=self._handle, generation=generation, tagged=True
        ):
            yield next(shares[id(req)]), sample

    def _handle(self, exn: Exception) -> bool:
        if not self.handler(exn):
            raise _Stop() from None
        return True

    def _stoppable(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._samples()
        except _Stop:
            return

    def _samples(self) -> Iterator[dict[str, Any]]:
        cursor, parts, thresh = self._start()
        epoch = cursor.epoch
        total = sum(p.stop - p.first for p in parts)
        if not self.shuffle:
            for ordinal, sample in self._read(parts, cursor.position, thresh, epoch, cursor.generation):
                cursor.position = ordinal + 1
                yield sample
            cursor.position = total
            return
        buf: list[dict] = []
        order = cursor.buffer  # the ordinals of buf, kept in step with it
        if order:
            again = dict(self._read(parts, 0, thresh, epoch, cursor.generation, only=locate(parts, order)))
            buf = [again[i] for i in order]
        seed = [self.view.config.seed, _SHUFFLE_STREAM, cursor.rank, cursor.worker]

        def pick(n: int) -> int:
            coin = policy.uniform(hash_seed(seed), epoch, np.array([cursor.step], dtype=np.int64))[0]
            cursor.step += 1
            return min(int(coin * n), n - 1)

        def take() -> dict:
            k = pick(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            order[k], order[-1] = order[-1], order[k]
            order.pop()
            return buf.pop()

        for ordinal, sample in self._read(parts, cursor.position, thresh, epoch, cursor.generation):
            buf.append(sample)
            order.append(ordinal)
            cursor.position = ordinal + 1
            if len(buf) >= self.shuffle:
                yield take()
        cursor.position = total
        while buf:
            yield take()


def hash_seed(parts: list[int]) -> int:
    """One 63-bit seed from several integers (for the counter-based coins)."""
    x = np.array(parts, dtype=np.uint64)
    h = 0
    for v in x.tolist():
        h = (h * 0x100000001B3 ^ v) & 0x7FFFFFFFFFFFFFFF
    return h


def _node_class() -> type:
    """``torchdata.nodes.BaseNode`` subclass, built on first use (torchdata is optional)."""
    from torchdata.nodes import BaseNode

    class SampleNode(BaseNode):
        """A ``torchdata.nodes`` source node over a :class:`ResumableDataset` (one worker per rank)."""

        def __init__(self, dataset: ResumableDataset) -> None:
            super().__init__()
            self.dataset = dataset
            self._items: Iterator[Any] | None = None

        def reset(self, initial_state: dict | None = None) -> None:
            super().reset(initial_state)
            self.dataset.load_state_dict(initial_state or {})
            self._items = iter(self.dataset)

        def next(self) -> Any:
            assert self._items is not None
            return next(self._items)

        def get_state(self) -> dict[str, Any]:
            return self.dataset.state_dict()

    return SampleNode


def make_node(dataset: ResumableDataset) -> Any:
    return _node_class()(dataset)
