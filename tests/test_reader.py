"""The skip-aware reader ``ib.tarfile_to_samples()`` for real: real tar shards (WebDataset and GNU
tar), a real HTTP server in a subprocess on 127.0.0.1, ``pipe:`` and gzip shards, real DataLoader
workers. The reference is always ``wds.tarfile_to_samples()`` + ``ib.filter()`` run by a second
InfoBatch with the same configuration and the same score history."""

from __future__ import annotations

import gzip
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from infobatch_stream import META_KEY, DatasetIndex, InfoBatch, build_index, policy
from infobatch_stream import reader as reader_mod
from infobatch_stream.bench import RangeServerProcess
from infobatch_stream.reader import HTTP_MERGE_GAP, LOCAL_MERGE_GAP, StaleIndexError, plan_ranges
from infobatch_stream.storage import StorageError
from tests.helpers.data import make_index, slot_loss, train_epochs
from tests.helpers.loaders import data_loader
from tests.helpers.tars import HAVE_GNU_TAR, gnu_tar, make_tree, write_wds_shards

EPOCHS = 4
CONFIG = dict(num_epochs=EPOCHS, prune_ratio=0.5, delta=0.75, seed=7)  # epochs 1, 2 prune; 3 is full

# ---- the shards ------------------------------------------------------------------------------------


def _bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.bytes(n) if n else b""


def varied_samples(n: int) -> list[dict]:
    """Varied samples: empty members, multiples of 512, several suffixes, an upper-case suffix,
    a two-dot suffix and a few ~200 KB members."""
    rng = np.random.default_rng(1)
    sizes = [0, 1, 511, 512, 513, 1024, 1536, 100, 3000, 4096, 7000]
    out = []
    for i in range(n):
        sample: dict[str, Any] = {
            "__key__": f"s{i:05d}",
            "cls": str(i % 10).encode(),
            "bin": _bytes(rng, sizes[i % len(sizes)]),
        }
        if i % 3 == 0:
            sample["JPG"] = _bytes(rng, sizes[(i * 7) % len(sizes)])  # read back as "jpg"
        if i % 4 == 1:
            sample["seg.png"] = _bytes(rng, 512 * (i % 3))
        if i % 5 == 2:
            sample["json"] = b""
        if i % 11 == 5:
            sample["big"] = _bytes(rng, 200_000 + i)
        out.append(sample)
    return out


def gnu_tree(root: str) -> list[str]:
    """A directory tree for GNU tar and the member order to archive it in: directories, long
    names, members of no sample, symlinks, and key ``k1`` twice with ``k2`` in between."""
    rng = np.random.default_rng(2)
    deep = "/".join(["deep" + "d" * 20] * 8)  # > 155 characters: GNU long names / PAX paths
    files = {
        "k1.txt": b"first k1",
        "k2.txt": _bytes(rng, 512),
        "k1.cls": b"second k1",  # non-adjacent repeat of k1: a separate sample
        "README": b"no suffix: not a sample",
        "__index__": b"top-level meta: skipped",
        "__meta__/info.txt": b"meta folder: skipped",
        "d1/x.txt": _bytes(rng, 0),
        "d1/x.CLS": b"7",
        "d1/x.seg.png": _bytes(rng, 1024),
        f"{deep}/name.bin": _bytes(rng, 1500),
        f"{deep}/name.json": b"{}",
        "L" + "o" * 150 + "ngkey.Txt": _bytes(rng, 2048),
        "big.bin": _bytes(rng, 200_000),
        "z0.txt": b"",
        "z1.bin": _bytes(rng, 513),
    }
    make_tree(root, files)
    os.makedirs(os.path.join(root, "emptydir"))
    os.symlink("k1.txt", os.path.join(root, "link.txt"))  # not a regular file: no sample
    return [
        "k1.txt",
        "emptydir",
        "k2.txt",
        "README",
        "k1.cls",
        "__index__",
        "__meta__",
        "d1",
        "link.txt",
        deep.split("/")[0],
        "L" + "o" * 150 + "ngkey.Txt",
        "big.bin",
        "z0.txt",
        "z1.bin",
    ]


