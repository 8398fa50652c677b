"""What the three training examples share: arguments, data, the study's arms and the epoch loop.

Each example (``classify.py``, ``mae.py``, ``diffusion.py``) brings a model, a per-sample loss
and a test metric; :func:`train` reads the tar shards through InfoBatch (``ib.dataset``), trains
one arm and returns (and with ``--json`` writes) a summary with per-epoch records:

- ``infobatch``: the library's pruning (``--prune-ratio``, ``--delta``, ``--ema-decay``);
- ``full``: the same pipeline with ``prune_ratio=0``: nothing pruned, every weight 1;
- ``random``: uniform random pruning at the sample counts of an ``infobatch`` run (``--match``
  its JSON summary): each epoch a random subset of exactly that many samples, weight 1. Its
  samples are dropped after the shuffle buffer (InfoBatch's before it): the same for shards
  written in random order, as the digits are.

All arms use the same reader, shuffle buffer, model initialisation, optimiser and a OneCycle
learning-rate schedule driven by :class:`ProgressScheduler`, so it spans the run however short
the pruned epochs are. Without ``--shards`` the digits that scikit-learn ships are written as PNG
tar shards (fields ``png`` and ``cls``) into ``--out``, with a held-out test shard. Other shards
need square images (decoded to grayscale) and integer labels; the examples run on the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch import nn

from infobatch_stream import META_KEY, InfoBatch, ProgressScheduler, build_index
from infobatch_stream.demo import write_digits_shards
from infobatch_stream.index import expand_urls

log = logging.getLogger("examples")
ARMS = ("infobatch", "full", "random")
VIRTUAL_STEPS = 10_000  # the OneCycle schedule's resolution (ProgressScheduler maps progress onto it)


@dataclass
class Example:
    """What an example brings: its name, model, per-sample loss and test metric."""

    name: str
    metric: str  # name of the test metric
    higher_is_better: bool
    make_model: Callable[[int, int], nn.Module]  # from the image side (8 for the digits) and the classes
    # the per-sample loss, or (loss, normalised score) where a noise level can be divided out
    per_sample_loss: Callable[
        [nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ]
    evaluate: Callable[[nn.Module, torch.Tensor, torch.Tensor], float]
    lr: float = 0.05
    optimizer: str = "sgd"  # or "adamw"
    epochs: int = 30
    quick_epochs: int = 8
    prune_ratio: float = 0.5
    has_noise_level: bool = False  # per_sample_loss also returns a score with its noise level divided out


def parser(example: Example, doc: str) -> argparse.ArgumentParser:
    script = f"examples/{example.name}.py"
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example: python {script} --quick\n"
        f"         python {script} --arm full --seed 1 --json full.json\n"
        f"         python {script} --shards 'data/train-{{000..099}}.tar' --test-shards 'data/test-000.tar'",
    )
    p.add_argument("--arm", choices=ARMS, default="infobatch")
    p.add_argument(
        "--shards",
        help="index JSON or brace/glob pattern of training shards with png and cls fields "
        "(default: write the digits into --out)",
    )
    p.add_argument("--test-shards", help="pattern of held-out shards (needed with --shards)")
    p.add_argument("--out", default="examples_out", help="folder for the generated digits shards and the index")
    p.add_argument("--epochs", type=int, help=f"default {example.epochs}, or {example.quick_epochs} with --quick")
    p.add_argument("--quick", action="store_true", help="a short run (seconds on a CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--lr", type=float, default=example.lr, help="peak learning rate of the OneCycle schedule")
    p.add_argument("--prune-ratio", type=float, default=example.prune_ratio)
    p.add_argument("--delta", type=float, default=0.875, help="fraction of the epochs that prune")
    p.add_argument("--ema-decay", type=float, default=0.0, help="score = EMA of the losses (0: the last loss)")
    p.add_argument(
        "--normalized-score",
        action="store_true",
        help="score = loss / mean loss at the sample's noise level (diffusion: its timestep)",
    )
    p.add_argument("--match", help="--arm random: the JSON summary of the infobatch run whose sample counts to use")
    p.add_argument("--seed", type=int, default=0, help="model init, shuffle and pruning decisions")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    p.add_argument("--json", help="write the summary (per-epoch records, ib.stats(), scores) here")
    return p


def parse(example: Example, doc: str, argv: list[str] | None) -> argparse.Namespace:
    p = parser(example, doc)
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = example.quick_epochs if args.quick else example.epochs
    if args.shards and not args.test_shards:
        p.error("--shards needs --test-shards: the metric is measured on held-out data")
    if args.arm == "random" and not args.match:
        p.error("--arm random needs --match: the summary of an infobatch run whose sample counts it matches")
    if args.normalized_score and not example.has_noise_level:
        p.error(f"--normalized-score: the {example.name} example has no noise level to divide out of its loss")
    if args.match:
        with open(args.match) as f:
            matched = json.load(f)
        if matched.get("example") != example.name or len(matched.get("epochs", [])) != args.epochs:
            p.error(
                f"--match {args.match}: a summary of {matched.get('example')!r} over "
                f"{len(matched.get('epochs', []))} epochs; expected {example.name!r} over {args.epochs}"
            )
        if {k: matched["config"].get(k) for k in ("out", "shards")} != {"out": args.out, "shards": args.shards}:
            p.error(
                f"--match {args.match} was trained on other data "
                f"({matched['config'].get('shards') or matched['config'].get('out')})"
            )
        args.counts = [e["samples"] for e in matched["epochs"]]
    return args


# ---- data -----------------------------------------------------------------------------------------
def shard_urls(pattern: str) -> list[str]:
    """Brace-expand like WebDataset, then expand globs in local paths (WebDataset does not)."""
    urls: list[str] = []
    for url in expand_urls(pattern):
        urls += sorted(glob.glob(url)) if "://" not in url and glob.has_magic(url) else [url]
    return urls


def prepare(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The training index and the test shard URLs, writing the digits if no shards were given."""
    if args.shards:
        index = (
            args.shards
            if args.shards.endswith(".json")
            else build_index(shard_urls(args.shards), os.path.join(args.out, "index.json")).path
        )
        return index, shard_urls(args.test_shards)
    index, test = os.path.join(args.out, "index.json"), os.path.join(args.out, "test", "digits-test-000.tar")
    if not (os.path.exists(index) and os.path.exists(test)):
        urls, x_test, y_test = write_digits_shards(args.out, num_shards=8, seed=0)
        os.makedirs(os.path.dirname(test), exist_ok=True)
        with wds.TarWriter(test) as sink:
            for i, (x, y) in enumerate(zip(x_test, y_test)):
                sink.write({"__key__": f"test{i:05d}", "png": _png(x), "cls": str(int(y)).encode()})
        build_index(urls, index)
    return index, [test]


