"""Random tar layouts through the two layers above the header scanner: the index builder and the
skip-aware reader (``ib.tarfile_to_samples()``).

Layouts come from ``helpers.tars.layouts()`` (directories, GNU long names, PAX paths, odd
suffixes, sizes around the 512-byte block), written as real ``.tar`` or ``.tar.gz`` files. The
reference is WebDataset reading the same file. Whatever is done to a shard (cut at any byte, grown,
header bytes overwritten), the answer must be the right samples or a clear error naming the
shard, never other bytes and never a hang (each example runs under an alarm).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tarfile
import tempfile
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from infobatch_stream import META_KEY, DatasetIndex, InfoBatch, build_index
from infobatch_stream.reader import StaleIndexError
from infobatch_stream.tarscan import BLOCK, TarFormatError
from tests.helpers.guards import fails_instead_of_hanging
from tests.helpers.tars import build_layout, layouts, members_of, sample_fields, wds_samples, wds_samples_of_bytes

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DUPLICATE = "duplicate"  # WebDataset refuses a sample that repeats a suffix
Sample = tuple[str, dict[str, bytes]]  # key and fields


# ---- helpers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch() -> Iterator[str]:
    """A fresh folder per example (``tmp_path`` is one per test, shared by all examples), under an
    alarm: an endless loop fails the example instead of stalling the run."""
    with fails_instead_of_hanging(10), tempfile.TemporaryDirectory() as folder:
        yield folder


def write_shard(folder: str, name: str, raw: bytes, compress: bool = False) -> str:
    path = os.path.join(folder, name + (".tar.gz" if compress else ".tar"))
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def view(samples: list[dict]) -> list[Sample]:
    return [(s["__key__"], sample_fields(s)) for s in samples]


def webdataset_view(path: str) -> list[Sample] | str:
    """What WebDataset's own ``tarfile_to_samples`` makes of the file, or ``DUPLICATE``."""
    try:
        return view(wds_samples(path))
    except ValueError as e:
        assert "duplicate" in str(e)
        return DUPLICATE


def indexed_view(index: DatasetIndex, shard: int, raw: bytes) -> list[Sample]:
    """The samples as the index describes them: keys, and fields cut out of the (decompressed)
    tar with the index's member offsets and sizes."""
    rows = index.rows(shard)
    first, offset, size, suffix = (
        getattr(rows, name).tolist() for name in ("member_first", "data_offset", "size", "suffix_id")
    )
    out = []
    for pos, key in enumerate(index.keys(shard)):
        members = range(first[pos], first[pos + 1])
        fields = {index.suffixes[suffix[j]]: raw[offset[j] : offset[j] + size[j]] for j in members}
        assert len(fields) == len(members), (key, "two members with one suffix")
        out.append((key, fields))
    return out


def assert_index_is(index: DatasetIndex, shard: int, raw: bytes, expected: list[Sample]) -> None:
    """Keys and bytes as expected, and each sample's ``[start, end)`` range is a self-contained
    piece of tar (what the reader fetches): concatenated, WebDataset reads the same samples."""
    assert index.nsamples[shard] == len(expected)
    assert indexed_view(index, shard, raw) == expected
    start, end = index.byte_ranges(shard)
    assert np.all(start[1:] >= end[:-1]) and np.all(start % BLOCK == 0) and np.all(end <= len(raw))
    pieces = b"".join(raw[a:b] for a, b in zip(start.tolist(), end.tolist())) + b"\0" * (2 * BLOCK)
    assert view(wds_samples_of_bytes(pieces)) == expected


def assert_clear(err: BaseException, path: str) -> None:
    message = str(err)
    assert path in message and "byte" in message, message


def prefix_after_cut(raw: bytes, cut: int) -> list[Sample] | str | None:
    """What an index of ``raw[:cut]`` must hold: None where the cut leaves a partial member or
    header (an error), else the samples of the whole members before the cut."""
    members = members_of(raw)
    last_end = members[-1].end if members else 0
    if cut == 0 or not (cut in {m.header_offset for m in members} or cut == last_end or cut >= last_end + BLOCK):
        return None
    try:
        return view(wds_samples_of_bytes(raw[:cut] + b"\0" * (2 * BLOCK)))
    except ValueError:
        return DUPLICATE


