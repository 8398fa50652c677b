"""The skip-aware tar reader: read only the kept samples' bytes, several requests at a time.

A drop-in for ``wds.tarfile_to_samples()`` followed by ``ib.filter()``, with the same output
(keys, bytes, order, ``__url__``, ``__ib__``). When a shard comes up its keep mask is computed
from the store; kept samples become byte ranges from the index; only those are read, through
the storage layer (:mod:`infobatch_stream.storage`):

- local files: ``os.pread`` of each range, in the reading thread;
- object stores and HTTP(S): up to ``max_inflight`` range requests in flight per worker, across
  the current shard and the next ones of the worker's list, within ``readahead_bytes`` of
  requested-but-unconsumed data (:mod:`infobatch_stream.readahead`); samples are yielded in
  order as soon as their range is there;
- anything that cannot seek (``pipe:``, gzip/bz2/xz shards, a server that ignores ``Range``):
  read sequentially, pruned bytes discarded unparsed;
- shards with nothing kept are not opened.

Samples are cut out of the read buffers with the index's member offsets: no tar header is parsed.

**Cost model for merging.** Two kept runs separated by ``g`` pruned bytes are read as one range
when ``g <= merge_gap``. A request costs its time to first byte ``L``; reading through the gap
costs ``g / B`` at bandwidth ``B``. One request at a time, merging pays below ``L x B`` (3 MB at
30 ms and 100 MB/s). With ``C`` requests in flight the latency overlaps with other transfers and
with decoding, so a gap read through costs bytes (and the provider's egress) while buying little
time: the remote default is 16 KiB, the local one 4 KiB (a syscall and a page). Ranges are cut at
``readahead_bytes / (2 x max_inflight)`` (2 MiB by default) so samples flow while a long kept run
is still arriving.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from webdataset.handlers import reraise_exception

from . import verify
from .building import give_rows
from .errors import ShardAssignmentError, StaleIndexError, handle
from .index import ShardInfo, record_stored_size, serves_ranges
from .meta import META_KEY, make_meta
from .readahead import DEFAULT_BUDGET, DEFAULT_INFLIGHT, ReadAhead
from .scanfile import Scan, ScanDir
from .stages import PART_KEY, SHARD_KEY, current_worker
from .storage import ObjectInfo, RangeNotSupported, backend_for, is_local, local_path
from .streamindex import read_and_index
from .tarscan import ShardSamples, _read_full, decompressed
from .worker import WorkerView

log = logging.getLogger(__name__)

LOCAL_MERGE_GAP = 4 << 10
REMOTE_MERGE_GAP = 16 << 10
HTTP_MERGE_GAP = REMOTE_MERGE_GAP  # the name of the remote default in earlier releases
MAX_RANGE_BYTES = 16 << 20  # bounds the buffer of one local read
MIN_REMOTE_RANGE = 256 << 10
SHARDS_AHEAD = 8  # shards planned ahead of the one being yielded (their tables are in memory)
VERIFY = ("size", "size+mtime")


@dataclass(frozen=True)
class ReadOptions:
    """How the reader fetches (see the module docstring)."""

    merge_gap: int | None = None  # None: 4 KiB local, 16 KiB remote
    verify: str = "size+mtime"
    max_inflight: int = DEFAULT_INFLIGHT
    readahead_bytes: int = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        if self.verify not in VERIFY:
            raise ValueError(f"verify must be 'size' or 'size+mtime', got {self.verify!r}")
        if self.merge_gap is not None and self.merge_gap < 0:
            raise ValueError(f"merge_gap must be >= 0 bytes, got {self.merge_gap}")
        if self.max_inflight < 1 or self.readahead_bytes < 1:
            raise ValueError(
                f"max_inflight and readahead_bytes must be >= 1, got {self.max_inflight} and {self.readahead_bytes}"
            )

    def remote_range_bytes(self) -> int:
        return int(min(MAX_RANGE_BYTES, max(MIN_REMOTE_RANGE, self.readahead_bytes // (2 * self.max_inflight))))


@dataclass
class ShardRequest:
    """One shard to read: all its kept samples, the kept ordinals ``part`` = ``[first, stop)``, or
    the kept ordinals ``only`` (ascending). ``error``: it failed before it could be planned."""

    url: str
    shard: int = -1
    part: tuple[int, int] | None = None
    only: np.ndarray | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class ReadRange:
    start: int  # byte offset of the first kept sample
    end: int  # end of the last kept sample
    kept_lo: int  # the range holds the layout's kept positions [kept_lo, kept_hi)
    kept_hi: int


def plan_ranges(
    start: np.ndarray, end: np.ndarray, kept: np.ndarray, merge_gap: int, max_bytes: int = MAX_RANGE_BYTES
) -> list[ReadRange]:
    """Byte ranges covering the kept samples (``kept``: their positions, ascending).

    Consecutive kept samples separated by at most ``merge_gap`` bytes share a range, unless
    the range would exceed ``max_bytes`` (a single larger sample still gets its own range).
    """
    if len(kept) == 0:
        return []
    s, e = start[kept], end[kept]
    breaks = np.flatnonzero(s[1:] - e[:-1] > merge_gap) + 1
    bounds = np.concatenate(([0], breaks, [len(kept)])).tolist()
    ranges = []
    s_list, e_list = s.tolist(), e.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        first = lo
        for i in range(lo + 1, hi + 1):
            if i == hi or e_list[i] - s_list[first] > max_bytes:
                ranges.append(ReadRange(s_list[first], e_list[i - 1], first, i))
                first = i
    return ranges


def _check_fresh(url: str, info: ShardInfo, verify: str, seen: ObjectInfo | None) -> None:
    """Refuse a shard that differs from what the index recorded: its offsets would be wrong."""
    if seen is None:
        return
    problem = None
    if info.filesize and seen.size != info.filesize:
        problem = f"its size is {seen.size} bytes, the index says {info.filesize}"
    elif verify == "size+mtime" and seen.mtime is not None and info.mtime is not None and seen.mtime != info.mtime:
        problem = (
            f"its mtime is {seen.mtime}, the index says {info.mtime} (shards copied with new mtimes: verify='size')"
        )
    elif verify == "size+mtime" and seen.etag and info.etag and seen.etag != info.etag:
        problem = f"its ETag is {seen.etag}, the index recorded {info.etag}"
    if problem:
        raise StaleIndexError(f"shard {url} changed since it was indexed: {problem}; re-run `infobatch-stream index`")


class _Counter:
    def __init__(self) -> None:
        self.bytes_read = 0
        self.requests = 0


class _CountingStream:
    """Counts the bytes taken from a raw stream (before any decompression)."""

    def __init__(self, raw: BinaryIO, counter: _Counter) -> None:
        self.raw, self.counter = raw, counter

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.counter.bytes_read += len(data)
        return data


def _sequential_reader(raw: BinaryIO, compressed: bool, counter: _Counter, where: str) -> Callable[[int, int], bytes]:
    """Serve ascending ranges from a stream that cannot seek by reading and discarding gaps."""
    counter.requests += 1
    stream = _CountingStream(raw, counter)
    if compressed:
        stream, _ = decompressed(stream, where)  # type: ignore[arg-type,assignment]
    pos = 0

    def read(a: int, b: int) -> bytes:
        nonlocal pos
        while pos < a:
            chunk = stream.read(min(a - pos, 1 << 20))
            if not chunk:
                raise StaleIndexError(f"shard {where} ended at byte {pos}, the index expects more; re-index it")
            pos += len(chunk)
        data = _read_full(stream, b - a)  # type: ignore[arg-type]
        pos += len(data)
        if len(data) != b - a:
            raise StaleIndexError(f"shard {where} ended at byte {pos}, the index expects {b}; re-index it")
        return data

    return read


def _close_stream(raw: Any) -> None:
    """Close a stream the reader may abandon before its end: a ``pipe:`` child then dies of
    SIGPIPE, which is expected here, not an error (a truncated stream was caught while reading)."""
    if hasattr(raw, "ignore_errors"):
        raw.ignore_errors = True
    raw.close()


def _region(info: ShardInfo, end: np.ndarray, kept: np.ndarray, first: int, stop: int) -> int:
    """Bytes of the shard this part answers for: from the end of the previous part's last kept
    sample (or the file's start) to the end of its own last one (or the file's end). The parts of
    a shard split over workers thus share its bytes out exactly, for the skipped-bytes count."""
    if first == 0 and stop == len(kept):
        return info.filesize
    if info.compression is not None:  # offsets are in the decompressed tar: share by samples
        return info.filesize * (stop - first) // len(kept)
    a = 0 if first == 0 else int(end[kept[first - 1]])
    b = info.filesize if stop == len(kept) else int(end[kept[stop - 1]])
    return b - a


class _Layout:
    """Where each kept sample's members lie in the shard: enough to cut samples from buffers, and
    to check each member's header in the buffer against the index (:mod:`infobatch_stream.verify`)."""

    def __init__(
        self,
        view: WorkerView,
        shard: int,
        url: str,
        epoch: int,
        kept: np.ndarray,
        boosted: np.ndarray,
        start: np.ndarray,
    ) -> None:
        index = view.index
        self.url, self.epoch, self.tag = url, epoch, view.tag
        self.lo = index.slots(shard)[0]
        rows = index.rows(shard)
        self.offsets, self.sizes = rows.data_offset.tolist(), rows.size.tolist()
        suffixes = index.shard_suffixes(shard)
        self.suffix_of = [suffixes[i] for i in rows.suffix_id.tolist()]
        self.member_first = rows.member_first.tolist()
        self.keys = index.keys(shard)
        self.kept, self.boosted = kept.tolist(), boosted.tolist()
        self.members = verify.KeptMembers(
            kept=kept,
            member_first=rows.member_first,
            offsets=rows.data_offset,
            sizes=rows.size,
            starts=start,
            key_blob=rows.key_blob,
            key_offsets=rows.key_offsets,
            suffix_ids=rows.suffix_id,
            suffixes=suffixes,
        )

    def samples(self, buf: bytes, r: ReadRange) -> Iterator[dict[str, Any]]:
        self.check(buf, r)
        offsets, sizes, suffix_of, member_first = self.offsets, self.sizes, self.suffix_of, self.member_first
        for pos in self.kept[r.kept_lo : r.kept_hi]:
            sample: dict[str, Any] = {"__key__": self.keys[pos], "__url__": self.url}
            for j in range(member_first[pos], member_first[pos + 1]):
                a = offsets[j] - r.start
                sample[suffix_of[j]] = buf[a : a + sizes[j]]
            sample[META_KEY] = make_meta(self.lo + pos, self.epoch, self.boosted[pos], self.tag)
            yield sample

    def check(self, buf: bytes, r: ReadRange) -> None:
        """Refuse the buffer unless every kept member's header in it names that member's key and
        suffix and has its size: a shard changed under the index yields an error, never wrong bytes."""
        table = self.members
        rows = table.rows(r.kept_lo, r.kept_hi)
        if rows.stop == rows.start:
            return
        if len(buf) != r.end - r.start or not table.in_bounds(rows, r.start, len(buf)):
            self._stale(
                int(table.owners[rows.start]),
                int(table.members[rows.start]),
                "the index's offsets do not fit the bytes read",
            )
        bad = np.flatnonzero(~table.fast_ok(buf, r.start, rows)) + rows.start
        for i in bad.tolist():
            j, pos = int(table.members[i]), int(table.owners[i])
            entry = buf[int(table.entry[i]) - r.start : self.offsets[j] - r.start]  # its headers, up to its body
            if not verify.exact_ok(entry, self.keys[pos], self.suffix_of[j], self.sizes[j], self.url):
                self._stale(pos, j, "the tar header there names another member or size")

    def _stale(self, pos: int, j: int, why: str) -> None:
        raise StaleIndexError(
            f"shard {self.url}: member {self.keys[pos]}.{self.suffix_of[j]} ({self.sizes[j]} bytes at byte "
            f"{self.offsets[j]}) is not where the index puts it: {why}; the shard changed since it was indexed: "
            "re-run `infobatch-stream index`"
        )