def _png(x: np.ndarray) -> bytes:
    from infobatch_stream.demo import png_bytes as png

    side = math.isqrt(x.size)
    return png(np.round(x.reshape(side, side) * 255).astype(np.uint8))


def to_tensors(sample: tuple) -> tuple[torch.Tensor, int, np.ndarray]:
    """``decode("l")`` gives a float image in [0, 1]: flatten it."""
    image, label, meta = sample
    return torch.as_tensor(np.asarray(image, dtype=np.float32).reshape(-1)), int(label), meta


def load_test(urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    samples = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("l"), wds.to_tuple("png", "cls")
    )
    xs, ys = zip(*((np.asarray(x, dtype=np.float32).reshape(-1), int(y)) for x, y in samples))
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


# ---- the random-pruning arm -------------------------------------------------------------------------
class RandomSubset:
    """Keep exactly ``counts[epoch]`` samples of each epoch, a uniform random subset of the slots.

    A function of ``(seed, epoch, slot)``, so every DataLoader worker agrees without sharing
    state (``__ib__`` carries the slot and the epoch)."""

    def __init__(self, num_samples: int, counts: list[int], seed: int) -> None:
        self.num_samples, self.counts, self.seed = num_samples, counts, seed
        self._cache: dict[int, np.ndarray] = {}

    def mask(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 0xBA5E]))
            keep = np.zeros(self.num_samples, dtype=bool)
            keep[rng.permutation(self.num_samples)[: self.counts[min(epoch, len(self.counts) - 1)]]] = True
            self._cache = {epoch: keep}
        return self._cache[epoch]

    def __call__(self, sample: dict) -> bool:
        meta = sample[META_KEY]
        return bool(self.mask(int(meta[1]))[int(meta[0])])

    def batches(self, ib: InfoBatch, epoch: int, batch_size: int, num_workers: int) -> int:
        """The epoch's step count: each worker batches what it keeps of its share (nothing is
        pruned by InfoBatch in this arm, so a share's kept ordinals are shard positions)."""
        keep, index = self.mask(epoch), ib.index
        sizes = np.array([s.nsamples for s in index.shards])
        steps = 0
        for worker in range(max(num_workers, 1)):
            parts = ib.worker_parts(epoch, worker, num_workers, kept_per_shard=sizes)
            kept = sum(
                int(keep[index.slots(p.shard)[0] + p.first : index.slots(p.shard)[0] + p.stop].sum()) for p in parts
            )
            steps += -(-kept // batch_size)
        return steps


# ---- training ---------------------------------------------------------------------------------------
def _optimizer(example: Example, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if example.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train(example: Example, args: argparse.Namespace) -> dict:
    """Train one arm; the summary (also written to ``--json``)."""
    started = time.perf_counter()  # end to end: data, index, loader start, training and evaluation
    torch.set_num_threads(args.threads)
    index_path, test_urls = prepare(args)
    x_test, y_test = load_test(test_urls)
    side = math.isqrt(x_test.shape[1])
    if side * side != x_test.shape[1]:
        raise SystemExit(f"the examples expect square images; the test shards hold {x_test.shape[1]} pixels each")
    ratio = args.prune_ratio if args.arm == "infobatch" else 0.0
    ib = InfoBatch(
        index_path,
        num_epochs=args.epochs,
        prune_ratio=ratio,
        delta=args.delta,
        seed=args.seed,
        ema_decay=args.ema_decay if args.arm == "infobatch" else 0.0,
    )
    stages = [wds.decode("l"), wds.to_tuple("png", "cls", META_KEY)]
    subset = None
    if args.arm == "random":  # selected before decoding, as InfoBatch's pruned samples are never decoded
        subset = RandomSubset(ib.index.num_samples, args.counts, args.seed)
        stages.insert(0, wds.select(subset))
    dataset = ib.dataset(*stages, wds.map(to_tensors), shuffle=500)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    torch.manual_seed(args.seed)
    model = example.make_model(side, int(y_test.max()) + 1)
    opt = _optimizer(example, model, args.lr)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=VIRTUAL_STEPS, pct_start=0.15)
    steps_of = (lambda e: subset.batches(ib, e, args.batch_size, args.workers)) if subset else None
    schedule = ProgressScheduler(ib, one_cycle, args.batch_size, args.workers, steps_per_epoch=steps_of)
    noise = torch.Generator().manual_seed(args.seed)  # the examples' own randomness (masks, timesteps)

    epochs, seconds = [], 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        stats = ib.set_epoch(epoch)
        model.train()
        samples = steps = 0
        loss_sum = raw_sum = 0.0
        for x, y, meta in loader:
            out = example.per_sample_loss(model, x, y, noise)
            per_sample, score = out if isinstance(out, tuple) else (out, None)
            loss = ib.update(meta, per_sample, score if args.normalized_score else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            samples += len(y)
            steps += 1
            loss_sum += loss.item() * len(y)
            raw_sum += per_sample.sum().item()
        seconds += time.perf_counter() - t0
        if steps != schedule.expected_steps(epoch):  # the schedule was told another length: its LR would drift
            raise RuntimeError(
                f"epoch {epoch} took {steps} steps, the schedule expected {schedule.expected_steps(epoch)}"
            )
        model.eval()
        with torch.no_grad():
            metric = example.evaluate(model, x_test, y_test)
        epochs.append(
            {
                "epoch": epoch,
                "samples": samples,
                "steps": steps,
                "train_loss": loss_sum / max(samples, 1),
                "train_loss_unweighted": raw_sum / max(samples, 1),
                example.metric: metric,
                "threshold": stats.threshold,
                "lr": schedule.get_last_lr()[0],
                "seconds": seconds,
            }
        )
        log.info(
            "%s/%s epoch %d: %d samples, %d steps, loss %.4f, %s %.4f",
            example.name,
            args.arm,
            epoch,
            samples,
            steps,
            loss_sum / max(samples, 1),
            example.metric,
            metric,
        )
    scores = np.asarray(ib.store.scores)
    seen = scores[~np.isnan(scores)]
    trained = sum(e["samples"] for e in epochs)
    full = args.epochs * ib.index.num_samples
    summary = {
        "example": example.name,
        "arm": args.arm,
        "seed": args.seed,
        "metric": example.metric,
        "higher_is_better": example.higher_is_better,
        "final": epochs[-1][example.metric],
        "samples": trained,
        "full_samples": full,
        "saved": 1 - trained / full,
        "steps": sum(e["steps"] for e in epochs),
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - started,
        "epochs": epochs,
        "stats": ib.stats(),
        "scores": {
            "quantiles": np.quantile(seen, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]).tolist() if len(seen) else [],
            "sample": seen[np.random.default_rng(0).permutation(len(seen))[:5000]].tolist(),
        },
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f)
    return summary


def main(example: Example, doc: str, argv: list[str] | None = None) -> dict:
    args = parse(example, doc, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("infobatch_stream").setLevel(logging.WARNING)  # its per-epoch line repeats ours
    summary = train(example, args)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("example", "arm", "seed", "metric", "final", "samples", "saved", "steps", "seconds")
            }
        ),
        flush=True,
    )
    return summary
