"""An index built during the first epoch, from a wids shard list, with no separate indexing pass.

A wids shard list gives every shard's ``nsamples``: that is enough to give every sample its slot
and to plan epoch 0, which prunes nothing (no sample has a score yet). Epoch 0's readers read each
shard sequentially, as WebDataset does, and record its byte ranges on the way (local shards have
their headers scanned when opened: a seek per member); each scan is left in a folder next to the
index being built (:mod:`infobatch_stream.scanfile`). At ``set_epoch(1)`` :func:`complete` merges
them on every rank (scanning any shard no reader finished), saves the index, and every rank and
loader worker uses it from then on. The arrays are the ones ``infobatch-stream index`` writes.

Without counts the slots cannot be laid out before reading, so such a list is refused with the
command that indexes it first.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from . import distributed
from .errors import IndexMismatchError, InfoBatchError, StaleIndexError
from .index import Building, DatasetIndex, build_index, from_scans, read_json, scan_one, shard_entries
from .scanfile import Scan, ScanDir, pack, unpack
from .storage import is_local, local_path, runs_command
from .tarscan import ShardSamples, compression_of

log = logging.getLogger(__name__)


def default_output(shard_list: str) -> str:
    """Where the index built from ``shard_list`` goes by default: ``<list>.index.json`` beside it."""
    stem = shard_list[:-5] if shard_list.endswith(".json") else shard_list
    return stem + ".index.json"


def _list_fingerprint(index: DatasetIndex) -> str:
    h = hashlib.sha1(b"infobatch_stream shard list\0")
    for s in index.shards:
        h.update(s.url.encode("utf-8", "surrogateescape") + b"\0" + str(s.nsamples).encode() + b"\0")
    return h.hexdigest()


def open_index(path: str, *, output: str | None = None, allow_pipes: bool = False) -> DatasetIndex:
    """A saved index; or, for a wids shard list with ``nsamples``, the index built from it earlier
    (at ``output``) or one to build during epoch 0 (see the module docstring)."""
    path = os.path.abspath(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("shardlist"), list) or "infobatch_stream" in doc:
        if output is not None and isinstance(doc, dict) and "infobatch_stream" in doc:
            raise ValueError(f"index_path={output!r} is for a wids shard list; {path} is already an index")
        return DatasetIndex.load(path, allow_pipes=allow_pipes)
    entries = doc["shardlist"]
    if not entries:
        raise IndexMismatchError(f"shard list {path} lists no shards; list them under 'shardlist'")
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and "url" in entry and "nsamples" not in entry:
            raise IndexMismatchError(
                f"shard list {path}: entry {i} ({str(entry.get('url'))[:200]}) has no nsamples: without every "
                "shard's count the samples cannot get their slots before the shards are read; index the "
                f"shards first (`infobatch-stream index <shards> -o index.json`) and pass that index"
            )
    shards, written = shard_entries(doc, path, checksums=False)
    pipes = [u for u in written if runs_command(u)]
    if pipes and not allow_pipes:
        raise PermissionError(
            f"shard list {path} lists {len(pipes)} shard URLs that run shell commands (e.g. {pipes[0]!r}); pass "
            "allow_pipes=True only if you trust whoever wrote it"
        )
    _check_counts(path, shards)
    output = os.path.abspath(output or default_output(path))
    pending = DatasetIndex(shards, {}, [], path=path, fingerprint="0" * 40)
    pending.fingerprint = _list_fingerprint(pending)
    if pending.num_samples == 0:
        raise IndexMismatchError(f"shard list {path}: its shards hold no samples (every nsamples is 0)")
    if os.path.exists(output):
        try:
            built = DatasetIndex.load(output, allow_pipes=True)
        except IndexMismatchError as e:
            raise IndexMismatchError(
                f"{e}. (It is the index built from the shard list {path}: delete {output} and its .arrays "
                "folder, and the next run builds it again during epoch 0.)"
            ) from None
        if built.urls != pending.urls or not np.array_equal(built.nsamples, pending.nsamples):
            raise IndexMismatchError(
                f"index {output} exists but lists other shards or counts than the shard list {path}: it was built "
                "from another list; delete it (and its .arrays folder) or pass another index_path="
            )
        log.info("shard list %s: using the index built from it earlier, %s", path, output)
        built.source_fingerprint = built.source_fingerprint or pending.fingerprint
        return built
    folder = os.path.dirname(output)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"index_path={output}: its folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(
            f"the index built from {path} during epoch 0 goes to {output}, but {folder} is not writable: pass "
            "index_path= a writable place"
        )
    stem = output[:-5] if output.endswith(".json") else output
    pending.building = Building(path, output, stem + ".scans")
    os.makedirs(pending.building.scans, exist_ok=True)
    return pending


def _check_counts(path: str, shards: list) -> None:
    """Refuse counts no shard can hold (every sample takes a 512-byte header at least): the store
    and plan are sized by them before any shard is read. Local shards are checked against their
    size on disk, others against the list's ``filesize`` where it gives one."""
    for i, info in enumerate(shards):
        size = info.filesize or None
        if is_local(info.url):
            try:
                size = os.path.getsize(local_path(info.url))
            except OSError as e:
                raise FileNotFoundError(
                    f"shard list {path}: entry {i}: shard {info.url} cannot be read ({e})"
                ) from None
        if size is not None and info.nsamples * 512 > size and not _compressed(info.url):
            raise IndexMismatchError(
                f"shard list {path}: entry {i} says shard {info.url} holds {info.nsamples} samples, but it is "
                f"{size} bytes and every sample takes 512 bytes at least: correct its nsamples"
            )


def _compressed(url: str) -> bool:
    """Whether a local shard starts like a gzip, bz2 or xz stream (its tar may be far larger)."""
    if not is_local(url):
        return url.endswith((".gz", ".tgz", ".bz2", ".xz"))
    with open(local_path(url), "rb") as f:
        return compression_of(f.read(6)) is not None


def give_rows(index: DatasetIndex, shard: int, url: str) -> bool:
    """While the index is being built: give ``shard`` its rows, and True; False where the shard
    must be streamed and indexed on the way (:mod:`.streamindex`).

    A local shard gets its headers scanned now (a seek per member, as ``infobatch-stream index``
    does; cheap, and never stale). Another shard takes the scan an earlier reader left (a run
    resumed in epoch 0); a scan that does not fit the shard is dropped and the shard streamed."""
    assert index.building is not None
    info, folder = index.shards[shard], ScanDir(index.building.scans)
    if is_local(url):
        fresh = Scan(info.url, *scan_one(url))
        index.adopt(shard, fresh.samples, fresh.mtime, fresh.etag, fresh.compression)
        folder.save(shard, fresh)
        return True
    scan = folder.load(shard, info.url, info.nsamples)
    if scan is None:
        return False
    try:
        index.adopt(shard, scan.samples, scan.mtime, scan.etag, scan.compression)
    except (IndexMismatchError, StaleIndexError) as e:
        log.warning("shard scan %s does not fit its shard (%s): dropped, read again", folder.file(shard), e)
        folder.drop(shard)
        return False
    return True


def _frame(scans: dict[int, Scan]) -> np.ndarray:
    """Several scans as one byte array: per scan its shard (int64), length (int64), then its bytes."""
    parts = []
    for shard, scan in sorted(scans.items()):
        data = pack(scan)
        parts.append(np.array([shard, len(data)], dtype="<i8").tobytes() + data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def _unframe(blob: bytes, num_shards: int, where: str) -> dict[int, Scan]:
    out, pos = {}, 0
    while pos < len(blob):
        shard, length = (int(x) for x in np.frombuffer(blob, dtype="<i8", count=2, offset=pos))
        pos += 16
        if not 0 <= shard < num_shards or not 0 < length <= len(blob) - pos:
            raise IndexMismatchError(f"{where}: a damaged scan arrived while merging the index")
        out[shard] = unpack(blob[pos : pos + length], f"{where} (shard {shard})")
        pos += length
    return out


def _mine(index: DatasetIndex, rank: int, world_size: int) -> tuple[dict[int, Scan], list[str]]:
    """The scans this rank contributes: those left here for the shards this rank owns (the lowest
    rank that has one), plus the shards nobody has, scanned now (shard ``s`` by rank ``s % W``)."""
    assert index.building is not None
    folder = ScanDir(index.building.scans)
    n = index.num_shards
    masks = distributed.gather_object(np.packbits(folder.held(n)).tobytes())
    held = np.stack([np.unpackbits(np.frombuffer(m, np.uint8))[:n].astype(bool) for m in masks])
    owner = np.where(held.any(axis=0), held.argmax(axis=0), np.arange(n) % world_size)
    scans: dict[int, Scan] = {}
    missing = []
    for shard in np.flatnonzero(owner == rank).tolist():
        info = index.shards[shard]
        scan = folder.load(shard, info.url, info.nsamples) if held[rank, shard] else None
        if scan is None or not _still_fresh(scan):
            missing.append(shard)
        else:
            scans[shard] = scan
    if not missing:
        return scans, []
    unread = sum(index.shards[s].nsamples > 0 for s in missing)  # empty shards are never opened: no news
    log.log(
        logging.WARNING if unread else logging.INFO,
        "rank %d: %d shards were not indexed during epoch 0 (not read to their end by ib.tarfile_to_samples() or "
        "ib.dataset(): read through wds.tarfile_to_samples() + ib.filter(), failed, or the epoch was cut short); "
        "indexing them now",
        rank,
        len(missing),
    )
    try:
        scanned = build_index([index.shards[s].url for s in missing], progress=len(missing) > 100)
    except (InfoBatchError, OSError, ValueError) as e:
        return scans, [str(e)]
    for i, shard in enumerate(missing):
        scans[shard] = _scan_of_index(scanned, i)
    return scans, []


def _still_fresh(scan: Scan) -> bool:
    """A local shard's scan still describes the file (its size and mtime); a remote one's is
    checked by the reader against the object's size and ETag."""
    if not is_local(scan.url):
        return True
    try:
        st = os.stat(local_path(scan.url))
    except OSError:
        return False
    return st.st_size == scan.samples.filesize and st.st_mtime == scan.mtime


def _agree_on(failure: Exception | None, doing: str) -> None:
    """Raise ``failure`` on every rank if it happened on any (a collective): one rank that failed
    to save must not leave the others waiting in the next collective."""
    said = distributed.gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(r, text) for r, text in enumerate(said) if text is not None]
    if failed:
        r, text = failed[0]
        raise IndexMismatchError(f"{doing} failed on rank {r}: {text}")


def _scan_of_index(index: DatasetIndex, shard: int) -> Scan:
    """Shard ``shard`` of ``index`` as the scan that indexing it made."""
    rows, info, suffixes = index.rows(shard), index.shards[shard], index.shard_suffixes(shard)
    first = rows.member_first.tolist()
    samples = ShardSamples(
        keys=rows.keys(),
        start=rows.start.tolist(),
        end=rows.end.tolist(),
        nmembers=[b - a for a, b in zip(first[:-1], first[1:])],
        suffixes=[suffixes[i] for i in rows.suffix_id.tolist()],
        data_offset=rows.data_offset.tolist(),
        size=rows.size.tolist(),
        filesize=info.filesize,
    )
    return Scan(info.url, samples, info.mtime, info.etag, info.compression, info.ranges)


def complete(index: DatasetIndex, writer: bool) -> DatasetIndex:
    """The index being built, completed from the scans of every rank, saved and reopened (a
    collective with several ranks; ``writer``: this rank saves it, one per node)."""
    assert index.building is not None
    building = index.building
    rank, world_size = distributed.world()
    scans, errors = _mine(index, rank, world_size)
    gathered = distributed.gather_object(errors)
    failures = [e for rank_errors in gathered for e in rank_errors]
    if failures:
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise IndexMismatchError(
            f"the index of {building.source} cannot be completed: " + "; ".join(failures[:5]) + more
        )
    if world_size > 1:
        received: dict[int, bytearray] = {}

        def take(r: int, offset: int, chunk: np.ndarray) -> None:
            received.setdefault(r, bytearray()).extend(chunk.tobytes())

        distributed.all_gather_bytes(_frame(scans), take)
        scans = {}
        for r in sorted(received):
            scans.update(_unframe(bytes(received[r]), index.num_shards, f"rank {r}'s scans"))
    problems = []
    for shard, info in enumerate(index.shards):
        scan = scans.get(shard)
        if scan is None:
            problems.append(f"shard {info.url} was scanned by no rank")
        elif len(scan.samples) != info.nsamples:
            problems.append(f"shard {info.url} has {len(scan.samples)} samples, the list says {info.nsamples}")
        elif info.filesize and scan.samples.filesize != info.filesize:
            problems.append(f"shard {info.url} is {scan.samples.filesize} bytes, the list says {info.filesize}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IndexMismatchError(
            f"shard list {building.source} does not match its shards: "
            + "; ".join(problems[:5])
            + more
            + ": correct the list (or index the shards with `infobatch-stream index`)"
        )
    ordered = [scans[s] for s in range(index.num_shards)]
    built = from_scans(
        index.urls,
        [s.samples for s in ordered],
        [s.mtime for s in ordered],
        [s.etag for s in ordered],
        [s.compression for s in ordered],
        [s.ranges for s in ordered],
    )
    built.source_fingerprint = index.fingerprint
    failure = None
    try:
        if writer:
            built.save(building.output)
    except (OSError, ValueError, InfoBatchError) as e:
        failure = e
    _agree_on(failure, f"saving the index built from {building.source} at {building.output}")
    done, failure = None, None
    try:  # saved on every node before anyone opens it (the agreement above is a collective)
        done = DatasetIndex.load(building.output, allow_pipes=True)
        if done.fingerprint != built.fingerprint:
            raise IndexMismatchError(f"index {building.output} changed while it was being saved; restart the run")
    except (OSError, ValueError, InfoBatchError) as e:
        failure = e
    _agree_on(failure, f"opening the index built from {building.source} at {building.output}")
    assert done is not None
    if writer:
        ScanDir(building.scans).remove()
    log.info(
        "index of %s complete: %d shards, %d samples -> %s",
        building.source,
        done.num_shards,
        done.num_samples,
        done.path,
    )
    return done
