"""Shards for the pipeline tests: real tars written by webdataset.ShardWriter."""

from __future__ import annotations

import os

import numpy as np
import torch
import webdataset as wds

from infobatch_stream import DatasetIndex, build_index


def write_shards(
    folder: str, num_shards: int = 8, per_shard: int = 40, prefix: str = "part", seed: int = 0
) -> list[str]:
    """Samples with a label and a payload of varied size (drawn from ``seed``); keys are unique over the dataset."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    pattern = os.path.join(folder, f"{prefix}-%03d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(num_shards * per_shard):
            sink.write(
                {"__key__": f"sample{i:06d}", "cls": str(i % 10).encode(), "bin": rng.bytes(int(rng.integers(0, 3000)))}
            )
    return [pattern % i for i in range(num_shards)]


def make_index(folder: str, **kw) -> tuple[list[str], DatasetIndex]:
    urls = write_shards(folder, **kw)
    return urls, build_index(urls, os.path.join(folder, "index.json"))


def slot_loss(meta: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-loss per slot in [0, 1): half the samples fall below the mean."""
    slots = torch.as_tensor(meta)[:, 0].to(torch.int64)
    return ((slots * 2654435761) % 1000).to(torch.float32) / 1000.0


def train_epochs(ib, loader, epochs: int) -> list[list[int]]:
    """``set_epoch``, one pass with the fixed per-slot loss, per epoch; the slots trained in each."""
    per_epoch = []
    for epoch in range(epochs):
        ib.set_epoch(epoch)
        slots: list[int] = []
        for batch in loader:
            meta = batch[-1]
            ib.update(meta, slot_loss(meta))
            slots.extend(torch.as_tensor(meta)[:, 0].tolist())
        per_epoch.append(slots)
    return per_epoch


def write_sized_shards(folder: str, sizes: list[int], prefix: str = "sized") -> list[str]:
    """One shard per entry of ``sizes`` with that many samples (keys unique over the dataset)."""
    os.makedirs(folder, exist_ok=True)
    urls, i = [], 0
    for shard, size in enumerate(sizes):
        url = os.path.join(folder, f"{prefix}-{shard:03d}.tar")
        with wds.TarWriter(url) as sink:
            for _ in range(size):
                sink.write({"__key__": f"sample{i:06d}", "cls": str(i % 10).encode()})
                i += 1
        urls.append(url)
    return urls
