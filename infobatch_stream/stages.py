"""Pipeline stages: the per-epoch shard source and the inline filter.

Both are plain picklable objects so that DataLoader workers started with ``spawn`` receive them;
they read the epoch, threshold and scores from shared memory when a pass starts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from .announce import Announcements  # noqa: F401 - where it lived before
from .balance import Part, assign, within_part
from .building import give_rows
from .errors import IndexMismatchError, ShardAssignmentError, StaleIndexError
from .meta import META_KEY, make_meta
from .worker import WorkerView, current_worker, loader_worker  # noqa: F401 - re-exported

log = logging.getLogger(__name__)
PART_KEY = "__ib_part__"  # on the source's items: the kept range of the shard this worker reads
SHARD_KEY = "__ib_shard__"  # and the shard's number in the index (a URL may be listed twice)


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the shards drawn from ``(seed, epoch)``: different every epoch."""
    rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5EED]))
    return rng.permutation(num_shards)


def epoch_parts(view: WorkerView) -> list[Part]:
    """This rank's and worker's share of the published epoch (see :mod:`infobatch_stream.balance`).

    The rank and world size come from the control block, written by the training process when
    it published the epoch: a spawned loader worker has no process group to ask."""
    view.refresh_index()
    control = view.control
    order = shard_order(view.index.num_shards, view.config.seed, control.epoch)
    worker, num_workers = loader_worker()
    return assign(
        order, np.asarray(control.kept_per_shard), control.rank, control.world_size, worker, num_workers, view.remainder
    )


def account_empty(view: WorkerView, parts: list[Part]) -> None:
    """Count this worker's shards with nothing kept as skipped (they are never opened)."""
    empty = [p.shard for p in parts if p.first == p.stop]
    if empty:
        view.control.add_io(
            current_worker(), shards_skipped=len(empty), bytes_skipped=sum(view.index.shards[s].filesize for s in empty)
        )


class ShardSource(IterableDataset):
    """First pipeline stage: yields ``{"url": ...}`` for this rank's and worker's shards of the epoch.

    Each rank gets the same number of kept samples (cut inside a shard where needed: the item
    then carries the kept range, and ``ib.filter()`` in the same worker is told too). Shards with
    nothing kept are left out, so they are never opened.
    """

    def __init__(self, view: WorkerView) -> None:
        self.view = view

    def __iter__(self) -> Iterator[dict[str, Any]]:
        view = self.view
        parts = epoch_parts(view)
        announced = view.announced
        announced.start()  # a new pass: forget parts of an abandoned one
        account_empty(view, parts)
        index = view.index
        urls = index.urls
        finished, mine = False, announced.passes
        try:
            for part in parts:
                if part.first == part.stop:
                    continue
                url = urls[part.shard]
                announced.push(index.shard_of_url(url), part)
                yield {"url": url, PART_KEY: (part.first, part.stop), SHARD_KEY: part.shard}
            finished = True
        finally:
            if not finished and announced.passes == mine:  # abandoned or failed, and no later pass began since
                announced.clear()


class _ShardSlots:
    """Maps the samples of one shard, arriving in tar order, to positions in the index."""

    def __init__(
        self, url: str, shard: int, first_slot: int, keys: list[str] | None, keep: list[bool], boosted: list[bool]
    ) -> None:
        self.url, self.shard, self.first_slot = url, shard, first_slot
        self.keys, self.keep, self.boosted = keys, keep, boosted
        self.next = 0
        self._positions: dict[str, list[int]] | None = None
        self._first: str | None = None  # without keys (index being built): the shard's first key

    def position(self, key: str) -> int:
        """Position of ``key``: normally the next one; otherwise search (samples were skipped).
        Without keys (an index being built in epoch 0, nothing pruned) samples count up in tar order."""
        pos = self.next
        if self.keys is None:
            if pos >= len(self.keep):
                raise IndexMismatchError(
                    f"shard {self.url} has more samples than the {len(self.keep)} its shard list entry says: "
                    "correct the list's nsamples (or index the shards with `infobatch-stream index`)"
                )
            self._first = key if pos == 0 else self._first
            self.next = pos + 1
            return pos
        if pos >= len(self.keys) or self.keys[pos] != key:
            if self._positions is None:
                self._positions = {}
                for i, k in enumerate(self.keys):
                    self._positions.setdefault(k, []).append(i)
            candidates = self._positions.get(key)
            if not candidates:
                raise StaleIndexError(
                    f"sample {key!r} of shard {self.url} is not in the index: the shard changed since it was "
                    "indexed; re-run `infobatch-stream index`"
                )
            later = [i for i in candidates if i >= pos]
            pos = later[0] if later else candidates[0]
        self.next = pos + 1
        return pos

    def check_complete(self) -> None:
        """Without keys, samples were numbered by arrival: all of the shard's must have come."""
        if self.keys is None and 0 < self.next < len(self.keep):
            raise IndexMismatchError(
                f"shard {self.url}: {self.next} samples reached ib.filter(), its shard list entry says "
                f"{len(self.keep)}. While the index is built in epoch 0, ib.filter() numbers a remote shard's "
                "samples in tar order, so no stage before it may drop samples (select_files=, rename_files=): "
                "use ib.tarfile_to_samples(), or correct the list's nsamples"
            )

    def restarted(self, key: str) -> bool:
        """The whole shard went by and its first sample comes again: the shard was reopened."""
        if self.keys is None:
            return self.next == len(self.keep) and self.next > 0 and key == self._first
        return self.next == len(self.keys) and len(self.keys) > 0 and key == self.keys[0]


