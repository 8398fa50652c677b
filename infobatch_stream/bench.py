"""``infobatch-stream bench``: the skip-aware reader against plain WebDataset on the same shards.

For each profile (ImageNet-like ~100 KB JPEGs, CIFAR-like ~3 KB JPEGs) and source (local files,
an HTTP server with Range support on 127.0.0.1 in its own process), it times in one run, with
alternating repeats, one pass of

  (a) ``wds.tarfile_to_samples()`` + decode             (plain WebDataset)
  (b) ``wds.tarfile_to_samples()`` + ``ib.filter()`` + decode
  (c) ``ib.tarfile_to_samples()`` + decode              (reads only kept bytes)

at 0% pruned and at about 40% pruned, in the main process (no DataLoader: the figures are the
pipeline's own). Bytes are counted by the reader for local files and by the server over HTTP.
"""

from __future__ import annotations

import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import webdataset as wds

from .index import DatasetIndex, build_index
from .infobatch import InfoBatch

log = logging.getLogger(__name__)

PROFILES = {
    # name: (side, jpeg quality, noise, samples, shards)
    "imagenet": (344, 92, 50, 1000, 8),
    "cifar": (32, 100, 80, 12000, 8),
}


@dataclass
class Result:
    profile: str
    source: str
    pruned: float  # planned pruned fraction
    pipeline: str
    samples: int
    seconds: float  # median over repeats
    samples_per_s: float
    bytes_read: int
    kept_bytes: int
    full_seconds: float  # median of (a) at the same profile and source
    ratio_to_ideal: float  # seconds / (kept fraction x full seconds)
    throughput_vs_plain: float  # samples/s relative to (a)
    requests: int


