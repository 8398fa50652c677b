"""How large a dataset index is on disk, how fast it opens, and what it costs in memory.

Builds a synthetic index (default 10,000 shards x 1,000 samples; ``--members 3`` for
img2dataset's ``.jpg``/``.txt``/``.json`` layout, 2 for ``.jpg``/``.cls``) by constructing its
arrays directly -- no tar files are written -- saves it in both formats (1: int64 arrays, the
layout before the compact format; 2: compact), then for each, in a fresh Python process, times
``DatasetIndex.load``, the peak-RSS increase it causes, ``keys(shard)`` and ``rows(shard)`` of
random shards and ``shard_of_url`` (first call, which builds the URL table, and later calls).

    python benchmarks/index_load.py --members 3                  # 10M samples in a temporary folder
    python benchmarks/index_load.py --members 3 --shards 100000 --json   # 100M, machine-readable

The page cache is warm (the files were just written): this measures the open, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KEY_DIGITS = 6  # keys look like "00042/000123": shard/sample, 12 bytes


def build(path: str, num_shards: int, per_shard: int, members: int) -> dict:
    """Write a synthetic index of ``num_shards * per_shard`` samples to ``path`` (format 2) and
    beside it (``-v1.json``, format 1)."""
    from dataclasses import replace

    import numpy as np

    from infobatch_stream.index import DatasetIndex, ShardInfo
    from infobatch_stream.indexcheck import shard_crc
    from infobatch_stream.rows import cut_rows

    t0 = time.perf_counter()
    n = num_shards * per_shard
    bodies = [2048, 512, 1024][:members]  # jpg, then txt or cls, then json (padded sizes)
    sizes = [2000, 3, 700][:members]
    sample_span = sum(512 + b for b in bodies)
    pos = np.tile(np.arange(per_shard, dtype=np.int64) * sample_span, num_shards)
    start = pos
    end = pos + sample_span
    data_offset = np.empty(n * members, dtype=np.int64)
    size = np.empty(n * members, dtype=np.int64)
    at = 0
    for m in range(members):
        data_offset[m::members] = pos + at + 512
        size[m::members] = sizes[m]
        at += 512 + bodies[m]
    del pos
    suffix_id = np.tile(np.arange(members, dtype=np.int32), n)
    member_first = np.arange(n + 1, dtype=np.int64) * members
    digits = np.frombuffer(b"0123456789", dtype=np.uint8)

    def fixed(numbers: np.ndarray, width: int) -> np.ndarray:
        powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
        return digits[(numbers[:, None] // powers) % 10]

    shard_part = np.concatenate(
        [fixed(np.arange(num_shards), KEY_DIGITS - 1), np.full((num_shards, 1), ord("/"), dtype=np.uint8)], axis=1
    )
    sample_part = fixed(np.arange(per_shard), KEY_DIGITS)
    key_len = 2 * KEY_DIGITS
    keys = np.empty((num_shards, per_shard, key_len), dtype=np.uint8)
    keys[:, :, :KEY_DIGITS] = shard_part[:, None, :]
    keys[:, :, KEY_DIGITS:] = sample_part[None, :, :]
    keys = keys.reshape(-1)
    key_offsets = np.arange(n + 1, dtype=np.int64) * key_len
    folder = os.path.dirname(os.path.abspath(path))
    shards = [
        ShardInfo(os.path.join(folder, "shards", f"train-{s:05d}.tar"), per_shard, per_shard * sample_span + 1024, None)
        for s in range(num_shards)
    ]
    arrays = {
        "start": start,
        "end": end,
        "member_first": member_first,
        "data_offset": data_offset,
        "size": size,
        "suffix_id": suffix_id,
        "key_offsets": key_offsets,
        "keys": keys,
    }
    index = DatasetIndex(shards, arrays, ["jpg", "txt", "json"][:members])
    first = index.shard_first.tolist()  # per-shard checksums, as `infobatch-stream index` records them
    index.shards = [
        replace(info, crc=shard_crc(cut_rows(arrays, first[i], first[i + 1], path))) for i, info in enumerate(shards)
    ]
    index.save(old_path(path), format=1)
    t1 = time.perf_counter()
    index.save(path)
    t2 = time.perf_counter()
    out = {"shards": num_shards, "samples": n, "members": members, "build_s": t1 - t0, "save_s": t2 - t1}
    for version, file in ((2, path), (1, old_path(path))):
        sidecar = file[:-5] + ".arrays"
        arrays_bytes = sum(os.path.getsize(os.path.join(sidecar, f)) for f in os.listdir(sidecar))
        key_bytes = os.path.getsize(os.path.join(sidecar, "keys.npy")) - 128  # minus the .npy header
        out[f"v{version}"] = {
            "json_bytes": os.path.getsize(file),
            "arrays_bytes": arrays_bytes,
            "bytes_per_sample": arrays_bytes / n,
            "key_bytes_per_sample": key_bytes / n,
            "bytes_per_sample_without_keys": (arrays_bytes - key_bytes) / n,
        }
    return out


def old_path(path: str) -> str:
    return path[:-5] + "-v1.json"


def rss_kib() -> dict[str, int]:
    """Resident memory in KiB: total, anonymous (private heap) and file-backed (mapped page cache)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0])
    return out


