"""The dataset index: every shard with its sample count, every sample with its key, slot and bytes.

On disk it is a wids shard-list JSON (``shardlist`` of ``url``/``nsamples``/``filesize``, so wids
users can read it) plus a sidecar folder of ``.npy`` arrays that are memory-mapped on load: a
10,000-shard, 10M-sample index opens in a fraction of a second and costs memory only for the pages touched.

A sample's **slot** is ``shard_first[shard] + position in shard``; the score store is indexed by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import compact, indexcheck
from .errors import IndexMismatchError, StaleIndexError, TarFormatError
from .rows import ShardRows, cut_rows
from .storage import backend_for, expand_listing, identity, runs_command, uses_obstore
from .storage import is_local as _is_local
from .storage import local_path as _strip_file_scheme
from .tarscan import ShardSamples, _CountingReader, decompressed, scan_shard

log = logging.getLogger(__name__)

INDEX_KIND = "wids-shard-index-v1"
FORMAT_VERSION = 2  # compact arrays (compact.py); format 1 (int64 arrays) still loads
_ARRAYS = ("start", "end", "member_first", "data_offset", "size", "suffix_id", "key_offsets", "keys")
ARRAYS_OF_FORMAT = {1: _ARRAYS, 2: compact.ARRAYS}


def normalize_url(url: str) -> str:
    """A canonical form for matching ``__url__`` of samples against indexed shards."""
    if _is_local(url):
        return os.path.realpath(_strip_file_scheme(url))
    return identity(url)


def expand_braces(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand a WebDataset URL pattern (``data-{000..099}.tar``, ``a::b``) or pass a list through."""
    if isinstance(urls, str):
        import braceexpand

        return [url for part in urls.split("::") for url in braceexpand.braceexpand(part)]
    return list(urls)


def listed(urls: list[str], globbing: bool = True) -> list[str]:
    """``urls`` with globs listed (``s3://bucket/prefix/*.tar``, ``shards/*.tar``) when ``globbing``."""
    return [u for url in urls for u in expand_listing(url)] if globbing else list(urls)


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """:func:`expand_braces`, then, for a pattern string, its globs listed (a list passes through)."""
    return listed(expand_braces(urls), isinstance(urls, str))


@dataclass(frozen=True)
class ShardInfo:
    url: str
    nsamples: int
    filesize: int
    mtime: float | None
    etag: str | None = None
    compression: str | None = None  # gzip, bz2 or xz: offsets refer to the decompressed tar
    ranges: bool = True  # False: the server answers Range requests with the whole body (stream it)
    crc: int | None = None  # CRC32 of the shard's rows in the arrays (indexes built before it have none)


@dataclass(frozen=True)
class Building:
    """An index still being built: made from a wids shard list (counts only), completed from the
    scans that epoch 0's readers leave in ``scans`` (see :mod:`infobatch_stream.building`), saved at ``output``."""

    source: str  # the shard list
    output: str  # where the index is saved when complete
    scans: str  # the folder of per-shard scans (:class:`infobatch_stream.scanfile.ScanDir`)


def serves_ranges(url: str, scan: ShardSamples, compression: str | None) -> bool:
    """Ask an HTTP server for one byte: one that ignores Range gets its shard marked, so the
    reader streams it instead of sending range requests that each return the whole body."""
    if not url.startswith(("http://", "https://")) or compression is not None or not scan.filesize:
        return True
    from .storage import RangeNotSupported

    try:
        backend_for(url).read(url, 0, 1)
    except RangeNotSupported:
        log.warning("%s: the server ignores Range requests; the shard will be streamed whole", url)
        return False
    except OSError:
        pass  # undecided: the reader falls back to streaming by itself
    return True


ScanResult = tuple[ShardSamples, "float | None", "str | None", "str | None", bool]


def record_stored_size(url: str, scan: ShardSamples, seen: Any, compression: str | None, raw_bytes: int) -> None:
    """After streaming a shard: record the size that is stored (what stale-index checks compare)
    for a compressed object (``seen``, its ObjectInfo, where the backend gives one; else the
    ``raw_bytes`` that arrived), or check that the whole object arrived."""
    if compression is not None:
        scan.filesize = seen.size if seen is not None else raw_bytes
    elif seen is not None and seen.size != scan.filesize:
        raise TarFormatError(
            f"{url}: the object is {seen.size} bytes but {scan.filesize} arrived; it changed "
            "while being indexed or the server is broken: index it again"
        )