class _Job:
    """One shard request on its way: planned ranges, reads in flight, its I/O counts."""

    def __init__(self, view: WorkerView, req: ShardRequest, epoch: int, thresh: float, options: ReadOptions) -> None:
        self.view, self.req, self.options = view, req, options
        self.counter = _Counter()
        self.ranges: list[ReadRange] = []
        self.futures: deque[tuple[Future, int]] = deque()
        self.submitted = 0
        self.held = 0  # bytes of the range being yielded, released when it is done
        self.cancelled = False  # failed or abandoned: nothing more is requested
        self.opened = False
        self.region = 0
        self.empty = False
        self._close: Callable[[], None] = lambda: None
        self._read: Callable[[int, int], bytes] | None = None
        self.mode = "none"
        if req.error is not None:
            return
        try:
            self._plan(epoch, thresh)
        except Exception as exn:  # noqa: BLE001 - raised when the consumer reaches this shard
            req.error = exn

    def _plan(self, epoch: int, thresh: float) -> None:
        view, req = self.view, self.req
        index = view.index
        self.info = index.shards[req.shard]
        keep, boosted = view.decide_shard(req.shard, epoch, thresh)
        kept = np.flatnonzero(keep)
        first, stop = req.part if req.part is not None else (0, len(kept))
        if stop <= first or (req.only is not None and len(req.only) == 0):
            self.empty = True
            return
        chosen = kept[first:stop] if req.only is None else kept[np.asarray(req.only, dtype=np.int64)]
        if not index.has_rows(req.shard) and not give_rows(index, req.shard, req.url):
            # epoch 0 of an index being built: stream the shard; the part whose kept samples end the
            # shard reads to its end and leaves the shard's scan behind (:mod:`.streamindex`)
            self.mode, self.backend = "index", backend_for(req.url)
            self.wanted, self.to_end = chosen, int(chosen[-1]) == int(kept[-1])
            self.boosted, self.epoch = boosted, epoch
            return
        self.info = index.shard_info(req.shard)  # as the shard's scan found it, while the index is being built
        start, end = index.byte_ranges(req.shard)
        self.region = _region(self.info, end, kept, first, stop) if req.only is None else 0
        kept = chosen
        url = req.url
        local = is_local(url)
        self.backend = backend_for(url)
        if self.info.compression is not None or url.startswith("pipe:") or not self.info.ranges:
            self.mode = "stream"
        else:
            self.mode = "ranges" if self.backend.concurrent else "local"
        gap = self.options.merge_gap
        if gap is None:
            gap = LOCAL_MERGE_GAP if local else REMOTE_MERGE_GAP
        cap = MAX_RANGE_BYTES if self.mode != "ranges" else self.options.remote_range_bytes()
        self.ranges = plan_ranges(start, end, kept, gap, cap)
        self.layout = _Layout(view, req.shard, url, epoch, kept, boosted, start)

    # ---- submission (called by the scheduler) ---------------------------------------------------
    def next_size(self) -> int | None:
        """Bytes of the next range to submit, or None when this job submits nothing more."""
        if self.req.error is not None or self.mode != "ranges" or self.submitted >= len(self.ranges) or self.cancelled:
            return None
        r = self.ranges[self.submitted]
        return r.end - r.start

    def submit_next(self, ahead: ReadAhead) -> None:
        r = self.ranges[self.submitted]
        url, backend = self.req.url, self.backend
        self.futures.append((ahead.submit(lambda: backend.read(url, r.start, r.end), r.end - r.start), r.end - r.start))
        self.submitted += 1

    # ---- consumption ----------------------------------------------------------------------------
    def samples(self, ahead: ReadAhead, fill: Callable[[], None]) -> Iterator[dict[str, Any]]:
        if self.req.error is not None:
            raise self.req.error
        if self.empty:
            return
        if self.mode == "index":
            yield from self._indexing_samples()
            return
        try:
            yield from self._read_ranges(ahead, fill)
        except StaleIndexError:
            building = self.view.index.building
            if building is not None and not is_local(self.req.url):  # its rows came from an earlier scan
                ScanDir(building.scans).drop(self.req.shard)  # stale: the shard is indexed again
            raise

    def _read_ranges(self, ahead: ReadAhead, fill: Callable[[], None]) -> Iterator[dict[str, Any]]:
        self._open()
        cut = self.layout.samples
        for r in self.ranges:
            if self.mode == "ranges":
                if not self.futures:
                    self.submit_next(ahead)
                buf, self.held = self._take(r, ahead)  # may turn the job to "stream" (no Range)
                self.opened = True
            else:
                assert self._read is not None
                buf = self._read(r.start, r.end)
            yield from cut(buf, r)
            if self.held:
                ahead.release(self.held)
                self.held = 0
                fill()

    def _indexing_samples(self) -> Iterator[dict[str, Any]]:
        view, req = self.view, self.req
        index = view.index
        building = index.building
        assert building is not None
        raw, seen = self.backend.stream(req.url)
        self._close = lambda: _close_stream(raw)
        self.opened = True
        _check_fresh(req.url, self.info, self.options.verify, seen)
        self.counter.requests += 1
        counted = _CountingStream(raw, self.counter)
        stream, compression = decompressed(counted, req.url)  # type: ignore[arg-type]
        lo, tag, epoch, boosted = index.slots(req.shard)[0], view.tag, self.epoch, self.boosted

        def complete(scan: ShardSamples) -> None:
            record_stored_size(req.url, scan, seen, compression, self.counter.bytes_read)  # as indexing does
            etag = None if seen is None else seen.etag
            ranged = serves_ranges(req.url, scan, compression)  # as indexing records it (one 1-byte read)
            ScanDir(building.scans).save(req.shard, Scan(req.url, scan, None, etag, compression, ranged))

        for pos, key, fields in read_and_index(stream, req.url, self.info.nsamples, self.wanted, self.to_end, complete):
            sample: dict[str, Any] = {"__key__": key, "__url__": req.url, **fields}
            sample[META_KEY] = make_meta(lo + pos, epoch, bool(boosted[pos]), tag)
            yield sample

    def _take(self, r: ReadRange, ahead: ReadAhead) -> tuple[bytes, int]:
        future, held = self.futures.popleft()
        try:
            buf, seen = future.result()
        except RangeNotSupported:
            ahead.release(held)
            self._to_stream(ahead)
            assert self._read is not None
            return self._read(r.start, r.end), 0
        except BaseException:
            ahead.release(held)
            raise
        self.counter.requests += 1
        self.counter.bytes_read += len(buf)
        try:
            _check_fresh(self.req.url, self.info, self.options.verify, seen)
        except BaseException:
            ahead.release(held)
            raise
        return buf, held

    def _open(self) -> None:
        url, info, verify = self.req.url, self.info, self.options.verify
        if self.mode == "local":
            fd, seen = self.backend.open(url)  # type: ignore[attr-defined]
            self._close = lambda: os.close(fd)
            _check_fresh(local_path(url), info, verify, seen)
            read_fd = self.backend.read_fd  # type: ignore[attr-defined]
            counter = self.counter

            def read(a: int, b: int) -> bytes:
                data = read_fd(fd, url, a, b)
                counter.bytes_read += len(data)
                counter.requests += 1
                return data

            self._read = read
        elif self.mode == "stream":
            self._open_stream()
        self.opened = self.mode != "ranges"  # a remote shard counts as opened at its first response

    def _open_stream(self) -> None:
        raw, seen = self.backend.stream(self.req.url)
        self._close = lambda: _close_stream(raw)
        try:
            _check_fresh(self.req.url, self.info, self.options.verify, seen)
        except BaseException:
            self._close()
            self._close = lambda: None
            raise
        self._read = _sequential_reader(raw, self.info.compression is not None, self.counter, self.req.url)

    def _to_stream(self, ahead: ReadAhead) -> None:
        """The server ignores ``Range``: read the rest of this shard as one stream."""
        log.info("%s: the server ignores Range requests; streaming the shard", self.req.url)
        self.cancel(ahead)
        self.mode = "stream"
        self._open_stream()

    def cancel(self, ahead: ReadAhead) -> None:
        """Drop the reads still queued or in flight (their bytes are released); request no more."""
        self.cancelled = True
        ahead.release(self.held)
        self.held = 0
        while self.futures:
            future, held = self.futures.popleft()
            if not future.cancel() and future.done() and future.exception() is None:
                self.counter.requests += 1
                self.counter.bytes_read += len(future.result()[0])
            ahead.release(held)

    def finish(self, generation: int | None, ahead: ReadAhead) -> None:
        """Close the shard and add its I/O to the epoch's counts: a shard counts as read once its
        turn came and it opened; one read ahead and dropped adds only the bytes it moved."""
        self.cancel(ahead)
        try:
            self._close()
        finally:
            control, worker = self.view.control, current_worker()
            if self.empty:
                control.add_io(
                    worker, generation, shards_skipped=1, bytes_skipped=self.view.index.shards[self.req.shard].filesize
                )
            elif self.opened:
                control.add_io(
                    worker,
                    generation,
                    bytes_read=self.counter.bytes_read,
                    requests=self.counter.requests,
                    shards_read=1,
                    bytes_skipped=max(self.region - self.counter.bytes_read, 0),
                )
            elif self.counter.requests:
                control.add_io(worker, generation, bytes_read=self.counter.bytes_read, requests=self.counter.requests)


