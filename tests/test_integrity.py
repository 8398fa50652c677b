"""Never wrong bytes: shards rewritten in place after indexing, read through every source and
reader with every ``verify`` setting, give only correct samples or a clear error."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from infobatch_stream import (
    IndexMismatchError,
    InfoBatch,
    InfoBatchError,
    ShardAssignmentError,
    StaleIndexError,
    TarFormatError,
    build_index,
)
from infobatch_stream.index import DatasetIndex
from infobatch_stream.meta import META_KEY, SLOT
from tests.helpers.data import make_index, write_shards
from tests.helpers.loaders import data_loader, read_stages
from tests.helpers.tars import HAVE_GNU_TAR, gnu_tar, make_tree, payload, write_tar

MTIME = 1_700_000_000
PER_SHARD = 12


def _entries(keys: list[str], seed: int) -> list[tuple[str, bytes]]:
    out = []
    for i, key in enumerate(keys):
        out.append((f"{key}.jpg", payload(700, seed=seed * 100 + i)))  # equal sizes: a reordered shard keeps its size
        out.append((f"{key}.cls", b"%03d" % ((seed * 100 + i) % 1000)))
    return out


def _keys(shard: int, first: int = 0, n: int = PER_SHARD, prefix: str = "s") -> list[str]:
    return [f"{prefix}{shard:02d}-{i:04d}" for i in range(first, first + n)]


def _write(path: str, entries: list[tuple[str, bytes]], writer: str) -> None:
    if writer == "gnu-tar":
        root = path + ".tree"
        shutil.rmtree(root, ignore_errors=True)
        make_tree(root, dict(entries))
        gnu_tar(root, path, "posix", members=[name for name, _ in entries])  # in this order, PAX headers
    else:
        fmt = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[writer]
        write_tar(path, entries, format=fmt, mtime=MTIME + 0.5 if writer == "pax" else MTIME)
    os.utime(path, (MTIME, MTIME))  # a rewrite that keeps the mtime: only the bytes tell


REWRITES = {
    # name: entries of shard 0 after the rewrite (shard 0 had keys s00-0000..0011, seed 0)
    "reordered": lambda: [e for i in reversed(range(PER_SHARD)) for e in _entries(_keys(0), 0)[2 * i : 2 * i + 2]],
    "renamed": lambda: _entries(_keys(0, prefix="t"), 0),  # same sizes, same order, other keys
    "grown": lambda: _entries(_keys(0, -2, PER_SHARD + 2), 0),
    "shrunk": lambda: _entries(_keys(0, 2, PER_SHARD - 2), 0),
}


def _truth(entries_by_shard: list[list[tuple[str, bytes]]]) -> dict[str, dict[str, bytes]]:
    truth: dict[str, dict[str, bytes]] = {}
    for entries in entries_by_shard:
        for name, data in entries:
            key, suffix = name.split(".", 1)
            truth.setdefault(key, {})[suffix] = data
    return truth


def _check(samples_or_error, truth: dict, index) -> None:
    """Every sample is what its key holds now, and its slot is that key's."""
    for sample in samples_or_error:
        key = sample["__key__"]
        fields = {k: bytes(v) for k, v in sample.items() if not k.startswith("__")}
        assert fields == truth[key], key
        slot = int(np.asarray(sample[META_KEY])[SLOT])
        shard = int(index.shard_of_slot(np.array([slot]))[0])
        assert index.keys(shard)[slot - int(index.shard_first[shard])] == key


def _readers(ib: InfoBatch, urls: list[str], verify: str, gopen: bool = True):
    yield "reader", lambda: list(wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples(verify=verify)))
    yield "shards+reader", lambda: list(wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(verify=verify)))
    yield "dataset", lambda: list(iter(ib.dataset(verify=verify)))
    if gopen:  # WebDataset's own reader (it has no s3:// handler)
        yield "filter", lambda: list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), ib.filter()))


