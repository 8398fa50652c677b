"""The demo's settings, apart from the demo so that the command line can show them without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    out: str = "demo_out"
    epochs: int = 60
    prune_ratio: float = 0.5
    delta: float = 0.875
    batch_size: int = 32
    lr: float = 0.05
    workers: int = 2
    shards: int = 8
    seed: int = 0
    repeats: int = 2  # each run this many times, interleaved full/InfoBatch/InfoBatch/full/...
    progress: bool = True