def header_spans(raw: bytes) -> list[tuple[int, int]]:
    """The bytes of each entry before its body (its header, GNU long names and PAX records), and
    the end-of-archive blocks: bytes that hold no sample data."""
    members = members_of(raw)
    end = members[-1].end if members else 0
    return [(m.header_offset, m.data_offset) for m in members] + [(end, len(raw))]


def header_bytes(raw: bytes, where: float) -> tuple[int, int]:
    """A span of ``header_spans`` chosen by ``where`` in [0, 1): a byte in it, and the span's end."""
    spans = header_spans(raw)
    a, b = spans[int(where * len(spans))]
    return a + int(where * 7919) % (b - a), b


# ---- 1. the index builder -----------------------------------------------------------------------


@FUZZ
@given(layouts(), st.booleans())
@example(([("a.jpg", b"1"), ("a.cls", b"2"), ("a.JPG", b"3")], 0), False)  # a repeated suffix
@example(([("a.jpg", b"1"), ("a.cls", b"2"), ("a.JPG", b"3")], 0), True)
def test_index_agrees_with_webdataset(layout, compress):
    """The index lists the samples WebDataset reads from the same file, with offsets that cut out
    the same bytes; a shard WebDataset refuses is refused with the offending member's offset."""
    raw = build_layout(*layout)
    with scratch() as folder:
        path = write_shard(folder, "s", raw, compress)
        expected = webdataset_view(path)
        if expected == DUPLICATE:
            with pytest.raises(TarFormatError, match="repeats suffix") as err:
                build_index([path])
            assert_clear(err.value, path)
            return
        index = build_index([path], os.path.join(folder, "index.json"))
        assert_index_is(index, 0, raw, expected)
        assert index.shards[0].filesize == os.path.getsize(path)
        assert index.shards[0].compression == ("gzip" if compress else None)
        assert indexed_view(DatasetIndex.load(index.path), 0, raw) == expected  # memory-mapped round trip


@FUZZ
@given(layouts(), st.floats(0, 1))
def test_index_of_a_cut_shard_is_a_prefix_or_a_clear_error(layout, where):
    """A shard cut at any byte: the whole members before a cut at an entry boundary, or a
    ``TarFormatError`` naming the shard and the byte where the damage starts."""
    raw = build_layout(*layout)
    cut = int(where * len(raw))
    expected = prefix_after_cut(raw, cut)
    with scratch() as folder:
        path = write_shard(folder, "cut", raw[:cut])
        if expected is None or expected == DUPLICATE:
            with pytest.raises(TarFormatError, match="truncated|empty|repeats suffix") as err:
                build_index([path])
            assert_clear(err.value, path)
        else:
            assert_index_is(build_index([path]), 0, raw[:cut], expected)


@FUZZ
@given(layouts(), st.booleans(), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=40))
@example(
    ([("dd", None)] * 9 + [("d/sub/" + "k" * 122 + ".jpg", b"")], tarfile.GNU_FORMAT), True, 0.85706, b"\x01\x01\x01"
)  # over the NUL that ends a GNU long name: tarfile reads on into the padding
def test_index_of_an_overwritten_shard_agrees_or_is_a_clear_error(layout, in_header, where, junk):
    """Bytes overwritten anywhere, or in header bytes only: a ``TarFormatError`` naming the shard
    and a byte, or the samples WebDataset reads from the damaged file (never a third answer,
    e.g. an index built where WebDataset fails)."""
    raw = bytearray(build_layout(*layout))
    at, stop = header_bytes(bytes(raw), where) if in_header else (int(where * len(raw)), len(raw))
    raw[at : at + len(junk)] = junk[: stop - at]
    with scratch() as folder:
        path = write_shard(folder, "bad", bytes(raw))
        try:
            index = build_index([path])
        except TarFormatError as err:
            assert_clear(err, path)
        else:
            assert indexed_view(index, 0, bytes(raw)) == webdataset_view(path)


