"""The tar header scanner against the two references it replaces: ``tarfile`` and WebDataset.

Every shard here is a real tar written by ``webdataset.ShardWriter``, Python's ``tarfile`` or GNU
``tar``. For each one the scanner must report the same members at the same offsets as
``tarfile``, and group them into the same samples (keys, order, suffixes, bytes) as
``webdataset.tarfile_to_samples``.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infobatch_stream.tarscan import (
    BLOCK,
    ShardSamples,
    TarFormatError,
    TarMember,
    _nti,
    decompressed,
    iter_members,
    key_and_suffix,
    scan_shard,
)
from tests.helpers.guards import fails_instead_of_hanging
from tests.helpers.tars import (
    HAVE_GNU_TAR,
    build_layout,
    gnu_tar,
    layouts,
    make_tree,
    members_of,
    payload,
    sample_fields,
    tar_members,
    wds_samples,
    wds_samples_of_bytes,
    write_tar,
    write_tar_bytes,
    write_wds_shards,
)

needs_gnu_tar = pytest.mark.skipif(not HAVE_GNU_TAR, reason="GNU tar is not installed")


# ---- helpers --------------------------------------------------------------------------------------


class NonSeekable:
    """A stream that can only be read, like a pipe or an HTTP body."""

    def __init__(self, raw: bytes | io.BufferedIOBase, chunk: int | None = None) -> None:
        self.raw = io.BytesIO(raw) if isinstance(raw, bytes) else raw
        self.chunk = chunk  # short reads, as pipes give

    def read(self, n: int = -1) -> bytes:
        if self.chunk is not None and n > self.chunk:
            n = self.chunk
        return self.raw.read(n)

    def seekable(self) -> bool:
        return False


def scan_bytes(raw: bytes, name: str = "mem.tar") -> ShardSamples:
    return scan_shard(io.BytesIO(raw), name, filesize=len(raw))


def sample_members(s: ShardSamples, i: int, first: int) -> range:
    return range(first, first + s.nmembers[i])


def assert_members_match_tarfile(members: list[TarMember], raw: bytes) -> None:
    """Same entries, offsets, sizes and types as ``tarfile`` (``TarInfo.offset`` = entry start)."""
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        ref = tf.getmembers()
    assert len(members) == len(ref), ([m.name for m in members], [t.name for t in ref])
    for m, t in zip(members, ref):
        assert m.header_offset == t.offset, (m, t.name)
        assert m.data_offset == t.offset_data, (m, t.name)
        assert m.is_regular() == t.isreg(), (m, t.name)
        assert (m.type == b"5") == t.isdir(), (m, t.name)
        if t.isreg():
            assert m.name == t.name
            assert m.size == t.size
            assert raw[m.data_offset : m.data_offset + m.size] == tf_extract(raw, t)
        else:
            assert m.name.rstrip("/") == t.name.rstrip("/")


def tf_extract(raw: bytes, info: tarfile.TarInfo) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        return tf.extractfile(info).read()


def assert_samples_match_wds(s: ShardSamples, raw: bytes, ref: list[dict]) -> None:
    """Same keys in the same order, same suffixes, same bytes cut out with data_offset/size."""
    assert s.keys == [r["__key__"] for r in ref]
    assert len(s.start) == len(s.end) == len(s.nmembers) == len(ref)
    first = 0
    for i, r in enumerate(ref):
        fields = {}
        for j in sample_members(s, i, first):
            fields[s.suffixes[j]] = raw[s.data_offset[j] : s.data_offset[j] + s.size[j]]
        assert len(fields) == s.nmembers[i]
        assert fields == sample_fields(r), s.keys[i]
        # the sample's byte range covers exactly its members' headers and padded bodies
        offsets = [s.data_offset[j] for j in sample_members(s, i, first)]
        assert s.start[i] < min(offsets)
        last = max(sample_members(s, i, first), key=lambda j: s.data_offset[j])
        assert s.end[i] == s.data_offset[last] + -(-s.size[last] // BLOCK) * BLOCK
        assert s.start[i] % BLOCK == 0 and s.end[i] % BLOCK == 0
        first += s.nmembers[i]
    assert first == len(s.suffixes) == len(s.data_offset) == len(s.size)
    for a, b in zip(s.end[:-1], s.start[1:]):
        assert a <= b, "sample byte ranges overlap or go backwards"


def assert_ranges_self_contained(s: ShardSamples, raw: bytes, ref: list[dict]) -> None:
    """The bytes [start, end) of every sample, concatenated, are a tar WebDataset reads the same.

    This is what a reader that fetches only kept ranges relies on: a sample's range must include
    the GNU long-name / PAX headers of its first member, not only its ustar header.
    """
    cut = b"".join(raw[a:b] for a, b in zip(s.start, s.end)) + b"\0" * (2 * BLOCK)
    again = wds_samples_of_bytes(cut)
    assert [r["__key__"] for r in again] == [r["__key__"] for r in ref]
    assert [sample_fields(r) for r in again] == [sample_fields(r) for r in ref]


def check_shard(path: str) -> ShardSamples:
    """Every check against both references for one shard file; returns the scan."""
    with open(path, "rb") as f:
        raw = f.read()
    size = len(raw)
    with open(path, "rb") as f:
        members = list(iter_members(f, path, filesize=size))
    assert_members_match_tarfile(members, raw)
    # streaming (read and discard bodies, short reads) sees exactly the same members
    assert list(iter_members(NonSeekable(raw, chunk=700), path)) == members
    # seekable without a size given
    with open(path, "rb") as f:
        assert list(iter_members(f, path)) == members
    with open(path, "rb") as f:
        s = scan_shard(f, path, filesize=size)
    assert s.filesize == size
    ref = wds_samples(path)
    assert_samples_match_wds(s, raw, ref)
    assert_ranges_self_contained(s, raw, ref)
    streamed = scan_shard(NonSeekable(raw, chunk=4096), path)
    assert streamed == s  # same keys, offsets, sizes and the counted filesize
    return s


# ---- shards from real writers ------------------------------------------------------------------

SIZES = [0, 1, 100, 511, 512, 513, 1023, 1024, 1025, 3 * 512, 5000]


def wds_sample(i: int) -> dict:
    sample = {
        "__key__": f"{i:06d}" if i % 3 else f"train/class_{i % 4}/img_{i:06d}",
        "jpg": payload(SIZES[i % len(SIZES)], seed=i),
        "cls": str(i % 10).encode(),
    }
    if i % 4 == 0:
        sample["json"] = b'{"i": %d}' % i
    if i % 5 == 0:
        sample["Txt"] = b"upper-case suffix"  # WebDataset reads it back as "txt"
    if i % 7 == 0:
        sample["__key__"] = "long/" + "k" * 120 + f"/sample_{i}"  # PAX path records
    return sample


def test_shardwriter_shards(tmp_path):
    urls = write_wds_shards(tmp_path, (wds_sample(i) for i in range(40)), maxcount=11)
    assert len(urls) == 4
    total = 0
    for url in urls:
        s = check_shard(url)
        total += len(s)
        # ShardWriter writes nothing between samples: the ranges tile the archive exactly
        assert s.start[0] == 0
        assert all(a == b for a, b in zip(s.end[:-1], s.start[1:]))
        assert s.filesize >= s.end[-1] + 2 * BLOCK
    assert total == 40
    s0 = scan_shard(open(urls[0], "rb"), urls[0], filesize=os.path.getsize(urls[0]))
    assert "txt" in s0.suffixes and "Txt" not in s0.suffixes
    assert s0.keys[3] == "train/class_3/img_000003" and s0.keys[1] == "000001"
    assert s0.keys[7] == "long/" + "k" * 120 + "/sample_7"


def tree_files(long_names: bool) -> dict[str, bytes]:
    files = {
        "a.cls": b"3",
        "a.jpg": payload(1000, 1),
        "a.d/z.txt": b"a different key between a.cls and a.jpg",  # key 'a' repeats non-adjacently
        "b.jpg": b"",  # zero bytes
        "b.txt": payload(512, 2),  # exact multiple of the block size
        "b.JSON": payload(1024, 3),  # suffix case
        "c.seg.png": payload(513, 4),  # multi-dot suffix
        "README": b"no dot: belongs to no sample",
        ".hidden.txt": b"no key: belongs to no sample",
        "__meta__": b"top-level meta file, skipped",
        "__meta__.json": b"key __meta__: a sample as far as WebDataset is concerned",
        "__index__/x.json": b"under a __dir__: skipped",
        "sub/dir/c.jpg": payload(2048, 5),
        "sub/dir/c.json": b"{}",
        "sub/LICENSE": b"no dot",
        "sub/empty/.keep": b"",
        "zz/0.bin": payload(1, 6),
    }
    if long_names:
        deep = "deep/" + "x" * 110 + "/" + "y" * 90  # components > 100: GNU 'L' / PAX path
        files[deep + "/sample.jpg"] = payload(777, 7)
        files[deep + "/sample.cls"] = b"7"
        files["w" * 150 + ".txt"] = b"a top-level name over 100 characters"
    else:
        mid = "u" * 80 + "/" + "v" * 60  # 150 characters: fits ustar's prefix + name split
        files[mid + "/sample.jpg"] = payload(700, 8)
        files[mid + "/sample.cls"] = b"8"
    return files


@needs_gnu_tar
@pytest.mark.parametrize(
    "fmt,long_names", [("gnu", True), ("posix", True), ("pax", True), ("ustar", False), ("v7", None)]
)
@pytest.mark.parametrize("dot", [False, True], ids=["toplevel-names", "dot-slash-names"])
def test_gnu_tar_shards(tmp_path, fmt, long_names, dot):
    if long_names is None:  # v7: 99-character names, directories as '\0' entries ending in '/'
        files = {k: v for k, v in tree_files(False).items() if len(k) < 90}
    else:
        files = tree_files(long_names)
    root = make_tree(tmp_path / "tree", files)
    members = ["."] if dot else sorted(os.listdir(root))
    path = gnu_tar(root, tmp_path / f"{fmt}.tar", fmt, members)
    s = check_shard(path)
    prefix = "./" if dot else ""
    keys = s.keys
    # the directory path is part of the key; 'a' comes back after 'a.d/z' as a separate sample
    i = keys.index(prefix + "a")
    assert keys[i : i + 3] == [prefix + "a", prefix + "a.d/z", prefix + "a"]
    assert prefix + "sub/dir/c" in keys
    assert prefix + "README" not in keys and not any("LICENSE" in k for k in keys)
    # WebDataset's meta rules only look at names that start with "__": "./__index__/x.json" is a sample
    assert any("__index__" in k for k in keys) == dot
    assert (prefix + "__meta__") in keys  # "__meta__.json" is a sample, "__meta__" is not
    if long_names:
        assert prefix + "deep/" + "x" * 110 + "/" + "y" * 90 + "/sample" in keys
        assert prefix + "w" * 150 in keys
    raw = open(path, "rb").read()
    info = tar_members(path)
    if fmt == "gnu":
        assert any(t.offset != t.offset_data - BLOCK for t in info)  # long-name records present
        assert b"././@LongLink" in raw
    if fmt in ("posix", "pax"):
        assert b" path=" in raw
    if fmt == "ustar":
        assert any(len(t.name) > 100 for t in info)  # split over prefix + name
    if fmt == "v7":
        assert all(len(t.name) < 100 and raw[t.offset + 257 : t.offset + 262] != b"ustar" for t in info)
    j = s.keys.index(prefix + "b")
    first = sum(s.nmembers[:j])
    assert sorted(s.suffixes[first : first + s.nmembers[j]]) == ["jpg", "json", "txt"]


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT], ids=["gnu", "pax", "ustar"]
)
def test_tarfile_long_names_and_dirs(tmp_path, fmt):
    long_dir = "p" * 60 + "/" + "q" * 60 if fmt == tarfile.USTAR_FORMAT else "p" * 130 + "/" + "q" * 130
    entries = [
        ("top", None),
        ("top/a.jpg", payload(10)),
        (long_dir, None),
        (long_dir + "/k.jpg", payload(600)),
        (long_dir + "/k.cls", b"1"),
        ("top/sub", None),
        ("top/sub/k.jpg", payload(0)),
        ("top/sub/k.cls", b"2"),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append(("z" * 300 + ".txt", payload(1536)))
    path = write_tar(tmp_path / "t.tar", entries, format=fmt)
    s = check_shard(path)
    expected = ["top/a", long_dir + "/k", "top/sub/k"] + (["z" * 300] if fmt != tarfile.USTAR_FORMAT else [])
    assert s.keys == expected
    assert s.nmembers == [1, 2, 2] + ([1] if fmt != tarfile.USTAR_FORMAT else [])


def test_nonadjacent_repeats_and_interleaved_non_samples(tmp_path):
    entries = [
        ("a.jpg", b"1"),
        ("b.jpg", b"2"),
        ("a.cls", b"3"),  # a, b, a: three samples
        ("c.jpg", b"4"),
        ("dir", None),
        ("c.cls", b"5"),  # a directory does not split c
        ("d.jpg", b"6"),
        ("NOTES", b"x"),
        ("d.cls", b"7"),  # neither does a keyless file
        ("e.jpg", b"8"),
        ("__meta__", b"m"),
        ("e.cls", b"9"),  # nor a skipped meta file
    ]
    path = write_tar(tmp_path / "r.tar", entries)
    s = check_shard(path)
    assert s.keys == ["a", "b", "a", "c", "d", "e"]
    assert s.nmembers == [1, 1, 1, 2, 2, 2]
    # a sample's range spans the non-sample members inside it
    members = tar_members(path)
    notes = next(t for t in members if t.name == "NOTES")
    d = s.keys.index("d")
    assert s.start[d] < notes.offset < s.end[d]


def test_member_sizes_around_block_boundaries(tmp_path):
    sizes = [0, 1, 2, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 4096, 10_000]
    entries = [(f"s{i:02d}.bin", payload(n, i)) for i, n in enumerate(sizes)]
    path = write_tar(tmp_path / "sizes.tar", entries)
    s = check_shard(path)
    assert s.size == sizes
    assert [e - st for st, e in zip(s.start, s.end)] == [BLOCK + -(-n // BLOCK) * BLOCK for n in sizes]


def test_suffix_case_is_folded_key_case_is_not(tmp_path):
    entries = [("Img.JPG", b"1"), ("Img.Cls", b"2"), ("Img.Tar.GZ", b"3"), ("img.jpg", b"4")]
    path = write_tar(tmp_path / "case.tar", entries)
    s = check_shard(path)
    assert s.keys == ["Img", "img"]
    assert s.suffixes == ["jpg", "cls", "tar.gz", "jpg"]


def test_empty_shards(tmp_path):
    path = write_tar(tmp_path / "empty.tar", [])
    assert os.path.getsize(path) > 0
    s = check_shard(path)
    assert len(s) == 0 and s.filesize == os.path.getsize(path)
    assert s.arrays()["start"].shape == (0,)
    # members, but none that belongs to a sample
    path = write_tar(tmp_path / "nosamples.tar", [("d", None), ("d/README", b"x"), ("__meta__", b"y")])
    assert len(check_shard(path)) == 0
    # a bare end-of-archive marker
    assert len(scan_bytes(b"\0" * 1024)) == 0


def test_zero_byte_file_is_not_a_tar(tmp_path):
    path = tmp_path / "zero.tar"
    path.write_bytes(b"")
    with pytest.raises(tarfile.ReadError):  # what WebDataset does with it
        wds_samples(str(path))
    with pytest.raises(TarFormatError, match=r"zero\.tar.*byte 0"):
        with open(path, "rb") as f:
            scan_shard(f, str(path), filesize=0)
    with pytest.raises(TarFormatError, match="byte 0"):
        scan_shard(NonSeekable(b""), "stream.tar")


def test_scan_shard_counts_stream_length():
    raw = write_tar_bytes([("a.jpg", payload(100)), ("a.cls", b"1")])
    s = scan_shard(NonSeekable(raw + b"\0" * 5000, chunk=333), "stream.tar")  # trailing zeros counted too
    assert s.filesize == len(raw) + 5000
    assert s.keys == ["a"]


# ---- numeric fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 511, 8**11 - 1, 8**11, 9 * 2**30, 2**40 + 12345, 2**62])
def test_nti_matches_tarfile(value):
    field = tarfile.itn(value, 12, tarfile.GNU_FORMAT)
    assert _nti(field, "x") == value == tarfile.nti(field)
    if value >= 8**11:
        assert field[:1] == b"\x80"  # base-256: sizes of 8 GiB and more


def test_nti_forms():
    assert _nti(b"00000001750\0", "x") == 0o1750
    assert _nti(b"      1750 \0", "x") == 0o1750
    assert _nti(b"1750\0\0\0\0\0\0\0\0", "x") == 0o1750
    assert _nti(b"\0" * 12, "x") == 0
    assert _nti(b" " * 12, "x") == 0
    big = 9 * 2**30  # a 9 GiB member
    assert _nti(b"\x80" + big.to_bytes(11, "big"), "x") == big
    assert _nti(b"\xff" * 12, "x") == -1  # negative base-256 (mtimes before 1970)
    assert (
        _nti(b"\xff" + (256**11 - 5).to_bytes(11, "big"), "x")
        == -5
        == tarfile.nti(b"\xff" + (256**11 - 5).to_bytes(11, "big"))
    )
    assert _nti(tarfile.itn(-12345, 8, tarfile.GNU_FORMAT), "x") == -12345
    with pytest.raises(TarFormatError, match="shard.tar: header at byte 512: bad numeric field"):
        _nti(b"12x4\0", "shard.tar: header at byte 512")


def rewrite_header(raw: bytearray, offset: int, field: slice, value: bytes, fix_checksum: bool = True) -> None:
    raw[field] = value
    if fix_checksum:
        header = raw[offset : offset + BLOCK]
        header[148:156] = b" " * 8
        raw[offset + 148 : offset + 156] = b"%06o\0 " % sum(header)


def test_v7_directory_as_regular_entry_with_slash():
    """Old tars mark a directory as a '\\0' (regular) entry whose name ends in '/'."""
    raw = bytearray(write_tar_bytes([("d", None), ("d/a.jpg", b"1"), ("d/a.cls", b"2")], tarfile.USTAR_FORMAT))
    assert raw[0:2] == b"d/" and raw[156:157] == b"5"
    rewrite_header(raw, 0, slice(156, 157), b"\0")
    raw = bytes(raw)
    assert tarfile.open(fileobj=io.BytesIO(raw)).getmembers()[0].isdir()
    members = members_of(raw)
    assert members[0].type == b"5" and not members[0].is_regular() and members[0].name == "d"
    assert_members_match_tarfile(members, raw)
    s = scan_bytes(raw)
    assert s.keys == ["d/a"]
    assert_samples_match_wds(s, raw, wds_samples_of_bytes(raw))


def test_base256_size_field_is_read():
    raw = bytearray(write_tar_bytes([("a.jpg", payload(1000)), ("a.cls", b"12")], tarfile.GNU_FORMAT))
    rewrite_header(raw, 0, slice(124, 136), b"\x80" + (1000).to_bytes(11, "big"))
    raw = bytes(raw)
    assert [t.size for t in tarfile.open(fileobj=io.BytesIO(raw)).getmembers()] == [1000, 2]
    members = members_of(raw)
    assert_members_match_tarfile(members, raw)
    assert_samples_match_wds(scan_bytes(raw), raw, wds_samples_of_bytes(raw))


def test_pax_size_overrides_header_size():
    raw = write_tar_bytes([("a.jpg", payload(700)), ("a.cls", b"1")], tarfile.PAX_FORMAT)
    # re-declare the size in a PAX record and blank the ustar field, as writers do for > 8 GiB
    pax = tarfile.TarInfo("a.jpg")
    pax.size = 700
    pax.mtime = 1_700_000_000
    buf = pax.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert b"size=" not in buf  # tarfile only writes it when needed; write one by hand
    rec = b" size=700\n"
    rec = b"%d%s" % (len(rec) + 2, rec)
    assert int(rec.split()[0]) == len(rec)
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type = tarfile.XHDTYPE
    hdr.size = len(rec)
    ext = hdr.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + rec + b"\0" * (BLOCK - len(rec))
    body = bytearray(raw)
    rewrite_header(body, 0, slice(124, 136), b"00000000000\0")  # ustar size field now says 0
    raw2 = ext + bytes(body)
    assert tarfile.open(fileobj=io.BytesIO(raw2)).getmembers()[0].size == 700
    members = members_of(raw2)
    assert members[0].size == 700 and members[0].header_offset == 0
    assert_members_match_tarfile(members, raw2)
    assert_samples_match_wds(scan_bytes(raw2), raw2, wds_samples_of_bytes(raw2))


def test_key_and_suffix_is_webdatasets_split():
    from webdataset.tariterators import base_plus_ext

    for name in [
        "a.jpg",
        "a.b.c",
        "dir/a.jpg",
        "d.x/a.jpg",
        "d.x/a",
        "a",
        ".a",
        "dir/.a.b",
        "a.",
        "a/b/c.d/e.f",
        "./a.jpg",
        "",
        "x" * 300 + ".y",
    ]:
        assert key_and_suffix(name) == base_plus_ext(name), name


# ---- errors ------------------------------------------------------------------------------------------


@pytest.fixture
def shard_with_long_names(tmp_path) -> tuple[str, bytes, list[TarMember]]:
    entries = [
        ("a.jpg", payload(1500, 1)),
        ("a.cls", b"1"),
        ("l" * 150 + ".jpg", payload(900, 2)),
        ("l" * 150 + ".cls", b"2"),
        ("c.jpg", payload(3000, 3)),
        ("c.cls", b"3"),
    ]
    path = write_tar(tmp_path / "whole.tar", entries, tarfile.GNU_FORMAT)
    raw = open(path, "rb").read()
    return path, raw, members_of(raw)


def scan_file_prefix(tmp_path, raw: bytes, cut: int) -> tuple[str, ShardSamples]:
    path = str(tmp_path / f"cut-{cut}.tar")
    with open(path, "wb") as f:
        f.write(raw[:cut])
    with open(path, "rb") as f:
        return path, scan_shard(f, path, filesize=cut)


def test_truncated_in_a_body(tmp_path, shard_with_long_names):
    _, raw, members = shard_with_long_names
    c = next(m for m in members if m.name == "c.jpg")
    cut = c.data_offset + c.size // 2
    with pytest.raises(TarFormatError) as err:
        scan_file_prefix(tmp_path, raw, cut)
    msg = str(err.value)
    assert f"cut-{cut}.tar" in msg and f"byte {c.data_offset}" in msg and "truncated" in msg
    # the same from a stream, which only notices when it runs out of bytes
    with pytest.raises(TarFormatError, match=rf"pipe\.tar: truncated tar, body of 'c\.jpg'.*byte {c.data_offset}"):
        scan_shard(NonSeekable(raw[:cut]), "pipe.tar")
    # and in the padding after the last body
    last = members[-1]
    with pytest.raises(TarFormatError, match=f"byte {last.data_offset}"):
        scan_file_prefix(tmp_path, raw, last.data_offset + last.size + 10)


def test_truncated_in_a_header(tmp_path, shard_with_long_names):
    _, raw, members = shard_with_long_names
    c = next(m for m in members if m.name == "c.cls")
    cut = c.header_offset + 100
    with pytest.raises(TarFormatError) as err:
        scan_file_prefix(tmp_path, raw, cut)
    msg = str(err.value)
    assert f"cut-{cut}.tar" in msg and f"header at byte {c.header_offset}" in msg
    with pytest.raises(TarFormatError, match=f"stream.tar: truncated tar header at byte {c.header_offset}"):
        scan_shard(NonSeekable(raw[:cut], chunk=64), "stream.tar")


def test_truncated_in_or_after_a_long_name(tmp_path, shard_with_long_names):
    _, raw, members = shard_with_long_names
    long_member = next(m for m in members if m.name.startswith("lll"))
    entry = long_member.header_offset  # the 'L' record
    assert raw[entry + 156 : entry + 157] == b"L"
    with pytest.raises(TarFormatError, match=rf"cut-{entry + 600}\.tar.*GNU long name.*byte {entry + BLOCK}"):
        scan_file_prefix(tmp_path, raw, entry + 600)
    # cut right after the long-name record: it names a member that is not there
    own_header = long_member.data_offset - BLOCK
    with pytest.raises(TarFormatError, match=rf"extended header at byte {entry} is not followed by a member"):
        scan_file_prefix(tmp_path, raw, own_header)
    # ... and tarfile agrees that this is an error rather than the end of the archive
    with pytest.raises(tarfile.ReadError):
        tarfile.open(fileobj=io.BytesIO(raw[:own_header] + b"\0" * 1024)).getmembers()
    with pytest.raises(TarFormatError, match=f"extended header at byte {entry}"):
        scan_bytes(raw[:own_header] + b"\0" * 1024)


def test_cut_at_a_member_boundary_gives_the_members_before_it(tmp_path, shard_with_long_names):
    _, raw, members = shard_with_long_names
    for i, m in enumerate(members):
        assert members_of(raw[: m.end]) == members[: i + 1]
        assert list(iter_members(NonSeekable(raw[: m.end]), "s")) == members[: i + 1]


def test_bad_checksum(tmp_path, shard_with_long_names):
    path, raw, members = shard_with_long_names
    c = next(m for m in members if m.name == "c.jpg")
    own = c.data_offset - BLOCK
    for where in (own + 3, own + 150):  # a name byte, then the checksum field itself
        bad = bytearray(raw)
        bad[where] ^= 0x11
        bad_path = tmp_path / f"bad-{where}.tar"
        bad_path.write_bytes(bad)
        with pytest.raises(TarFormatError, match=rf"bad-{where}\.tar: header at byte {own} has a bad checksum"):
            with open(bad_path, "rb") as f:
                scan_shard(f, str(bad_path), filesize=len(bad))
        # tarfile (hence WebDataset) silently stops at such a header: fewer samples, no error
        assert len(wds_samples(str(bad_path))) < len(wds_samples(path))
    # a corrupt first header
    bad = bytearray(raw)
    bad[0] ^= 0x01
    with pytest.raises(TarFormatError, match="header at byte 0 has a bad checksum"):
        scan_bytes(bytes(bad))
    with pytest.raises(TarFormatError, match="bad checksum"):
        scan_bytes(b"this is not a tar file at all" * 40)


def test_bad_numeric_field_names_the_header():
    raw = bytearray(write_tar_bytes([("a.jpg", b"1"), ("b.jpg", b"2")]))
    rewrite_header(raw, 1024, slice(1024 + 124, 1024 + 136), b"0000000z000\0")
    with pytest.raises(TarFormatError, match="bad.tar: header at byte 1024: bad numeric field"):
        scan_shard(io.BytesIO(bytes(raw)), "bad.tar", filesize=len(raw))


def pax_shard(record: bytes) -> bytes:
    """A PAX extended header holding ``record``, then a member 'a.jpg' and the end of the archive."""
    ext = tarfile.TarInfo("././@PaxHeader")
    ext.type = tarfile.XHDTYPE
    ext.size = len(record)
    member = tarfile.TarInfo("a.jpg")
    member.size = 3
    return (
        ext.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        + record
        + b"\0" * (BLOCK - len(record))
        + member.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        + b"abc"
        + b"\0" * (BLOCK - 3)
        + b"\0" * (2 * BLOCK)
    )


def test_pax_records_are_parsed():
    record = b" path=dir/renamed.sample.jpg\n"
    record = b"%d%s" % (len(record) + 2, record)
    assert int(record.split()[0]) == len(record) == 31
    raw = pax_shard(record)
    assert [t.name for t in tarfile.open(fileobj=io.BytesIO(raw))] == ["dir/renamed.sample.jpg"]
    members = members_of(raw)
    assert members[0].name == "dir/renamed.sample.jpg" and members[0].header_offset == 0
    assert_members_match_tarfile(members, raw)


@pytest.mark.parametrize(
    "record", [b"0 path=x\n", b"-9 path=x\n", b"3 path=x\n", b"99 path=x\n", b"x path=x\n", b"nospace"]
)
def test_malformed_pax_records_raise(record):
    with fails_instead_of_hanging():
        with pytest.raises(TarFormatError, match=r"pax\.tar: header at byte 0: malformed PAX"):
            scan_shard(io.BytesIO(pax_shard(record)), "pax.tar", filesize=len(pax_shard(record)))


@pytest.mark.parametrize("size", [-512, -1024, -1])
def test_negative_base256_size_raises(size):
    raw = bytearray(write_tar_bytes([("a.jpg", payload(600)), ("b.jpg", payload(600))]))
    second = 1536
    rewrite_header(raw, second, slice(second + 124, second + 136), tarfile.itn(size, 12, tarfile.GNU_FORMAT))
    assert tarfile.nti(bytes(raw[second + 124 : second + 136])) == size
    for stream in (io.BytesIO(bytes(raw)), NonSeekable(bytes(raw))):
        with fails_instead_of_hanging():
            with pytest.raises(TarFormatError, match=rf"neg\.tar: header at byte {second}: negative size"):
                list(iter_members(stream, "neg.tar", filesize=len(raw) if stream.seekable() else None))


def test_negative_pax_size_raises():
    raw = pax_shard(b"13 size=-512\n")
    with fails_instead_of_hanging():
        with pytest.raises(TarFormatError, match="bad PAX size '-512'"):
            members_of(raw)


@pytest.mark.parametrize("second", ["a.jpg", "a.JPG"])
def test_duplicate_suffix_in_a_sample(tmp_path, second):
    path = write_tar(tmp_path / "dup.tar", [("a.jpg", b"1"), ("a.cls", b"x"), (second, b"2")])
    with pytest.raises(ValueError, match="duplicate"):
        wds_samples(path)
    dup_offset = tar_members(path)[2].offset
    with pytest.raises(TarFormatError, match=rf"dup\.tar: member '{second}' at byte {dup_offset} repeats suffix 'jpg'"):
        with open(path, "rb") as f:
            scan_shard(f, path, filesize=os.path.getsize(path))


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_are_refused(tmp_path, fmt):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.cls").write_bytes(b"1")
    with open(root / "a.bin", "wb") as f:
        f.truncate(4 << 20)
        f.seek(3 << 20)
        f.write(b"data after a hole")
    out = str(tmp_path / f"sparse-{fmt}.tar")
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-C", str(root), "-cf", out, "a.bin", "a.cls"],
        check=True,
        capture_output=True,
    )
    if not any(t.issparse() for t in tar_members(out)):
        pytest.skip("this file system does not keep holes, so tar stored a plain file")
    # WebDataset would expand the holes; the scanner cannot give offsets for that: refuse loudly
    with pytest.raises(TarFormatError, match=r"sparse-.*\.tar: header at byte \d+: sparse member"):
        with open(out, "rb") as f:
            scan_shard(f, out, filesize=os.path.getsize(out))


# ---- headers that tarfile reads its own way -------------------------------------------------------
# Hand-made entries (tarfile's writers would not make them, damage can): the scanner must derive the
# same names as tarfile, or refuse the shard; never a third answer.

END = b"\0" * (2 * BLOCK)


def header(
    name: bytes,
    typ: bytes = b"0",
    size: int = 0,
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    mode: bytes = b"0000644\0",
) -> bytes:
    """One ustar header with a valid checksum."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = mode
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[156:157] = typ
    block[257:265] = magic
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def entry(name: bytes, data: bytes = b"", typ: bytes = b"0", size: int | None = None, **kw) -> bytes:
    """A header and its padded body; ``size`` may declare less than ``data`` (the rest is padding)."""
    body = data + b"\0" * (-len(data) % BLOCK)
    return header(name, typ, len(data) if size is None else size, **kw) + body