def scan_one(url: str) -> ScanResult:
    local = _strip_file_scheme(url)
    if _is_local(local):
        with open(local, "rb") as f:
            st = os.fstat(f.fileno())
            stream, compression = decompressed(f, url)
            if compression is None:
                return scan_shard(stream, url, filesize=st.st_size), st.st_mtime, None, None, True
            scan = scan_shard(stream, url)  # offsets are in the decompressed tar
            scan.filesize = st.st_size  # what is on disk: stale-index checks compare it
            return scan, st.st_mtime, None, compression, True
    raw, seen = backend_for(url).stream(url)  # object stores, HTTP, pipe: one sequential read
    try:
        counted = _CountingReader(raw)
        stream, compression = decompressed(counted, url)  # type: ignore[arg-type]
        scan = scan_shard(stream, url)
        record_stored_size(url, scan, seen, compression, counted.count)
        return scan, None, None if seen is None else seen.etag, compression, serves_ranges(url, scan, compression)
    finally:
        if hasattr(raw, "ignore_errors"):
            raw.ignore_errors = True  # a pipe: child that is closed early is no error
        raw.close()


class DatasetIndex:
    """Shards, samples and their byte ranges; arrays are memory-mapped when loaded from disk."""

    def __init__(
        self,
        shards: list[ShardInfo],
        arrays: dict[str, np.ndarray],
        suffixes: list[str],
        path: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.shards = shards
        self.suffixes = suffixes
        self.path = path
        self._arrays = arrays
        counts = np.fromiter((s.nsamples for s in shards), dtype=np.int64, count=len(shards))
        self.shard_first = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.shard_first[1:])
        self.fingerprint = fingerprint or self._compute_fingerprint()
        self._url_lookup: dict[str, int] | None = None
        self._real_lookup: dict[str, int] | None = None
        self._base_lookup: dict[str, int] = {}
        self._keys_cache: tuple[int, list[str]] | None = None
        self._rows_cache: tuple[int, ShardRows] | None = None
        self._checked: set[int] = set()  # shards whose rows this process has checked
        self._changed: str | None = None  # why the arrays reopened by a worker are not these
        self._files: dict[str, os.stat_result] = {}  # the mapped array files as they were when opened
        self.building: Building | None = None  # set for an index built during epoch 0 (no rows yet)
        self.source_fingerprint: str | None = None  # the shard list's, for an index built from one
        self._live: dict[int, tuple[ShardRows, list[str], ShardInfo]] = {}  # while building: shards scanned here
        # (an index made in memory without the per-sample arrays, e.g. for planning benchmarks, can plan
        # but not read)
        if self._arrays is not None and set(indexcheck.DTYPES) <= set(self._arrays):
            indexcheck.check_layout(self._arrays, self.num_samples, path or "<memory>")
        elif self._arrays is not None and set(compact.ARRAYS) <= set(self._arrays):
            compact.check_layout(self._arrays, self.num_samples, self.num_shards, path or "<memory>")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_samples(self) -> int:
        return int(self.shard_first[-1])

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def nsamples(self) -> np.ndarray:
        return np.diff(self.shard_first)

    def slots(self, shard: int) -> tuple[int, int]:
        """The half-open slot range ``[lo, hi)`` of a shard."""
        return int(self.shard_first[shard]), int(self.shard_first[shard + 1])

    def shard_of_slot(self, slots: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_first, slots, side="right") - 1

    # ---- per-sample data ---------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def check_shard(self, shard: int) -> None:
        """Refuse a shard whose rows are damaged or changed (once per shard and process): see
        :mod:`infobatch_stream.indexcheck`. Every reader of a shard's rows goes through here."""
        self.rows(shard)

    def rows(self, shard: int) -> ShardRows:
        """One shard's rows (see :mod:`infobatch_stream.rows`), checked the first time a process
        asks for them; the last shard asked is kept."""
        if self._rows_cache is not None and self._rows_cache[0] == shard:
            return self._rows_cache[1]
        if self.building is not None:
            if shard not in self._live:
                raise IndexMismatchError(
                    f"shard {self.shards[shard].url} is not indexed yet: the index of {self.building.source} is "
                    "built during epoch 0 by ib.tarfile_to_samples() / ib.dataset()"
                )
            return self._live[shard][0]
        if self._changed:
            raise IndexMismatchError(self._changed)
        self._check_files()
        lo, hi = self.slots(shard)
        info = self.shards[shard]
        where = f"{self.path or '<memory>'} (shard {info.url})"
        rows = compact.rows_of(self._arrays, shard, lo, hi, where)
        if shard not in self._checked:
            indexcheck.check_shard(rows, lo, hi, info.filesize, info.compression is not None, len(self.suffixes), where)
            if info.crc is not None and indexcheck.shard_crc(rows) != info.crc:
                raise IndexMismatchError(
                    f"index {where}: the shard's rows do not match their checksum: the arrays were damaged, or "
                    "the index was rebuilt at this path after this run loaded it (restart the run), or "
                    "rebuild it with `infobatch-stream index`"
                )
            self._checked.add(shard)
        self._rows_cache = (shard, rows)
        return rows

    def shard_suffixes(self, shard: int) -> list[str]:
        """The suffix names that :meth:`rows`'s ``suffix_id`` refers to for ``shard``."""
        if self.building is not None:
            self.rows(shard)
            return self._live[shard][1]
        return self.suffixes

    def has_rows(self, shard: int) -> bool:
        """Whether :meth:`rows` can answer for ``shard`` (always, once the index is complete)."""
        return self.building is None or shard in self._live

    def adopt(
        self,
        shard: int,
        scan: ShardSamples,
        mtime: float | None = None,
        etag: str | None = None,
        compression: str | None = None,
    ) -> None:
        """Use ``scan`` as the rows of ``shard`` of an index being built (checked as a loaded
        index's rows are), and what it found of the object as the shard's entry; the few shards
        last adopted are kept."""
        info = self.shards[shard]
        if len(scan) != info.nsamples:
            source = self.building.source if self.building else "<memory>"
            raise IndexMismatchError(
                f"shard {info.url} has {len(scan)} samples but the shard list {source} says {info.nsamples}: "
                "correct its nsamples (or index the shards with `infobatch-stream index`)"
            )
        if info.filesize and scan.filesize != info.filesize:
            raise StaleIndexError(
                f"shard {info.url} is {scan.filesize} bytes, its shard list entry says {info.filesize}: "
                "correct the list"
            )
        one = from_scans([info.url], [scan], [mtime], [etag], [compression])
        while len(self._live) >= 16:
            self._live.pop(next(iter(self._live)))
        self._live[shard] = (one.rows(0), one.suffixes, replace(one.shards[0], ranges=info.ranges))

    def shard_info(self, shard: int) -> ShardInfo:
        """The shard's entry; while the index is being built, as the shard's scan found it."""
        live = self._live.get(shard)
        return live[2] if live is not None else self.shards[shard]

    def _check_files(self) -> None:
        """The mapped array files must be the ones opened: one rewritten in place (``cp``,
        ``np.save`` over it) can be shorter now, and touching its pages would kill the process
        with SIGBUS. Checked when a shard is first used; write new indexes to a new path."""
        for file, was in self._files.items():
            try:
                now = os.stat(file)
            except OSError:
                now = None
            if now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != (was.st_ino, was.st_size, was.st_mtime_ns):
                raise IndexMismatchError(
                    f"index {self.path}: array file {file} changed after the index was opened (overwritten in "
                    "place?); restart the run, and write new indexes to a new path"
                )

    def keys(self, shard: int) -> list[str]:
        """The sample keys of one shard, in tar order (cached for the last shard asked)."""
        if self._keys_cache is not None and self._keys_cache[0] == shard:
            return self._keys_cache[1]
        keys = self.rows(shard).keys()
        self._keys_cache = (shard, keys)
        return keys

    def byte_ranges(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and end offsets of each sample of a shard (headers and padding included)."""
        rows = self.rows(shard)
        return rows.start, rows.end

    # ---- URL matching ------------------------------------------------------------------------
    def shard_of_url(self, url: str) -> int:
        """Find the shard a sample's ``__url__`` names, however the user spelled the path.

        Tried in order: the URL as indexed or as an absolute path; the path with symlinks
        resolved; the file named last in a ``pipe:`` command; a basename that is unique in the
        index (shards moved elsewhere). The answer is cached per URL.
        """
        if self._url_lookup is None:
            lookup: dict[str, int] = {}
            for i, s in enumerate(self.shards):
                lookup[s.url] = i
                local = _strip_file_scheme(s.url)
                if _is_local(local):
                    lookup.setdefault(os.path.abspath(local), i)
            self._url_lookup = lookup
        hit = self._url_lookup.get(url)
        if hit is None:
            hit = self._resolve_url(url)
            self._url_lookup[url] = hit
        return hit

    def _check_same_file(self, candidate: str, shard: int) -> None:
        """A file-name match must at least have the indexed size: same-named shards of another
        split (train/ vs val/) would otherwise get this index's slots."""
        local = _strip_file_scheme(candidate)
        indexed = self.shards[shard]
        if not _is_local(_strip_file_scheme(indexed.url)) or indexed.compression is not None:
            return  # streamed when indexed: its recorded size is not a file size to compare
        expected = indexed.filesize
        if _is_local(local) and os.path.exists(local) and expected and os.path.getsize(local) != expected:
            raise IndexMismatchError(
                f"shard {candidate} has the file name of the indexed {self.shards[shard].url} but is "
                f"{os.path.getsize(local)} bytes, not {expected}: it is another shard; index it or read the indexed one"
            )

    def _resolve_url(self, url: str) -> int:
        lookup = self._url_lookup or {}
        candidates = [url]
        if url.startswith("pipe:") and url.split():
            candidates.append(url.split()[-1])
        for candidate in candidates:
            local = _strip_file_scheme(candidate)
            if _is_local(local) and os.path.abspath(local) in lookup:
                return lookup[os.path.abspath(local)]
        if self._real_lookup is None:
            self._real_lookup, self._base_lookup = {}, {}
            counts: dict[str, int] = {}
            for i, s in enumerate(self.shards):
                self._real_lookup[normalize_url(s.url)] = i
                name = os.path.basename(_strip_file_scheme(s.url))
                counts[name] = counts.get(name, 0) + 1
                self._base_lookup[name] = i
            self._base_lookup = {k: v for k, v in self._base_lookup.items() if counts[k] == 1}
        for candidate in candidates:
            hit = self._real_lookup.get(normalize_url(candidate))
            if hit is not None:
                return hit
        for candidate in candidates:
            hit = self._base_lookup.get(os.path.basename(_strip_file_scheme(candidate)))
            if hit is not None:
                self._check_same_file(candidate, hit)
                message = (
                    f"shard {url} is not at an indexed path; matched the index entry {self.shards[hit].url} "
                    "by its file name (a moved copy of the same shard)"
                )
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=4)
                return hit
        first = ", ".join(s.url for s in self.shards[:3])
        raise IndexMismatchError(
            f"shard {url!r} is not in the index {self.path or '<memory>'} ({self.num_shards} shards, e.g. {first}); "
            "index the shards you read with `infobatch-stream index` or read the shards you indexed"
        )

    # ---- identity ------------------------------------------------------------------------------
    def _compute_fingerprint(self) -> str:
        if "key_offsets" not in self._arrays:
            raise IndexMismatchError(
                f"index {self.path}: a compact index without its fingerprint is damaged; rebuild it"
            )
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(self.nsamples).tobytes())
        h.update(np.ascontiguousarray(self._arrays["key_offsets"]).tobytes())
        h.update(np.ascontiguousarray(self._arrays["keys"]).tobytes())
        return h.hexdigest()

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str, format: int = FORMAT_VERSION) -> None:
        """Write the JSON shard list and the sidecar arrays (atomically per file). ``format=1``
        writes the older int64 layout (for tools that read it; from an index built or loaded as
        format 1)."""
        if isinstance(format, bool) or format not in ARRAYS_OF_FORMAT:
            raise ValueError(f"save(format={format!r}): this version writes formats {sorted(ARRAYS_OF_FORMAT)}")
        if format == 1 and "start" not in self._arrays:
            raise ValueError("save(format=1) needs the format-1 arrays: an index built or loaded as format 1")
        path = os.path.abspath(path)
        base = os.path.dirname(path)
        sidecar = _sidecar(path)
        if format == 1:
            arrays = self._arrays
        else:
            arrays = self._arrays if "start_block" in self._arrays else compact.encode(self._arrays, self.shard_first)
            if any(s.crc is None for s in self.shards):  # an index from before the checksums: add them
                self.shards = [
                    replace(s, crc=indexcheck.shard_crc(self.rows(i))) if s.crc is None else s
                    for i, s in enumerate(self.shards)
                ]
        os.makedirs(sidecar, exist_ok=True)
        remap = any(os.path.dirname(file) == sidecar for file in self._files)  # saving over its own files
        for name in ARRAYS_OF_FORMAT[format]:
            tmp = os.path.join(sidecar, f".{name}.npy.{os.getpid()}.tmp")  # unique: ranks may save at once
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(arrays[name]))
            os.replace(tmp, os.path.join(sidecar, f"{name}.npy"))
        stale = set(_ARRAYS + compact.ARRAYS) - set(ARRAYS_OF_FORMAT[format])  # another format's, from before
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(sidecar, f"{name}.npy"))
        shardlist = []
        for s in self.shards:
            url = s.url
            local = _strip_file_scheme(url)
            if _is_local(local):
                url = os.path.relpath(os.path.abspath(local), base)
            entry = {"url": url, "nsamples": s.nsamples, "filesize": s.filesize}
            if s.mtime is not None:
                entry["mtime"] = s.mtime
            if s.etag is not None:
                entry["etag"] = s.etag
            if s.compression is not None:
                entry["compression"] = s.compression
            if not s.ranges:
                entry["ranges"] = False
            if s.crc is not None:
                entry["crc"] = s.crc
            shardlist.append(entry)
        doc = {
            "__kind__": INDEX_KIND,
            "wids_version": 1,
            "name": os.path.splitext(os.path.basename(path))[0],
            "shardlist": shardlist,
            "infobatch_stream": {
                "format": format,
                "arrays": os.path.basename(sidecar),
                "suffixes": self.suffixes,
                "nsamples": self.num_samples,
                "fingerprint": self.fingerprint,
                **({"source": self.source_fingerprint} if self.source_fingerprint else {}),
            },
        }
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
        self.path = path
        if remap:  # the files this object mapped were just replaced: map what was written
            saved = DatasetIndex.load(path, allow_pipes=True)
            self._arrays, self._files, self._rows_cache, self._keys_cache = saved._arrays, saved._files, None, None

    @classmethod
    # Long on purpose: one checked sequence over a file nobody vouched for; each step names what it refuses.
    def load(cls, path: str, *, allow_pipes: bool = False) -> DatasetIndex:
        """Open a saved index; the per-sample arrays are memory-mapped, not read (never unpickled).

        ``pipe:`` shard URLs run shell commands when read, so an index that lists them is refused
        unless ``allow_pipes=True``: pass it only for an index you (or someone you trust) built."""
        path = os.path.abspath(path)
        doc = read_json(path)
        ours = doc.get("infobatch_stream") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("__kind__") != INDEX_KIND or not isinstance(ours, dict):
            if isinstance(doc, dict) and isinstance(doc.get("shardlist"), list):
                raise IndexMismatchError(
                    f"{path} is a wids shard list, not an infobatch_stream index (it has no per-sample offsets): "
                    "pass it to InfoBatch(...) to index it during epoch 0, or build the index first with "
                    "`infobatch-stream index`"
                )
            raise IndexMismatchError(
                f"{path} is not an infobatch_stream index (a plain wids shard list has no per-sample offsets); "
                "build one with `infobatch-stream index`"
            )
        version = ours.get("format")
        if version not in ARRAYS_OF_FORMAT or isinstance(version, bool):
            raise IndexMismatchError(
                f"index {path} has format {version!r}; this version reads formats 1 and {FORMAT_VERSION}: "
                "rebuild it with `infobatch-stream index` (or upgrade infobatch_stream)"
            )
        names = ARRAYS_OF_FORMAT[version]
        shards, written = shard_entries(doc, path)
        pipes = [u for u in written if runs_command(u)]  # as written, and as WebDataset's gopen would open it
        if pipes and not allow_pipes:
            raise PermissionError(
                f"index {path} lists {len(pipes)} shard URLs that run shell commands (e.g. {pipes[0]!r}); load it with "
                "allow_pipes=True (InfoBatch(..., allow_pipes=True)) only if you trust whoever wrote it"
            )
        arrays_dir = ours.get("arrays")
        if (
            not isinstance(arrays_dir, str)
            or os.path.basename(arrays_dir) != arrays_dir
            or arrays_dir in ("", ".", "..")
        ):
            raise IndexMismatchError(
                f"index {path}: its arrays folder {arrays_dir!r} is not a folder name next to it; "
                "rebuild it with `infobatch-stream index`"
            )
        sidecar = os.path.join(os.path.dirname(path), arrays_dir)
        arrays = {}
        for name in names:
            file = os.path.join(sidecar, f"{name}.npy")
            try:
                arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise IndexMismatchError(f"index {path}: missing array file {file}; rebuild the index") from None
            except Exception as e:  # noqa: BLE001 - numpy's header parser raises many kinds (TokenError, ...)
                raise IndexMismatchError(
                    f"index {path}: array file {file} is damaged ({e}); rebuild the index"
                ) from None
        suffixes, fingerprint = ours.get("suffixes"), ours.get("fingerprint")
        if (
            not isinstance(suffixes, list)
            or not all(isinstance(x, str) for x in suffixes)
            or not (fingerprint is None or isinstance(fingerprint, str) and _is_hex(fingerprint))
        ):
            raise IndexMismatchError(f"index {path}: damaged suffix list or fingerprint; rebuild the index")
        if version >= 2 and (fingerprint is None or any(s.crc is None for s in shards)):
            raise IndexMismatchError(
                f"index {path}: a format-{version} index without its fingerprint or checksums is damaged; rebuild it"
            )
        index = cls(shards, arrays, suffixes, path=path, fingerprint=fingerprint)
        source = ours.get("source")
        index.source_fingerprint = source if isinstance(source, str) and _is_hex(source) else None
        index._files = {os.path.join(sidecar, f"{n}.npy"): os.stat(os.path.join(sidecar, f"{n}.npy")) for n in names}
        return index

    def __getstate__(self) -> dict:
        # Workers reopen a saved index by path instead of receiving its arrays through a pipe.
        state = self.__dict__.copy()
        state["_url_lookup"] = None
        state["_real_lookup"] = None
        state["_keys_cache"] = None
        state["_rows_cache"] = None
        state["_live"] = {}
        if self.path is not None and self.building is None:
            state["_arrays"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._checked, self._changed, self._files = set(), None, {}
        self.__dict__.setdefault("building", None)
        self.__dict__.setdefault("source_fingerprint", None)
        self._live = {}
        if self._arrays is None:
            # the shard list travels in the state (already accepted by whoever loaded it); the
            # arrays are reopened by path, so they must still be the ones it describes
            reopened = DatasetIndex.load(self.path, allow_pipes=True)
            if reopened.fingerprint != self.fingerprint or reopened.num_samples != self.num_samples:
                # raised when a shard is first used, inside the worker's iteration, so that the
                # DataLoader hands the message to the training process (not at unpickling)
                self._changed = (
                    f"index {self.path} changed after the training process loaded it (rebuilt while the "
                    "run is going?): a loader worker would read other samples than the plan; restart "
                    "the run, or write new indexes to a new path"
                )
            self._arrays, self._files = reopened._arrays, reopened._files


def read_json(path: str) -> Any:
    """An index or shard-list JSON, with errors that say what the file is instead and what to do."""
    if os.path.isdir(path):
        raise IndexMismatchError(
            f"{path} is a folder, not an index: build one with `infobatch-stream index '{path}/*.tar' -o "
            f"{os.path.join(path, 'index.json')}` and pass that JSON file"
        )
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"index {path} does not exist; build it with `infobatch-stream index`") from None
    except UnicodeDecodeError:
        raise IndexMismatchError(
            f"{path} is not an index JSON (binary content{', a tar shard?' if path.endswith('.tar') else ''}): "
            f"build the index with `infobatch-stream index 'shards/*.tar' -o shards/index.json` and pass "
            "that file"
        ) from None
    except json.JSONDecodeError as e:
        raise IndexMismatchError(
            f"index {path} is not valid JSON ({e}); rebuild it with `infobatch-stream index`"
        ) from None
    except RecursionError:
        raise IndexMismatchError(f"index {path} is nested too deeply to be an index; rebuild it") from None
    return doc


