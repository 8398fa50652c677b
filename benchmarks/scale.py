"""Epoch planning and score exchange at scale, with real Gloo ranks on this machine.

For each dataset size and world size, starts that many ranks (torch.multiprocessing, Gloo on
127.0.0.1) sharing one node's store, as ``torchrun`` ranks of one node would. Every rank records
one epoch's worth of updates (its ``N / W`` kept samples, a random loss each), then times:

- ``exchange``: ``ib.sync_scores()``: the chunked all_gather of 12-byte updates, applied to the
  shared store by the node's writer rank (what ``set_epoch`` does first);
- ``plan``: the rest of ``set_epoch``: threshold, a keep/boost decision for every slot, the
  shared 2-bit plan, per-shard kept counts, the barrier and the publish;

and reports the memory: the node's shared segments (store + plan); what stays after an epoch,
as the growth of the ranks' proportional set sizes summed over the node (PSS splits shared pages
between the ranks that map them; freed heap is trimmed first); and each rank's peak resident
growth during the epoch (its pending updates, the exchange buffers, the store pages it touched).

A last line times applying updates to the store alone (one process, ``--samples`` updates in
shard order, shuffled within each shard as a shuffle buffer would leave them).

    python benchmarks/scale.py                                   # 10M and 100M, 2 and 4 ranks
    python benchmarks/scale.py --samples 1e7 --ranks 2 --json benchmarks/scale_results.json

The index is synthetic (shard sizes only, no tar files: planning and exchange never read keys or
byte offsets). Times are wall-clock medians over ``--repeats`` epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np


def synthetic_index(num_samples: int, per_shard: int):
    """An index of ``num_samples`` slots in shards of ``per_shard``, with no per-sample arrays in memory."""
    from infobatch_stream.index import DatasetIndex, ShardInfo

    num_shards = -(-num_samples // per_shard)
    sizes = [per_shard] * (num_shards - 1) + [num_samples - per_shard * (num_shards - 1)]
    shards = [ShardInfo(f"shard-{i:06d}.tar", n, n * 4096, None) for i, n in enumerate(sizes)]
    arrays = {
        "start": np.broadcast_to(np.int64(0), (num_samples,)),
        "key_offsets": np.zeros(1, dtype=np.int64),
        "keys": np.zeros(0, dtype=np.uint8),
    }
    return DatasetIndex(shards, arrays, [])


def _trim() -> None:
    """Hand freed heap back to the system, so PSS shows what stays, not what the allocator kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _rank(rank: int, world_size: int, port: int, num_samples: int, per_shard: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from infobatch_stream import InfoBatch, distributed
    from infobatch_stream.distributed import pack_updates

    distributed.OVERLAP_ROUNDS = os.environ.get("SCALE_OVERLAP", "1") == "1"

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=1800)
    )
    try:
        index = synthetic_index(num_samples, per_shard)
        _trim()
        base, rss_base = _pss_bytes(), _rss_bytes()  # torch, numpy, the process group: not ours
        t0 = time.perf_counter()
        ib = InfoBatch(index, num_epochs=repeats + 2, prune_ratio=0.5, delta=1.0, seed=0)
        create = time.perf_counter() - t0
        rng = np.random.default_rng(rank)
        exchange, plan, sent, pss = [], [], [], []
        for epoch in range(1, repeats + 1):
            slots = np.arange(rank, num_samples, world_size, dtype=np.int64)  # this rank's share of an epoch
            ib.scores.pending = [pack_updates(slots, rng.random(len(slots), dtype=np.float32))]
            sent.append(len(slots) * 12)
            del slots
            dist.barrier()
            t0 = time.perf_counter()
            ib.sync_scores()
            dist.barrier()
            t1 = time.perf_counter()
            stats = ib.set_epoch(epoch)
            t2 = time.perf_counter()
            exchange.append(t1 - t0)
            plan.append(t2 - t1)
            _trim()
            pss.append(_pss_bytes())
        shm = ib.store.nbytes + ib.plan.nbytes if ib.scores.writer else 0
        result = {
            "rank": rank,
            "writer": ib.scores.writer,
            "create_s": create,
            "exchange_s": exchange,
            "plan_s": plan,
            "sent_bytes": sent[0],
            "pss_bytes": max(pss) - base,
            "peak_rss_bytes": _rss_peak_bytes() - rss_base,
            "shm_bytes": shm,
            "kept": stats.kept,
            "per_rank": stats.per_rank,
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run(num_samples: int, world_size: int, per_shard: int, repeats: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world_size, port, num_samples, per_shard, repeats, out), nprocs=world_size, join=True)
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world_size)]
    exchange = statistics.median(max(r["exchange_s"][i] for r in ranks) for i in range(repeats))
    plan = statistics.median(max(r["plan_s"][i] for r in ranks) for i in range(repeats))
    received = sum(r["sent_bytes"] for r in ranks)  # every rank receives every rank's updates
    return {
        "samples": num_samples,
        "ranks": world_size,
        "shards": -(-num_samples // per_shard),
        "exchange_s": exchange,
        "plan_s": plan,
        "exchange_ns_per_update": exchange / num_samples * 1e9,
        "plan_ns_per_sample": plan / num_samples * 1e9,
        "bytes_received_per_rank": received,
        "exchange_gb_per_s": received / exchange / 1e9,
        "node_shm_bytes": sum(r["shm_bytes"] for r in ranks),
        "max_rank_pss_bytes": max(r["pss_bytes"] for r in ranks),
        "node_pss_bytes": sum(r["pss_bytes"] for r in ranks),
        "create_s": max(r["create_s"] for r in ranks),
        "max_rank_peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "kept": ranks[0]["kept"],
        "per_rank": ranks[0]["per_rank"],
    }


def _updates(num_samples: int, per_shard: int):
    """A fresh store and one update per slot, in shard order, shuffled within each shard (as a
    shuffle buffer would leave them)."""
    from infobatch_stream.store import ScoreStore

    store = ScoreStore.create(num_samples)
    rng = np.random.default_rng(0)
    slots = np.arange(num_samples, dtype=np.int64)
    for lo in range(0, num_samples, per_shard):
        rng.shuffle(slots[lo : lo + per_shard])
    return store, slots, rng.random(num_samples, dtype=np.float32)


def apply_rate(num_samples: int, per_shard: int) -> float:
    """Nanoseconds per update of ``ScoreStore.record`` in one process."""
    store, slots, values = _updates(num_samples, per_shard)
    t0 = time.perf_counter()
    for lo in range(0, num_samples, 1 << 20):  # in exchange-sized pieces
        store.record(slots[lo : lo + (1 << 20)], values[lo : lo + (1 << 20)])
    return (time.perf_counter() - t0) / num_samples * 1e9


def split_apply_rate(num_samples: int, per_shard: int, sharers: int) -> float:
    """Nanoseconds per update for the slowest of ``sharers`` ranks applying a node's updates by
    slot range (each masks every update and writes its slice), one after the other here; on a
    node they would run at once, so this is what a node would spend per update. (Measured, and
    slower than one writer here: the library overlaps the apply with the next round instead.)"""
    store, slots, values = _updates(num_samples, per_shard)
    slowest = 0.0
    for position in range(sharers):
        lo, hi = num_samples * position // sharers, num_samples * (position + 1) // sharers
        t0 = time.perf_counter()
        for a in range(0, num_samples, 1 << 20):  # in exchange-sized pieces
            piece = slots[a : a + (1 << 20)]
            mine = (piece >= lo) & (piece < hi)
            store.record(piece[mine], values[a : a + (1 << 20)][mine])
        slowest = max(slowest, time.perf_counter() - t0)
    return slowest / num_samples * 1e9


def table(results: list[dict]) -> str:
    rows = [
        "| samples | ranks | exchange (s) | received per rank | GB/s | plan (s) | plan ns/sample "
        "| store+plan per node | PSS per node | peak RSS per rank |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rows.append(
            f"| {r['samples']:,} | {r['ranks']} | {r['exchange_s']:.2f} | "
            f"{r['bytes_received_per_rank'] / 2**20:,.0f} MiB | {r['exchange_gb_per_s']:.2f} | "
            f"{r['plan_s']:.2f} | {r['plan_ns_per_sample']:.1f} | {r['node_shm_bytes'] / 2**20:,.0f} MiB | "
            f"{r['node_pss_bytes'] / 2**20:,.0f} MiB | {r['max_rank_peak_rss_bytes'] / 2**20:,.0f} MiB |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python benchmarks/scale.py --samples 1e7 1e8 --ranks 2 4",
    )
    parser.add_argument("--samples", type=float, nargs="+", default=[1e7, 1e8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for n in args.samples:
        for w in args.ranks:
            t0 = time.perf_counter()
            results.append(run(int(n), w, args.per_shard, args.repeats))
            print(
                f"{int(n):,} samples, {w} ranks: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
            )
    print(table(results))
    largest = int(max(args.samples))
    apply_ns = apply_rate(largest, args.per_shard)
    print(f"\napplying updates to the store: {apply_ns:.1f} ns per update ({largest:,} updates)")
    split_ns = {k: split_apply_rate(largest, args.per_shard, k) for k in (2, 4, 8)}
    for k, ns in split_ns.items():
        print(f"split over {k} ranks by slot range: {ns:.2f} ns per update for the slowest rank")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"runs": results, "apply_ns_per_update": apply_ns, "split_apply_ns_per_update": split_ns}, f, indent=1
            )


if __name__ == "__main__":
    main()