@settings(FUZZ, max_examples=15, phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)
@given(layouts(), st.floats(0, 1, exclude_max=True))
@example(([("a.jpg", b"1")], 0), 0.5)
def test_index_of_a_cut_gzip_shard_is_a_clear_error(layout, where):
    """A compressed shard cut anywhere has lost its gzip trailer: always an error, naming the shard."""
    raw = gzip.compress(build_layout(*layout), mtime=0)
    cut = int(where * len(raw))
    with scratch() as folder:
        path = os.path.join(folder, "cut.tar.gz")
        with open(path, "wb") as f:
            f.write(raw[:cut])
        with pytest.raises(TarFormatError) as err:
            build_index([path])
        assert_clear(err.value, path)


# ---- 2. the reader --------------------------------------------------------------------------------

NUM_EPOCHS = 3  # epoch 0 reads everything, epoch 1 prunes, epoch 2 is full


class Shards:
    """Shards written from random layouts, indexed, and WebDataset's view of each for reference."""

    def __init__(self, folder: str, raws: list[bytes], compress: list[bool]) -> None:
        self.raws = raws
        self.paths = [write_shard(folder, f"shard-{i}", raw, c) for i, (raw, c) in enumerate(zip(raws, compress))]
        refs = [webdataset_view(p) for p in self.paths]
        assume(DUPLICATE not in refs)  # the index refuses those (tested above)
        self.by_slot: list[Sample] = [s for ref in refs for s in ref]
        self.index_path = os.path.join(folder, "index.json")
        build_index(self.paths, self.index_path)

    def read(self, ib: InfoBatch, **kw: Any) -> tuple[list[dict], list[Exception]]:
        """One pass of ``ib.tarfile_to_samples()``; a failing shard is recorded and skipped."""
        errors: list[Exception] = []

        def record(exn: Exception) -> bool:
            errors.append(exn)
            return True

        pipeline = wds.DataPipeline(wds.SimpleShardList(self.paths), ib.tarfile_to_samples(record, **kw))
        return list(pipeline), errors


def kept_slots(ib: InfoBatch, shard: int) -> list[int]:
    """This epoch's plan for one shard: the slots the reader must yield."""
    keep, _ = ib.decide_shard(shard, ib.control.epoch, ib.control.threshold)
    return (ib.index.slots(shard)[0] + np.flatnonzero(keep)).tolist()


def check_samples(ib: InfoBatch, shards: Shards, got: list[dict], failed: Collection[int] = ()) -> None:
    """Every sample has the bytes WebDataset read for its slot; each shard not in ``failed`` gives
    exactly its kept samples in tar order, a failed one a prefix of them."""
    by_shard: dict[int, list[int]] = {}
    for sample in got:
        slot = int(sample[META_KEY][0])
        key, fields = shards.by_slot[slot]
        assert sample["__key__"] == key
        assert {k: v for k, v in sample.items() if not k.startswith("__")} == fields, key
        shard = int(ib.index.shard_of_slot(np.array([slot]))[0])
        assert sample["__url__"] == shards.paths[shard]
        by_shard.setdefault(shard, []).append(slot)
    for shard in range(ib.index.num_shards):
        kept, slots = kept_slots(ib, shard), by_shard.get(shard, [])
        assert slots == (kept[: len(slots)] if shard in failed else kept), shard


def damage(path: str, raw: bytes, how: str, where: float, junk: bytes) -> bool:
    """Cut or grow a shard, or overwrite some of its header bytes keeping its size and mtime (so
    only the reader's own checks can notice); returns whether its size changed."""
    size = os.path.getsize(path)
    if how == "cut":
        os.truncate(path, int(where * size))
        return True
    if how == "grow":
        with open(path, "ab") as f:
            f.write(junk)
        return True
    st_ = os.stat(path)
    at, stop = header_bytes(raw, where)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(junk[: stop - at])
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    return False


