"""The dataset index on real shards: agreement with WebDataset, the wids JSON, memory-mapping,
pickling, URL matching, parallel and streamed indexing."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from infobatch_stream import compact
from infobatch_stream.index import (
    _ARRAYS,
    INDEX_KIND,
    DatasetIndex,
    IndexMismatchError,
    build_index,
    expand_urls,
    from_scans,
    normalize_url,
)
from infobatch_stream.tarscan import ShardSamples, TarFormatError
from tests.helpers.tars import (
    HAVE_GNU_TAR,
    gnu_tar,
    make_tree,
    payload,
    sample_fields,
    wds_samples,
    write_tar,
    write_wds_shards,
)

# ---- a small, varied dataset -----------------------------------------------------------------------


def wds_sample(i: int) -> dict:
    sample = {"__key__": f"s{i:05d}", "bin": payload((i * 389) % 3000, i), "cls": str(i % 10).encode()}
    if i % 6 == 0:
        sample["__key__"] = f"deep/{'d' * 110}/s{i:05d}"  # PAX path records
    if i % 4 == 0:
        sample["json"] = b"{}"
    return sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, list[str]]:
    """A folder ``shards/`` of varied real shards; returns (root, absolute shard paths)."""
    root = str(tmp_path_factory.mktemp("dataset"))
    folder = os.path.join(root, "shards")
    os.makedirs(folder)
    urls = write_wds_shards(folder, (wds_sample(i) for i in range(25)), maxcount=10, name="wds")
    urls.append(write_tar(os.path.join(folder, "empty.tar"), []))
    urls.append(
        write_tar(
            os.path.join(folder, "long-gnu.tar"),
            [
                ("top", None),
                ("top/" + "g" * 120 + ".jpg", payload(512)),
                ("top/" + "g" * 120 + ".cls", b"1"),
                ("README", b"not a sample"),
                ("ünï/çødé.jpg", payload(10)),  # non-ASCII keys survive the key blob
                ("a.jpg", b""),
                ("b.jpg", b"x"),
                ("a.cls", b"2"),  # 'a' twice, not adjacent
            ],
            format=tarfile.GNU_FORMAT,
        )
    )
    os.makedirs(os.path.join(folder, "sub"))
    urls.append(write_tar(os.path.join(folder, "sub", "nosamples.tar"), [("d", None), ("d/NOTES", b"n")]))
    if HAVE_GNU_TAR:
        tree = make_tree(
            os.path.join(root, "tree"),
            {
                "x.jpg": payload(1024),
                "x.txt": b"t",
                "y/z.jpg": payload(0),
                "y/z.CLS": b"9",
                "p" * 70 + "/" + "q" * 70 + "/r.png": payload(100),
            },
        )
        urls.append(gnu_tar(tree, os.path.join(folder, "gnu-posix.tar"), "posix", sorted(os.listdir(tree))))
    return root, urls


@pytest.fixture(scope="module")
def index(dataset) -> DatasetIndex:
    return build_index(dataset[1])


def check_index_against_webdataset(index: DatasetIndex, urls: list[str], files: list[str] | None = None) -> None:
    """Keys, order, suffixes and member bytes of every shard equal what WebDataset reads."""
    files = files or urls
    for shard, (url, file) in enumerate(zip(urls, files)):
        ref = wds_samples(url)
        lo, hi = index.slots(shard)
        assert hi - lo == len(ref) == index.nsamples[shard] == index.shards[shard].nsamples
        assert index.keys(shard) == [r["__key__"] for r in ref]
        rows = index.rows(shard)
        member_first, data_offset, size, suffix_id = rows.member_first, rows.data_offset, rows.size, rows.suffix_id
        with open(file, "rb") as f:
            raw = f.read()
        for pos, r in enumerate(ref):
            fields = {}
            for m in range(member_first[pos], member_first[pos + 1]):
                fields[index.suffixes[suffix_id[m]]] = raw[data_offset[m] : data_offset[m] + size[m]]
            assert fields == sample_fields(r), (url, r["__key__"])


def assert_same_rows(a: DatasetIndex, b: DatasetIndex) -> None:
    """Every shard's rows equal, field by field and dtype by dtype (whatever each one's format)."""
    assert a.num_shards == b.num_shards
    for shard in range(a.num_shards):
        ra, rb = a.rows(shard), b.rows(shard)
        for field in ("start", "end", "member_first", "data_offset", "size", "suffix_id", "key_offsets", "key_blob"):
            x, y = getattr(ra, field), getattr(rb, field)
            assert x.dtype == y.dtype, (shard, field)
            np.testing.assert_array_equal(x, y, err_msg=f"shard {shard} {field}")


# ---- agreement --------------------------------------------------------------------------------------


def test_index_agrees_with_webdataset(dataset, index):
    _, urls = dataset
    assert index.num_shards == len(urls)
    assert index.urls == urls
    assert index.num_samples == sum(len(wds_samples(u)) for u in urls) > 25
    check_index_against_webdataset(index, urls)
    for shard, url in enumerate(urls):
        st = os.stat(url)
        assert index.shards[shard].filesize == st.st_size
        assert index.shards[shard].mtime == st.st_mtime
    long_gnu = urls.index(os.path.join(dataset[0], "shards", "long-gnu.tar"))
    assert index.keys(long_gnu) == ["top/" + "g" * 120, "ünï/çødé", "a", "b", "a"]


def test_arrays_layout(dataset, index):
    n = index.num_samples
    assert index.shard_first[0] == 0 and index.shard_first[-1] == n
    for name in ("start", "end"):
        assert index.array(name).shape == (n,) and index.array(name).dtype == np.int64
    member_first = index.array("member_first")
    assert member_first.shape == (n + 1,) and member_first[0] == 0
    members = int(member_first[-1])
    assert np.all(np.diff(member_first) >= 1)
    for name in ("data_offset", "size", "suffix_id"):
        assert index.array(name).shape == (members,)
    assert index.array("suffix_id").dtype == np.int32
    assert sorted(index.suffixes) == sorted(set(index.suffixes))
    assert set(index.suffixes) >= {"bin", "cls", "json", "jpg", "txt", "png"}
    assert index.array("key_offsets").shape == (n + 1,)
    # byte ranges: within each shard, ordered, non-overlapping, inside the file
    for shard in range(index.num_shards):
        start, end = index.byte_ranges(shard)
        assert np.all(start < end) and np.all(end[:-1] <= start[1:])
        assert np.all(end <= index.shards[shard].filesize)
    # shard_of_slot inverts slots()
    slots = np.arange(n)
    owner = index.shard_of_slot(slots)
    for shard in range(index.num_shards):
        lo, hi = index.slots(shard)
        assert np.all(owner[lo:hi] == shard)


def test_keys_and_slots(dataset, index):
    _, urls = dataset
    ranges = [index.slots(i) for i in range(index.num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == index.num_samples
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))  # contiguous
    empty = urls.index(os.path.join(dataset[0], "shards", "empty.tar"))
    assert ranges[empty][0] == ranges[empty][1] and index.keys(empty) == []
    assert [index.slots(i)[1] - index.slots(i)[0] for i in range(index.num_shards)] == list(index.nsamples)
    expected = [[r["__key__"] for r in wds_samples(u)] for u in urls]
    rng = np.random.default_rng(1)
    for shard in rng.permutation(np.repeat(np.arange(index.num_shards), 2)):  # switches exercise the cache
        assert index.keys(int(shard)) == expected[shard]
    assert [index.slots(i)[1] - index.slots(i)[0] for i in range(3)] == [10, 10, 5]


def test_workers_give_the_same_index(dataset, index):
    parallel = build_index(dataset[1], workers=2)
    assert parallel.shards == index.shards
    assert parallel.suffixes == index.suffixes
    assert parallel.fingerprint == index.fingerprint
    for name in _ARRAYS:
        np.testing.assert_array_equal(parallel.array(name), index.array(name), err_msg=name)


def test_brace_patterns_and_file_urls(dataset, index):
    folder = os.path.join(dataset[0], "shards")
    wds_urls = [u for u in dataset[1] if os.path.basename(u).startswith("wds-")]
    pattern = os.path.join(folder, "wds-{000000..000002}.tar")
    assert expand_urls(pattern) == wds_urls
    assert expand_urls(pattern + "::" + os.path.join(folder, "empty.tar")) == wds_urls + [
        os.path.join(folder, "empty.tar")
    ]
    assert expand_urls(("a", "b")) == ["a", "b"]
    by_pattern = build_index(pattern)
    assert by_pattern.urls == wds_urls and by_pattern.num_samples == 25
    assert by_pattern.keys(1) == index.keys(1)
    by_file_url = build_index(["file:" + u for u in wds_urls])
    assert by_file_url.num_samples == 25 and by_file_url.keys(2) == index.keys(2)
    with pytest.raises(ValueError, match="no shards"):
        build_index([])


# ---- streams that cannot seek ---------------------------------------------------------------------


def test_pipe_and_gzip_streams_give_the_same_index(dataset, index, tmp_path):
    urls = dataset[1]
    piped = build_index([f"pipe:cat {u}" for u in urls])
    gz_urls = []
    for i, u in enumerate(urls):
        gz = str(tmp_path / f"{i}-{os.path.basename(u)}.gz")
        with open(u, "rb") as src, gzip.open(gz, "wb") as dst:
            shutil.copyfileobj(src, dst)
        gz_urls.append(gz)
    gunzipped = build_index([f"pipe:gzip -dc {g}" for g in gz_urls])
    for streamed in (piped, gunzipped):
        assert streamed.num_samples == index.num_samples
        assert list(streamed.nsamples) == list(index.nsamples)
        assert [s.filesize for s in streamed.shards] == [s.filesize for s in index.shards]  # bytes counted
        assert all(s.mtime is None for s in streamed.shards)
        assert streamed.suffixes == index.suffixes
        for name in _ARRAYS:
            np.testing.assert_array_equal(streamed.array(name), index.array(name), err_msg=name)
        assert [streamed.keys(i) for i in range(streamed.num_shards)] == [
            index.keys(i) for i in range(index.num_shards)
        ]
    # WebDataset reading the .gz shards directly sees the samples the index lists
    for shard, g in enumerate(gz_urls):
        assert [r["__key__"] for r in wds_samples(g)] == gunzipped.keys(shard)
        # ... and the __url__ it reports finds the shard
        assert gunzipped.shard_of_url(g) == shard
    check_index_against_webdataset(gunzipped, [f"pipe:gzip -dc {g}" for g in gz_urls], files=urls)


def test_truncated_shard_is_named_with_its_offset(dataset, tmp_path):
    good = dataset[1][0]
    raw = open(good, "rb").read()
    bad = str(tmp_path / "half.tar")
    cut = len(raw) // 2 + 100
    with open(bad, "wb") as f:
        f.write(raw[:cut])
    with pytest.raises(TarFormatError, match=r"half\.tar: truncated tar.*at byte \d+") as err:
        build_index([good, bad])
    offset = int(str(err.value).split("at byte ")[1].split()[0])
    assert 0 < offset <= cut
    with pytest.raises(TarFormatError, match=r"pipe:cat .*half\.tar: truncated tar.*at byte \d+"):
        build_index([f"pipe:cat {bad}"])
    with pytest.raises(TarFormatError, match=r"half\.tar"):
        build_index([good, bad], workers=2)


# ---- save / load ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(dataset, index) -> str:
    path = os.path.join(dataset[0], "meta", "train.json")
    os.makedirs(os.path.dirname(path))
    index.save(path)
    return path


def test_saved_json_is_a_wids_shard_list(dataset, index, saved):
    root, urls = dataset
    with open(saved) as f:
        doc = json.load(f)
    assert doc["__kind__"] == INDEX_KIND == "wids-shard-index-v1"
    assert doc["wids_version"] == 1 and doc["name"] == "train"
    assert [e["url"] for e in doc["shardlist"]] == [os.path.relpath(u, os.path.dirname(saved)) for u in urls]
    assert doc["shardlist"][0]["url"] == "../shards/wds-000000.tar"
    assert all(not os.path.isabs(e["url"]) for e in doc["shardlist"])
    assert [e["nsamples"] for e in doc["shardlist"]] == list(index.nsamples)
    assert [e["filesize"] for e in doc["shardlist"]] == [os.path.getsize(u) for u in urls]
    ours = doc["infobatch_stream"]
    assert ours["nsamples"] == index.num_samples
    assert ours["suffixes"] == index.suffixes
    assert ours["fingerprint"] == index.fingerprint
    sidecar = os.path.join(os.path.dirname(saved), ours["arrays"])
    assert sorted(os.listdir(sidecar)) == sorted(f"{name}.npy" for name in compact.ARRAYS)  # no temporary files left
    assert not any(name.endswith(".tmp") for name in os.listdir(os.path.dirname(saved)))


def test_load_memory_maps_and_resolves_urls(dataset, index, saved):
    loaded = DatasetIndex.load(saved)
    assert loaded.path == saved
    assert loaded.urls == dataset[1]  # resolved against the index's folder, absolute again
    assert loaded.shards == index.shards
    assert loaded.suffixes == index.suffixes and loaded.fingerprint == index.fingerprint
    for name in compact.ARRAYS:
        arr = loaded.array(name)
        assert isinstance(arr, np.memmap), name
        assert not arr.flags.writeable
    assert_same_rows(loaded, index)
    check_index_against_webdataset(loaded, dataset[1])


def test_a_format_1_index_still_loads_and_upgrades(dataset, index, tmp_path):
    """Indexes written before the compact format load as they are; saving one again writes format 2
    with the same rows (and so the same per-shard checksums)."""
    old = str(tmp_path / "old.json")
    index.save(old, format=1)
    assert json.load(open(old))["infobatch_stream"]["format"] == 1
    loaded = DatasetIndex.load(old)
    assert_same_rows(loaded, index)
    check_index_against_webdataset(loaded, dataset[1])
    loaded.save(old)  # upgraded in place
    assert json.load(open(old))["infobatch_stream"]["format"] == 2
    assert sorted(os.listdir(str(tmp_path / "old.arrays"))) == sorted(f"{n}.npy" for n in compact.ARRAYS)
    assert_same_rows(DatasetIndex.load(old), index)
    with pytest.raises(ValueError, match="format=1"):
        DatasetIndex.load(old).save(str(tmp_path / "back.json"), format=1)


@pytest.mark.parametrize(
    "keys",
    [
        ["000000", "000001", "000002", "000005"],  # numbers with a gap
        ["img_0009", "img_0010", "img_0011"],  # a prefix that ends inside the digits' run
        ["a/1", "a/2", "b/3"],  # no common prefix at the end: bytes
        ["x", "yy", "zzz"],  # lengths differ: bytes
        ["k-7"],  # one sample
        ["99", "98", "10"],  # numbers that do not count up
        ["0x1", "0x2", "0xf"],  # not digits
        ["١", "٢", "٣"],  # digits of another script: bytes
        ["12", "3456"],  # lengths differ though the bytes divide evenly
        [str(i) for i in range(9, 101)],  # numbers without zero padding
    ],
)
def test_compact_keys_round_trip(tmp_path, keys):
    entries = [(f"{k}.cls", str(i).encode()) for i, k in enumerate(keys)]
    path = str(tmp_path / "k.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    built = build_index([path], str(tmp_path / "k.json"))
    loaded = DatasetIndex.load(str(tmp_path / "k.json"))
    assert loaded.keys(0) == keys == built.keys(0)
    assert_same_rows(loaded, built)


def test_saving_checks_its_arguments_and_keeps_the_saver_usable(dataset, index, tmp_path):
    path = str(tmp_path / "a.json")
    for bad in (3, True, "2"):
        with pytest.raises(ValueError, match="format"):
            index.save(path, format=bad)
    assert not os.path.exists(str(tmp_path / "a.arrays"))
    index.save(path)
    loaded = DatasetIndex.load(path)
    loaded.save(path)  # over its own mapped files
    assert loaded.keys(0) == index.keys(0)
    assert_same_rows(loaded, index)


def test_a_compact_index_without_checksums_is_refused(saved, tmp_path):
    doc = json.load(open(saved))
    for entry in doc["shardlist"]:
        del entry["crc"]
    folder = tmp_path / "copy"
    shutil.copytree(os.path.dirname(saved), folder)
    json.dump(doc, open(folder / "train.json", "w"))
    with pytest.raises(IndexMismatchError, match="without its fingerprint or checksums"):
        DatasetIndex.load(str(folder / "train.json"))


def test_member_counts_that_wrap_their_sum_are_refused(dataset, index, tmp_path):
    """Counts near 2**62 whose int64 sum wraps onto the right total (would overrun np.repeat)."""
    path = str(tmp_path / "w.json")
    index.save(path)
    file = str(tmp_path / "w.arrays" / "nmembers.npy")
    counts = np.load(file).astype(np.uint64)
    lo, hi = index.slots(0)
    total = int(counts[lo:hi].sum())
    counts[lo:hi] = 2**62
    counts[hi - 1] = (total - (hi - lo - 1) * 2**62) % 2**64
    np.save(file, counts)
    with pytest.raises(IndexMismatchError, match="member table"):
        DatasetIndex.load(path).rows(0)


def test_relative_urls_survive_moving_the_dataset(dataset, saved, tmp_path):
    moved = str(tmp_path / "moved")
    shutil.copytree(dataset[0], moved, symlinks=True)
    loaded = DatasetIndex.load(os.path.join(moved, "meta", "train.json"))
    assert loaded.urls == [os.path.join(moved, os.path.relpath(u, dataset[0])) for u in dataset[1]]
    assert all(os.path.exists(u) for u in loaded.urls)
    check_index_against_webdataset(loaded, loaded.urls)


def test_saving_again_overwrites_atomically(dataset, index, tmp_path):
    path = str(tmp_path / "ix.json")
    index.save(path)
    first = DatasetIndex.load(path)
    first.save(path)  # its own memory-mapped arrays are the source
    again = DatasetIndex.load(path)
    for name in compact.ARRAYS:
        np.testing.assert_array_equal(again.array(name), first.array(name))
    assert_same_rows(again, index)
    assert again.shards == index.shards
    assert sorted(os.listdir(tmp_path)) == ["ix.arrays", "ix.json"]


def test_non_local_urls_are_stored_verbatim(dataset, tmp_path):
    url = f"pipe:cat {dataset[1][0]}"
    ix = build_index([url])
    path = str(tmp_path / "p.json")
    ix.save(path)
    assert json.load(open(path))["shardlist"][0]["url"] == url
    with pytest.raises(PermissionError, match="allow_pipes"):
        DatasetIndex.load(path)
    loaded = DatasetIndex.load(path, allow_pipes=True)
    assert loaded.urls == [url]
    assert pickle.loads(pickle.dumps(loaded)).urls == [url]  # a worker reopens it by path


def test_pickle_is_small_and_reopens_the_arrays(tmp_path):
    index = synthetic_index(num_shards=200, per_shard=500)
    array_bytes = sum(np.asarray(index.array(n)).nbytes for n in _ARRAYS)  # format 1, in memory
    assert array_bytes > 5_000_000
    in_memory = pickle.dumps(index)
    assert len(in_memory) > array_bytes  # not saved yet: the arrays travel with it
    restored = pickle.loads(in_memory)
    assert restored.keys(7) == index.keys(7) and restored.fingerprint == index.fingerprint
    path = str(tmp_path / "big.json")
    index.save(path)
    loaded = DatasetIndex.load(path)
    loaded.keys(3)
    loaded.shard_of_url(loaded.urls[5])  # fill the caches: they must not be pickled
    blob = pickle.dumps(loaded)
    assert len(blob) < array_bytes / 50, (len(blob), array_bytes)
    again = pickle.loads(blob)
    assert again.path == path and again.shards == loaded.shards
    assert again.fingerprint == index.fingerprint and again.suffixes == index.suffixes
    for name in compact.ARRAYS:
        assert isinstance(again.array(name), np.memmap)
    assert_same_rows(again, index)
    assert again.keys(199) == index.keys(199)
    assert again.shard_of_url(index.urls[42]) == 42


def test_load_errors(dataset, saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DatasetIndex.load(str(tmp_path / "nope.json"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(IndexMismatchError, match="not valid JSON"):
        DatasetIndex.load(str(bad_json))
    plain = tmp_path / "plain.json"  # a plain wids shard list has no offsets
    plain.write_text(
        json.dumps(
            {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": [{"url": "a.tar", "nsamples": 3}]}
        )
    )
    with pytest.raises(IndexMismatchError, match="not an infobatch_stream index"):
        DatasetIndex.load(str(plain))
    doc = json.load(open(saved))
    folder = tmp_path / "copy"
    shutil.copytree(os.path.dirname(saved), folder)
    path = str(folder / "train.json")
    doc["infobatch_stream"]["format"] = 99
    json.dump(doc, open(path, "w"))
    with pytest.raises(IndexMismatchError, match="format 99"):
        DatasetIndex.load(path)
    doc["infobatch_stream"]["format"] = 2
    doc["shardlist"][0]["nsamples"] += 1
    json.dump(doc, open(path, "w"))
    with pytest.raises(IndexMismatchError, match="damaged"):
        DatasetIndex.load(path)
    doc["shardlist"][0]["nsamples"] -= 1
    json.dump(doc, open(path, "w"))
    DatasetIndex.load(path)
    os.remove(folder / "train.arrays" / "size.npy")
    with pytest.raises(IndexMismatchError, match="size.npy"):
        DatasetIndex.load(path)


# ---- URL matching ---------------------------------------------------------------------------------


def test_shard_of_url_spellings(dataset, saved, tmp_path, monkeypatch):
    root, urls = dataset
    loaded = DatasetIndex.load(saved)
    link = tmp_path / "link"
    link.symlink_to(os.path.join(root, "shards"), target_is_directory=True)
    monkeypatch.chdir(root)
    for shard, url in enumerate(urls):
        rel = os.path.relpath(url, root)
        spellings = [
            url,
            rel,
            "./" + rel,
            os.path.join(root, "shards", "..", rel),
            url.replace("/shards/", "//shards/"),
            "file:" + url,
            "file://" + url,
            "file:" + rel,
            f"pipe:cat {url}",
            f"pipe:cat {rel}",
            f"pipe:cat   {url}",
            os.path.basename(url),  # unique basename: found even though the folder differs
            str(link / os.path.relpath(url, os.path.join(root, "shards"))),  # through a symlink
        ]
        for spelling in spellings:
            assert loaded.shard_of_url(spelling) == shard, spelling
    with pytest.raises(IndexMismatchError) as err:
        loaded.shard_of_url("/nowhere/other.tar")
    msg = str(err.value)
    assert "'/nowhere/other.tar' is not in the index" in msg and saved in msg and f"{len(urls)} shards" in msg
    with pytest.raises(IndexMismatchError, match="not in the index"):
        loaded.shard_of_url("pipe:cat /nowhere/other.tar")


def test_shard_of_url_ambiguous_basenames(tmp_path):
    a = write_tar(tmp_path / "a.tar", [("k.jpg", b"1")])
    os.makedirs(tmp_path / "x")
    os.makedirs(tmp_path / "y")
    x = write_tar(tmp_path / "x" / "part.tar", [("k.jpg", b"1")])
    y = write_tar(tmp_path / "y" / "part.tar", [("k.jpg", b"2")])
    ix = build_index([a, x, y])
    assert ix.shard_of_url(x) == 1 and ix.shard_of_url(y) == 2
    assert ix.shard_of_url("/elsewhere/a.tar") == 0  # unique basename
    for url in ("part.tar", "/elsewhere/part.tar", "pipe:cat /elsewhere/part.tar"):
        with pytest.raises(IndexMismatchError, match="not in the index"):
            ix.shard_of_url(url)


def test_shard_of_url_remote_urls():
    scans = [
        ShardSamples(
            keys=["a"],
            start=[0],
            end=[1024],
            nmembers=[1],
            suffixes=["jpg"],
            data_offset=[512],
            size=[3],
            filesize=10240,
        )
        for _ in range(2)
    ]
    urls = ["https://host/data/shard-000.tar", "pipe:curl -s -L https://host/data/shard-001.tar"]
    ix = from_scans(urls, scans, [None, None])
    assert ix.shard_of_url(urls[0]) == 0 and ix.shard_of_url(urls[1]) == 1
    assert ix.shard_of_url("pipe:curl -s https://host/data/shard-000.tar") == 0
    assert ix.shard_of_url("https://host/data/shard-001.tar") == 1  # by its unique basename
    assert normalize_url(urls[0]) == urls[0]
    with pytest.raises(IndexMismatchError):
        ix.shard_of_url("https://host/data/shard-002.tar")


# ---- from_scans ------------------------------------------------------------------------------------


def synthetic_index(num_shards: int, per_shard: int) -> DatasetIndex:
    scans, urls = [], []
    for s in range(num_shards):
        scan = ShardSamples(filesize=per_shard * 2048 + 1024)
        for i in range(per_shard):
            scan.keys.append(f"shard{s:04d}/sample{i:06d}")
            scan.start.append(i * 2048)
            scan.end.append((i + 1) * 2048)
            scan.nmembers.append(2)
            scan.suffixes.extend(["jpg", "cls"] if i % 2 else ["png", "cls"])
            scan.data_offset.extend([i * 2048 + 512, i * 2048 + 1536])
            scan.size.extend([500, 1])
        scans.append(scan)
        urls.append(f"/data/train-{s:05d}.tar")
    return from_scans(urls, scans, [None] * num_shards)


def test_from_scans_assembles_the_arrays():
    ix = synthetic_index(num_shards=3, per_shard=4)
    assert ix.num_shards == 3 and ix.num_samples == 12
    assert ix.suffixes == ["png", "cls", "jpg"]  # in order of first appearance
    np.testing.assert_array_equal(ix.array("suffix_id")[:4], [0, 1, 2, 1])
    np.testing.assert_array_equal(ix.array("member_first"), np.arange(13) * 2)
    assert ix.keys(2) == [f"shard0002/sample{i:06d}" for i in range(4)]
    lo, hi = ix.slots(1)
    assert (lo, hi) == (4, 8)
    start, end = ix.byte_ranges(1)
    np.testing.assert_array_equal(start, np.arange(4) * 2048)
    np.testing.assert_array_equal(end, np.arange(1, 5) * 2048)
    # no shards with samples at all
    empty = from_scans(["/x.tar"], [ShardSamples(filesize=10240)], [None])
    assert empty.num_samples == 0 and empty.keys(0) == [] and empty.slots(0) == (0, 0)
    with pytest.raises(IndexMismatchError, match="damaged"):
        DatasetIndex(ix.shards[:2], {**{n: ix.array(n) for n in _ARRAYS}}, ix.suffixes)


def test_local_compressed_shards_are_indexed_through_decompression(dataset, index, tmp_path):
    import bz2
    import lzma

    urls = dataset[1][:3]
    packed = []
    for opener, ext, u in zip((gzip.open, bz2.open, lzma.open), ("gz", "bz2", "xz"), urls):
        path = str(tmp_path / f"{os.path.basename(u)}.{ext}")
        with open(u, "rb") as src, opener(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        packed.append(path)
    compressed = build_index(packed)
    for shard, path in enumerate(packed):
        assert compressed.keys(shard) == index.keys(shard)
        assert compressed.shards[shard].filesize == os.path.getsize(path)  # on disk, for stale checks
        lo, hi = compressed.slots(shard)
        ilo, ihi = index.slots(shard)
        np.testing.assert_array_equal(compressed.array("start")[lo:hi], index.array("start")[ilo:ihi])
        assert [r["__key__"] for r in wds_samples(path)] == compressed.keys(shard)