def pax_record(key: bytes, value: bytes) -> bytes:
    """``"<len> <key>=<value>\\n"``, the length counting its own digits."""
    rest = b" %s=%s\n" % (key, value)
    n = len(rest) + 1
    while len(str(n)) + len(rest) != n:
        n = len(str(n)) + len(rest)
    return b"%d%s" % (n, rest)


def longname(name: bytes) -> bytes:
    return entry(b"././@LongLink", name + b"\0", typ=b"L")


def pax_path(path: bytes) -> bytes:
    return entry(b"././@PaxHeader", pax_record(b"path", path), typ=b"x")


def assert_reads_as_tarfile(raw: bytes) -> list[TarMember]:
    """Same members as tarfile, same samples as WebDataset."""
    members = members_of(raw)
    assert_members_match_tarfile(members, raw)
    assert_samples_match_wds(scan_bytes(raw), raw, wds_samples_of_bytes(raw))
    return members


def test_an_overwritten_long_name_end_reads_as_tarfile():
    """The fuzz example: junk over the NUL after a GNU long name and the padding behind it. tarfile
    reads the name up to the first NUL of the whole padded block, not of its declared size."""
    raw = bytearray(write_tar_bytes([("dd", None)] * 9 + [("d/sub/" + "k" * 122 + ".jpg", b"")], tarfile.GNU_FORMAT))
    g = raw.index(b".jpg\0") + 3
    raw[g : g + 3] = b"\x01\x01\x01"  # 'g', the NUL that ends the declared 133 bytes, and a padding byte
    raw = bytes(raw)
    members = assert_reads_as_tarfile(raw)
    assert members[-1].name == "d/sub/" + "k" * 122 + ".jp\x01\x01\x01"
    assert key_and_suffix(members[-1].name)[1] == "jp\x01\x01\x01"


