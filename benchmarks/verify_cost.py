"""What the reader's per-member header check costs (``infobatch_stream.verify``).

Writes CIFAR-like shards (3 KB payload + label per sample: the smallest samples, where a per-member
cost weighs most), then reads them all with ``ib.tarfile_to_samples()`` and no decoding, alternating
runs with the check and runs with it switched off in this process (the check is not optional in
the library: switching it off here is only for the measurement). Prints medians and their ratio.

    python benchmarks/verify_cost.py [--samples 40000] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import webdataset as wds

from infobatch_stream import InfoBatch, build_index, reader


def write(folder: str, samples: int) -> list[str]:
    rng = np.random.default_rng(0)
    with wds.ShardWriter(os.path.join(folder, "c-%03d.tar"), maxcount=5000, verbose=0) as sink:
        for i in range(samples):
            sink.write({"__key__": f"s{i:07d}", "png": rng.bytes(3000), "cls": str(i % 10).encode()})
    return sorted(glob.glob(os.path.join(folder, "*.tar")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    checked = reader._Layout.check
    with tempfile.TemporaryDirectory() as folder:
        urls = write(folder, args.samples)
        ib = InfoBatch(build_index(urls), num_epochs=4, delta=1.0)

        def run(check: bool) -> float:
            reader._Layout.check = checked if check else (lambda self, buf, r: None)  # type: ignore[method-assign]
            ib.set_epoch(ib.epoch)
            start = time.perf_counter()
            n = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), ib.tarfile_to_samples()))
            assert n == args.samples
            return time.perf_counter() - start

        run(True), run(False)  # page cache and imports
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):
                times[check].append(run(check))
        reader._Layout.check = checked  # type: ignore[method-assign]
    on, off = statistics.median(times[True]), statistics.median(times[False])
    result = {
        "samples": args.samples,
        "members_per_sample": 2,
        "checked_s": on,
        "unchecked_s": off,
        "checked_us_per_sample": on / args.samples * 1e6,
        "unchecked_us_per_sample": off / args.samples * 1e6,
        "ratio": on / off,
    }
    print(
        f"{args.samples} samples x 2 members, medians of {args.repeats}: checked {result['checked_us_per_sample']:.2f} "
        f"us/sample, unchecked {result['unchecked_us_per_sample']:.2f} us/sample, ratio {result['ratio']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
