"""How long saving and restoring InfoBatch state takes for a large store.

Builds an InfoBatch over a synthetic index (shard sizes only, as in ``scale.py``), gives every
sample a score, plans an epoch, then times, as medians over ``--repeats``:

- ``ib.save(path)``: the state as one file (raw arrays, JSON header; temp file, fsync, rename);
- ``ib.load(path)``: reading it back into the store and republishing the plan;
- ``torch.save(ib.state_dict(), f)`` + fsync, and ``torch.load(weights_only=True)`` +
  ``load_state_dict``: the same state saved next to a model in a training checkpoint.

    python benchmarks/checkpoint_save.py                       # 100M samples into ./ckpt_bench
    python benchmarks/checkpoint_save.py --samples 1e7 --dir /tmp --json out.json

The file goes to ``--dir``; its folder is fsynced, so the figures include the disk, not only the
page cache. Nothing is pickled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import synthetic_index  # noqa: E402

from infobatch_stream import InfoBatch  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _torch_save(state: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def measure(num_samples: int, per_shard: int, folder: str, repeats: int) -> dict:
    ib = InfoBatch(synthetic_index(num_samples, per_shard), num_epochs=10, share_store=False)
    rng = np.random.default_rng(0)
    for lo in range(0, num_samples, 1 << 24):  # chunked: no 100M-float temporary
        hi = min(lo + (1 << 24), num_samples)
        ib.store.scores[lo:hi] = rng.random(hi - lo, dtype=np.float32)
    ib.set_epoch(1)
    ours, pt = os.path.join(folder, "ib.state"), os.path.join(folder, "ib.pt")
    times: dict[str, list[float]] = {"save": [], "load": [], "torch_save": [], "torch_load": []}
    for _ in range(repeats):
        times["save"].append(_timed(lambda: ib.save(ours)))
        times["load"].append(_timed(lambda: ib.load(ours)))
        times["torch_save"].append(_timed(lambda: _torch_save(ib.state_dict(), pt)))
        times["torch_load"].append(_timed(lambda: ib.load_state_dict(torch.load(pt, weights_only=True))))
    result = {
        "samples": num_samples,
        "file_bytes": os.path.getsize(ours),
        "torch_file_bytes": os.path.getsize(pt),
        **{k + "_s": statistics.median(v) for k, v in times.items()},
    }
    os.unlink(ours)
    os.unlink(pt)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python benchmarks/checkpoint_save.py --samples 1e7 1e8",
    )
    parser.add_argument("--samples", type=float, nargs="+", default=[1e8])
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="ckpt_bench", help="folder for the checkpoint files (removed after)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for n in args.samples:
            results.append(measure(int(n), args.per_shard, folder, args.repeats))
    print(
        "| samples | file | ib.save (s) | ib.load (s) | torch.save state_dict (s) | torch.load + load_state_dict (s) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['samples']:,} | {r['file_bytes'] / 2**20:,.0f} MiB | {r['save_s']:.2f} | {r['load_s']:.2f} | "
            f"{r['torch_save_s']:.2f} | {r['torch_load_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
