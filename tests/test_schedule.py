"""ProgressScheduler: a step-based LR schedule that spans a run of shrinking, pruned epochs."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from infobatch_stream import InfoBatch, ProgressScheduler
from infobatch_stream.schedule import progress
from tests.helpers.data import slot_loss
from tests.helpers.loaders import meta_loader

EPOCHS, BATCH, WORKERS, VIRTUAL = 5, 8, 2, 1000


@pytest.fixture(scope="module")
def index(shared_shards):
    return shared_shards(6, 30)[1]


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _run(
    ib: InfoBatch, make_scheduler, epochs: int = EPOCHS, described_workers: int = WORKERS
) -> tuple[list[float], list[int], ProgressScheduler]:
    """Train with the fixed per-slot loss on WORKERS loader workers, the ProgressScheduler told
    of ``described_workers``; the LR after every step and the steps per epoch."""
    opt = _optimizer()
    sched = ProgressScheduler(ib, make_scheduler(opt), BATCH, described_workers)
    loader = meta_loader(ib, BATCH, num_workers=WORKERS)
    lrs, steps = [], []
    for epoch in range(epochs):
        ib.set_epoch(epoch)
        steps.append(0)
        for (meta,) in loader:
            ib.update(meta, slot_loss(meta))
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
            steps[-1] += 1
    return lrs, steps, sched


def test_cosine_follows_the_fraction_of_the_run(index):
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.7, delta=0.8, seed=1)
    lrs, steps, _ = _run(ib, lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=VIRTUAL))
    assert len(set(steps)) > 1, "pruning should make the epochs differ in length"
    i = 0
    for epoch, n in enumerate(steps):
        for done in range(1, n + 1):
            at = math.floor(progress(epoch, done, n, EPOCHS) * VIRTUAL)
            expected = 0.5 * (1 + math.cos(math.pi * min(at, VIRTUAL - 1) / VIRTUAL))
            assert lrs[i] == pytest.approx(expected, abs=1e-9), (epoch, done)
            i += 1
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (VIRTUAL - 1) / VIRTUAL)))


def test_one_cycle_ends_its_cycle_exactly_at_the_last_step(index):
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.7, delta=0.8, seed=2)
    lrs, steps, sched = _run(ib, lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=VIRTUAL))
    assert sched.scheduler.last_epoch == VIRTUAL - 1
    assert max(lrs) == pytest.approx(1.0, rel=1e-3)  # the peak was reached inside the run
    assert lrs[-1] < 1e-3  # and the cycle annealed fully by its end
    full = EPOCHS * -(-ib.index.num_samples // BATCH)
    assert sum(steps) < 0.9 * full  # a schedule sized from len(loader) on full data would have ended too late


def test_state_dict_round_trip(index):
    ib = InfoBatch(index, num_epochs=EPOCHS)
    opt = _optimizer()
    sched = ProgressScheduler(ib, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=VIRTUAL), BATCH)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = _optimizer()
    opt2.load_state_dict(opt.state_dict())  # a checkpoint restores the optimiser (its lr) too
    again = ProgressScheduler(ib, torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=VIRTUAL), BATCH)
    again.load_state_dict(sched.state_dict())
    sched.step()
    again.step()
    assert again.get_last_lr() == sched.get_last_lr() and again.done == 4
    with pytest.raises(ValueError, match="built for 1000 steps"):
        ProgressScheduler(ib, sched.scheduler, BATCH, total_steps=500)
    with pytest.raises(ValueError, match="pass total_steps"):
        ProgressScheduler(ib, torch.optim.lr_scheduler.LambdaLR(_optimizer(), lambda s: 1.0), BATCH)


def test_a_wrong_step_count_is_logged(index, caplog):
    """A loader with workers described as one without: the epoch's length differs, say so."""
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.7, delta=0.8, seed=1)
    cosine = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=VIRTUAL)
    with caplog.at_level(logging.WARNING, logger="infobatch_stream"):
        _run(ib, cosine, epochs=2, described_workers=0)
    assert "steps where" in caplog.text and "num_workers" in caplog.text
