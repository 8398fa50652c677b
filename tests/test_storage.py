"""The storage layer against real servers on 127.0.0.1: moto's S3 API and the range server with
object-store latency. Output must equal ``wds.tarfile_to_samples()`` + ``ib.filter()`` on the
same shards, and only the kept bytes may cross the wire."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from infobatch_stream import DatasetIndex, InfoBatch, build_index
from infobatch_stream.rangeserver import RangeServer
from infobatch_stream.readahead import ReadAhead
from infobatch_stream.reader import StaleIndexError
from infobatch_stream.storage import StorageError, backend_for, identity
from tests.helpers.data import write_shards
from tests.helpers.guards import deadline
from tests.helpers.loaders import data_loader

# ---- helpers -----------------------------------------------------------------------------------


def prune(ib: InfoBatch, epoch: int = 1) -> None:
    """About 40% pruned: half the samples well-learned, r = 0.8 of those dropped."""
    rng = np.random.default_rng(3)
    ib.store.scores[:] = np.where(rng.random(len(ib.store)) < 0.5, 0.0, 1.0).astype(np.float32)
    ib.set_epoch(epoch)


def pruned_ib(index: DatasetIndex) -> InfoBatch:
    """The InfoBatch most tests here read with (r = 0.8), about 40% pruned at epoch 1."""
    ib = InfoBatch(index, num_epochs=10, prune_ratio=0.8, delta=1.0, seed=0)
    prune(ib)
    return ib


def kept_bytes(ib: InfoBatch) -> int:
    total = 0
    for shard in range(ib.index.num_shards):
        keep, _ = ib.decide_shard(shard, ib.epoch, ib.control.threshold)
        start, end = ib.index.byte_ranges(shard)
        total += int((end - start)[keep].sum())
    return total


def view(samples: list[dict]) -> list[tuple]:
    """What must agree across sources: key, every field's bytes, the metadata (not ``__url__``)."""
    out = []
    for s in samples:
        fields = tuple(sorted((k, bytes(v)) for k, v in s.items() if not k.startswith("__")))
        out.append((s["__key__"], fields, tuple(torch.as_tensor(s["__ib__"]).tolist())))
    return out


def reference(local_urls: list[str], index_urls: list[str], ib: InfoBatch) -> list[tuple]:
    """Plain WebDataset + ib.filter() over local copies, with ``__url__`` renamed to the remote one."""
    rename = dict(zip(local_urls, index_urls))

    def to_remote(src):  # type: ignore[no-untyped-def]
        for sample in src:
            sample["__url__"] = rename[sample["__url__"]]
            yield sample

    return view(
        list(wds.DataPipeline(wds.SimpleShardList(local_urls), wds.tarfile_to_samples(), to_remote, ib.filter()))
    )


def read(ib: InfoBatch, urls: list[str], **kw: Any) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples(**kw)))


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("shards")
    return write_shards(str(folder), num_shards=6, per_shard=30)


@pytest.fixture(scope="module")
def s3_shards(s3_server, local_shards) -> list[str]:
    return s3_server.upload("train-bucket", local_shards, "data")


# ---- S3 -------------------------------------------------------------------------------------------


def test_s3_index_by_listing_and_by_braces_agree(s3_server, s3_shards, local_shards, tmp_path):
    listed = build_index("s3://train-bucket/data/*.tar", str(tmp_path / "listed.json"))
    braced = build_index("s3://train-bucket/data/part-{000..005}.tar")
    local = build_index(local_shards)
    assert listed.urls == braced.urls == s3_shards
    assert listed.fingerprint == braced.fingerprint == local.fingerprint
    for name in ("start", "end", "data_offset", "size"):
        assert np.array_equal(listed.array(name), local.array(name))
    etags = [s.etag for s in listed.shards]
    assert all(etags) and len(set(etags)) == len(etags)  # each object's version is recorded


@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_s3_reader_equals_webdataset_and_reads_only_kept_bytes(s3_server, s3_shards, local_shards, pruned):
    index = build_index(s3_shards)
    ib = InfoBatch(index, num_epochs=10, prune_ratio=0.8, delta=1.0, seed=0)
    if pruned:
        prune(ib)
    else:
        ib.set_epoch(0)
    with deadline(120):
        got = view(read(ib, s3_shards, merge_gap=0))  # small samples: the default gap would merge some
    io = ib.stats()[-1]
    kept = kept_bytes(ib)
    assert got == reference(local_shards, s3_shards, ib)
    assert io["bytes_read"] <= 1.05 * kept + 512 * io["requests"]
    if pruned:
        assert len(got) < 0.75 * index.num_samples