def _prune(ib: InfoBatch) -> None:
    ib.store.scores[:] = np.linspace(0, 1, ib.index.num_samples, dtype=np.float32)
    ib.set_epoch(1)
    assert 0 < ib.stats()[-1]["kept"] < ib.index.num_samples


def _exercise(urls: list[str], index, truth: dict, rewrite_url: str, gopen: bool = True) -> dict[str, int]:
    """Read every way; count how the reads ended."""
    outcomes = {"correct": 0, "error": 0}
    for pruned in (False, True):
        for verify in ("size", "size+mtime"):
            ib = InfoBatch(index, num_epochs=4, prune_ratio=0.9, delta=1.0, seed=3)
            if pruned:
                _prune(ib)
            for name, read in _readers(ib, urls, verify, gopen):
                try:
                    got = read()
                except InfoBatchError as exn:
                    message = " ".join(str(a) for a in exn.args)
                    assert os.path.basename(rewrite_url.split()[-1]) in message, (name, message)
                    outcomes["error"] += 1
                    continue
                _check(got, truth, index)
                outcomes["correct"] += 1
    return outcomes


WRITERS = ["gnu", "pax"] + (["gnu-tar"] if HAVE_GNU_TAR else [])


@pytest.fixture
def shards(tmp_path):
    def make(writer: str, tag: str = "") -> tuple[list[str], list[list[tuple[str, bytes]]]]:
        folder = tmp_path / (writer + tag)
        folder.mkdir()
        entries = [_entries(_keys(s), s) for s in range(3)]
        paths = [str(folder / f"shard-{s}.tar") for s in range(3)]
        for path, e in zip(paths, entries):
            _write(path, e, writer)
        return paths, entries

    return make


def _rewrite(path: str, rewrite: str, writer: str, entries: list) -> list:
    new = REWRITES[rewrite]()
    _write(path, new, writer)
    return [new] + entries[1:]


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("rewrite", list(REWRITES))
def test_local_and_pipe_rewrites_give_correct_samples_or_an_error(shards, writer, rewrite):
    for source in ("local", "pipe"):
        paths, entries = shards(writer, source)
        before = os.path.getsize(paths[0])
        urls = paths if source == "local" else [f"pipe:cat {p}" for p in paths]
        index = build_index(urls)
        entries_now = _rewrite(paths[0], rewrite, writer, entries)
        if rewrite in ("reordered", "renamed"):
            assert os.path.getsize(paths[0]) == before  # the size check cannot see it
        outcomes = _exercise(urls, index, _truth(entries_now), urls[0])
        if rewrite != "shrunk":  # the skip-aware readers cannot be fooled
            assert outcomes["error"] >= 6, outcomes


@pytest.mark.parametrize("rewrite", ["reordered", "renamed", "shrunk"])
def test_http_rewrites_give_correct_samples_or_an_error(shards, range_server, rewrite):
    paths, entries = shards("pax")
    base = range_server(os.path.dirname(paths[0]))
    urls = [f"{base}/{os.path.basename(p)}" for p in paths]
    index = build_index(urls)
    entries_now = _rewrite(paths[0], rewrite, "pax", entries)
    outcomes = _exercise(urls, index, _truth(entries_now), urls[0])
    assert outcomes["error"] >= 6, outcomes


@pytest.mark.parametrize("rewrite", ["reordered", "renamed"])
def test_s3_rewrites_give_correct_samples_or_an_error(shards, s3_server, rewrite):
    paths, entries = shards("gnu")
    urls = s3_server.upload("integrity", paths, f"p-{rewrite}")
    index = build_index(urls)
    entries_now = _rewrite(paths[0], rewrite, "gnu", entries)
    s3_server.upload("integrity", paths[:1], f"p-{rewrite}")  # the same key, other bytes, same size
    outcomes = _exercise(urls, index, _truth(entries_now), urls[0], gopen=False)
    assert outcomes["error"] >= 6, outcomes


