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

import math
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from .infobatch import InfoBatch


def progress(epoch: int, done: int, steps: int, num_epochs: int) -> float:
    """Fraction of the run after ``done`` of the epoch's ``steps`` steps, in ``[0, 1]``."""
    within = min(done / steps, 1.0) if steps > 0 else 1.0
    return min((epoch + within) / num_epochs, 1.0)


class ProgressScheduler:
    """Drive ``scheduler`` (built with ``total_steps`` virtual steps) by the run's progress.

    ``batch_size``, ``num_workers`` and ``drop_last`` must match the loader: they give each
    epoch's exact step count (``ib.num_batches``). A loader that filters further (a baseline
    that drops samples of its own) passes ``steps_per_epoch(epoch)`` instead. Call :meth:`step`
    after every ``optimizer.step()``, as for the wrapped scheduler.
    """

    def __init__(self, ib: "InfoBatch", scheduler: "LRScheduler", total_steps: int, batch_size: int,
                 num_workers: int = 0, drop_last: bool = False,
                 steps_per_epoch: Callable[[int], int] | None = None) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (the count the scheduler was built with), got {total_steps}")
        self.ib, self.scheduler, self.total_steps = ib, scheduler, int(total_steps)
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.done, self.steps = -1, 0, 0

    def step(self) -> None:
        if self.ib.epoch != self.epoch:  # a new epoch was planned: its exact length
            self.epoch, self.done = self.ib.epoch, 0
            self.steps = (self.steps_per_epoch(self.epoch) if self.steps_per_epoch is not None
                          else self.ib.num_batches(self.batch_size, self.num_workers, self.drop_last))
        self.done += 1
        at = progress(self.epoch, self.done, self.steps, self.ib.config.num_epochs)
        target = min(math.floor(at * self.total_steps), self.total_steps - 1)
        while self.scheduler.last_epoch < target:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": self.done, "steps": self.steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.done, self.steps = int(state["epoch"]), int(state["done"]), int(state["steps"])
        self.scheduler.load_state_dict(state["scheduler"])