def test_s3_with_dataloader_workers_and_dataset(s3_server, s3_shards):
    """ib.shards() + ib.tarfile_to_samples() and ib.dataset(), forked workers, over S3: every kept
    slot once (through obstore, or fsspec where this process used obstore before forking)."""
    index = build_index(s3_shards)
    ib = pruned_ib(index)
    want = sorted(ib.slots_of_epoch().tolist()) if hasattr(ib, "slots_of_epoch") else None
    pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("cls", "__ib__"))
    dataset = ib.dataset(wds.to_tuple("cls", "__ib__"), shuffle=16)
    results = []
    with deadline(240):
        for source in (pipeline, dataset):
            loader = data_loader(source, 8, 2, context="fork")
            slots = [int(s) for _, meta in loader for s in torch.as_tensor(meta)[:, 0]]
            results.append(sorted(slots))
    assert results[0] == results[1]
    assert len(results[0]) == len(set(results[0])) == ib.epoch_size
    if want is not None:
        assert results[0] == want


def test_fork_after_the_parent_used_obstore_does_not_hang(s3_server, s3_shards):
    """The parent reads S3 itself, then forks DataLoader workers: obstore's runtime cannot cross
    fork(), so the workers read through fsspec (s3fs) and give the same samples."""
    index = build_index(s3_shards)
    ib = pruned_ib(index)
    with deadline(240):
        first = sorted(int(s["__ib__"][0]) for s in read(ib, s3_shards))  # obstore starts in this process
        ib.set_epoch(1)
        pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("__ib__"))
        loader = data_loader(pipeline, None, 2, context="fork")
        second = sorted(int(torch.as_tensor(m)[0]) for (m,) in loader)
    assert first == second


def test_s3_object_rewritten_at_the_same_size_is_stale(s3_server, local_shards, tmp_path):
    urls = s3_server.upload("stale-bucket", local_shards[:2], "d")
    index = build_index(urls)
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0)
    ib.set_epoch(0)
    data = bytearray(open(local_shards[1], "rb").read())
    data[-1024] ^= 1  # same size, other bytes: only the ETag tells
    path = tmp_path / "changed.tar"
    path.write_bytes(bytes(data))
    s3_server.client().upload_file(str(path), "stale-bucket", "d/" + os.path.basename(local_shards[1]))
    with pytest.raises(StaleIndexError, match="ETag.*re-run"):
        read(ib, urls)
    assert len(read(ib, urls, verify="size")) == index.num_samples  # opted out of the version check


def test_missing_object_and_bucket_name_the_url(s3_server, s3_shards):
    with pytest.raises(FileNotFoundError, match="s3://train-bucket/data/nope.tar"):
        build_index(["s3://train-bucket/data/nope.tar"])
    with pytest.raises(FileNotFoundError, match="no object matches"):
        build_index("s3://train-bucket/elsewhere/*.tar")


# ---- HTTP with object-store latency ----------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(local_shards) -> Iterator[RangeServer]:
    server = RangeServer(os.path.dirname(local_shards[0]), ttfb=0.02, bandwidth=50e6)
    with server:
        yield server


def test_latency_server_four_workers_identity_and_bytes(slow_server, local_shards):
    urls = [f"{slow_server.url}/{os.path.basename(u)}" for u in local_shards]
    index = build_index(urls)
    ib = pruned_ib(index)
    ref = reference(local_shards, urls, ib)
    slow_server.counters.reset()
    with deadline(240):
        got = view(read(ib, urls, max_inflight=8, merge_gap=0))
        assert got == ref
        served = slow_server.counters.snapshot()
        assert served["bytes"] <= 1.05 * kept_bytes(ib) + 512 * served["requests"]
        ib.set_epoch(1)
        pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("__ib__"))
        loader = data_loader(pipeline, None, 4, context="spawn")
        slots = sorted(int(torch.as_tensor(m)[0]) for (m,) in loader)
    assert slots == sorted(int(torch.as_tensor(r[2])[0]) for r in ref)