def child(path: str, probes: int, seed: int) -> dict:
    """Runs in a fresh interpreter: everything measured here starts cold in this process.

    Its parent stays small (the arrays are built in another process): on Linux a child's
    ``ru_maxrss`` starts from the peak of the process that started it.
    """
    t0 = time.perf_counter()
    import pickle

    from infobatch_stream.index import DatasetIndex

    t_import = time.perf_counter() - t0
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rss0 = rss_kib()
    t0 = time.perf_counter()
    index = DatasetIndex.load(path)
    t_load = time.perf_counter() - t0
    peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss1 = rss_kib()
    t0 = time.perf_counter()
    DatasetIndex.load(path)
    t_load_again = time.perf_counter() - t0
    rng = random.Random(seed)
    shards = [rng.randrange(index.num_shards) for _ in range(probes)]
    key_times, row_times = [], []
    for shard in shards:
        t0 = time.perf_counter()
        index.rows(shard)  # first use of the shard: cut or decoded, and checked (structure, CRC)
        row_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        keys = index.keys(shard)
        key_times.append(time.perf_counter() - t0)
        assert len(keys) == index.nsamples[shard]
        assert keys[0] == f"{shard:0{KEY_DIGITS - 1}d}/{0:0{KEY_DIGITS}d}", keys[0]
    urls = [index.urls[s] for s in shards]
    t0 = time.perf_counter()
    assert index.shard_of_url(urls[0]) == shards[0]
    t_url_first = time.perf_counter() - t0
    url_times = []
    for url, shard in zip(urls, shards):
        spelled = "file:" + url  # a spelling that is not the stored one: exercises normalization
        t0 = time.perf_counter()
        found = index.shard_of_url(spelled)
        url_times.append(time.perf_counter() - t0)
        assert found == shard
    peak2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss2 = rss_kib()
    return {
        "import_s": t_import,
        "load_s": t_load,
        "load_again_s": t_load_again,
        "baseline_peak_rss_mib": peak0 / 1024,
        "load_peak_rss_increase_mib": (peak1 - peak0) / 1024,
        "load_rss_increase_mib": (rss1["VmRSS"] - rss0["VmRSS"]) / 1024,
        "load_anon_increase_mib": (rss1["RssAnon"] - rss0["RssAnon"]) / 1024,
        "probes_anon_increase_mib": (rss2["RssAnon"] - rss0["RssAnon"]) / 1024,
        "probes_file_increase_mib": (rss2["RssFile"] - rss0["RssFile"]) / 1024,
        "peak_rss_increase_after_probes_mib": (peak2 - peak0) / 1024,
        "rows_median_s": statistics.median(row_times),
        "keys_median_s": statistics.median(key_times),
        "keys_max_s": max(key_times),
        "shard_of_url_first_s": t_url_first,
        "shard_of_url_median_s": statistics.median(url_times),
        "pickle_bytes": len(pickle.dumps(index)),
        "num_shards": index.num_shards,
        "num_samples": index.num_samples,
    }


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--per-shard", type=int, default=1_000)
    ap.add_argument("--members", type=int, choices=(2, 3), default=3, help="members per sample")
    ap.add_argument("--probes", type=int, default=20, help="random shards for keys() and shard_of_url()")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="where to write the index (default: a temporary folder, removed after)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        print(json.dumps(build(args.build, args.shards, args.per_shard, args.members)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.probes, args.seed)))
        return 0
    folder = args.dir or tempfile.mkdtemp(prefix="index-load-")
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "index.json")
        me = [sys.executable, os.path.abspath(__file__)]
        build_args = ["--shards", str(args.shards), "--per-shard", str(args.per_shard), "--members", str(args.members)]
        result = _run(me + ["--build", path, *build_args])
        for version, file in ((2, path), (1, old_path(path)), (2, path), (1, old_path(path))):  # interleaved
            measured = _run(me + ["--child", file, "--probes", str(args.probes), "--seed", str(args.seed)])
            result.setdefault(f"v{version}", {}).setdefault("runs", []).append(measured)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    for version in (1, 2):
        runs = result[f"v{version}"].pop("runs")
        result[f"v{version}"].update({k: min(r[k] for r in runs) if k.endswith("_s") else runs[-1][k] for k in runs[0]})
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(table(result, args.probes))
    return 0


def _run(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(result: dict, probes: int) -> str:
    """Format 1 against format 2, one row per figure (times: the better of two fresh processes)."""
    v1, v2 = result["v1"], result["v2"]

    def row(name: str, f) -> str:  # type: ignore[no-untyped-def]
        return f"| {name} | {f(v1)} | {f(v2)} |"

    lines = [
        f"{result['shards']:,} shards, {result['samples']:,} samples of {result['members']} members",
        "",
        "| | format 1 (int64) | format 2 (compact) |",
        "| --- | ---: | ---: |",
        row("arrays on disk", lambda v: f"{v['arrays_bytes'] / 2**20:,.0f} MiB"),
        row("bytes per sample, without keys", lambda v: f"{v['bytes_per_sample_without_keys']:.1f}"),
        row("key bytes per sample", lambda v: f"{v['key_bytes_per_sample']:.2f}"),
        row("JSON", lambda v: f"{v['json_bytes'] / 2**20:.2f} MiB"),
        row("`DatasetIndex.load`, first / again", lambda v: f"{fmt_time(v['load_s'])} / {fmt_time(v['load_again_s'])}"),
        row("memory added by the load", lambda v: f"{v['load_rss_increase_mib']:.1f} MiB"),
        row(
            f"`rows(shard)` first use (decode, checks, CRC), median of {probes}",
            lambda v: fmt_time(v["rows_median_s"]),
        ),
        row(f"`keys(shard)` median of {probes}", lambda v: fmt_time(v["keys_median_s"])),
        row(
            "`shard_of_url`, first call / later",
            lambda v: f"{fmt_time(v['shard_of_url_first_s'])} / {fmt_time(v['shard_of_url_median_s'])}",
        ),
        row("pickled index (what a spawned worker receives)", lambda v: f"{v['pickle_bytes'] / 1024:,.0f} KiB"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
