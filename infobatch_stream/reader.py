"""The skip-aware tar reader: read only the kept samples' bytes.

A drop-in for ``wds.tarfile_to_samples()`` followed by ``ib.filter()``, with the same output
(keys, bytes, order, ``__url__``, ``__ib__``). When a shard is opened its keep mask is computed
from the store; kept samples become byte ranges from the index; only those are read:

- local files: ``seek`` past pruned runs;
- ``http(s)://``: one Range request per kept run on a kept-alive connection;
- anything that cannot seek (``pipe:``, gzip/bz2/xz shards): read sequentially, discard pruned
  bytes without parsing them;
- shards with nothing kept are not opened.

Samples are cut out of the read buffers with the index's member offsets: no tar header is parsed.

**Cost model for merging.** Two kept runs separated by a gap of ``g`` pruned bytes are read as one
range when ``g <= merge_gap``: one more request costs about as much as transferring
``latency x bandwidth`` bytes. Defaults: 4 KiB for local files (a syscall and a page), 64 KiB for
HTTP (a server ~1 ms away at ~64 MB/s). For an object store with 30 ms first-byte latency at
100 MB/s, ``merge_gap=3_000_000`` is the break-even point.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from webdataset.handlers import reraise_exception

from . import httpio
from .index import ShardInfo, _is_local, _strip_file_scheme
from .meta import META_KEY, make_meta
from .stages import PART_KEY, SHARD_KEY, current_worker
from .tarscan import BLOCK, _checksum_ok, _read_full, decompressed

if TYPE_CHECKING:
    from .infobatch import InfoBatch

log = logging.getLogger(__name__)

LOCAL_MERGE_GAP = 4 << 10
HTTP_MERGE_GAP = 64 << 10
MAX_RANGE_BYTES = 16 << 20  # bounds the buffer of one read


class StaleIndexError(RuntimeError):
    """A shard differs from what the index recorded: reading at stale offsets would return garbage."""


@dataclass(frozen=True)
class ReadRange:
    start: int  # byte offset of the first kept sample
    end: int  # end of the last kept sample
    first: int  # index into the kept positions
    stop: int


def plan_ranges(start: np.ndarray, end: np.ndarray, kept: np.ndarray, merge_gap: int,
                max_bytes: int = MAX_RANGE_BYTES) -> list[ReadRange]:
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


class _Counter:
    def __init__(self) -> None:
        self.bytes_read = 0
        self.requests = 0


def _check_fresh(url: str, info: ShardInfo, verify: str, size: int | None, mtime: float | None = None,
                 etag: str | None = None) -> None:
    """Refuse a shard that differs from what the index recorded: its offsets would be wrong."""
    problem = None
    if size is not None and info.filesize and size != info.filesize:
        problem = f"its size is {size} bytes, the index says {info.filesize}"
    elif verify == "size+mtime" and mtime is not None and info.mtime is not None and mtime != info.mtime:
        problem = f"its mtime is {mtime}, the index says {info.mtime} (shards copied with new mtimes: verify='size')"
    elif verify == "size+mtime" and etag and info.etag and etag != info.etag:
        problem = f"its ETag is {etag}, the index recorded {info.etag}"
    if problem:
        raise StaleIndexError(f"shard {url} changed since it was indexed: {problem}; re-run `infobatch-stream index`")


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


def _local_reader(path: str, info: ShardInfo, verify: str, counter: _Counter) -> tuple[Callable[[int, int], bytes], Callable[[], None]]:
    f = open(path, "rb", buffering=0)
    try:
        st = os.fstat(f.fileno())
        _check_fresh(path, info, verify, st.st_size, st.st_mtime)
        if info.compression is not None:
            return _sequential_reader(f, True, counter, path), f.close
    except BaseException:
        f.close()
        raise

    def read(a: int, b: int) -> bytes:
        f.seek(a)
        data = _read_full(f, b - a)
        counter.bytes_read += len(data)
        counter.requests += 1
        if len(data) != b - a:
            raise StaleIndexError(f"shard {path} ended at byte {a + len(data)}, the index expects {b}; re-index it")
        return data

    return read, f.close


def _http_reader(url: str, info: ShardInfo, verify: str, counter: _Counter) -> Callable[[int, int], bytes]:
    whole: bytes | None = None  # the full body, once a server that ignores Range sent it

    def read(a: int, b: int) -> bytes:
        nonlocal whole
        if whole is not None:
            return whole[a:b]
        resp = httpio.get_range(url, a, b)
        counter.requests += 1
        counter.bytes_read += len(resp.data if resp.whole is None else resp.whole)
        whole = resp.whole
        _check_fresh(url, info, verify, resp.total, etag=resp.etag)
        return resp.data

    return read


def _close_stream(raw: Any) -> None:
    """Close a stream the reader may abandon before its end: a ``pipe:`` child then dies of
    SIGPIPE, which is expected here, not an error (a truncated stream was caught while reading)."""
    if hasattr(raw, "ignore_errors"):
        raw.ignore_errors = True
    raw.close()


def _open(url: str, info: ShardInfo, verify: str, counter: _Counter) -> tuple[Callable[[int, int], bytes], Callable[[], None]]:
    local = _strip_file_scheme(url)
    if _is_local(local):
        return _local_reader(local, info, verify, counter)
    if httpio.is_http(url) and info.compression is None:
        return _http_reader(url, info, verify, counter), lambda: None
    if httpio.is_http(url):  # compressed: offsets are in the decompressed tar, so stream it
        response = httpio.open_stream(url)
        try:
            _check_fresh(url, info, verify, response.length, etag=response.etag)
        except BaseException:
            response.close()
            raise
        return _sequential_reader(response, True, counter, url), response.close  # type: ignore[arg-type]
    from webdataset.gopen import gopen

    raw = gopen(url, "rb")
    return _sequential_reader(raw, info.compression is not None, counter, url), lambda: _close_stream(raw)


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


def read_shard(ib: "InfoBatch", url: str, shard: int, epoch: int, thresh: float, *,
               merge_gap: int | None = None, verify: str = "size+mtime",
               part: tuple[int, int] | None = None, only: np.ndarray | None = None,
               generation: int | None = None) -> Iterator[dict[str, Any]]:
    """The kept samples of one shard, cut from the byte ranges that hold them: all of them, its
    kept samples ``[first, stop)`` given ``part``, or those at the kept ordinals ``only``
    (ascending; re-reading a resumed shuffle buffer)."""
    index = ib.index
    keep, boosted = ib.decide_shard(shard, epoch, thresh)
    worker = current_worker()
    kept = np.flatnonzero(keep)
    first, stop = part if part is not None else (0, len(kept))
    if stop <= first or (only is not None and len(only) == 0):
        ib.control.add_io(worker, generation, shards_skipped=1, bytes_skipped=index.shards[shard].filesize)
        return
    lo, hi = index.slots(shard)
    start, end = index.byte_ranges(shard)
    region = _region(index.shards[shard], end, kept, first, stop) if only is None else 0
    kept = kept[first:stop] if only is None else kept[np.asarray(only, dtype=np.int64)]
    if merge_gap is None:
        merge_gap = HTTP_MERGE_GAP if httpio.is_http(url) else LOCAL_MERGE_GAP
    ranges = plan_ranges(start, end, kept, merge_gap, MAX_RANGE_BYTES)
    member_first = np.asarray(index.array("member_first")[lo:hi + 1])
    m0 = int(member_first[0])
    offsets = np.asarray(index.array("data_offset")[m0:member_first[-1]]).tolist()
    sizes = np.asarray(index.array("size")[m0:member_first[-1]]).tolist()
    suffix_of = [index.suffixes[i] for i in np.asarray(index.array("suffix_id")[m0:member_first[-1]]).tolist()]
    member_first = (member_first - m0).tolist()
    keys = index.keys(shard)
    kept_list, boosted_list = kept.tolist(), boosted.tolist()
    counter = _Counter()
    read, close = _open(url, index.shards[shard], verify, counter)
    try:
        for r in ranges:
            buf = read(r.start, r.end)
            if not _checksum_ok(buf[:BLOCK]):
                raise StaleIndexError(
                    f"shard {url}: no tar header at byte {r.start}, where the index puts sample "
                    f"{keys[kept_list[r.first]]!r}; the shard changed since it was indexed: "
                    "re-run `infobatch-stream index`")
            for pos in kept_list[r.first:r.stop]:
                sample: dict[str, Any] = {"__key__": keys[pos], "__url__": url}
                for j in range(member_first[pos], member_first[pos + 1]):
                    a = offsets[j] - r.start
                    sample[suffix_of[j]] = buf[a:a + sizes[j]]
                sample[META_KEY] = make_meta(lo + pos, epoch, boosted_list[pos], ib.tag)
                yield sample
    finally:
        try:
            close()
        finally:
            ib.control.add_io(worker, generation, bytes_read=counter.bytes_read, requests=counter.requests,
                              shards_read=1, bytes_skipped=max(region - counter.bytes_read, 0))


def read_samples(src: Iterable[dict[str, Any]], ib: "InfoBatch", *,
                 handler: Callable[[Exception], bool] = reraise_exception,
                 merge_gap: int | None = None, verify: str = "size+mtime") -> Iterator[dict[str, Any]]:
    """For each ``{"url": ...}`` from ``src``: the shard's kept samples, tagged with ``__ib__``.

    ``handler`` follows WebDataset: it gets the exception (with the URL appended to its args)
    and returns True to go on with the next shard; the default re-raises.
    """
    if verify not in ("size", "size+mtime"):
        raise ValueError(f"verify must be 'size' or 'size+mtime', got {verify!r}")
    epoch, thresh = ib.begin_pass()
    generation = ib.control.generation
    for item in src:
        url = item["url"]
        try:
            shard = item[SHARD_KEY] if SHARD_KEY in item else ib.index.shard_of_url(url)
            yield from read_shard(ib, url, shard, epoch, thresh, merge_gap=merge_gap, verify=verify,
                                  part=item.get(PART_KEY), generation=generation)
        except Exception as exn:  # noqa: BLE001 - handed to the user's handler, as WebDataset does
            exn.args = exn.args + (url,)
            if handler(exn):
                ib.control.add_io(current_worker(), generation, shards_failed=1)
                continue
            break


class ReaderStage:
    """``ib.tarfile_to_samples()``: a picklable pipeline stage wrapping :func:`read_samples`."""

    def __init__(self, ib: "InfoBatch", handler: Callable[[Exception], bool], merge_gap: int | None, verify: str) -> None:
        self.ib, self.handler, self.merge_gap, self.verify = ib, handler, merge_gap, verify

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return read_samples(src, self.ib, handler=self.handler, merge_gap=self.merge_gap, verify=self.verify)