def test_a_damaged_member_header_is_caught_in_a_merged_range(shards):
    """The header of a sample in the middle of one read range (not its first): still checked."""
    paths, entries = shards("gnu")
    index = build_index(paths)
    start, _ = index.byte_ranges(0)
    with open(paths[0], "r+b") as f:
        f.seek(int(start[5]))
        header = bytearray(f.read(512))
        header[0:1] = b"X"  # another name: the checksum is wrong too
        f.seek(int(start[5]))
        f.write(header)
    os.utime(paths[0], (MTIME, MTIME))
    ib = InfoBatch(index, num_epochs=2)
    with pytest.raises(StaleIndexError, match="s00-0005"):
        list(wds.DataPipeline(wds.SimpleShardList(paths), ib.tarfile_to_samples(verify="size")))


def test_upper_case_suffixes_and_long_names_pass_the_exact_check(tmp_path):
    """Headers the fast check does not accept (upper-case suffix, a 120-byte path) are parsed
    exactly and accepted: no false alarm."""
    long_key = "d" * 60 + "/" + "k" * 55
    entries = [("a.JPG", payload(100)), ("a.cls", b"1"), (f"{long_key}.jpg", payload(200)), (f"{long_key}.cls", b"2")]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = write_tar(tmp_path / f"x{fmt}.tar", entries, format=fmt)
        ib = InfoBatch(build_index([path]), num_epochs=1)
        got = list(wds.DataPipeline(wds.SimpleShardList([path]), ib.tarfile_to_samples()))
        assert [(s["__key__"], s["jpg"]) for s in got] == [("a", payload(100)), (long_key, payload(200))]


# ---- the index: damaged arrays, a rebuild under a running job, bad entries ---------------------


