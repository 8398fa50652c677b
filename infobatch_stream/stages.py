"""Pipeline stages: the per-epoch shard source and the inline filter.

Both are plain picklable objects so that DataLoader workers started with ``spawn`` receive them;
they read the epoch, threshold and scores from shared memory when a pass starts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .meta import META_KEY, make_meta

if TYPE_CHECKING:
    from .infobatch import InfoBatch

log = logging.getLogger(__name__)


def worker_info() -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` with WebDataset's conventions."""
    from webdataset.utils import pytorch_worker_info

    return pytorch_worker_info()


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the shards drawn from ``(seed, epoch)``: different every epoch."""
    rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5EED]))
    return rng.permutation(num_shards)


def split_shards(order: np.ndarray, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
    """Round-robin over ranks, then over a rank's workers, as WebDataset's splitters do."""
    return order[rank::world_size][worker::num_workers]


class ShardSource(IterableDataset):
    """First pipeline stage: yields ``{"url": ...}`` for this rank's and worker's shards of the epoch.

    Shards with nothing kept in the epoch are left out, so they are never opened.
    """

    def __init__(self, ib: "InfoBatch", *, skip_empty: bool = True) -> None:
        self.ib = ib
        self.skip_empty = skip_empty

    def __iter__(self) -> Iterator[dict[str, str]]:
        control, index = self.ib.control, self.ib.index
        order = shard_order(index.num_shards, self.ib.config.seed, control.epoch)
        rank, world_size, worker, num_workers = worker_info()
        if self.skip_empty:
            empty = np.asarray(control.kept_per_shard)[order] == 0
            if worker == 0 and empty.any():  # one worker per rank accounts for the skipped shards
                control.add_io(current_worker(), shards_skipped=int(empty.sum()),
                               bytes_skipped=sum(index.shards[s].filesize for s in order[empty].tolist()))
            order = order[~empty]
        urls = index.urls
        for shard in split_shards(order, rank, world_size, worker, num_workers):
            yield {"url": urls[shard]}


class _ShardCursor:
    """Maps the samples of one shard, arriving in tar order, to positions in the index."""

    def __init__(self, url: str, shard: int, first_slot: int, keys: list[str],
                 keep: list[bool], boosted: list[bool]) -> None:
        self.url, self.shard, self.first_slot = url, shard, first_slot
        self.keys, self.keep, self.boosted = keys, keep, boosted
        self.next = 0
        self._positions: dict[str, list[int]] | None = None

    def position(self, key: str) -> int:
        """Position of ``key``: normally the next one; otherwise search (samples were skipped)."""
        pos = self.next
        if pos >= len(self.keys) or self.keys[pos] != key:
            if self._positions is None:
                self._positions = {}
                for i, k in enumerate(self.keys):
                    self._positions.setdefault(k, []).append(i)
            candidates = self._positions.get(key)
            if not candidates:
                raise KeyError(
                    f"sample {key!r} of shard {self.url} is not in the index: the shard changed since it was "
                    "indexed; re-run `infobatch-stream index`"
                )
            later = [i for i in candidates if i >= pos]
            pos = later[0] if later else candidates[0]
        self.next = pos + 1
        return pos


def filter_samples(src: Iterable[dict[str, Any]], ib: "InfoBatch") -> Iterator[dict[str, Any]]:
    """Drop the epoch's pruned samples and tag kept ones with ``__ib__`` = (slot, epoch, boosted)."""
    epoch, thresh = ib.begin_pass()
    index = ib.index
    tag = ib.tag
    cursor: _ShardCursor | None = None
    for sample in src:
        if not isinstance(sample, dict) or "__url__" not in sample or "__key__" not in sample:
            fields = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
            raise ValueError(
                "ib.filter() needs samples with '__url__' and '__key__': place it right after "
                f"tarfile_to_samples() and before decoding or to_tuple (got {fields})"
            )
        url = sample["__url__"]
        key = sample["__key__"]
        if cursor is None or url != cursor.url:
            shard = index.shard_of_url(url)
            lo, _ = index.slots(shard)
            keep, boosted = ib.decide_shard(shard, epoch, thresh)
            cursor = _ShardCursor(url, shard, lo, index.keys(shard), keep.tolist(), boosted.tolist())
        pos = cursor.position(key)
        if cursor.keep[pos]:
            sample[META_KEY] = make_meta(cursor.first_slot + pos, epoch, cursor.boosted[pos], tag)
            yield sample


class FilterStage:
    """A pipeline stage (``stage(src) -> iterator``) for ``wds.DataPipeline`` and ``.compose``."""

    def __init__(self, ib: "InfoBatch") -> None:
        self.ib = ib

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return filter_samples(src, self.ib)


def current_worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id
