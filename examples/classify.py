"""Image classification from tar shards with InfoBatch: an MLP on the digits (or any png/cls shards).

    python examples/classify.py --quick                   # 8 epochs on the bundled digits
    python examples/classify.py --arm full --seed 1       # the full-data arm of the study

The per-sample loss is the cross-entropy (``reduction="none"``); the test metric is accuracy.
See ``common.py`` for the arms, the data and the loop every example shares.
"""

from __future__ import annotations

import torch
from common import Example, main
from torch import nn
from torch.nn import functional as F


def make_model(side: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(side * side, 256), nn.ReLU(), nn.Linear(256, classes))


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


EXAMPLE = Example("classify", "accuracy", True, make_model, per_sample_loss, accuracy, lr=0.1, epochs=30)

if __name__ == "__main__":
    main(EXAMPLE, __doc__)
