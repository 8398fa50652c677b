"""``infobatch-stream``: build indexes, run the demo and the benchmark, report on a saved run."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .demo_config import DemoConfig
from .errors import InfoBatchError

# Each command imports what it needs when it runs: `index` and `report` start without torch.
_USER_ERRORS = (InfoBatchError, FileNotFoundError, ValueError)


def _index(args: argparse.Namespace) -> int:
    from .index import build_index, expand_urls

    urls = [url for pattern in args.shards for url in expand_urls(pattern)]
    index = build_index(urls, args.output, workers=args.workers, progress=not args.quiet)
    print(f"indexed {index.num_shards} shards, {index.num_samples} samples -> {os.path.abspath(args.output)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    cfg = DemoConfig(
        out=args.out,
        epochs=args.epochs,
        prune_ratio=args.ratio,
        delta=args.delta,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        shards=args.shards,
        seed=args.seed,
        repeats=args.repeats,
        progress=not args.quiet,
    )
    run_demo(cfg)
    return 0


def _bench(args: argparse.Namespace) -> int:
    profiles = tuple(p for p in args.profile if p != "objectstore")
    if profiles:
        from .bench import main_bench

        main_bench(
            args.out, profiles, args.repeats, http=not args.no_http, json_path=args.json, progress=not args.quiet
        )
    if "objectstore" in args.profile:
        from . import bench_objstore

        json_path = args.json if not profiles or not args.json else os.path.splitext(args.json)[0] + "-objectstore.json"
        bench_objstore.main(args.out, args.repeats, json_path, progress=not args.quiet)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import main_report

    return main_report(args.file, plot=args.plot, json_path=args.json)


# Long on purpose: a declarative table of the commands and their flags.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infobatch-stream",
        description="InfoBatch data pruning for WebDataset tar shards.",
        epilog="example: infobatch-stream index 'shards/data-{000..099}.tar' -o shards/index.json",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "index",
        help="index tar shards (keys, byte ranges, sample counts)",
        description="Walk the tar headers of every shard and write a wids-style shard list JSON "
        "plus memory-mapped per-sample arrays beside it.",
        epilog="example: infobatch-stream index 'shards/data-{000..099}.tar' -o shards/index.json --workers 4\n"
        "         infobatch-stream index 's3://bucket/train/*.tar' -o index.json   (pip install "
        "'infobatch-stream[remote]')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "shards",
        nargs="+",
        help="shard paths or URLs (s3://, gs://, az://, http(s)://, pipe:); brace patterns like "
        "data-{000..099}.tar and globs like s3://bucket/train/*.tar expand",
    )
    p.add_argument("-o", "--output", required=True, help="index JSON to write (arrays go to <name>.arrays/)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel scanning processes (remote shards: at least 16 at a time)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_index)

    d = sub.add_parser(
        "demo",
        help="train a digits classifier with full data and with InfoBatch, print the saving",
        description="Write scikit-learn's digits as PNG tar shards, index them, and train the same "
        "MLP twice with a multi-worker DataLoader: full data, then InfoBatch.",
        epilog="example: infobatch-stream demo --epochs 60 --workers 2 --out demo_out",
    )
    defaults = DemoConfig()
    d.add_argument("--out", default=defaults.out, help="folder for the shards and index")
    d.add_argument("--epochs", type=int, default=defaults.epochs)
    d.add_argument("--ratio", type=float, default=defaults.prune_ratio, help="prune ratio r")
    d.add_argument("--delta", type=float, default=defaults.delta, help="fraction of epochs that prune")
    d.add_argument("--batch-size", type=int, default=defaults.batch_size)
    d.add_argument("--lr", type=float, default=defaults.lr)
    d.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers")
    d.add_argument("--shards", type=int, default=defaults.shards)
    d.add_argument("--seed", type=int, default=defaults.seed)
    d.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="times each run is trained, interleaved (full, InfoBatch, InfoBatch, full, ...) so that load on "
        "the machine hits both; the table gives median wall times",
    )
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    b = sub.add_parser(
        "bench",
        help="time the skip-aware reader against plain WebDataset (local, HTTP, object stores)",
        description="Generate JPEG shards (ImageNet-like ~100 KB, CIFAR-like ~3 KB samples), prune ~40%% of them, "
        "and time plain WebDataset, WebDataset + ib.filter() and ib.tarfile_to_samples(), from local "
        "files and from an HTTP server with Range support on 127.0.0.1. --profile objectstore: ~60 KB "
        "samples from a server with 20 ms to first byte and 50 MB/s per connection, and from an S3 API "
        "server (moto), with 0 and 4 DataLoader workers.",
        epilog="example: infobatch-stream bench --repeats 5 --json bench.json\n"
        "         infobatch-stream bench --profile objectstore --repeats 3",
    )
    b.add_argument("--out", default="bench_out", help="folder for the generated shards (reused if present)")
    b.add_argument("--profile", nargs="+", choices=["imagenet", "cifar", "objectstore"], default=["imagenet", "cifar"])
    b.add_argument("--repeats", type=int, default=5, help="alternating repeats per cell (medians are reported)")
    b.add_argument("--no-http", action="store_true", help="local files only")
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_bench)

    r = sub.add_parser(
        "report",
        help="print and plot the pruning over a run from a saved state or stats file",
        description="Print a run's per-epoch stats as a table with a summary: samples trained against the\n"
        "full data, pruning epochs, and from a saved state the score distribution.\n\n"
        "FILE is told by its content, not its name:\n"
        "  - a file written by ib.save(path)\n"
        "  - a torch.save() checkpoint holding ib.state_dict() at the top level or under any\n"
        "    key (read with torch.load(weights_only=True): nothing is unpickled)\n"
        '  - JSON: a list of ib.stats() epochs, or an object with a "stats" list',
        epilog="example: infobatch-stream report ckpt.pt --plot pruning.png --json summary.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("file", help="ib.save() state, torch.save() checkpoint, or JSON stats")
    r.add_argument(
        "--plot", metavar="PNG", help="write a figure: kept fraction and threshold per epoch, score histogram"
    )
    r.add_argument("--json", metavar="FILE", help="also write the summary as JSON to this file")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"infobatch-stream {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
