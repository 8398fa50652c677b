"""How fast a large dataset index opens, and what it costs in memory.

Builds a synthetic index (default 10,000 shards x 1,000 samples, two members per sample) by
constructing its arrays directly -- no tar files are written -- saves it, then in a fresh Python
process times ``DatasetIndex.load``, the peak-RSS increase it causes, ``keys(shard)`` of random
shards and ``shard_of_url`` (first call, which builds the URL table, and later calls).

    python benchmarks/index_load.py                      # 10,000 x 1,000 in a temporary folder
    python benchmarks/index_load.py --shards 1000 --json # smaller, machine-readable

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


def build(path: str, num_shards: int, per_shard: int) -> dict:
    """Write a synthetic index of ``num_shards * per_shard`` samples to ``path``."""
    import numpy as np

    from infobatch_stream.index import DatasetIndex, ShardInfo

    t0 = time.perf_counter()
    n = num_shards * per_shard
    members_per_sample = 2  # .jpg and .cls
    sample_span = 512 + 2048 + 512 + 512  # header, jpg body, header, cls body
    pos = np.tile(np.arange(per_shard, dtype=np.int64) * sample_span, num_shards)
    start = pos
    end = pos + sample_span
    data_offset = np.empty(n * members_per_sample, dtype=np.int64)
    data_offset[0::2] = pos + 512
    data_offset[1::2] = pos + 512 + 2048 + 512
    size = np.empty(n * members_per_sample, dtype=np.int64)
    size[0::2] = 2000
    size[1::2] = 3
    suffix_id = np.tile(np.array([0, 1], dtype=np.int32), n)
    member_first = np.arange(n + 1, dtype=np.int64) * members_per_sample
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
    index = DatasetIndex(shards, arrays, ["jpg", "cls"])
    t1 = time.perf_counter()
    index.save(path)
    t2 = time.perf_counter()
    disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(folder) for f in fs)
    return {
        "shards": num_shards,
        "samples": n,
        "build_s": t1 - t0,
        "save_s": t2 - t1,
        "disk_bytes": disk,
        "json_bytes": os.path.getsize(path),
    }


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
    key_times = []
    for shard in shards:
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
    ap.add_argument("--probes", type=int, default=20, help="random shards for keys() and shard_of_url()")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="where to write the index (default: a temporary folder, removed after)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        print(json.dumps(build(args.build, args.shards, args.per_shard)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.probes, args.seed)))
        return 0
    folder = args.dir or tempfile.mkdtemp(prefix="index-load-")
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "index.json")
        me = [sys.executable, os.path.abspath(__file__)]
        results = []
        for extra in (
            ["--build", path, "--shards", str(args.shards), "--per-shard", str(args.per_shard)],
            ["--child", path, "--probes", str(args.probes), "--seed", str(args.seed)],
        ):
            done = subprocess.run(me + extra, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return done.returncode
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        built, measured = results
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    result = {**built, **measured}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    rows = [
        ("index", f"{result['shards']:,} shards, {result['samples']:,} samples"),
        (
            "on disk (JSON + arrays)",
            f"{result['disk_bytes'] / 2**20:,.1f} MiB (JSON {result['json_bytes'] / 2**20:.2f} MiB)",
        ),
        ("build arrays / save", f"{result['build_s']:.2f} s / {result['save_s']:.2f} s"),
        ("import infobatch_stream (child)", f"{result['import_s']:.2f} s"),
        ("DatasetIndex.load, first / again", f"{fmt_time(result['load_s'])} / {fmt_time(result['load_again_s'])}"),
        ("peak RSS before load (after imports)", f"{result['baseline_peak_rss_mib']:.1f} MiB"),
        ("peak RSS increase, load", f"{result['load_peak_rss_increase_mib']:.1f} MiB"),
        (
            "RSS increase, load (of it anonymous)",
            f"{result['load_rss_increase_mib']:.1f} MiB ({result['load_anon_increase_mib']:.1f} MiB)",
        ),
        ("peak RSS increase, load + probes", f"{result['peak_rss_increase_after_probes_mib']:.1f} MiB"),
        (
            "  of it anonymous / mapped page cache",
            f"{result['probes_anon_increase_mib']:.1f} MiB / {result['probes_file_increase_mib']:.1f} MiB",
        ),
        (
            f"keys(random shard), median / max of {args.probes}",
            f"{fmt_time(result['keys_median_s'])} / {fmt_time(result['keys_max_s'])}",
        ),
        ("shard_of_url, first call (builds table)", fmt_time(result["shard_of_url_first_s"])),
        ("shard_of_url, later calls (median)", fmt_time(result["shard_of_url_median_s"])),
        ("pickle of loaded index", f"{result['pickle_bytes'] / 1024:,.1f} KiB"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
