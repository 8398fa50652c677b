"""A run started from a wids shard list: the index is built during epoch 0 by the reader itself.

Every test compares with what an indexing pass (``build_index``, as ``infobatch-stream index``)
gives: the same arrays byte for byte, the same samples trained in every epoch.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import webdataset as wds

from infobatch_stream import META_KEY, DatasetIndex, IndexMismatchError, InfoBatch, TarFormatError, build_index
from infobatch_stream.building import default_output
from infobatch_stream.rangeserver import RangeServer
from infobatch_stream.scanfile import Scan, ScanDir, pack, unpack
from infobatch_stream.tarscan import scan_shard
from tests.helpers.data import slot_loss, train_epochs, write_shards
from tests.helpers.loaders import data_loader, meta_loader, read_stages

CONFIG = dict(num_epochs=4, prune_ratio=0.5, delta=1.0, seed=3)
PER_SHARD = 30


def write_list(folder: str, urls: list[str], counts: list[int] | None = None, name: str = "list.json") -> str:
    """A wids shard list of ``urls`` (local ones relative to the list, as wids writes them)."""
    counts = counts or [PER_SHARD] * len(urls)
    entries = [
        {"url": os.path.relpath(u, folder) if os.path.exists(u) else u, "nsamples": n} for u, n in zip(urls, counts)
    ]
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries}, f)
    return path


def assert_same_arrays(built: str, reference: str) -> None:
    a, b = DatasetIndex.load(built, allow_pipes=True), DatasetIndex.load(reference)
    assert sorted(a._arrays) == sorted(b._arrays)
    for name in a._arrays:
        x, y = np.asarray(a._arrays[name]), np.asarray(b._arrays[name])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert a.fingerprint == b.fingerprint
    assert [s.crc for s in a.shards] == [s.crc for s in b.shards]


def reader_loader(ib: InfoBatch, num_workers: int, path: str = "reader", **kw):
    pipeline = wds.DataPipeline(ib.shards(), *read_stages(ib, path), wds.to_tuple(META_KEY))
    return data_loader(pipeline, 8, num_workers, context="fork", **kw)


@pytest.fixture
def shards(tmp_path):
    folder = str(tmp_path / "shards")
    urls = write_shards(folder, num_shards=6, per_shard=PER_SHARD)
    reference = build_index(urls, os.path.join(folder, "reference.json"))
    return folder, urls, reference


def _reference_slots(reference: DatasetIndex, num_workers: int, epochs: int = 3) -> list[list[int]]:
    ib = InfoBatch(reference, **CONFIG)
    return [sorted(s) for s in train_epochs(ib, reader_loader(ib, num_workers), epochs)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("where", ["local", "http", "pipe"])
def test_epoch_0_builds_the_index_that_indexing_writes(shards, range_server, where, num_workers):
    folder, urls, reference = shards
    if where == "http":
        base = range_server(folder)
        urls = [f"{base}/{os.path.basename(u)}" for u in urls]
    elif where == "pipe":
        urls = [f"pipe:cat {u}" for u in urls]
    listing = write_list(folder, urls)
    ib = InfoBatch(listing, **CONFIG, allow_pipes=where == "pipe")
    assert ib.index.building is not None and ib.index.num_samples == 6 * PER_SHARD
    trained = [sorted(s) for s in train_epochs(ib, reader_loader(ib, num_workers, persistent=True), 3)]
    assert trained == _reference_slots(reference, num_workers)
    assert ib.index.building is None and ib.index.path == default_output(listing)
    assert_same_arrays(ib.index.path, reference.path)
    assert not os.path.exists(ib.index.path[:-5] + ".scans")  # merged, then removed
    stats = ib.stats()
    total = sum(os.path.getsize(u) for u in shards[1])
    assert stats[0]["bytes_read"] >= total - 10240 * 6  # epoch 0 read every shard (end-of-archive aside)
    assert stats[1]["pruned"] > 0 and stats[1]["bytes_skipped"] > 0


def test_over_http_epoch_0_streams_each_shard_once(shards, tmp_path):
    folder, urls, reference = shards
    server = RangeServer(folder)
    with server as base:
        listing = write_list(str(tmp_path), [f"{base}/{os.path.basename(u)}" for u in urls])
        ib = InfoBatch(listing, **CONFIG)
        loader = reader_loader(ib, 2)  # 6 shards of 30 over 2 workers: no shard is cut between them
        train_epochs(ib, loader, 1)
        epoch0 = server.counters.snapshot()
        ib.set_epoch(1)
        assert server.counters.snapshot() == epoch0  # merging read nothing more
    # fsspec's HEAD and one GET per shard (each under 1 MiB), and one 1-byte Range probe, as indexing makes
    assert epoch0["requests"] <= 4 * len(urls)  # (and a HEAD for the probe when fsspec has not cached the size)
    assert epoch0["bytes"] == sum(os.path.getsize(u) for u in urls) + len(urls)
    assert_same_arrays(ib.index.path, reference.path)


def test_a_gzip_shard_and_a_shard_split_between_workers(tmp_path, range_server):
    folder = str(tmp_path)
    urls = write_shards(folder, num_shards=5, per_shard=PER_SHARD)  # 150 over 2 workers: one shard is cut
    with open(urls[1], "rb") as f, gzip.open(urls[1] + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(urls[1])
    urls[1] += ".gz"
    reference = build_index(urls, os.path.join(folder, "reference.json"))
    base = range_server(folder)
    listing = write_list(folder, [f"{base}/{os.path.basename(u)}" for u in urls])
    ib = InfoBatch(listing, **CONFIG)
    trained = [sorted(s) for s in train_epochs(ib, reader_loader(ib, 2), 3)]
    assert trained[0] == list(range(150))
    assert trained == _reference_slots(reference, 2)
    assert_same_arrays(ib.index.path, reference.path)
    assert [s.filesize for s in ib.index.shards] == [s.filesize for s in reference.shards]  # the gzip one too


def test_dataset_and_filter_paths(shards):
    folder, urls, reference = shards
    ib = InfoBatch(write_list(folder, urls, name="a.json"), **CONFIG)
    trained = [sorted(s) for s in train_epochs(ib, meta_loader(ib, 8, num_workers=2), 2)]
    assert trained[0] == list(range(len(urls) * PER_SHARD))
    assert_same_arrays(ib.index.path, reference.path)
    # WebDataset's own reader + ib.filter(): epoch 0 trains everything, the index is made at set_epoch(1)
    ib = InfoBatch(write_list(folder, urls, name="b.json"), **CONFIG)
    trained = [sorted(s) for s in train_epochs(ib, reader_loader(ib, 2, path="filter"), 3)]
    assert trained == _reference_slots(reference, 2)
    assert_same_arrays(ib.index.path, reference.path)


def test_a_run_restarted_from_the_list_uses_the_index_built_before(shards):
    folder, urls, reference = shards
    listing = write_list(folder, urls)
    first = InfoBatch(listing, **CONFIG)
    train_epochs(first, reader_loader(first, 0), 2)
    state = first.state_dict()
    again = InfoBatch(listing, **CONFIG)
    assert again.index.building is None and again.index.path == default_output(listing)
    again.load_state_dict(state)
    # a state from epoch 0 of the first run (the list's fingerprint) loads into the built index too
    early = InfoBatch(write_list(folder, urls, name="early.json"), **CONFIG)
    train_epochs(early, reader_loader(early, 0), 1)
    saved = early.state_dict()
    early.set_epoch(1)
    InfoBatch(write_list(folder, urls, name="early.json"), **CONFIG).load_state_dict(saved)
    # a list that now names other shards or counts is refused, naming the index
    write_list(folder, urls[:-1], name="list.json")
    with pytest.raises(IndexMismatchError, match="lists other shards or counts"):
        InfoBatch(listing, **CONFIG)


def test_a_later_state_loads_where_the_built_index_was_removed(shards):
    folder, urls, reference = shards
    listing = write_list(folder, urls)
    ib = InfoBatch(listing, **CONFIG)
    train_epochs(ib, reader_loader(ib, 0), 2)
    state = ib.state_dict()
    os.remove(ib.index.path)
    shutil.rmtree(ib.index.path[:-5] + ".arrays")
    again = InfoBatch(listing, **CONFIG)
    assert again.index.building is not None
    again.load_state_dict(state)  # builds the index (scanning every shard), then checks it is the state's
    assert again.index.building is None and again.epoch == 1
    assert_same_arrays(again.index.path, reference.path)


def test_a_resume_inside_epoch_0_keeps_what_was_indexed(shards):
    folder, urls, reference = shards
    listing = write_list(folder, urls)
    ib = InfoBatch(listing, **CONFIG)
    ib.set_epoch(0)
    dataset = ib.dataset(wds.to_tuple(META_KEY))
    seen: list[int] = []
    for i, (meta,) in enumerate(dataset):
        ib.update(meta[None], slot_loss(meta[None]))
        seen.append(int(meta[0]))
        if i == 3 * PER_SHARD + 5:
            break
    state, reading = ib.state_dict(), dataset.state_dict()
    scans = ScanDir(ib.index.building.scans)
    assert [scans.has(s) for s in range(len(urls))].count(True) >= 3
    del ib, dataset
    resumed = InfoBatch(listing, **CONFIG)
    resumed.load_state_dict(state)
    dataset = resumed.dataset(wds.to_tuple(META_KEY))
    dataset.load_state_dict(reading)
    for (meta,) in dataset:
        resumed.update(meta[None], slot_loss(meta[None]))
        seen.append(int(meta[0]))
    assert sorted(seen) == list(range(len(urls) * PER_SHARD))
    assert resumed.stats()[0]["bytes_read"] < sum(os.path.getsize(u) for u in urls) * 0.6  # not read again
    resumed.set_epoch(1)
    assert_same_arrays(resumed.index.path, reference.path)


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("listed", [PER_SHARD - 1, PER_SHARD + 1])
def test_counts_that_disagree_with_the_list_name_the_shard(shards, range_server, where, listed):
    folder, urls, _ = shards
    if where == "http":
        base = range_server(folder)
        urls = [f"{base}/{os.path.basename(u)}" for u in urls]
    counts = [PER_SHARD] * len(urls)
    counts[2] = listed
    ib = InfoBatch(write_list(folder, urls, counts), **CONFIG)
    ib.set_epoch(0)
    with pytest.raises(
        IndexMismatchError, match=f"{os.path.basename(urls[2])}.*(has {PER_SHARD} samples|more samples)"
    ):
        # in a loader worker once (forwarded; torch then takes ~10 s to stop workers it left mid-epoch)
        for (meta,) in reader_loader(ib, 2 if (where, listed) == ("local", PER_SHARD + 1) else 0):
            ib.update(meta, slot_loss(meta))


def test_a_list_without_counts_is_refused_with_the_command_that_indexes(shards):
    folder, urls, _ = shards
    path = os.path.join(folder, "nocounts.json")
    with open(path, "w") as f:
        json.dump({"__kind__": "wids-shard-index-v1", "shardlist": [{"url": os.path.basename(urls[0])}]}, f)
    with pytest.raises(IndexMismatchError, match="has no nsamples.*infobatch-stream index"):
        InfoBatch(path, **CONFIG)
    with pytest.raises(IndexMismatchError, match="wids shard list.*InfoBatch"):
        DatasetIndex.load(path)


def test_shards_left_unread_are_indexed_at_set_epoch_1(shards):
    folder, urls, reference = shards
    ib = InfoBatch(write_list(folder, urls), **CONFIG)
    ib.set_epoch(0)
    for i, (meta,) in enumerate(reader_loader(ib, 0)):  # stopped early: most shards never read
        ib.update(meta, slot_loss(meta))
        if i == 2:
            break
    ib.set_epoch(1)
    assert_same_arrays(ib.index.path, reference.path)


def test_spawned_persistent_workers_switch_to_the_built_index(shards):
    folder, urls, reference = shards
    ib = InfoBatch(write_list(folder, urls), **CONFIG)
    pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple(META_KEY))
    loader = data_loader(pipeline, 8, 2, context="spawn", persistent=True)
    trained = [sorted(s) for s in train_epochs(ib, loader, 3)]
    assert trained == _reference_slots(reference, 2)


def test_scan_files_round_trip_and_damage_is_ignored(shards, tmp_path):
    _, urls, _ = shards
    with open(urls[0], "rb") as f:
        samples = scan_shard(f, urls[0], filesize=os.path.getsize(urls[0]))
    scan = Scan(urls[0], samples, 1.5, "etag", None, True)
    assert unpack(pack(scan), "x") == scan
    folder = ScanDir(str(tmp_path / "scans"))
    folder.save(0, scan)
    assert folder.load(0, urls[0], PER_SHARD) == scan
    assert folder.load(0, urls[1], PER_SHARD) is None  # another shard's
    data = bytearray(pack(scan))
    for cut in (len(data) - 1, 20, 9):
        with open(folder.file(1), "wb") as f:
            f.write(data[:cut])
        assert folder.load(1, urls[0], PER_SHARD) is None
    data[40] ^= 1
    with pytest.raises(IndexMismatchError, match="MAC"):
        unpack(bytes(data), "x")
    # a well-formed scan made with another key (not by this user's runs) is not taken
    with open(folder.file(2), "wb") as f:
        f.write(pack(scan, b"someone else's key"))
    assert folder.load(2, urls[0], PER_SHARD) is None
    # a key file others can read is not trusted: it is replaced, and the scans made with it are void
    os.chmod(os.path.join(folder.path, "key"), 0o644)
    assert ScanDir(folder.path).load(0, urls[0], PER_SHARD) is None
    shutil.rmtree(folder.path)


def test_a_planted_scan_of_a_local_shard_is_never_used(shards):
    """Local shards are rescanned when opened: a scan in the folder cannot move their samples."""
    folder, urls, reference = shards
    listing = write_list(folder, urls)
    ib = InfoBatch(listing, **CONFIG)
    with open(urls[1], "rb") as f:
        other = scan_shard(f, urls[1], filesize=os.path.getsize(urls[1]))  # shard 1's rows, planted as shard 0's
    scans = ScanDir(ib.index.building.scans)
    scans.save(0, Scan(ib.index.shards[0].url, other, None, None, None, True))
    trained = [sorted(s) for s in train_epochs(ib, reader_loader(ib, 0), 2)]
    assert trained == _reference_slots(reference, 0, 2)
    assert_same_arrays(ib.index.path, reference.path)


def test_a_local_shard_changed_after_its_scan_is_scanned_again_at_set_epoch_1(shards):
    folder, urls, _ = shards
    listing = write_list(folder, urls)
    ib = InfoBatch(listing, **CONFIG)
    train_epochs(ib, reader_loader(ib, 0), 1)
    write_shards(folder, num_shards=6, per_shard=PER_SHARD, seed=1)  # same names and counts, other bytes
    reference = build_index(urls, os.path.join(folder, "again.json"))
    ib.set_epoch(1)
    assert_same_arrays(ib.index.path, reference.path)


def test_a_server_without_ranges_is_recorded_as_indexing_records_it(shards, range_server):
    folder, urls, _ = shards
    base = range_server(folder, ranges=False)
    remote = [f"{base}/{os.path.basename(u)}" for u in urls]
    reference = build_index(remote, os.path.join(folder, "reference-noranges.json"))
    ib = InfoBatch(write_list(folder, remote), **CONFIG)
    train_epochs(ib, reader_loader(ib, 0), 2)
    assert [s.ranges for s in ib.index.shards] == [s.ranges for s in reference.shards] == [False] * len(urls)


def test_counts_no_shard_can_hold_are_refused_before_allocating(shards):
    folder, urls, _ = shards
    with pytest.raises(IndexMismatchError, match="entry 2 says shard .*holds 1000000000 samples"):
        InfoBatch(write_list(folder, urls, [PER_SHARD, PER_SHARD, 10**9, 1, 1, 1]), **CONFIG)


def test_the_filter_path_numbers_samples_by_key_and_refuses_a_short_remote_shard(shards, range_server):
    folder, urls, reference = shards
    drop = "sample000003"  # select_files drops one sample before ib.filter()

    def loader(ib):
        stages = [wds.tarfile_to_samples(select_files=lambda name: not name.startswith(drop)), ib.filter()]
        return data_loader(wds.DataPipeline(ib.shards(), *stages, wds.to_tuple(META_KEY)), 8, 0)

    expected = InfoBatch(reference, **CONFIG)
    want = [sorted(s) for s in train_epochs(expected, loader(expected), 1)]
    ib = InfoBatch(write_list(folder, urls, name="local.json"), **CONFIG)
    assert [sorted(s) for s in train_epochs(ib, loader(ib), 1)] == want  # local: the keys are scanned
    base = range_server(folder)
    ib = InfoBatch(write_list(folder, [f"{base}/{os.path.basename(u)}" for u in urls], name="remote.json"), **CONFIG)
    with pytest.raises(IndexMismatchError, match="29 samples reached ib.filter.*says 30"):
        train_epochs(ib, loader(ib), 1)


def test_a_pipe_that_goes_on_after_the_tar_is_refused_not_read_forever(shards):
    folder, urls, _ = shards
    ib = InfoBatch(write_list(folder, [f"pipe:cat {u} /dev/zero" for u in urls]), **CONFIG, allow_pipes=True)
    ib.set_epoch(0)
    with pytest.raises(TarFormatError, match="follow the tar's end-of-archive marker"):
        for (meta,) in reader_loader(ib, 0):
            ib.update(meta, slot_loss(meta))


def test_from_s3_with_spawned_workers(shards, s3_server, tmp_path):
    """Shards on moto's S3 server: the workers stream them in epoch 0 (obstore in each worker)."""
    folder, urls, _ = shards
    remote = s3_server.upload("building", urls, "train")
    reference = build_index(remote, str(tmp_path / "reference.json"))
    ib = InfoBatch(write_list(str(tmp_path), remote), **CONFIG)
    pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple(META_KEY))
    loader = data_loader(pipeline, 8, 2, context="spawn", persistent=True)
    trained = [sorted(s) for s in train_epochs(ib, loader, 2)]
    assert trained[0] == list(range(len(urls) * PER_SHARD))
    assert ib.stats()[1]["pruned"] > 0
    assert_same_arrays(ib.index.path, reference.path)