def test_the_first_extended_name_wins():
    """tarfile patches a member as its recursion through extended headers unwinds, innermost first."""
    cls = entry(b"m.cls", b"1")
    for chain, name in [
        (longname(b"first.jpg") + longname(b"second.jpg"), "first.jpg"),
        (pax_path(b"pax.jpg") + longname(b"long.jpg"), "pax.jpg"),
        (longname(b"long.jpg") + pax_path(b"pax.jpg"), "long.jpg"),
        (pax_path(b"one.jpg") + pax_path(b"two.jpg"), "one.jpg"),
    ]:
        raw = chain + cls + END
        members = assert_reads_as_tarfile(raw)
        assert [m.name for m in members] == [name] and members[0].header_offset == 0


def test_pax_paths_and_records_in_the_padding():
    members = assert_reads_as_tarfile(pax_path(b"dir/a.jpg//") + entry(b"x.cls", b"1") + END)
    assert members[0].name == "dir/a.jpg"  # _apply_pax_info strips a path's trailing slashes
    first, second = pax_record(b"path", b"a.jpg"), pax_record(b"path", b"b.jpg")
    ext = entry(b"././@PaxHeader", first + second, typ=b"x", size=len(first))  # the second lies in the padding
    members = assert_reads_as_tarfile(ext + entry(b"x.cls", b"1") + END)
    assert members[0].name == "b.jpg"
    junk = entry(b"././@PaxHeader", first + b"junk", typ=b"x", size=len(first))
    with pytest.raises(TarFormatError, match="mem.tar: header at byte 0: malformed PAX"):
        members_of(junk + entry(b"x.cls", b"1") + END)  # tarfile ignores it; refusing is the clear answer


