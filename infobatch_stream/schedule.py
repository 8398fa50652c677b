"""Step-based learning-rate schedules for runs whose epochs shrink as samples are pruned.

``OneCycleLR(total_steps=...)`` and ``CosineAnnealingLR(T_max=...)`` want the run's step count up
front, but a pruned epoch's length is known only when it is planned (``ib.set_epoch``), and a
stale ``len(loader)`` from the full data makes the schedule end too late (the LR never anneals).
Here any step-based scheduler is built over a fixed number of *virtual* steps and driven by the
training progress instead: after each optimiser step it is advanced to
``total_steps * (epoch + done / ib.num_batches(...)) / num_epochs``, so the schedule spans the
run whatever the epochs' lengths, and every epoch takes its share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .policy import PruneConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler


class PlannedRun(Protocol):
    """What the scheduler reads of a run (an ``InfoBatch``): its current epoch, the epoch's
    batch count, and the run's length."""

    @property
    def epoch(self) -> int: ...

    @property
    def config(self) -> PruneConfig: ...

    def num_batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int: ...


def progress(epoch: int, done: int, steps: int, num_epochs: int) -> float:
    """Fraction of the run after ``done`` of the epoch's ``steps`` steps, in ``[0, 1]``."""
    within = min(done / steps, 1.0) if steps > 0 else 1.0
    return min((epoch + within) / num_epochs, 1.0)


class ProgressScheduler:
    """Drive ``scheduler`` (built over a fixed number of virtual steps) by the run's progress.

    ``batch_size``, ``num_workers`` and ``drop_last`` must match the loader: they give each
    epoch's exact step count (``ib.num_batches``). Where one optimiser step is not one batch
    (gradient accumulation) or the loader filters further (a baseline that drops samples of its
    own), pass ``steps_per_epoch(epoch)`` instead. ``total_steps``, the scheduler's own length,
    is read from ``OneCycleLR.total_steps`` or ``CosineAnnealingLR.T_max``; pass it for others.
    Call :meth:`step` after every ``optimizer.step()``, as for the wrapped scheduler. An epoch
    that takes another number of steps than expected is logged: the LR would drift.
    """

    def __init__(
        self,
        ib: PlannedRun,
        scheduler: LRScheduler,
        batch_size: int,
        num_workers: int = 0,
        drop_last: bool = False,
        *,
        total_steps: int | None = None,
        steps_per_epoch: Callable[[int], int] | None = None,
    ) -> None:
        own = getattr(scheduler, "total_steps", None) or getattr(scheduler, "T_max", None)
        if total_steps is None:
            if own is None:
                raise ValueError(f"pass total_steps: the number of steps {type(scheduler).__name__} was built for")
            total_steps = int(own)
        if own is not None and int(own) != int(total_steps):
            raise ValueError(
                f"total_steps={total_steps} but {type(scheduler).__name__} was built for {own} steps: "
                "the schedule would end early or step past its end"
            )
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.ib, self.scheduler, self.total_steps = ib, scheduler, int(total_steps)
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.done, self.steps = -1, 0, 0
        self._warned = False

    def expected_steps(self, epoch: int) -> int:
        """Optimiser steps in ``epoch`` (the current, planned one)."""
        if self.steps_per_epoch is not None:
            return int(self.steps_per_epoch(epoch))
        return self.ib.num_batches(self.batch_size, self.num_workers, self.drop_last)

    def step(self) -> None:
        if self.ib.epoch != self.epoch:  # a new epoch was planned: its exact length
            if self.epoch >= 0 and self.done != self.steps:
                self._mismatch()
            self.epoch, self.done = self.ib.epoch, 0
            self.steps = self.expected_steps(self.epoch)
        self.done += 1
        if self.done > self.steps:
            self._mismatch()
        at = progress(self.epoch, self.done, self.steps, self.ib.config.num_epochs)
        target = min(math.floor(at * self.total_steps), self.total_steps - 1)
        while self.scheduler.last_epoch < target:
            self.scheduler.step()

    def _mismatch(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "epoch %d took %s steps where %d were expected: the learning rate drifts; give "
                "ProgressScheduler the loader's batch_size, num_workers and drop_last, or steps_per_epoch",
                self.epoch,
                f"more than {self.steps}" if self.done > self.steps else self.done,
                self.steps,
            )

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in self.scheduler.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": self.done, "steps": self.steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.done, self.steps = int(state["epoch"]), int(state["done"]), int(state["steps"])
        self.scheduler.load_state_dict(state["scheduler"])
