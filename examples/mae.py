"""MAE-style masked-patch pretraining from tar shards with InfoBatch (digits or any png shards).

    python examples/mae.py --quick
    python examples/mae.py --ema-decay 0.5                # score by a moving average of the losses

A small transformer encodes the visible half of an image's 2x2 patches; a one-layer decoder
predicts the masked half from mask tokens. A sample's loss is the mean squared error over its
masked patches, with a fresh random mask at every step: a noisy score, which is what
``--ema-decay`` is for. The test metric is the same loss on the held-out images with fixed
masks (lower is better). The prune ratio is the paper's r=0.5. See ``common.py`` for what all
examples share.
"""

from __future__ import annotations

import torch
from common import Example, main
from torch import nn

PATCH, DIM, MASK_RATIO = 2, 64, 0.5


def _layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=2 * DIM, dropout=0.0, batch_first=True)


class TinyMAE(nn.Module):
    def __init__(self, side: int, _classes: int = 0) -> None:
        super().__init__()
        if side % PATCH:
            raise SystemExit(f"mae.py cuts images into {PATCH}x{PATCH} patches; got {side}x{side} images")
        self.side, self.grid = side, side // PATCH
        self.num_patches = self.grid * self.grid
        self.embed = nn.Linear(PATCH * PATCH, DIM)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, DIM) * 0.02)
        self.encoder = nn.TransformerEncoder(_layer(), num_layers=2, enable_nested_tensor=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.decoder = nn.TransformerEncoder(_layer(), num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, PATCH * PATCH)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, side*side) images as (B, patches, PATCH*PATCH)."""
        b = x.shape[0]
        x = x.reshape(b, self.grid, PATCH, self.grid, PATCH).permute(0, 1, 3, 2, 4)
        return x.reshape(b, self.num_patches, PATCH * PATCH)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch from the visible ones (``keep``: (B, k) patch indices)."""
        tokens = self.embed(self.patches(x)) + self.pos
        index = keep.unsqueeze(-1).expand(-1, -1, DIM)
        encoded = self.encoder(tokens.gather(1, index))
        full = self.mask_token.expand(x.shape[0], self.num_patches, DIM).scatter(1, index, encoded) + self.pos
        return self.head(self.decoder(full))


def masked_loss(model: TinyMAE, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, n = x.shape[0], model.num_patches
    visible = max(1, round(n * (1 - MASK_RATIO)))
    keep = torch.rand(b, n, generator=g).argsort(1)[:, :visible]
    masked = torch.ones(b, n).scatter(1, keep, 0.0)
    error = ((model(x, keep) - model.patches(x)) ** 2).mean(-1)
    return (error * masked).sum(1) / masked.sum(1)


def per_sample_loss(model: nn.Module, x: torch.Tensor, _: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return masked_loss(model, x, g)


def test_loss(model: nn.Module, x: torch.Tensor, _: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(1234)  # the same masks at every evaluation
    return float(torch.stack([masked_loss(model, x, g).mean() for _ in range(4)]).mean())


EXAMPLE = Example(
    "mae",
    "masked_mse",
    False,
    TinyMAE,
    per_sample_loss,
    test_loss,
    lr=5e-3,
    optimizer="adamw",
    epochs=100,
    quick_epochs=8,
)

if __name__ == "__main__":
    main(EXAMPLE, __doc__)