@pytest.mark.parametrize(
    "block,name,typ",
    [
        (header(b"a.jpg", prefix=b"p", magic=b"ustar  \0"), "p/a.jpg", b"0"),  # no magic test: a GNU header too
        (header(b"", typ=b"\0", prefix=b"p.jpg"), "p.jpg/", b"\0"),  # the V7 rule sees the name field only
        (header(b"a/", typ=b"\0", prefix=b"p"), "p/a", b"5"),
        (header(b"a//", typ=b"5", prefix=b"p"), "p/a", b"5"),
        (header(b"a.jpg", typ=b"\0", prefix=b"p" * 155), "p" * 155 + "/a.jpg", b"\0"),  # unterminated prefix
        (header(b"n" * 100, prefix=b"p"), "p/" + "n" * 100, b"0"),  # unterminated name
    ],
    ids=["gnu-magic", "v7-empty-name", "v7-dir", "dir-slashes", "long-prefix", "long-name"],
)
def test_name_and_prefix_fields(block, name, typ):
    members = assert_reads_as_tarfile(block + entry(b"z.cls", b"1") + END)
    assert (members[0].name, members[0].type) == (name, typ)


@pytest.mark.parametrize(
    "field,value",
    [
        (slice(124, 136), b"\xd9\xa3" + b"\0" * 10),  # U+0663, a digit to int() but not to tarfile
        (slice(100, 108), b"0009999\0"),  # mode: not octal
        (slice(136, 148), b"1x" + b"\0" * 10),  # mtime
    ],
    ids=["size", "mode", "mtime"],
)
def test_a_field_tarfile_refuses_ends_the_scan_with_an_error(field, value):
    raw = bytearray(write_tar_bytes([("a.jpg", b"1"), ("b.jpg", b"2")], tarfile.GNU_FORMAT))
    rewrite_header(raw, BLOCK * 2, slice(BLOCK * 2 + field.start, BLOCK * 2 + field.stop), value)
    raw = bytes(raw)
    assert [t.name for t in tarfile.open(fileobj=io.BytesIO(raw))] == ["a.jpg"]  # stops there, silently
    with pytest.raises(TarFormatError, match=rf"mem\.tar: header at byte {2 * BLOCK}: bad numeric field"):
        members_of(raw)


