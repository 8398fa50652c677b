"""Bytes and time of a run started from a wids shard list (indexed during epoch 0) against one
that runs ``infobatch-stream index`` first, over the object-store bench's latency server
(20 ms to first byte, 50 MB/s per connection; bytes counted by the server).

    python benchmarks/first_epoch_index.py [--epochs 4] [--workers 4 3] [--json out.json]

Both runs train the same epochs with the same per-sample pseudo-loss, so they plan the same
epochs: the difference in bytes is the indexing pass, plus what the list run streams twice
where a shard is cut between two readers (3 workers over 16 shards of 64 cut some).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infobatch_stream import META_KEY, InfoBatch, build_index  # noqa: E402
from infobatch_stream.bench import RangeServerProcess  # noqa: E402
from infobatch_stream.bench_objstore import SAMPLES, write_shards  # noqa: E402


def pseudo_loss(meta: torch.Tensor) -> torch.Tensor:
    slots = torch.as_tensor(meta)[:, 0].to(torch.int64)
    return ((slots * 2654435761) % 1000).to(torch.float32) / 1000.0


def train(ib: InfoBatch, workers: int, epochs: int, server: RangeServerProcess) -> list[dict]:
    pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple(META_KEY))
    loader = DataLoader(
        pipeline, batch_size=16, num_workers=workers, multiprocessing_context="spawn", persistent_workers=workers > 0
    )
    out = []
    for epoch in range(epochs):
        before = server.stats()
        t0 = time.perf_counter()
        ib.set_epoch(epoch)
        n = 0
        for (meta,) in loader:
            ib.update(meta, pseudo_loss(meta))
            n += len(meta)
        after = server.stats()
        out.append(
            {
                "epoch": epoch,
                "samples": n,
                "seconds": time.perf_counter() - t0,
                "bytes": after["bytes"] - before["bytes"],
                "requests": after["requests"] - before["requests"],
            }
        )
    ib.set_epoch(epochs)  # the list run's index is complete by now in any case
    return out


def one(workers: int, epochs: int, root: str) -> dict:
    paths = write_shards(os.path.join(root, "objectstore"))
    server = RangeServerProcess(os.path.dirname(paths[0]), "--ttfb", "0.02", "--bandwidth", "50e6")
    try:
        urls = [f"{server.url}/{os.path.basename(p)}" for p in paths]
        work = tempfile.mkdtemp(dir=root)
        config = dict(num_epochs=epochs + 1, prune_ratio=0.5, delta=1.0, seed=0)
        before, t0 = server.stats(), time.perf_counter()
        index = build_index(urls, os.path.join(work, "index.json"))
        after = server.stats()
        indexing = {
            "seconds": time.perf_counter() - t0,
            "bytes": after["bytes"] - before["bytes"],
            "requests": after["requests"] - before["requests"],
        }
        indexed = train(InfoBatch(index, **config), workers, epochs, server)
        listing = os.path.join(work, "list.json")
        with open(listing, "w") as f:
            json.dump({"shardlist": [{"url": u, "nsamples": s.nsamples} for u, s in zip(urls, index.shards)]}, f)
        listed = train(InfoBatch(listing, **config), workers, epochs, server)
    finally:
        server.close()
    total = sum(s.filesize for s in index.shards)
    with_index = indexing["bytes"] + sum(e["bytes"] for e in indexed)
    from_list = sum(e["bytes"] for e in listed)
    return {
        "workers": workers,
        "epochs": epochs,
        "shards": len(urls),
        "samples": SAMPLES,
        "dataset_bytes": total,
        "indexing": indexing,
        "indexed": indexed,
        "listed": listed,
        "bytes_with_index": with_index,
        "bytes_from_list": from_list,
        "bytes_with_index_minus_indexing": with_index - indexing["bytes"],
        "seconds_with_index": indexing["seconds"] + sum(e["seconds"] for e in indexed),
        "seconds_from_list": sum(e["seconds"] for e in listed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "first_epoch_index"))
    parser.add_argument("--json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = [one(w, args.epochs, args.out) for w in args.workers]
    print(
        "| workers | dataset MB | indexing pass MB (s) | indexed run: epochs MB | from list: epochs MB | "
        "list / (indexed - pass) | epoch 0 s, indexed / list | total s, indexed+pass / list |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mb = 1e6
        print(
            f"| {r['workers']} | {r['dataset_bytes'] / mb:.1f} | {r['indexing']['bytes'] / mb:.1f} "
            f"({r['indexing']['seconds']:.1f}) | {r['bytes_with_index_minus_indexing'] / mb:.1f} | "
            f"{r['bytes_from_list'] / mb:.1f} | {r['bytes_from_list'] / r['bytes_with_index_minus_indexing']:.4f} | "
            f"{r['indexed'][0]['seconds']:.2f} / {r['listed'][0]['seconds']:.2f} | "
            f"{r['seconds_with_index']:.1f} / {r['seconds_from_list']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