def test_many_connections_at_once_are_accepted(slow_server, local_shards):
    url = f"{slow_server.url}/{os.path.basename(local_shards[0])}"
    backend = backend_for(url)
    out: list[Any] = []

    def one() -> None:
        out.append(backend.read(url, 0, 512)[0])

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 32 and len(set(out)) == 1


def test_a_server_with_an_endless_body_keeps_memory_bounded(local_shards, range_server):
    """It ignores Range and sends a body with no length that never ends: a clear error naming
    the shard, after holding no more than a chunk of it (not the endless body)."""
    import resource

    base = range_server(os.path.dirname(local_shards[0]), endless=True)
    urls = [f"{base}/{os.path.basename(u)}" for u in local_shards[:2]]
    index = build_index(local_shards[:2])
    index.shards[:] = [s.__class__(u, *list(s.__dict__.values())[1:]) for u, s in zip(urls, index.shards)]
    index._url_lookup = None
    ib = pruned_ib(index)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with deadline(60), pytest.raises(StorageError, match=urls[0].replace(".", r"\.")):
        read(ib, urls, verify="size")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10


def test_expired_signed_redirects_are_resolved_again(local_shards, range_server):
    """A hub redirects to a signed URL that expires: later reads still work."""
    import time

    base = range_server(os.path.dirname(local_shards[0]), signed_ttl=0.3)
    urls = [f"{base}/__signed__/{os.path.basename(u)}" for u in local_shards[:2]]
    index = build_index(urls)
    ib = pruned_ib(index)
    first = view(read(ib, urls))
    time.sleep(0.5)
    assert view(read(ib, urls)) == first == reference(local_shards[:2], urls, ib)


def test_presigned_urls_match_the_index_without_their_signature(local_shards):
    a = "https://hub.example/d/part-000.tar?X-Amz-Signature=abc&X-Amz-Expires=60&revision=main"
    b = "https://hub.example/d/part-000.tar?X-Amz-Signature=def&X-Amz-Expires=90&revision=main"
    assert identity(a) == identity(b) == "https://hub.example/d/part-000.tar?revision=main"
    index = build_index(local_shards[:1])
    index.shards[0] = index.shards[0].__class__(a, *list(index.shards[0].__dict__.values())[1:])
    index._url_lookup = None
    assert index.shard_of_url(b) == 0


def test_a_server_that_comes_back_after_closing_connections(local_shards):
    """Connections closed by the server between epochs are opened again by the client."""
    root = os.path.dirname(local_shards[0])
    first_server = RangeServer(root)
    port = first_server.httpd.server_address[1]
    with first_server as base:
        urls = [f"{base}/{os.path.basename(u)}" for u in local_shards[:2]]
        index = build_index(urls)
        ib = pruned_ib(index)
        first = view(read(ib, urls))
    with RangeServer(root, port):
        with deadline(60):
            assert view(read(ib, urls)) == first


def test_readahead_budget_bounds_what_is_buffered():
    ahead = ReadAhead(max_inflight=4, budget=1000)
    assert ahead.room_for(600)
    ahead.submit(lambda: b"x" * 600, 600)
    assert not ahead.room_for(600)  # over the budget
    assert ahead.room_for(400)
    ahead.release(600)
    assert ahead.room_for(5000)  # nothing buffered: a large read may run alone


def test_unknown_scheme_says_what_to_install():
    with pytest.raises(StorageError, match="fsspec|pip install|no backend"):
        backend_for("nosuchproto://x/y.tar").read("nosuchproto://x/y.tar", 0, 10)


def test_fsspec_protocol_equals_webdataset(local_shards):
    """A protocol served by fsspec (here its in-memory filesystem): index and reader agree with
    plain WebDataset on the local copies."""
    import fsspec

    fs = fsspec.filesystem("memory")
    urls = []
    for path in local_shards[:3]:
        url = f"memory://fsspec-test/{os.path.basename(path)}"
        with fs.open(url, "wb") as f:
            f.write(open(path, "rb").read())
        urls.append(url)
    index = build_index(urls)
    assert index.fingerprint == build_index(local_shards[:3]).fingerprint
    ib = pruned_ib(index)
    assert view(read(ib, urls, merge_gap=0)) == reference(local_shards[:3], urls, ib)


