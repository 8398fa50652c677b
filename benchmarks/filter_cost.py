"""Per-sample cost of ib.filter() by itself, on samples already read into memory.

The bench's (b)/(a) ratio at 0% pruned moves by several percent between runs on a 2-core
machine; this isolates what the filter adds to each sample.

Run after `infobatch-stream bench` (it reuses its CIFAR-like shards):
    python benchmarks/filter_cost.py bench_out/cifar/index.json
"""

from __future__ import annotations

import statistics
import sys
import time

import webdataset as wds

from infobatch_stream import DatasetIndex, InfoBatch


def main(index_path: str, repeats: int = 7) -> None:
    index = DatasetIndex.load(index_path)
    ib = InfoBatch(index, num_epochs=10, prune_ratio=0.5, delta=1.0)
    samples = list(wds.DataPipeline(wds.SimpleShardList(index.urls), wds.tarfile_to_samples()))
    per_sample = []
    for _ in range(repeats):
        ib.set_epoch(1)
        start = time.perf_counter()
        n = sum(1 for _ in ib.filter()(iter(samples)))
        per_sample.append((time.perf_counter() - start) / n * 1e6)
    read = []
    for _ in range(3):
        start = time.perf_counter()
        n = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(index.urls), wds.tarfile_to_samples()))
        read.append((time.perf_counter() - start) / n * 1e6)
    print(
        f"{len(samples)} samples: ib.filter() {statistics.median(per_sample):.2f} us/sample (median of {repeats}); "
        f"wds.tarfile_to_samples() alone {statistics.median(read):.1f} us/sample"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/cifar/index.json")