def _jpeg_pool(side: int, quality: int, noise: float, count: int = 32, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    pool = []
    for i in range(count):
        base = np.stack(
            [np.sin(x / (11 + i % 7) + c) * 60 + np.cos(y / (19 + i % 5) - c) * 60 + 128 for c in range(3)], -1
        )
        arr = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        pool.append(buf.getvalue())
    return pool


def write_profile(out: str, profile: str) -> list[str]:
    side, quality, noise, samples, shards = PROFILES[profile]
    folder = os.path.join(out, profile)
    urls = [os.path.join(folder, f"{profile}-{i:03d}.tar") for i in range(shards)]
    if all(os.path.exists(u) for u in urls) and os.path.exists(os.path.join(folder, "index.json")):
        return urls
    os.makedirs(folder, exist_ok=True)
    pool = _jpeg_pool(side, quality, noise)
    per_shard = -(-samples // shards)
    with wds.ShardWriter(os.path.join(folder, f"{profile}-%03d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(samples):
            sink.write({"__key__": f"{profile}{i:07d}", "jpg": pool[i % len(pool)], "cls": str(i % 1000).encode()})
    build_index(urls, os.path.join(folder, "index.json"))
    return urls


class RangeServerProcess:
    """``python -m infobatch_stream.rangeserver ROOT [options]`` in a subprocess."""

    def __init__(self, root: str, *options: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infobatch_stream.rangeserver", root, *options], stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        self.url = line.strip().rsplit(" ", 1)[-1]
        if not self.url.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"range server did not start: {line!r}")

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/__stats__") as r:
            return json.load(r)

    def reset(self) -> None:
        urllib.request.urlopen(self.url + "/__reset__").read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def prune_scores(ib: InfoBatch, well_learned: float, seed: int = 1) -> None:
    """Mark a random ``well_learned`` share as low-loss: r x that share gets pruned."""
    rng = np.random.default_rng(seed)
    ib.store.scores[:] = np.where(rng.random(len(ib.store)) < well_learned, 0.0, 1.0).astype(np.float32)


def kept_totals(ib: InfoBatch) -> tuple[int, int]:
    """Bytes and count of the samples the published epoch keeps (what the reader should read)."""
    index, kept_bytes, kept = ib.index, 0, 0
    thresh = ib.control.threshold
    for shard in range(index.num_shards):
        keep, _ = ib.decide_shard(shard, ib.epoch, thresh)
        start, end = index.byte_ranges(shard)
        kept_bytes += int((end - start)[keep].sum())
        kept += int(keep.sum())
    return kept_bytes, kept


def _decode_tail() -> list[Any]:
    return [wds.decode("rgb8"), wds.to_tuple("jpg", "cls")]


def _pipelines(urls: list[str], ib: InfoBatch) -> dict[str, Callable[[], Any]]:
    return {
        "(a) wds": lambda: wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), *_decode_tail()),
        "(b) wds + ib.filter": lambda: wds.DataPipeline(
            wds.SimpleShardList(urls), wds.tarfile_to_samples(), ib.filter(), *_decode_tail()
        ),
        "(c) ib reader": lambda: wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples(), *_decode_tail()),
    }


def run_bench(
    out: str = "bench_out",
    profiles: tuple[str, ...] = ("imagenet", "cifar"),
    repeats: int = 5,
    well_learned: float = 0.8,
    http: bool = True,
    progress: bool = True,
) -> list[Result]:
    """Time every (profile, source, pruning, pipeline) cell, alternating repeats; medians."""
    results: list[Result] = []
    for profile in profiles:
        urls = write_profile(out, profile)
        folder = os.path.dirname(urls[0])
        sources: list[tuple[str, list[str], str, RangeServerProcess | None]] = [
            ("local", urls, os.path.join(folder, "index.json"), None)
        ]
        server = None
        if http:
            server = RangeServerProcess(folder)
            http_urls = [f"{server.url}/{os.path.basename(u)}" for u in urls]
            http_index = os.path.join(folder, "index-http.json")  # rebuilt: the server's port is new each run
            build_index(http_urls, http_index)
            sources.append(("http", http_urls, http_index, server))
        try:
            for source, src_urls, index_path, srv in sources:
                results.extend(
                    _bench_source(
                        profile, source, src_urls, DatasetIndex.load(index_path), srv, repeats, well_learned, progress
                    )
                )
        finally:
            if server:
                server.close()
    return results


BLOCK = 8  # the block size of the granularity row


# Long on purpose: the alternating measurement loop is kept in one piece so its order is visible.
def _bench_source(
    profile: str,
    source: str,
    urls: list[str],
    index: DatasetIndex,
    server: RangeServerProcess | None,
    repeats: int,
    well_learned: float,
    progress: bool,
) -> list[Result]:
    # setup label -> (InfoBatch, pipelines, kept bytes, kept samples); (a) of "0%" is the full epoch
    setups: dict[str, tuple[InfoBatch, dict[str, Callable[[], Any]], int, int]] = {}
    for label, share, block in (("0%", 0.0, 1), ("40%", well_learned, 1), (f"40% k={BLOCK}", well_learned, BLOCK)):
        ib = InfoBatch(index, num_epochs=10, prune_ratio=0.5, delta=1.0, granularity=block)
        if share:
            prune_scores(ib, share)
        ib.set_epoch(1)
        pipes = _pipelines(urls, ib)
        if block > 1:  # only the reader differs: blocks of k pruned together
            pipes = {f"(c) ib reader, blocks of {block}": pipes["(c) ib reader"]}
        setups[label] = (ib, pipes, *kept_totals(ib))
    times: dict[tuple[str, str], list[float]] = {}
    nbytes: dict[tuple[str, str], int] = {}
    nreq: dict[tuple[str, str], int] = {}
    counts: dict[tuple[str, str], int] = {}
    cells = [(label, name) for label in setups for name in setups[label][1]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=repeats * len(cells), desc=f"{profile}/{source}", unit="pass", leave=False)
    for make in setups["0%"][1].values():  # warm the page cache, the server and the imports
        setups["0%"][0].set_epoch(1)
        sum(1 for _ in make())
    for rep in range(repeats):
        order = cells if rep % 2 == 0 else cells[::-1]  # alternate to spread drift evenly
        for cell in order:
            ib, pipes = setups[cell[0]][0], setups[cell[0]][1]
            ib.set_epoch(1)  # a fresh pass of the same epoch: same plan, counters reset
            if server:
                server.reset()
            start = time.perf_counter()
            n = sum(1 for _ in pipes[cell[1]]())
            times.setdefault(cell, []).append(time.perf_counter() - start)
            counts[cell] = n
            if server:
                served = server.stats()
                nbytes[cell], nreq[cell] = served["bytes"], served["requests"]
            elif cell[1].startswith("(c)"):
                io = ib.stats()[-1]
                nbytes[cell], nreq[cell] = io["bytes_read"], io["requests"]
            else:
                nbytes[cell] = sum(s.filesize for s in index.shards)  # tarfile streams every byte
                nreq[cell] = index.num_shards
            if bar:
                bar.update()
    if bar:
        bar.close()
    out = []
    full = statistics.median(times[("0%", "(a) wds")])
    total = index.num_samples
    for cell in cells:
        label, name = cell
        _, _, kept_bytes, kept = setups[label]
        plain_cell = (label if (label, "(a) wds") in times else "40%", "(a) wds")
        secs = statistics.median(times[cell])
        plain = statistics.median(times[plain_cell])
        n = counts[cell]
        ideal = (n / total) * full
        out.append(
            Result(
                profile,
                source,
                round(1 - kept / total, 4),
                name,
                n,
                secs,
                n / secs,
                nbytes[cell],
                kept_bytes,
                full,
                secs / ideal,
                (n / secs) / (counts[plain_cell] / plain),
                nreq[cell],
            )
        )
    return out


def format_results(results: list[Result]) -> str:
    lines = [
        "| profile | source | pruned | pipeline | samples | epoch (s) | samples/s | vs (a) | time / ideal | MB read "
        "| read / kept bytes | requests |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.profile} | {r.source} | {100 * r.pruned:.0f}% | {r.pipeline} | {r.samples:,} | {r.seconds:.3f} | "
            f"{r.samples_per_s:,.0f} | {r.throughput_vs_plain:.3f} | {r.ratio_to_ideal:.3f} | "
            f"{r.bytes_read / 1e6:.1f} | "
            f"{r.bytes_read / max(r.kept_bytes, 1):.3f} | {r.requests:,} |"
        )
    return "\n".join(lines)


def main_bench(
    out: str, profiles: tuple[str, ...], repeats: int, http: bool, json_path: str | None, progress: bool
) -> list[Result]:
    results = run_bench(out, profiles, repeats, http=http, progress=progress)
    print(format_results(results))
    print(
        "(a) plain WebDataset, (b) + ib.filter(), (c) ib.tarfile_to_samples(); medians of "
        f"{repeats} alternating repeats. time / ideal = epoch time / (kept fraction x (a)'s epoch time); "
        "read / kept bytes counts what the reader (local) or the server (HTTP) reports."
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return results