@dataclass
class Corpus:
    root: str  # served over HTTP
    plain: list[str]  # relative to root: WebDataset shards, GNU tar shards, an empty shard
    gz: list[str]  # gzip copies of ``plain``

    def paths(self, rel: list[str]) -> list[str]:
        return [os.path.join(self.root, r) for r in rel]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = str(tmp_path_factory.mktemp("reader"))
    plain_dir = os.path.join(root, "plain")
    os.makedirs(plain_dir)
    paths = write_wds_shards(plain_dir, varied_samples(66), maxcount=22, name="wds")
    if HAVE_GNU_TAR:
        tree = os.path.join(root, "tree")
        members = gnu_tree(tree)
        for fmt in ("gnu", "posix"):
            paths.append(gnu_tar(tree, os.path.join(plain_dir, f"gnu-{fmt}.tar"), fmt, members))
        # A shard whose members belong to no sample: 0 samples in the index.
        paths.append(gnu_tar(tree, os.path.join(plain_dir, "nosamples.tar"), "gnu", ["README", "emptydir"]))
    gz_dir = os.path.join(root, "gz")
    os.makedirs(gz_dir)
    for p in paths:
        with open(p, "rb") as src, gzip.open(os.path.join(gz_dir, os.path.basename(p) + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    rel = [os.path.relpath(p, root) for p in paths]
    return Corpus(root, rel, [os.path.join("gz", os.path.basename(r) + ".gz") for r in rel])


@pytest.fixture(scope="module")
def local_index(corpus) -> tuple[list[str], DatasetIndex]:
    urls = corpus.paths(corpus.plain)
    return urls, build_index(urls)


# ---- the HTTP server: ``python -m infobatch_stream.rangeserver ROOT`` in a subprocess ----------------


@pytest.fixture(scope="module")
def server(corpus):
    srv = RangeServerProcess(corpus.root)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # The reference reads http:// shards with curl, which would honour a proxy setting.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


# ---- running both pipelines ------------------------------------------------------------------------


def read_with_reader(ib: InfoBatch, urls: list[str], **kw: Any) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples(**kw)))


def read_with_filter(ib: InfoBatch, urls: list[str]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), ib.filter()))


def assert_same_samples(got: list[dict], ref: list[dict]) -> None:
    assert [s["__key__"] for s in got] == [s["__key__"] for s in ref]
    for g, r in zip(got, ref):
        assert set(g) == set(r), (g["__key__"], sorted(g), sorted(r))
        for field, value in r.items():
            if field == META_KEY:
                assert g[field].dtype == value.dtype and np.array_equal(g[field], value), (
                    g["__key__"],
                    g[field],
                    value,
                )
            else:
                assert type(g[field]) is type(value) and g[field] == value, (g["__key__"], field)


def train(ib: InfoBatch, samples: list[dict]) -> None:
    """``ib.update`` with the fixed per-slot loss, in batches of 16 as a training loop would."""
    for i in range(0, len(samples), 16):
        meta = torch.from_numpy(np.stack([s[META_KEY] for s in samples[i : i + 16]]))
        ib.update(meta, slot_loss(meta))


@dataclass
class Plan:
    """What the reader should do in one epoch, computed from the index and the store."""

    opened: int  # shards with something kept
    kept: int
    ranges: int
    range_bytes: int  # bytes covered by the planned ranges
    kept_bytes: int  # sum of end - start over kept samples
    stream_bytes: int  # a sequential reader reads up to the end of the last kept sample
    opened_filesize: int  # sum of the opened shards' sizes


def plan(ib: InfoBatch, merge_gap: int, max_bytes: int | None = None) -> Plan:
    index, epoch, thresh = ib.index, ib.control.epoch, ib.control.threshold
    out = Plan(0, 0, 0, 0, 0, 0, 0)
    for shard in range(index.num_shards):
        keep, _ = ib.decide_shard(shard, epoch, thresh)
        kept = np.flatnonzero(keep)
        if not len(kept):
            continue
        start, end = index.byte_ranges(shard)
        ranges = plan_ranges(start, end, kept, merge_gap, max_bytes or reader_mod.MAX_RANGE_BYTES)
        out.opened += 1
        out.kept += len(kept)
        out.ranges += len(ranges)
        out.range_bytes += sum(r.end - r.start for r in ranges)
        out.kept_bytes += int((end[kept] - start[kept]).sum())
        out.stream_bytes += int(end[kept].max())
        out.opened_filesize += index.shards[shard].filesize
    return out


@dataclass
class EpochRun:
    plan: Plan
    stats: dict
    served: dict | None  # the HTTP server's counters for the reader's pass