# Long on purpose: one scheduler loop (plan, submit, consume, hand errors to the handler) reads best whole.
def read_requests(
    view: WorkerView,
    requests: Iterable[ShardRequest],
    epoch: int,
    thresh: float,
    options: ReadOptions = ReadOptions(),
    *,
    handler: Callable[[Exception], bool] = reraise_exception,
    generation: int | None = None,
    tagged: bool = False,
) -> Iterator[Any]:
    """The kept samples of each request, in order (``(request, sample)`` pairs with ``tagged``),
    with reads of the next ranges and shards in flight meanwhile (bounded by ``options``).

    ``handler`` follows WebDataset: it gets a shard's exception (with the URL appended to its
    args) and returns True to go on with the next shard (counted in ``shards_failed``); False
    ends the stream; the default re-raises."""
    ahead = ReadAhead(options.max_inflight, options.readahead_bytes)
    jobs: deque[_Job] = deque()  # planned shards, the one being yielded first
    submitting: deque[_Job] = deque()  # those of them with ranges still to request
    source = iter(requests)
    exhausted = False

    def fill() -> None:
        """Request ranges while there is room, planning the next shards when they are remote."""
        nonlocal exhausted
        while True:
            while submitting and submitting[0].next_size() is None:
                submitting.popleft()
            if not submitting:
                # plan ahead only behind remote shards: a local read never waits
                if exhausted or len(jobs) > SHARDS_AHEAD or (jobs and jobs[-1].mode != "ranges"):
                    return
                try:
                    req = next(source, None)
                except Exception as exn:  # noqa: BLE001 - the shard list failed: reported in its turn
                    req = ShardRequest("<shard list>", error=exn)
                    exhausted = True
                if req is None:
                    exhausted = True
                    return
                job = _Job(view, req, epoch, thresh, options)
                jobs.append(job)
                if job.next_size() is not None:
                    submitting.append(job)
                continue
            size = submitting[0].next_size()
            if size is None or not ahead.room_for(size):
                return
            submitting[0].submit_next(ahead)

    try:
        while True:
            fill()
            if not jobs:
                return
            job = jobs[0]
            try:
                if tagged:
                    for sample in job.samples(ahead, fill):
                        yield job.req, sample
                else:
                    yield from job.samples(ahead, fill)
            except Exception as exn:  # noqa: BLE001 - handed to the user's handler, as WebDataset does
                job.cancel(ahead)
                if not handle(handler, exn, job.req.url):
                    return
                view.control.add_io(current_worker(), generation, shards_failed=1)
            finally:
                jobs.popleft()
                job.finish(generation, ahead)
    finally:
        for job in jobs:  # abandoned early: reads ahead are dropped, what they moved is counted
            job.finish(generation, ahead)


