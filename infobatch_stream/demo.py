"""The demo: train a small digits classifier from PNG tar shards, with full data and with InfoBatch.

scikit-learn ships the 8x8 digits images, so nothing is downloaded. Both runs use the same
WebDataset pipeline, model, optimiser, learning-rate schedule and multi-worker DataLoader; the
InfoBatch run swaps the shard source and the tar reader (``ib.tarfile_to_samples()``) and passes
the loss through ``update``.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import nn

from .demo_config import DemoConfig
from .index import build_index
from .infobatch import InfoBatch

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    name: str
    accuracy: float
    samples: int
    steps: int
    seconds: float  # the median over the repeats
    times: list[float] = field(default_factory=list)  # every repeat's wall time


def versions() -> str:
    """The packages the figures depend on (the sample counts are exact for these: another torch
    rounds the losses differently, and the scores decide what is pruned)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["infobatch-stream", "torch", "webdataset", "numpy", "pillow", "scikit-learn"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    import platform

    return f"Python {platform.python_version()}, " + ", ".join(found)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image as PNG bytes (what the demo's and the examples' shards hold)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def digits_as_uint8(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits images as 8x8 uint8 (0..255), split 75/25 stratified: train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def write_digits_shards(out: str, num_shards: int = 8, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Write the training digits as PNG tar shards; return shard paths and the test set."""
    x_train, y_train, x_test, y_test = digits_as_uint8(seed)
    os.makedirs(out, exist_ok=True)
    per_shard = -(-len(x_train) // num_shards)
    pattern = os.path.join(out, "digits-%03d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, (image, label) in enumerate(zip(x_train, y_train)):
            sink.write({"__key__": f"digit{i:05d}", "png": png_bytes(image), "cls": str(int(label)).encode()})
    urls = sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith("digits-") and f.endswith(".tar"))
    return urls, x_test.reshape(len(x_test), -1).astype(np.float32) / 255.0, y_test


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def _to_xy(batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch[0], batch[1]
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(len(labels), -1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return x, y


def _tail(batch_size: int, extra: tuple[str, ...], seed: int) -> list[Any]:
    """The stages both runs share after reading: shuffle, decode, select fields, batch."""
    return [
        wds.shuffle(1000, initial=1000, seed=seed),
        wds.decode("l"),
        wds.to_tuple("png", "cls", *extra),
        wds.batched(batch_size, partial=True),
    ]


def plain_pipeline(urls: list[str], cfg: DemoConfig) -> wds.DataPipeline:
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=cfg.seed),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        *_tail(cfg.batch_size, (), cfg.seed),
    )


def infobatch_pipeline(ib: InfoBatch, cfg: DemoConfig) -> wds.DataPipeline:
    return wds.DataPipeline(
        ib.shards(),
        ib.tarfile_to_samples(),  # wds.tarfile_to_samples() + ib.filter(), reading only kept bytes
        *_tail(cfg.batch_size, ("__ib__",), cfg.seed),
    )


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    model.train()
    return float((pred == y).mean())


def train(
    name: str,
    pipeline: wds.DataPipeline,
    cfg: DemoConfig,
    test: tuple[np.ndarray, np.ndarray],
    ib: InfoBatch | None = None,
) -> RunResult:
    """One training run; ``ib`` switches the loss to InfoBatch's weighted per-sample loss."""
    torch.manual_seed(cfg.seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(reduction="none")
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=cfg.workers, persistent_workers=cfg.workers > 0
    )
    samples = steps = 0
    start = time.perf_counter()
    epochs: Any = range(cfg.epochs)
    if cfg.progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc=name, unit="epoch", leave=False)
    for epoch in epochs:
        for group in opt.param_groups:  # per-epoch cosine schedule: the same in both runs
            group["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * epoch / cfg.epochs))
        if ib is not None:
            ib.set_epoch(epoch)
        for batch in loader:
            x, y = _to_xy(batch)
            per_sample = criterion(model(x), y)
            loss = ib.update(batch[2], per_sample) if ib is not None else per_sample.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += len(y)
            steps += 1
    seconds = time.perf_counter() - start
    return RunResult(name, evaluate(model, *test), samples, steps, seconds)


def format_table(results: list[RunResult]) -> str:
    full = results[0]
    repeats = len(full.times)
    lines = [
        f"| run | test accuracy | samples trained | optimizer steps | wall time (s, median of {repeats}) "
        "| samples saved | time saved |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        saved, faster = 1.0 - r.samples / full.samples, 1.0 - r.seconds / full.seconds
        times = ", ".join(f"{t:.1f}" for t in r.times)
        lines.append(
            f"| {r.name} | {100 * r.accuracy:.2f}% | {r.samples:,} | {r.steps:,} | {r.seconds:.1f} ({times}) "
            f"| {100 * saved:.1f}% | {100 * faster:.1f}% |"
        )
    return "\n".join(lines)


def _merge(runs: list[RunResult]) -> RunResult:
    """One run's repeats as one row: the same counts every time (or a warning), median time."""
    first = runs[0]
    if any((r.samples, r.steps, r.accuracy) != (first.samples, first.steps, first.accuracy) for r in runs):
        log.warning(
            "%s: the repeats differ (samples %s, accuracy %s); the table shows the first",
            first.name,
            [r.samples for r in runs],
            [r.accuracy for r in runs],
        )
    times = [r.seconds for r in runs]
    return RunResult(first.name, first.accuracy, first.samples, first.steps, float(np.median(times)), times)


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> list[RunResult]:
    """Write shards, index them, train both runs ``cfg.repeats`` times interleaved (full,
    InfoBatch, InfoBatch, full, ...: each run's mean position is the same, so a load that rises
    or falls over the demo hits both alike), print the comparison table."""
    urls, x_test, y_test = write_digits_shards(cfg.out, cfg.shards, cfg.seed)
    index = build_index(urls, os.path.join(cfg.out, "index.json"))
    echo(
        f"wrote {index.num_samples} training digits as PNG in {index.num_shards} shards under {cfg.out}/, "
        f"{len(y_test)} held out for testing"
    )
    runs: dict[str, list[RunResult]] = {"full data": [], "InfoBatch": []}
    ib = None
    for i in range(max(1, cfg.repeats)):
        for name in ("full data", "InfoBatch") if i % 2 == 0 else ("InfoBatch", "full data"):
            if name == "full data":
                runs[name].append(train(name, plain_pipeline(urls, cfg), cfg, (x_test, y_test)))
                continue
            ib = InfoBatch(index, num_epochs=cfg.epochs, prune_ratio=cfg.prune_ratio, delta=cfg.delta, seed=cfg.seed)
            runs[name].append(train(name, infobatch_pipeline(ib, cfg), cfg, (x_test, y_test), ib=ib))
    results = [_merge(runs["full data"]), _merge(runs["InfoBatch"])]
    echo(format_table(results))
    assert ib is not None
    stats = ib.stats()
    pruning = [s for s in stats if s["pruned"] > 0]
    if pruning:
        echo(
            f"InfoBatch pruned in {len(pruning)} of {cfg.epochs} epochs, "
            f"{np.mean([s['pruned'] / s['total'] for s in pruning]):.1%} of the data per pruning epoch on average"
        )
    echo(f"measured with {versions()}")
    return results