def test_a_failed_remote_shard_under_a_handler_does_not_end_the_epoch(tmp_path, range_server):
    """A shard that disappears after indexing, with several ranges in flight and a small budget:
    the handler skips it, every other shard is read, and it is counted as failed, not read."""
    folder = tmp_path / "gone"
    paths = write_shards(str(folder), num_shards=6, per_shard=30)
    base = range_server(folder)
    urls = [f"{base}/{os.path.basename(p)}" for p in paths]
    index = build_index(urls)
    ib = pruned_ib(index)
    expected = {s["__key__"] for s in read(ib, urls, merge_gap=0) if not s["__url__"].endswith("part-001.tar")}
    os.remove(paths[1])
    ib.set_epoch(1)  # a fresh pass of the same epoch: the same plan
    with deadline(60):
        got = read(ib, urls, merge_gap=0, handler=lambda exn: True, max_inflight=2, readahead_bytes=4096)
    assert {s["__key__"] for s in got} == {k for k in expected} and len(got) == len(expected)
    io = ib.stats()[-1]
    assert io["shards_failed"] == 1 and io["shards_read"] == 5


def test_urls_that_are_not_patterns_are_left_alone(tmp_path, s3_server, local_shards):
    from infobatch_stream.storage import expand_listing

    odd = tmp_path / "shard[1].tar"
    odd.write_bytes(b"x")
    for url in ("pipe:curl -s 'https://h/a.tar?dl=1'", "https://h/a.tar?X-Amz-Signature=1", str(odd)):
        assert expand_listing(url) == [url]
    urls = s3_server.upload("nested-bucket", local_shards[:2], "train")
    s3_server.upload("nested-bucket", local_shards[2:3], "train/old")
    assert expand_listing("s3://nested-bucket/train/*.tar") == urls  # not train/old/, like a local glob


def test_an_index_with_upper_case_pipe_urls_is_refused(local_shards, tmp_path):
    """WebDataset's gopen lower-cases the scheme, so ``PIPE:`` must never come out as a command:
    it is a path relative to the index (what the reader opens, as a file), never a pipe."""
    import json

    from infobatch_stream import DatasetIndex

    path = str(tmp_path / "index.json")
    build_index(local_shards[:1], path)
    doc = json.load(open(path))
    doc["shardlist"][0]["url"] = f"PIPE:cat {local_shards[0]}"
    json.dump(doc, open(path, "w"))
    with pytest.raises(PermissionError, match="shell commands"):  # refused as written, like pipe:
        DatasetIndex.load(path)
    url = DatasetIndex.load(path, allow_pipes=True).urls[0]  # and even then read as a file, not a command
    assert url.startswith(str(tmp_path)) and url[:5].lower() != "pipe:"
    assert backend_for("PIPE:cat x").__class__.__name__ == "LocalBackend"  # never a shell in our reader


def test_indexing_leaves_the_process_free_to_fork_obstore_workers(s3_server, s3_shards):
    """build_index of s3:// shards runs obstore in a child interpreter, so DataLoader workers
    forked afterwards read through obstore, not the fsspec fallback (a fresh process checks)."""
    import subprocess
    import sys

    code = f"""
import warnings, torch, webdataset as wds
from torch.utils.data import DataLoader
from infobatch_stream import InfoBatch, build_index
from infobatch_stream.storage import objstore
index = build_index({s3_shards!r})
assert not objstore.used_here(), "indexing started obstore in this process"
ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0)
ib.set_epoch(0)
loader = DataLoader(wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("__ib__")),
                    batch_size=None, num_workers=2, multiprocessing_context="fork")
print("samples", sum(1 for _ in loader))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"samples {build_index(s3_shards).num_samples}" in out.stdout
    assert "reading through fsspec instead" not in out.stderr


def test_a_folder_or_a_shard_given_as_the_index_says_what_to_do(local_shards):
    from infobatch_stream.index import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="is a folder.*infobatch-stream index"):
        InfoBatch(os.path.dirname(local_shards[0]), num_epochs=2)
    with pytest.raises(IndexMismatchError, match="not an index JSON.*tar shard"):
        InfoBatch(local_shards[0], num_epochs=2)


def test_fsspec_shard_that_grew_since_indexing_is_stale(local_shards):
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://fsspec-stale/part.tar"
    data = open(local_shards[0], "rb").read()
    with fs.open(url, "wb") as f:
        f.write(data)
    index = build_index([url])
    with fs.open(url, "wb") as f:
        f.write(data + b"\0" * 1024)
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0)
    ib.set_epoch(0)
    with pytest.raises(StaleIndexError, match="fsspec-stale.*size"):
        read(ib, [url])