def check_identity(
    index: DatasetIndex,
    urls: list[str],
    *,
    merge_gap: int | None = None,
    config: dict | None = None,
    server: RangeServerProcess | None = None,
    epochs: int = EPOCHS,
    **reader_kw: Any,
) -> list[EpochRun]:
    """Train ``epochs`` epochs; in each, the reader's samples must equal the reference's.

    ``merge_gap`` goes to the reader as given (None: its default for the URL type)."""
    cfg = {**CONFIG, "num_epochs": epochs, **(config or {})}
    gap = merge_gap if merge_gap is not None else HTTP_MERGE_GAP if urls[0].startswith("http") else LOCAL_MERGE_GAP
    ib, ref_ib = InfoBatch(index, **cfg), InfoBatch(index, **cfg)
    plans, served = [], []
    for epoch in range(epochs):
        ib.set_epoch(epoch)
        ref_ib.set_epoch(epoch)
        plans.append(plan(ib, gap))
        if server:
            server.reset()
        got = read_with_reader(ib, urls, merge_gap=merge_gap, **reader_kw)
        served.append(server.stats() if server else None)
        ref = read_with_filter(ref_ib, urls)
        assert_same_samples(got, ref)
        assert len(got) == ib.epoch_size == plans[-1].kept
        train(ib, got)
        train(ref_ib, ref)
    stats = ib.stats()
    assert stats[0]["pruned"] == 0
    if epochs > 1:
        assert stats[1]["pruned"] > 0, "the test must prune something"
    return [EpochRun(p, s, v) for p, s, v in zip(plans, stats, served)]


def check_range_io(runs: list[EpochRun]) -> None:
    """Seeks or Range requests: one read per planned range, exactly the planned bytes."""
    for run in runs:
        assert run.stats["requests"] == run.plan.ranges
        assert run.stats["bytes_read"] == run.plan.range_bytes
        assert run.stats["shards_read"] == run.plan.opened


def check_stream_io(runs: list[EpochRun], compressed: bool = False) -> None:
    """Sequential sources: one stream per opened shard, read up to the last kept sample only.

    Compressed shards count the compressed bytes taken from the file or socket: at most the
    opened shards' size on disk (decompression reads ahead, so not an exact figure)."""
    for run in runs:
        assert run.stats["requests"] == run.stats["shards_read"] == run.plan.opened
        if compressed:
            assert 0 < run.stats["bytes_read"] <= run.plan.opened_filesize
        else:
            assert run.stats["bytes_read"] == run.plan.stream_bytes


# ---- 1. identity on local shards -------------------------------------------------------------------


@pytest.mark.parametrize(
    "merge_gap,config",
    [
        (None, {}),
        (None, {"granularity": 4}),
        (0, {}),
        (0, {"granularity": 4}),
        (1 << 40, {}),
    ],
    ids=["default", "k4", "gap0", "gap0-k4", "hugegap"],
)
def test_identity_local(local_index, merge_gap, config):
    urls, index = local_index
    runs = check_identity(index, urls, merge_gap=merge_gap, config=config)
    check_range_io(runs)
    pruned = runs[1]
    if merge_gap == 0:
        # Only kept bytes are read (adjacent kept samples share a read).
        assert pruned.stats["bytes_read"] == pruned.plan.kept_bytes
        assert pruned.stats["requests"] > pruned.stats["shards_read"]
    if merge_gap == 1 << 40:
        assert pruned.stats["requests"] == pruned.stats["shards_read"]  # one read per shard
    total = sum(s.filesize for s in index.shards)
    for run in runs:
        assert run.stats["bytes_read"] + run.stats["bytes_skipped"] == total


def test_identity_with_split_ranges(local_index, monkeypatch):
    """A huge merge gap with ``MAX_RANGE_BYTES`` at 4 KiB: runs are cut into bounded reads."""
    urls, index = local_index
    monkeypatch.setattr(reader_mod, "MAX_RANGE_BYTES", 4096)
    runs = check_identity(index, urls, merge_gap=1 << 40)
    check_range_io(runs)
    assert runs[1].stats["requests"] > 2 * runs[1].stats["shards_read"]
    # Check the bound on the plan itself: a range over 4 KiB holds a single sample.
    for shard in range(index.num_shards):
        start, end = index.byte_ranges(shard)
        kept = np.arange(len(start))
        ranges = plan_ranges(start, end, kept, 1 << 40, 4096)
        assert [r.kept_lo for r in ranges[1:]] == [r.kept_hi for r in ranges[:-1]]
        assert sum(r.kept_hi - r.kept_lo for r in ranges) == len(kept)
        for r in ranges:
            assert r.end - r.start <= 4096 or r.kept_hi - r.kept_lo == 1
            assert (r.start, r.end) == (start[r.kept_lo], end[r.kept_hi - 1])