def filter_samples(src: Iterable[dict[str, Any]], view: WorkerView) -> Iterator[dict[str, Any]]:
    """Drop the epoch's pruned samples and tag kept ones with ``__ib__`` = (slot, epoch, boosted)."""
    epoch, thresh = view.begin_pass()
    index = view.index
    tag = view.tag
    announced = view.announced
    mark = announced.passes
    cursor: _ShardSlots | None = None
    for sample in src:
        if not isinstance(sample, dict) or "__url__" not in sample or "__key__" not in sample:
            fields = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
            raise ValueError(
                "ib.filter() needs samples with '__url__' and '__key__': place it right after "
                f"tarfile_to_samples() and before decoding or to_tuple (got {fields})"
            )
        if cursor is None:
            _warn_if_decoded(sample)
        url = sample["__url__"]
        key = sample["__key__"]
        if cursor is None or url != cursor.url or cursor.restarted(key):
            if cursor is not None:
                cursor.check_complete()
            shard = index.shard_of_url(url)
            part = announced.pop(shard) if announced.started_since(mark) else None
            if part is None and announced.started_since(mark):
                raise ShardAssignmentError(
                    f"shard {url} reached ib.filter() but ib.shards() did not hand it to this worker: a stage "
                    "between them added or repeated shards; put ib.filter() right after tarfile_to_samples()"
                )
            if part is not None:
                shard = part.shard  # the entry ib.shards() meant, also when a URL is listed twice
            lo, _ = index.slots(shard)
            keep, boosted = view.decide_shard(shard, epoch, thresh)
            if part is not None:  # ib.shards() may give this worker only part of the shard's kept samples
                keep = within_part(keep, part)
            if not index.has_rows(shard):
                give_rows(index, shard, url)  # a local shard's keys, while the index is being built
            keys = index.keys(shard) if index.has_rows(shard) else None
            cursor = _ShardSlots(url, shard, lo, keys, keep.tolist(), boosted.tolist())
        pos = cursor.position(key)
        if cursor.keep[pos]:
            sample[META_KEY] = make_meta(cursor.first_slot + pos, epoch, cursor.boosted[pos], tag)
            yield sample
    if cursor is not None:
        cursor.check_complete()
    announced.check_all_read("ib.filter()", mark)


def _warn_if_decoded(sample: dict[str, Any]) -> None:
    """ib.filter() after ``wds.decode()`` still prunes correctly, but every pruned sample was
    decoded for nothing: say so once per pass."""
    decoded = [
        k for k, v in sample.items() if not k.startswith("__") and not isinstance(v, (bytes, bytearray, memoryview))
    ]
    if decoded:
        message = (
            f"ib.filter() got decoded fields ({decoded[0]!r} is a {type(sample[decoded[0]]).__name__}, not "
            "bytes): pruned samples are decoded before being dropped; put ib.filter() right after "
            "tarfile_to_samples() and decode after it"
        )
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


class FilterStage:
    """A pipeline stage (``stage(src) -> iterator``) for ``wds.DataPipeline`` and ``.compose``."""

    def __init__(self, view: WorkerView) -> None:
        self.view = view

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return filter_samples(src, self.view)