def _is_hex(text: str) -> bool:
    return 8 <= len(text) <= 128 and all(c in "0123456789abcdef" for c in text)


def shard_entries(doc: dict, path: str, checksums: bool = True) -> tuple[list[ShardInfo], list[str]]:
    """The shard entries of an index JSON, checked (a damaged entry is an error naming it), and
    the URLs as written (before relative paths are resolved)."""
    base = os.path.dirname(path)
    entries = doc.get("shardlist")
    if not isinstance(entries, list):
        raise IndexMismatchError(f"index {path} has no shard list; rebuild it with `infobatch-stream index`")
    shards, written = [], []
    for i, entry in enumerate(entries):
        try:
            url = entry["url"]
            nsamples, filesize = entry["nsamples"], entry.get("filesize", 0)
            mtime, etag, crc = entry.get("mtime"), entry.get("etag"), entry.get("crc")
            compression = entry.get("compression")
            if (
                not isinstance(url, str)
                or type(nsamples) is not int
                or type(filesize) is not int
                or not 0 <= nsamples < 1 << 40
                or not 0 <= filesize < 1 << 62
                or not (mtime is None or isinstance(mtime, (int, float)))
                or not (etag is None or isinstance(etag, str))
                or not (crc is None or type(crc) is int and 0 <= crc < 1 << 32)
                or compression not in (None, "gzip", "bz2", "xz")
            ):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            fix = "rebuild the index with `infobatch-stream index`" if checksums else "correct the entry"
            what = "index" if checksums else "shard list"
            raise IndexMismatchError(
                f"{what} {path}: shard entry {i} is damaged ({str(entry)[:200]}; it needs a string url and a "
                f"non-negative integer nsamples); {fix}"
            ) from None
        if len(url) > 8192 or "\0" in url:
            raise IndexMismatchError(f"{path}: shard entry {i} has an impossible URL {url[:80]!r}; correct it")
        written.append(url)
        local = _strip_file_scheme(url)
        if _is_local(local) and not os.path.isabs(local):
            url = os.path.normpath(os.path.join(base, local))
        shards.append(
            ShardInfo(url, nsamples, filesize, mtime, etag, compression, entry.get("ranges", True) is not False, crc)
        )
    with_crc = sum(s.crc is not None for s in shards)
    if 0 < with_crc < len(shards):  # a CRC removed from some entries would switch their check off
        raise IndexMismatchError(
            f"index {path}: only {with_crc} of {len(shards)} shard entries have a checksum; "
            "the index is damaged: rebuild it with `infobatch-stream index`"
        )
    if shards and not with_crc and checksums:
        log.warning(
            "index %s has no checksums (built by an earlier version): its rows get structural checks "
            "only; rebuild it with `infobatch-stream index` to have them verified",
            path,
        )
    return shards, written


