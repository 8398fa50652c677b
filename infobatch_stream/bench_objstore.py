"""``infobatch-stream bench --profile objectstore``: reading from object stores, where every
request waits for its first byte.

Sources, both on 127.0.0.1 in their own processes:

- ``latency``: the range server with 20 ms before each response and 50 MB/s per connection
  (``python -m infobatch_stream.rangeserver --ttfb 0.02 --bandwidth 50e6``);
- ``s3``: moto's S3 API server (``pip install 'moto[server]' boto3``), no added latency.

For 0 and 4 DataLoader workers (spawned, persistent) it times one epoch of

  (a) plain WebDataset streaming each shard (``curl`` through ``pipe:``, as WebDataset reads
      ``http://``; S3 through a presigned URL) + decode,
  (c) ``ib.shards()`` + ``ib.tarfile_to_samples()`` + decode at 0% and ~40% pruned,

with alternating repeats, and reports the epoch time, time / ideal (epoch time / (kept fraction
x (a)'s time with the same workers and source)), bytes sent / kept bytes (counted by the range
server; for S3 by the reader), requests, and the peak RSS of a loader worker.
"""

from __future__ import annotations

import io
import json
import os
import resource
import socket
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
from torch.utils.data import DataLoader

from .bench import RangeServerProcess, kept_totals, prune_scores
from .index import DatasetIndex, build_index
from .infobatch import InfoBatch

SAMPLES, SHARDS = 1024, 16


@dataclass
class Row:
    source: str
    workers: int
    pruned: float
    pipeline: str
    samples: int
    seconds: float  # median over repeats
    full_seconds: float  # median of (a) with the same source and workers
    ratio_to_ideal: float
    bytes_sent: int
    kept_bytes: int
    requests: int
    worker_peak_rss_mib: float


def _jpegs(count: int = 16, side: int = 256, quality: int = 95, seed: int = 0) -> list[bytes]:
    """Noisy JPEGs of about 60 KB (the size of the issue's measurement)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        arr = np.clip(rng.normal(128, 40, (side, side, 3)) + i, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_shards(folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"obj-{i:03d}.tar") for i in range(SHARDS)]
    if all(os.path.exists(p) for p in paths):
        return paths
    pool = _jpegs()
    with wds.ShardWriter(os.path.join(folder, "obj-%03d.tar"), maxcount=SAMPLES // SHARDS, verbose=0) as sink:
        for i in range(SAMPLES):
            sink.write({"__key__": f"s{i:06d}", "jpg": pool[i % len(pool)], "cls": str(i % 10).encode()})
    return paths


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A server in a subprocess, stopped with the bench."""

    def __init__(self, argv: list[str], ready_url: str) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).read()
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"server {argv} did not start") from None
                time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _s3_source(paths: list[str]) -> tuple[_Process, list[str], list[str]]:
    try:
        import boto3
    except ImportError:
        raise RuntimeError("the s3 source needs moto and boto3: pip install 'moto[server]' boto3") from None
    port = _port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _Process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint + "/moto-api/"
    )
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    for p in paths:
        client.upload_file(p, "bench", f"shards/{os.path.basename(p)}")
    names = [os.path.basename(p) for p in paths]
    signed = [
        client.generate_presigned_url(
            "get_object", Params={"Bucket": "bench", "Key": f"shards/{n}"}, ExpiresIn=6 * 3600
        )
        for n in names
    ]
    return server, [f"s3://bench/shards/{n}" for n in names], signed


def _peak_rss(src: Any) -> Any:
    """A last stage that tags each sample with this process's peak RSS (KiB)."""
    for sample in src:
        yield sample, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _tail() -> list[Any]:
    return [wds.decode("rgb8"), wds.to_tuple("jpg", "cls"), _peak_rss]


def _loader(pipeline: Any, workers: int) -> DataLoader:
    kw: dict[str, Any] = {"multiprocessing_context": "spawn", "persistent_workers": True} if workers else {}
    return DataLoader(pipeline, batch_size=None, num_workers=workers, **kw)


