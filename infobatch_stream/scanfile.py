"""One shard's scan (its samples' byte ranges, as indexing found them) as bytes, and a folder of them.

An index built during the first epoch is assembled from the scans that loader workers make while
they read their shards. A worker hands its scan over by writing one small file per shard into a
folder next to the index being built (:class:`ScanDir`); the training process merges them at
``set_epoch(1)``, and a run resumed inside epoch 0 keeps what is already there. Ranks exchange
the same bytes through ``torch.distributed``.

The format is ours and plain (no pickle, no zip): a magic, a JSON header naming every array's
length, the arrays back to back, and an HMAC-SHA256 of all of it. Every length is checked against
the bytes present before anything is allocated; a file that fails any check is ignored and the
shard is scanned again.

Why a keyed MAC and not a checksum: a scan decides which bytes of a shard the reader hands on,
and the tar header check alone cannot tell a member from a tar nested in another member's body.
Only scans this user's runs wrote are taken: the key is in the folder, in a file only its owner
can read (created ``0600``; one with another owner or mode, or a link, is replaced, which
invalidates the scans). Between ranks the scans travel unkeyed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import struct
from dataclasses import dataclass

import numpy as np

from .errors import IndexMismatchError
from .tarscan import ShardSamples

log = logging.getLogger(__name__)

MAGIC = b"IBSCAN1\n"
MAX_HEADER = 1 << 20
MAX_SAMPLE_BYTES = 64 << 10  # bounds what a scan file may hold per sample (its key, its members' rows)
# name, dtype, per sample ("n") or per member ("m") or key bytes ("k")
_ARRAYS = (
    ("start", np.int64, "n"),
    ("end", np.int64, "n"),
    ("nmembers", np.int64, "n"),
    ("key_length", np.int64, "n"),
    ("data_offset", np.int64, "m"),
    ("size", np.int64, "m"),
    ("suffix_id", np.int32, "m"),
    ("keys", np.uint8, "k"),
)


@dataclass(frozen=True)
class Scan:
    """A shard's scan and what the index records of the object it came from."""

    url: str
    samples: ShardSamples
    mtime: float | None = None
    etag: str | None = None
    compression: str | None = None
    ranges: bool = True


MAC_BYTES = 32


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def pack(scan: Scan, key: bytes = b"") -> bytes:
    """The bytes of ``scan`` (see the module docstring), authenticated with ``key``."""
    s = scan.samples
    suffixes: dict[str, int] = {}
    ids = np.asarray([suffixes.setdefault(x, len(suffixes)) for x in s.suffixes], dtype=np.int32)
    keys = [k.encode("utf-8", "surrogateescape") for k in s.keys]
    arrays: dict[str, np.ndarray] = {
        "start": np.asarray(s.start, np.int64),
        "end": np.asarray(s.end, np.int64),
        "nmembers": np.asarray(s.nmembers, np.int64),
        "key_length": np.asarray([len(k) for k in keys], np.int64),
        "data_offset": np.asarray(s.data_offset, np.int64),
        "size": np.asarray(s.size, np.int64),
        "suffix_id": ids,
        "keys": np.frombuffer(b"".join(keys), np.uint8),
    }
    header = {
        "url": scan.url,
        "filesize": s.filesize,
        "mtime": scan.mtime,
        "etag": scan.etag,
        "compression": scan.compression,
        "ranges": scan.ranges,
        "suffixes": list(suffixes),
        "samples": len(s.keys),
        "members": len(s.suffixes),
        "key_bytes": int(arrays["keys"].size),
    }
    text = json.dumps(header).encode()
    body = MAGIC + struct.pack("<I", len(text)) + text + b"".join(arrays[name].tobytes() for name, _, _ in _ARRAYS)
    return body + _mac(key, body)