def test_gnu_and_wds_shards_are_in_the_corpus(local_index):
    """Guard: the identity tests above really cover the awkward members."""
    urls, index = local_index
    if not HAVE_GNU_TAR:
        pytest.skip("GNU tar is not installed")
    gnu = index.shard_of_url(next(u for u in urls if u.endswith("gnu-gnu.tar")))
    keys = index.keys(gnu)
    assert keys.count("k1") == 2 and keys.index("k2") == 1  # k1, k2, k1
    assert any(k.startswith("deep") and len(k) > 155 for k in keys)
    assert index.nsamples[index.shard_of_url(urls[-1])] == 0  # nosamples.tar
    assert "jpg" in index.suffixes and "seg.png" in index.suffixes and "JPG" not in index.suffixes
    sizes = np.asarray(index.array("size"))
    assert (sizes == 0).any() and (sizes == 512).any() and sizes.max() >= 200_000


# ---- 2. other sources: HTTP, pipe:, gzip -----------------------------------------------------------


@pytest.fixture(scope="module")
def http_index(corpus, server) -> tuple[list[str], DatasetIndex]:
    urls = [f"{server.url}/{rel}" for rel in corpus.plain]
    return urls, build_index(urls)


@pytest.mark.parametrize("merge_gap", [0, None], ids=["gap0", "default"])
def test_identity_http(http_index, server, merge_gap):
    urls, index = http_index
    runs = check_identity(index, urls, merge_gap=merge_gap, server=server)
    check_range_io(runs)
    for run in runs:
        served = run.served
        assert served["requests"] == run.plan.ranges
        assert served["bytes"] == run.stats["bytes_read"] == run.plan.range_bytes
        if merge_gap == 0:
            assert served["bytes"] <= 1.05 * run.plan.kept_bytes + 512 * run.plan.ranges
            assert served["bytes"] == run.plan.kept_bytes
    assert runs[1].served["bytes"] < runs[0].served["bytes"]  # pruning shows on the wire


def test_identity_http_without_range_support(corpus):
    """A server that ignores Range (200 with the whole body): same samples, one GET per shard."""
    srv = RangeServerProcess(corpus.root, "--no-ranges")
    try:
        urls = [f"{srv.url}/{rel}" for rel in corpus.plain]
        index = build_index(urls)
        runs = check_identity(index, urls, merge_gap=0, server=srv, epochs=3)
        for run in runs:
            assert run.plan.ranges > run.plan.opened  # several ranges per shard were planned...
            assert run.served["requests"] == run.stats["requests"] == run.plan.opened  # ...one GET each
            # the stream is closed after the last kept sample: the reader takes no more than that,
            # the server had already sent (into socket buffers) the whole body
            assert run.stats["bytes_read"] <= run.served["bytes"] == run.plan.opened_filesize
    finally:
        srv.close()


def test_identity_http_through_redirects(corpus, server):
    """Hub-style URLs that redirect: indexed and read after following the 302 (cached per shard)."""
    urls = [f"{server.url}/__redirect__/{rel}" for rel in corpus.plain]
    index = build_index(urls)
    runs = check_identity(index, urls, merge_gap=0)
    check_range_io(runs)


def test_identity_pipe(corpus):
    urls = [f"pipe:cat {p}" for p in corpus.paths(corpus.plain)]
    index = build_index(urls)
    check_stream_io(check_identity(index, urls, merge_gap=0))


def test_identity_gzip_local(corpus):
    urls = corpus.paths(corpus.gz)
    index = build_index(urls)
    check_stream_io(check_identity(index, urls, merge_gap=0, config={"granularity": 4}), compressed=True)


def test_identity_gzip_http(corpus, server):
    """Offsets of a compressed shard are in the decompressed tar: over HTTP it must be streamed."""
    urls = [f"{server.url}/{rel}" for rel in corpus.gz]
    index = build_index(urls)
    runs = check_identity(index, urls, merge_gap=0, server=server, epochs=3)
    check_stream_io(runs, compressed=True)
    for run in runs:
        assert run.served["requests"] == run.plan.opened


def test_pipe_that_is_abandoned_early_is_not_an_error(tmp_path):
    """``pipe:exec cat`` dies of SIGPIPE when the reader stops before the end: not a failure."""
    urls, index = make_index(str(tmp_path), num_shards=2, per_shard=30)
    pipes = [f"pipe:exec cat {u}" for u in urls]
    piped = build_index(pipes)
    ib = InfoBatch(piped, num_epochs=3, prune_ratio=0.9, delta=1.0)
    ib.store.scores[:] = np.where(np.arange(piped.num_samples) % 30 >= 5, 0.0, 1.0)  # each tail well-learned
    ib.set_epoch(1)
    got = list(wds.DataPipeline(wds.SimpleShardList(pipes), ib.tarfile_to_samples()))
    assert len(got) == ib.stats()[-1]["kept"]
    assert ib.stats()[-1]["shards_read"] == 2


def test_compressed_shard_without_a_compressed_name_over_http(corpus, server, monkeypatch):
    """Served as ``.tar`` but gzip inside: the index records the compression, the reader streams."""
    folder = os.path.join(corpus.root, "noext")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(corpus.root, corpus.gz[0]), os.path.join(folder, "wds.tar"))
    url = f"{server.url}/noext/wds.tar"
    index = build_index([url])  # the indexer recognises gzip by its magic bytes
    assert index.shards[0].compression == "gzip"
    monkeypatch.setattr(reader_mod, "MAX_RANGE_BYTES", 4096)  # Range reads would start inside the gzip body
    cfg = {**CONFIG, "num_epochs": 2, "delta": 1.0}
    ib, ref_ib = InfoBatch(index, **cfg), InfoBatch(index, **cfg)
    assert_same_samples(read_with_reader(ib, [url]), read_with_filter(ref_ib, [url]))


def test_pipe_urls_against_a_local_index(local_index):
    """``pipe:cat path`` samples match the index built from the plain paths."""
    urls, index = local_index
    pipes = [f"pipe:cat {u}" for u in urls]
    cfg = {**CONFIG, "num_epochs": 2, "delta": 1.0}
    ib, ref_ib = InfoBatch(index, **cfg), InfoBatch(index, **cfg)
    for epoch in range(2):
        ib.set_epoch(epoch)
        ref_ib.set_epoch(epoch)
        got = read_with_reader(ib, pipes)
        ref = read_with_filter(ref_ib, pipes)
        assert_same_samples(got, ref)
        assert all(s["__url__"].startswith("pipe:cat ") for s in got)
        train(ib, got)
        train(ref_ib, ref)


# ---- 3. skipping whole shards ----------------------------------------------------------------------


def test_shards_with_nothing_kept_are_never_opened(tmp_path):
    rng = np.random.default_rng(3)
    samples = [
        {"__key__": f"one{i:04d}", "bin": rng.bytes(int(rng.integers(100, 5000))), "cls": b"1"} for i in range(40)
    ]
    urls = write_wds_shards(str(tmp_path), samples, maxcount=1, name="one")
    index = build_index(urls)
    ib = InfoBatch(index, num_epochs=2, prune_ratio=0.9, delta=1.0, seed=5)
    scores = np.where(np.arange(40) % 10 == 0, 1.0, 0.0).astype(np.float32)  # 36 well-learned
    ib.store.scores[:] = scores
    planned = ib.set_epoch(1)
    kept_per_shard = np.asarray(ib.control.kept_per_shard).copy()
    empty = np.flatnonzero(kept_per_shard == 0)
    assert planned.kept == kept_per_shard.sum() and len(empty) >= 20
    keep = np.concatenate([ib.decide_shard(s, 1, ib.control.threshold)[0] for s in range(index.num_shards)])
    expected = np.flatnonzero(keep).tolist()
    for s in empty.tolist():
        os.remove(urls[s])  # a skipped shard must not even be looked at
    sizes = np.array([s.filesize for s in index.shards])
    start, end = np.asarray(index.array("start")), np.asarray(index.array("end"))
    kept_bytes = int((end[keep] - start[keep]).sum())

    def check(source: Any) -> None:
        got = list(wds.DataPipeline(source, ib.tarfile_to_samples(merge_gap=0)))
        assert sorted(int(s[META_KEY][0]) for s in got) == expected
        stats = ib.stats()[-1]
        assert stats["shards_skipped"] == len(empty)
        assert stats["shards_read"] == index.num_shards - len(empty)
        assert stats["requests"] == stats["shards_read"]  # one sample per shard: one read
        assert stats["bytes_read"] == kept_bytes <= 1.05 * kept_bytes
        assert stats["bytes_skipped"] == sizes.sum() - kept_bytes
        assert stats["bytes_skipped"] >= sizes[empty].sum()

    check(ib.shards())
    ib.set_epoch(1)  # the same plan again, fresh counters
    check(wds.SimpleShardList(urls))


