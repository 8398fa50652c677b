"""Read a shard sequentially, as WebDataset does, and index it on the way.

Used in the first epoch of a run started from a wids shard list (:mod:`infobatch_stream.building`)
for shards that can only be streamed cheaply: object stores, HTTP, ``pipe:``, compressed tars.
The headers are parsed by :mod:`infobatch_stream.tarscan`, exactly as ``infobatch-stream index``
parses them, so the scan that results is the one the indexing pass would have made; the member
bodies the parser reads past are kept just long enough to hand their sample on. One sample is
held back until the next one is complete, so a shard with more samples than its list entry says
is refused before a sample gets a slot outside its shard, and the last sample is handed on only
once the shard's scan is complete and saved (a checkpoint taken after it then finds the scan).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np

from .errors import IndexMismatchError
from .tarscan import ShardSamples, TarMember, drain_tail, grouped, iter_members, sample_field

Fields = dict[str, bytes]


class _Capture:
    """A sequential stream that keeps the bytes of the one body it is told to keep."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.pos = raw, 0
        self.want: tuple[int, int] | None = None
        self.parts: list[bytes] = []

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if self.want is not None and data:
            a, b = self.want
            lo, hi = max(a, self.pos), min(b, self.pos + len(data))
            if hi > lo:
                self.parts.append(data[lo - self.pos : hi - self.pos])
        self.pos += len(data)
        return data

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        body, self.parts, self.want = b"".join(self.parts), [], None
        return body


def _members(stream: _Capture, url: str, bodies: deque[bytes]) -> Iterator[TarMember]:
    """The shard's members; the body of each sample member lands in ``bodies`` before the next
    member is handed on (the parser reads it in between)."""
    keeping = False
    for member in iter_members(stream, url):  # type: ignore[arg-type]
        if keeping:
            bodies.append(stream.take())
        keeping = sample_field(member) is not None
        if keeping:
            stream.want = (member.data_offset, member.data_offset + member.size)
        yield member
    if keeping:
        bodies.append(stream.take())


def read_and_index(
    stream: BinaryIO,
    url: str,
    nsamples: int,
    wanted: np.ndarray,
    to_end: bool,
    on_complete: Callable[[ShardSamples], None],
) -> Iterator[tuple[int, str, Fields]]:
    """``(position, key, fields)`` of the samples at the ascending positions ``wanted``.

    With ``to_end`` the shard is parsed to its end, its sample count checked against
    ``nsamples``, and ``on_complete(scan)`` called (``scan.filesize``: the tar's length) before
    the last sample is handed on; without it reading stops after the last wanted sample."""
    out = ShardSamples()
    capture = _Capture(stream)
    bodies: deque[bytes] = deque()
    want = wanted.tolist()
    k, held = 0, None
    for i in grouped(_members(capture, url, bodies), url, out):
        if i >= nsamples:
            raise IndexMismatchError(
                f"shard {url} has more samples than the {nsamples} its shard list entry says: correct the "
                "list's nsamples (or index the shards with `infobatch-stream index`)"
            )
        fields = [bodies.popleft() for _ in range(out.nmembers[i])]
        if held is not None:
            yield held
            held = None
        if k < len(want) and want[k] == i:
            first = len(out.suffixes) - out.nmembers[i]
            held = (i, out.keys[i], dict(zip(out.suffixes[first:], fields)))
            k += 1
        elif k == len(want) and not to_end:
            break
    if to_end:
        drain_tail(capture, url)  # type: ignore[arg-type]
        out.filesize = capture.pos
        if len(out) != nsamples:
            raise IndexMismatchError(
                f"shard {url} has {len(out)} samples but its shard list entry says {nsamples}: correct the "
                "list's nsamples (or index the shards with `infobatch-stream index`)"
            )
        on_complete(out)
    if held is not None:
        yield held
