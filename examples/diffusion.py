"""Diffusion-style (DDPM) denoising training from tar shards with InfoBatch (digits or any png shards).

    python examples/diffusion.py --quick
    python examples/diffusion.py --normalized-score     # score = loss / mean loss at its timestep

An MLP predicts the noise added to an image at a timestep drawn at random for every sample and
step (linear beta schedule, ``STEPS`` timesteps). A sample's loss is the DDPM loss, the mean
squared error of the predicted noise, at its random timestep: very noisy as a score, which is
what ``--ema-decay`` and ``--normalized-score`` (the loss divided by the running mean loss at
its timestep) are for. The test metric is the same loss on the held-out images averaged
over fixed timesteps and noise (lower is better). See ``common.py`` for what all examples share.
"""

from __future__ import annotations

import math

import torch
from common import Example, main
from torch import nn

STEPS = 100
BETAS = torch.linspace(1e-4, 0.08, STEPS)
ALPHA_BAR = torch.cumprod(1 - BETAS, 0)


class Denoiser(nn.Module):
    def __init__(self, side: int, _classes: int = 0, width: int = 256, time_dim: int = 32) -> None:
        super().__init__()
        self.register_buffer("t_mean", torch.ones(STEPS))  # moving average of the loss per timestep (for scores)
        pixels = side * side
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU())
        self.net = nn.Sequential(
            nn.Linear(pixels + width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, pixels)
        )

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
        angles = t.float().unsqueeze(1) * freqs
        return torch.cat([angles.sin(), angles.cos()], 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, self.time(self.embed(t))], 1))


def ddpm_loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the predicted noise at timesteps ``t`` (images scaled to [-1, 1])."""
    a = ALPHA_BAR[t].unsqueeze(1)
    x_t = a.sqrt() * (2 * x - 1) + (1 - a).sqrt() * noise
    return ((model(x_t, t) - noise) ** 2).mean(1)


def per_sample_loss(
    model: nn.Module, x: torch.Tensor, _: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM loss at a random timestep, and that loss divided by the moving average of the loss
    at the same timestep: the timestep explains most of a loss's value, the ratio is the sample's
    own. Each timestep's average moves by ``1 - 0.9**n`` towards the mean of its ``n`` losses in
    the batch, so a timestep drawn often in a batch is not updated more than its share."""
    t = torch.randint(0, STEPS, (x.shape[0],), generator=g)
    loss = ddpm_loss(model, x, t, torch.randn(x.shape, generator=g))
    with torch.no_grad():
        sums = torch.zeros(STEPS).index_add_(0, t, loss.detach())
        counts = torch.zeros(STEPS).index_add_(0, t, torch.ones_like(loss))
        seen = counts > 0
        rate = 1 - 0.9 ** counts[seen]
        model.t_mean[seen] = (1 - rate) * model.t_mean[seen] + rate * sums[seen] / counts[seen]
    return loss, loss.detach() / model.t_mean[t]


def test_loss(model: nn.Module, x: torch.Tensor, _: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(1234)  # the same timesteps and noise at every evaluation
    losses = []
    for t in range(0, STEPS, STEPS // 10):  # ten timesteps across the schedule, two noise draws each
        for _ in range(2):
            losses.append(ddpm_loss(model, x, torch.full((x.shape[0],), t), torch.randn(x.shape, generator=g)).mean())
    return float(torch.stack(losses).mean())


EXAMPLE = Example(
    "diffusion",
    "test_ddpm_loss",
    False,
    Denoiser,
    per_sample_loss,
    test_loss,
    lr=2e-3,
    optimizer="adamw",
    epochs=100,
    quick_epochs=8,
    prune_ratio=0.5,
    has_noise_level=True,
)

if __name__ == "__main__":
    main(EXAMPLE, __doc__)