def unpack(data: bytes, where: str, key: bytes = b"") -> Scan:
    """The scan :func:`pack` wrote with ``key``; :class:`IndexMismatchError` naming ``where`` for
    anything else."""

    def bad(why: str) -> IndexMismatchError:
        return IndexMismatchError(f"shard scan {where} is damaged ({why}); it is ignored and the shard scanned again")

    head, tail = len(MAGIC) + 4, MAC_BYTES
    if len(data) < head + tail or data[: len(MAGIC)] != MAGIC:
        raise bad("not a shard scan")
    if not hmac.compare_digest(_mac(key, data[:-tail]), data[-tail:]):
        raise bad("its MAC does not match: not written by this user's runs, or altered")
    (length,) = struct.unpack("<I", data[len(MAGIC) : head])
    if length > MAX_HEADER or head + length > len(data) - tail:
        raise bad("header length")
    try:
        header = json.loads(data[head : head + length])
        n, m, k = int(header["samples"]), int(header["members"]), int(header["key_bytes"])
        url, filesize, suffixes = header["url"], int(header["filesize"]), header["suffixes"]
        mtime, etag, compression = header["mtime"], header["etag"], header["compression"]
        ranges = header["ranges"] is not False
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise bad(f"header: {e}") from None
    if (
        min(n, m, k, filesize) < 0
        or not isinstance(url, str)
        or not isinstance(suffixes, list)
        or not all(isinstance(x, str) for x in suffixes)
        or not (mtime is None or isinstance(mtime, (int, float)))
        or not (etag is None or isinstance(etag, str))
        or compression not in (None, "gzip", "bz2", "xz")
    ):
        raise bad("header fields")
    counts = {"n": n, "m": m, "k": k}
    need = sum(counts[per] * np.dtype(dtype).itemsize for _, dtype, per in _ARRAYS)
    if head + length + need != len(data) - tail:
        raise bad(f"{len(data)} bytes, the header describes {head + length + need + tail}")
    arrays: dict[str, np.ndarray] = {}
    pos = head + length
    for name, dtype, per in _ARRAYS:
        count = counts[per]
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos += count * np.dtype(dtype).itemsize
    if int(arrays["nmembers"].sum()) != m or int(arrays["key_length"].sum()) != k:
        raise bad("member or key counts")
    if m and not 0 <= int(arrays["suffix_id"].min()) <= int(arrays["suffix_id"].max()) < len(suffixes):
        raise bad("suffix ids")
    if np.any(arrays["nmembers"] < 1) or np.any(arrays["key_length"] < 1):
        raise bad("a sample without members or key")
    blob, cuts = arrays["keys"].tobytes(), np.concatenate(([0], np.cumsum(arrays["key_length"]))).tolist()
    samples = ShardSamples(
        keys=[blob[a:b].decode("utf-8", "surrogateescape") for a, b in zip(cuts[:-1], cuts[1:])],
        start=arrays["start"].tolist(),
        end=arrays["end"].tolist(),
        nmembers=arrays["nmembers"].tolist(),
        suffixes=[suffixes[i] for i in arrays["suffix_id"].tolist()],
        data_offset=arrays["data_offset"].tolist(),
        size=arrays["size"].tolist(),
        filesize=filesize,
    )
    return Scan(url, samples, mtime, etag, compression, ranges)


class ScanDir:
    """The scans of shards already read, one file per shard (``<shard number>.scan``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key: bytes | None = None

    def key(self) -> bytes:
        """The folder's MAC key (made on first use, see the module docstring)."""
        if self._key is None:
            os.makedirs(self.path, exist_ok=True)
            file = os.path.join(self.path, "key")
            self._key = _read_key(file)
            if self._key is None:
                tmp = f"{file}.{os.getpid()}.{secrets.token_hex(4)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                with contextlib.suppress(FileNotFoundError):
                    if _read_key(file) is None:  # another owner's or mode's: not ours to trust
                        os.remove(file)
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, file)  # the first process to get here wins; the others read its key
                os.remove(tmp)
                self._key = _read_key(file)
                if self._key is None:
                    raise PermissionError(f"{file}: cannot make a private key file for the shard scans here")
        return self._key

    def file(self, shard: int) -> str:
        return os.path.join(self.path, f"{shard:08d}.scan")

    def has(self, shard: int) -> bool:
        return os.path.exists(self.file(shard))

    def held(self, num_shards: int) -> np.ndarray:
        """Which of shards ``0..num_shards-1`` have a scan file here (one listing, not a stat each)."""
        have = np.zeros(num_shards, dtype=bool)
        names = os.listdir(self.path) if os.path.isdir(self.path) else []
        for stem in (name[:-5] for name in names if name.endswith(".scan")):
            if stem.isdigit() and int(stem) < num_shards:
                have[int(stem)] = True
        return have

    def save(self, shard: int, scan: Scan) -> None:
        """Write atomically (a unique temp file, then rename): workers of several ranks may save
        the same shard at once, and a crash never leaves half a file under the final name."""
        os.makedirs(self.path, exist_ok=True)
        final = self.file(shard)
        tmp = f"{final}.{os.getpid()}.{id(scan):x}.tmp"
        data = pack(scan, self.key())
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)

    def load(self, shard: int, url: str, nsamples: int) -> Scan | None:
        """The saved scan of ``shard``, or None if there is none or it is not this shard's (a
        damaged file, or one left by a run over another shard list, is logged and ignored)."""
        file = self.file(shard)
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_HEADER + nsamples * MAX_SAMPLE_BYTES:  # not read: no shard's scan is this large
                    raise IndexMismatchError(f"shard scan {file} is {size} bytes, too large for {nsamples} samples")
                data = f.read(size)
            scan = unpack(data, file, self.key())
        except FileNotFoundError:
            return None
        except (OSError, IndexMismatchError) as e:
            log.warning("%s", e)
            return None
        if scan.url != url or len(scan.samples) != nsamples:
            log.warning(
                "shard scan %s is of %s with %d samples, not of %s with %d: ignored (left by another run?)",
                file,
                scan.url,
                len(scan.samples),
                url,
                nsamples,
            )
            return None
        return scan

    def drop(self, shard: int) -> None:
        """Forget one shard's scan (it no longer fits the shard)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.file(shard))

    def remove(self) -> None:
        """Delete the folder's scans (after the index they made was saved)."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.path):
                if name.endswith(".scan") or name == "key":
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.path, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def _read_key(file: str) -> bytes | None:
    """The key in ``file`` if it is a regular file of this user's that nobody else can read."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077 or st.st_size != 32:
            return None
        return f.read(32)