def _sidecar(path: str) -> str:
    stem = path[:-5] if path.endswith(".json") else path
    return stem + ".arrays"


def from_scans(
    urls: Sequence[str],
    scans: Sequence[ShardSamples],
    mtimes: Sequence[float | None],
    etags: Sequence[str | None] | None = None,
    compressions: Sequence[str | None] | None = None,
    ranges: Sequence[bool] | None = None,
) -> DatasetIndex:
    """Assemble an index from per-shard scan results."""
    suffixes: dict[str, int] = {}
    key_parts: list[bytes] = []
    key_lengths: list[int] = []
    suffix_ids: list[int] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("start", "end", "nmembers", "data_offset", "size")}
    shards = []
    for url, scan, mtime, etag, compression, ranged in zip(
        urls,
        scans,
        mtimes,
        etags or [None] * len(urls),
        compressions or [None] * len(urls),
        ranges or [True] * len(urls),
    ):
        shards.append(ShardInfo(url, len(scan), scan.filesize, mtime, etag, compression, ranged))
        for name, arr in scan.arrays().items():
            parts[name].append(arr)
        encoded = [k.encode("utf-8", "surrogateescape") for k in scan.keys]
        key_parts.extend(encoded)
        key_lengths.extend(len(k) for k in encoded)
        suffix_ids.extend(suffixes.setdefault(s, len(suffixes)) for s in scan.suffixes)

    def cat(name: str) -> np.ndarray:
        return np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=np.int64)

    nmembers = cat("nmembers")
    member_first = np.zeros(len(nmembers) + 1, dtype=np.int64)
    np.cumsum(nmembers, out=member_first[1:])
    key_offsets = np.zeros(len(key_lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(key_lengths, dtype=np.int64), out=key_offsets[1:])
    arrays = {
        "start": cat("start"),
        "end": cat("end"),
        "member_first": member_first,
        "data_offset": cat("data_offset"),
        "size": cat("size"),
        "suffix_id": np.asarray(suffix_ids, dtype=np.int32),
        "key_offsets": key_offsets,
        "keys": np.frombuffer(b"".join(key_parts), dtype=np.uint8).copy(),
    }
    index = DatasetIndex(shards, arrays, list(suffixes))
    first = index.shard_first.tolist()
    index.shards = [
        replace(s, crc=indexcheck.shard_crc(cut_rows(arrays, first[i], first[i + 1], "<new index>")))
        for i, s in enumerate(shards)
    ]
    return index


def _scan_or_error(url: str) -> ScanResult | Exception:
    """One shard's scan, or the reason it cannot be indexed (so every bad shard can be named)."""
    try:
        return scan_one(url)
    except (TarFormatError, OSError, ValueError) as exn:  # StorageError and FileNotFoundError are OSErrors
        return exn


def _scan_remote(urls: list[str], concurrency: int) -> Iterable[ScanResult | Exception]:
    """Scan remote shards ``concurrency`` at a time on threads: the wait is the network's."""
    with ThreadPoolExecutor(max_workers=concurrency) as threads:
        yield from threads.map(_scan_or_error, urls)


def _raise_failures(failures: list[Exception], total: int) -> None:
    """One error naming every shard that could not be indexed (the first 20 in full)."""
    if not failures:
        return
    if len(failures) == 1:
        raise failures[0]
    kinds = {type(f) for f in failures}
    cls = kinds.pop() if len(kinds) == 1 else TarFormatError
    lines = "\n".join(f"  - {f}" for f in failures[:20])
    more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
    raise cls(f"{len(failures)} of {total} shards could not be indexed:\n{lines}{more}")


def build_index(
    urls: str | Iterable[str],
    output: str | None = None,
    *,
    workers: int = 1,
    progress: bool = False,
    remote_concurrency: int = 16,
) -> DatasetIndex:
    """Scan every shard's headers and build (and, with ``output``, save) the dataset index.

    ``urls`` is a WebDataset brace pattern (globs such as ``s3://bucket/prefix/*.tar`` are
    listed) or a list. Local files are scanned with seeks in ``workers`` processes; other URLs
    (object stores, HTTP, ``pipe:``) are streamed through the storage layer, ``remote_concurrency``
    at a time on threads (the wait is the network's), each object's version (ETag) recorded for
    the stale check. Shards read through obstore are indexed in a fresh interpreter
    (:mod:`infobatch_stream.remote_index`): obstore's threads would not survive the DataLoader
    forking this process later (see :mod:`infobatch_stream.storage.objstore`).
    """
    from .storage import objstore

    patterns = expand_braces(urls if isinstance(urls, str) else list(urls))
    globbing = isinstance(urls, str)
    if any(uses_obstore(u) for u in patterns) and not objstore.used_here():
        from .remote_index import index_in_subprocess

        index = index_in_subprocess(patterns, globbing, remote_concurrency, progress)
    else:
        index = _index_here(listed(patterns, globbing), workers, progress, remote_concurrency)
    if output is not None:
        index.save(output)
    return index


def _index_here(url_list: list[str], workers: int, progress: bool, remote_concurrency: int) -> DatasetIndex:
    """Scan ``url_list`` in this process (and its pools)."""
    if not url_list:
        raise ValueError("no shards to index: the URL pattern expanded to nothing")
    results: list[ScanResult | Exception]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(url_list), unit="shard", desc="indexing")
    remote = not all(_is_local(u) for u in url_list)
    if remote:
        results = []
        for r in _scan_remote(url_list, max(workers, remote_concurrency)):
            results.append(r)
            if bar:
                bar.update()
    elif workers > 1 and len(url_list) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for r in pool.map(_scan_or_error, url_list, chunksize=max(1, len(url_list) // (workers * 8))):
                results.append(r)
                if bar:
                    bar.update()
    else:
        results = []
        for url in url_list:
            results.append(_scan_or_error(url))
            if bar:
                bar.update()
    if bar:
        bar.close()
    _raise_failures([r for r in results if isinstance(r, Exception)], len(url_list))
    index = from_scans(url_list, *(list(column) for column in zip(*results)))  # type: ignore[arg-type]
    log.info("indexed %d shards, %d samples", index.num_shards, index.num_samples)
    return index