# ---- 4. stale index --------------------------------------------------------------------------------


@pytest.fixture
def copied(corpus, tmp_path) -> tuple[list[str], DatasetIndex]:
    """A private copy of the WebDataset shards and its index (the test may damage them)."""
    urls = []
    for rel in corpus.plain[:3]:
        urls.append(shutil.copy(os.path.join(corpus.root, rel), tmp_path / os.path.basename(rel)))
    urls = [str(u) for u in urls]
    return urls, build_index(urls)


def _read_all(index: DatasetIndex, urls: list[str], **kw: Any) -> list[dict]:
    ib = InfoBatch(index, num_epochs=1)
    return read_with_reader(ib, urls, **kw)


def test_changed_size_is_stale(copied):
    urls, index = copied
    with open(urls[1], "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(StaleIndexError) as err:
        _read_all(index, urls)
    message = str(err.value)
    assert urls[1] in message and "re-run `infobatch-stream index`" in message and "size" in message


def test_truncated_shard_is_stale(copied):
    urls, index = copied
    os.truncate(urls[2], os.path.getsize(urls[2]) // 2)
    with pytest.raises(StaleIndexError, match=re.escape(urls[2])):
        _read_all(index, urls)


def test_touched_mtime_is_stale_unless_verify_size(copied):
    urls, index = copied
    before = _read_all(index, urls)
    st = os.stat(urls[0])
    os.utime(urls[0], (st.st_atime, st.st_mtime + 10))
    with pytest.raises(StaleIndexError, match="mtime") as err:
        _read_all(index, urls)
    assert urls[0] in str(err.value) and "verify='size'" in str(err.value)
    after = _read_all(index, urls, verify="size")
    assert_same_samples(after, before)
    with pytest.raises(ValueError, match="verify"):
        _read_all(index, urls, verify="mtime")


def test_same_size_rewrite_is_caught_with_verify_size(copied):
    """Different content at the same size: a read range no longer starts at a tar header, which
    the reader checks (at the start of each range) instead of returning wrong bytes."""
    urls, index = copied
    with open(urls[0], "rb") as f:
        data = bytearray(f.read())
    data[0:512] = b"\x55" * 512  # the first sample's header: where the shard's first read starts
    with open(urls[0], "wb") as f:
        f.write(data)
    with pytest.raises(StaleIndexError, match="is not where the index puts it"):
        _read_all(index, urls, verify="size", merge_gap=0)


def test_stale_and_missing_shards_are_skipped_by_the_handler(copied):
    urls, index = copied
    reference = _read_all(index, urls)
    with open(urls[0], "ab") as f:
        f.write(b"\0" * 512)
    os.remove(urls[2])
    caught: list[Exception] = []

    def collect(exn: Exception) -> bool:  # a WebDataset handler that records what it skipped
        caught.append(exn)
        return True

    got = _read_all(index, urls, handler=collect)
    assert_same_samples(got, [s for s in reference if s["__url__"] == urls[1]])
    assert [type(e) for e in caught] == [StaleIndexError, FileNotFoundError]
    assert [e.args[-1] for e in caught] == [urls[0], urls[2]]  # the URL is appended, as WebDataset does
    got = _read_all(index, urls, handler=wds.ignore_and_continue)
    assert [s["__key__"] for s in got] == [s["__key__"] for s in reference if s["__url__"] == urls[1]]


def test_stale_over_http(corpus, server):
    folder = os.path.join(corpus.root, "stale")
    os.makedirs(folder, exist_ok=True)
    rels = []
    for rel in corpus.plain[:2]:
        shutil.copy(os.path.join(corpus.root, rel), folder)
        rels.append(f"stale/{os.path.basename(rel)}")
    urls = [f"{server.url}/{rel}" for rel in rels]
    index = build_index(urls)
    reference = _read_all(index, urls)
    assert len(reference) == index.num_samples
    path = os.path.join(corpus.root, rels[0])
    # Touched: the server's ETag changes (size + mtime), the size does not.
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + 10))
    with pytest.raises(StaleIndexError, match="ETag"):
        _read_all(index, urls)
    assert_same_samples(_read_all(index, urls, verify="size"), reference)
    # Grown: the size on the server differs from the index.
    with open(path, "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(StaleIndexError, match="re-run") as err:
        _read_all(index, urls)
    assert urls[0] in str(err.value)
    # Truncated: the server cannot deliver the indexed bytes.
    os.truncate(path, index.shards[0].filesize // 2)
    with pytest.raises((StaleIndexError, StorageError), match="re-index|re-run"):
        _read_all(index, urls, verify="size")
    # The handler skips it and reads the other shard.
    got = _read_all(index, urls, handler=wds.ignore_and_continue)
    assert_same_samples(got, [s for s in reference if s["__url__"] == urls[1]])


# ---- 5. DataLoader workers -------------------------------------------------------------------------


def _train_with_loader(index: DatasetIndex, num_workers: int, epochs: int = 3) -> tuple[list[list[int]], list[dict]]:
    ib = InfoBatch(index, num_epochs=epochs, prune_ratio=0.5, delta=1.0, seed=11)
    pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("__key__", META_KEY), wds.batched(8))
    loader = data_loader(pipeline, None, num_workers, context="fork", persistent=True)
    slots = train_epochs(ib, loader, epochs)
    stats = ib.stats()
    assert [len(s) for s in slots] == [s["kept"] for s in stats]  # each epoch yields its planned size
    return [sorted(s) for s in slots], stats


def test_two_fork_workers_match_the_main_process(local_index):
    _, index = local_index
    slots0, stats0 = _train_with_loader(index, 0)
    slots2, stats2 = _train_with_loader(index, 2)
    assert slots2 == slots0
    assert any(s["pruned"] for s in stats0)
    for s0, s2 in zip(stats0, stats2):
        for name in ("kept", "pruned", "trained", "bytes_read", "bytes_skipped", "shards_skipped"):
            assert s2[name] == s0[name], (s0["epoch"], name)
        for name in ("requests", "shards_read"):  # the two workers' cut may fall inside a shard: both open it
            assert s0[name] <= s2[name] <= s0[name] + 1, (s0["epoch"], name)
        assert s0["bytes_read"] > 0 and s0["shards_read"] > 0


# ---- 6. block granularity --------------------------------------------------------------------------


def _block_setup(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Slots grouped in shards of varied sizes (not multiples of the block size)."""
    sizes = rng.integers(50, 300, size=n // 50)
    first = np.concatenate(([0], np.cumsum(sizes)))
    first = first[first < n]
    slots = np.arange(n)
    shard_first = first[np.searchsorted(first, slots, side="right") - 1]
    return slots, shard_first


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_block_drops_keep_the_marginal_rate(ratio):
    k, n = 8, 100_000
    rng = np.random.default_rng(4)
    slots, shard_first = _block_setup(n, rng)
    ids = policy.block_ids(slots, shard_first, k)
    assert (ids[slots == shard_first] == slots[slots == shard_first]).all()  # blocks restart per shard
    assert (np.diff(ids) >= 0).all() and (ids >= shard_first).all() and (ids <= slots).all()
    assert np.array_equal(ids, shard_first + (slots - shard_first) // k)
    scores = rng.random(n).astype(np.float32)
    thresh = policy.threshold(scores)
    learned = policy.well_learned(scores, thresh)
    config = policy.PruneConfig(num_epochs=10, prune_ratio=ratio, delta=1.0, seed=9, block_size=k)
    block_start = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    members = np.add.reduceat(learned.astype(np.int64), block_start)  # well-learned per block
    sigma = np.sqrt(ratio * (1 - ratio) * float((members**2).sum()))  # drops are m_b x Bernoulli(r)
    for epoch in range(5):
        keep, boosted = policy.decide(scores, slots, thresh, epoch, config, ids)
        dropped = ~keep
        assert not (dropped & ~learned).any()
        assert (boosted == (learned & keep)).all()
        assert abs(dropped.sum() - ratio * learned.sum()) <= 6 * sigma, (epoch, dropped.sum() / learned.sum())
        # All well-learned members of a block share the decision.
        d = np.where(learned, dropped, False).astype(np.int64)
        n_learned = learned.astype(np.int64)
        per_block = np.add.reduceat(d, block_start)
        assert ((per_block == 0) | (per_block == np.add.reduceat(n_learned, block_start))).all()


def test_block_drops_are_unbiased_per_sample():
    k, n, epochs, ratio = 8, 2048, 400, 0.5
    rng = np.random.default_rng(6)
    slots, shard_first = _block_setup(n, rng)
    ids = policy.block_ids(slots, shard_first, k)
    scores = np.where(rng.random(n) < 0.1, 5.0, rng.random(n)).astype(np.float32)
    thresh = policy.threshold(scores)
    learned = policy.well_learned(scores, thresh)
    assert learned.mean() > 0.8
    config = policy.PruneConfig(num_epochs=epochs, prune_ratio=ratio, delta=1.0, seed=2, block_size=k)
    total = np.zeros(n)
    for epoch in range(epochs):
        keep, boosted = policy.decide(scores, slots, thresh, epoch, config, ids)
        total += keep * policy.weights(boosted, config)
    mean = total / epochs
    assert (mean[~learned] == 1.0).all()
    sd = np.sqrt(ratio / (1 - ratio) / epochs)  # kept x weight of a learned sample: variance r / (1 - r)
    assert np.abs(mean[learned] - 1).max() <= 6 * sd
    # The grand mean over learned samples: blocks are correlated within an epoch.
    block_start = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    members = np.add.reduceat(learned.astype(np.int64), block_start)
    grand_sd = np.sqrt(ratio / (1 - ratio) * float((members**2).sum()) / learned.sum() ** 2 / epochs)
    assert abs(mean[learned].mean() - 1) <= 6 * grand_sd


def test_block_plan_matches_the_reader_and_cuts_ranges(tmp_path, local_index):
    # The epoch plan (set_epoch) and the per-shard decisions agree in block mode.
    _, index = local_index
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0, seed=1, granularity=8)
    ib.store.scores[:] = np.random.default_rng(0).random(index.num_samples)
    ib.set_epoch(1)
    for shard in range(index.num_shards):
        keep, _ = ib.decide_shard(shard, 1, ib.control.threshold)
        lo, hi = index.slots(shard)
        slots = np.arange(lo, hi)
        ids = policy.block_ids(slots, lo, 8)
        expected, _ = policy.decide(np.asarray(ib.store.scores[lo:hi]), slots, ib.control.threshold, 1, ib.config, ids)
        assert (keep == expected).all() and ib.control.kept_per_shard[shard] == keep.sum()

    # Planned ranges of a 1024-sample shard, k = 8 against k = 1.
    rng = np.random.default_rng(8)
    samples = [{"__key__": f"b{i:05d}", "bin": rng.bytes(int(rng.integers(200, 1500)))} for i in range(1024)]
    urls = write_wds_shards(str(tmp_path), samples, maxcount=1024, name="blocks")
    big = build_index(urls)
    start, end = big.byte_ranges(0)
    losses = {"uniform": rng.random(1024), "lognormal": rng.lognormal(0, 2, 1024)}
    counts: dict[tuple[str, int, int], tuple[int, int]] = {}
    for name, loss in losses.items():
        for k in (1, 8):
            ib = InfoBatch(big, num_epochs=20, prune_ratio=0.5, delta=1.0, seed=3, granularity=k)
            ib.store.scores[:] = loss
            for gap in (0, LOCAL_MERGE_GAP):
                counts[name, k, gap] = (0, 0)
            for epoch in range(1, 11):
                ib.set_epoch(epoch)
                keep, _ = ib.decide_shard(0, epoch, ib.control.threshold)
                for gap in (0, LOCAL_MERGE_GAP):
                    ranges = plan_ranges(start, end, np.flatnonzero(keep), gap)
                    nranges, nbytes = counts[name, k, gap]
                    counts[name, k, gap] = (nranges + len(ranges), nbytes + sum(r.end - r.start for r in ranges))
    ratios = {
        (name, gap): counts[name, 1, gap][0] / counts[name, 8, gap][0]
        for name in losses
        for gap in (0, LOCAL_MERGE_GAP)
    }
    print("planned ranges k=1 / k=8:", {f"{n} gap={g}": round(r, 2) for (n, g), r in ratios.items()})
    # Without merging, blocks cut the reads: much more when most samples are well-learned
    # (a skewed loss), less when half are (the kept not-learned members still split a dropped block).
    assert ratios["lognormal", 0] >= 2.0
    assert ratios["uniform", 0] >= 1.15
    # With the default merge gap, small pruned gaps are read through at k = 1: k = 8 reads fewer bytes.
    for name in losses:
        assert counts[name, 8, LOCAL_MERGE_GAP][1] < counts[name, 1, LOCAL_MERGE_GAP][1]