@st.composite
def runs(draw):
    layouts_ = draw(st.lists(layouts(), min_size=1, max_size=3))
    return {
        "layouts": layouts_,
        "compress": [draw(st.sampled_from([False, False, True])) for _ in layouts_],
        "seed": draw(st.integers(0, 2**16)),
        "granularity": draw(st.sampled_from([1, 1, 2, 3])),
        "merge_gap": draw(st.sampled_from([0, BLOCK, 4096, 1 << 40])),
        "verify": draw(st.sampled_from(["size", "size+mtime"])),
        "victim": draw(st.integers(0, len(layouts_) - 1)),
        "how": draw(st.sampled_from(["cut", "grow", "overwrite", "overwrite"])),
        "where": draw(st.floats(0, 1, exclude_max=True)),
        "junk": draw(st.binary(min_size=1, max_size=600)),
    }


def test_reader_gives_the_kept_samples_or_a_clear_error():
    """Epoch 0 reads every sample, the losses it trains with make epoch 1 prune, and both yield
    exactly the planned samples with WebDataset's bytes, at any merge gap. Then one shard is
    damaged: a changed size is a ``StaleIndexError`` naming it, overwritten header bytes are
    either noticed (the same error) or harmless; the other shards read as before."""
    pruned: list[int] = []

    @FUZZ
    @given(runs())
    def run(r):
        with scratch() as folder:
            shards = Shards(folder, [build_layout(*layout) for layout in r["layouts"]], r["compress"])
            ib = InfoBatch(
                shards.index_path,
                num_epochs=NUM_EPOCHS,
                prune_ratio=0.8,
                delta=0.67,
                seed=r["seed"],
                granularity=r["granularity"],
            )
            read = dict(merge_gap=r["merge_gap"], verify=r["verify"])
            got, errors = shards.read(ib, **read)
            assert not errors and len(got) == ib.index.num_samples
            check_samples(ib, shards, got)
            losses = np.random.default_rng(r["seed"]).random(len(got)).astype(np.float32)
            if got:
                ib.update(torch.from_numpy(np.stack([s[META_KEY] for s in got])), torch.from_numpy(losses))

            ib.set_epoch(1)
            got, errors = shards.read(ib, **read)
            assert not errors and len(got) == ib.epoch_size
            check_samples(ib, shards, got)
            pruned.append(ib.index.num_samples - len(got))

            victim = r["victim"]
            path = shards.paths[victim]
            how = r["how"]
            if how == "overwrite" and r["compress"][victim]:
                how = "cut"  # no header bytes to aim at inside a gzip stream, and its bodies are not checked
            resized = damage(path, shards.raws[victim], how, r["where"], r["junk"])
            plan = [kept_slots(ib, shard) for shard in range(len(shards.paths))]
            ib.set_epoch(1)  # a second pass: planned again from the same scores
            assert [kept_slots(ib, shard) for shard in range(len(shards.paths))] == plan
            got, errors = shards.read(ib, **read)
            failed = {victim} if errors else set()
            check_samples(ib, shards, got, failed)
            if resized and kept_slots(ib, victim):
                assert len(errors) == 1 and not any(s["__url__"] == path for s in got)
            assert all(isinstance(e, StaleIndexError) and path in str(e) for e in errors), errors

    run()
    assert sum(pruned) > 0, "no example pruned anything: the test would not exercise skipping"


@pytest.mark.parametrize("compress", [False, True])
def test_a_pipe_shard_cut_after_indexing_names_the_shard(tmp_path, compress):
    """``pipe:`` shards have no size to check up front: the cut is found while streaming, and the
    error still names the shard."""
    raw = build_layout([(f"s{i:03d}.bin", bytes(3000)) for i in range(6)], tarfile.GNU_FORMAT)
    data = gzip.compress(raw, mtime=0) if compress else raw
    path = str(tmp_path / ("cut.tar.gz" if compress else "cut.tar"))
    with open(path, "wb") as f:
        f.write(data)
    url = f"pipe:cat {path}"
    ib = InfoBatch(build_index([url]), num_epochs=2)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises((StaleIndexError, TarFormatError), match=path):
        list(wds.DataPipeline(ib.shards(), ib.tarfile_to_samples()))