def _damage(path: str, array: str, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite one sidecar array of a saved index through ``change(arr)``."""
    file = os.path.join(path[:-5] + ".arrays", f"{array}.npy")
    arr = np.load(file).copy()
    change(arr)
    np.save(file, arr)


DAMAGES = {
    "size off": ("size", lambda a: a.__setitem__(3, a[3] + 1)),
    "offset off": ("data_offset", lambda a: a.__setitem__(5, a[5] + 512)),
    "key overwritten": ("keys", lambda a: a.__setitem__(slice(0, 3), np.frombuffer(b"zzz", np.uint8))),
    "sample moved": ("start", lambda a: a.__setitem__(2, a[2] + 512)),
    "member table": ("member_first", lambda a: a.__setitem__(4, a[3])),
}
COMPACT_DAMAGES = {  # the same damages to the compact format (2)
    "size off": ("size", lambda a: a.__setitem__(3, a[3] + 1)),
    "offset off": ("rel_block", lambda a: a.__setitem__(5, a[5] + 1)),
    "key overwritten": ("keys", lambda a: a.__setitem__(slice(0, 3), np.frombuffer(b"zzz", np.uint8))),
    "key number": ("key_word", lambda a: a.__setitem__(4, a[4] + 1)),
    "sample moved": ("start_block", lambda a: a.__setitem__(2, a[2] + 1)),
    "member table": ("nmembers", lambda a: a.__setitem__(4, a[4] + 1)),
    "member count": ("nmembers", lambda a: a.__setitem__(4, 0)),
    "key mode": ("key_mode", lambda a: a.__setitem__(0, 1 - a[0])),
    "key width": ("key_width", lambda a: a.__setitem__(0, a[0] + 1)),
}


@pytest.mark.parametrize("version,damage", [(1, d) for d in DAMAGES] + [(2, d) for d in COMPACT_DAMAGES])
def test_damaged_index_arrays_are_refused_when_a_shard_is_used(tmp_path, version, damage):
    urls, index = make_index(str(tmp_path), num_shards=2, per_shard=10)
    path = str(tmp_path / "index.json")
    if version == 1:
        build_index(urls).save(path, format=1)
    _damage(path, *(DAMAGES if version == 1 else COMPACT_DAMAGES)[damage])
    ib = InfoBatch(path, num_epochs=2)  # opening costs nothing: the rows are checked on first use
    for read in (
        lambda: list(wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples())),
        lambda: list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), ib.filter())),
    ):
        with pytest.raises(IndexMismatchError, match="index .*part-000.tar.*(damaged|checksum)"):
            read()


def test_per_shard_counts_that_still_sum_right_are_refused(tmp_path):
    make_index(str(tmp_path), num_shards=2, per_shard=10)
    path = str(tmp_path / "index.json")
    doc = json.load(open(path))
    doc["shardlist"][0]["nsamples"], doc["shardlist"][1]["nsamples"] = 9, 11
    json.dump(doc, open(path, "w"))
    ib = InfoBatch(path, num_epochs=2)
    with pytest.raises(IndexMismatchError, match="damaged|checksum"):
        ib.index.keys(0)


@pytest.mark.parametrize(
    "entry",
    [{"nsamples": "x"}, {"nsamples": -1}, {"url": 5}, {"filesize": None}, {"crc": "abc"}, {"compression": "zip"}],
)
def test_a_damaged_shard_entry_names_it(tmp_path, entry):
    make_index(str(tmp_path), num_shards=2, per_shard=10)
    path = str(tmp_path / "index.json")
    doc = json.load(open(path))
    doc["shardlist"][1].update(entry)
    json.dump(doc, open(path, "w"))
    with pytest.raises(IndexMismatchError, match="shard entry 1 is damaged"):
        DatasetIndex.load(path)


def test_a_damaged_array_file_is_an_index_error(tmp_path):
    make_index(str(tmp_path), num_shards=2, per_shard=10)
    path = str(tmp_path / "index.json")
    np.save(os.path.join(str(tmp_path / "index.arrays"), "size.npy"), np.zeros((3, 3)))
    with pytest.raises(IndexMismatchError, match="'size'"):
        DatasetIndex.load(path)
    np.save(os.path.join(str(tmp_path / "index.arrays"), "size.npy"), np.array([object()], dtype=object))
    with pytest.raises(IndexMismatchError, match="size.npy is damaged"):
        DatasetIndex.load(path)


def test_an_index_rebuilt_at_its_path_during_a_run_is_refused_by_workers(tmp_path):
    """Spawned workers reopen the arrays by path: a rebuild there (other shards, or the same keys
    at other offsets) must not give them other samples than the training process planned."""
    urls, _ = make_index(str(tmp_path), num_shards=2, per_shard=10)
    path = str(tmp_path / "index.json")
    ib = InfoBatch(path, num_epochs=2)
    # the same keys and counts (same fingerprint), shards rewritten with other payloads: new offsets
    write_shards(str(tmp_path), num_shards=2, per_shard=10)
    rng_bytes = np.random.default_rng(5)
    with wds.ShardWriter(os.path.join(str(tmp_path), "part-%03d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(20):
            sink.write(
                {"__key__": f"sample{i:06d}", "cls": b"1", "bin": rng_bytes.bytes(int(rng_bytes.integers(0, 3000)))}
            )
    build_index(urls, path)
    assert DatasetIndex.load(path).fingerprint == ib.index.fingerprint
    copy = pickle.loads(pickle.dumps(ib))  # what a spawned DataLoader worker receives
    with pytest.raises(IndexMismatchError, match="checksum.*rebuilt"):
        copy.index.keys(0)
    # other shards altogether: refused as soon as the worker unpickles it
    build_index(urls[:1], path)
    with pytest.raises(IndexMismatchError, match="changed after the training process loaded it"):
        pickle.loads(pickle.dumps(ib)).index.keys(0)
    loader = data_loader(wds.DataPipeline(ib.shards(), ib.tarfile_to_samples()), None, 1, context="spawn")
    with pytest.raises(Exception, match="changed after the training process loaded it"):
        list(loader)


# ---- tar headers with absurd numbers; every bad shard named ------------------------------------


def _absurd_size_tar(path: str, typ: bytes) -> str:
    write_tar(path, [("a.cls", b"1"), ("b.cls", b"2")])
    with open(path, "r+b") as f:
        header = bytearray(f.read(512))
        header[156:157] = typ
        header[124:136] = b"\x80" + (2**80).to_bytes(11, "big")  # base-256: 1.2e24 bytes
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % (sum(header))
        f.seek(0)
        f.write(header)
    return path


@pytest.mark.parametrize("typ", [b"0", b"L", b"x"])
def test_an_absurd_base256_size_is_a_tar_error_naming_the_shard(tmp_path, typ):
    path = _absurd_size_tar(str(tmp_path / "absurd.tar"), typ)
    for url in (path, f"pipe:cat {path}"):
        with pytest.raises(TarFormatError, match="absurd.tar"):
            build_index([url])


def test_indexing_names_every_bad_shard(tmp_path):
    urls = write_shards(str(tmp_path), num_shards=4, per_shard=5)
    for bad in (urls[1], urls[3]):
        with open(bad, "r+b") as f:
            f.write(b"\x01" * 512)
    with pytest.raises(TarFormatError) as err:
        build_index(urls, workers=2)
    message = str(err.value)
    assert "2 of 4 shards" in message and "part-001.tar" in message and "part-003.tar" in message


@pytest.mark.parametrize("url", ["PIPE:cat x.tar", " pipe:cat x.tar", "Pipe:cat x.tar", "\tpipe:cat x.tar"])
def test_every_spelling_gopen_would_run_is_refused(tmp_path, url):
    make_index(str(tmp_path), num_shards=1, per_shard=3)
    path = str(tmp_path / "index.json")
    doc = json.load(open(path))
    doc["shardlist"][0]["url"] = url
    json.dump(doc, open(path, "w"))
    with pytest.raises(PermissionError, match="shell commands"):
        DatasetIndex.load(path)


# ---- shards dropped between ib.shards() and the reader -----------------------------------------


@pytest.mark.parametrize("path", ["reader", "filter"])
def test_a_splitter_after_ib_shards_is_an_error(tmp_path, path):
    urls, index = make_index(str(tmp_path), num_shards=4, per_shard=10)
    ib = InfoBatch(index, num_epochs=2)
    reading = read_stages(ib, path)
    loader = data_loader(wds.DataPipeline(ib.shards(), wds.split_by_worker, *reading), None, 2, context="fork")
    with pytest.raises(ShardAssignmentError, match="split_by_worker"):
        list(loader)
    # without the splitter: every sample once
    loader = data_loader(wds.DataPipeline(ib.shards(), *reading), None, 2, context="fork")
    assert len(list(loader)) == 40


def test_filter_after_decode_warns(tmp_path):
    urls, index = make_index(str(tmp_path), num_shards=1, per_shard=4)
    ib = InfoBatch(index, num_epochs=2)
    with pytest.warns(RuntimeWarning, match="decoded fields.*right after"):
        got = list(
            wds.DataPipeline(
                wds.SimpleShardList(urls),
                wds.tarfile_to_samples(),
                wds.map(lambda s: {**s, "cls": int(s["cls"])}),
                ib.filter(),
            )
        )
    assert len(got) == 4


@pytest.mark.parametrize(
    "doc",
    [
        "[1, 2]",
        '"x"',
        "[" * 100000 + "]" * 100000,
        '{"__kind__": "wids-shard-index-v1", "infobatch_stream": {"format": 1, "arrays": 5}, "shardlist": []}',
        '{"__kind__": "wids-shard-index-v1", "infobatch_stream": {"format": 1, "arrays": "../x"}, "shardlist": []}',
        '{"__kind__": "wids-shard-index-v1", "infobatch_stream": {"format": 1, "arrays": "index.arrays"}, '
        '"shardlist": 3}',
    ],
)
def test_a_crafted_index_json_is_an_index_error(tmp_path, doc):
    path = tmp_path / "index.json"
    path.write_text(doc)
    with pytest.raises(IndexMismatchError):
        DatasetIndex.load(str(path))


# ---- findings of an adversarial review -------------------------------------------------------


def _pax_header(records: dict[str, str]) -> bytes:
    """A PAX ``x`` header block and its record block."""
    body = b"".join(
        (lambda rec: b"%d %s" % (len(rec) + len(str(len(rec) + 3)) + 1, rec))(f"{k}={v}\n".encode())
        for k, v in records.items()
    )
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body.ljust(512, b"\0")


@pytest.mark.parametrize("records", [{"path": "zzz.jpg"}, {"size": "100"}, {"mtime": "1", "path": "s00-0003.jpg"}])
def test_a_pax_record_that_renames_or_resizes_a_kept_member_is_caught(shards, records):
    """The member's own header is intact; a PAX header in front of it, same size, now names or
    sizes it otherwise (what tarfile and WebDataset would see)."""
    paths, _ = shards("pax")
    index = build_index(paths)
    start, _ = index.byte_ranges(0)
    with open(paths[0], "r+b") as f:
        f.seek(int(start[2]))
        assert f.read(512)[156:157] == b"x"  # tarfile's PAX format with a float mtime: one x header per member
        f.seek(int(start[2]))
        f.write(_pax_header(records))
    os.utime(paths[0], (MTIME, MTIME))
    ib = InfoBatch(index, num_epochs=2)
    for read in (
        lambda: list(wds.DataPipeline(wds.SimpleShardList(paths), ib.tarfile_to_samples(verify="size"))),
        lambda: list(iter(ib.dataset(verify="size"))),
    ):
        with pytest.raises(StaleIndexError, match="s00-0002"):
            read()


def test_a_stage_that_repeats_shards_is_refused_by_the_reader(tmp_path):
    urls, index = make_index(str(tmp_path), num_shards=2, per_shard=5)
    ib = InfoBatch(index, num_epochs=2)

    def twice(src):  # type: ignore[no-untyped-def]
        for item in src:
            yield item
            yield item

    with pytest.raises(ShardAssignmentError, match="added or repeated"):
        list(wds.DataPipeline(ib.shards(), twice, ib.tarfile_to_samples()))


def test_an_old_pass_closed_late_does_not_hide_a_splitter(tmp_path):
    urls, index = make_index(str(tmp_path), num_shards=4, per_shard=5)
    ib = InfoBatch(index, num_epochs=2)
    old = iter(wds.DataPipeline(ib.shards(), ib.tarfile_to_samples()))
    next(old)  # a peeked iterator, kept
    dropping = wds.DataPipeline(
        ib.shards(), wds.select(lambda item: not item["url"].endswith("001.tar")), ib.tarfile_to_samples()
    )
    it = iter(dropping)
    next(it)
    old.close()  # closed during the new pass
    with pytest.raises(ShardAssignmentError):
        list(it)


def test_an_array_file_overwritten_in_place_is_refused_not_a_sigbus(tmp_path):
    urls, _ = make_index(str(tmp_path), num_shards=2, per_shard=5)
    path = str(tmp_path / "index.json")
    ib = InfoBatch(path, num_epochs=2)
    file = str(tmp_path / "index.arrays" / "rel_block.npy")
    with open(file, "r+b") as f:
        f.truncate(128)  # shorter than its mapping: touching the pages would be SIGBUS
    with pytest.raises(IndexMismatchError, match="changed after the index was opened"):
        list(wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples()))


def test_reserved_suffixes_are_refused_at_indexing(tmp_path):
    for suffix in ("__key__", "__url__", "__ib__"):
        path = write_tar(tmp_path / f"r{suffix}.tar", [("a.cls", b"1"), (f"a.{suffix}", b"forged")])
        with pytest.raises(TarFormatError, match="would overwrite"):
            build_index([path])


def test_an_index_with_checksums_on_some_entries_only_is_damaged(tmp_path):
    make_index(str(tmp_path), num_shards=2, per_shard=5)
    path = str(tmp_path / "index.json")
    doc = json.load(open(path))
    del doc["shardlist"][1]["crc"]
    json.dump(doc, open(path, "w"))
    with pytest.raises(IndexMismatchError, match="1 of 2 shard entries have a checksum"):
        DatasetIndex.load(path)