def read_shard(
    view: WorkerView,
    url: str,
    shard: int,
    epoch: int,
    thresh: float,
    *,
    merge_gap: int | None = None,
    verify: str = "size+mtime",
    part: tuple[int, int] | None = None,
    only: np.ndarray | None = None,
    generation: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The kept samples of one shard (see :class:`ShardRequest` for ``part`` and ``only``)."""
    options = ReadOptions(merge_gap=merge_gap, verify=verify)
    request = ShardRequest(url, shard, part, only)
    yield from read_requests(view, [request], epoch, thresh, options, generation=generation)


def _requests_from(
    src: Iterable[dict[str, Any]], view: WorkerView, done: list[bool], mark: int
) -> Iterator[ShardRequest]:
    """Shard requests for the ``{"url": ...}`` items of a shard list (``ib.shards()`` or any);
    ``done[0]`` turns True when ``src`` is exhausted; ``mark``: see :meth:`Announcements.started_since`."""
    announced = view.announced
    for item in src:
        url = str(item.get("url")) if isinstance(item, dict) else repr(item)
        try:
            if not isinstance(item, dict) or "url" not in item:
                raise ValueError(f"ib.tarfile_to_samples() needs shard items like {{'url': ...}}, got {item!r}")
            shard = item[SHARD_KEY] if SHARD_KEY in item else view.index.shard_of_url(url)
            if announced.started_since(mark) and announced.pop(view.index.shard_of_url(url)) is None:
                raise ShardAssignmentError(  # keyed as ib.shards() announced it
                    f"shard {url} reached ib.tarfile_to_samples() but ib.shards() did not hand it to this worker (or "
                    "not again): a stage between them added or repeated shards; remove it"
                )
            yield ShardRequest(url, shard, item.get(PART_KEY))
        except Exception as exn:  # noqa: BLE001 - reported in order, through the handler
            yield ShardRequest(url, error=exn)
    done[0] = True


def read_samples(
    src: Iterable[dict[str, Any]],
    view: WorkerView,
    *,
    handler: Callable[[Exception], bool] = reraise_exception,
    options: ReadOptions = ReadOptions(),
    merge_gap: int | None = None,
    verify: str | None = None,
) -> Iterator[dict[str, Any]]:
    """For each ``{"url": ...}`` from ``src``: the shard's kept samples, tagged with ``__ib__``."""
    if merge_gap is not None or verify is not None:
        options = ReadOptions(
            merge_gap if merge_gap is not None else options.merge_gap,
            verify or options.verify,
            options.max_inflight,
            options.readahead_bytes,
        )
    epoch, thresh = view.begin_pass()
    generation = view.control.generation
    done, mark = [False], view.announced.passes
    yield from read_requests(
        view, _requests_from(src, view, done, mark), epoch, thresh, options, handler=handler, generation=generation
    )
    if done[0]:  # not when the handler stopped the stream: a splitter is told from a short read
        view.announced.check_all_read("ib.tarfile_to_samples()", mark)


class ReaderStage:
    """``ib.tarfile_to_samples()``: a picklable pipeline stage wrapping :func:`read_samples`."""

    def __init__(self, view: WorkerView, handler: Callable[[Exception], bool], options: ReadOptions) -> None:
        self.view, self.handler, self.options = view, handler, options

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return read_samples(src, self.view, handler=self.handler, options=self.options)