def test_a_global_header_needs_a_member():
    raw = entry(b"a.jpg", b"1") + entry(b"././@GlobalHead", pax_record(b"comment", b"x"), typ=b"g") + END
    with pytest.raises(tarfile.ReadError):
        tarfile.open(fileobj=io.BytesIO(raw)).getmembers()
    with pytest.raises(TarFormatError, match=f"extended header at byte {2 * BLOCK} is not followed"):
        members_of(raw)


def test_lzma_alone_magic_is_compression(tmp_path):
    """tarfile's ``r|*`` takes these bytes for LZMA: not a tar to WebDataset, so not indexed as one."""
    raw = bytearray(entry(b"a.jpg", b"1") + END)
    rewrite_header(raw, 0, slice(0, 4), b"\x5d\x00\x00\x80")
    path = tmp_path / "lz.tar"
    path.write_bytes(raw)
    assert members_of(bytes(raw))[0].name == "]"  # a valid header ...
    with pytest.raises(tarfile.ReadError):
        wds_samples(str(path))  # ... that WebDataset does not read
    stream, kind = decompressed(io.BytesIO(bytes(raw)), str(path))
    assert kind == "xz"
    with pytest.raises(TarFormatError, match="lz.tar"):
        scan_shard(stream, str(path))


# ---- random layouts (hypothesis) ---------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_random_layouts_agree_with_tarfile_and_webdataset(layout):
    entries, fmt = layout
    raw = build_layout(entries, fmt)
    members = members_of(raw)
    assert_members_match_tarfile(members, raw)
    assert list(iter_members(NonSeekable(raw, chunk=1000), "s")) == members
    try:
        ref = wds_samples_of_bytes(raw)
    except ValueError as e:  # a duplicate suffix in one sample: the scanner must refuse it too
        assert "duplicate" in str(e)
        with pytest.raises(TarFormatError, match="repeats suffix"):
            scan_bytes(raw)
        return
    s = scan_bytes(raw)
    assert_samples_match_wds(s, raw, ref)
    assert_ranges_self_contained(s, raw, ref)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.floats(0, 1))
def test_random_truncation_raises_or_gives_a_prefix(layout, where):
    entries, fmt = layout
    raw = build_layout(entries, fmt)
    full = members_of(raw)
    cut = int(where * len(raw))
    data = raw[:cut]
    starts = {m.header_offset for m in full}
    last_end = full[-1].end if full else 0
    if cut == 0:
        expected = "error"
    elif cut in starts or cut == last_end:
        expected = [m for m in full if m.header_offset < cut]
    elif cut >= last_end + BLOCK:
        expected = full  # only end-of-archive padding was lost
    else:
        expected = "error"
    for name, open_ in [
        ("seekable+size", lambda: (io.BytesIO(data), len(data))),
        ("seekable", lambda: (io.BytesIO(data), None)),
        ("stream", lambda: (NonSeekable(data, chunk=300), None)),
    ]:
        fileobj, size = open_()
        try:
            got = list(iter_members(fileobj, "cut.tar", filesize=size))
        except TarFormatError as e:
            assert expected == "error", (name, cut, str(e))
            assert "cut.tar" in str(e) and "byte" in str(e)
        else:
            assert expected != "error", (name, cut, got)
            assert got == expected, name