# Long on purpose: the alternating measurement loop is kept in one piece so its order is visible.
def _bench_source(
    source: str,
    read_urls: list[str],
    plain_urls: list[str],
    index: DatasetIndex,
    repeats: int,
    stats: Callable[[], dict[str, int]] | None,
    reset: Callable[[], None] | None,
    progress: bool,
) -> list[Row]:
    rows: list[Row] = []
    for workers in (4, 0):  # spawned workers first: nothing forks after this process used obstore
        setups: dict[str, tuple[InfoBatch | None, Any, int, int]] = {}
        plain = wds.DataPipeline(
            wds.SimpleShardList([f"pipe:curl -s -f '{u}'" for u in plain_urls]),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            *_tail(),
        )
        setups["(a) wds"] = (None, _loader(plain, workers), sum(s.filesize for s in index.shards), index.num_samples)
        for label, pruned in (("(c) ib, 0%", False), ("(c) ib, ~40%", True)):
            ib = InfoBatch(index, num_epochs=10, prune_ratio=0.5, delta=1.0)
            if pruned:
                prune_scores(ib, 0.8)
            ib.set_epoch(1)
            pipe = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), *_tail())
            setups[label] = (ib, _loader(pipe, workers), *kept_totals(ib))
        times: dict[str, list[float]] = {k: [] for k in setups}
        sent: dict[str, int] = {}
        requests: dict[str, int] = {}
        rss: dict[str, float] = {}
        counts: dict[str, int] = {}
        for maybe_ib, loader, _, _ in setups.values():  # warm: workers started, connections open
            if maybe_ib is not None:
                maybe_ib.set_epoch(1)
            sum(1 for _ in loader)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=repeats * len(setups), desc=f"objectstore/{source}/{workers}w", unit="epoch", leave=False)
        for rep in range(repeats):
            order = list(setups) if rep % 2 == 0 else list(setups)[::-1]
            for label in order:
                maybe_ib, loader, _, _ = setups[label]
                if maybe_ib is not None:
                    maybe_ib.set_epoch(1)
                if reset:
                    reset()
                t0 = time.perf_counter()
                n, peak = 0, 0
                for _, kib in loader:
                    n += 1
                    peak = max(peak, kib)
                times[label].append(time.perf_counter() - t0)
                counts[label], rss[label] = n, max(rss.get(label, 0.0), peak / 1024)
                if stats:
                    served = stats()
                    sent[label], requests[label] = served["bytes"], served["requests"]
                elif maybe_ib is not None:
                    io_stats = maybe_ib.stats()[-1]
                    sent[label], requests[label] = io_stats["bytes_read"], io_stats["requests"]
                else:
                    sent[label], requests[label] = sum(s.filesize for s in index.shards), index.num_shards
                if bar:
                    bar.update()
        if bar:
            bar.close()
        full = statistics.median(times["(a) wds"])
        for label, (_, _, kept_bytes, kept) in setups.items():
            secs = statistics.median(times[label])
            rows.append(
                Row(
                    source,
                    workers,
                    round(1 - kept / index.num_samples, 4),
                    label,
                    counts[label],
                    secs,
                    full,
                    secs / (full * counts[label] / index.num_samples),
                    sent[label],
                    kept_bytes,
                    requests[label],
                    rss[label],
                )
            )
        del setups  # persistent workers end here
    return rows


def run(
    out: str = "bench_out", repeats: int = 3, sources: tuple[str, ...] = ("latency", "s3"), progress: bool = True
) -> list[Row]:
    paths = write_shards(os.path.join(out, "objectstore"))
    rows: list[Row] = []
    if "latency" in sources:
        server = RangeServerProcess(os.path.dirname(paths[0]), "--ttfb", "0.02", "--bandwidth", "50e6")
        urls = [f"{server.url}/{os.path.basename(p)}" for p in paths]
        try:
            index = build_index(urls, os.path.join(out, "objectstore", "index-latency.json"))
            rows += _bench_source("latency", urls, urls, index, repeats, server.stats, server.reset, progress)
        finally:
            server.close()
    if "s3" in sources:
        s3, urls, plain = _s3_source(paths)
        try:
            index = build_index(urls, os.path.join(out, "objectstore", "index-s3.json"))
            rows += _bench_source("s3", urls, plain, index, repeats, None, None, progress)
        finally:
            s3.close()
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [
        "| source | workers | pruned | pipeline | samples | epoch (s) | time / ideal | sent / kept bytes | "
        "requests | worker peak RSS (MiB) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} | {r.workers} | {100 * r.pruned:.0f}% | {r.pipeline} | {r.samples:,} | "
            f"{r.seconds:.3f} | {r.ratio_to_ideal:.3f} | {r.bytes_sent / max(r.kept_bytes, 1):.3f} | "
            f"{r.requests:,} | {r.worker_peak_rss_mib:.0f} |"
        )
    return "\n".join(lines)


def main(out: str, repeats: int, json_path: str | None, progress: bool) -> list[Row]:
    rows = run(out, repeats, progress=progress)
    print(format_rows(rows))
    print(
        f"medians of {repeats} alternating repeats; time / ideal = epoch time / (kept fraction x (a)'s epoch time, "
        "same source and workers); 'latency' = 20 ms to first byte, 50 MB/s per connection; bytes counted by the "
        "range server (latency) or the reader (s3)"
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows
